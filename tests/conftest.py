"""Shared fixtures: the transports to loop over; the rank harness lives in harness.py."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import assert_all_ok, free_port, run_ranks  # noqa: E402,F401  (re-exported for the tests)

LOCAL_TRANSPORTS = ["tcp", "shm"]


@pytest.fixture(params=LOCAL_TRANSPORTS)
def transport(request):
    return request.param
