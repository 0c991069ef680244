"""Untrusted peers (issue 16): shm validates at the target - a put through a forged or stale descriptor is
refused and writes nothing, as over tcp (issue 16, defect 1)."""
import pytest

from _trust_workers import CASES, forged_puts
from harness import assert_all_ok, run_ranks


@pytest.mark.parametrize("case", CASES)
def test_shm_refuses_forged_and_stale_descriptors(case):
    values = assert_all_ok(run_ranks(forged_puts, args=((case,),), timeout=60))
    outcome = values[0][case]
    assert outcome.startswith("refused"), f"{case}: the put was {outcome}"
    # The sender learns the target's reason (defect 7), not "process died?".
    assert "refused a PUT" in outcome and "died" not in outcome, outcome
    assert values[1] == {"win": 0, "local_only": 0, "dead": 0, "big": 0}, f"{case}: memory was written: {values[1]}"


def test_idle_and_half_hello_clients_do_not_delay_a_tcp_channel():
    """Issue 16, defect 2: handshakes run concurrently, each with its own bound."""
    from _trust_workers import idle_strangers_then_connect

    values = assert_all_ok(run_ranks(idle_strangers_then_connect, args=(4,), timeout=60))
    for rank, (elapsed, ok) in values.items():
        assert ok, f"rank {rank}: the put did not arrive"
        # One stranger used to hold the accept thread for the whole 5 s hello bound.
        assert elapsed < 3.0, f"rank {rank}: channel setup took {elapsed:.1f} s behind idle clients"


@pytest.mark.parametrize("index", ["head", "tail"])
def test_shm_peer_that_corrupts_a_ring_index_fails_the_channel_not_the_process(index):
    """A same-host peer can write the rings' shared indices; each side keeps its own
    copy and checks the peer's, so a wild index is an error, not a copy off the ring."""
    from _trust_workers import corrupted_ring

    values = assert_all_ok(run_ranks(corrupted_ring, args=(index,), timeout=90))
    assert "corrupted its ring" in values[0], values[0]
