"""The verbs (RDMA RC) transport, for real: needs an RDMA device.

On machines without one these tests skip with the reason; run them in the
Soft-RoCE guest with ``scripts/softroce/test.sh``. Each test runs its ranks as
separate processes (verbs_ranks.py), each with its own QPs and registrations.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import verbs_ranks as vr  # noqa: E402

_SKIP = vr.verbs_skip_reason()
pytestmark = [pytest.mark.verbs, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# Around the transport's thresholds: inline (512 on rxe), chunk (32 KiB), several MiB.
PUT_SIZES = [1, 7, 64, 65, 220, 221, 511, 512, 513, 4095, 4096, 32767, 32768, 32769, 65543, 1 << 20, (4 << 20) + 13]
SEND_SIZES = [0, 1, 15, 16, 17, 32752, 32753, 32768, 65536 + 5, 1 << 20, (5 << 20) + 3]


def test_every_operation():
    results = vr.run_ranks(vr.every_operation)
    assert results == {0: 1, 1: 1}


def test_bad_inputs_raise_usage_errors_and_write_nothing():
    for rank, results in vr.run_ranks(vr.bad_inputs).items():
        for name, outcome in results.items():
            assert outcome.startswith("ok"), f"rank {rank}: {name}: {outcome}"


@pytest.mark.parametrize("seed", [1])
def test_put_sizes_random_offsets_checksums(seed):
    results = vr.run_ranks(vr.put_sizes, args=(PUT_SIZES, seed), timeout=400)
    assert results == {0: 2 * len(PUT_SIZES), 1: 2 * len(PUT_SIZES)}


@pytest.mark.parametrize("size", [300, 513, 4096])
def test_staged_puts_back_to_back_keep_their_bytes(size):
    assert vr.run_ranks(vr.staged_put_burst, args=(300, size), timeout=300) == {0: 300, 1: 300}


def test_large_iputs_in_flight_together():
    assert vr.run_ranks(vr.large_iputs_in_flight, args=(6, (1 << 20) + 8), timeout=300) == {0: 6, 1: 6}


@pytest.mark.parametrize("stage_max", [0, 4096, 32768])
def test_registered_source_is_free_when_put_returns(stage_max):
    sizes = [8, 220, 221, 512, 513, 4096, 4097, 32768, 32769, 65536]
    rounds = 20
    results = vr.run_ranks(vr.registered_source_reuse, args=(sizes, rounds, stage_max), timeout=400)
    assert results == {0: len(sizes) * rounds, 1: len(sizes) * rounds}


def test_small_puts_from_one_thread_while_another_sends():
    results = vr.run_ranks(vr.puts_while_sending, args=(6, 100_000, 2000), timeout=400)
    assert results == {0: 6, 1: 6}


def test_progress_thread_takes_over_when_the_user_thread_leaves(monkeypatch):
    # The wait spins (drives) for its whole length, as a latency-bound caller's would.
    monkeypatch.setenv("LAMINA_NET_SPIN_US", "20000000")
    away_s = 4.0
    results = vr.run_ranks(vr.taken_over_after_driving, args=(100, away_s), timeout=300)
    assert results[0] == 100
    # 100 messages against 32 receive credits: without a takeover they would
    # wait for rank 0 to come back (4 s); the takeover comes within 45 ms
    # (0.5 s leaves room for the emulated guest).
    assert results[1] < 0.5, f"sends took {results[1]:.2f} s while the receiver's user thread was away"


def test_send_recv_sizes_checksums():
    results = vr.run_ranks(vr.send_sizes, args=(SEND_SIZES, 3), timeout=300)
    assert results == {0: len(SEND_SIZES), 1: len(SEND_SIZES)}


def test_many_messages_not_lost_duplicated_or_reordered():
    results = vr.run_ranks(vr.many_messages, args=(3000,), timeout=400)
    assert results == {0: 3000, 1: 3000}


def test_several_producers_signal_one_word():
    adds = 200
    results = vr.run_ranks(vr.many_producers_one_word, world=3, args=(adds,), timeout=300)
    assert results[0] == 2 * adds
    olds = results[1] + results[2]
    assert len(set(olds)) == len(olds) == 2 * adds, "two fetch-and-adds saw the same old value"
    assert sorted(olds) == [3 * i for i in range(2 * adds)]


def test_flush_waits_for_everything_before_it():
    assert vr.run_ranks(vr.flush_makes_visible, args=(300,)) == {0: True, 1: True}


def test_timeouts_are_bounded_and_leave_the_channel_usable():
    results = vr.run_ranks(vr.timeouts, timeout=200)
    recv_s, recv_msg = results[0]["recv"]
    wait_s, wait_msg = results[0]["wait"]
    send_s, send_msg, sent = results[0]["send"]
    assert 0.4 <= recv_s < 5, recv_s
    assert 0.4 <= wait_s < 5, wait_s
    assert 0.9 <= send_s, send_s
    assert "rank 1" in recv_msg and "rank 1" in send_msg
    # 32 bounce buffers + 16 KiB of buffered 1 KiB messages (credits return in batches of 8)
    assert 32 + 16 - 7 <= sent <= 32 + 16, sent
    assert results[1]["drained"] == sent


@pytest.mark.parametrize("mode", ["recv", "put"])
def test_peer_death_fails_within_bounded_time(mode):
    results = vr.run_ranks(vr.peer_death, args=(mode,), may_die=(1,), timeout=200)
    elapsed, error, channel_failed = results[0]
    # keepalive (1 s) + retries: (IB_RETRY_CNT + 1) x 4.096us x 2^IB_TIMEOUT
    assert elapsed < 30, f"took {elapsed:.1f} s: {error}"
    assert "rank 1" in error and ("acknowledge" in error or "closed" in error), error
    assert channel_failed, "the channel should report its failure"


@pytest.mark.parametrize("case", ["stale", "bigger", "rights"])
def test_remote_access_error_is_a_clear_transport_error(case):
    results = vr.run_ranks(vr.remote_access_errors, args=(case,), timeout=200)
    elapsed, first, sticky = results[0]
    assert "remote access error" in first, first
    assert elapsed < 20
    assert sticky == first, "later operations must fail with the original reason"
    assert results[1] == 1


def test_message_too_long_fails_only_that_receive():
    results = vr.run_ranks(vr.message_too_long)
    assert "does not fit" in results[1], results[1]


def test_many_queue_pairs():
    tags = 6
    results = vr.run_ranks(vr.many_qps, world=3, args=(tags,), timeout=400)
    assert results == {r: 2 * tags for r in range(3)}


def test_close_is_seen_by_the_peer_after_delivery():
    results = vr.run_ranks(vr.close_is_seen)
    elapsed, error = results[1]
    assert elapsed < 5, f"{elapsed:.1f} s: {error}"
    assert "closed" in error, error


def test_transport_below_the_channel_layer():
    """tests/verbs/cpp/verbs_transport_check.cpp: the Connection interface driven
    directly (two ranks as threads), including partly-sent message timeouts."""
    binary = os.path.join(REPO, "build", "verbs-check", "verbs_transport_check")
    if not os.path.exists(binary):
        pytest.skip("build it first: tests/verbs/build_cpp_check.sh (scripts/softroce/test.sh does)")
    proc = subprocess.run([binary], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASSED" in proc.stdout


@pytest.mark.parametrize("asked,granted", [(None, 512), (100, 100), (0, 0)])
def test_inline_limit_asked_of_the_device(asked, granted):
    """LAMINA_NET_IB_MAX_INLINE is what the QP asks for (default 512 B, all
    that rxe offers); the connection reports what the device granted, and a
    benchmark round over it completes (every write landed)."""
    env = dict(os.environ, LAMINA_NET_LOG="debug")
    env.pop("LAMINA_NET_IB_MAX_INLINE", None)
    if asked is not None:
        env["LAMINA_NET_IB_MAX_INLINE"] = str(asked)
    proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "verbs",
                           "--op", "write", "--sizes", "8,512,520", "--iterations", "50", "--warmup", "5",
                           "--no-reference", "--baseline", "none"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    reported = {int(m) for m in re.findall(r"verbs: rank \d connected .*, inline (\d+)", proc.stderr)}
    assert reported == {granted}, proc.stderr[-2000:]


def test_latency_bench_and_bare_reference_run_over_verbs(tmp_path):
    """The pieces of bench/verbs_vs_perftest.py: `bench latency --op write|put`
    over verbs (each round's arrival is awaited, so it finishes only if every
    write and signal landed) and the bare-libibverbs reference."""
    path = tmp_path / "lat.json"
    for op in ("write", "put"):
        proc = subprocess.run([sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "verbs",
                               "--op", op, "--sizes", "8,4096,40000", "--iterations", "50", "--warmup", "5",
                               "--no-reference", "--baseline", "none", "--json", str(path)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        records = json.loads(path.read_text())
        assert [(r["transport"], r["op"], r["size_bytes"]) for r in records] == [
            ("verbs", op, s) for s in (8, 4096, 40000)]
        assert all(0 < r["p50_us"] <= r["p99_us"] for r in records)
    from lamina_net.bench_cli import reference_binary

    exe = reference_binary("ref_verbs_pingpong")
    if exe is None:
        pytest.skip("ref_verbs_pingpong was not built (no libibverbs.so at build time)")
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import verbs_vs_perftest as vp

    device, _, gid = vp.pick_device()
    for mode in ("write", "write+atomic", "write+write"):
        out = vp.bare_verbs_latency(device, gid, mode, [8, 4096], 50)
        assert sorted(out) == [8, 4096] and all(v["p50_us"] > 0 for v in out.values()), (mode, out)


def test_paired_bandwidth_rounds_of_the_benchmark(tmp_path):
    """bench/verbs_vs_perftest.py --bandwidth-only: lamina-net iput streams and
    ib_write_bw, paired by round; the JSON holds every pair and the median."""
    import shutil

    if shutil.which("ib_write_bw") is None:
        pytest.skip("perftest is not installed")
    path = tmp_path / "bw.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "verbs_vs_perftest.py"), "--bandwidth-only",
                           "--rounds", "2", "--bw-target-sizes", "65536", "--bw-bytes", str(4 << 20),
                           "--json", str(path)], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pairs = json.loads(path.read_text())["bandwidth_pairs"]["65536"]
    assert len(pairs["pair_ratios"]) == 2 and all(x > 0 for x in pairs["lamina_gbps"] + pairs["ib_write_bw_gbps"])
    assert pairs["pair_ratios"] == [a / b for a, b in zip(pairs["lamina_gbps"], pairs["ib_write_bw_gbps"])]
    assert "median pair ratio" in proc.stdout
