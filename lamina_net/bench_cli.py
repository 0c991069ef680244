"""``lamina-net bench latency``: two-rank ping-pong latency per transport and size;
``lamina-net bench rate``: small puts per second through the device API's proxy.

By default both ranks run as local processes; ``--rank/--world-size/--store``
runs one rank of a cross-host pair. The timing loop is in C++ (no Python in
the measurement). One-way latency is half the round trip. Plain C reference
ping-pongs (bench/ref_*_pingpong.c, shipped with the package) run in the same
invocation so that speed is compared as ratios measured side by side.

``--path device`` runs the same put-with-signal ping-pong through the device
API (lamina_net/device.cuh called from CPU threads: every put is a descriptor
in a ring that a DeviceProxy thread executes on the channel), side by side
with the host API (``--path host``, the default), and reports device/host.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ._local_world import local_world_size

DEFAULT_SIZES = [8, 64, 512, 4096, 32768, 65536, 262144, 1048576]
PATHS = ("host", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    lat = sub.add_parser("latency", help="ping-pong one-way latency (p50/p99) per transport and size")
    lat.add_argument("--transport", default="all",
                     help="comma-separated: tcp, shm, verbs, or all (the available ones); default all")
    lat.add_argument("--op", default="put", choices=["put", "write", "send"],
                     help="put: put-with-signal each way (default); send: send/recv; write: a plain put whose "
                          "last 8 bytes carry the round number, which the peer polls (how perftest's "
                          "ib_write_lat detects arrival; sizes must be multiples of 8)")
    lat.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                     help="comma-separated message sizes in bytes (default 8 B .. 1 MiB)")
    lat.add_argument("--iterations", type=int, default=0, help="measured round trips per size (default: by size)")
    lat.add_argument("--warmup", type=int, default=50, help="unmeasured round trips per size")
    lat.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    lat.add_argument("--plot", metavar="PATH.png", help="plot p50 latency against size, log-log (needs matplotlib)")
    lat.add_argument("--no-reference", action="store_true", help="skip the plain C reference ping-pongs")
    lat.add_argument("--baseline", default="auto",
                     help="torch.distributed baseline measured alongside: gloo, nccl (needs 2 GPUs), none, or "
                          "auto (gloo when torch is installed; nccl too with 2+ GPUs)")
    lat.add_argument("--rank", type=int, help="run one rank only (cross-host); needs --store")
    lat.add_argument("--world-size", type=int, default=2)
    lat.add_argument("--store", help="host:port of the store (rank 0 hosts it)")
    lat.add_argument("--timeout", type=float, default=60.0, help="bound in seconds for each wait")
    lat.add_argument("--path", default="host",
                     help="comma-separated: host (the host API, default), device (the device API from CPU threads, "
                          "through the descriptor ring and its proxy thread; --op put only), or host,device for "
                          "both side by side with the device/host ratio")
    lat.add_argument("--repeat", type=int, default=1,
                     help="rounds of the whole sweep (lamina-net, then the C references), one after the other; "
                          "each figure and ratio is the median over the rounds of that round's value, so a noisy "
                          "moment moves one round, not the result (default 1; local ranks only)")

    rate = sub.add_parser("rate", help="small puts per second through the device API's proxy (1..P producer "
                                       "threads, one proxy) against the host API's put from one thread")
    rate.add_argument("--transport", default="shm", help="comma-separated: tcp, shm, verbs, or all (default shm)")
    rate.add_argument("--producers", default="1,2,4",
                      help="comma-separated producer thread counts posting through one device channel (default 1,2,4)")
    rate.add_argument("--size", type=int, default=8, help="bytes per put (default 8)")
    rate.add_argument("--ops", type=int, default=1_000_000, help="puts per measurement, in all (default 1000000)")
    rate.add_argument("--repeat", type=int, default=3,
                      help="measurements per configuration, interleaved; the median is reported (default 3)")
    rate.add_argument("--ring-slots", type=int, default=1024, help="descriptor ring slots (default 1024)")
    rate.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    rate.add_argument("--rank", type=int, help="run one rank only (cross-host); needs --store")
    rate.add_argument("--world-size", type=int, default=2)
    rate.add_argument("--store", help="host:port of the store (rank 0 hosts it)")
    rate.add_argument("--timeout", type=float, default=60.0, help="bound in seconds for each wait")

    # Here, not at the top: these modules import this one's helpers.
    from . import bench_bandwidth, bench_exchange, bench_report  # compare and table of saved runs
    bench_bandwidth.add_parser(sub)
    bench_exchange.add_arguments(sub)
    bench_report.add_arguments(sub)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"lamina-net bench: --sizes must be comma-separated integers, got {text!r}")
    if not sizes or any(s <= 0 or s > (1 << 30) for s in sizes):
        raise SystemExit("lamina-net bench: sizes must be in [1, 1 GiB]")
    return sizes


def _parse_paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"lamina-net bench: --path takes host, device or host,device, got {text!r}")
    return list(dict.fromkeys(paths))


def _iterations_for(size: int, requested: int) -> int:
    if requested > 0:
        return requested
    if size <= 65536:
        return 2000
    if size <= 262144:
        return 500
    return 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i]


def run_rank(rank: int, world_size: int, store: str, transport: str, op: str, sizes: list[int],
             iterations: int, warmup: int, timeout: float, group: str, paths=("host",)) -> list[dict]:
    """One rank of the ping-pong, per size each path in turn; rank 0 returns the records."""
    import numpy as np

    from . import Endpoint
    from .core import Access

    peer = 1 - rank
    max_size = max(sizes)
    with Endpoint(rank, world_size, store, group=group, timeout=timeout) as ep:
        # Shareable memory, as a latency-minded user would allocate it.
        rbuf = ep.alloc(max(max_size, 64), np.uint8, Access.REMOTE_WRITE)
        rsig = ep.alloc(1, np.uint64, Access.REMOTE_ATOMIC)
        ep.publish("bench-buf", rbuf)
        ep.publish("bench-sig", rsig)
        ch = ep.channel(peer, transport)
        remote_buf, remote_sig = ep.lookup(peer, "bench-buf"), ep.lookup(peer, "bench-sig")
        records = []
        for size in sizes:
            n = _iterations_for(size, iterations)
            host_p50 = None
            for path in paths:
                base = rsig.read_u64(0)  # before the barrier: the peer may put right after it
                if op == "write":
                    rbuf.array[size - 8:size] = 0  # the round counter the peer writes; earlier sizes left bytes there
                ep.barrier(f"size-{size}-{path}")
                info = None
                if path == "host":
                    times = ep._live().pingpong(ch._live(), op, size, n, warmup, rank == 0, timeout,
                                                rbuf._live(), rsig._live(), remote_buf._desc, remote_sig._desc, base)
                else:
                    # Through the device API: a DeviceProxy on this channel executes every put.
                    times, info = ep._live().device_pingpong(ch._live(), size, n, warmup, rank == 0, timeout,
                                                             rbuf._live(), rsig._live(), remote_buf._desc,
                                                             remote_sig._desc, base, 1024, -1)
                if rank == 0:
                    times.sort()
                    r = {"transport": ch.transport, "op": op, "size_bytes": size, "iterations": n,
                         "p50_us": _percentile(times, 0.5) / 2e3, "p99_us": _percentile(times, 0.99) / 2e3,
                         "path": path}
                    if path == "host":
                        host_p50 = r["p50_us"]
                    else:
                        r["device_path"] = info["device_path"]
                        r["proxy_parks"] = info["parks"]
                        if host_p50:
                            r["host_p50_us"] = host_p50
                            r["ratio_vs_host"] = r["p50_us"] / host_p50
                    records.append(r)
        ep.barrier("done")
        return records


def _report(queue, body, args) -> None:
    try:
        queue.put(("ok", body(*args)))
    except BaseException as e:  # report to the parent instead of dying silently
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _rank_main(queue, *args) -> None:
    _report(queue, run_rank, args)


def _run_pair(target, args_of_rank, what: str, wait_s: float, nranks: int = 2) -> list[dict]:
    """Runs target(queue, *args_of_rank(rank)) for ranks 0..nranks-1 as spawned processes; rank 0's records."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(queue, *args_of_rank(r))) for r in range(nranks)]
    with local_world_size(nranks):  # the children inherit it
        for p in procs:
            p.start()
    results = []
    deadline = time.monotonic() + wait_s
    try:
        while len(results) < len(procs):
            try:
                results.append(queue.get(timeout=0.5))
                continue
            except queue_mod.Empty:
                pass
            # A rank that died (a crash, a kill) never reports: say so now, not after wait_s.
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{what} failed: " + "; ".join(f"rank {r} exited with status {code}"
                                                                   for r, code in dead))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} failed: no result within {wait_s:.0f} s")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise RuntimeError(f"{what} failed: " + "; ".join(errors))
    return next(r for status, r in results if r)


