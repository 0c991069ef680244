"""Rank bodies for the shm trust tests (importable by spawned children)."""
from __future__ import annotations

import struct

import numpy as np

import lamina_net as ln

# Offsets in the 80-byte descriptor wire form (csrc/memory/region.cpp).
OFF_ACCESS, OFF_REGION_ID, OFF_SIZE = 12, 24, 40


def forge(desc: ln.RemoteRegion, offset: int, fmt: str, value) -> ln.RemoteRegion:
    blob = bytearray(desc.to_bytes())
    struct.pack_into("<" + fmt, blob, offset, value)
    return ln.RemoteRegion.from_bytes(bytes(blob))


CASES = ("deregistered", "forged-access", "forged-size", "forged-id", "forged-id-of-local-region")


def forged_puts(rank, world, store, cases):
    """Rank 0 puts through forged or stale descriptors of rank 1's Endpoint.alloc memory
    over shm; each must be refused (the sender's flush fails) and write nothing."""
    peer = 1 - rank
    outcomes = {}
    with ln.Endpoint(rank, world, store, group="shm-trust", timeout=20) as ep:
        if rank == 1:
            win = ep.alloc(4096, np.uint8, ln.Access.REMOTE_WRITE)
            local_only = ep.alloc(4096, np.uint8, ln.Access.LOCAL)
            dead = ep.alloc(4096, np.uint8, ln.Access.REMOTE_WRITE)
            big = ep.alloc(8192, np.uint8, ln.Access.LOCAL)
            part = ep.register(big.array[1024:2048], ln.Access.REMOTE_WRITE)  # registers 1 KiB of 8 KiB
            for name, region in dict(win=win, local_only=local_only, dead=dead, part=part).items():
                ep.publish(name, region)
            ep.barrier("published")
            dead_array = dead.array
            dead.close()  # deregistered; the memory stays mapped here, so a write would land
            ep.barrier("deregistered")
            for i, case in enumerate(cases):
                ep.channel(peer, "shm", tag=i + 1)
                ep.barrier(f"done-{case}")
            ep.barrier("checked")
            touched = {
                "win": int(np.count_nonzero(win.array)),
                "local_only": int(np.count_nonzero(local_only.array)),
                "dead": int(np.count_nonzero(dead_array)),
                "big": int(np.count_nonzero(big.array)),
            }
            return touched
        ep.barrier("published")
        win, local_only, dead, part = (ep.lookup(peer, n) for n in ("win", "local_only", "dead", "part"))
        ep.barrier("deregistered")
        payload = np.full(512, 0xAB, np.uint8)
        for i, case in enumerate(cases):
            ch = ep.channel(peer, "shm", tag=i + 1)
            if case == "deregistered":
                target, offset = dead, 0
            elif case == "forged-access":
                target, offset = forge(local_only, OFF_ACCESS, "I", int(ln.Access.ALL)), 0
            elif case == "forged-size":
                target, offset = forge(part, OFF_SIZE, "Q", 8192 - 1024), 2048  # past the 1 KiB registered
            elif case == "forged-id":
                target, offset = forge(win, OFF_REGION_ID, "Q", 987654), 0
            else:  # win's fd and offset, the LOCAL-only region's id
                target, offset = forge(win, OFF_REGION_ID, "Q", local_only._desc.region_id), 0
            try:
                ch.put(payload, target, offset)
                ch.flush(timeout=10)
                outcomes[case] = "accepted"
            except ln.TransportError as e:
                outcomes[case] = "refused: " + str(e)
            ep.barrier(f"done-{case}")
        ep.barrier("checked")
        return outcomes


