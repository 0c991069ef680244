"""Rank bodies for the device API tests (importable by spawned children).

Rank 0 makes a device channel on its channel to rank 1 and drives it from
CPU threads through tests/device/cpu_producers.cpp (the same
lamina_net/device.cuh a kernel includes); rank 1 is the target and checks
what arrived. Every body takes (rank, world, store, lib_path, transport, ...)
and returns what the test asserts on. Shared by tier 0 (tcp, shm:
tests/test_device.py) and the verbs tier (tests/verbs/test_verbs_device.py).
"""
from __future__ import annotations

import os
import signal as signal_mod
import struct
import threading
import time
from types import SimpleNamespace

import numpy as np

import lamina_net as ln
from lamina_net import device as lnd

import producers

# Windows of the standard device channel: local [src, word], remote [inbox, signals].
SRC_W, WORD_W = 0, 1
INBOX_W, SIG_W = 0, 1


def _endpoint(rank, world, store, group, transport, timeout=20.0):
    transports = ("verbs",) if transport == "verbs" else ("shm", "tcp")
    return ln.Endpoint(rank, world, store, group=group, timeout=timeout, transports=transports)


def _setup(ep, transport, records, nbytes, signals=1, target="alloc"):
    """Both ranks: inbox (records * nbytes, remote write), `signals` u64 words
    (remote atomic), a source area of the same size and one local u64 word
    nobody signals; publishes, connects, looks up the peer's."""
    peer = 1 - ep.rank
    size = max(records * nbytes, 64)
    if target == "alloc":
        inbox = ep.alloc(size, np.uint8, ln.Access.REMOTE_WRITE)
        sig = ep.alloc(signals, np.uint64, ln.Access.REMOTE_ATOMIC)
    else:
        inbox = ep.register(np.zeros(size, np.uint8), ln.Access.REMOTE_WRITE)
        sig = ep.register(np.zeros(signals, np.uint64), ln.Access.REMOTE_ATOMIC)
    src = ep.alloc(size, np.uint8, ln.Access.LOCAL)
    word = ep.alloc(1, np.uint64, ln.Access.LOCAL)
    ep.publish("inbox", inbox)
    ep.publish("sig", sig)
    ch = ep.channel(peer, transport)
    assert ch.transport == transport, ch.transport
    return SimpleNamespace(inbox=inbox, sig=sig, src=src, word=word, ch=ch, peer=peer,
                           rinbox=ep.lookup(peer, "inbox"), rsig=ep.lookup(peer, "sig"))


def _device(s, **options):
    return s.ch.device([s.src, s.word], [s.rinbox, s.rsig], **options)


def _finish(ep, region):
    """The last store exchange of a body. Rank 0 hosts the store, so a final
    barrier would race its exit with rank 1's last read of the store: rank 1
    publishes "done" (its last store call), rank 0 waits for it."""
    if ep.rank == 1:
        ep.publish("done", region)
    else:
        ep.lookup(1, "done", timeout=60)


def _handle_fields(lib, handle):
    def u(field, fmt):
        return struct.unpack_from(fmt, handle, lib.ln_handle_offset(field))[0]
    return {"magic": u(0, "<I"), "abi": u(1, "<I"), "capacity": u(2, "<Q"), "timeout_ns": u(3, "<Q"),
            "peer": u(4, "<i"), "remote_count": u(5, "<I"), "local_count": u(6, "<I")}


# --------------------------------------------------------------------------- 1, 2: many producers


def many_producers(rank, world, store, lib_path, transport, threads, per_thread, nbytes, ring_slots, target, seed=7):
    """Rank 0: `threads` CPU threads each post `per_thread` put_signals of
    their own records (one signal word for all), then a flush. Rank 1: waits
    for the count, then checks the count is exact and every record intact."""
    lib = producers.load(lib_path)
    n = threads * per_thread
    with _endpoint(rank, world, store, "dev-many", transport) as ep:
        s = _setup(ep, transport, n, nbytes, target=target)
        if rank == 0:
            lib.fill(s.src, n, nbytes, seed)
            with _device(s, ring_slots=ring_slots, timeout=10) as dev:
                h = dev.handle()
                fields = _handle_fields(lib, h)
                t0 = time.monotonic()
                out = lib.produce(h, threads, per_thread, producers.PUT_SIGNAL, dst_w=INBOX_W, src_w=SRC_W,
                                  nbytes=nbytes, sig_w=SIG_W)
                out["flush"] = lib.ln_flush(h)
                out["seconds"] = time.monotonic() - t0
                out["stats"] = dev.stats()
                out["error"] = dev.error
                out["error_code"] = dev.error_code
                out["handle_len"] = len(h)
                out["fields"] = fields
                ep.barrier("produced")
                _finish(ep, s.word)
            return out
        s.sig.wait(0, n, timeout=30, channel=s.ch)
        ep.barrier("produced")  # rank 0 flushed: nothing more is in flight
        out = {"signal": s.sig.read_u64(0), "first_bad": lib.first_bad(s.inbox, n, nbytes, seed)}
        _finish(ep, s.word)
        return out