def run_local_pair(transport: str, op: str, sizes: list[int], iterations: int, warmup: int,
                   timeout: float, paths=("host",)) -> list[dict]:
    """Runs both ranks as local processes; returns rank 0's records."""
    store = f"127.0.0.1:{_free_port()}"
    group = f"bench-{os.getpid()}-{transport}"
    # numpy's BLAS threads would spin beside the measured loop.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return _run_pair(_rank_main,
                     lambda r: (r, 2, store, transport, op, sizes, iterations, warmup, timeout, group, tuple(paths)),
                     f"{transport} benchmark", timeout * (len(sizes) * len(paths) + 2) + 60)


def reference_binary(name: str) -> Path | None:
    from . import _core

    candidates = [Path(_core.__file__).parent / "bin" / name]
    candidates += sorted(Path(__file__).resolve().parent.parent.glob(f"build/*/{name}"))
    for c in candidates:
        if c.exists() and os.access(c, os.X_OK):
            return c
    return None


def parse_reference_rtt(line: str) -> tuple[int, dict]:
    """(size, {p50_us, p99_us} one-way) from a C reference's "size=.. p50_rtt_ns=.. p99_rtt_ns=.." line."""
    fields = dict(kv.split("=") for kv in line.split())
    return int(fields["size"]), {"p50_us": float(fields["p50_rtt_ns"]) / 2e3,
                                 "p99_us": float(fields["p99_rtt_ns"]) / 2e3}


