"""Shared fixtures: multi-process rank harness and the transports to loop over."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import traceback

import pytest

sys.path.insert(0, os.path.dirname(__file__))

LOCAL_TRANSPORTS = ["tcp", "shm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(queue, fn, rank, world, store, args):
    try:
        queue.put((rank, "ok", fn(rank, world, store, *args)))
    except BaseException as e:  # the parent asserts on it
        queue.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 120.0, expect_dead=()):
    """Runs fn(rank, world, store, *args) in `world` spawned processes.

    Returns {rank: ("ok", value) | ("error", (type, message, traceback))}.
    Ranks in expect_dead may die without reporting.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = f"127.0.0.1:{free_port()}"
    procs = {r: ctx.Process(target=_entry, args=(queue, fn, r, world, store, args), daemon=True)
             for r in range(world)}
    for p in procs.values():
        p.start()
    results = {}
    import queue as queue_mod

    try:
        while len(results) < world - len(expect_dead) or any(
                r not in results and procs[r].is_alive() for r in expect_dead):
            try:
                rank, status, value = queue.get(timeout=timeout)
            except queue_mod.Empty:
                break
            results[rank] = (status, value)
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = [r for r in range(world) if r not in results and r not in expect_dead]
    assert not missing, f"ranks {missing} did not report within {timeout} s"
    return results


def assert_all_ok(results):
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank} failed: {value[0]}: {value[1]}\n{value[2]}"
    return {rank: value for rank, (status, value) in results.items()}


@pytest.fixture(params=LOCAL_TRANSPORTS)
def transport(request):
    return request.param
