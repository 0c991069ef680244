"""Regression tests of the hardening issue's defects that need no peer:
huge timeouts (4), a store that never answers (3), errors outside the typed
hierarchy (6)."""
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import lamina_net as ln
from harness import free_port


@pytest.fixture
def endpoint():
    with ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="hardening", timeout=5) as ep:
        yield ep


# ---- 4: huge timeouts are refused, not shortened to nothing

@pytest.mark.parametrize("bad", [math.inf, 1e12, 2e10])
def test_huge_timeouts_are_refused(endpoint, bad):
    word = endpoint.alloc(1, np.uint64)
    with pytest.raises(ln.UsageError, match="largest bound"):
        word.wait(0, 1, timeout=bad)
    with pytest.raises(ln.UsageError, match="largest bound"):
        ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="hardening-2", timeout=bad)


def test_the_largest_bound_is_a_real_bound(endpoint):
    word = endpoint.alloc(1, np.uint64)
    word.array[0] = 3
    t0 = time.monotonic()
    assert word.wait(0, 3, timeout=1e9) == 3  # reached already: returns at once
    assert time.monotonic() - t0 < 1.0
    word.array[0] = 0
    with pytest.raises(ln.TimeoutError):
        word.wait(0, 1, timeout=0.05)  # a short bound still expires (it used to for inf, at once)


def test_timeout_from_the_environment_is_checked(monkeypatch):
    monkeypatch.setenv("LAMINA_NET_TIMEOUT", "inf")
    with pytest.raises(ln.UsageError, match="LAMINA_NET_TIMEOUT"):
        ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="hardening-env")


# ---- 3: every store call is bounded by the caller's timeout

def test_a_store_that_never_answers_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever answers
    port = silent.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ln.TimeoutError):
            ln.Endpoint(1, 2, f"127.0.0.1:{port}", group="silent", timeout=1.0)
        assert time.monotonic() - t0 < 4.0
    finally:
        silent.close()


@contextlib.contextmanager
def _store_process():
    """A standalone store in a child process; yields (address, Popen)."""
    port = free_port()
    code = ("import sys, time; sys.path.insert(0, %r); from lamina_net.store import StoreServer; "
            "s = StoreServer('127.0.0.1', %d); print('up', flush=True); time.sleep(120)") % (
                os.path.dirname(os.path.dirname(ln.__file__)), port)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(10)


def test_a_stopped_store_process_bounds_lookup_and_barrier():
    with _store_process() as (address, proc):
        with ln.Endpoint(0, 1, address, group="stopped", timeout=1.0) as ep:
            region = ep.alloc(64)
            ep.publish("r", region)
            os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(ln.TimeoutError, match="did not answer"):
                ep.lookup(0, "never-published", timeout=0.5)
            assert time.monotonic() - t0 < 3.0
            # The client is out of step now: later calls fail at once with a typed error.
            with pytest.raises(ln.LaminaError):
                ep.barrier("b", timeout=0.5)


def test_a_dead_store_gives_a_transport_error():
    with _store_process() as (address, proc):
        with ln.Endpoint(0, 1, address, group="dead", timeout=2.0) as ep:
            region = ep.alloc(64)
            proc.kill()
            proc.wait(10)
            with pytest.raises(ln.TransportError, match="unreachable"):
                for _ in range(3):  # the first send may still be buffered before the reset arrives
                    ep.publish("r", region)
                    time.sleep(0.05)


# ---- 6: everything the public API raises is a lamina_net error

def test_alloc_takes_numpy_integers(endpoint):
    r = endpoint.alloc(np.int64(16))
    assert r.nbytes == 16
    r2 = endpoint.alloc((np.int32(2), 3), np.float32)
    assert r2.array.shape == (2, 3)
    with pytest.raises(ln.UsageError):
        endpoint.alloc("16")
    with pytest.raises(ln.UsageError):
        endpoint.alloc(2.5)


def test_calls_after_close_raise_usage_error():
    ep = ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="closed", timeout=5)
    region = ep.alloc(64)
    ep.close()
    for call in (lambda: ep.publish("r", region), lambda: ep.barrier("b"), lambda: ep.lookup(0, "r"),
                 lambda: ep.alloc(8), lambda: ep.channel(0)):
        with pytest.raises(ln.UsageError):
            call()


# ---- 8: running from a source tree

