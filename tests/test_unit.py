"""Single-process tests: errors, arrays, store, descriptors, endpoint lifecycle, CLI."""
import array
import builtins
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import lamina_net as ln
from lamina_net import _core
from lamina_net._arrays import as_buffer


def test_import_does_not_import_torch():
    code = "import sys, lamina_net; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_error_hierarchy():
    assert issubclass(ln.UsageError, ValueError) and issubclass(ln.UsageError, ln.LaminaError)
    assert issubclass(ln.TimeoutError, builtins.TimeoutError) and issubclass(ln.TimeoutError, ln.LaminaError)
    assert issubclass(ln.TransportError, ln.LaminaError)


def test_as_buffer_is_zero_copy_for_every_kind():
    a = np.arange(16, dtype=np.float32)
    assert as_buffer(a).ptr == a.ctypes.data and as_buffer(a).nbytes == 64
    ba = bytearray(b"hello")
    buf = as_buffer(ba, writable=True)
    assert buf.nbytes == 5
    assert as_buffer(array.array("i", [1, 2, 3])).nbytes == 12
    assert as_buffer(memoryview(b"abc")).readonly
    with pytest.raises(ln.UsageError):
        as_buffer(b"abc", writable=True)
    with pytest.raises(ln.UsageError, match="contiguous"):
        as_buffer(np.zeros((4, 4))[:, 1])
    with pytest.raises(ln.UsageError, match="object"):
        as_buffer(np.array([None, 1]))
    with pytest.raises(ln.UsageError, match="not an array"):
        as_buffer(3.5)


def test_as_buffer_torch_and_dlpack():
    torch = pytest.importorskip("torch")
    t = torch.arange(10, dtype=torch.int64)
    b = as_buffer(t)
    assert b.ptr == t.data_ptr() and b.nbytes == 80 and not b.cuda
    with pytest.raises(ln.UsageError, match="contiguous"):
        as_buffer(torch.zeros(4, 4).t())
    with pytest.raises(ln.UsageError, match="not supported"):
        as_buffer(torch.zeros(4, device="meta"))

    class DLPackOnly:  # only the DLPack protocol, no buffer protocol
        def __init__(self, arr):
            self.arr = arr

        def __dlpack__(self, **kw):
            return self.arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

    src = np.arange(6, dtype=np.int16)
    assert as_buffer(DLPackOnly(src)).ptr == src.ctypes.data


def test_descriptor_roundtrip_and_validation():
    with ln.StoreServer() as server, ln.Endpoint(0, 1, server.address, group="unit", timeout=5,
                                                 transports=("tcp",)) as ep:
        buf = np.zeros(100, np.uint8)
        region = ep.register(buf, ln.Access.REMOTE_WRITE)
        d = region.descriptor()
        blob = d.to_bytes()
        assert len(blob) == _core.DESCRIPTOR_BYTES == 80
        d2 = ln.RemoteRegion.from_bytes(blob)
        assert d2.rank == 0 and d2.nbytes == 100 and d2.access & ln.Access.REMOTE_WRITE
        assert d2.to_bytes() == blob
        for bad in (blob[:-1], b"\0" * 80, blob[:4] + b"\x09\x00" + blob[6:]):
            with pytest.raises(ln.UsageError):
                ln.RemoteRegion.from_bytes(bad)
        with pytest.raises(ln.UsageError):
            ep.register(np.zeros(0))
        with pytest.raises(ln.UsageError):
            ep.register(np.zeros(4), access=1 << 10)
        with pytest.raises(ln.UsageError):
            ep.register(np.frombuffer(b"readonly", np.uint8), ln.Access.REMOTE_WRITE)
        assert region.read_u64(0) == 0
        with pytest.raises(ln.UsageError):
            region.read_u64(97)


def test_endpoint_lifecycle_is_idempotent_and_typed():
    with ln.StoreServer() as server:
        ep = ln.Endpoint(0, 1, server.address, group="life", timeout=5, transports=("tcp", "shm"))
        assert set(ep.transports) >= {"tcp", "shm"}
        r = ep.register(np.zeros(8))
        ep.close()
        ep.close()
        assert r.closed
        with pytest.raises(ln.UsageError):
            ep.register(np.zeros(8))
        with pytest.raises(ln.UsageError):
            ep.rank
    with pytest.raises(ln.UsageError):
        ln.Endpoint(3, 2, "127.0.0.1:1")
    with pytest.raises(ln.UsageError):
        ln.Endpoint(0, 1, "no-port-here")
    with pytest.raises(ln.UsageError):
        ln.Endpoint(0, 1, object())
    with pytest.raises(ln.UsageError):
        ln.Endpoint(0, 1, "127.0.0.1:1", transports=("ipoac",))


