"""Rank bodies and kernels of the GPU device-API tests (tests/test_gpu_device.py).

Kernels are cupy RawModules compiled at run time by NVRTC against
``lamina_net.get_include()`` - the way a user's kernel is built - so these
tests also prove that the header compiles under NVRTC. Signal words and host
inboxes are pinned host memory (``cupyx.empty_pinned``): the transports write
them with the CPU, the kernels read them over PCIe.
Importable without cupy (the kernel sources are checked by NVRTC alone).
"""
from __future__ import annotations

import os
import time

import numpy as np

import lamina_net as ln

KERNELS = r"""
#include <lamina_net/device.cuh>

__device__ __forceinline__ unsigned char pattern(unsigned long long i, unsigned long long seed) {
  return (unsigned char)((i * 131ull + seed * 7ull + (i >> 8)) & 0xffull);
}

// Fills src[0, n) and put_signals it (remote 0 <- local 0, signal remote 1 += 1),
// then waits until local word 1 (the peer's ack) reaches ack.
extern "C" __global__ void put_then_wait_ack(lamina::DeviceChannel ch, unsigned char* src, unsigned long long n,
                                             unsigned long long seed, unsigned long long ack, int* status) {
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) src[i] = pattern(i, seed);
  int s = ch.put_signal_block(0, 0, 0, 0, n, 1, 0, 1);
  if (threadIdx.x == 0) status[0] = s;
  if (s != lamina::kDeviceOk) return;
  s = ch.wait_block(1, 0, ack);
  if (threadIdx.x == 0) status[1] = s;
}

// Waits until local word 0 reaches value, counts wrong bytes of the inbox
// (local window 1, host or GPU memory), then signals remote 0 += 1.
extern "C" __global__ void wait_check_ack(lamina::DeviceChannel ch, unsigned long long n, unsigned long long seed,
                                          unsigned long long value, int* status, unsigned long long* bad) {
  int s = ch.wait_block(0, 0, value);
  if (threadIdx.x == 0) status[0] = s;
  if (s != lamina::kDeviceOk) return;
  const volatile unsigned char* inbox = (const volatile unsigned char*)ch.local[1].base;
  unsigned long long mine = 0;
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) mine += inbox[i] != pattern(i, seed);
  atomicAdd(bad, mine);
  s = ch.signal_block(0, 0, 1);
  if (threadIdx.x == 0) status[1] = s;
}

// One thread waits on local word 0 for value; records status and how long it took.
extern "C" __global__ void wait_once(lamina::DeviceChannel ch, unsigned long long value, int* status,
                                     unsigned long long* elapsed_ns) {
  unsigned long long t0, t1;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  status[0] = ch.wait(0, 0, value);
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
  elapsed_ns[0] = t1 - t0;
}

// Graph bodies: a reset of a pinned word, a fill, a check (counters in device memory).
extern "C" __global__ void reset_word(unsigned long long* word) {
  *(volatile unsigned long long*)word = 0;
  __threadfence_system();
}
extern "C" __global__ void fill_round(unsigned char* src, unsigned long long n, unsigned long long* round) {
  const unsigned long long r = *round;
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) src[i] = pattern(i, r);
  __syncthreads();
  if (threadIdx.x == 0) *round = r + 1;
}
extern "C" __global__ void check_round(const unsigned char* inbox, unsigned long long n, unsigned long long* round,
                                       unsigned long long* bad) {
  const unsigned long long r = *round;
  const volatile unsigned char* in = (const volatile unsigned char*)inbox;
  unsigned long long mine = 0;
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) mine += in[i] != pattern(i, r);
  atomicAdd(bad, mine);
  __syncthreads();
  if (threadIdx.x == 0) *round = r + 1;
}

// Spins (bounded by its own clock) until a pinned host flag is set: a
// producer kernel that is still running.
extern "C" __global__ void spin_until(const unsigned long long* flag, unsigned long long bound_ns, int* timed_out) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  for (;;) {
    if (*(const volatile unsigned long long*)flag != 0) { *timed_out = 0; return; }
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    if (t - t0 > bound_ns) { *timed_out = 1; return; }
    __nanosleep(1000);
  }
}
// Sleeps about ns on the GPU (globaltimer), then fills dst with value.
extern "C" __global__ void sleep_then_fill(unsigned char* dst, unsigned long long n, unsigned char value,
                                           unsigned long long ns) {
  if (threadIdx.x == 0) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { __nanosleep(10000); asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
  }
  __syncthreads();
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = value;
}
"""