def test_import_from_a_source_tree_says_what_is_wrong(tmp_path):
    import shutil

    package = os.path.dirname(os.path.abspath(ln.__file__))
    shutil.copytree(package, tmp_path / "lamina_net",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "include", "bin"))
    # The base interpreter, no site packages: only the copied source tree is importable.
    base = os.path.join(sys.base_prefix, "bin", "python3")
    proc = subprocess.run([base, "-S", "-c", "import lamina_net"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", "")}, timeout=60)
    assert proc.returncode != 0
    assert "compiled module (_core) is missing" in proc.stderr and "pip install" in proc.stderr, proc.stderr
    assert "circular import" not in proc.stderr


def test_a_worker_that_exits_at_start_fails_the_pipeline_at_once():
    pytest.importorskip("torch")
    from lamina_net.decode.link import PipelineError
    from lamina_net.decode.pipeline import LocalCluster

    t0 = time.monotonic()
    with pytest.raises(PipelineError) as info:
        # An unparsable thread count makes the worker raise before it connects.
        LocalCluster(1, "tcp", timeout=30, threads_per_worker="not-a-number")
    elapsed = time.monotonic() - t0
    message = str(info.value)
    assert "exited with status 1" in message and "ValueError" in message, message
    assert elapsed < 20, f"noticed only after {elapsed:.1f} s"


# ---- 7: a restarted peer is reached again, with no stale records blamed

_RESTARTED_PEER = r"""
import sys
import numpy as np
import lamina_net as ln
store, life = sys.argv[1], int(sys.argv[2])
with ln.Endpoint(1, 2, store, group="restart", timeout=20) as ep:
    for tag, transport in enumerate(("shm", "tcp")):
        ch = ep.channel(0, transport, tag=tag)
        inbox, sig = ep.lookup(0, "inbox-" + transport), ep.lookup(0, "sig-" + transport)
        ch.put(np.full(8, life, np.uint8), inbox, 8 * life, signal=sig)
        ch.flush(timeout=10)
"""


def test_a_restarted_peer_can_be_reached_again():
    port = free_port()
    store = f"127.0.0.1:{port}"
    with ln.Endpoint(0, 2, store, group="restart", timeout=20) as ep:
        regions = {}
        for transport in ("shm", "tcp"):
            regions[transport] = (ep.alloc(64), ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC))
            ep.publish("inbox-" + transport, regions[transport][0])
            ep.publish("sig-" + transport, regions[transport][1])
        for life in (1, 2):
            child = subprocess.Popen([sys.executable, "-c", _RESTARTED_PEER, store, str(life)],
                                     stderr=subprocess.PIPE, text=True)
            try:
                for tag, transport in enumerate(("shm", "tcp")):
                    ch = ep.channel(1, transport, tag=tag, timeout=15)
                    inbox, sig = regions[transport]
                    sig.wait(0, life, timeout=15, channel=ch)
                    assert (inbox.array[8 * life:8 * life + 8] == life).all()
                assert child.wait(30) == 0, child.stderr.read()
            finally:
                child.kill()
                child.wait()


# ---- 5: groups and ranks are checked

@pytest.fixture
def shared_store():
    server = ln.StoreServer("127.0.0.1", 0)
    yield server.address
    server.close()


def test_a_second_job_with_the_same_group_is_refused(shared_store):
    with ln.Endpoint(0, 2, shared_store, group="same-name", timeout=5), \
            ln.Endpoint(1, 2, shared_store, group="same-name", timeout=5):
        with pytest.raises(ln.UsageError, match="already taken.*same group name"):
            ln.Endpoint(0, 2, shared_store, group="same-name", timeout=5)
        with pytest.raises(ln.UsageError, match="rank 1 of group 'same-name' is already taken"):
            ln.Endpoint(1, 2, shared_store, group="same-name", timeout=5)


def test_ranks_that_disagree_on_the_world_size_are_refused(shared_store):
    with ln.Endpoint(0, 2, shared_store, group="sizes", timeout=5):
        with pytest.raises(ln.UsageError, match="world_size=2.*world_size=3"):
            ln.Endpoint(1, 3, shared_store, group="sizes", timeout=5)
        # The refused rank gave its claim back: the right one joins.
        with ln.Endpoint(1, 2, shared_store, group="sizes", timeout=5) as ep:
            assert ep.rank == 1


def test_a_closed_rank_can_be_taken_again(shared_store):
    ln.Endpoint(0, 1, shared_store, group="again", timeout=5).close()
    with ln.Endpoint(0, 1, shared_store, group="again", timeout=5) as ep:
        assert ep.rank == 0


def test_a_crashed_ranks_claim_is_taken_over(shared_store):
    code = ("import os, lamina_net as ln; ep = ln.Endpoint(0, 1, %r, group='crashed', timeout=5); "
            "os._exit(0)") % shared_store
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with ln.Endpoint(0, 1, shared_store, group="crashed", timeout=5) as ep:  # its holder is gone
        assert ep.rank == 0


def test_device_ring_slots_come_from_the_settings_registry(monkeypatch):
    import threading

    store = f"127.0.0.1:{free_port()}"
    with ln.Endpoint(0, 2, store, group="ring-setting", timeout=5) as ep0, \
            ln.Endpoint(1, 2, store, group="ring-setting", timeout=5) as ep1:
        other = threading.Thread(target=lambda: ep1.channel(0, "shm"))
        other.start()
        ch = ep0.channel(1, "shm")
        other.join()
        src = ep0.alloc(64)
        monkeypatch.setenv("LAMINA_NET_DEVICE_RING_SLOTS", "not-a-number")
        with pytest.raises(ln.UsageError, match="LAMINA_NET_DEVICE_RING_SLOTS"):
            ch.device([src])
        monkeypatch.setenv("LAMINA_NET_DEVICE_RING_SLOTS", "0")
        with pytest.raises(ln.UsageError, match="LAMINA_NET_DEVICE_RING_SLOTS"):
            ch.device([src])
        monkeypatch.setenv("LAMINA_NET_DEVICE_RING_SLOTS", "8")
        with ch.device([src]) as dev:
            assert dev.error is None
        with pytest.raises(ln.UsageError, match="power of two"):
            ch.device([src], ring_slots=0)
