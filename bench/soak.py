"""Soak: many messages of random sizes over each transport, every one checked.

Rank 0 puts messages of random sizes (1 B .. --max-size) into a ring of slots
in rank 1's memory, each followed by a signal (put with signal), and also
sends every 16th as a two-sided message. Each payload is a pattern derived
from its sequence number, so rank 1 checks every byte of every message, that
signals arrive once each and in order (the signal word equals the count
received), and that messages are neither lost, duplicated nor reordered.
Rank 1 returns credits with an atomic add, so a slot is reused only after it
was checked. Both ranks record peak RSS and open file descriptors at the start
and at the end; they must stay flat.

    python bench/soak.py [--messages 1000000] [--transports shm,tcp] [--json PATH]

Exits non-zero on any corruption, loss, or growth past the allowance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SLOTS = 64


def _pattern(seq: int, n: int) -> np.ndarray:
    # Cheap and seq-dependent in every byte: a checksum would miss a swapped slot.
    offset = np.uint32((seq * 40503) & 0xFFFFFFFF)
    return ((np.arange(n, dtype=np.uint32) * np.uint32(2654435761) + offset) >> 13).astype(np.uint8)


def _resources() -> dict:
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"peak_rss_kib": rss, "open_fds": len(os.listdir("/proc/self/fd"))}


def soak_rank(rank, world, store, transport, messages, max_size, seed):
    import lamina_net as ln

    peer = 1 - rank
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, size=messages)
    with ln.Endpoint(rank, world, store, group=f"soak-{transport}", timeout=30) as ep:
        inbox = ep.alloc(SLOTS * max_size)
        signal = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
        credits = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
        for name, region in (("inbox", inbox), ("signal", signal), ("credits", credits)):
            ep.publish(name, region)
        ch = ep.channel(peer, transport)
        r_inbox, r_signal, r_credits = (ep.lookup(peer, n) for n in ("inbox", "signal", "credits"))
        src = ep.alloc(max_size)
        first = _resources()
        warm = None
        t0 = time.monotonic()
        if rank == 0:
            for seq in range(messages):
                if seq == messages // 10:
                    warm = _resources()  # after the first tenth: pools and caches are at their size
                if seq >= SLOTS:
                    credits.wait(0, seq - SLOTS + 1, timeout=30, channel=ch)
                n = int(sizes[seq])
                src.array[:n] = _pattern(seq, n)
                ch.put(src, r_inbox, (seq % SLOTS) * max_size, nbytes=n, signal=r_signal)
                if seq % 16 == 0:
                    ch.send(np.array([seq, n], np.int64))
            ch.flush(timeout=30)
            credits.wait(0, messages, timeout=30, channel=ch)
        else:
            msg = np.zeros(2, np.int64)
            for seq in range(messages):
                if seq == messages // 10:
                    warm = _resources()
                got = signal.wait(0, seq + 1, timeout=30, channel=ch)
                if got != seq + 1 and seq + 1 < messages:
                    # The sender waits for credits, so at most SLOTS may be ahead; the word is a count.
                    if got > seq + 1 + SLOTS:
                        raise AssertionError(f"signal word {got} after {seq} messages: duplicated signals")
                n = int(sizes[seq])
                at = (seq % SLOTS) * max_size
                if not np.array_equal(inbox.array[at:at + n], _pattern(seq, n)):
                    raise AssertionError(f"{transport}: message {seq} ({n} bytes) arrived corrupted")
                if seq % 16 == 0:
                    ch.recv(msg, timeout=30)
                    if msg.tolist() != [seq, n]:
                        raise AssertionError(f"{transport}: two-sided message {msg.tolist()} where "
                                             f"[{seq}, {n}] was due (lost or reordered)")
                ch.atomic_add(r_credits, 0, 1)
            if signal.read_u64(0) != messages:
                raise AssertionError(f"signal word {signal.read_u64(0)} after {messages} messages")
        seconds = time.monotonic() - t0
        last = _resources()
        ep.barrier("soak-done")
        return {"transport": ch.transport, "rank": rank, "messages": messages, "seconds": seconds,
                "bytes": int(sizes.sum()), "start": first, "warm": warm or first, "end": last}


def main(argv=None) -> int:
    from harness import assert_all_ok, run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--max-size", type=int, default=65536)
    p.add_argument("--transports", default="shm,tcp")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rss-allowance-kib", type=int, default=16384,
                   help="growth of peak RSS allowed after the first tenth of the run")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    records, failed = [], False
    for transport in args.transports.split(","):
        results = assert_all_ok(run_ranks(soak_rank, args=(transport, args.messages, args.max_size, args.seed),
                                          timeout=max(120.0, args.messages * 2e-3)))
        for rank in sorted(results):
            r = results[rank]
            growth = r["end"]["peak_rss_kib"] - r["warm"]["peak_rss_kib"]
            fds = r["end"]["open_fds"] - r["warm"]["open_fds"]
            r["rss_growth_kib"], r["fd_growth"] = growth, fds
            ok = growth <= args.rss_allowance_kib and fds <= 0
            failed |= not ok
            records.append(r)
            print(f"{r['transport']:5} rank {rank}: {r['messages']} messages, {r['bytes'] / 1e6:.1f} MB checked in "
                  f"{r['seconds']:.1f} s; peak RSS {r['warm']['peak_rss_kib']} -> {r['end']['peak_rss_kib']} KiB, "
                  f"open fds {r['warm']['open_fds']} -> {r['end']['open_fds']}{'' if ok else '  GREW'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(f"soak: {sum(1 for r in records if r['rank'] == 1)} transports, every message checked, "
          f"{'resources grew' if failed else 'resources flat'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
