"""Who is in a group: rank claims and the group's world size, in the store.

Two jobs that use the same group name on one store would otherwise pair
with each other's processes, and ranks that disagree on the world size
would connect anyway. So, before an Endpoint joins:

* it claims its rank: ``add(ln/<group>/claim/<rank>, 1)`` must return 1. A
  second claim fails with a UsageError naming the holder (host and pid),
  unless that holder is a process of this host that no longer exists (a
  rank restarted after a crash takes its place). ``close()`` releases it.
* rank 0 records the world size; every other rank compares its own with it.

Stores without ``add`` (a user's own object) skip the claim; the world-size
check still runs.
"""
from __future__ import annotations

import builtins
import os
import socket
import time

from .errors import TransportError, UsageError


def _holder_alive(holder: str) -> bool:
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host's process: cannot tell, assume it lives
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_rank(store, group: str, rank: int, world_size: int, timeout: float) -> bool:
    """Claims `rank` in `group` and checks the world size; returns whether a claim is held."""
    claimed = False
    if hasattr(store, "add"):
        key = f"ln/{group}/claim/{rank}"
        if int(store.add(key, 1)) > 1:
            try:
                holder = store.get(key + "/holder", min(timeout, 1.0)).decode()
            except builtins.TimeoutError:
                holder = "unknown"
            # Ours is counted now; either the dead holder's claim goes, or ours does.
            store.add(key, -1)
            if holder == "unknown" or _holder_alive(holder):
                raise UsageError(
                    f"rank {rank} of group {group!r} is already taken (by {holder}): another process of this "
                    "job has the same rank, or another job uses the same group name on this store (give each "
                    "job its own group)")
        store.set(key + "/holder", f"{socket.gethostname()}:{os.getpid()}".encode())
        claimed = True
    world_key = f"ln/{group}/world"
    if rank == 0:
        store.set(world_key, str(world_size).encode())
        return claimed
    try:
        _check_world_size(store, group, world_key, rank, world_size, timeout)
    except BaseException:
        if claimed:
            release_rank(store, group, rank)
        raise
    return claimed


def _check_world_size(store, group: str, world_key: str, rank: int, world_size: int, timeout: float) -> None:
    started = time.monotonic()
    while True:
        record = store.get(world_key, max(0.001, started + timeout - time.monotonic()))
        try:
            theirs = int(record)
        except ValueError:
            raise TransportError(f"group {group!r}: malformed world-size record {record!r} in the store") from None
        if theirs == world_size:
            return
        # A previous job's record may still be there until this job's rank 0 writes.
        if time.monotonic() - started > min(2.0, timeout):
            raise UsageError(f"rank 0 of group {group!r} was started with world_size={theirs}; this rank "
                             f"(rank {rank}) with world_size={world_size}")
        time.sleep(0.02)


def release_rank(store, group: str, rank: int) -> None:
    """Gives the claim back (best effort: the store may be gone already)."""
    try:
        store.add(f"ln/{group}/claim/{rank}", -1)
    except Exception:  # noqa: BLE001 - closing must not fail on a dead store
        pass
