"""Rank bodies for the multi-process tests (importable by spawned children)."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

import lamina_net as ln


def publish_and_connect(ep, peer, transport, **regions):
    """Publishes each local Region under its keyword name, opens the channel
    to `peer`, and looks up the peer's regions of the same names.
    Returns (channel, [peer descriptors in keyword order])."""
    for name, region in regions.items():
        ep.publish(name, region)
    ch = ep.channel(peer, transport)
    return ch, [ep.lookup(peer, name) for name in regions]


def every_op(rank, world, store, transport, shared=False):
    """put, put+signal, iput, atomic add, send/recv, flush, both directions.

    shared: regions from Endpoint.alloc (on shm: direct memcpy and atomics, no frames).
    """
    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="every-op", timeout=20) as ep:
        if shared:
            rbuf, rsig = ep.alloc(1 << 16, np.uint8, ln.Access.REMOTE_WRITE), ep.alloc(4, np.uint64)
            buf, sig = rbuf.array, rsig.array
        else:
            buf = np.zeros(1 << 16, np.uint8)
            sig = np.zeros(4, np.uint64)
            rbuf, rsig = ep.register(buf, ln.Access.REMOTE_WRITE), ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ch, (pbuf, psig) = publish_and_connect(ep, peer, transport, buf=rbuf, sig=rsig)
        assert ch.transport == transport
        payload = (np.arange(1000, dtype=np.uint32) * (rank + 3)).view(np.uint8)
        ch.put(payload, pbuf, 100, signal=psig, signal_offset=0, signal_add=1)
        rsig.wait(0, 1, timeout=10, channel=ch)
        expected = (np.arange(1000, dtype=np.uint32) * (peer + 3)).view(np.uint8)
        assert np.array_equal(buf[100:4100], expected)
        h = ch.iput(payload[:16], pbuf, 8000)
        h.wait(10)
        assert h.done
        old = ch.atomic_add(psig, 8, 7)
        old2 = ch.atomic_add(psig, 8, 5)
        assert old2 == old + 7
        ch.send(np.array([rank, 42], np.int64))
        out = np.zeros(2, np.int64)
        n = ch.recv(out, timeout=10)
        assert n == 16 and out.tolist() == [peer, 42]
        ch.flush(timeout=10)
        ep.barrier("after")
        assert sig[1] == 12  # the peer added 7 and 5 here
        assert np.array_equal(buf[8000:8016], expected[:16])
        return int(sig[0])


def sizes_checksums(rank, world, store, transport, sizes, seed, shared=False):
    """Puts of many sizes at random offsets; the target checks a checksum per put.

    shared: the target region comes from Endpoint.alloc (direct-copy path on shm).
    """
    rng = np.random.default_rng(seed)
    peer = 1 - rank
    max_size = max(sizes)
    with ln.Endpoint(rank, world, store, group="sizes", timeout=60) as ep:
        region_bytes = max_size + 4096
        if shared:
            rt = ep.alloc(region_bytes)
            target = rt.array
        else:
            target = np.zeros(region_bytes, np.uint8)
            rt = ep.register(target)
        sig = np.zeros(1, np.uint64)
        rs = ep.register(sig)
        ch, (pt, ps) = publish_and_connect(ep, peer, transport, t=rt, s=rs)
        plan = [(size, int(rng.integers(0, region_bytes - size + 1))) for size in sizes]
        if rank == 0:
            src = np.empty(max_size, np.uint8)
            digests = []
            for i, (size, offset) in enumerate(plan):
                src[:size] = rng.integers(0, 256, size, dtype=np.uint8)
                digests.append(hashlib.sha256(src[:size].tobytes()).hexdigest())
                ch.put(src, pt, offset, nbytes=size, signal=ps)
                rs.wait(0, i + 1, timeout=60, channel=ch)  # the peer checked it
            ch.send(np.frombuffer("".join(digests).encode(), np.uint8))
            return len(plan)
        else:
            seen = []
            for i, (size, offset) in enumerate(plan):
                rs.wait(0, i + 1, timeout=60, channel=ch)
                seen.append(hashlib.sha256(target[offset:offset + size].tobytes()).hexdigest())
                ch.put(np.zeros(0, np.uint8), pt, 0, signal=ps)  # "checked": a signal with no data
            expected = np.zeros(64 * len(plan), np.uint8)
            ch.recv(expected, timeout=60)
            assert expected.tobytes().decode() == "".join(seen), "payload checksum mismatch"
            return len(plan)


def many_messages(rank, world, store, transport, count):
    """Interleaved send/recv and puts; nothing lost, duplicated or reordered."""
    peer = 1 - rank
    rng = np.random.default_rng(rank)
    with ln.Endpoint(rank, world, store, group="many", timeout=60) as ep:
        ring = np.zeros(count, np.uint64)
        sig = np.zeros(1, np.uint64)
        rr, rs = ep.register(ring), ep.register(sig)
        ch, (pring, psig) = publish_and_connect(ep, peer, transport, ring=rr, sig=rs)
        if rank == 0:
            for i in range(count):
                n = int(rng.integers(1, 300))
                msg = np.empty(n + 2, np.uint32)
                msg[0], msg[1] = i, n
                msg[2:] = np.arange(n, dtype=np.uint32) ^ i
                ch.send(msg)
                ch.put(np.array([i + 1], np.uint64), pring, 8 * i, signal=psig)
            ch.flush()
            ep.barrier("done")
            return count
        else:
            buf = np.empty(400, np.uint32)
            for i in range(count):
                nbytes = ch.recv(buf, timeout=30)
                seq, n = int(buf[0]), int(buf[1])
                assert seq == i, f"message {i} arrived as {seq}"
                assert nbytes == 4 * (n + 2)
                assert np.array_equal(buf[2:2 + n], np.arange(n, dtype=np.uint32) ^ i), f"message {i} corrupted"
            rs.wait(0, count, timeout=30)
            assert np.array_equal(ring, np.arange(1, count + 1, dtype=np.uint64))
            ep.barrier("done")
            return count


def timeouts(rank, world, store, transport):
    """Every blocking call is bounded and names what it waited for."""
    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="timeouts", timeout=20) as ep:
        sig = np.zeros(1, np.uint64)
        rs = ep.register(sig)
        ch = ep.channel(peer, transport)
        t0 = time.monotonic()
        errors = []
        try:
            ch.recv(np.zeros(8, np.uint8), timeout=0.3)
        except ln.TimeoutError as e:
            errors.append(str(e))
        try:
            rs.wait(0, 5, timeout=0.3, channel=ch)
        except ln.TimeoutError as e:
            errors.append(str(e))
        try:
            ep.lookup(peer, "never-published", timeout=0.3)
        except ln.TimeoutError as e:
            errors.append(str(e))
        elapsed = time.monotonic() - t0
        # The timed-out receive was withdrawn: waiting on it again fails at once,
        # and the next message goes to the next receive.
        h = ch.irecv(np.zeros(8, np.uint8))
        try:
            h.wait(0.2)
        except ln.TimeoutError:
            pass
        t1 = time.monotonic()
        try:
            h.wait(30)
            errors.append("no error on a withdrawn receive")
        except ln.TimeoutError as e:
            assert "withdrawn" in str(e) and time.monotonic() - t1 < 1.0, e
        ep.barrier("sync")
        ch.send(np.array([rank + 100], np.int64))
        got = np.zeros(1, np.int64)
        ch.recv(got, timeout=10)
        assert got[0] == peer + 100, got
        ep.barrier("end")
        return errors, elapsed


def peer_death(rank, world, store, transport, mode):
    """Rank 1 dies (os._exit) mid-stream; rank 0's operations fail within a bound."""
    peer = 1 - rank
    ep = ln.Endpoint(rank, world, store, group="death", timeout=30)
    big = np.zeros(8 << 20, np.uint8)
    sig = np.zeros(1, np.uint64)
    rb, rs = ep.register(big), ep.register(sig)
    ch, (pb, ps) = publish_and_connect(ep, peer, transport, b=rb, s=rs)
    ep.barrier("ready")
    if rank == 1:
        ch.send(np.zeros(4, np.uint8))
        time.sleep(0.2)
        os._exit(17)  # no close, no goodbye
    t0 = time.monotonic()
    outcome = "none"
    try:
        ch.recv(np.zeros(4, np.uint8), timeout=10)
        if mode == "wait":
            rs.wait(0, 1, timeout=20, channel=ch)
        elif mode == "recv":
            ch.recv(np.zeros(4, np.uint8), timeout=20)
        elif mode == "put":
            for _ in range(200):
                ch.put(big, pb, 0, signal=ps, timeout=20)
                time.sleep(0.01)
        outcome = "no error"
    except ln.TransportError as e:
        outcome = f"TransportError: {e}"
    except ln.TimeoutError as e:
        outcome = f"TimeoutError: {e}"
    elapsed = time.monotonic() - t0
    # Sticky: a later operation fails fast with a TransportError.
    later = "none"
    try:
        ch.send(np.zeros(1, np.uint8), timeout=5)
    except ln.TransportError as e:
        later = str(e)
    ep.close()
    return outcome, elapsed, later


