"""A user-written CUDA kernel that puts and signals through lamina-net.

Two local processes on one GPU. Rank 0's kernel (cupy RawModule, compiled at
run time by NVRTC against ``lamina_net.get_include()``) fills a GPU buffer
and put_signals it into rank 1's pinned host inbox through its device
channel (the proxy back end drains the ring into the channel's transport).
Rank 1's kernel waits on its signal word, checks every byte, and signals back;
rank 0's kernel waits for that. No host thread is in either kernel's control
path other than the proxies.

The handle (``dev.kernel_arg()``: the ``lamina::DeviceChannel`` bytes in a
one-element numpy array) is passed by value, as cupy passes any one-element
numpy array.

``--arrays torch`` does the same with torch tensors and streams and no
kernel of ours: torch fills the buffer and lamina-net's stream-ordered
operations (``dev.put_signal(..., stream=)``, ``dev.wait(..., stream=)``)
post and wait in torch's stream order.

Run: ``python examples/device_put_cupy.py [--transport shm|tcp] [--nbytes N] [--arrays cupy|torch]``.
Needs an NVIDIA GPU, lamina-net built with CUDA, and cupy
(``pip install 'lamina-net[cupy]'``) or torch with CUDA.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import sys

import numpy as np

# The kernels. Window numbering is the DeviceChannel's: local windows are
# this rank's Regions in the order given to ch.device(local=...), remote
# windows the peer's RemoteRegions in the order given to remote=.
KERNELS = r"""
#include <lamina_net/device.cuh>

// Rank 0: local 0 = GPU source, local 1 = our ack word (pinned host);
// remote 0 = rank 1's inbox, remote 1 = rank 1's signal word.
extern "C" __global__ void produce(lamina::DeviceChannel ch, unsigned char* src, unsigned long long n,
                                   unsigned int seed, int* status) {
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
    src[i] = (unsigned char)((i * 7u + seed) & 0xffu);
  }
  // Every thread of the block calls the _block form: it fences the block's
  // writes, thread 0 posts, all get its status.
  int s = ch.put_signal_block(0, 0, 0, 0, n, 1, 0, 1);
  if (threadIdx.x == 0) status[0] = s;
  if (s != lamina::kDeviceOk) return;
  s = ch.wait_block(1, 0, 1);  // bounded by the channel's timeout
  if (threadIdx.x == 0) status[1] = s;
}

