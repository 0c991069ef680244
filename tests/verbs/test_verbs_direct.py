"""The device API's direct back end on a real RDMA stack (issue 17, item 6).

tests/verbs/cpp/rxe_direct_check.cpp (built by tests/verbs/build_cpp_check.sh)
runs the direct queue code of lamina_net/direct/ (work_queue.cuh with the rxe
format, the code mlx5 shares) in CPU threads on an rxe queue pair of its own
(lamina::verbs::RxeDirectQueue): real send queue, real CQ, the kernel kicked
by a POST_SEND with no work requests. The peer is an ordinary verbs QP whose
memory each case checks. Runs in the Soft-RoCE guest (scripts/softroce/test.sh).
"""
from __future__ import annotations

import os
import subprocess

import pytest

import verbs_ranks as vr

_SKIP = vr.verbs_skip_reason()
pytestmark = [pytest.mark.verbs, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CHECK = os.path.join(REPO, "build", "verbs-check", "rxe_direct_check")


def run_case(case: str, timeout: float = 300) -> str:
    if not os.path.isfile(CHECK):
        pytest.fail(f"{CHECK} missing: tests/verbs/build_cpp_check.sh builds it (scripts/softroce/test.sh runs that)")
    proc = subprocess.run([CHECK, case], capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:
        pytest.skip(out.strip())
    assert proc.returncode == 0 and f"PASS {case}" in proc.stdout, out
    print(out)
    return out


def test_direct_rxe_rings_found_and_checked():
    out = run_case("layout")
    assert "sq " in out and "rdma-core" in out


def test_direct_rxe_many_producers_put_and_signal():
    run_case("many_producers")


def test_direct_rxe_signal_never_overtakes_data():
    run_case("signal_after_data")


def test_direct_rxe_doorbell_batching():
    run_case("doorbell_batching")


def test_direct_rxe_bad_rkey_reaches_the_error_word():
    run_case("bad_rkey")


def test_direct_rxe_destroyed_peer_qp_reaches_the_error_word():
    run_case("peer_destroyed")


def test_direct_rxe_cpu_assisted_doorbell():
    """The callers only publish the producer index; the queue's host thread makes the kick (the GPU's mode)."""
    run_case("host_kick")


def test_direct_rxe_latency_against_the_provider_path():
    run_case("latency")


def test_direct_rxe_probe_says_available_in_the_guest():
    from lamina_net import _core

    paths = {p[0]: p for p in _core.direct_paths()}
    _, available, detail, failed = paths["direct-rxe"]
    assert available, failed
    assert "rdma-core" in detail
    _, mlx5_available, _, mlx5_failed = paths["direct-mlx5"]
    assert not mlx5_available and any("not an mlx5 device" in line and "rxe" in line for line in mlx5_failed)


def test_direct_rxe_pingpong_against_the_provider_path():
    """A put+signal ping-pong between two direct queues, and the same over the provider's post path."""
    out = run_case("pingpong")
    assert "ratio" in out
