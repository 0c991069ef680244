"""Rank harness and rank bodies for the verbs tests (importable by spawned children).

Every body takes (rank, world, store, *args) and runs in its own process, so
each rank has its own lamina-net endpoint, QPs and memory registrations.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

import numpy as np

import lamina_net as ln

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _workers  # noqa: E402  (tests/: shared rank bodies)
from harness import assert_all_ok, free_port  # noqa: E402,F401
from harness import run_ranks as _run_ranks  # noqa: E402

VERBS = "verbs"


def verbs_skip_reason() -> str | None:
    """None when an RDMA device is usable here, else why the verbs tests skip."""
    ok, why = ln._core.verbs_available()
    if ok:
        return None
    return f"no usable RDMA device ({why}); run scripts/softroce/test.sh to test verbs in a Soft-RoCE guest"


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 180.0, may_die=()) -> dict:
    """Runs fn(rank, world, store, *args) in spawned processes; {rank: value} once all succeeded."""
    return assert_all_ok(_run_ranks(fn, world, args, timeout, expect_dead=may_die))


def endpoint(rank, world, store, group, timeout=30.0) -> ln.Endpoint:
    return ln.Endpoint(rank, world, store, group=group, timeout=timeout, transports=("verbs",))


def digest(array) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


def target_and_signal(ep, peer, target):
    """Registers `target` (remote write) and a u64 signal word (remote
    atomic), publishes both and opens the verbs channel; returns the local
    regions, the channel and the peer's two descriptors."""
    sig = np.zeros(1, np.uint64)
    rt, rs = ep.register(target, ln.Access.REMOTE_WRITE), ep.register(sig, ln.Access.REMOTE_ATOMIC)
    ch, (pt, ps) = _workers.publish_and_connect(ep, peer, VERBS, t=rt, s=rs)
    return rt, rs, ch, pt, ps


# --------------------------------------------------------------------------- bodies


def bad_inputs(rank, world, store):
    """The tier-0 bad-input body over verbs, where a small put takes the
    transport's fast path: it must refuse what the full checks refuse."""
    return _workers.bad_inputs(rank, world, store, VERBS)


def every_operation(rank, world, store):
    """put, put+signal, iput, atomic add, send/recv, flush; both directions (the tier-0 body, over verbs)."""
    return _workers.every_op(rank, world, store, VERBS)


def put_sizes(rank, world, store, sizes, seed):
    """Puts (with a signal each) of every size at random offsets, from registered
    and from unregistered memory, both directions; the target checks digests."""
    peer = 1 - rank
    rng = np.random.default_rng(seed + rank)
    max_size = max(sizes)
    with endpoint(rank, world, store, "put-sizes", timeout=60) as ep:
        target = np.zeros(max_size + 8192, np.uint8)
        sig = np.zeros(1, np.uint64)
        source = np.zeros(max_size + 8192, np.uint8)
        rt, rs = ep.register(target, ln.Access.REMOTE_WRITE), ep.register(sig, ln.Access.REMOTE_ATOMIC)
        rsrc = ep.register(source, ln.Access.LOCAL)
        ch, (pt, ps) = _workers.publish_and_connect(ep, peer, VERBS, t=rt, s=rs)
        count = 0
        for size in sizes:
            for registered in (True, False):
                # I send, then I check what the peer sent me (same plan on both sides).
                dst_off = int(rng.integers(0, target.size - size + 1))
                if registered:
                    src_off = int(rng.integers(0, 4096))
                    source[src_off:src_off + size] = rng.integers(0, 256, size, dtype=np.uint8)
                    ch.put(rsrc, pt, dst_off, src_offset=src_off, nbytes=size, signal=ps)
                    sent = digest(source[src_off:src_off + size])
                else:
                    data = rng.integers(0, 256, size, dtype=np.uint8)
                    ch.put(data, pt, dst_off, signal=ps)
                    sent = digest(data)
                ch.send(np.frombuffer(f"{dst_off}:{size}:{sent}".encode(), np.uint8))
                count += 1
                rs.wait(0, count, timeout=60, channel=ch)
                note = np.zeros(256, np.uint8)
                n = ch.recv(note, timeout=60)
                off, length, expected = bytes(note[:n]).decode().split(":")
                got = digest(target[int(off):int(off) + int(length)])
                assert got == expected, f"put of {length} bytes at {off} (registered={registered}) corrupted"
                ep.barrier(f"{size}-{registered}")  # the target area is reused by the next put
        return count


