"""Multi-process tests of every operation over every local transport (tcp, shm)."""
import pytest

from conftest import assert_all_ok, run_ranks
import _workers


@pytest.mark.parametrize("shared", [False, True], ids=["registered", "alloc"])
def test_every_operation(transport, shared):
    out = assert_all_ok(run_ranks(_workers.every_op, args=(transport, shared)))
    assert out == {0: 1, 1: 1}


@pytest.mark.parametrize("seed", [1, 2])
def test_sizes_1B_to_64MiB_random_offsets(transport, seed):
    sizes = [1, 2, 3, 7, 8, 63, 64, 65, 4095, 4096, 4097, 65535, 65536, 1 << 20, (1 << 20) + 13, 16 << 20,
             64 << 20]
    out = assert_all_ok(run_ranks(_workers.sizes_checksums, args=(transport, sizes, seed), timeout=240))
    assert out == {0: len(sizes), 1: len(sizes)}


def test_sizes_into_shared_allocation(transport):
    """Endpoint.alloc regions: on shm, puts are one memcpy straight into the peer's memory."""
    sizes = [1, 100, 2047, 2048, 4096, 65536, (1 << 20) + 5, 16 << 20]
    out = assert_all_ok(run_ranks(_workers.sizes_checksums, args=(transport, sizes, 3, True), timeout=240))
    assert out == {0: len(sizes), 1: len(sizes)}


def test_mixed_paths_keep_issue_order(transport):
    out = assert_all_ok(run_ranks(_workers.ordering_mixed_paths, args=(transport, 300), timeout=120))
    assert out == {0: 300, 1: 300}


@pytest.mark.parametrize("shared", [False, True], ids=["registered", "alloc"])
def test_put_many_batches_apply_in_order(transport, shared):
    out = assert_all_ok(run_ranks(_workers.put_many_batches, args=(transport, 6, shared), timeout=120))
    assert out == {0: 7, 1: 6}


def test_many_messages_no_loss_no_reorder(transport):
    out = assert_all_ok(run_ranks(_workers.many_messages, args=(transport, 3000), timeout=180))
    assert out == {0: 3000, 1: 3000}


def test_timeouts_are_bounded_and_named(transport):
    out = assert_all_ok(run_ranks(_workers.timeouts, args=(transport,)))
    for errors, elapsed in out.values():
        assert len(errors) == 3, errors
        assert "recv" in errors[0] and "did not complete" in errors[0] and "withdrawn" in errors[0]
        assert "signal" in errors[1] and "value is 0" in errors[1]
        assert "never-published" in errors[2]
        assert elapsed < 5.0


@pytest.mark.parametrize("mode", ["wait", "recv", "put"])
def test_peer_death_fails_fast(transport, mode):
    results = run_ranks(_workers.peer_death, args=(transport, mode), expect_dead=(1,), timeout=90)
    status, value = results[0]
    assert status == "ok", value
    outcome, elapsed, later = value
    assert outcome.startswith("TransportError"), outcome
    assert elapsed < 5.0, f"took {elapsed:.1f} s to notice the dead peer"
    assert later and later != "none", "a later operation did not fail"


def test_bad_inputs_raise_usage_errors(transport):
    out = assert_all_ok(run_ranks(_workers.bad_inputs, args=(transport,)))
    for rank, results in out.items():
        for name, outcome in results.items():
            assert outcome.startswith("ok"), f"rank {rank}: {name}: {outcome}"