def run_reference(transport: str, sizes: list[int], iterations: int, warmup: int,
                  mode: str = "spin") -> dict[int, dict]:
    """p50/p99 one-way latency of the plain C reference, by size ({} if unavailable).

    tcp has two modes: "spin" (non-blocking recv in a loop, like lamina-net's
    spin phase) and "block" (blocking recv); shm always spins.
    """
    name = {"tcp": "ref_tcp_pingpong", "shm": "ref_shm_pingpong"}.get(transport)
    exe = reference_binary(name) if name else None
    if exe is None:
        return {}
    out = {}
    for size in sizes:
        n = _iterations_for(size, iterations)
        args = [str(exe), "pingpong" if transport == "shm" else mode, str(size), str(n), str(warmup)]
        text = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600).stdout
        out[size] = parse_reference_rtt(text)[1]
    return out


def run_memcpy_reference(sizes: list[int], iterations: int, warmup: int) -> dict[int, float]:
    exe = reference_binary("ref_shm_pingpong")
    if exe is None:
        return {}
    out = {}
    for size in sizes:
        n = _iterations_for(size, iterations)
        text = subprocess.run([str(exe), "memcpy", str(size), str(n), str(warmup)], capture_output=True, text=True,
                              check=True, timeout=600).stdout
        fields = dict(kv.split("=") for kv in text.split())
        out[size] = float(fields["p50_ns"]) / 1e3
    return out


