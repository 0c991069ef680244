"""pytest-benchmark suite of the Python API's per-call overheads, over shm and tcp.

    .venv/bin/python -m pytest bench/test_api_overheads.py                  # measure
    .venv/bin/python -m pytest bench/test_api_overheads.py --benchmark-autosave
    .venv/bin/python -m pytest bench/test_api_overheads.py --benchmark-compare  # against the last saved run

Both ranks are endpoints of this one process (rank 0 hosts the store), so a
put-with-signal's wait is the target rank waiting on its own word: the figure
is the API's overhead plus one-way delivery, with no second process to
schedule. CI runs it with ``--benchmark-disable`` (every benchmark body runs
once, checked, untimed) from tests/test_bench_suite.py: it checks that the
suite works, not its times.
"""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import lamina_net as ln

TIMEOUT = 10.0
TRANSPORTS = ["shm", "tcp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pair:
    """Two endpoints of one process and one channel each way, target memory on rank 1."""

    def __init__(self, transport: str):
        store = f"127.0.0.1:{_free_port()}"
        # Both constructors (and both channel calls) meet in the store: run them side by side.
        with ThreadPoolExecutor(2) as pool:
            self.eps = list(pool.map(lambda r: ln.Endpoint(r, 2, store, group=f"overheads-{transport}",
                                                           timeout=TIMEOUT), (0, 1)))
            self.ch, self.peer_ch = pool.map(lambda r: self.eps[r].channel(1 - r, transport), (0, 1))
        self.target = self.eps[1].alloc(1 << 16)
        self.sig = self.eps[1].alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
        self.remote, self.remote_sig = self.target.descriptor(), self.sig.descriptor()
        self.src = self.eps[0].alloc(4096)
        self.src.array[:] = np.arange(4096, dtype=np.uint32).astype(np.uint8)
        self.signals = 0

    def close(self) -> None:
        for ep in self.eps:
            ep.close()


@pytest.fixture(scope="module", params=TRANSPORTS)
def pair(request):
    p = Pair(request.param)
    assert p.ch.transport == request.param
    yield p
    p.close()


def test_register(benchmark, pair):
    array = np.zeros(4096, np.uint8)
    ep = pair.eps[0]

    def register_and_close():
        region = ep.register(array, ln.Access.REMOTE_WRITE)
        region.close()
        return region

    region = benchmark(register_and_close)
    assert region.closed and region.nbytes == 4096


@pytest.mark.parametrize("size", [8, 4096])
def test_put(benchmark, pair, size):
    benchmark(pair.ch.put, pair.src, pair.remote, 0, nbytes=size)
    pair.ch.flush(TIMEOUT)
    assert bytes(pair.target.array[:size]) == bytes(pair.src.array[:size])


@pytest.mark.parametrize("size", [8, 4096])
def test_put_signal_wait(benchmark, pair, size):
    def put_signal_wait():
        pair.ch.put(pair.src, pair.remote, 0, nbytes=size, signal=pair.remote_sig)
        pair.signals += 1
        return pair.sig.wait(0, value=pair.signals, timeout=TIMEOUT)

    assert benchmark(put_signal_wait) == pair.signals
    assert bytes(pair.target.array[:size]) == bytes(pair.src.array[:size])


def test_put_many_signal_wait(benchmark, pair):
    """Three 1 KiB puts as one batch (one write on tcp), the last one signalling."""
    puts = [ln.Put(pair.src, pair.remote, 1024 * i, src_offset=1024 * i, nbytes=1024) for i in range(3)]
    puts[-1] = puts[-1]._replace(signal=pair.remote_sig)

    def put_many_signal_wait():
        pair.ch.put_many(puts)
        pair.signals += 1
        return pair.sig.wait(0, value=pair.signals, timeout=TIMEOUT)

    assert benchmark(put_many_signal_wait) == pair.signals
    assert bytes(pair.target.array[:3072]) == bytes(pair.src.array[:3072])


def test_iput_wait(benchmark, pair):
    def iput_wait():
        handle = pair.ch.iput(pair.src, pair.remote, 128, nbytes=8)
        handle.wait(TIMEOUT)
        return handle

    assert benchmark(iput_wait).done
    assert bytes(pair.target.array[128:136]) == bytes(pair.src.array[:8])


@pytest.mark.parametrize("size", [8, 4096])
def test_send_recv(benchmark, pair, size):
    message = pair.src.array[:size]
    inbox = np.empty(size, np.uint8)

    def send_recv():
        pending = pair.peer_ch.irecv(inbox)
        pair.ch.send(message, TIMEOUT)
        return pending.wait(TIMEOUT)

    assert benchmark(send_recv) == size
    assert bytes(inbox) == bytes(message)
