"""GPU latency of lamina-net's device API: a ping-pong between two processes on one GPU.

Two ways to drive it, both through the proxy back end (the ring a kernel or
a stream operation posts to, drained by a host thread into the transport):

* ``kernel``: one persistent one-thread kernel per rank; rank 0 put_signals
  ``size`` bytes and waits for the echo, rank 1 waits and put_signals back,
  all from device code. One-way = half the round trip, timed on the GPU
  (``%globaltimer``).
* ``stream``: the Lamina paper's measure, kernel end to peer kernel start. A
  CUDA graph per rank, replayed once per round: rank 0 runs a kernel that
  stamps the time it ends, then ``put_signal(stream=)`` and ``wait(stream=)``;
  rank 1 waits on its stream, then runs a kernel that stamps the time it
  starts, then put_signals back. Both stamps read the same GPU's global timer,
  so the difference is the one-way latency itself.

Prints one row per (transport, mode, size): p50 / p99 one-way in µs.
``--json PATH`` writes the records. Needs a GPU, cupy and lamina-net built
with CUDA; importable without them (the kernel source is checked by NVRTC in
the tests).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time

import numpy as np

KERNELS = r"""
#include <lamina_net/device.cuh>

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Windows on both ranks: local 0 = GPU source, local 1 = our signal word
// (pinned host); remote 0 = the peer's inbox, remote 1 = the peer's word.
extern "C" __global__ void ping(lamina::DeviceChannel ch, unsigned long long n, unsigned long long rounds,
                                unsigned long long* rtt_ns, int* status) {
  int s = lamina::kDeviceOk;
  for (unsigned long long r = 0; r < rounds && s == lamina::kDeviceOk; ++r) {
    const unsigned long long t0 = now_ns();
    s = ch.put_signal(0, 0, 0, 0, n, 1, 0, 1);
    if (s == lamina::kDeviceOk) s = ch.wait(1, 0, r + 1);
    rtt_ns[r] = now_ns() - t0;
  }
  status[0] = s;
}

extern "C" __global__ void pong(lamina::DeviceChannel ch, unsigned long long n, unsigned long long rounds,
                                int* status) {
  int s = lamina::kDeviceOk;
  for (unsigned long long r = 0; r < rounds && s == lamina::kDeviceOk; ++r) {
    s = ch.wait(1, 0, r + 1);
    if (s == lamina::kDeviceOk) s = ch.put_signal(0, 0, 0, 0, n, 1, 0, 1);
  }
  status[0] = s;
}