# --------------------------------------------------------------------------- 3: signal after data


def signal_order(rank, world, store, lib_path, transport, threads, per_thread, nbytes, target, seed=11):
    """Thread t's records are counted by signal word t; rank 1's checker (C++,
    spinning while the puts arrive) checks on every new value k of word t
    that record k - 1 of thread t is already in place."""
    lib = producers.load(lib_path)
    n = threads * per_thread
    with _endpoint(rank, world, store, "dev-order", transport, timeout=40) as ep:
        s = _setup(ep, transport, n, nbytes, signals=threads, target=target)
        if rank == 0:
            lib.fill(s.src, n, nbytes, seed)
            with _device(s, ring_slots=64, timeout=20) as dev:
                h = dev.handle()
                ep.barrier("ready")
                out = lib.produce(h, threads, per_thread, producers.PUT_SIGNAL, dst_w=INBOX_W, src_w=SRC_W,
                                  nbytes=nbytes, sig_w=SIG_W, sig_stride=8, flush=True)
                out["error"] = dev.error
                out["stats"] = dev.stats()
                ep.barrier("produced")  # rank 1 stays until every flush is answered
                _finish(ep, s.word)
            return out
        checked = {}
        checker = threading.Thread(target=lambda: checked.update(zip(
            ("rc", "observations"), lib.check_signal_order(s.inbox, s.sig, threads, per_thread, nbytes, seed, 30.0))))
        checker.start()  # polling before rank 0 starts posting
        ep.barrier("ready")
        checker.join(40)
        rc, observations = checked.get("rc", "checker did not return"), checked.get("observations")
        ep.barrier("produced")
        _finish(ep, s.word)
        return {"rc": rc, "observations": observations, "signals": [s.sig.read_u64(8 * t) for t in range(threads)]}


def source_reuse(rank, world, store, lib_path, transport, threads, per_thread, nbytes, seed=23):
    """Each producer thread rewrites one source record as soon as the device
    API says it is free; rank 1 then finds every record's own bytes."""
    lib = producers.load(lib_path)
    n = threads * per_thread
    with _endpoint(rank, world, store, "dev-reuse", transport, timeout=40) as ep:
        s = _setup(ep, transport, n, nbytes)
        if rank == 0:
            with _device(s, ring_slots=64, timeout=20) as dev:
                statuses = lib.reuse_source(dev.handle(), threads, per_thread, dst_w=INBOX_W, src_w=SRC_W,
                                            nbytes=nbytes, seed=seed)
                out = {"statuses": statuses, "error": dev.error}
            ep.barrier("produced")
            _finish(ep, s.word)
            return out
        ep.barrier("produced")  # every thread's flush returned: the records are in place
        bad = lib.first_bad(s.inbox, n, nbytes, seed)
        _finish(ep, s.word)
        return {"first_bad": bad}


# --------------------------------------------------------------------------- 4: flush