_module = None


def module():
    """The compiled KERNELS (one RawModule per process)."""
    global _module
    if _module is None:
        import cupy

        _module = cupy.RawModule(code=KERNELS, options=("-std=c++17", f"-I{ln.get_include()}"))
    return _module


def kernel(name):
    return module().get_function(name)


def pattern(n: int, seed: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    return ((i * np.uint64(131) + np.uint64(seed * 7) + (i >> np.uint64(8))) & np.uint64(0xFF)).astype(np.uint8)


def pinned(n: int, dtype=np.uint8) -> np.ndarray:
    import cupyx

    a = cupyx.empty_pinned((n,), dtype=dtype)
    a[:] = 0
    return a


# --------------------------------------------------------------------------- kernels through the proxy

def kernel_put_signal_sizes(rank, world, store, transport, sizes, target):
    """Rank 0's kernel put_signals each size into rank 1's inbox (pinned host or GPU memory); rank 1's
    kernel waits on the signal, checks every byte and acks; rank 0's kernel waits for the ack."""
    import cupy

    peer = 1 - rank
    top = max(sizes)
    with ln.Endpoint(rank, world, store, group="gpu-sizes", timeout=30) as ep:
        word = pinned(1, np.uint64)
        rword = ep.register(word)
        ep.publish("word", rword)
        if rank == 0:
            src = cupy.zeros(top, dtype=cupy.uint8)
            ch = ep.channel(peer, transport)
            dev = ch.device(local=[ep.register(src), rword], remote=[ep.lookup(peer, "inbox"),
                                                                     ep.lookup(peer, "word")], gpu=True)
            statuses = []
            for k, n in enumerate(sizes):
                status = cupy.full(2, -1, dtype=cupy.int32)
                kernel("put_then_wait_ack")((1,), (256,), (dev.kernel_arg(), src, np.uint64(n), np.uint64(k),
                                                            np.uint64(k + 1), status))
                cupy.cuda.Device().synchronize()
                statuses.append(status.get().tolist())
            ep.barrier("done")
            return {"statuses": statuses, "error": dev.error, "executed": dev.stats()["executed"]}
        inbox = pinned(top) if target == "host" else cupy.zeros(top, dtype=cupy.uint8)
        rinbox = ep.register(inbox)
        ep.publish("inbox", rinbox)
        ch = ep.channel(peer, transport)
        dev = ch.device(local=[rword, rinbox], remote=[ep.lookup(peer, "word")], gpu=True)
        results = []
        for k, n in enumerate(sizes):
            status = cupy.full(2, -1, dtype=cupy.int32)
            bad = cupy.zeros(1, dtype=cupy.uint64)
            kernel("wait_check_ack")((1,), (256,), (dev.kernel_arg(), np.uint64(n), np.uint64(k), np.uint64(k + 1),
                                                     status, bad))
            cupy.cuda.Device().synchronize()
            results.append((status.get().tolist(), int(bad.get()[0])))
        ep.barrier("done")
        return {"results": results, "error": dev.error}


def kernel_wait_for_host_signal(rank, world, store, transport, value):
    """Rank 1's kernel waits on its pinned word; rank 0 signals it from the host API, `value` times."""
    import cupy

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="gpu-wait", timeout=30) as ep:
        word = pinned(1, np.uint64)
        rword = ep.register(word)
        ep.publish("word", rword)
        ch = ep.channel(peer, transport)
        if rank == 0:
            remote = ep.lookup(peer, "word")
            ep.barrier("kernel-running")
            for _ in range(value):
                ch.signal(remote)
            ch.flush()
            ep.barrier("done")
            return True
        dev = ch.device(local=[rword], gpu=True)
        status = cupy.full(1, -1, dtype=cupy.int32)
        elapsed = cupy.zeros(1, dtype=cupy.uint64)
        kernel("wait_once")((1,), (1,), (dev.kernel_arg(), np.uint64(value), status, elapsed))
        ep.barrier("kernel-running")
        cupy.cuda.Device().synchronize()
        ep.barrier("done")
        return {"status": int(status.get()[0]), "word": int(word[0]), "elapsed_s": int(elapsed.get()[0]) / 1e9}