// Stream mode: graph bodies.
extern "C" __global__ void reset_word(unsigned long long* word) {
  *(volatile unsigned long long*)word = 0;
  __threadfence_system();
}
extern "C" __global__ void stamp(unsigned long long* times, unsigned long long* counter) {
  const unsigned long long t = now_ns();
  times[*counter] = t;
  *counter += 1;
}
"""


def _rank(rank, store, transport, modes, sizes, iterations, warmup, results):
    try:
        results.put((rank, "ok", _run(rank, store, transport, modes, sizes, iterations, warmup)))
    except BaseException as e:  # reported by the parent
        import traceback

        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _run(rank, store, transport, modes, sizes, iterations, warmup):
    import cupy
    import cupyx

    import lamina_net as ln

    mod = cupy.RawModule(code=KERNELS, options=("-std=c++17", f"-I{ln.get_include()}"))
    peer = 1 - rank
    top = max(sizes)
    out = []
    with ln.Endpoint(rank, 2, store, group=f"gpu-latency-{transport}", timeout=60) as ep:
        word = cupyx.empty_pinned((1,), dtype=np.uint64)
        inbox = cupyx.empty_pinned((top,), dtype=np.uint8)
        word[:] = 0
        rword, rinbox = ep.register(word), ep.register(inbox)
        src = cupy.zeros(top, dtype=cupy.uint8)
        rsrc = ep.register(src)
        ep.publish("word", rword)
        ep.publish("inbox", rinbox)
        ch = ep.channel(peer, transport)
        remote = [ep.lookup(peer, "inbox"), ep.lookup(peer, "word")]
        rounds = warmup + iterations
        word_ptr = np.uint64(word.ctypes.data)
        for mode in modes:
            for n in sizes:
                dev = ch.device(local=[rsrc, rword], remote=remote, gpu=True)
                word[0] = 0
                ep.barrier(f"{mode}-{n}-ready")
                status = cupy.full(1, -1, dtype=cupy.int32)
                if mode == "kernel":
                    rtt = cupy.zeros(rounds, dtype=cupy.uint64)
                    if rank == 0:
                        mod.get_function("ping")((1,), (1,), (dev.kernel_arg(), np.uint64(n), np.uint64(rounds),
                                                              rtt, status))
                    else:
                        mod.get_function("pong")((1,), (1,), (dev.kernel_arg(), np.uint64(n), np.uint64(rounds),
                                                              status))
                    cupy.cuda.Device().synchronize()
                    code = int(status.get()[0])
                    if code != 0:
                        raise RuntimeError(f"{transport} {mode} {n} B: kernel status {code}: {dev.error}")
                    one_way = (rtt.get()[warmup:] / 2.0) if rank == 0 else None
                else:
                    stream = cupy.cuda.Stream(non_blocking=True)
                    times = cupy.zeros(rounds + 1, dtype=cupy.uint64)
                    counter = cupy.zeros(1, dtype=cupy.uint64)
                    reset, stamp = mod.get_function("reset_word"), mod.get_function("stamp")

                    def body():
                        if rank == 0:
                            with stream:
                                reset((1,), (1,), (word_ptr,))
                                stamp((1,), (1,), (times, counter))  # the kernel that ends
                            dev.put_signal(0, 0, 0, 0, n, 1, 0, 1, stream=stream)
                            dev.wait(1, 0, 1, stream=stream)
                        else:
                            dev.wait(1, 0, 1, stream=stream)
                            with stream:
                                stamp((1,), (1,), (times, counter))  # the peer kernel that starts
                                reset((1,), (1,), (word_ptr,))
                            dev.put_signal(0, 0, 0, 0, n, 1, 0, 1, stream=stream)

                    body()  # round 0, eagerly: resolves windows and addresses outside the capture
                    stream.synchronize()
                    stream.begin_capture()
                    body()
                    graph = stream.end_capture()
                    for _ in range(rounds - 1):
                        graph.launch(stream)
                    stream.synchronize()
                    if dev.stream_error:
                        raise RuntimeError(f"{transport} {mode} {n} B: {dev.stream_error}")
                    one_way = times.get()[:rounds]
                dev.close()
                out.append({"mode": mode, "size": n, "samples": None if one_way is None else one_way.tolist()})
                ep.barrier(f"{mode}-{n}-done")
    return out


def run(transports, modes, sizes, iterations, warmup, timeout=300.0):
    records = []
    for transport in transports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            store = f"127.0.0.1:{s.getsockname()[1]}"
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, store, transport, modes, sizes, iterations, warmup, results))
                 for r in (0, 1)]
        for p in procs:
            p.start()
        got = {}
        deadline = time.monotonic() + timeout
        dead_since = None
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=1.0)
                got[rank] = (status, value)
            except Exception:  # queue.Empty
                if any(not p.is_alive() for p in procs):
                    dead_since = dead_since or time.monotonic()
                    if time.monotonic() - dead_since > 5:
                        break  # a rank died without reporting
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        for rank in (0, 1):
            if rank not in got:
                raise RuntimeError(f"{transport}: rank {rank} did not report")
            if got[rank][0] != "ok":
                raise RuntimeError(f"{transport}: rank {rank} failed: {got[rank][1]}")
        by_key = {(r["mode"], r["size"]): r for r in got[1][1]}
        for r0 in got[0][1]:
            mode, n = r0["mode"], r0["size"]
            if mode == "kernel":
                one_way = np.asarray(r0["samples"], dtype=np.float64)
            else:  # peer kernel start - kernel end, per round
                ends = np.asarray(r0["samples"], dtype=np.float64)
                starts = np.asarray(by_key[(mode, n)]["samples"], dtype=np.float64)
                one_way = (starts - ends)[warmup:]
            us = one_way / 1000.0
            records.append({"transport": transport, "path": "device", "device_path": "proxy", "mode": mode,
                            "size_bytes": n, "iterations": int(us.size), "p50_us": float(np.percentile(us, 50)),
                            "p99_us": float(np.percentile(us, 99)), "min_us": float(us.min())})
    return records


def table(records) -> str:
    lines = ["| transport | mode | size | p50 µs | p99 µs | min µs |", "|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['transport']} | {r['mode']} | {r['size_bytes']} | {r['p50_us']:.2f} | "
                     f"{r['p99_us']:.2f} | {r['min_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transports", default="shm,tcp")
    p.add_argument("--modes", default="kernel,stream")
    p.add_argument("--sizes", default="8,4096,65536,1048576")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
    except ValueError:
        p.error("--sizes: comma-separated byte counts")
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in ("kernel", "stream") for m in modes):
        p.error("--modes: kernel, stream")
    records = run([t for t in args.transports.split(",") if t], modes, sizes, args.iterations, args.warmup)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