def flush_visible(rank, world, store, lib_path, transport, rounds, threads, per_thread, nbytes, target):
    """Plain puts (no signal) from several threads, each thread flushing
    after its last; after every thread's flush returned 0 a store barrier
    (another path), then rank 1 finds every record in place. New bytes each
    round, so a round's check cannot pass on an earlier round's data."""
    lib = producers.load(lib_path)
    n = threads * per_thread
    with _endpoint(rank, world, store, "dev-flush", transport) as ep:
        s = _setup(ep, transport, n, nbytes, target=target)
        if rank == 0:
            rounds_out = []
            with _device(s, ring_slots=256, timeout=10) as dev:
                h = dev.handle()
                for r in range(rounds):
                    lib.fill(s.src, n, nbytes, 100 + r)
                    out = lib.produce(h, threads, per_thread, producers.PUT, dst_w=INBOX_W, src_w=SRC_W,
                                      nbytes=nbytes, flush=True)
                    # Read before the barriers: once rank 1 has checked it may exit.
                    out["stats"], out["error"] = dev.stats(), dev.error
                    rounds_out.append(out)
                    ep.barrier(f"flushed-{r}")
                    ep.barrier(f"checked-{r}")
                out = {"rounds": rounds_out, "stats": rounds_out[-1]["stats"],
                       "error": [r["error"] for r in rounds_out]}
                _finish(ep, s.word)
                return out
        bad = []
        for r in range(rounds):
            ep.barrier(f"flushed-{r}")
            bad.append(lib.first_bad(s.inbox, n, nbytes, 100 + r))
            ep.barrier(f"checked-{r}")
        _finish(ep, s.word)
        return {"first_bad": bad, "signal": s.sig.read_u64(0)}


# --------------------------------------------------------------------------- 5: a peer killed


def peer_killed(rank, world, store, lib_path, transport, threads, timeout, records=256, nbytes=512):
    """Rank 1 SIGKILLs itself once the stream is running (its signal word
    passed 200). Rank 0's producers (posting without end) and a device wait
    on a local word nobody signals must all return non-zero within the
    handle's bound; later calls fail at once; dev.error says why."""
    lib = producers.load(lib_path)
    ep = _endpoint(rank, world, store, "dev-kill", transport, timeout=30)
    s = _setup(ep, transport, records, nbytes)
    if rank == 1:
        ep.barrier("ready")
        s.sig.wait(0, 200, timeout=30, channel=s.ch)
        os.kill(os.getpid(), signal_mod.SIGKILL)
        time.sleep(30)
        raise AssertionError("still alive after SIGKILL")
    lib.fill(s.src, records, nbytes, 3)
    dev = _device(s, ring_slots=16, timeout=timeout)
    h = dev.handle()
    waited = {}

    def waiter():
        waited["status"], waited["seconds"] = lib.wait_timed(h, WORD_W, 0, 1)

    ep.barrier("ready")
    t0 = time.monotonic()
    wt = threading.Thread(target=waiter)
    wt.start()
    out = lib.produce(h, threads, 1 << 40, producers.PUT_SIGNAL, dst_w=INBOX_W, src_w=SRC_W, nbytes=nbytes,
                      sig_w=SIG_W, wrap=records)
    out["seconds"] = time.monotonic() - t0
    wt.join(timeout + 10)
    out["waiter_alive"] = wt.is_alive()
    out["wait"] = dict(waited)
    t1 = time.monotonic()
    out["later"] = [lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8), lib.ln_flush(h), lib.ln_wait(h, WORD_W, 0, 1),
                    lib.ln_signal(h, SIG_W, 0, 1)]
    out["later_seconds"] = time.monotonic() - t1
    out["error"] = dev.error
    out["error_code"] = dev.error_code
    out["device_status"] = lib.ln_status(h)
    out["channel_failed"] = s.ch.failed()
    dev.close()
    ep.close()
    return out


# --------------------------------------------------------------------------- 6: descriptors that fail the checks


