#!/usr/bin/env python3
"""lamina-net verbs against perftest, side by side on one RDMA device.

Latency (one-way = half the round trip, p50), all in the same run:
- ``lamina-net bench latency --transport verbs --op write``: a plain put (one
  RDMA WRITE) whose last 8 bytes carry the round number, polled by the peer,
  against perftest's ``ib_write_lat`` (the same method; t_typical). This is
  the issue's "one-way RDMA WRITE latency" target (<= 1.15x, 8 B .. 64 KiB).
  Each size runs as a pair (the two programs back to back, the order
  alternating by round) in --rounds rounds; the median of the pair ratios is
  the figure judged, the ratio of the medians is printed beside it.
- ``--op put`` (put-with-signal: WRITE + ATOMIC on the signal word) and
  ``--op send`` (send/recv), against ``ib_write_lat`` and against the bare
  verbs floor for the same pattern: ``bench/ref_verbs_pingpong.c``
  (write, write+atomic, write+write, no lamina-net code).
Bandwidth: a stream of lamina-net ``iput``s from a registered source (a
window of outstanding handles, then a flush) against ``ib_write_bw`` (BW
average): one sweep over all sizes, and at the target sizes (--bw-target-sizes,
1 MiB and 4 MiB: the issue's ">= 0.9x for 1 MiB and more") --rounds pairs,
judged like latency by the median pair ratio. Compare the ratios, not the
absolute numbers (under Soft-RoCE in an emulated guest they are slow).

Run it where an RDMA device exists, e.g. in the Soft-RoCE guest:
    scripts/softroce/run-in-guest.sh '.venv/bin/python bench/verbs_vs_perftest.py'
or together with the tests: scripts/softroce/test.sh --bench

Options: --sizes 8,64,... --iterations N --rounds N --bw-target-sizes 1048576,...
--bandwidth-only (just the paired bandwidth rounds) --json PATH
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from statistics import median

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_SIZES = [8, 64, 512, 4096, 32768, 65536, 262144, 1048576]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device() -> tuple[str, int, int]:
    """(device, port, gid index) the way lamina-net picks them: RoCE v2 + IPv4-mapped first."""
    device = os.environ.get("LAMINA_NET_IB_DEVICE") or sorted(os.listdir("/sys/class/infiniband"))[0]
    port = int(os.environ.get("LAMINA_NET_IB_PORT") or 1)
    if os.environ.get("LAMINA_NET_IB_GID_INDEX", "-1") not in ("", "-1"):
        return device, port, int(os.environ["LAMINA_NET_IB_GID_INDEX"])
    base = f"/sys/class/infiniband/{device}/ports/{port}"
    best = (0, 0)
    for name in sorted(os.listdir(f"{base}/gids"), key=int):
        try:
            gid = open(f"{base}/gids/{name}").read().strip()
            kind = open(f"{base}/gid_attrs/types/{name}").read().strip()
        except OSError:
            continue
        if gid.replace(":", "").strip("0") == "":
            continue
        score = 3 if kind == "RoCE v2" and gid.startswith("0000:0000:0000:0000:0000:ffff") else \
            2 if kind == "RoCE v2" else 1
        if score > best[0]:
            best = (score, int(name))
    return device, port, best[1]


def run_perftest(tool: str, device: str, port: int, gid: int, size: int, iterations: int) -> dict:
    """Runs the perftest server and client on this host; returns the client's result row."""
    tcp_port = free_port()
    common = [tool, "-d", device, "-i", str(port), "-x", str(gid), "-s", str(size), "-n", str(iterations),
              "-F", "-p", str(tcp_port)]
    if tool == "ib_write_bw":
        common.append("--report_gbits")
    server = subprocess.Popen(common, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        output = ""
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.3)
            client = subprocess.run(common + ["127.0.0.1"], capture_output=True, text=True, timeout=300)
            output = client.stdout + client.stderr
            if client.returncode == 0:
                break
        else:
            raise RuntimeError(f"{tool} client failed:\n{output}")
    finally:
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    header, row = None, None
    for line in output.splitlines():
        if line.strip().startswith("#bytes"):
            header = re.split(r"\s{2,}", line.strip())
        elif header and re.match(r"^\s*\d+\s+\d+", line):
            row = line.split()
    if not row:
        raise RuntimeError(f"could not parse {tool} output:\n{output}")
    if tool == "ib_write_lat":
        # #bytes #iterations t_min t_max t_typical t_avg t_stdev 99% 99.9%
        return {"typical_us": float(row[4]), "avg_us": float(row[5]), "p99_us": float(row[7])}
    # #bytes #iterations BW peak[Gb/sec] BW average[Gb/sec] MsgRate[Mpps]
    return {"gbps": float(row[3]), "mpps": float(row[4])}


