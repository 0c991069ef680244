"""The device API over the verbs transport, for real: needs an RDMA device.

The tier-0 bodies (tests/device/device_ranks.py) with transport "verbs": CPU
threads running lamina_net/device.cuh post into the ring, the proxy drains it
into RC queue pairs (put = RDMA WRITE, signal = ATOMIC FETCH_AND_ADD, flush).
Runs in the Soft-RoCE guest: ``scripts/softroce/test.sh -k device``. The
producer library is prebuilt on the host by test.sh
(``python tests/device/producers.py``) because the guest's root is read-only;
without that it is compiled here into pytest's tmp dir.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "device"))
import verbs_ranks as vr  # noqa: E402
import device_ranks as dr  # noqa: E402
import producers  # noqa: E402

from lamina_net import device as lnd  # noqa: E402

_SKIP = vr.verbs_skip_reason()
pytestmark = [pytest.mark.verbs, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.fixture(scope="module")
def lib_path(tmp_path_factory):
    if producers.compiler() is None and not os.path.isfile(producers.cached_path()):
        pytest.skip("no g++ (or $CXX) and no prebuilt library: run `python tests/device/producers.py` on the host")
    return producers.build(str(tmp_path_factory.mktemp("device-producers")))


def test_device_many_producers_put_signal_and_flush_over_verbs(lib_path):
    threads, per_thread, nbytes, slots = 4, 250, 200, 16
    out = vr.run_ranks(dr.many_producers, args=(lib_path, "verbs", threads, per_thread, nbytes, slots, "registered"),
                       timeout=300)
    p, t = out[0], out[1]
    n = threads * per_thread
    assert p["statuses"] == [0] * threads and p["flush"] == 0, p
    assert p["error"] is None, p["error"]
    assert p["stats"]["executed"] == n + 1 and p["stats"]["flushes"] == 1, p["stats"]
    assert t["signal"] == n, t
    assert t["first_bad"] == -1, f"record {t['first_bad']} did not arrive intact"


def test_device_signal_after_data_and_flush_over_verbs(lib_path):
    threads, per_thread, nbytes = 3, 60, 4096
    out = vr.run_ranks(dr.signal_order, args=(lib_path, "verbs", threads, per_thread, nbytes, "registered"),
                       timeout=300)
    assert out[0]["statuses"] == [0] * threads and out[0]["error"] is None, out[0]
    assert out[1]["rc"] == 0, out[1]
    out = vr.run_ranks(dr.flush_visible, args=(lib_path, "verbs", 2, 2, 50, 2048, "registered"), timeout=300)
    assert out[1]["first_bad"] == [-1, -1], out[1]
    assert out[0]["stats"]["flushes"] == 4 and out[0]["error"] == [None, None], out[0]


def test_device_peer_killed_over_verbs(lib_path):
    # A dead peer on RC: the QP's retries run out (IB_TIMEOUT / retry count)
    # or the keepalive sees the peer gone; the handle's bound caps the
    # producers either way.
    timeout, threads = 10.0, 3
    results = vr._run_ranks(dr.peer_killed, 2, (lib_path, "verbs", threads, timeout), 300, expect_dead=(1,))
    status, p = results[0]
    assert status == "ok", p
    assert all(s in (lnd.TIMEOUT, lnd.CHANNEL_ERROR) for s in p["statuses"]), p["statuses"]
    assert sum(p["posted"]) >= 200
    assert p["seconds"] < timeout + 10, f"producers took {p['seconds']:.1f} s"
    assert not p["waiter_alive"] and p["wait"]["status"] in (lnd.TIMEOUT, lnd.CHANNEL_ERROR), p["wait"]
    assert p["later"] == [lnd.CHANNEL_ERROR] * 4 and p["later_seconds"] < 1.0, p
    assert p["error_code"] in (1, 3) and p["error"], p