def device_checks(rank, world, store, lib_path, transport):
    """Arguments outside the handle's windows: each call returns
    kDeviceInvalidArgument and posts nothing (executed unchanged, the
    target's memory untouched); the channel stays healthy."""
    lib = producers.load(lib_path)
    with _endpoint(rank, world, store, "dev-checks", transport) as ep:
        peer = 1 - rank
        inbox = ep.alloc(4096, np.uint8, ln.Access.REMOTE_WRITE)     # no REMOTE_ATOMIC
        sig = ep.alloc(2, np.uint64, ln.Access.REMOTE_ATOMIC)         # no REMOTE_WRITE
        src = ep.alloc(1024, np.uint8, ln.Access.LOCAL)
        word = ep.alloc(2, np.uint64, ln.Access.LOCAL)
        ep.publish("inbox", inbox)
        ep.publish("sig", sig)
        ch = ep.channel(peer, transport)
        rinbox, rsig = ep.lookup(peer, "inbox"), ep.lookup(peer, "sig")
        if rank == 1:
            ep.barrier("done")
            a = inbox.array
            out = {"untouched": bool(not a[:64].any() and not a[72:].any()),
                   "valid_put": bytes(a[64:72]), "signal": sig.read_u64(0), "signal1": sig.read_u64(8)}
            _finish(ep, word)
            return out
        src.array[:8] = np.frombuffer(b"lamina!!", np.uint8)
        out = {}
        with ch.device([src, word], [rinbox, rsig], ring_slots=8, timeout=5) as dev:
            h = dev.handle()
            big = (1 << 64) - 8
            cases = {
                "put dst window out of range": lambda: lib.ln_put(h, 2, 0, 0, 0, 8),
                "put dst window 0xffff": lambda: lib.ln_put(h, 0xFFFF, 0, 0, 0, 8),
                "put src window out of range": lambda: lib.ln_put(h, 0, 0, 2, 0, 8),
                "put range past the remote window": lambda: lib.ln_put(h, 0, 4090, 0, 0, 8),
                "put offset past the remote window": lambda: lib.ln_put(h, 0, 4097, 0, 0, 0),
                "put offset + bytes overflows": lambda: lib.ln_put(h, 0, big, 0, 0, 16),
                "put range past the local window": lambda: lib.ln_put(h, 0, 0, 0, 1020, 8),
                "put bytes past the local window": lambda: lib.ln_put(h, 0, 0, 0, 0, 1025),
                "put to a window without REMOTE_WRITE": lambda: lib.ln_put(h, 1, 0, 0, 0, 8),
                "put_signal signal offset misaligned": lambda: lib.ln_put_signal(h, 0, 0, 0, 0, 8, 1, 4, 1),
                "put_signal signal past the window": lambda: lib.ln_put_signal(h, 0, 0, 0, 0, 8, 1, 16, 1),
                "put_signal signal window out of range": lambda: lib.ln_put_signal(h, 0, 0, 0, 0, 8, 5, 0, 1),
                "put_signal signal without REMOTE_ATOMIC": lambda: lib.ln_put_signal(h, 0, 0, 0, 0, 8, 0, 0, 1),
                "put_signal data to a window without REMOTE_WRITE":
                    lambda: lib.ln_put_signal(h, 1, 0, 0, 0, 8, 1, 0, 1),
                "signal offset misaligned": lambda: lib.ln_signal(h, 1, 3, 1),
                "signal window out of range": lambda: lib.ln_signal(h, 2, 0, 1),
                "signal past the window": lambda: lib.ln_signal(h, 1, 16, 1),
                "signal without REMOTE_ATOMIC": lambda: lib.ln_signal(h, 0, 0, 1),
                "wait window out of range": lambda: lib.ln_wait(h, 2, 0, 1),
                "wait offset misaligned": lambda: lib.ln_wait(h, 1, 4, 1),
                "wait past the window": lambda: lib.ln_wait(h, 1, 16, 1),
            }
            before = dev.stats()["executed"]
            for name, fn in cases.items():
                out[name] = fn()
            out["executed_after_checks"] = dev.stats()["executed"] - before
            # A flush (one descriptor) proves the proxy has drained: had any
            # call above posted, executed would count it too.
            out["flush"] = lib.ln_flush(h)
            out["executed_with_flush"] = dev.stats()["executed"] - before
            out["valid"] = [lib.ln_put(h, 0, 64, 0, 0, 8), lib.ln_signal(h, 1, 0, 1), lib.ln_flush(h)]
            out["error"] = dev.error
            out["stats"] = dev.stats()
        ep.barrier("done")
        _finish(ep, word)
        return out


HOST_REJECTS = {
    # name: (raw descriptor fields for ln_post_raw, words the proxy's reason must hold)
    "dst window": (dict(opcode=1, dst_w=9), ["destination window 9", "remote windows"]),
    "src window": (dict(opcode=1, src_w=7), ["source window 7", "local windows"]),
    "signal window": (dict(opcode=3, sig_w=5), ["signal window 5"]),
    "put_signal signal window": (dict(opcode=2, sig_w=12), ["signal window 12"]),
    "opcode": (dict(opcode=77), ["unknown opcode 77"]),
    "src range": (dict(opcode=1, src_off=1000, nbytes=100), ["source range", "outside local window 0"]),
    "dst range": (dict(opcode=1, dst_off=4000, nbytes=200), []),
    "rights": (dict(opcode=1, dst_w=1), []),
    "signal misaligned": (dict(opcode=3, sig_w=1, sig_off=3), []),
    "ticket": (None, ["carries ticket", "overwritten"]),
}