def staged_put_burst(rank, world, store, count, size):
    """`count` back-to-back puts of `size` bytes (inlined, or above the
    inline limit copied through the staging slots) from one buffer that is
    rewritten between puts, no wait in between, then one signal. The staging
    pool is much smaller than `count` and most of those puts are posted
    unsignaled, so its slots must come back in batches; each put must carry
    what the source held when it was posted."""
    peer = 1 - rank
    with endpoint(rank, world, store, "staged-burst", timeout=60) as ep:
        target = np.zeros(count * size, np.uint8)
        _, rs, ch, pt, ps = target_and_signal(ep, peer, target)
        source = np.zeros(size, np.uint8)
        rng = np.random.default_rng(rank)
        sent = np.empty((count, size), np.uint8)
        for i in range(count):
            source[:] = rng.integers(0, 256, size, dtype=np.uint8)
            sent[i] = source
            ch.put(source, pt, i * size)
        ch.put(source[:0], pt, 0, signal=ps)
        rs.wait(0, 1, timeout=60, channel=ch)
        ep.barrier("received")
        expected = np.empty((count, size), np.uint8)
        peer_rng = np.random.default_rng(peer)
        for i in range(count):
            expected[i] = peer_rng.integers(0, 256, size, dtype=np.uint8)
        assert np.array_equal(target.reshape(count, size), expected), "a staged put lost or mixed up its bytes"
        return count


def large_iputs_in_flight(rank, world, store, count, size):
    """`count` iputs of `size` bytes (zero-copy: registered source, above one
    chunk) posted back to back with their handles outstanding, then waited;
    the target checks every byte."""
    peer = 1 - rank
    with endpoint(rank, world, store, "large-iputs", timeout=60) as ep:
        target = np.zeros(count * size, np.uint8)
        rt = ep.register(target, ln.Access.REMOTE_WRITE)
        ep.publish("t", rt)
        ch = ep.channel(peer, VERBS)
        pt = ep.lookup(peer, "t")
        source = np.random.default_rng(rank).integers(0, 256, count * size, dtype=np.uint8)
        rsrc = ep.register(source, ln.Access.LOCAL)
        handles = [ch.iput(rsrc, pt, i * size, src_offset=i * size, nbytes=size) for i in range(count)]
        for h in handles:
            h.wait(60)
        ep.barrier("written")
        expected = np.random.default_rng(peer).integers(0, 256, count * size, dtype=np.uint8)
        assert digest(target) == digest(expected), "a zero-copy iput corrupted its bytes"
        return count


def registered_source_reuse(rank, world, store, sizes, rounds, stage_max):
    """Blocking puts from one registered source that is overwritten the
    moment each put returns, at sizes around LAMINA_NET_IB_STAGE_MAX (inlined,
    staged, zero-copy) and the chunk: a put must not return before the source
    bytes are copied out or read by the NIC. The target checks every slot."""
    os.environ["LAMINA_NET_IB_STAGE_MAX"] = str(stage_max)
    peer = 1 - rank
    slot = max(sizes)
    with endpoint(rank, world, store, f"reuse-{stage_max}", timeout=60) as ep:
        target = np.zeros(len(sizes) * rounds * slot, np.uint8)
        _, rs, ch, pt, ps = target_and_signal(ep, peer, target)
        source = np.zeros(slot, np.uint8)
        rsrc = ep.register(source, ln.Access.LOCAL)
        rng = np.random.default_rng(100 + rank)
        index = 0
        for size in sizes:
            for _ in range(rounds):
                source[:size] = rng.integers(0, 256, size, dtype=np.uint8)
                ch.put(rsrc, pt, index * slot, nbytes=size)
                source[:size] ^= 0xFF  # the put has returned: the source is ours again
                index += 1
        ch.put(source[:0], pt, 0, signal=ps)
        rs.wait(0, 1, timeout=60, channel=ch)
        ep.barrier("received")
        peer_rng = np.random.default_rng(100 + peer)
        index = 0
        for size in sizes:
            for r in range(rounds):
                expected = peer_rng.integers(0, 256, size, dtype=np.uint8)
                got = target[index * slot:index * slot + size]
                assert np.array_equal(got, expected), f"put {r} of {size} bytes (stage max {stage_max}) corrupted"
                index += 1
        return index