// Rank 1: local 0 = our signal word, local 1 = our inbox (both pinned host);
// remote 0 = rank 0's ack word.
extern "C" __global__ void consume(lamina::DeviceChannel ch, unsigned long long n, unsigned int seed, int* status,
                                   unsigned long long* bad) {
  int s = ch.wait_block(0, 0, 1);
  if (threadIdx.x == 0) status[0] = s;
  if (s != lamina::kDeviceOk) return;
  const volatile unsigned char* inbox = (const volatile unsigned char*)ch.local[1].base;
  unsigned long long mine = 0;
  for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) {
    if (inbox[i] != (unsigned char)((i * 7u + seed) & 0xffu)) ++mine;
  }
  atomicAdd(bad, mine);
  s = ch.signal_block(0, 0, 1);
  if (threadIdx.x == 0) status[1] = s;
}
"""

SEED = 11


def _cupy_rank(rank: int, store: str, transport: str, nbytes: int) -> str:
    import cupy
    import cupyx

    import lamina_net as ln

    module = cupy.RawModule(code=KERNELS, options=("-std=c++17", f"-I{ln.get_include()}"))
    with ln.Endpoint(rank, 2, store, group="device-put-cupy", timeout=30) as ep:
        sig = cupyx.empty_pinned((1,), dtype=np.uint64)  # pinned: a kernel can read it
        sig[:] = 0
        rsig = ep.register(sig)
        ep.publish("sig", rsig)
        if rank == 0:
            src = cupy.zeros(nbytes, dtype=cupy.uint8)
            rsrc = ep.register(src)
            ch = ep.channel(1, transport)
            dev = ch.device(local=[rsrc, rsig], remote=[ep.lookup(1, "inbox"), ep.lookup(1, "sig")], gpu=True)
            status = cupy.full(2, -1, dtype=cupy.int32)
            module.get_function("produce")((1,), (256,), (dev.kernel_arg(), src, np.uint64(nbytes),
                                                            np.uint32(SEED), status))
            cupy.cuda.Device().synchronize()
            codes = status.get().tolist()
            ep.barrier("done")
            if codes != [0, 0]:
                return f"rank 0: kernel statuses {codes}: {dev.error}"
            return f"rank 0: put_signal of {nbytes} bytes and the ack: ok ({dev.stats()['executed']} descriptors)"
        inbox = cupyx.empty_pinned((nbytes,), dtype=np.uint8)
        inbox[:] = 0
        rinbox = ep.register(inbox)
        ep.publish("inbox", rinbox)
        ch = ep.channel(0, transport)
        dev = ch.device(local=[rsig, rinbox], remote=[ep.lookup(0, "sig")], gpu=True)
        status = cupy.full(2, -1, dtype=cupy.int32)
        bad = cupy.zeros(1, dtype=cupy.uint64)
        module.get_function("consume")((1,), (256,), (dev.kernel_arg(), np.uint64(nbytes), np.uint32(SEED), status,
                                                       bad))
        cupy.cuda.Device().synchronize()
        codes, wrong = status.get().tolist(), int(bad.get()[0])
        ep.barrier("done")
        if codes != [0, 0] or wrong:
            return f"rank 1: kernel statuses {codes}, {wrong} wrong bytes: {dev.error}"
        return f"rank 1: waited, checked {nbytes} bytes, signalled back: ok"


def _torch_rank(rank: int, store: str, transport: str, nbytes: int) -> str:
    import torch

    import lamina_net as ln

    with ln.Endpoint(rank, 2, store, group="device-put-torch", timeout=30) as ep:
        sig = torch.zeros(1, dtype=torch.int64).pin_memory()
        rsig = ep.register(sig)
        ep.publish("sig", rsig)
        stream = torch.cuda.Stream()
        if rank == 0:
            src = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
            rsrc = ep.register(src)
            ch = ep.channel(1, transport)
            dev = ch.device(local=[rsrc, rsig], remote=[ep.lookup(1, "inbox"), ep.lookup(1, "sig")], gpu=True)
            with torch.cuda.stream(stream):
                src.copy_((torch.arange(nbytes, device="cuda") * 7 + SEED) % 256)
                dev.put_signal(0, 0, 0, 0, nbytes, 1, 0, 1, stream=stream)  # after the copy, in stream order
                dev.wait(1, 0, 1, stream=stream)                            # the host does not wait here
            stream.synchronize()
            ep.barrier("done")
            return f"rank 0: {'ok' if dev.stream_error is None else dev.stream_error}"
        inbox = torch.zeros(nbytes, dtype=torch.uint8).pin_memory()
        rinbox = ep.register(inbox)
        ep.publish("inbox", rinbox)
        ch = ep.channel(0, transport)
        dev = ch.device(local=[rsig, rinbox], remote=[ep.lookup(0, "sig")], gpu=True)
        with torch.cuda.stream(stream):
            dev.wait(0, 0, 1, stream=stream)
            got = inbox.to("cuda", non_blocking=True)  # ordered after the wait
            expected = ((torch.arange(nbytes, device="cuda") * 7 + SEED) % 256).to(torch.uint8)
            wrong = (got != expected).sum()
            dev.signal(0, 0, 1, stream=stream)
        stream.synchronize()
        ep.barrier("done")
        if dev.stream_error is not None or int(wrong):
            return f"rank 1: {dev.stream_error}, {int(wrong)} wrong bytes"
        return f"rank 1: waited in stream order, checked {nbytes} bytes, signalled back: ok"


def _rank(rank, store, transport, nbytes, arrays, results):
    try:
        fn = _cupy_rank if arrays == "cupy" else _torch_rank
        results.put((rank, fn(rank, store, transport, nbytes)))
    except BaseException as e:  # reported by the parent
        results.put((rank, f"rank {rank} failed: {type(e).__name__}: {e}"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transport", default="shm", choices=("shm", "tcp", "verbs"))
    p.add_argument("--nbytes", type=int, default=1 << 20)
    p.add_argument("--arrays", default="cupy", choices=("cupy", "torch"))
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        store = f"127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")  # CUDA does not survive fork
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, store, args.transport, args.nbytes, args.arrays, results))
             for r in (0, 1)]
    for proc in procs:
        proc.start()
    lines = {}
    for _ in procs:
        rank, line = results.get(timeout=120)
        lines[rank] = line
    for proc in procs:
        proc.join(30)
    for r in sorted(lines):
        print(lines[r])
    return 0 if all(line.endswith("ok") or ": ok" in line for line in lines.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