def host_rejects(rank, world, store, lib_path, transport, cases):
    """Descriptors a buggy kernel could post (straight through DeviceChannel::post,
    past the device-side checks): the proxy refuses each (kErrorRejected),
    names why, executes nothing after it (a valid put posted right behind it
    never lands), and later calls fail at once. The channel itself stays
    usable and the target's memory is untouched."""
    lib = producers.load(lib_path)
    with _endpoint(rank, world, store, "dev-rejects", transport) as ep:
        peer = 1 - rank
        inbox = ep.alloc(4096, np.uint8, ln.Access.REMOTE_WRITE)
        sig = ep.alloc(2, np.uint64, ln.Access.REMOTE_ATOMIC)
        src = ep.alloc(1024, np.uint8, ln.Access.LOCAL)
        word = ep.alloc(1, np.uint64, ln.Access.LOCAL)
        ep.publish("inbox", inbox)
        ep.publish("sig", sig)
        ch = ep.channel(peer, transport)
        rinbox, rsig = ep.lookup(peer, "inbox"), ep.lookup(peer, "sig")
        if rank == 1:
            ep.barrier("done")
            a = inbox.array
            out = {"untouched": bool(not a[8:].any()), "host_put": bytes(a[:8]), "signal": sig.read_u64(0)}
            _finish(ep, word)
            return out
        src.array[:] = 0xAB
        results = {"cases": {}}
        for name in cases:
            fields, _ = HOST_REJECTS[name]
            dev = ch.device([src, word], [rinbox, rsig], ring_slots=8, timeout=5)
            h = dev.handle()
            r = {}
            if fields is None:
                r["post"] = lib.ln_post_wrong_ticket(h, 1000)
            else:
                f = dict(opcode=0, src_w=0, src_off=0, dst_w=0, dst_off=0, nbytes=8, sig_w=1, sig_off=0, add=1)
                f.update(fields)
                r["post"] = lib.ln_post_raw(h, f["opcode"], f["src_w"], f["src_off"], f["dst_w"], f["dst_off"],
                                            f["nbytes"], f["sig_w"], f["sig_off"], f["add"])
            # Right behind it, a valid put and signal: never executed.
            r["behind"] = [lib.ln_put(h, 0, 8, 0, 0, 8), lib.ln_signal(h, 1, 0, 1)]
            deadline = time.monotonic() + 5
            while dev.error_code == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            r["error_code"] = dev.error_code
            r["error"] = dev.error
            t0 = time.monotonic()
            r["later"] = [lib.ln_put(h, 0, 16, 0, 0, 8), lib.ln_flush(h), lib.ln_signal(h, 1, 0, 1),
                          lib.ln_wait(h, 1, 0, 1), lib.ln_status(h)]
            r["later_seconds"] = time.monotonic() - t0
            r["stats"] = dev.stats()
            dev.close()
            r["error_after_close"] = dev.error_code
            results["cases"][name] = r
        # The channel under the device channels is fine.
        ch.put(np.frombuffer(b"host ok!", np.uint8), rinbox, 0)
        ch.flush(timeout=10)
        results["channel_failed"] = ch.failed()
        ep.barrier("done")
        _finish(ep, word)
        return results


# --------------------------------------------------------------------------- 7: closing