def bad_inputs(rank, world, store, transport):
    """User mistakes raise UsageError and write nothing."""
    peer = 1 - rank
    results = {}
    with ln.Endpoint(rank, world, store, group="bad", timeout=20) as ep:
        buf = np.zeros(256, np.uint8)
        ro = np.zeros(64, np.uint8)
        sig = np.zeros(2, np.uint64)
        rb = ep.register(buf, ln.Access.REMOTE_WRITE)
        rro = ep.register(ro, ln.Access.LOCAL)
        rs = ep.register(sig, ln.Access.REMOTE_ATOMIC)
        ch, (pb, pro, ps) = publish_and_connect(ep, peer, transport, b=rb, ro=rro, s=rs)

        def expect(name, fn, exc=ln.UsageError):
            try:
                fn()
                results[name] = "no error"
            except exc as e:
                results[name] = "ok: " + str(e)
            except Exception as e:  # wrong type is a failure
                results[name] = f"wrong type {type(e).__name__}: {e}"

        data = np.arange(64, dtype=np.uint8)
        expect("out of range", lambda: ch.put(data, pb, 250))
        expect("huge offset", lambda: ch.put(data, pb, 2 ** 63))
        expect("negative offset", lambda: ch.put(data, pb, -1))
        expect("src slice", lambda: ch.put(data, pb, 0, src_offset=60, nbytes=10))
        expect("no write right", lambda: ch.put(data, pro, 0))
        expect("signal no atomic right", lambda: ch.put(data, pb, 0, signal=pb))
        expect("signal misaligned", lambda: ch.put(data, pb, 0, signal=ps, signal_offset=4))
        expect("atomic misaligned", lambda: ch.atomic_add(ps, 3, 1))
        expect("atomic out of range", lambda: ch.atomic_add(ps, 16, 1))
        expect("own descriptor", lambda: ch.put(data, rb.descriptor(), 0))
        expect("local region as target", lambda: ch.put(data, rb, 0))
        expect("non-contiguous", lambda: ch.send(np.zeros((8, 8), np.uint8)[:, ::2]))
        expect("object dtype", lambda: ch.send(np.array([object()])))
        expect("not an array", lambda: ch.send(12345))
        expect("readonly recv", lambda: ch.irecv(np.frombuffer(b"abcd", np.uint8)))
        expect("bad timeout", lambda: ch.recv(np.zeros(4, np.uint8), timeout=-1))
        expect("bad transport", lambda: ep.channel(peer, "carrier-pigeon"))
        expect("self channel", lambda: ep.channel(rank, "tcp"))
        expect("peer out of range", lambda: ep.channel(5, "tcp"))
        expect("bad descriptor bytes", lambda: ln.RemoteRegion.from_bytes(b"\x00" * 80))
        expect("short descriptor", lambda: ln.RemoteRegion.from_bytes(b"abc"))
        # A message bigger than the posted buffer fails that recv only.
        ep.barrier("before-big")
        ch.send(np.zeros(32, np.uint8))
        expect("recv too small", lambda: ch.recv(np.zeros(4, np.uint8), timeout=10))
        ep.barrier("mid")
        ch.send(np.full(4, 9, np.uint8))
        small = np.zeros(4, np.uint8)
        n = ch.recv(small, timeout=10)
        results["channel still works"] = "ok" if n == 4 and small.tolist() == [9] * 4 else f"bad {small}"
        ep.barrier("after")
        # Closed objects.
        rclosed = ep.register(np.zeros(8, np.uint64))
        rclosed.close()
        rclosed.close()  # idempotent
        expect("closed region wait", lambda: rclosed.wait(0, 1, timeout=0.1))
        ch.close()
        ch.close()
        expect("closed channel", lambda: ch.send(data))
        expect("closed channel put", lambda: ch.put(data[:8], pb, 0))
        results["nothing written"] = "ok" if not buf[64:].any() and not ro.any() and sig[1] == 0 else "written!"
    ep.close()
    expect("closed endpoint", lambda: ep.register(np.zeros(8)))
    return results