def _torch_rank(queue, backend: str, rank: int, port: int, sizes: list[int], iterations: int, warmup: int,
                timeout: float) -> None:
    try:
        import datetime
        import time

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=timeout))
        device = "cuda" if backend == "nccl" else "cpu"
        if device == "cuda":
            torch.cuda.set_device(rank)
        peer = 1 - rank
        records = []
        for size in sizes:
            n = _iterations_for(size, iterations)
            buf = torch.zeros(size, dtype=torch.uint8, device=device)
            times = []
            dist.barrier()
            for i in range(warmup + n):
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(buf, peer)
                    dist.recv(buf, peer)
                else:
                    dist.recv(buf, peer)
                    dist.send(buf, peer)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            times.sort()
            records.append({"transport": backend, "op": "send", "size_bytes": size, "iterations": n,
                            "p50_us": _percentile(times, 0.5) * 1e6 / 2, "p99_us": _percentile(times, 0.99) * 1e6 / 2})
        dist.destroy_process_group()
        queue.put(("ok", records if rank == 0 else None))
    except BaseException as e:  # reported by the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_torch_baseline(backend: str, sizes: list[int], iterations: int, warmup: int, timeout: float) -> list[dict]:
    """Ping-pong with torch.distributed send/recv (Gloo on CPU, NCCL on 2 GPUs), both ranks local."""
    port = _free_port()
    return _run_pair(_torch_rank, lambda r: (backend, r, port, sizes, iterations, warmup, timeout),
                     f"{backend} baseline", timeout * (len(sizes) + 2) + 60)


def _baselines(choice: str) -> list[str]:
    if choice == "none":
        return []
    try:
        import torch
    except ImportError:
        if choice == "auto":
            return []
        raise SystemExit("lamina-net bench: the torch.distributed baseline needs torch (pip install torch)")
    if choice == "auto":
        return ["gloo"] + (["nccl"] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])
    names = [c.strip() for c in choice.split(",")]
    for name in names:
        if name not in ("gloo", "nccl"):
            raise SystemExit(f"lamina-net bench: unknown baseline {name!r} (gloo, nccl, none, auto)")
    return names


def _available_transports() -> list[str]:
    from . import _core

    names = ["shm", "tcp"]
    if _core.verbs_available()[0]:
        names.append("verbs")
    return names


def print_table(records: list[dict], file=sys.stdout) -> None:
    """One row per transport and size: p50/p99 one-way, then each comparison as a ratio."""
    columns = [("ref p50", "ref_p50_us", 9, ".2f"), ("vs ref", "ratio_vs_ref", 7, ".2f"),
               ("blk ref", "blocking_ref_p50_us", 9, ".2f"), ("vs blk", "ratio_vs_blocking_ref", 7, ".2f"),
               ("memcpy", "memcpy_us", 9, ".2f"), ("vs memcpy", "ratio_vs_memcpy", 9, ".2f")]
    for backend in ("gloo", "nccl"):
        if any(f"ratio_vs_{backend}" in r for r in records):
            columns.append((f"vs {backend}", f"ratio_vs_{backend}", 8, ".3f"))
    # The path column and the device/host ratio only when device rows exist:
    # host-only output stays as it was.
    with_paths = any(r.get("path") == "device" for r in records)
    if with_paths:
        columns.insert(0, ("dev/host", "ratio_vs_host", 8, ".2f"))
    path_title = f" {'path':<6}" if with_paths else ""
    header = f"{'transport':<9} {'op':<5}{path_title} {'size':>9} {'iters':>6} {'p50 us':>9} {'p99 us':>9}" + "".join(
        f" {title:>{width}}" for title, _, width, _ in columns)
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in records:
        cells = "".join(f" {format(r[key], fmt):>{width}}" if r.get(key) else f" {'-':>{width}}"
                        for _, key, width, fmt in columns)
        path_cell = f" {r.get('path', '-'):<6}" if with_paths else ""
        print(f"{r['transport']:<9} {r['op']:<5}{path_cell} {r['size_bytes']:>9} {r['iterations']:>6} "
              f"{r['p50_us']:9.2f} {r['p99_us']:9.2f}{cells}", file=file)
    print("vs X = lamina-net p50 / X p50 at the same size, measured in this run. ref: plain C ping-pong in "
          "bench/ that spins like lamina-net; blk ref: the tcp one with blocking recv; memcpy: one memcpy of "
          "that size; gloo/nccl: torch.distributed send/recv", file=file)
    if with_paths:
        print("path host: the host API; device: the device API from CPU threads, through the descriptor ring "
              "and its proxy thread; dev/host = device p50 / host p50, same transport and size, this run", file=file)