def closing(rank, world, store, lib_path, transport, timeout):
    """close(): later calls return kDeviceChannelError at once; producers
    blocked on a full ring (the proxy busy with large puts) return within the
    bound; idempotent; context manager; channel.close() closes the channel's
    device_handle()s; Endpoint.close() closes its device channels first."""
    lib = producers.load(lib_path)
    big = 256 << 10
    records = 8
    ep = _endpoint(rank, world, store, "dev-close", transport)
    s = _setup(ep, transport, records, big)
    bulk_bytes = 16 << 20
    bulk = ep.register(np.zeros(2 * bulk_bytes, np.uint8), ln.Access.REMOTE_WRITE)
    ep.publish("bulk", bulk)
    ch1 = ep.channel(s.peer, transport, tag=1)
    if rank == 1:
        ep.barrier("endpoint-close")
        _finish(ep, s.word)
        # Stays until rank 0 has closed its endpoint (its channel to us closes).
        deadline = time.monotonic() + 60
        while s.ch.failed() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ep.close()
        return {}
    out = {}

    # a) close, then every call fails at once
    dev = _device(s, ring_slots=8, timeout=timeout)
    h = dev.handle()
    out["before_close"] = lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8)
    dev.close()
    t0 = time.monotonic()
    out["after_close"] = [lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8), lib.ln_flush(h), lib.ln_wait(h, WORD_W, 0, 1),
                          lib.ln_signal(h, SIG_W, 0, 1), lib.ln_status(h)]
    out["after_close_seconds"] = time.monotonic() - t0
    out["closed_code"] = dev.error_code
    out["closed_error"] = dev.error
    dev.close()  # idempotent
    out["closed"] = dev.closed
    for what, fn in (("handle", dev.handle), ("stats", dev.stats)):
        try:
            fn()
            out[f"{what}_after_close"] = "no error"
        except ln.UsageError as e:
            out[f"{what}_after_close"] = "UsageError: " + str(e)

    # b) producers blocked on a full ring while the proxy works through 256 KiB puts
    dev = _device(s, ring_slots=2, timeout=timeout)
    h = dev.handle()
    blocked = {}

    def produce():
        blocked.update(lib.produce(h, 4, 1 << 40, producers.PUT, dst_w=INBOX_W, src_w=SRC_W, nbytes=big,
                                   wrap=records))

    th = threading.Thread(target=produce)
    th.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    dev.close()
    out["close_seconds"] = time.monotonic() - t0
    th.join(timeout + 10)
    out["blocked_alive"] = th.is_alive()
    out["blocked_return_seconds"] = time.monotonic() - t0
    out["blocked"] = blocked
    out["blocked_code"] = dev.error_code

    # b2) a ring of 4096 slots full of 16 MiB puts (the proxy is the
    #     bottleneck, a few ms each): close() waits for the descriptor being
    #     executed, not for the rest of the proxy's batch (up to 4096 of them)
    rbulk = ep.lookup(s.peer, "bulk")
    bulk_src = ep.alloc(2 * bulk_bytes, np.uint8, ln.Access.LOCAL)
    dev = s.ch.device([bulk_src], [rbulk], ring_slots=4096, timeout=timeout)
    h = dev.handle()
    bulk_run = {}
    th = threading.Thread(target=lambda: bulk_run.update(
        lib.produce(h, 2, 1 << 40, producers.PUT, nbytes=bulk_bytes, wrap=2)))
    th.start()
    time.sleep(0.5)
    executed = dev.stats()["executed"]
    t0 = time.monotonic()
    dev.close()
    out["bulk_close_seconds"] = time.monotonic() - t0
    th.join(timeout + 10)
    out["bulk_alive"] = th.is_alive()
    out["bulk_executed_before_close"] = executed
    out["bulk_posted"] = sum(bulk_run.get("posted", []))
    out["bulk_statuses"] = bulk_run.get("statuses")

    # c) context manager
    with _device(s, ring_slots=4, timeout=timeout) as dev:
        h = dev.handle()
        out["in_with"] = [lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8), lib.ln_flush(h)]
    out["with_closed"] = dev.closed
    out["after_with"] = lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8)

    # d) Channel.close() closes its device_handle() channels before the channel
    h1 = ch1.device_handle([s.src, s.word], [s.rinbox, s.rsig], ring_slots=4, timeout=timeout)
    out["handle_before_channel_close"] = [lib.ln_put(h1, INBOX_W, 0, SRC_W, 0, 8), lib.ln_flush(h1)]
    ch1.close()
    out["handle_after_channel_close"] = [lib.ln_put(h1, INBOX_W, 0, SRC_W, 0, 8), lib.ln_error_code(h1)]

    # e) Endpoint.close() while producers post and a device wait is pending
    dev = _device(s, ring_slots=4, timeout=timeout)
    h = dev.handle()
    running = {}

    def produce_forever():
        running.update(lib.produce(h, 3, 1 << 40, producers.PUT, dst_w=INBOX_W, src_w=SRC_W, nbytes=4096,
                                   wrap=records))

    def wait_forever():
        running["wait"] = lib.wait_timed(h, WORD_W, 0, 1)

    ths = [threading.Thread(target=produce_forever), threading.Thread(target=wait_forever)]
    ep.barrier("endpoint-close")
    _finish(ep, s.word)
    for t in ths:
        t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    ep.close()
    out["endpoint_close_seconds"] = time.monotonic() - t0
    for t in ths:
        t.join(timeout + 10)
    out["endpoint_threads_alive"] = any(t.is_alive() for t in ths)
    out["endpoint_return_seconds"] = time.monotonic() - t0
    out["endpoint_producers"] = {k: running.get(k) for k in ("statuses", "posted")}
    out["endpoint_wait"] = running.get("wait")
    out["endpoint_dev_closed"] = dev.closed
    out["endpoint_dev_code"] = dev.error_code
    out["endpoint_after"] = lib.ln_put(h, INBOX_W, 0, SRC_W, 0, 8)
    ep.close()  # idempotent
    return out