def kernel_stopped_by_error(rank, world, store, transport, how, timeout):
    """Rank 0's kernel waits on a word that never changes; rank 1 is killed or closes its channel.
    The kernel must stop with kDeviceChannelError well within `timeout`."""
    import cupy

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="gpu-error", timeout=timeout) as ep:
        word = pinned(1, np.uint64)
        rword = ep.register(word)
        ch = ep.channel(peer, transport)
        if rank == 1:
            ep.barrier("kernel-running")
            time.sleep(0.5)
            if how == "killed":
                os._exit(1)  # no goodbye: the peer must notice a dead process
            ch.close()
            return True
        dev = ch.device(local=[rword], gpu=True)
        stream = cupy.cuda.Stream(non_blocking=True)
        status = cupy.full(1, -1, dtype=cupy.int32)
        elapsed = cupy.zeros(1, dtype=cupy.uint64)
        with stream:
            kernel("wait_once")((1,), (1,), (dev.kernel_arg(), np.uint64(1), status, elapsed))
        # The same through the stream API, after the kernel, on another stream.
        other = cupy.cuda.Stream(non_blocking=True)
        dev.wait(0, 0, 1, stream=other)
        t0 = time.monotonic()
        ep.barrier("kernel-running")
        stream.synchronize()
        other.synchronize()
        return {"status": int(status.get()[0]), "kernel_s": int(elapsed.get()[0]) / 1e9,
                "host_s": time.monotonic() - t0, "error": dev.error, "stream_error": dev.stream_error}


# --------------------------------------------------------------------------- the stream API

def stream_wait_times_out(rank, world, store, transport):
    """A stream wait with a short bound: it ends, records why, and fails the channel's later operations."""
    import cupy

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="gpu-stream-timeout", timeout=30) as ep:
        word = pinned(1, np.uint64)
        rword = ep.register(word)
        ep.publish("word", rword)
        src = cupy.zeros(64, dtype=cupy.uint8)
        rsrc = ep.register(src)
        ch = ep.channel(peer, transport)
        remote = ep.lookup(peer, "word")
        out = None
        if rank == 0:
            dev = ch.device(local=[rword, rsrc], remote=[remote], gpu=True, timeout=0.5)
            s = cupy.cuda.Stream(non_blocking=True)
            t0 = time.monotonic()
            dev.wait(0, 0, 1, stream=s)   # never signalled
            dev.signal(0, 0, 1, stream=s)  # must not be sent: the channel failed
            s.synchronize()
            out = {"seconds": time.monotonic() - t0, "stream_error": dev.stream_error, "error_code": dev.error_code}
            # Region.wait(stream=) without a channel: only the endpoint's record.
            rword.wait(0, 5, timeout=0.2, stream=s)
            s.synchronize()
            out["endpoint_stream_error"] = ep.stream_error
        ep.barrier("done")
        if rank == 1:
            out = {"word": int(word[0])}
        return out