def test_signal_wait_keeps_its_bound_and_sees_a_late_write():
    # The wait's deadline starts at its first look, not at the call (no clock
    # read in waits that end sooner): it must still time out after the bound,
    # not before and not much after, and a write that lands in the middle
    # must end it.
    with ln.StoreServer() as server, \
            ln.Endpoint(0, 1, server.address, group="bound", timeout=5, transports=("tcp",)) as ep:
        words = np.zeros(2, np.uint64)
        r = ep.register(words)
        for bound in (0.05, 0.3):
            t0 = time.monotonic()
            with pytest.raises(ln.TimeoutError, match="value is 0"):
                r.wait(0, 1, timeout=bound)
            assert bound <= time.monotonic() - t0 < bound + 1.0
        t0 = time.monotonic()
        with pytest.raises(ln.TimeoutError):
            r.wait(0, 1, timeout=0)
        assert time.monotonic() - t0 < 0.5
        writer = threading.Timer(0.2, lambda: words.__setitem__(1, 7))
        writer.start()
        t0 = time.monotonic()
        r.wait(8, 7, timeout=10)
        assert 0.15 <= time.monotonic() - t0 < 5
        writer.join()


def test_endpoint_needs_its_peers_store_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(ln.TimeoutError):
        ln.Endpoint(1, 2, "127.0.0.1:9", timeout=0.5)  # nobody hosts a store there
    assert time.monotonic() - t0 < 5


def test_store_set_get_add_and_timeout():
    with ln.StoreServer() as server:
        a = ln.StoreClient(server.host, server.port)
        b = ln.StoreClient(server.host, server.port)
        got = []
        t = threading.Thread(target=lambda: got.append(b.get("k", 5)))
        t.start()
        time.sleep(0.05)
        a.set("k", b"value")
        t.join(5)
        assert got == [b"value"]
        assert a.add("n", 2) == 2 and b.add("n", 3) == 5
        with pytest.raises(builtins.TimeoutError):
            a.get("missing", 0.2)
        a.close()
        a.close()


def _context_switches(thread: threading.Thread) -> int:
    # Voluntary ones only: the thread waking up by itself. Involuntary ones
    # are other processes preempting it (a loaded machine), not its doing.
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_idle_store_server_sleeps_and_closes_promptly():
    # An idle store must not wake up periodically: each wake-up preempts a
    # rank spinning on a busy core.
    server = ln.StoreServer()
    serving = server._thread
    before = _context_switches(serving)
    time.sleep(0.6)
    assert _context_switches(serving) - before <= 1
    client = ln.StoreClient(server.host, server.port)
    client.set("k", b"v")
    assert client.get("k", 1) == b"v"
    t0 = time.monotonic()
    server.close()
    server.close()
    assert time.monotonic() - t0 < 1 and not serving.is_alive()
    client.close()


def test_torch_store_is_accepted():
    pytest.importorskip("torch")
    import datetime
    import tempfile

    from torch.distributed import FileStore

    with tempfile.NamedTemporaryFile() as f:
        store = FileStore(f.name, 1)
        store.set_timeout(datetime.timedelta(seconds=5))
        with ln.Endpoint(0, 1, store, group="torchstore", timeout=5) as ep:
            region = ep.register(np.zeros(4))
            ep.publish("r", region)
            assert ep.lookup(0, "r").nbytes == 32
            with pytest.raises(ln.TimeoutError):
                ep.lookup(0, "absent", timeout=0.3)


def test_settings_registry_lists_every_tunable():
    names = {s[0] for s in _core.settings()}
    assert {"TIMEOUT", "SPIN_US", "SHM_RING_BYTES", "TCP_BUFFER", "IB_DEVICE"} <= names


def test_spin_window_stops_spinning_when_the_job_oversubscribes_the_host(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LAMINA_NET_SPIN_US", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _core.spin_window_us() == 100
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))
    assert _core.spin_window_us() == 100
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus + 1))
    assert _core.spin_window_us() == 0
    monkeypatch.setenv("LAMINA_NET_SPIN_US", "7")  # an explicit value wins
    assert _core.spin_window_us() == 7
    monkeypatch.setenv("LAMINA_NET_SPIN_US", "-1")
    with pytest.raises(ln.UsageError, match="SPIN_US"):
        _core.spin_window_us()


def test_local_launchers_say_how_many_ranks_share_the_host(monkeypatch):
    from lamina_net._local_world import local_world_size

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with local_world_size(3):
        assert os.environ["LOCAL_WORLD_SIZE"] == "3"
    assert "LOCAL_WORLD_SIZE" not in os.environ
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun's value stays
    with local_world_size(3):
        assert os.environ["LOCAL_WORLD_SIZE"] == "8"
    assert os.environ["LOCAL_WORLD_SIZE"] == "8"


def test_cli_info_and_bench_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lamina_net", "info", "--settings"], capture_output=True, text=True,
                         check=True).stdout
    assert "transports: tcp, shm" in out and "LAMINA_NET_TIMEOUT" in out
    path = tmp_path / "lat.json"
    proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "tcp,shm",
                           "--sizes", "8,4096", "--iterations", "50", "--warmup", "5", "--json", str(path),
                           "--baseline", "gloo"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert {(r["transport"], r["size_bytes"]) for r in records} == {
        (t, s) for t in ("tcp", "shm", "gloo") for s in (8, 4096)}
    for r in records:
        assert {"transport", "op", "size_bytes", "iterations", "p50_us", "p99_us"} <= set(r)
        assert r["iterations"] == 50 and 0 < r["p50_us"] <= r["p99_us"]
        if r["transport"] != "gloo":
            assert r["ratio_vs_ref"] > 0 and r["ratio_vs_gloo"] > 0  # measured side by side
    bad = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--sizes", "abc"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "sizes" in bad.stderr