def ordering_mixed_paths(rank, world, store, transport, rounds):
    """A small put (ring) then a large put (direct/pull) to the same bytes: the later one wins."""
    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="order", timeout=30) as ep:
        target = ep.alloc(1 << 16)
        sig = ep.alloc(1, np.uint64)
        ch, (pt, ps) = publish_and_connect(ep, peer, transport, t=target, s=sig)
        if rank == 0:
            small = np.empty(1000, np.uint8)
            big = np.empty(1 << 16, np.uint8)
            for i in range(rounds):
                small.fill(2 * i % 251)
                big.fill((2 * i + 1) % 251)
                ch.put(small, pt, 0)
                ch.put(big, pt, 0, signal=ps)
                sig.wait(0, i + 1, timeout=30, channel=ch)  # the peer checked this round
            return rounds
        bad = 0
        for i in range(rounds):
            sig.wait(0, i + 1, timeout=30, channel=ch)
            if not (target.array == (2 * i + 1) % 251).all():
                bad += 1
            ch.put(np.zeros(0, np.uint8), pt, 0, signal=ps)
        assert bad == 0, f"{bad} rounds saw the earlier small put overwrite the later large one"
        return rounds


def cuda_put(rank, world, store, transport, nbytes):
    """GPU source -> remote GPU region over tcp/shm (host staging), signal in host memory."""
    import torch

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="cuda-put", timeout=30) as ep:
        target = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
        sig = np.zeros(1, np.uint64)
        ep.publish("t", ep.register(target))
        rs = ep.register(sig)
        ep.publish("s", rs)
        ch = ep.channel(peer, transport)
        pt, ps = ep.lookup(peer, "t"), ep.lookup(peer, "s")
        src = (torch.arange(nbytes, device="cuda") % 251).to(torch.uint8)
        if rank == 0:
            ch.put(src, pt, 0, signal=ps)
            ep.barrier("done")
            return True
        rs.wait(0, 1, timeout=30, channel=ch)
        ok = bool(torch.equal(target, src))
        ep.barrier("done")
        return ok



