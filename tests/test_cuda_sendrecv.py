"""send/recv of GPU memory: host staging on every transport.

Without a GPU, the staging is checked with host memory behind a
``__cuda_array_interface__`` and a host copy standing in for the CUDA copy
(``lamina_net.core._cuda_copy``): the bytes, the order of copies and receives,
sizes, timeouts and failures are the real code's. With a GPU (the device check
script), torch CUDA tensors go through the real copy.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

import lamina_net as ln
from lamina_net import _core
from lamina_net import core as ln_core

from harness import free_port

pytestmark = pytest.mark.skipif(not _core.HAVE_CUDA, reason="lamina-net built without CUDA")


class HostBackedCudaArray:
    """Host bytes that present themselves as GPU memory (the staging path is taken)."""

    def __init__(self, nbytes: int, fill: int | None = None):
        self.host = np.zeros(nbytes, np.uint8) if fill is None else np.full(nbytes, fill, np.uint8)
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "version": 3, "stream": None,
                                         "data": (int(self.host.ctypes.data) if nbytes else 0, False)}


@pytest.fixture
def host_copy(monkeypatch):
    copies = []

    def copy(dst: int, src: int, nbytes: int) -> None:
        copies.append(nbytes)
        ctypes.memmove(dst, src, nbytes)

    monkeypatch.setattr(ln_core, "_cuda_copy", copy)
    return copies


@pytest.fixture(params=["tcp", "shm"])
def channels(request):
    store = ln.StoreServer("127.0.0.1", 0)
    with ln.Endpoint(0, 2, store.address, group="cuda-sendrecv", timeout=10) as ep0, \
            ln.Endpoint(1, 2, store.address, group="cuda-sendrecv", timeout=10) as ep1:
        got = {}
        opener = threading.Thread(target=lambda: got.setdefault(0, ep0.channel(1, transport=request.param)))
        opener.start()
        got[1] = ep1.channel(0, transport=request.param)
        opener.join(20)
        yield got[0], got[1]
    store.close()


def test_gpu_to_gpu_messages_arrive_byte_for_byte_in_order(channels, host_copy):
    sender, receiver = channels
    rng = np.random.default_rng(7)
    sizes = [0, 1, 8, 4095, 65536, 300_000]
    sources = []
    for n in sizes:
        source = HostBackedCudaArray(n)
        source.host[:] = rng.integers(0, 256, n, dtype=np.uint8)
        sources.append(source)
    targets = [HostBackedCudaArray(n + 16, fill=0xEE) for n in sizes]
    receives = [receiver.irecv(t) for t in targets]
    for source in sources:
        sender.send(source, timeout=10)
    for n, source, target, receive in zip(sizes, sources, targets, receives):
        assert receive.wait(10) == n
        assert np.array_equal(target.host[:n], source.host)
        assert (target.host[n:] == 0xEE).all()  # nothing past the message is written
    assert host_copy.count(300_000) == 2  # one copy down at the sender, one up at the receiver


def test_mixed_host_and_gpu_ends(channels, host_copy):
    sender, receiver = channels
    host_out = np.zeros(64, np.uint8)
    gpu_out = HostBackedCudaArray(64)
    first, second = receiver.irecv(gpu_out), receiver.irecv(host_out)
    sender.send(np.arange(64, dtype=np.uint8), timeout=10)
    sender.send(HostBackedCudaArray(32, fill=5), timeout=10)
    assert first.wait(10) == 64 and np.array_equal(gpu_out.host, np.arange(64, dtype=np.uint8))
    assert second.wait(10) == 32 and (host_out[:32] == 5).all() and (host_out[32:] == 0).all()


def test_copy_up_happens_once_whichever_way_completion_is_seen(channels, host_copy):
    sender, receiver = channels
    target = HostBackedCudaArray(128)
    receive = receiver.irecv(target)
    sender.send(HostBackedCudaArray(100, fill=9), timeout=10)
    while not receive.done:
        pass
    assert (target.host[:100] == 9).all()  # `done` already copied up
    assert receive.test() and receive.wait(1) == 100
    assert host_copy == [100, 100]  # down once, up once


def test_an_oversized_message_fails_that_receive_and_copies_nothing(channels, host_copy):
    sender, receiver = channels
    small = HostBackedCudaArray(16, fill=1)
    big_enough = HostBackedCudaArray(64, fill=1)
    too_small, next_one = receiver.irecv(small), receiver.irecv(big_enough)
    sender.send(np.full(32, 3, np.uint8), timeout=10)
    sender.send(np.full(8, 4, np.uint8), timeout=10)
    with pytest.raises(ln.UsageError):
        too_small.wait(10)
    assert (small.host == 1).all()
    assert next_one.wait(10) == 8 and (big_enough.host[:8] == 4).all()
    assert host_copy == [8]


def test_a_timed_out_receive_copies_nothing_and_the_next_gets_the_message(channels, host_copy):
    sender, receiver = channels
    first, second = HostBackedCudaArray(8, fill=1), HostBackedCudaArray(8, fill=1)
    withdrawn = receiver.irecv(first)
    with pytest.raises(ln.TimeoutError):
        withdrawn.wait(0.05)
    receive = receiver.irecv(second)
    sender.send(np.full(8, 6, np.uint8), timeout=10)
    assert receive.wait(10) == 8 and (second.host == 6).all() and (first.host == 1).all()


def test_a_failed_copy_up_is_reported_by_every_later_look(channels, monkeypatch):
    sender, receiver = channels
    calls = []

    def failing_copy(dst, src, nbytes):
        calls.append(nbytes)
        raise ln.TransportError("CUDA not available: injected")

    monkeypatch.setattr(ln_core, "_cuda_copy", failing_copy)
    receive = receiver.irecv(HostBackedCudaArray(8))
    sender.send(np.ones(8, np.uint8), timeout=10)
    while not receive.done:  # done swallows it, so that polling loops do not blow up mid-check
        pass
    for look in (lambda: receive.wait(1), receive.test):
        with pytest.raises(ln.TransportError, match="injected"):
            look()
    assert calls == [8]  # not retried behind the caller's back


def test_without_a_gpu_the_real_copy_is_a_clear_error(channels):
    sender, _ = channels
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present: the real-copy tests below run instead")
    except ImportError:
        pass
    with pytest.raises(ln.LaminaError, match="CUDA not available"):
        sender.send(HostBackedCudaArray(8), timeout=5)


def test_torch_cuda_tensors_round_trip(channels):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sender, receiver = channels
    source = torch.arange(1 << 18, dtype=torch.float32, device="cuda") * 3
    target = torch.empty_like(source)
    receive = receiver.irecv(target)
    sender.send(source * 1, timeout=10)  # produced on torch's stream right before: the send waits for it
    assert receive.wait(10) == source.numel() * 4
    assert torch.equal(target, source)