def run(args) -> int:
    if args.bench == "rate":
        return run_rate(args)
    if args.bench in ("exchange", "compare", "table"):
        from . import bench_exchange, bench_report
        return {"exchange": bench_exchange.run_exchange, "compare": bench_report.run_compare,
                "table": bench_report.run_table}[args.bench](args)
    if args.bench == "bandwidth":
        from . import bench_bandwidth
        return bench_bandwidth.run(args)
    return run_latency(args)


def run_latency(args) -> int:
    sizes = _parse_sizes(args.sizes)
    paths = _parse_paths(args.path)
    if "device" in paths and args.op != "put":
        raise SystemExit("lamina-net bench: --path device runs the put-with-signal ping-pong (--op put) only")
    if args.iterations < 0 or args.warmup < 0:
        raise SystemExit("lamina-net bench: --iterations and --warmup must be >= 0")
    if args.timeout <= 0:
        raise SystemExit("lamina-net bench: --timeout must be > 0")
    if args.repeat < 1:
        raise SystemExit("lamina-net bench: --repeat must be >= 1")
    if args.repeat > 1 and args.rank is not None:
        raise SystemExit("lamina-net bench: --repeat runs local ranks only (without --rank)")
    if args.op == "write" and any(s % 8 for s in sizes):
        raise SystemExit("lamina-net bench: --op write needs sizes that are multiples of 8 (the last 8 bytes "
                         "carry the round number)")
    wanted = _available_transports() if args.transport == "all" else [t.strip() for t in args.transport.split(",")]
    for t in wanted:
        if t not in ("tcp", "shm", "verbs"):
            raise SystemExit(f"lamina-net bench: unknown transport {t!r}")
    from .bench_report import progress
    bar = progress(0, "bench latency")  # a cross-host rank shows none
    if args.rank is not None:
        if not args.store:
            raise SystemExit("lamina-net bench: --rank needs --store host:port")
        records = []
        for t in wanted:
            records += run_rank(args.rank, args.world_size, args.store, t, args.op, sizes, args.iterations,
                                args.warmup, args.timeout, f"bench-{t}", paths)
        if args.rank != 0:
            return 0
        if not args.no_reference:
            _compare_with_references(records, wanted, sizes, args)
    else:
        baselines = _baselines(args.baseline)
        # Per round: one step per transport, then one for the references; then one per baseline (run once).
        bar = progress(args.repeat * (len(wanted) + (not args.no_reference)) + len(baselines), "bench latency")
        rounds = []
        for _ in range(args.repeat):
            one = []
            for t in wanted:
                one += run_local_pair(t, args.op, sizes, args.iterations, args.warmup, args.timeout, paths)
                bar.update()
            if not args.no_reference:
                _compare_with_references(one, wanted, sizes, args)
                bar.update()
            rounds.append(one)
        records = merge_rounds(rounds)
    baselines = _baselines(args.baseline) if args.rank is None else []
    for backend in baselines:
        base = run_torch_baseline(backend, sizes, args.iterations, args.warmup, args.timeout)
        by_size = {b["size_bytes"]: b for b in base}
        for r in records:
            b = by_size.get(r["size_bytes"])
            if b:
                r[f"{backend}_p50_us"] = b["p50_us"]
                r[f"ratio_vs_{backend}"] = r["p50_us"] / b["p50_us"] if b["p50_us"] > 0 else None
        records += base
        bar.update()
    bar.close()
    print_table(records)
    from .bench_report import emit
    emit(records, args, "latency")
    return 0


