"""Tier 0 of the device API (lamina_net/device.cuh, csrc/proxy, lamina_net/device.py).

The producers are CPU threads running the header's own code (compiled by g++
from tests/device/cpu_producers.cpp, loaded with ctypes); the target is a
second process. Every case runs over each local transport (tcp, shm); the
verbs tier runs the same bodies in tests/verbs/test_verbs_device.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lamina_net as ln
from lamina_net import device as lnd

from conftest import compiler_env, assert_all_ok, nvcc_path, run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "device"))
import device_ranks as dr  # noqa: E402
import producers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
USER_KERNEL = os.path.join(HERE, "device", "user_kernel.cu")


@pytest.fixture(scope="session")
def lib_path(tmp_path_factory):
    if producers.compiler() is None and not os.path.isfile(producers.cached_path()):
        pytest.skip("no g++ (or $CXX) on PATH: cannot build tests/device/cpu_producers.cpp")
    return producers.build(str(tmp_path_factory.mktemp("device-producers")))


@pytest.fixture(scope="session")
def lib(lib_path):
    return producers.load(lib_path)


@pytest.fixture(autouse=True)
def _transport_usable(request):
    if "transport" in request.fixturenames and request.getfixturevalue("transport") == "shm" \
            and not os.path.isdir("/dev/shm"):
        pytest.skip("shm transport: no /dev/shm on this machine")


def ok(results):
    return assert_all_ok(results)


# --------------------------------------------------------------------------- 1. many producers


@pytest.mark.parametrize("target", ["alloc", "registered"])
def test_many_producers_every_record_intact_signal_count_exact(transport, lib_path, target):
    threads, per_thread, nbytes, slots = 8, 400, 96, 64
    out = ok(run_ranks(dr.many_producers, args=(lib_path, transport, threads, per_thread, nbytes, slots, target),
                       timeout=120))
    p, t = out[0], out[1]
    n = threads * per_thread
    assert p["statuses"] == [0] * threads and p["rc"] == 0, p
    assert p["posted"] == [per_thread] * threads
    assert p["flush"] == 0
    assert p["error"] is None and p["error_code"] == 0
    assert p["stats"]["executed"] == n + 1, p["stats"]  # every put_signal and the flush
    assert p["stats"]["flushes"] == 1
    assert t["signal"] == n, f"signal word {t['signal']} != {n}"
    assert t["first_bad"] == -1, f"record {t['first_bad']} did not arrive intact"
    # The handle's bytes are the C struct, as the header lays it out.
    assert p["handle_len"] == lnd.HANDLE_BYTES
    f = p["fields"]
    assert f["magic"] == 0x4C4E4443 and f["abi"] == ln._core.DEVICE_ABI_VERSION
    assert f["capacity"] == slots and f["timeout_ns"] == 10 * 10**9
    assert f["peer"] == 1 and f["remote_count"] == 2 and f["local_count"] == 2


# --------------------------------------------------------------------------- 2. wrap-around, full ring


@pytest.mark.parametrize("slots", [2, 4])
def test_tiny_ring_wraps_thousands_of_times_without_overwrite(transport, lib_path, slots):
    # The proxy checks each slot's ticket: a slot overwritten before it was
    # executed would set kErrorRejected ("the ring was overwritten").
    threads, per_thread, nbytes = 4, 1500, 16
    out = ok(run_ranks(dr.many_producers, args=(lib_path, transport, threads, per_thread, nbytes, slots, "alloc"),
                       timeout=120))
    p, t = out[0], out[1]
    n = threads * per_thread
    assert p["statuses"] == [0] * threads and p["flush"] == 0, p
    assert p["error"] is None, p["error"]
    assert p["stats"]["executed"] == n + 1
    assert n // slots > 1000  # the ring went round that many times
    assert t["signal"] == n and t["first_bad"] == -1, t


# --------------------------------------------------------------------------- 3. signal after data


@pytest.mark.parametrize("nbytes,per_thread,target", [(256, 600, "alloc"), (40000, 40, "registered")],
                         ids=["256B-alloc", "40000B-registered"])
def test_signal_never_overtakes_its_data_under_load(transport, lib_path, nbytes, per_thread, target):
    threads = 4
    out = ok(run_ranks(dr.signal_order, args=(lib_path, transport, threads, per_thread, nbytes, target),
                       timeout=120))
    p, t = out[0], out[1]
    assert p["statuses"] == [0] * threads and p["error"] is None, p
    assert t["rc"] != -2, "a signal word went past its count (duplicated signal)"
    assert t["rc"] != -1, f"timed out; signal words {t['signals']}"
    assert t["rc"] == 0, f"record {t['rc'] - 1} was missing when its signal was seen"
    assert t["signals"] == [per_thread] * threads
    # The checker saw the words move (not only their final values). With
    # 40 kB records a tcp target may apply a whole burst between two polls
    # on a 2-core machine, so only the small records must show it.
    if nbytes <= 4096:
        assert t["observations"] > threads, t


@pytest.mark.parametrize("nbytes", [64, 3000])
def test_a_source_freed_by_the_proxy_was_already_sent(transport, lib_path, nbytes):
    """Producers rewrite their source the moment wait_source_free returns; the
    proxy gathers puts into batches, so it must not free one it has not posted."""
    threads, per_thread = 4, 400
    out = ok(run_ranks(dr.source_reuse, args=(lib_path, transport, threads, per_thread, nbytes), timeout=120))
    assert out[0]["statuses"] == [0] * threads and out[0]["error"] is None, out[0]
    assert out[1]["first_bad"] == -1, f"record {out[1]['first_bad']} holds another record's bytes"


def test_the_checkers_catch_what_they_check(lib):
    """The receiver-side checks can fail: a signal seen before its record, a
    duplicated signal, a record at the wrong slot, a stream that stops."""
    import numpy as np
    from types import SimpleNamespace

    def mem(a):
        return SimpleNamespace(ptr=a.ctypes.data, nbytes=a.nbytes)

    inbox, sig = np.zeros(4 * 64, np.uint8), np.zeros(2, np.uint64)
    sig[0] = 1  # word 0 says record 0 is there; it is not
    assert lib.check_signal_order(mem(inbox), mem(sig), 2, 2, 64, 5, 1.0)[0] == 1 + 0
    lib.fill(mem(inbox), 4, 64, 5)
    sig[:] = [2, 2]
    assert lib.check_signal_order(mem(inbox), mem(sig), 2, 2, 64, 5, 1.0)[0] == 0
    inbox[3 * 64 + 63] ^= 0xFF  # the last byte of record 3 (word 1's second) is wrong
    assert lib.check_signal_order(mem(inbox), mem(sig), 2, 2, 64, 5, 1.0)[0] == 1 + 3
    sig[:] = [3, 0]
    assert lib.check_signal_order(mem(inbox), mem(sig), 2, 2, 64, 5, 1.0)[0] == -2
    sig[:] = [0, 0]
    assert lib.check_signal_order(mem(inbox), mem(sig), 2, 2, 64, 5, 0.05)[0] == -1
    lib.fill(mem(inbox), 4, 64, 5)
    assert lib.first_bad(mem(inbox), 4, 64, 5) == -1
    inbox[64:128] = inbox[:64]  # record 0's bytes at slot 1
    assert lib.first_bad(mem(inbox), 4, 64, 5) == 1
    assert lib.first_bad(mem(inbox), 4, 64, 6) == 0  # another seed: another pattern


# --------------------------------------------------------------------------- 4. flush


@pytest.mark.parametrize("target", ["registered", "alloc"])
def test_flush_returns_after_the_data_is_at_the_target(transport, lib_path, target):
    rounds, threads, per_thread, nbytes = 3, 4, 150, 1024
    out = ok(run_ranks(dr.flush_visible, args=(lib_path, transport, rounds, threads, per_thread, nbytes, target),
                       timeout=120))
    p, t = out[0], out[1]
    for r in p["rounds"]:
        assert r["statuses"] == [0] * threads, r  # every thread's flush returned kDeviceOk
        assert r["posted"] == [per_thread] * threads
    assert t["first_bad"] == [-1] * rounds, f"records missing after a flush: {t['first_bad']}"
    assert p["stats"]["flushes"] == rounds * threads, p["stats"]
    assert p["stats"]["executed"] == rounds * threads * (per_thread + 1)
    assert p["error"] == [None] * rounds, p["error"]
    assert t["signal"] == 0  # plain puts: no signal


# --------------------------------------------------------------------------- 5. a peer killed


def test_peer_killed_mid_stream_fails_producers_and_waits_within_the_bound(transport, lib_path):
    timeout, threads = 5.0, 4
    results = run_ranks(dr.peer_killed, args=(lib_path, transport, threads, timeout), expect_dead=(1,), timeout=90)
    status, p = results[0]
    assert status == "ok", p
    assert all(s in (lnd.TIMEOUT, lnd.CHANNEL_ERROR) for s in p["statuses"]), p["statuses"]
    assert sum(p["posted"]) >= 200, "the peer should have died mid-stream"
    slack = 3.0
    assert p["seconds"] < timeout + slack, f"producers took {p['seconds']:.2f} s (bound {timeout} s)"
    assert max(p["elapsed_s"]) < timeout + slack
    assert not p["waiter_alive"], "a device wait on a local word did not return"
    assert p["wait"]["status"] in (lnd.TIMEOUT, lnd.CHANNEL_ERROR), p["wait"]
    assert p["wait"]["seconds"] < timeout + slack, p["wait"]
    # Sticky: every later call fails at once.
    assert p["later"] == [lnd.CHANNEL_ERROR] * 4, p["later"]
    assert p["later_seconds"] < 0.5
    assert p["device_status"] == lnd.CHANNEL_ERROR
    assert p["error_code"] in (1, 3), p  # the transfer failed (or a producer timed out on the stalled ring)
    err = p["error"]
    assert err, "dev.error must name the failure"
    assert "device descriptor" in err or "channel failed" in err, err
    assert any(w in err for w in ("rank 1", "peer", "closed", "reset", "broken", "died", "exited")), err


# --------------------------------------------------------------------------- 6. descriptors that fail the checks


def test_device_side_checks_return_invalid_argument_and_post_nothing(transport, lib_path):
    out = ok(run_ranks(dr.device_checks, args=(lib_path, transport), timeout=90))
    p, t = out[0], out[1]
    cases = {k: v for k, v in p.items() if k.startswith(("put", "signal", "wait"))}
    assert len(cases) == 21
    for name, status in cases.items():
        assert status == lnd.INVALID_ARGUMENT, f"{name}: returned {status}, expected kDeviceInvalidArgument"
    assert p["executed_after_checks"] == 0
    assert p["flush"] == 0 and p["executed_with_flush"] == 1, p  # only the flush was ever posted
    assert p["valid"] == [0, 0, 0] and p["error"] is None, p
    assert t["untouched"], "an invalid call wrote into the target"
    assert t["valid_put"] == b"lamina!!" and t["signal"] == 1 and t["signal1"] == 0, t


@pytest.mark.parametrize("case", list(dr.HOST_REJECTS))
def test_host_rejects_a_bad_raw_descriptor(transport, lib_path, case):
    out = ok(run_ranks(dr.host_rejects, args=(lib_path, transport, [case]), timeout=90))
    p, t = out[0], out[1]
    r = p["cases"][case]
    assert r["post"] == 0, "the raw descriptor should have been posted (no device-side checks)"
    assert r["error_code"] == 2, f"error_code {r['error_code']} ({r['error']}), expected 2 (rejected)"
    assert r["error"] and "device descriptor 0" in r["error"], r["error"]
    for words in dr.HOST_REJECTS[case][1]:
        assert words in r["error"], r["error"]
    # later calls fail at once, the descriptors behind the bad one never ran
    assert r["later"] == [lnd.CHANNEL_ERROR] * 5, r["later"]
    assert r["later_seconds"] < 0.5
    assert r["behind"][0] in (0, lnd.CHANNEL_ERROR)
    assert r["stats"]["executed"] == 0, r["stats"]
    assert r["error_after_close"] == 2  # the first failure wins over "closed"
    assert p["channel_failed"] is None
    assert t["untouched"] and t["host_put"] == b"host ok!" and t["signal"] == 0, t


# --------------------------------------------------------------------------- 7. closing


def test_closing(transport, lib_path):
    timeout = 5.0
    out = ok(run_ranks(dr.closing, args=(lib_path, transport, timeout), timeout=120))
    p = out[0]
    E = lnd.CHANNEL_ERROR
    # a) after close every call fails at once
    assert p["before_close"] == 0
    assert p["after_close"] == [E] * 5, p["after_close"]
    assert p["after_close_seconds"] < 0.5
    assert p["closed_code"] == 4 and "closed" in p["closed_error"], p
    assert p["closed"]
    assert p["handle_after_close"].startswith("UsageError") and p["stats_after_close"].startswith("UsageError")
    # b) producers blocked on a full ring return within the bound
    b = p["blocked"]
    assert not p["blocked_alive"], "producers blocked on a full ring did not return after close()"
    assert b["statuses"] == [E] * 4, b
    assert all(n > 0 for n in b["posted"]) or sum(b["posted"]) > 4, b["posted"]
    assert p["close_seconds"] < timeout, p["close_seconds"]
    assert p["blocked_return_seconds"] < timeout + 1.0, p["blocked_return_seconds"]
    assert p["blocked_code"] == 4
    # b2) close() does not run the rest of a backed-up 4096-slot ring of
    #     16 MiB puts (seconds of work): only the one being executed
    assert not p["bulk_alive"] and p["bulk_statuses"] == [E, E], p["bulk_statuses"]
    queued = p["bulk_posted"] - p["bulk_executed_before_close"]
    assert queued > 256, f"the ring should have been backed up ({queued} queued)"
    assert p["bulk_close_seconds"] < 1.0, f"close() took {p['bulk_close_seconds']:.3f} s with {queued} puts queued"
    # c) context manager
    assert p["in_with"] == [0, 0] and p["with_closed"] and p["after_with"] == E
    # d) channel.close() closes its device_handle() channels
    assert p["handle_before_channel_close"] == [0, 0]
    assert p["handle_after_channel_close"] == [E, 4], p["handle_after_channel_close"]
    # e) endpoint close: device channels first, no hang, no crash
    assert not p["endpoint_threads_alive"]
    assert p["endpoint_return_seconds"] < timeout + 1.0, p["endpoint_return_seconds"]
    assert p["endpoint_producers"]["statuses"] == [E] * 3, p["endpoint_producers"]
    assert p["endpoint_wait"][0] == E, p["endpoint_wait"]
    assert p["endpoint_dev_closed"] and p["endpoint_dev_code"] == 4, p
    assert p["endpoint_after"] == E


# --------------------------------------------------------------------------- 8. bad Python input


def test_bad_python_input_raises_usage_error(transport, lib_path):
    out = ok(run_ranks(dr.usage_errors, args=(lib_path, transport), timeout=90))
    results = out[0]
    good = results.pop("good channel")
    assert good == [0, 0, None], good
    assert len(results) >= 30, sorted(results)
    for name, outcome in results.items():
        assert outcome.startswith("ok"), f"{name}: {outcome}"
    assert "power of two" in results["ring_slots=3"]
    assert "16" in results["17 local windows"] and "16" in results["17 remote windows"]
    assert "another endpoint" in results["local window of another endpoint"]
    assert "rank 0" in results["remote window of my own rank"]
    assert "closed" in results["closed channel"] and "closed" in results["handle() of a closed device channel"]


# --------------------------------------------------------------------------- 9. the header on its own


def test_handle_and_descriptor_sizes_match_the_c_structs(lib):
    assert lnd.HANDLE_BYTES == lib.ln_handle_bytes()
    assert lib.ln_descriptor_bytes() == 64 and lib.ln_descriptor_align() == 64
    assert lib.ln_control_bytes() % 64 == 0
    assert lnd.MAX_WINDOWS == 16
    assert lib.ln_abi_version() == ln._core.DEVICE_ABI_VERSION
    assert lib.ln_handle_offset(0) == 0 and lib.ln_handle_offset(1) == 4


def test_get_include_holds_the_header():
    inc = ln.get_include()
    assert os.path.isfile(os.path.join(inc, "lamina_net", "device.cuh"))
    # A leaf: it includes nothing of lamina-net.
    with open(os.path.join(inc, "lamina_net", "device.cuh")) as f:
        includes = [line.split()[1] for line in f if line.startswith("#include")]
    assert all(i.startswith("<") and "lamina" not in i for i in includes), includes


def test_header_compiles_alone_with_gxx_warnings_as_errors(tmp_path):
    cxx = producers.compiler()
    if cxx is None:
        pytest.skip("no g++ (or $CXX) on PATH")
    for std in ("c++17", "c++20"):
        cmd = [cxx, f"-std={std}", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Werror", "-x", "c++", "-c",
               "-I", ln.get_include(), USER_KERNEL, "-o", str(tmp_path / f"user_{std}.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    # And it really contains no CUDA: a file using a CUDA builtin fails.
    bad = tmp_path / "bad.cpp"
    bad.write_text("#include <lamina_net/device.cuh>\nint f() { return threadIdx.x; }\n")
    proc = subprocess.run([cxx, "-std=c++17", "-c", "-I", ln.get_include(), str(bad), "-o", str(tmp_path / "b.o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_header_compiles_alone_with_nvcc(tmp_path, arch):
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is neither on PATH nor in /usr/local/cuda/bin")
    out = tmp_path / f"user_{arch}.o"
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
           "-c", "-I", ln.get_include(), USER_KERNEL, "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=compiler_env(), timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    assert out.stat().st_size > 0