# --------------------------------------------------------------------------- 8: bad Python input


def usage_errors(rank, world, store, lib_path, transport):
    """ch.device(...) refuses bad input with UsageError and makes nothing."""
    from harness import free_port

    results = {}
    with _endpoint(rank, world, store, "dev-usage", transport) as ep:
        s = _setup(ep, transport, 16, 64)
        ch2 = ep.channel(s.peer, transport, tag=2)
        if rank == 1:
            ep.barrier("done")
            _finish(ep, s.word)
            return results
        other = ln.Endpoint(0, 1, f"127.0.0.1:{free_port()}", group="dev-usage-other", timeout=10,
                            transports=("tcp",))
        foreign = other.alloc(64)
        closed_region = ep.alloc(64)
        closed_region.close()
        many_local = [ep.alloc(8) for _ in range(lnd.MAX_WINDOWS + 1)]

        def expect(name, fn):
            try:
                made = fn()
                results[name] = f"no error ({made!r})"
                if hasattr(made, "close"):
                    made.close()
            except ln.UsageError as e:
                results[name] = "ok: " + str(e)
            except Exception as e:  # the wrong type is a failure
                results[name] = f"wrong type {type(e).__name__}: {e}"

        L, R = [s.src, s.word], [s.rinbox, s.rsig]
        for slots in (0, 1, 3, 6, 1000, 1 << 25, -4, 2.0, "8", True):
            expect(f"ring_slots={slots!r}", lambda: s.ch.device(L, R, ring_slots=slots))
        expect("17 local windows", lambda: s.ch.device(many_local, R))
        expect("17 remote windows", lambda: s.ch.device(L, [s.rinbox] * (lnd.MAX_WINDOWS + 1)))
        expect("local window is a numpy array", lambda: s.ch.device([np.zeros(8, np.uint8)], R))
        expect("local window is a RemoteRegion", lambda: s.ch.device([s.rinbox], R))
        expect("local window is None", lambda: s.ch.device([None], R))
        expect("local window of another endpoint", lambda: s.ch.device([foreign], R))
        expect("local window closed", lambda: s.ch.device([closed_region], R))
        expect("remote window is a Region", lambda: s.ch.device(L, [s.inbox]))
        expect("remote window of my own rank", lambda: s.ch.device(L, [s.inbox.descriptor()]))
        expect("remote window of another group", lambda: s.ch.device(L, [foreign.descriptor()]))
        expect("remote window is bytes", lambda: s.ch.device(L, [s.rinbox.to_bytes()]))
        for t in (0, -1, "soon", float("inf"), float("nan")):
            expect(f"timeout={t!r}", lambda: s.ch.device(L, R, timeout=t))
        for sp in (-1, 1.5, "10"):
            expect(f"spin_us={sp!r}", lambda: s.ch.device(L, R, spin_us=sp))
        ch2.close()
        expect("closed channel", lambda: ch2.device(L, R))
        dev = s.ch.device(L, R)
        dev.close()
        expect("handle() of a closed device channel", dev.handle)
        expect("stats() of a closed device channel", dev.stats)
        # Still healthy after all that: a good one works.
        lib = producers.load(lib_path)
        with s.ch.device(L, R, ring_slots=4, timeout=5) as good:
            h = good.handle()
            results["good channel"] = [lib.ln_put(h, 0, 0, 0, 0, 8), lib.ln_flush(h), good.error]
        other.close()
        ep.barrier("done")
        _finish(ep, s.word)
        return results
