"""The attention worker process: a head shard of the KV cache, serving the model worker.

Run as ``python -m lamina_net.decode.attention_worker --rank R --world-size W
--store HOST:PORT`` (the local launcher in :mod:`.pipeline` does this), or as a
non-zero rank of ``lamina-net decode`` under torchrun. Rank 0 is the model
worker. The loop is: receive a request, let :class:`~.attention_shard.AttentionServer`
handle it, send the reply; it ends on ``STOP`` or when the model worker fails.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from .attention_shard import AttentionServer
from .link import Link, PipelineError
from .protocol import HEADER_BYTES, Kind

MODEL_WORKER_RANK = 0


def _dies_here(server: AttentionServer, message: torch.Tensor, kill_at_step: int) -> bool:
    """Whether ``message`` is a LAYER message of forward step ``kill_at_step`` (or later) of its micro-batch."""
    kind, micro_batch = message[:16].view(torch.int64).tolist()
    if kind != Kind.LAYER:
        return False
    step = server.current_step(micro_batch)
    return step is not None and step >= kill_at_step


def serve(link: Link, device: str = "cpu", idle_timeout: float | None = None,
          crash_after_messages: int | None = None, kill_at_step: int | None = None) -> AttentionServer:
    """Serve requests from ``link`` until ``STOP``; returns the server (its counters).

    Fault injection for tests and demos, both a SIGKILL of this process (no
    goodbye): ``crash_after_messages`` after that many layer messages;
    ``kill_at_step`` on the first layer message of that forward step of any
    micro-batch (0 is the prefill step).
    """
    server = AttentionServer(device)
    buffer = torch.empty(HEADER_BYTES, dtype=torch.uint8)  # SETUP fits; grown to the announced size after it
    while not server.stopped:
        waiting_since = time.perf_counter()
        nbytes = link.recv(buffer, timeout=idle_timeout)
        received_at = time.perf_counter()
        if kill_at_step is not None and nbytes >= HEADER_BYTES and _dies_here(server, buffer, kill_at_step):
            os.kill(os.getpid(), signal.SIGKILL)
        server.idle_seconds += received_at - waiting_since
        reply = server.handle(buffer[:nbytes], received_at)
        if reply is not None:
            link.send(reply.contiguous())
        if server.configured and buffer.numel() < HEADER_BYTES + server.max_payload:
            buffer = torch.empty(HEADER_BYTES + server.max_payload, dtype=torch.uint8)
        if crash_after_messages is not None and server.layer_messages >= crash_after_messages:
            os.kill(os.getpid(), signal.SIGKILL)
    return server


def run_attention_worker(rank: int, world_size: int, store: str | None, group: str, transport: str = "auto",
                         device: str = "cpu", timeout: float | None = None, idle_timeout: float | None = None,
                         crash_after_messages: int | None = None, kill_at_step: int | None = None) -> int:
    """Join the lamina-net group as ``rank`` and serve the model worker; returns an exit status."""
    import lamina_net

    from .link import ChannelLink

    peer = f"model worker (rank {MODEL_WORKER_RANK})"
    try:
        with lamina_net.Endpoint(rank, world_size, store=store, group=group, timeout=timeout) as endpoint:
            link = ChannelLink(endpoint.channel(MODEL_WORKER_RANK, transport=transport), peer, timeout)
            try:
                serve(link, device, idle_timeout, crash_after_messages, kill_at_step)
            finally:
                link.close()
    except PipelineError as failure:
        print(f"lamina-net decode: attention worker rank {rank}: {failure}", file=sys.stderr)
        return 1
    except (lamina_net.LaminaError, TimeoutError) as failure:
        print(f"lamina-net decode: attention worker rank {rank}: {type(failure).__name__}: {failure}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lamina-net decode attention worker")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--store", default=None, help="HOST:PORT of the store (rank 0 hosts it)")
    parser.add_argument("--group", default="lamina-decode")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for each transport operation")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help="seconds to wait for the next request before giving up")
    parser.add_argument("--crash-after-messages", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-at-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("LAMINA_DECODE_WORKER_THREADS", "1"))))
    return run_attention_worker(args.rank, args.world_size, args.store, args.group, args.transport, args.device,
                                args.timeout, args.idle_timeout, args.crash_after_messages, args.kill_at_step)


if __name__ == "__main__":
    sys.exit(main())