def stream_graph_replay(rank, world, store, transport, nbytes, replays, api):
    """A ping-pong of stream operations captured once in a CUDA graph and replayed `replays` times.

    Rank 0's graph: reset its ack word, fill the source for this round, put_signal it, wait for the ack.
    Rank 1's graph: wait for the signal, reset it, check the round's bytes, signal the ack.
    api: "device" (DeviceChannel.put_signal / wait) or "channel" (Channel.put(stream=) / Region.wait(stream=)).
    """
    import cupy

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group=f"gpu-graph-{api}", timeout=30) as ep:
        word = pinned(1, np.uint64)
        rword = ep.register(word)
        ep.publish("word", rword)
        counter = cupy.zeros(1, dtype=cupy.uint64)
        bad = cupy.zeros(1, dtype=cupy.uint64)
        stream = cupy.cuda.Stream(non_blocking=True)
        fill, check, reset = kernel("fill_round"), kernel("check_round"), kernel("reset_word")
        word_ptr = np.uint64(word.ctypes.data)
        if rank == 0:
            src = cupy.zeros(nbytes, dtype=cupy.uint8)
            rsrc = ep.register(src)
            ch = ep.channel(peer, transport)
            pinbox, pword = ep.lookup(peer, "inbox"), ep.lookup(peer, "word")
            dev = ch.device(local=[rsrc, rword], remote=[pinbox, pword], gpu=True) if api == "device" else None

            def body():
                with stream:
                    reset((1,), (1,), (word_ptr,))
                    fill((1,), (256,), (src, np.uint64(nbytes), counter))
                if dev is not None:
                    dev.put_signal(0, 0, 0, 0, nbytes, 1, 0, 1, stream=stream)
                    dev.wait(1, 0, 1, stream=stream)
                else:
                    ch.put(rsrc, pinbox, 0, signal=pword, stream=stream)
                    rword.wait(0, 1, channel=ch, stream=stream)
        else:
            inbox = pinned(nbytes)
            rinbox = ep.register(inbox)
            ep.publish("inbox", rinbox)
            ch = ep.channel(peer, transport)
            pword = ep.lookup(peer, "word")
            dev = ch.device(local=[rword, rinbox], remote=[pword], gpu=True) if api == "device" else None
            inbox_dev = np.uint64(inbox.ctypes.data)  # pinned: the same address on the GPU

            def body():
                if dev is not None:
                    dev.wait(0, 0, 1, stream=stream)
                else:
                    rword.wait(0, 1, channel=ch, stream=stream)
                with stream:
                    reset((1,), (1,), (word_ptr,))
                    check((1,), (256,), (inbox_dev, np.uint64(nbytes), counter, bad))
                if dev is not None:
                    dev.signal(0, 0, 1, stream=stream)
                else:
                    ch.signal(pword, stream=stream)

        body()  # round 0 eagerly: windows are added and addresses resolved outside the capture
        stream.synchronize()
        stream.begin_capture()
        body()
        graph = stream.end_capture()
        t0 = time.monotonic()
        for _ in range(replays):
            graph.launch(stream)
        stream.synchronize()
        seconds = time.monotonic() - t0
        errors = dev.stream_error if dev is not None else ch.stream_error
        ep.barrier("done")
        return {"rounds": int(counter.get()[0]), "bad": int(bad.get()[0]), "stream_error": errors,
                "seconds": seconds}


# --------------------------------------------------------------------------- item 10 defects

class _CudaView:
    """A bare __cuda_array_interface__ (v3) over a device pointer, with an explicit stream entry."""

    def __init__(self, ptr, nbytes, stream):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3,
                                         "strides": None, "stream": stream}