def _compare_with_references(records: list[dict], wanted: list[str], sizes: list[int], args) -> None:
    """Adds the C references' (and memcpy's) p50s to lamina-net's records and the ratios to them, measured now."""
    memcpy = run_memcpy_reference(sizes, args.iterations, args.warmup)
    refs = {t: run_reference(t, sizes, args.iterations, args.warmup) for t in wanted if t in ("tcp", "shm")}
    blocking = run_reference("tcp", sizes, args.iterations, args.warmup, "block") if "tcp" in wanted else {}
    for r in records:
        ref = refs.get(r["transport"], {}).get(r["size_bytes"])
        if ref:
            r["ref_p50_us"] = ref["p50_us"]
            r["ref_p99_us"] = ref["p99_us"]
            r["ratio_vs_ref"] = r["p50_us"] / ref["p50_us"] if ref["p50_us"] > 0 else None
        block = blocking.get(r["size_bytes"]) if r["transport"] == "tcp" else None
        if block:
            r["blocking_ref_p50_us"] = block["p50_us"]
            r["ratio_vs_blocking_ref"] = r["p50_us"] / block["p50_us"] if block["p50_us"] > 0 else None
        if r["transport"] == "shm" and r["size_bytes"] in memcpy:
            r["memcpy_us"] = memcpy[r["size_bytes"]]
            r["ratio_vs_memcpy"] = r["p50_us"] / memcpy[r["size_bytes"]] if memcpy[r["size_bytes"]] > 0 else None