def put_many_batches(rank, world, store, transport, rounds, shared):
    """Batches of puts (Channel.put_many / iput_many): overlapping writes apply in
    order, frames and direct writes mixed in one batch, runs longer than one write,
    the last put's signal covering the batch, and a bad put that sends nothing.
    Returns the rounds whose target contents matched, byte for byte."""
    peer = 1 - rank
    size = 1 << 20
    with ln.Endpoint(rank, world, store, group="put-many", timeout=30) as ep:
        if shared:
            target = ep.alloc(size, np.uint8, ln.Access.REMOTE_WRITE)
        else:
            target = ep.register(np.zeros(size, np.uint8), ln.Access.REMOTE_WRITE)
        sig = ep.alloc(2, np.uint64)
        ch, (pt, ps) = publish_and_connect(ep, peer, transport, t=target, s=sig)
        if rank == 1:
            for r in range(rounds + 1):
                sig.wait(0, r + 1, timeout=30, channel=ch)
                ch.send(np.frombuffer(hashlib.sha256(target.array.tobytes()).digest(), np.uint8).copy())
            return rounds
        rng = np.random.default_rng(7)
        src = ep.alloc(size)  # sources in a registered region, as the zero-copy paths want
        expect = np.zeros(size, np.uint8)
        digest = np.zeros(32, np.uint8)
        matched = 0
        # (src offset, dst offset, bytes): a small put, a large one over it, a
        # small one inside that, one large enough for shm's direct write, a run
        # of 40 small ones (longer than one write), and an empty one.
        plan = [(0, 0, 1000), (1000, 0, 300000), (400000, 500, 10), (500000, 600000, 70000)]
        plan += [(700000 + 8 * k, 900000 + 8 * k, 8) for k in range(40)] + [(0, 2000, 0)]
        for r in range(rounds):
            src.array[:] = rng.integers(0, 256, size, dtype=np.uint8)
            puts = []
            for src_off, dst_off, n in plan:
                puts.append(ln.Put(src, pt, dst_off, src_offset=src_off, nbytes=n))
                expect[dst_off:dst_off + n] = src.array[src_off:src_off + n]
            puts[-1] = puts[-1]._replace(signal=ps)
            if r % 2:
                ch.iput_many(puts).wait(30)
            else:
                ch.put_many(puts)
            ch.recv(digest, timeout=30)
            matched += digest.tobytes() == hashlib.sha256(expect.tobytes()).digest()
        # A bad put in the middle: nothing of the batch is posted.
        marker = np.full(16, 0xAB, np.uint8)
        try:
            ch.put_many([ln.Put(marker, pt, 950000), ln.Put(marker, pt, size - 8), ln.Put(marker, pt, 0, signal=ps)])
            raise AssertionError("a put outside the target region was not refused")
        except ln.UsageError as e:
            assert "put 1 of the batch" in str(e), str(e)
        for wrong in (ln.Put(marker, pt, 0), [object()]):
            try:
                ch.put_many(wrong)
                raise AssertionError(f"put_many({wrong!r}) did not raise")
            except ln.UsageError:
                pass
        # Checks made in Python name the put too: a bad field, a tuple of the wrong length.
        for wrong in ([ln.Put(marker, pt, 0), ln.Put(marker, "not a region", 0)],
                      [ln.Put(marker, pt), (marker,) * 9]):
            try:
                ch.put_many(wrong)
                raise AssertionError(f"put_many({wrong!r}) did not raise")
            except ln.UsageError as e:
                assert "put 1 of the batch" in str(e), str(e)
        ch.put_many([])
        ch.iput_many([]).wait(5)
        ch.put_many([(marker, pt, 960000, 0, 8, ps)])  # a plain tuple of Put's fields
        expect[960000:960008] = 0xAB
        ch.recv(digest, timeout=30)
        matched += digest.tobytes() == hashlib.sha256(expect.tobytes()).digest()
        return matched