def puts_while_sending(rank, world, store, messages, message_bytes, puts):
    """Rank 0 sends multi-fragment messages from one thread while another
    thread streams small puts (the one-lock fast path) to rank 1, then
    signals: the messages arrive whole and in order, every put lands."""
    import threading

    peer = 1 - rank
    with endpoint(rank, world, store, "puts-while-sending", timeout=60) as ep:
        target = np.zeros(puts * 64, np.uint8)
        _, rs, ch, pt, ps = target_and_signal(ep, peer, target)
        if rank == 0:
            errors = []

            def stream_puts():
                try:
                    for i in range(puts):
                        size = 8 + (i * 37) % 57
                        ch.put(np.full(size, i % 251, np.uint8), pt, i * 64)
                    ch.put(target[:0], pt, 0, signal=ps)
                except BaseException as e:  # reported by the main thread
                    errors.append(e)

            putter = threading.Thread(target=stream_puts)
            putter.start()
            for m in range(messages):
                ch.send(np.random.default_rng(m).integers(0, 256, message_bytes, dtype=np.uint8))
            putter.join(120)
            assert not putter.is_alive() and not errors, errors
            ep.barrier("checked")
            return messages
        buf = np.zeros(message_bytes, np.uint8)
        for m in range(messages):
            n = ch.recv(buf, timeout=60)
            expected = np.random.default_rng(m).integers(0, 256, message_bytes, dtype=np.uint8)
            assert n == message_bytes and np.array_equal(buf, expected), f"message {m} corrupted or reordered"
        rs.wait(0, 1, timeout=60, channel=ch)
        for i in range(puts):
            size = 8 + (i * 37) % 57
            assert (target[i * 64:i * 64 + size] == i % 251).all(), f"put {i} lost"
        ep.barrier("checked")
        return messages


def send_sizes(rank, world, store, sizes, seed):
    """Messages of every size with random content, both directions at once."""
    peer = 1 - rank
    with endpoint(rank, world, store, "send-sizes", timeout=60) as ep:
        ch = ep.channel(peer, VERBS)
        rng_out = np.random.default_rng(seed * 10 + rank)
        rng_in = np.random.default_rng(seed * 10 + peer)
        for size in sizes:
            out = rng_out.integers(0, 256, size, dtype=np.uint8)
            h = ch.isend(out)
            expected = rng_in.integers(0, 256, size, dtype=np.uint8)
            got = np.full(size + 16, 0xEE, np.uint8)
            n = ch.recv(got, timeout=60)
            h.wait(60)
            assert n == size, f"message of {size} bytes arrived as {n}"
            assert digest(got[:n]) == digest(expected), f"message of {size} bytes corrupted"
            assert (got[n:] == 0xEE).all(), "bytes beyond the message were written"
        return len(sizes)


