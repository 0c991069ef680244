"""The store rendezvous of the verbs connect (csrc/transports/rendezvous.hpp), on the host.

A peer that died, or a channel that failed and is being replaced, leaves its
connection record in the store; a fresh peer must never pair with it.
"""
import threading
import time

import pytest

import lamina_net as ln
from lamina_net import _core
from lamina_net.store import StoreClient, parse_address


def _client(server):
    return StoreClient(*parse_address(server.address))


def _pair(server, prefix, blobs, timeout=10.0, delays=(0.0, 0.0)):
    """Both ranks rendezvous at once (rank r after delays[r]); returns {rank: result or exception}."""
    out = {}

    def side(rank):
        time.sleep(delays[rank])
        with _client(server) as store:
            try:
                out[rank] = _core.rendezvous(store, prefix, rank, 1 - rank, blobs[rank], timeout)
            except Exception as e:  # recorded for the assertions
                out[rank] = e

    threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return out


@pytest.fixture
def server():
    with ln.StoreServer("127.0.0.1", 0) as s:
        yield s


def test_pairs_the_current_attempts(server):
    out = _pair(server, "p", {0: b"zero", 1: b"one"})
    (blob0, self0, peer0), (blob1, self1, peer1) = out[0], out[1]
    assert (blob0, blob1) == (b"one", b"zero")
    assert (self0, peer0) == (peer1, self1) and self0 != self1


@pytest.mark.parametrize("late", [0, 1])
def test_a_dead_peers_record_is_never_taken(server, late):
    # A previous attempt of both ranks that got as far as agreeing, then died.
    first = _pair(server, "p", {0: b"old-0", 1: b"old-1"})
    assert first[0][0] == b"old-1"
    # Fresh attempts, one side starting late, so that the other reads the stale record first.
    delays = (0.3, 0.0) if late == 0 else (0.0, 0.3)
    out = _pair(server, "p", {0: b"new-0", 1: b"new-1"}, delays=delays)
    assert out[0][0] == b"new-1" and out[1][0] == b"new-0"
    assert out[0][1] == out[1][2] and out[0][2] == out[1][1]
    assert {out[0][1], out[1][1]}.isdisjoint({first[0][1], first[1][1]})


@pytest.mark.parametrize("planted, timeout, message, bound", [
    # Rank 1's record exists, but its writer is gone: rank 0 must not connect to it.
    (b"%016x;ghost" % 0x1234, 1.0, "did not answer this connection attempt", 3.0),
    (None, 0.5, "did not publish its connection info", 2.5),
], ids=["stale-offer", "absent-peer"])
def test_no_answering_peer_times_out_within_the_bound(server, planted, timeout, message, bound):
    with _client(server) as store:
        if planted is not None:
            store.set("p/offer/1", planted)
        t0 = time.monotonic()
        with pytest.raises(ln.TimeoutError, match=message):
            _core.rendezvous(store, "p", 0, 1, b"zero", timeout)
        assert time.monotonic() - t0 < bound


def test_a_malformed_offer_is_a_transport_error(server):
    with _client(server) as store:
        store.set("m/offer/1", b"not an offer")
        with pytest.raises(ln.TransportError, match="malformed offer"):
            _core.rendezvous(store, "m", 0, 1, b"zero", 1.0)