def lamina_latency(sizes: list[int], iterations: int, op: str, spin_us: int) -> dict[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lat.json")
        cmd = [sys.executable, "-m", "lamina_net", "bench", "latency", "--transport", "verbs", "--op", op,
               "--sizes", ",".join(map(str, sizes)), "--iterations", str(iterations), "--warmup", "200",
               "--no-reference", "--baseline", "none", "--json", path]
        # perftest busy-polls; let lamina-net's waits spin as long (they sleep after SPIN_US otherwise).
        env = dict(os.environ, LAMINA_NET_SPIN_US=str(spin_us))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"lamina-net bench failed:\n{proc.stdout}\n{proc.stderr}")
        return {r["size_bytes"]: r for r in json.load(open(path)) if r["transport"] == "verbs"}


def bare_verbs_latency(device: str, gid: int, mode: str, sizes: list[int], iterations: int) -> dict[int, dict]:
    """bench/ref_verbs_pingpong (bare libibverbs) one-way p50/p99 by size; {} when it was not built."""
    from lamina_net.bench_cli import parse_reference_rtt, reference_binary

    exe = reference_binary("ref_verbs_pingpong")
    if exe is None:
        return {}
    text = subprocess.run([str(exe), device, str(gid), mode, ",".join(map(str, sizes)), str(iterations), "200"],
                          capture_output=True, text=True, check=True, timeout=1800).stdout
    return dict(parse_reference_rtt(line) for line in text.splitlines())


