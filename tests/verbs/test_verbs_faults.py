"""The fault-injection matrix of tests/test_faults.py on the verbs transport, for real (Soft-RoCE guest).

Peer death on verbs is noticed by the keepalive and the NIC's retries, not by a socket, so the
endpoint's timeout here is longer (the same bound as test_verbs_transport's peer-death test).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verbs_ranks as vr  # noqa: E402
from conftest import assert_all_ok, run_ranks  # noqa: E402
import _fault_workers  # noqa: E402
from test_faults import check_faults  # noqa: E402

_SKIP = vr.verbs_skip_reason()
pytestmark = [pytest.mark.verbs, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

LIMIT = 60.0
# A connection reset is a tcp fault; verbs channels have none to reset.
CASES = [("connect", 0.0), ("transfer", 0.3), ("wait", 0.3), ("deregister", 0.05), ("stall", 0.0),
         ("store-killed", 0.0), ("store-stopped", 0.0)]


@pytest.mark.parametrize("fault, delay", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_verbs_fault(fault, delay):
    out = assert_all_ok(run_ranks(_fault_workers.survive, world=1, args=("verbs", fault, delay, LIMIT),
                                  timeout=400))
    check_faults(out[0], fault, LIMIT)