def idle_strangers_then_connect(rank, world, store, strangers):
    """Rank 0 (the tcp acceptor) first gets `strangers` connections that send
    nothing or half a hello and hold the socket; then both ranks open a tcp
    channel and use it. Returns (seconds the channel setup took, data ok)."""
    import socket
    import time

    peer = 1 - rank
    held = []
    with ln.Endpoint(rank, world, store, group="tcp-strangers", timeout=20) as ep:
        buf = ep.alloc(64)
        ep.publish("buf", buf)
        if rank == 0:
            host, port = ep._store.get("ln/tcp-strangers/0/tcp_addr", 10).decode().rsplit(":", 1)
            for i in range(strangers):
                s = socket.create_connection((host, int(port)))
                if i % 2 == 1:
                    s.sendall(b"LAMINA1.partial")  # half a hello, then silence
                held.append(s)
            time.sleep(0.2)  # the accept thread has taken them all
        ep.barrier("strangers-in")
        t0 = time.monotonic()
        ch = ep.channel(peer, "tcp")
        remote = ep.lookup(peer, "buf")
        ch.put(np.full(8, rank + 1, np.uint8), remote, 0)
        ch.flush(timeout=10)
        elapsed = time.monotonic() - t0
        ep.barrier("written")
        ok = bool((buf.array[:8] == peer + 1).all())
        for s in held:
            s.close()
        return elapsed, ok


# The shm segment's layout (csrc/transports/shm/shm_transport.cpp): a 128-byte
# header, then RingControl ring[2] of 256 bytes each (head at +0, tail at +64,
# data_seq, the readers' futex word, at +128);
# ring[s] carries frames from side s (rank 0 here) to side 1-s.
RING_OFFSET, RING_BYTES, HEAD, TAIL, DATA_SEQ = 128, 256, 0, 64, 128


def _segment_address() -> int:
    with open("/proc/self/maps") as f:
        hits = [line for line in f if "/lamina-net-" in line and "(deleted)" in line]
    assert len(hits) == 1, hits
    return int(hits[0].split("-")[0], 16)


def corrupted_ring(rank, world, store, index):
    """Rank 1, a hostile peer on the same host, writes a wild ring index into the
    segment both ranks map: `head` of the ring it writes (rank 0 would read past the
    ring) or `tail` of the ring it reads (rank 0 would write past it). Rank 0 must
    fail the channel with a clear error, stay alive, and connect again."""
    import ctypes

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="shm-ring", timeout=20) as ep:
        word = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
        ep.publish("word", word)
        ch = ep.channel(peer, "shm")
        remote = ep.lookup(peer, "word")
        ch.atomic_add(remote, 0, 1)  # one frame each way: both sides attached and running
        word.wait(0, 1, timeout=10, channel=ch)
        ep.barrier("attached")
        if rank == 1:
            base = _segment_address()
            ring = 1 if index == "head" else 0
            at = base + RING_OFFSET + ring * RING_BYTES + (HEAD if index == "head" else TAIL)
            ctypes.c_uint64.from_address(at).value += 1 << 40
            if index == "head":
                # Wake the reader as a writer does, without writing a frame
                # (that would store this side's own head over the wild one):
                # bump the ring's data_seq and futex-wake its sleepers.
                seq = ctypes.c_uint32.from_address(base + RING_OFFSET + ring * RING_BYTES + DATA_SEQ)
                seq.value += 1
                futex_wake = 1  # FUTEX_WAKE on a shared mapping (not the private variant)
                ctypes.CDLL(None, use_errno=True).syscall(ctypes.c_long(202), ctypes.c_void_p(ctypes.addressof(seq)),
                                                          ctypes.c_int(futex_wake), ctypes.c_int(0x7FFFFFFF),
                                                          None, None, ctypes.c_int(0))
            ep.barrier("corrupted")
            ep.barrier("checked")
            return None
        ep.barrier("corrupted")
        outcome = "accepted"
        try:
            for _ in range(4):
                ch.atomic_add(remote, 0, 1)  # a frame to write into the ring whose tail is wild
                ch.flush(timeout=5)
            word.wait(0, 2, timeout=5, channel=ch)  # the frame read through the wild head
        except (ln.TransportError, ln.TimeoutError) as e:
            outcome = f"{type(e).__name__}: {e}"
        ep.barrier("checked")
        return outcome
