"""Shared fixtures: the transports to loop over; the rank harness lives in harness.py."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import assert_all_ok, free_port, run_ranks  # noqa: E402,F401  (re-exported for the tests)

LOCAL_TRANSPORTS = ["tcp", "shm"]


def nvcc_path():
    """nvcc on PATH, else /usr/local/cuda/bin/nvcc, else None."""
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found
    return next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)


def compiler_env() -> dict:
    """The environment for a compiler the tests run: without the sanitizer runtime
    that scripts/test_sanitizers.sh preloads into the interpreter (nvcc's own tools
    fail under it, and they are not what is being checked)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


@pytest.fixture(params=LOCAL_TRANSPORTS)
def transport(request):
    return request.param