def put_ordered_after_producer(rank, world, store, transport, arrays):
    """(c) A GPU tensor produced on a side stream (after a 50 ms GPU sleep) is put from the host: the put
    must wait for that stream, so the peer sees the produced bytes, not the zeros before them."""
    peer = 1 - rank
    n = 1 << 20
    with ln.Endpoint(rank, world, store, group=f"gpu-order-{arrays}", timeout=30) as ep:
        sig = np.zeros(1, np.uint64)
        rsig = ep.register(sig)
        inbox = np.zeros(n, np.uint8)
        ep.publish("inbox", ep.register(inbox))
        ep.publish("sig", rsig)
        ch = ep.channel(peer, transport)
        if rank == 1:
            rsig.wait(0, 1, timeout=30, channel=ch)
            values = np.unique(inbox).tolist()
            ep.barrier("done")
            return values
        pinbox, psig = ep.lookup(peer, "inbox"), ep.lookup(peer, "sig")
        if arrays == "torch":
            import torch

            src = torch.zeros(n, dtype=torch.uint8, device="cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # the zeros first
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # ~50 ms of GPU cycles
                src.fill_(7)
                ch.put(src, pinbox, signal=psig)  # torch's current stream is `side`
        else:
            import cupy

            src = cupy.zeros(n, dtype=cupy.uint8)
            cupy.cuda.Device().synchronize()
            side = cupy.cuda.Stream(non_blocking=True)
            with side:
                kernel("sleep_then_fill")((1,), (256,), (src, np.uint64(n), np.uint8(7), np.uint64(50_000_000)))
                ch.put(src, pinbox, signal=psig)  # cupy reports `side` in __cuda_array_interface__
        ep.barrier("done")
        return True


def copy_does_not_wait_for_other_streams(rank, world, store, transport):
    """(d) tcp/shm stage GPU memory on a stream of lamina-net's own: a put must not wait for a kernel
    spinning on a blocking stream (the legacy default stream's copy would, until the kernel's 10 s bound)."""
    import cupy

    peer = 1 - rank
    n = 4096
    with ln.Endpoint(rank, world, store, group="gpu-own-stream", timeout=30) as ep:
        sig = np.zeros(1, np.uint64)
        rsig = ep.register(sig)
        inbox = np.zeros(n, np.uint8)
        ep.publish("inbox", ep.register(inbox))
        ep.publish("sig", rsig)
        ch = ep.channel(peer, transport)
        if rank == 1:
            rsig.wait(0, 1, timeout=30, channel=ch)
            ok = bool((inbox == 5).all())
            ep.barrier("done")
            return ok
        src = cupy.full(n, 5, dtype=cupy.uint8)
        cupy.cuda.Device().synchronize()
        flag = pinned(1, np.uint64)
        timed_out = cupy.zeros(1, dtype=cupy.int32)
        blocking = cupy.cuda.Stream(non_blocking=False)
        with blocking:
            kernel("spin_until")((1,), (1,), (np.uint64(flag.ctypes.data), np.uint64(10_000_000_000), timed_out))
        time.sleep(0.1)  # the spinner is running
        t0 = time.monotonic()
        ch.put(_CudaView(src.data.ptr, n, None), ep.lookup(peer, "inbox"), signal=ep.lookup(peer, "sig"))
        seconds = time.monotonic() - t0
        flag[0] = 1
        blocking.synchronize()
        ep.barrier("done")
        return {"put_s": seconds, "spinner_timed_out": int(timed_out.get()[0])}


def gpu_words_on_the_host(rank, world, store, transport):
    """(b) Region.wait on a GPU word is refused (the CPU cannot poll GPU memory); read_u64 copies it out."""
    import cupy

    with ln.Endpoint(0, 1, store, group="gpu-words", timeout=10, transports=("tcp",)) as ep:
        word = cupy.array([41, 42], dtype=cupy.uint64)
        region = ep.register(word)
        out = {"read": region.read_u64(8)}
        try:
            region.wait(0, 1, timeout=1)
            out["wait"] = "returned"
        except ln.UsageError as e:
            out["wait"] = str(e)
        return out


def verbs_unregistered_gpu_source(rank, world, store):
    """(a) Over verbs, a GPU source outside every registered region is a UsageError (it used to be
    inlined or copied by the CPU from a device pointer)."""
    import cupy

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="gpu-verbs", timeout=20) as ep:
        if "verbs" not in ep.transports:
            return {"skip": ep.verbs_unavailable_reason or "no verbs"}
        inbox = np.zeros(4096, np.uint8)
        ep.publish("inbox", ep.register(inbox))
        ch = ep.channel(peer, "verbs")
        out = {}
        if rank == 0:
            pinbox = ep.lookup(peer, "inbox")
            for n in (8, 4096):
                src = cupy.full(n, 3, dtype=cupy.uint8)  # never registered
                try:
                    ch.put(src, pinbox)
                    out[n] = "sent"
                except ln.UsageError as e:
                    out[n] = str(e)
        ep.barrier("done")
        return out


