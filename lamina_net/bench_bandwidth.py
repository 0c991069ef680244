"""``lamina-net bench bandwidth``: GB/s of a windowed put stream per transport and size.

The method is perftest's ``ib_write_bw``: rank 0 keeps a window of W puts
outstanding (iputs from a registered source), the last put of each window
carries a signal, and it waits until the window is applied at the target
before the next one. The loop is in C++ (csrc/channels/bandwidth.cpp), so
no Python is in the measurement; the receiver checks at the end that the
last window's bytes arrived intact and reports it back (``verified``).

Baselines measured in the same run (``--baseline``), each a ratio beside
lamina-net (lamina-net GB/s / baseline GB/s, so above 1 is faster):

* ``memcpy`` (for shm): one thread copying the same source into the same
  destination back to back (``ref_shm_pingpong stream``);
* ``tcp-stream`` (for tcp): a plain C program streaming size-byte messages
  over loopback with blocking send/recv (``bench/ref_tcp_stream.c``);
* ``ib_write_bw`` (for verbs): perftest, when it is installed;
* ``gloo`` / ``nccl``: torch.distributed isend/irecv with the same window.

A baseline that cannot run says why in one line and the rest goes on.
``--repeat R`` runs the sweep R times, lamina-net and the baselines taking
turns to go first, and reports the median GB/s and the median of the
rounds' ratios (each round's ratio compares measurements taken together).
GB/s here is 10^9 bytes per second (``gbps`` in the records).
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import bench_report
from .bench_cli import (_available_transports, _free_port, _parse_sizes, _report, _run_pair, reference_binary)
from .errors import UsageError

DEFAULT_SIZES = [8, 512, 4096, 65536, 262144, 1048576, 4194304]
TRANSPORTS = ("tcp", "shm", "verbs")
REFERENCES = ("memcpy", "tcp-stream", "ib_write_bw")
TORCH_BACKENDS = ("gloo", "nccl")
# Which lamina-net transport each physical reference is compared with.
REFERENCE_FOR = {"memcpy": "shm", "tcp-stream": "tcp", "ib_write_bw": "verbs"}
# Issue 18's targets at 1 MiB and above: lamina-net / reference GB/s.
TARGETS = {"shm": ("memcpy", 0.8), "tcp": ("tcp-stream", 0.9)}
TARGET_MIN_SIZE = 1 << 20


def add_parser(sub) -> None:
    bw = sub.add_parser("bandwidth", help="GB/s of a windowed put stream (as ib_write_bw) per transport and size, "
                                          "beside memcpy, a plain C TCP stream, ib_write_bw and torch.distributed")
    bw.add_argument("--transport", default="all",
                    help="comma-separated: tcp, shm, verbs, or all (the available ones); default all")
    bw.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                    help="comma-separated bytes per put (default 8 B .. 4 MiB)")
    bw.add_argument("--window", type=int, default=64, help="puts outstanding before each wait (default 64)")
    bw.add_argument("--iterations", type=int, default=0,
                    help="measured puts per size, rounded up to whole windows (default: by size, about 512 MiB "
                         "or 128 Ki puts)")
    bw.add_argument("--warmup", type=int, default=128,
                    help="unmeasured puts per size first, rounded up to whole windows (default 128)")
    bw.add_argument("--baseline", default="auto",
                    help="comma-separated baselines measured alongside: memcpy (shm), tcp-stream (tcp), "
                         "ib_write_bw (verbs), gloo, nccl (needs 2 GPUs); none; or auto (the references of the "
                         "transports measured, gloo when torch is installed, nccl too with 2+ GPUs)")
    bw.add_argument("--repeat", type=int, default=3,
                    help="rounds of the whole sweep, lamina-net and the baselines taking turns to go first; the "
                         "median GB/s and the median of the rounds' ratios are reported (default 3)")
    bw.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    bw.add_argument("--plot", metavar="PATH.png", help="plot GB/s against size, one line per system")
    bw.add_argument("--rank", type=int, help="run one rank only (cross-host); needs --store")
    bw.add_argument("--world-size", type=int, default=2)
    bw.add_argument("--store", help="host:port of the store (rank 0 hosts it)")
    bw.add_argument("--timeout", type=float, default=60.0, help="bound in seconds for each wait")


# ------------------------------------------------------------------ options

def windows_for(size: int, window: int, requested_puts: int) -> int:
    """Measured windows for one size: the requested puts rounded up, else ~512 MiB capped at 128 Ki puts."""
    puts = requested_puts if requested_puts > 0 else max(256, min(131072, (512 << 20) // size))
    return max(1, -(-puts // window))


def parse_transports(text: str) -> list[str]:
    if text == "all":
        return _available_transports()
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TRANSPORTS]
    if not names or bad:
        raise UsageError(f"unknown transport {', '.join(bad) or text!r} (tcp, shm, verbs or all)")
    return list(dict.fromkeys(names))


def parse_baselines(text: str, transports: list[str], cross_host: bool) -> tuple[list[str], list[str]]:
    """(baselines to run, one-line reasons for those that cannot run here)."""
    names = [b.strip() for b in text.split(",") if b.strip()]
    known = REFERENCES + TORCH_BACKENDS + ("auto", "none", "perftest")
    bad = [b for b in names if b not in known]
    if not names or bad:
        raise UsageError(f"unknown baseline {', '.join(bad) or text!r} ({', '.join(known)})")
    if "none" in names:
        if len(names) > 1:
            raise UsageError("--baseline none excludes the others")
        return [], []
    auto = "auto" in names
    wanted = [("ib_write_bw" if b == "perftest" else b) for b in names if b != "auto"]
    if auto:
        wanted += [r for r in REFERENCES if REFERENCE_FOR[r] in transports] + ["gloo", "nccl"]
    run, skipped = [], []
    for b in dict.fromkeys(wanted):
        why = _why_not(b, transports, cross_host, explicit=b in names)
        if why is None:
            run.append(b)
        elif why:
            skipped.append(f"baseline {b}: not run, {why}")
    return run, skipped


def _why_not(baseline: str, transports: list[str], cross_host: bool, explicit: bool) -> str | None:
    """None when the baseline can run; else why not ("" = not worth a line: auto and not applicable)."""
    if baseline in REFERENCE_FOR and REFERENCE_FOR[baseline] not in transports:
        return f"it is the reference of {REFERENCE_FOR[baseline]}, which is not measured"
    if baseline == "memcpy":
        return None if reference_binary("ref_shm_pingpong") else "ref_shm_pingpong is not built (LAMINA_NET_BUILD_BENCH)"
    if cross_host and baseline != "memcpy":
        return "it runs on this host only, and this is a cross-host run (--rank)"
    if baseline == "tcp-stream":
        return None if reference_binary("ref_tcp_stream") else "ref_tcp_stream is not built (LAMINA_NET_BUILD_BENCH)"
    if baseline == "ib_write_bw":
        if shutil.which("ib_write_bw") is None:
            return "ib_write_bw is not on PATH (perftest: apt install perftest)"
        return None if _ib_device() else "no RDMA device in /sys/class/infiniband"
    try:
        import torch
    except ImportError:
        return "torch is not installed" if explicit or baseline == "gloo" else ""
    if baseline == "nccl" and not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        return "NCCL needs 2 GPUs" if explicit else ""
    return None


# ------------------------------------------------------------- lamina-net

def bandwidth_rank(rank: int, world_size: int, store: str, transport: str, sizes: list[int], window: int,
                   iterations: int, warmup: int, timeout: float, group: str) -> list[dict]:
    """One rank of the stream: rank 0 puts into rank 1's memory; rank 0 returns the records."""
    import numpy as np

    from . import Endpoint
    from .core import Access

    peer = 1 - rank
    warmup_windows = -(-warmup // window)
    with Endpoint(rank, world_size, store, group=group, timeout=timeout) as ep:
        # Shareable memory, as a bandwidth-minded user would allocate it.
        rbuf = ep.alloc(max(max(sizes), 64), np.uint8, Access.REMOTE_WRITE)
        rsig = ep.alloc(1, np.uint64, Access.REMOTE_ATOMIC)
        ep.publish("bw-buf", rbuf)
        ep.publish("bw-sig", rsig)
        ch = ep.channel(peer, transport)
        remote_buf, remote_sig = ep.lookup(peer, "bw-buf"), ep.lookup(peer, "bw-sig")
        records = []
        for size in sizes:
            windows = windows_for(size, window, iterations)
            base = rsig.read_u64(0)  # before the barrier: the peer may put right after it
            ep.barrier(f"bw-{size}")
            r = ep._live().bandwidth(ch._live(), size, window, windows, warmup_windows, rank == 0, timeout,
                                     rbuf._live(), rsig._live(), remote_buf._desc, remote_sig._desc, base)
            if rank == 0:
                records.append({"system": "lamina-net", "metric": "bandwidth", "transport": ch.transport,
                                "op": "put", "size_bytes": size, "window": window, "iterations": r["puts"],
                                "seconds": r["seconds"], "gbps": r["bytes"] / r["seconds"] / 1e9,
                                "verified": r["verified"], "signals_seen": r["signals_seen"],
                                "first_bad_offset": r["first_bad"]})
        ep.barrier("bw-done")
        return records


def _bandwidth_main(queue, *args) -> None:
    _report(queue, bandwidth_rank, args)


def run_local_pair(transport: str, sizes: list[int], window: int, iterations: int, warmup: int,
                   timeout: float) -> list[dict]:
    store = f"127.0.0.1:{_free_port()}"
    group = f"bw-{os.getpid()}-{transport}"
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads would spin beside the loop
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    windows = sum(windows_for(s, window, iterations) for s in sizes) + len(sizes) * (-(-warmup // window))
    return _run_pair(_bandwidth_main,
                     lambda r: (r, 2, store, transport, sizes, window, iterations, warmup, timeout, group),
                     f"{transport} bandwidth benchmark", timeout * (windows + 4) + 60)


# -------------------------------------------------------------- baselines

def _parse_stream_lines(text: str) -> dict[int, float]:
    """{size: GB/s} from the C references' "size=.. count=.. seconds=.. gbps=.." lines."""
    out = {}
    for line in text.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split())
        out[int(fields["size"])] = float(fields["gbps"])
    return out


def run_reference(name: str, sizes: list[int], window: int, iterations: int, warmup: int,
                  timeout: float) -> list[dict]:
    """memcpy or tcp-stream: one run of the plain C program per size, same puts as lamina-net."""
    from . import _core

    records = []
    for size in sizes:
        puts = windows_for(size, window, iterations) * window
        if name == "memcpy":
            args = [str(reference_binary("ref_shm_pingpong")), "stream", str(size), str(puts), str(warmup)]
        else:
            buffer = dict((s[0], s[2]) for s in _core.settings())["TCP_BUFFER"]  # as lamina-net's sockets
            args = [str(reference_binary("ref_tcp_stream")), str(size), str(puts), str(warmup), buffer]
        text = subprocess.run(args, capture_output=True, text=True, check=True, timeout=timeout + 60).stdout
        records.append({"system": name, "metric": "bandwidth", "transport": "memcpy" if name == "memcpy" else "tcp",
                        "size_bytes": size, "iterations": puts, "gbps": _parse_stream_lines(text)[size]})
    return records


def _ib_device() -> tuple[str, int, int] | None:
    """(device, port, gid index) for perftest: LAMINA_NET_IB_* where set, else the first device, RoCE v2 first."""
    root = Path("/sys/class/infiniband")
    devices = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    device = os.environ.get("LAMINA_NET_IB_DEVICE") or (devices[0] if devices else "")
    if not device:
        return None
    port = int(os.environ.get("LAMINA_NET_IB_PORT") or 1)
    if os.environ.get("LAMINA_NET_IB_GID_INDEX", "-1") not in ("", "-1"):
        return device, port, int(os.environ["LAMINA_NET_IB_GID_INDEX"])
    best = (0, 0)
    gids = root / device / "ports" / str(port)
    for entry in sorted((gids / "gids").iterdir(), key=lambda p: int(p.name)) if (gids / "gids").is_dir() else []:
        try:
            gid = entry.read_text().strip()
            kind = (gids / "gid_attrs" / "types" / entry.name).read_text().strip()
        except OSError:
            continue
        if gid.replace(":", "").strip("0"):
            score = 1 + (kind == "RoCE v2") + gid.startswith("0000:0000:0000:0000:0000:ffff")
            best = max(best, (score, int(entry.name)))
    return device, port, best[1]


def run_ib_write_bw(sizes: list[int], window: int, iterations: int, timeout: float) -> list[dict]:
    """perftest's ib_write_bw, server and client on this host, same size, puts and window (tx depth)."""
    device, port, gid = _ib_device()
    records = []
    for size in sizes:
        puts = windows_for(size, window, iterations) * window
        common = ["ib_write_bw", "-d", device, "-i", str(port), "-x", str(gid), "-s", str(size), "-n", str(puts),
                  "-t", str(min(window, puts)), "-F", "--report_gbits", "-p", str(_free_port())]
        server = subprocess.Popen(common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            output, deadline = "", time.monotonic() + timeout
            while time.monotonic() < deadline:  # the server needs a moment to listen
                time.sleep(0.3)
                client = subprocess.run(common + ["127.0.0.1"], capture_output=True, text=True, timeout=timeout)
                output = client.stdout + client.stderr
                if client.returncode == 0:
                    break
            else:
                raise RuntimeError(f"ib_write_bw client failed: {output.strip().splitlines()[-1:]}")
        finally:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        # #bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]
        rows = [line.split() for line in output.splitlines() if re.match(r"^\s*\d+\s+\d+\s", line)]
        if not rows:
            raise RuntimeError("could not parse the ib_write_bw output")
        records.append({"system": "ib_write_bw", "metric": "bandwidth", "transport": "verbs", "size_bytes": size,
                        "window": min(window, puts), "iterations": puts, "gbps": float(rows[-1][3]) / 8})
    return records


def _torch_rank(queue, backend: str, rank: int, port: int, sizes: list[int], window: int, iterations: int,
                warmup: int, timeout: float) -> None:
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=timeout))
        device = "cuda" if backend == "nccl" else "cpu"
        if device == "cuda":
            torch.cuda.set_device(rank)
        records = []
        for size in sizes:
            windows = windows_for(size, window, iterations)
            buf = torch.ones(size, dtype=torch.uint8, device=device)
            ack = torch.zeros(1, dtype=torch.uint8, device=device)
            dist.barrier()
            start = time.perf_counter()
            for w in range(-(-warmup // window) + windows):
                if w == -(-warmup // window):
                    start = time.perf_counter()
                op = dist.isend if rank == 0 else dist.irecv
                for req in [op(buf, 1 - rank) for _ in range(window)]:
                    req.wait()
            # The time ends when the receiver has everything, as lamina-net's applied-at-target wait.
            if rank == 0:
                dist.recv(ack, 1)
            else:
                dist.send(ack, 0)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            records.append({"system": backend, "metric": "bandwidth", "transport": backend, "op": "send",
                            "size_bytes": size, "window": window, "iterations": windows * window,
                            "seconds": seconds, "gbps": size * windows * window / seconds / 1e9})
        dist.destroy_process_group()
        queue.put(("ok", records if rank == 0 else None))
    except BaseException as e:  # reported by the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_torch(backend: str, sizes: list[int], window: int, iterations: int, warmup: int,
              timeout: float) -> list[dict]:
    port = _free_port()
    return _run_pair(_torch_rank, lambda r: (backend, r, port, sizes, window, iterations, warmup, timeout),
                     f"{backend} baseline", timeout * (len(sizes) + 2) + 60)


def attach_ratios(records: list[dict], baseline: list[dict], name: str) -> None:
    """Adds <name>_gbps and ratio_vs_<name> (lamina-net / baseline GB/s) to the lamina-net records it applies to."""
    key = name.replace("-", "_")
    by_size = {b["size_bytes"]: b["gbps"] for b in baseline}
    for r in records:
        if r["system"] != "lamina-net" or (name in REFERENCE_FOR and r["transport"] != REFERENCE_FOR[name]):
            continue
        gbps = by_size.get(r["size_bytes"])
        if gbps:
            r[f"{key}_gbps"] = gbps
            r[f"ratio_vs_{key}"] = r["gbps"] / gbps


# ------------------------------------------------------------------ output

COLUMNS = [("memcpy", "memcpy"), ("tcp-stream", "C tcp"), ("ib_write_bw", "ib_wr_bw"), ("gloo", "gloo"),
           ("nccl", "nccl")]


def print_table(records: list[dict], file=sys.stdout) -> None:
    """One row per lamina-net transport and size: GB/s, then each baseline's GB/s and the ratio."""
    ours = [r for r in records if r["system"] == "lamina-net"]
    present = [(n, t) for n, t in COLUMNS if any(f"ratio_vs_{n.replace('-', '_')}" in r for r in ours)]
    header = f"{'transport':<9} {'size':>9} {'window':>6} {'puts':>7} {'GB/s':>8} {'ok':>3}" + "".join(
        f" {title:>8} {'vs ' + title:>11}" for _, title in present)
    print(header, file=file)
    print("-" * len(header), file=file)
    for r in ours:
        cells = ""
        for name, _ in present:
            key = name.replace("-", "_")
            cells += (f" {r[key + '_gbps']:8.4g} {r['ratio_vs_' + key]:11.3g}" if f"ratio_vs_{key}" in r
                      else f" {'-':>8} {'-':>11}")
        print(f"{r['transport']:<9} {r['size_bytes']:>9} {r['window']:>6} {r['iterations']:>7} {r['gbps']:8.4g} "
              f"{'yes' if r['verified'] else 'NO':>3}{cells}", file=file)
    print("GB/s = 10^9 bytes/s over the measured puts, from the first put to the last window applied at the target. "
          "ok: the receiver found the last window's bytes and every signal. vs X = lamina-net GB/s / X GB/s at the "
          "same size, measured in this run (above 1: faster). memcpy: one thread, same source and destination; "
          "C tcp: bench/ref_tcp_stream.c over loopback; ib_wr_bw: perftest; gloo/nccl: torch.distributed "
          "isend/irecv, same window", file=file)


def target_lines(records: list[dict]) -> list[str]:
    """Issue 18's bandwidth targets at 1 MiB and above, as measured ratios."""
    lines = []
    for transport, (reference, goal) in TARGETS.items():
        key = f"ratio_vs_{reference.replace('-', '_')}"
        got = [(r["size_bytes"], r[key]) for r in records
               if r["system"] == "lamina-net" and r["transport"] == transport and r["size_bytes"] >= TARGET_MIN_SIZE
               and key in r]
        if not got:
            continue
        worst = min(ratio for _, ratio in got)
        sizes = ", ".join(f"{s >> 20} MiB {ratio:.2f}x" for s, ratio in got)
        lines.append(f"target {transport} >= {goal}x {reference} at >= 1 MiB: {sizes} -> "
                     f"{'met' if worst >= goal else 'NOT met'}")
    return lines


# -------------------------------------------------------------------- main

def _measure_lamina(args, transports: list[str], sizes: list[int]) -> list[dict]:
    records = []
    for t in transports:
        if args.rank is not None:
            records += bandwidth_rank(args.rank, args.world_size, args.store, t, sizes, args.window,
                                      args.iterations, args.warmup, args.timeout, f"bench-bw-{t}")
        else:
            records += run_local_pair(t, sizes, args.window, args.iterations, args.warmup, args.timeout)
    return records


def _measure_baseline(name: str, args, sizes: list[int]) -> list[dict]:
    if name in ("memcpy", "tcp-stream"):
        return run_reference(name, sizes, args.window, args.iterations, args.warmup, args.timeout)
    if name == "ib_write_bw":
        return run_ib_write_bw(sizes, args.window, args.iterations, args.timeout)
    return run_torch(name, sizes, args.window, args.iterations, args.warmup, args.timeout)


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One record per system, transport and size: the median GB/s and the median of the rounds' ratios."""
    groups: dict[tuple, list[dict]] = {}
    for records in rounds:
        for r in records:
            groups.setdefault((r["system"], r["transport"], r["size_bytes"]), []).append(r)
    merged = []
    for runs in groups.values():
        bad = [r for r in runs if r.get("verified") is False]
        out = dict(bad[0] if bad else runs[0])
        out["repeat"] = len(runs)
        out["gbps_runs"] = [r["gbps"] for r in runs]
        if "seconds" in out:
            out.pop("seconds")
            out["seconds_runs"] = [r["seconds"] for r in runs]
        for key in [k for k in out if k == "gbps" or k.startswith("ratio_vs_") or k.endswith("_gbps")]:
            out[key] = statistics.median(r[key] for r in runs if key in r)
        if "verified" in out:
            out["verified"] = not bad
        merged.append(out)
    return merged



def run(args) -> int:
    try:
        return _run(args)
    except UsageError as e:
        raise SystemExit(f"lamina-net bench bandwidth: {e}")


def _run(args) -> int:
    try:
        sizes = _parse_sizes(args.sizes)
    except SystemExit as e:  # the latency parser's wording, as a typed error
        raise UsageError(str(e).removeprefix("lamina-net bench: "))
    if args.window < 1 or args.window > 65536:
        raise UsageError("--window must be in [1, 65536]")
    if args.iterations < 0 or args.warmup < 0:
        raise UsageError("--iterations and --warmup must be >= 0")
    if not args.timeout > 0:
        raise UsageError("--timeout must be > 0")
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    transports = parse_transports(args.transport)
    if args.rank is not None and not args.store:
        raise UsageError("--rank needs --store host:port")
    baselines, skipped = parse_baselines(args.baseline, transports, cross_host=args.rank is not None)
    failing: set[str] = set()
    rounds = []
    for i in range(args.repeat):
        # lamina-net first in even rounds, the baselines first in odd ones: a shared machine's load
        # changes for seconds at a time, and each round's ratios compare measurements taken together.
        got: dict[str, list[dict]] = {}
        for part in (["lamina-net"] + baselines)[::1 if i % 2 == 0 else -1]:
            if part == "lamina-net":
                got[part] = _measure_lamina(args, transports, sizes)
            elif part not in failing and (args.rank is None or args.rank == 0):
                try:
                    got[part] = _measure_baseline(part, args, sizes)
                except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
                    failing.add(part)
                    skipped.append(f"baseline {part}: failed, {' '.join(str(e).split())[:200]}")
        for name in baselines:
            if name in got:
                attach_ratios(got["lamina-net"], got[name], name)
        rounds.append([r for records in got.values() for r in records])
    if args.rank is not None and args.rank != 0:
        return 0
    records = merge_rounds(rounds)
    print_table(records)
    for line in skipped + target_lines(records):
        print(line)
    bench_report.emit(records, args, "bandwidth")
    failed = [r for r in records if r["system"] == "lamina-net" and not r["verified"]]
    for r in failed:
        print(f"{r['transport']} {r['size_bytes']} B: the bytes did not arrive intact (first bad offset "
              f"{r['first_bad_offset']}, {r['signals_seen']} windows signalled)", file=sys.stderr)
    return 1 if failed else 0
