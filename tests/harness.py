"""Multi-process rank harness shared by every test tier (importable by spawned children)."""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import queue as queue_mod
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(results, fn, rank, world, store, args, timeout):
    # A rank that hangs prints where it is before the parent gives up on it.
    faulthandler.dump_traceback_later(max(5.0, timeout - 10.0), exit=False)
    try:
        results.put((rank, "ok", fn(rank, world, store, *args)))
    except BaseException as e:  # reported to the parent, which asserts on it
        results.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 120.0, expect_dead=()) -> dict:
    """Runs fn(rank, world, store, *args) in `world` spawned processes.

    Returns {rank: ("ok", value) | ("error", (type, message, traceback))}.
    Ranks in expect_dead may die without reporting; any other rank that does
    not report within `timeout` fails the test.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = f"127.0.0.1:{free_port()}"
    procs = {r: ctx.Process(target=_entry, args=(results, fn, r, world, store, args, timeout), daemon=True)
             for r in range(world)}
    for p in procs.values():
        p.start()
    reported: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while any(r not in reported and (r not in expect_dead or procs[r].is_alive()) for r in range(world)):
            try:
                rank, status, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                reported[rank] = (status, value)
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    break
    finally:
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(5)
    missing = [r for r in range(world) if r not in reported and r not in expect_dead]
    assert not missing, f"ranks {missing} did not report within {timeout} s"
    return reported


def assert_all_ok(results: dict) -> dict:
    """{rank: value}, or an AssertionError carrying the failed rank's traceback."""
    for rank, (status, value) in sorted(results.items()):
        assert status == "ok", f"rank {rank} failed: {value[0]}: {value[1]}\n{value[2]}"
    return {rank: value for rank, (status, value) in results.items()}
