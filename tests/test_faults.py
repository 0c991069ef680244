"""Fault injection on every local transport: a peer killed during connect, mid-transfer, during a wait
and during deregistration; a connection reset; a stalled (stopped) peer; the store killed or stopped.

Each must end in a lamina-net error within the configured timeout (nothing else escapes, nothing hangs),
leave no descriptor, shared segment or mapping behind once the endpoint is closed, and the survivor must
still reach a fresh peer. The verbs transport gets the same matrix in the Soft-RoCE guest
(tests/verbs/test_verbs_faults.py).
"""
import pytest

from conftest import assert_all_ok, run_ranks
import _fault_workers
from _fault_workers import TIMEOUT

SLACK = 1.5  # seconds past a bound: scheduling on a loaded 2-core machine

CASES = [(t, f, d) for t in ("tcp", "shm") for f, d in
         [("connect", 0.0), ("connect", 0.02), ("transfer", 0.1), ("wait", 0.2), ("deregister", 0.03),
          ("stall", 0.0), ("reset", 0.2), ("store-killed", 0.0), ("store-stopped", 0.0)]
         if not (f == "reset" and t == "shm")]  # shm has no connection to reset


def outcome(events, label):
    found = [(o, s) for name, o, s in events if name == label]
    assert found, f"no {label!r} in {events}"
    return found[0]


def check_faults(result, fault, limit=TIMEOUT):
    events = result["events"]
    story = "\n".join(f"  {name}: {o} ({s:.2f} s)" for name, o, s in events
                      if not (name.startswith("put ") and o == "ok"))
    # Every operation returned or raised a lamina-net error within its bound.
    for name, o, seconds in events:
        bound = 2.0 if name.startswith("store:") else 1.5 if "stopped peer" in name else limit
        assert seconds < bound + SLACK, f"{name} took {seconds:.1f} s\n{story}"
    if fault == "connect":
        failed = [o for name, o, _ in events if name in ("channel", "wait") and o != "ok"]
        assert failed and failed[0].split(":")[0] in ("TransportError", "TimeoutError"), story
    elif fault in ("transfer", "wait", "reset"):
        o, seconds = outcome(events, "wait")
        assert o.startswith("TransportError"), story
        assert seconds < limit / 2, f"the death was noticed only after {seconds:.1f} s\n{story}"
        assert outcome(events, "later send")[0].startswith("TransportError"), story
    elif fault == "deregister":
        puts = [o for name, o, _ in events if name.startswith("put ")]
        assert puts and puts[-1].startswith("TransportError"), story
    elif fault == "stall":
        assert outcome(events, "wait on a stopped peer")[0].startswith("TimeoutError"), story
        assert outcome(events, "send to a stopped peer")[0].startswith("TimeoutError"), story
        assert outcome(events, "wait after its death")[0] != "ok", story
    else:
        for label in ("store: lookup", "store: barrier"):
            o = outcome(events, label)[0]
            assert o.split(":")[0] in ("TransportError", "TimeoutError", "StoreNotAnswering"), story
            assert "store" in o, f"{label} does not name the store\n{story}"
        assert outcome(events, "data: wait")[0] == "ok", f"the data path needed the store\n{story}"
    assert outcome(events, "close")[0] == "ok", story
    assert result["reached"], f"the survivor could not reach a fresh peer\n{story}"
    before, after = result["before"], result["after"]
    assert after["shm"] == [], f"shared segments left: {after['shm']}"
    assert sorted(after["maps"]) == sorted(before["maps"]), f"mappings left: {set(after['maps']) - set(before['maps'])}"
    leaked = sorted(set(after["fds"].items()) - set(before["fds"].items()))
    assert len(after["fds"]) <= len(before["fds"]), f"descriptors left: {leaked}\n{story}"


@pytest.mark.parametrize("transport, fault, delay", CASES, ids=[f"{t}-{f}-{d}" for t, f, d in CASES])
def test_fault(transport, fault, delay):
    out = assert_all_ok(run_ranks(_fault_workers.survive, world=1, args=(transport, fault, delay), timeout=120))
    check_faults(out[0], fault)
