"""Rank bodies for the shm direct-write tests (importable by spawned children)."""
from __future__ import annotations

import threading

import numpy as np

import lamina_net as ln


def stale_after_warm_puts(rank, world, store, which):
    """Rank 0 puts with a signal into rank 1's shared memory until the path is
    warm (the sender keeps the board's view of both regions), rank 1 then
    deregisters `which` ("data" or "signal"), and rank 0 puts once more through
    the same descriptors. Rank 0 returns how that put ended; rank 1 what landed
    after the deregistration."""
    peer = 1 - rank
    rounds = 50
    with ln.Endpoint(rank, world, store, group=f"shm-stale-{which}", timeout=20) as ep:
        if rank == 1:
            win = ep.alloc(4096, np.uint8, ln.Access.REMOTE_WRITE)
            sig = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
            ep.publish("win", win)
            ep.publish("sig", sig)
            ch = ep.channel(peer, "shm")
            sig.wait(0, rounds, timeout=10, channel=ch)
            warm_ok = bool((win.array[:512] == rounds % 256).all())
            win_array, sig_array = win.array, sig.array
            win_array[:] = 0
            (win if which == "data" else sig).close()  # the memory stays mapped here: a write would land
            ep.barrier("deregistered")
            ep.barrier("put-done")
            return {"warm_ok": warm_ok, "win_written": int(np.count_nonzero(win_array)),
                    "signal": int(sig_array[0])}
        win_d, sig_d = None, None
        ch = ep.channel(peer, "shm")
        win_d, sig_d = ep.lookup(peer, "win"), ep.lookup(peer, "sig")
        for i in range(1, rounds + 1):
            ch.put(np.full(512, i % 256, np.uint8), win_d, 0, signal=sig_d)
        ep.barrier("deregistered")
        try:
            ch.put(np.full(512, 0xCD, np.uint8), win_d, 0, signal=sig_d)
            ch.flush(timeout=10)
            outcome = "accepted"
        except ln.TransportError as e:
            outcome = "refused: " + str(e)
        ep.barrier("put-done")
        return outcome


def threads_put_with_signals(rank, world, store, threads, rounds):
    """Rank 0's `threads` threads each put `rounds` numbered 64-byte records with
    a signal into their own slice of rank 1's window, all on one shm channel and
    one signal word; rank 1 waits for every signal and checks every record."""
    peer = 1 - rank
    record = 64
    with ln.Endpoint(rank, world, store, group="shm-threads", timeout=30) as ep:
        if rank == 1:
            win = ep.alloc(threads * rounds * record, np.uint8, ln.Access.REMOTE_WRITE)
            sig = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
            ep.publish("win", win)
            ep.publish("sig", sig)
            ch = ep.channel(peer, "shm")
            sig.wait(0, threads * rounds, timeout=30, channel=ch)
            got = win.array.reshape(threads, rounds, record)
            bad = [(t, i) for t in range(threads) for i in range(rounds)
                   if not (got[t, i] == (t * 31 + i) % 251 + 1).all()]
            ep.barrier("checked")
            return {"signal": int(sig.read_u64(0)), "bad": bad[:5], "nbad": len(bad)}
        ch = ep.channel(peer, "shm")
        win, sig = ep.lookup(peer, "win"), ep.lookup(peer, "sig")
        errors = []

        def body(t):
            try:
                for i in range(rounds):
                    src = np.full(record, (t * 31 + i) % 251 + 1, np.uint8)
                    ch.put(src, win, (t * rounds + i) * record, signal=sig)
            except BaseException as e:  # reported below
                errors.append(repr(e))

        workers = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        ep.barrier("checked")
        return {"errors": errors, "alive": sum(w.is_alive() for w in workers)}


def signal_word_not_shared(rank, world, store, rounds):
    """Puts into rank 1's shared window with the signal word in memory the
    sender cannot map (registered, not Endpoint.alloc): the data goes straight
    in, the signal by frame. Rank 1 waits for each round's signal and checks
    the data that came before it."""
    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="shm-ring-signal", timeout=20) as ep:
        if rank == 1:
            win = ep.alloc(256, np.uint8, ln.Access.REMOTE_WRITE)
            words = np.zeros(1, np.uint64)
            sig = ep.register(words, ln.Access.REMOTE_ATOMIC)
            ep.publish("win", win)
            ep.publish("sig", sig)
            ch = ep.channel(peer, "shm")
            bad = 0
            for i in range(1, rounds + 1):
                sig.wait(0, i, timeout=10, channel=ch)
                bad += int(not (win.array[:256] == i % 256).all())
                ep.barrier(f"seen-{i}")
            return {"signal": int(words[0]), "bad": bad}
        ch = ep.channel(peer, "shm")
        win, sig = ep.lookup(peer, "win"), ep.lookup(peer, "sig")
        for i in range(1, rounds + 1):
            ch.put(np.full(256, i % 256, np.uint8), win, 0, signal=sig)
            ep.barrier(f"seen-{i}")
        return {"shared_signal": sig._desc.shared_fd >= 0}


def _stream_thread_switches() -> int:
    """Voluntary context switches of this process's lamina-stream threads (each
    sleep that ended, by a wake-up or a timeout)."""
    import os
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if not f.read().startswith("lamina-stream"):
                    continue
            with open(f"/proc/self/task/{tid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (OSError, StopIteration):
            pass
    return total


def puts_to_an_idle_target(rank, world, store, puts):
    """Rank 0 puts with a signal into rank 1's shared memory `puts` times while
    no thread of rank 1 waits (its progress thread sleeps on the ring). Rank 1
    returns how often its progress thread woke meanwhile and the final signal."""
    import time
    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="shm-idle-target", timeout=30) as ep:
        if rank == 1:
            win = ep.alloc(64, np.uint8, ln.Access.REMOTE_WRITE)
            sig = ep.alloc(1, np.uint64, ln.Access.REMOTE_ATOMIC)
            ep.publish("win", win)
            ep.publish("sig", sig)
            ep.channel(peer, "shm")
            ep.barrier("ready")
            time.sleep(0.2)  # the progress thread settles into its sleep on the ring
            before = _stream_thread_switches()
            ep.barrier("go")
            ep.barrier("done")
            woke = _stream_thread_switches() - before
            return {"woke": woke, "signal": int(sig.read_u64(0)), "threads": before > 0}
        ch = ep.channel(peer, "shm")
        win, sig = ep.lookup(peer, "win"), ep.lookup(peer, "sig")
        src = np.ones(8, np.uint8)
        ep.barrier("ready")
        ep.barrier("go")
        start = time.monotonic()
        for _ in range(puts):
            ch.put(src, win, 0, signal=sig)
        seconds = time.monotonic() - start
        ep.barrier("done")
        return {"seconds": seconds}