def test_bench_write_op_polls_the_payload_word(tmp_path):
    # --op write: plain puts whose last word carries the round number (the
    # ib_write_lat method); it completes only if every round's word arrived.
    path = tmp_path / "write.json"
    proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "tcp,shm",
                           "--op", "write", "--sizes", "8,4096", "--iterations", "200", "--warmup", "5",
                           "--no-reference", "--baseline", "none", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert {(r["transport"], r["op"], r["size_bytes"]) for r in records} == {
        (t, "write", s) for t in ("tcp", "shm") for s in (8, 4096)}
    assert all(0 < r["p50_us"] <= r["p99_us"] for r in records)
    bad = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--op", "write", "--sizes", "12"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "multiples of 8" in bad.stderr


def test_bench_repeat_reports_the_median_of_each_rounds_ratio(tmp_path):
    # --repeat R: R rounds of lamina-net then the C reference; a figure is
    # the median over rounds of that round's own value.
    path = tmp_path / "rounds.json"
    proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "shm",
                           "--sizes", "8,64", "--iterations", "100", "--warmup", "5", "--repeat", "3",
                           "--baseline", "none", "--json", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(path.read_text())
    assert sorted(r["size_bytes"] for r in records) == [8, 64]
    for r in records:
        assert r["rounds"] == 3 and len(r["ref_ratio_by_round"]) == 3
        assert r["ratio_vs_ref"] == sorted(r["ref_ratio_by_round"])[1]
    bad = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--repeat", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--repeat" in bad.stderr


def test_merge_rounds_takes_each_figure_from_its_own_rounds():
    from lamina_net.bench_cli import merge_rounds

    def rec(size, p50, ref):
        return {"transport": "shm", "op": "put", "path": "host", "size_bytes": size, "iterations": 10,
                "p50_us": p50, "p99_us": 2 * p50, "ref_p50_us": ref, "ratio_vs_ref": p50 / ref}

    # The slow second round is one of three: it moves neither p50 nor the ratio.
    rounds = [[rec(8, 0.06, 0.03), rec(64, 0.07, 0.035)], [rec(8, 5.3, 0.03), rec(64, 0.08, 0.04)],
              [rec(8, 0.05, 0.025), rec(64, 0.07, 0.035)]]
    merged = {r["size_bytes"]: r for r in merge_rounds(rounds)}
    assert merged[8]["p50_us"] == 0.06 and merged[8]["ratio_vs_ref"] == 2.0
    assert merged[8]["ref_ratio_by_round"] == [2.0, 5.3 / 0.03, 2.0] and merged[8]["rounds"] == 3
    assert merged[64]["ref_p50_us"] == 0.035 and merged[64]["p99_us"] == 0.14
    assert merge_rounds([rounds[0]]) is rounds[0]


def test_cuda_memory_without_a_gpu_is_a_clear_typed_error():
    class FakeCudaArray:  # what cupy / numba expose
        __cuda_array_interface__ = {"shape": (16,), "typestr": "<f4", "data": (0x7f0000000000, False),
                                    "version": 3, "strides": None}

    with ln.StoreServer() as server, ln.Endpoint(0, 1, server.address, group="cuda", timeout=5,
                                                 transports=("tcp",)) as ep:
        if _core.HAVE_CUDA:
            # Built with CUDA: no driver or no device here, or not device memory.
            with pytest.raises((ln.TransportError, ln.UsageError), match="CUDA|device memory"):
                ep.register(FakeCudaArray())
        else:
            with pytest.raises(ln.UsageError, match="built with CUDA"):
                ep.register(FakeCudaArray())


def test_alloc_gives_a_registered_shared_array():
    with ln.StoreServer() as server, ln.Endpoint(0, 1, server.address, group="alloc", timeout=5) as ep:
        region = ep.alloc((4, 8), np.float32)
        assert region.array.shape == (4, 8) and region.array.dtype == np.float32
        assert not region.array.any()
        region.array[:] = 1.5
        assert region.nbytes == 128 and region.ptr == region.array.ctypes.data
        assert region.descriptor()._desc.shared_fd >= 0
        plain = ep.register(np.zeros(4))
        assert plain.descriptor()._desc.shared_fd == -1
        with pytest.raises(ln.UsageError):
            ep.alloc(0)
        with pytest.raises(ln.UsageError):
            ep.alloc((2, -1))


def test_rank_and_world_size_from_the_environment(monkeypatch):
    with ln.StoreServer() as server:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "1")
        with ln.Endpoint(store=server.address, group="env", timeout=5) as ep:
            assert (ep.rank, ep.world_size) == (0, 1)
        monkeypatch.setenv("RANK", "zero")
        with pytest.raises(ln.UsageError, match="RANK"):
            ln.Endpoint(store=server.address)