def _bandwidth_rank(rank: int, store: str, sizes: list[int], total_bytes: int, window: int, results) -> None:
    try:
        import lamina_net as ln

        with ln.Endpoint(rank, 2, store, group="bw", timeout=120, transports=("verbs",)) as ep:
            max_size = max(sizes)
            target = np.zeros(max_size, np.uint8)
            source = np.ones(max_size, np.uint8)
            rt = ep.register(target, ln.Access.REMOTE_WRITE)
            rsrc = ep.register(source, ln.Access.LOCAL)
            ep.publish("t", rt)
            ch = ep.channel(1 - rank, "verbs")
            pt = ep.lookup(1 - rank, "t")
            out = {}
            for size in sizes:
                count = max(64, min(20000, total_bytes // size))
                ep.barrier(f"bw-{size}")
                if rank == 0:
                    for _ in range(16):  # warm-up
                        ch.put(rsrc, pt, 0, nbytes=size)
                    ch.flush()
                    pending = []
                    t0 = time.perf_counter()
                    for _ in range(count):
                        pending.append(ch.iput(rsrc, pt, 0, nbytes=size))
                        if len(pending) >= window:
                            pending.pop(0).wait()
                    ch.flush()
                    elapsed = time.perf_counter() - t0
                    out[size] = {"gbps": size * count * 8 / elapsed / 1e9, "mpps": count / elapsed / 1e6}
                ep.barrier(f"bw-{size}-done")
            results.put((rank, out))
    except BaseException as e:
        results.put((rank, f"{type(e).__name__}: {e}"))


def lamina_bandwidth(sizes: list[int], total_bytes: int, window: int = 32) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_bandwidth_rank, args=(r, store, sizes, total_bytes, window, results))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join(30)
    for rank, value in got.items():
        if isinstance(value, str):
            raise RuntimeError(f"bandwidth rank {rank}: {value}")
    return got[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--iterations", type=int, default=500, help="latency round trips per size (at least; 10000 up to 4 KiB, 2000 up to 64 KiB)")
    parser.add_argument("--bw-bytes", type=int, default=64 << 20, help="bytes streamed per bandwidth size")
    parser.add_argument("--json", help="write all numbers as JSON")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of the write-latency comparison (each size a lamina-net/ib_write_lat pair per round)")
    parser.add_argument("--bw-target-sizes", default="1048576,4194304",
                        help="sizes whose bandwidth is measured in --rounds lamina-net/ib_write_bw pairs")
    parser.add_argument("--bandwidth-only", action="store_true", help="run only the paired bandwidth rounds")
    parser.add_argument("--spin-us", type=int, default=20000,
                        help="LAMINA_NET_SPIN_US for the latency runs (default 20000: busy-poll like perftest)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    sys.path.insert(0, REPO)
    import lamina_net as ln

    ok, why = ln._core.verbs_available()
    if not ok:
        print(f"verbs_vs_perftest: no RDMA device ({why}); run it in the Soft-RoCE guest", file=sys.stderr)
        return 2
    for tool in ("ib_write_lat", "ib_write_bw"):
        if shutil.which(tool) is None:
            print(f"verbs_vs_perftest: {tool} not found (apt-get install perftest)", file=sys.stderr)
            return 2
    device, port, gid = pick_device()
    print(f"device {device} port {port} gid index {gid}; IB_TIMEOUT={os.environ.get('LAMINA_NET_IB_TIMEOUT', '14')}")

    # The target pair (lamina write vs ib_write_lat) is measured in pairs: for
    # each round and size, the two programs run back to back, lamina-net
    # first in even rounds and perftest first in odd ones, and the ratio is
    # taken within the pair. Under emulation the host flips between a fast
    # and a busy state for seconds at a time (perftest alone moved from 10 to
    # 18 us at 8 B in one boot); a pair shares the state far more often than
    # two sweeps a minute apart do. The median of the pair ratios is the
    # figure judged against the target; the ratio of the medians is printed
    # beside it.
    # Small sizes get more round trips (the same count for every program):
    # 500 rounds of 8 B last ~10 ms, shorter than one hiccup of a shared,
    # emulated machine.
    def iterations_for(size: int) -> int:
        return max(args.iterations, 10000 if size <= 4096 else 2000 if size <= 65536 else 0)

    def perftest_latency(size: int) -> dict:
        result = {}
        for _ in range(3):  # under emulation perftest's cycle calibration sometimes yields inf
            result = run_perftest("ib_write_lat", device, port, gid, size, iterations_for(size))
            if result["typical_us"] < float("inf"):
                break
        return result

    def perftest_bandwidth(size: int) -> dict:
        return run_perftest("ib_write_bw", device, port, gid, size, max(64, min(5000, args.bw_bytes // size)))

    def pair_order(round_index: int) -> tuple[str, str]:
        """Which program of a pair runs first: lamina-net in even rounds, perftest in odd ones."""
        return ("lamina", "perftest") if round_index % 2 == 0 else ("perftest", "lamina")

    # Bandwidth at the target sizes, in pairs like latency (a single sweep of
    # each program, minutes apart, moved between 0.88x and 0.96x at 1 MiB).
    bw_sizes = [int(s) for s in args.bw_target_sizes.split(",") if s]
    bw_pairs: dict = {s: {"lamina_gbps": [], "ib_write_bw_gbps": [], "pair_ratios": []} for s in bw_sizes}
    for r in range(args.rounds):
        for s in bw_sizes:
            got = {}
            for program in pair_order(r):
                if program == "lamina":
                    got["lamina"] = lamina_bandwidth([s], args.bw_bytes)[s]["gbps"]
                else:
                    got["perftest"] = perftest_bandwidth(s)["gbps"]
            bw_pairs[s]["lamina_gbps"].append(got["lamina"])
            bw_pairs[s]["ib_write_bw_gbps"].append(got["perftest"])
            bw_pairs[s]["pair_ratios"].append(got["lamina"] / got["perftest"] if got["perftest"] else float("nan"))
    for s in bw_sizes:
        bw_pairs[s]["median_pair_ratio"] = median(bw_pairs[s]["pair_ratios"])

    def print_bw_pairs() -> None:
        print(f"\nBandwidth at the target sizes, Gb/s ({args.rounds} rounds, each a lamina-net iput stream / "
              f"ib_write_bw pair back to back, order alternating by round; target: median pair ratio >= 0.9x)")
        print(f"{'bytes':>9} {'lamina':>9} {'ib_write_bw':>12} {'median pair ratio':>18} {'pair ratios':>30}")
        for s in bw_sizes:
            row = bw_pairs[s]
            pairs = " ".join(f"{x:.2f}" for x in row["pair_ratios"])
            print(f"{s:>9} {median(row['lamina_gbps']):>9.3f} {median(row['ib_write_bw_gbps']):>12.3f} "
                  f"{row['median_pair_ratio']:>17.2f}x {pairs:>30}")

    if args.bandwidth_only:
        print_bw_pairs()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "gid_index": gid, "bandwidth_pairs": bw_pairs}, f, indent=2)
        return 0

    rounds_write: list[dict] = [{} for _ in range(args.rounds)]
    rounds_perf: list[dict] = [{} for _ in range(args.rounds)]
    rounds_bare: list[dict] = []
    for r in range(args.rounds):
        for s in sizes:
            for program in pair_order(r):
                if program == "lamina":
                    rounds_write[r].update(lamina_latency([s], iterations_for(s), "write", args.spin_us))
                else:
                    rounds_perf[r][s] = perftest_latency(s)
        bare_write = {}
        for s in sizes:
            bare_write.update(bare_verbs_latency(device, gid, "write", [s], iterations_for(s)))
        rounds_bare.append(bare_write)
    lat_write = {s: {"p50_us": median([r[s]["p50_us"] for r in rounds_write]),
                     "p99_us": median([r[s]["p99_us"] for r in rounds_write]),
                     "rounds_p50_us": [r[s]["p50_us"] for r in rounds_write]} for s in sizes}
    perf_lat = {s: {"typical_us": median([r[s]["typical_us"] for r in rounds_perf]),
                    "rounds_typical_us": [r[s]["typical_us"] for r in rounds_perf]} for s in sizes}
    pair_ratios = {s: [w[s]["p50_us"] / p[s]["typical_us"] for w, p in zip(rounds_write, rounds_perf)]
                   for s in sizes}
    for s in sizes:
        lat_write[s]["pair_ratios"] = pair_ratios[s]
        lat_write[s]["median_pair_ratio"] = median(pair_ratios[s])
    bare = {"write": {s: {"p50_us": median([r[s]["p50_us"] for r in rounds_bare])}
                      for s in sizes if all(s in r for r in rounds_bare)}}
    lat = lamina_latency(sizes, args.iterations, "put", args.spin_us)
    lat_send = lamina_latency(sizes, args.iterations, "send", args.spin_us)
    for mode in ("write+atomic", "write+write"):
        bare[mode] = bare_verbs_latency(device, gid, mode, sizes, args.iterations)
    bw = lamina_bandwidth(sizes, args.bw_bytes)
    perf_bw = {s: perftest_bandwidth(s) for s in sizes}

    def cell(table: dict, s: int) -> str:
        return f"{table[s]['p50_us']:.2f}" if s in table else "-"

    def ratio(x: float, table: dict, s: int) -> str:
        return f"{x / table[s]['p50_us']:.2f}x" if s in table else "-"

    print(f"\nOne-way RDMA WRITE latency, microseconds (p50; the peer polls the payload's last word; "
          f"{args.rounds} rounds, each size run as a lamina-net/ib_write_lat pair back to back, order "
          f"alternating by round; round trips: {', '.join(f'{iterations_for(s)}' for s in sizes)}; "
          f"target: pair ratio <= 1.15x up to 64 KiB)")
    print(f"{'bytes':>9} {'lamina put':>11} {'p99':>9} {'ib_write_lat':>13} {'ratio of medians':>17} "
          f"{'median pair ratio':>18} {'pair ratios':>30} {'bare verbs':>11}")
    for s in sizes:
        ref = perf_lat[s]["typical_us"]
        pairs = " ".join(f"{x:.2f}" for x in pair_ratios[s])
        print(f"{s:>9} {lat_write[s]['p50_us']:>11.2f} {lat_write[s]['p99_us']:>9.2f} {ref:>13.2f} "
              f"{lat_write[s]['p50_us'] / ref:>16.2f}x {lat_write[s]['median_pair_ratio']:>17.2f}x {pairs:>30} "
              f"{cell(bare['write'], s):>11}")
    print("\nput-with-signal and send/recv, one-way p50 microseconds (bare: the same pattern in plain "
          "libibverbs, bench/ref_verbs_pingpong.c)")
    print(f"{'bytes':>9} {'put+signal':>11} {'bare w+atomic':>14} {'vs bare':>8} {'vs ib_write_lat':>16} "
          f"{'bare w+write':>13} {'send/recv':>10} {'vs ib_write_lat':>16}")
    for s in sizes:
        ref = perf_lat[s]["typical_us"]
        print(f"{s:>9} {lat[s]['p50_us']:>11.2f} {cell(bare['write+atomic'], s):>14} "
              f"{ratio(lat[s]['p50_us'], bare['write+atomic'], s):>8} {lat[s]['p50_us'] / ref:>15.2f}x "
              f"{cell(bare['write+write'], s):>13} {lat_send[s]['p50_us']:>10.2f} {lat_send[s]['p50_us'] / ref:>15.2f}x")
    print("\nBandwidth sweep, Gb/s (one run each; lamina: iput stream, window 32, registered source; "
          "perftest: ib_write_bw average)")
    print(f"{'bytes':>9} {'lamina':>9} {'ib_write_bw':>12} {'ratio':>7}")
    for s in sizes:
        ratio = bw[s]["gbps"] / perf_bw[s]["gbps"] if perf_bw[s]["gbps"] else float("nan")
        print(f"{s:>9} {bw[s]['gbps']:>9.3f} {perf_bw[s]['gbps']:>12.3f} {ratio:>6.2f}x")
    print_bw_pairs()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "gid_index": gid, "lamina_write_latency": lat_write,
                       "lamina_latency": lat, "lamina_send_latency": lat_send, "bare_verbs_latency": bare,
                       "ib_write_lat": perf_lat,
                       "lamina_bandwidth": bw, "ib_write_bw": perf_bw, "bandwidth_pairs": bw_pairs},
                      f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
