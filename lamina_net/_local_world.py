"""LOCAL_WORLD_SIZE for the ranks that lamina-net's own launchers start on one host.

torchrun sets it; the core reads it (LAMINA_NET_SPIN_US=auto) to stop spinning
in waits when the host runs more ranks than a process has CPUs, since a
spinning waiter then holds the core the rank it waits for needs.
"""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def local_world_size(ranks: int):
    """Sets LOCAL_WORLD_SIZE to `ranks` meanwhile, unless the environment already says."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        yield
        return
    os.environ["LOCAL_WORLD_SIZE"] = str(ranks)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