# --------------------------------------------------------------------------- windows added later (CPU ring)

def added_windows(rank, world, store, transport, lib_path):
    """DeviceChannel.add_windows on a CPU ring, driven by the header's own code in a CPU thread
    (tests/device/cpu_producers.cpp): an old handle keeps its windows, a new one reaches the added ones."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "device"))
    import producers

    peer = 1 - rank
    with ln.Endpoint(rank, world, store, group="added-windows", timeout=20) as ep:
        inbox, sig = ep.alloc(4096), ep.alloc(1, np.uint64)
        ep.publish("inbox", inbox)
        ep.publish("sig", sig)
        ch = ep.channel(peer, transport)
        if rank == 1:
            sig.wait(0, 1, timeout=20, channel=ch)
            ok = bytes(inbox.array[:64]) == bytes(range(64))
            ep.barrier("done")
            return ok
        lib = producers.load(lib_path)
        src = ep.alloc(64)
        src.array[:] = np.arange(64, dtype=np.uint8)
        dev = ch.device(gpu=False)
        old = dev.handle()
        first = dev.add_windows(local=[src], remote=[ep.lookup(peer, "inbox")])
        again = (dev._local_index(src), dev._remote_index(ep.lookup(peer, "inbox")))
        sw = dev._remote_index(ep.lookup(peer, "sig"))
        new = dev.handle()
        out = {"first": first, "again": again, "sig_window": sw,
               "old_put": lib.ln_put(old, 0, 0, 0, 0, 64),  # kDeviceInvalidArgument: not a window of `old`
               "new_put": lib.ln_put_signal(new, 0, 0, 0, 0, 64, sw, 0, 1),
               "flush": lib.ln_flush(new), "error": dev.error}
        try:
            dev.add_windows(local=[src] * 16)
            out["limit"] = "accepted"
        except ln.UsageError as e:
            out["limit"] = str(e)
        ep.barrier("done")
        return out


def stream_api_errors_without_gpu(rank, world, store, transport):
    """Every stream= form without a usable GPU: a typed error that says why; bad arguments first."""
    peer = 1 - rank
    out = {}
    with ln.Endpoint(rank, world, store, group="stream-no-gpu", timeout=10) as ep:
        buf, sig = ep.alloc(4096), ep.alloc(1, np.uint64)
        ep.publish("b", buf)
        ep.publish("s", sig)
        ch = ep.channel(peer, transport)
        pb, ps = ep.lookup(peer, "b"), ep.lookup(peer, "s")
        cases = {
            "put": lambda: ch.put(buf, pb, stream=0),
            "put_signal": lambda: ch.put(buf, pb, signal=ps, stream=0),
            "signal": lambda: ch.signal(ps, stream=0),
            "wait": lambda: sig.wait(0, 1, stream=0),
            "wait_channel": lambda: sig.wait(0, 1, channel=ch, stream=0),
            "bad_stream": lambda: ch.put(buf, pb, stream="x"),
            "unregistered": lambda: ch.put(np.zeros(8), pb, stream=0),
            "timeout": lambda: ch.put(buf, pb, stream=0, timeout=1),
            "bad_method": lambda: sig.wait(0, 1, stream=0, method="spin"),
            "cpu_ring": lambda: ch.device(local=[buf], remote=[pb]).put(0, 0, 0, 0, 8, stream=0),
        }
        for name, call in cases.items():
            try:
                call()
                out[name] = "ok"
            except (ln.UsageError, ln.TransportError) as e:
                out[name] = f"{type(e).__name__}: {e}"
        ch.signal(ps)  # the host path still works
        ep.barrier("signalled")
        out["host_signal"] = sig.read_u64(0)
        out["stream_error"] = ch.stream_error
        ep.barrier("done")
    return out