# Figures of a record that are medians over the rounds of --repeat (a ratio:
# the median of each round's own ratio, both sides from the same moment).
_ROUND_FIGURES = ("p50_us", "p99_us", "ref_p50_us", "ref_p99_us", "blocking_ref_p50_us", "memcpy_us",
                  "ratio_vs_ref", "ratio_vs_blocking_ref", "ratio_vs_memcpy", "ratio_vs_host")


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One record per (transport, op, path, size) from R rounds of the same sweep.

    Each figure is the median over the rounds; `rounds` says how many, and
    `ref_ratio_by_round` lists the rounds' own ratios to the C reference so
    the spread shows. A single round comes back unchanged.
    """
    if len(rounds) == 1:
        return rounds[0]
    by_key: dict[tuple, list[dict]] = {}
    for one in rounds:
        for r in one:
            by_key.setdefault((r["transport"], r["op"], r.get("path"), r["size_bytes"]), []).append(r)
    merged = []
    for same in by_key.values():
        out = dict(same[0])
        for key in _ROUND_FIGURES:
            values = [r[key] for r in same if r.get(key) is not None]
            if values:
                out[key] = statistics.median(values)
        out["rounds"] = len(same)
        if any(r.get("ratio_vs_ref") is not None for r in same):
            out["ref_ratio_by_round"] = [r.get("ratio_vs_ref") for r in same]
        merged.append(out)
    return merged


# ---------------------------------------------------------------- bench rate

def rate_rank(rank: int, world_size: int, store: str, transport: str, producers: list[int], size: int, ops: int,
              repeat: int, ring_slots: int, timeout: float, group: str) -> list[dict]:
    """One rank of the put-rate benchmark: rank 0 puts into rank 1's memory; rank 0 returns the records.

    Each repetition measures the host API (Channel::put from one thread, then a
    flush) and then the device API from each producer count (threads posting
    through one DeviceChannel, one proxy thread, then a flush), so every ratio
    compares measurements taken side by side.
    """
    import numpy as np

    from . import Endpoint
    from .core import Access

    peer = 1 - rank
    with Endpoint(rank, world_size, store, group=group, timeout=timeout) as ep:
        target = ep.alloc(max(size, 65536), np.uint8, Access.REMOTE_WRITE)  # puts cycle through it
        ep.publish("rate-target", target)
        ch = ep.channel(peer, transport)
        remote = ep.lookup(peer, "rate-target")
        runs: dict[tuple[str, int], list[dict]] = {}
        ep.barrier("rate-start")
        if rank == 0:
            for _ in range(repeat):
                runs.setdefault(("host", 1), []).append(
                    ep._live().put_rate(ch._live(), "host", 1, size, ops, timeout, remote._desc, ring_slots, -1))
                for p in producers:
                    runs.setdefault(("device", p), []).append(
                        ep._live().put_rate(ch._live(), "device", p, size, ops, timeout, remote._desc, ring_slots, -1))
        # Rank 1 waits here while rank 0 measures: bounded like the whole run.
        ep.barrier("rate-done", timeout=timeout * repeat * (len(producers) + 1) + 60)
        if rank != 0:
            return []
        records = []
        for (path, p), results in runs.items():
            rates = sorted(r["ops"] / r["seconds"] for r in results if r["seconds"] > 0)
            rec = {"bench": "rate", "transport": ch.transport, "path": path, "producers": p, "size_bytes": size,
                   "ops": ops, "repeat": len(results), "ops_per_s": _percentile(rates, 0.5) if rates else 0.0,
                   "ops_per_s_runs": [r["ops"] / r["seconds"] for r in results if r["seconds"] > 0]}
            if path == "device":
                rec["device_path"] = results[0]["device_path"]
                rec["proxy_parks"] = sum(r["parks"] for r in results)
            records.append(rec)
        host = next((r["ops_per_s"] for r in records if r["path"] == "host"), 0.0)
        for r in records:
            if r["path"] == "device" and host > 0:
                r["host_ops_per_s"] = host
                r["ratio_vs_host"] = r["ops_per_s"] / host
        return records


def _rate_main(queue, *args) -> None:
    _report(queue, rate_rank, args)


def print_rate_table(records: list[dict], file=sys.stdout) -> None:
    header = (f"{'transport':<9} {'path':<6} {'producers':>9} {'size':>6} {'ops':>9} {'Mops/s':>8} "
              f"{'dev/host':>8}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in records:
        ratio = f"{r['ratio_vs_host']:8.2f}" if r.get("ratio_vs_host") else f"{'-':>8}"
        print(f"{r['transport']:<9} {r['path']:<6} {r['producers']:>9} {r['size_bytes']:>6} {r['ops']:>9} "
              f"{r['ops_per_s'] / 1e6:8.3f} {ratio}", file=file)
    print("Mops/s: puts per second (median of the repetitions), from the first post to the return of the flush "
          "after the last. host: Channel::put from one thread; device: producer threads posting through one "
          "device channel (descriptor ring, one proxy thread). dev/host = device / host, measured in this run",
          file=file)


def run_rate(args) -> int:
    try:
        producers = [int(p) for p in args.producers.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"lamina-net bench: --producers must be comma-separated integers, got {args.producers!r}")
    if not producers or any(p < 1 or p > 256 for p in producers):
        raise SystemExit("lamina-net bench: producer counts must be in [1, 256]")
    if args.size <= 0 or args.size > (1 << 20):
        raise SystemExit("lamina-net bench: --size must be in [1, 1 MiB]")
    if args.ops <= 0 or args.repeat <= 0:
        raise SystemExit("lamina-net bench: --ops and --repeat must be > 0")
    if args.ring_slots < 2 or args.ring_slots & (args.ring_slots - 1):
        raise SystemExit("lamina-net bench: --ring-slots must be a power of two >= 2")
    if args.timeout <= 0:
        raise SystemExit("lamina-net bench: --timeout must be > 0")
    wanted = _available_transports() if args.transport == "all" else [t.strip() for t in args.transport.split(",")]
    for t in wanted:
        if t not in ("tcp", "shm", "verbs"):
            raise SystemExit(f"lamina-net bench: unknown transport {t!r}")
    records = []
    for t in wanted:
        rate_args = (t, producers, args.size, args.ops, args.repeat, args.ring_slots, args.timeout)
        if args.rank is not None:
            if not args.store:
                raise SystemExit("lamina-net bench: --rank needs --store host:port")
            records += rate_rank(args.rank, args.world_size, args.store, *rate_args, f"rate-{t}")
        else:
            store = f"127.0.0.1:{_free_port()}"
            group = f"rate-{os.getpid()}-{t}"
            os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            records += _run_pair(_rate_main, lambda r: (r, 2, store, *rate_args, group), f"{t} rate benchmark",
                                 args.timeout * args.repeat * (len(producers) + 1) + 60)
    if args.rank is not None and args.rank != 0:
        return 0
    print_rate_table(records)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2))
    return 0