def many_messages(rank, world, store, count):
    """Streams of numbered messages both ways (sent before anyone receives) and
    many put+signals: nothing lost, duplicated or reordered."""
    peer = 1 - rank
    with endpoint(rank, world, store, "many", timeout=60) as ep:
        slots = np.zeros(count, np.uint64)
        _, rsig, ch, pslots, psig = target_and_signal(ep, peer, slots)
        rng = np.random.default_rng(rank)
        lengths = rng.integers(8, 300, count)
        for i in range(count):  # all sent before the peer receives: buffered on its side
            msg = np.full(int(lengths[i]), i % 251, np.uint8)
            msg[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
            ch.send(msg)
        peer_lengths = np.random.default_rng(peer).integers(8, 300, count)
        buf = np.zeros(512, np.uint8)
        for i in range(count):
            n = ch.recv(buf, timeout=60)
            seq = int(buf[:8].view(np.uint64)[0])
            assert seq == i, f"message {i} arrived as {seq} (lost, duplicated or reordered)"
            assert n == peer_lengths[i] and (buf[8:n] == i % 251).all()
        for i in range(count):
            ch.put(np.array([i + 1], np.uint64), pslots, 8 * i, signal=psig)
        rsig.wait(0, count, timeout=60, channel=ch)
        assert rsig.read_u64(0) == count
        assert (slots == np.arange(1, count + 1, dtype=np.uint64)).all()
        ep.barrier("done")
        return count


def taken_over_after_driving(rank, world, store, messages, away_s):
    """Rank 0 spins in a wait (driving its connection) until rank 1 signals,
    then leaves for `away_s` without calling into lamina-net. Rank 1 then
    sends more messages than rank 0 has receive credits: they go through only
    if rank 0's progress thread takes over (buffers them and returns the
    credits) while its user thread is away. Rank 1 returns how long the
    sends took; rank 0 checks every message."""
    peer = 1 - rank
    with endpoint(rank, world, store, "takeover", timeout=60) as ep:
        word = np.zeros(1, np.uint64)
        _, rs, ch, pt, ps = target_and_signal(ep, peer, word)
        if rank == 0:
            rs.wait(0, 1, timeout=30, channel=ch)
            time.sleep(away_s)
            ep.barrier("back")
            buf = np.zeros(1024, np.uint8)
            for i in range(messages):
                n = ch.recv(buf, timeout=30)
                assert n == 1024 and (buf == i % 251).all(), f"message {i} lost or reordered"
            return messages
        time.sleep(3.0)  # long enough for rank 0's progress thread to back off to its longest look
        ch.put(word[:0], pt, 0, signal=ps)
        t0 = time.monotonic()
        for i in range(messages):
            ch.send(np.full(1024, i % 251, np.uint8), timeout=30)
        elapsed = time.monotonic() - t0
        ep.barrier("back")
        return elapsed


def many_producers_one_word(rank, world, store, adds):
    """Ranks 1.. put data and signal one word at rank 0, and fetch-and-add
    another: every add lands once and every old value is distinct."""
    with endpoint(rank, world, store, "producers", timeout=60) as ep:
        if rank == 0:
            words = np.zeros(2, np.uint64)
            data = np.zeros((world, adds), np.uint64)
            rw, rd = ep.register(words, ln.Access.REMOTE_ATOMIC), ep.register(data, ln.Access.REMOTE_WRITE)
            ep.publish("words", rw)
            ep.publish("data", rd)
            channels = [ep.channel(r, VERBS) for r in range(1, world)]
            rw.wait(0, (world - 1) * adds, timeout=120)
            for r in range(1, world):  # the signal never overtakes the data
                assert (data[r] == np.arange(1, adds + 1, dtype=np.uint64)).all()
            ep.barrier("done", timeout=120)
            assert int(words[1]) == (world - 1) * adds * 3
            del channels
            return int(words[0])
        ch = ep.channel(0, VERBS)
        pw, pd = ep.lookup(0, "words"), ep.lookup(0, "data")
        olds = []
        for i in range(adds):
            ch.put(np.array([i + 1], np.uint64), pd, (rank * adds + i) * 8, signal=pw, signal_offset=0)
            olds.append(ch.atomic_add(pw, 8, 3))
        ep.barrier("done", timeout=120)
        return olds


def flush_makes_visible(rank, world, store, count):
    """Many iputs not waited for, then flush: all applied at the target."""
    with endpoint(rank, world, store, "flush", timeout=60) as ep:
        target = np.zeros(count * 1024, np.uint8)
        rt = ep.register(target, ln.Access.REMOTE_WRITE)
        ep.publish("t", rt)
        ch = ep.channel(1 - rank, VERBS)
        if rank == 0:
            pt = ep.lookup(1, "t")
            src = np.arange(count * 1024, dtype=np.uint32).astype(np.uint8)
            handles = [ch.iput(src[i * 1024:(i + 1) * 1024], pt, i * 1024) for i in range(count)]
            ch.flush(timeout=60)
            assert all(h.done for h in handles)
            ch.send(np.frombuffer(digest(src).encode(), np.uint8))
            ep.barrier("checked")
            return True
        note = np.zeros(64, np.uint8)
        n = ch.recv(note, timeout=60)
        assert digest(target) == bytes(note[:n]).decode()
        ep.barrier("checked")
        return True


def timeouts(rank, world, store):
    """Bounded waits: recv, signal wait and a back-pressured send time out with
    TimeoutError near their bound; the channel stays usable afterwards."""
    # A small unexpected-message buffer, so back-pressure comes after a few messages.
    os.environ["LAMINA_NET_MAX_UNEXPECTED_BYTES"] = "16384"
    with endpoint(rank, world, store, "timeouts", timeout=60) as ep:
        sig = np.zeros(1, np.uint64)
        rsig = ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ch = ep.channel(1 - rank, VERBS)
        out = {}
        if rank == 0:
            t0 = time.monotonic()
            stale = np.zeros(8, np.uint8)  # withdrawn when its wait times out
            try:
                ch.recv(stale, timeout=0.5)
                raise AssertionError("recv returned without a message")
            except ln.TimeoutError as e:
                out["recv"] = (time.monotonic() - t0, str(e))
            t0 = time.monotonic()
            try:
                rsig.wait(0, 1, timeout=0.5, channel=ch)
                raise AssertionError("wait returned without a signal")
            except ln.TimeoutError as e:
                out["wait"] = (time.monotonic() - t0, str(e))
            ep.barrier("recv-timeouts-done")
            # Back-pressure: rank 1 does not receive; its buffer (16 KiB) fills.
            t0 = time.monotonic()
            sent = 0
            try:
                for sent in range(100000):
                    ch.send(np.zeros(1024, np.uint8), timeout=1.0)
            except ln.TimeoutError as e:
                out["send"] = (time.monotonic() - t0, str(e), sent)
            assert ch.failed() is None, ch.failed()
            ep.barrier("send-timed-out")
            ep.barrier("drained", timeout=60)
            ch.send(np.array([77], np.uint64))
        else:
            ep.barrier("recv-timeouts-done")
            ep.barrier("send-timed-out", timeout=60)
            # Drain: the timed-out message was never sent (single fragment).
            buf = np.zeros(1024, np.uint8)
            drained = 0
            while True:
                h = ch.irecv(buf)
                try:
                    h.wait(0.5)
                    drained += 1
                except ln.TimeoutError:
                    break
            ep.barrier("drained")
            # The loop's last receive timed out and was withdrawn: a new one gets the final message.
            n = ch.recv(buf, timeout=20)
            assert n == 8 and buf[:8].view(np.uint64)[0] == 77
            out["drained"] = drained
        ep.barrier("end")
        return out


def peer_death(rank, world, store, mode):
    """Rank 1 is killed (SIGKILL) mid-run; rank 0 must fail, not hang."""
    with endpoint(rank, world, store, "death", timeout=120) as ep:
        target = np.zeros(1 << 20, np.uint8)
        rt = ep.register(target, ln.Access.REMOTE_WRITE)
        ep.publish("t", rt)
        ch = ep.channel(1 - rank, VERBS)
        pt = ep.lookup(1 - rank, "t")
        ch.send(np.zeros(8, np.uint8))
        ch.recv(np.zeros(8, np.uint8), timeout=60)
        if rank == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        try:
            if mode == "recv":
                ch.recv(np.zeros(8, np.uint8), timeout=100)
            else:
                src = np.ones(1 << 16, np.uint8)
                for _ in range(100000):
                    ch.put(src, pt, 0, timeout=100)
                    time.sleep(0.01)
            raise AssertionError("the operation completed although the peer is dead")
        except ln.TransportError as e:
            return time.monotonic() - t0, str(e), ch.failed()


def remote_access_errors(rank, world, store, case):
    """The NIC enforces the capability: a stale descriptor (region closed by its
    owner) or a forged one (bigger size, added rights) gives a remote access
    error: a TransportError on that channel, sticky; another channel (tag 1)
    to the same peer is unaffected."""
    with endpoint(rank, world, store, "access", timeout=60) as ep:
        target = np.zeros(4096, np.uint8)
        sig = np.zeros(1, np.uint64)
        rt = ep.register(target, ln.Access.REMOTE_WRITE)
        rsig = ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ep.publish("t", rt)
        ep.publish("s", rsig)
        bad_ch = ep.channel(1 - rank, VERBS, tag=0)
        good_ch = ep.channel(1 - rank, VERBS, tag=1)
        if rank == 1:
            if case == "stale":
                ep.barrier("published")
                rt.close()  # deregisters: the rkey the peer holds is now invalid
                ep.barrier("closed")
            else:
                ep.barrier("published")
                ep.barrier("closed")
            ep.barrier("checked", timeout=60)
            rsig.wait(0, 1, timeout=30, channel=good_ch)
            return int(sig[0])
        ep.barrier("published")
        pt, ps = ep.lookup(1, "t"), ep.lookup(1, "s")
        ep.barrier("closed")
        raw = bytearray(pt.to_bytes())
        if case == "bigger":
            raw[40:48] = (1 << 20).to_bytes(8, "little")  # claims 1 MiB; the MR has 4 KiB
            forged, offset, nbytes = ln.RemoteRegion.from_bytes(bytes(raw)), 512 << 10, 1024
        elif case == "rights":
            raw[12:16] = int(ln.Access.ALL).to_bytes(4, "little")  # claims REMOTE_ATOMIC
            forged, offset, nbytes = ln.RemoteRegion.from_bytes(bytes(raw)), 0, 0
        else:
            forged, offset, nbytes = pt, 0, 1024
        t0 = time.monotonic()
        try:
            if case == "rights":
                bad_ch.atomic_add(forged, 0, 1, timeout=30)
            else:
                bad_ch.put(np.ones(nbytes, np.uint8), forged, offset)
                bad_ch.flush(timeout=30)
            raise AssertionError("the NIC accepted an access outside the registration")
        except ln.TransportError as e:
            first = str(e)
        elapsed = time.monotonic() - t0
        try:
            bad_ch.put(np.ones(8, np.uint8), pt, 0)
            bad_ch.flush(timeout=10)
            raise AssertionError("the failed channel accepted another operation")
        except ln.TransportError as e:
            sticky = str(e)
        assert good_ch.atomic_add(ps, 0, 1, timeout=30) == 0  # the other QP to that peer still works
        ep.barrier("checked")
        return elapsed, first, sticky


def message_too_long(rank, world, store):
    """A message longer than the receive buffer fails that receive (UsageError)
    and is dropped; the channel goes on."""
    with endpoint(rank, world, store, "too-long", timeout=30) as ep:
        ch = ep.channel(1 - rank, VERBS)
        if rank == 0:
            ch.send(np.arange(100, dtype=np.uint8))
            ch.send(np.arange(5, dtype=np.uint8))
            ep.barrier("done")
            return None
        small = np.zeros(10, np.uint8)
        try:
            ch.recv(small, timeout=20)
            raise AssertionError("a 100-byte message fit a 10-byte buffer")
        except ln.UsageError as e:
            error = str(e)
        n = ch.recv(small, timeout=20)
        assert n == 5 and small[:5].tolist() == [0, 1, 2, 3, 4]
        assert ch.failed() is None
        ep.barrier("done")
        return error


def many_qps(rank, world, store, tags):
    """Every pair of ranks, several channels (QPs) per pair, all used at once."""
    with endpoint(rank, world, store, "many-qps", timeout=120) as ep:
        peers = [r for r in range(world) if r != rank]
        target = np.zeros((world, tags, 256), np.uint8)
        sig = np.zeros(1, np.uint64)
        rt, rs = ep.register(target, ln.Access.REMOTE_WRITE), ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ep.publish("t", rt)
        ep.publish("s", rs)
        channels = {(p, t): ep.channel(p, VERBS, tag=t) for p in peers for t in range(tags)}
        for (p, t), ch in channels.items():
            pt, ps = ep.lookup(p, "t"), ep.lookup(p, "s")
            data = np.full(256, (rank * 16 + t) % 256, np.uint8)
            ch.put(data, pt, (rank * tags + t) * 256, signal=ps)
            ch.isend(np.array([rank, t], np.int32))
        for (p, t), ch in channels.items():
            got = np.zeros(2, np.int32)
            assert ch.recv(got, timeout=60) == 8 and got.tolist() == [p, t]
        rs.wait(0, len(channels), timeout=60)
        for p in peers:
            for t in range(tags):
                assert (target[p, t] == (p * 16 + t) % 256).all()
        ep.barrier("done", timeout=120)
        return len(channels)


def close_is_seen(rank, world, store):
    """A message sent right before close() is still delivered; then the peer's
    next receive fails promptly with 'closed' instead of waiting for its bound."""
    with endpoint(rank, world, store, "close", timeout=60) as ep:
        ch = ep.channel(1 - rank, VERBS)
        if rank == 0:
            ch.send(np.array([123], np.uint64))
            ch.close()
            ch.close()  # idempotent
            ep.barrier("done")
            return None
        got = np.zeros(1, np.uint64)
        time.sleep(1.0)  # the close happens while nobody here is receiving
        assert ch.recv(got, timeout=20) == 8 and got[0] == 123
        t0 = time.monotonic()
        try:
            ch.recv(got, timeout=50)
            raise AssertionError("recv succeeded on a connection the peer closed")
        except ln.TransportError as e:
            elapsed, error = time.monotonic() - t0, str(e)
        ep.barrier("done")
        return elapsed, error
