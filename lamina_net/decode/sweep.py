"""The measured table of docs/decode.md: ``lamina-net decode --check --json`` over a grid of configurations.

``python -m lamina_net.decode.sweep [--workers 1,2] [--micro-batches 1,2,3] [--transports shm,tcp]
[--out DIR] [-- extra decode flags]`` runs one ``lamina-net decode`` process per (workers, n,
transport), each measuring the offloaded pipeline and the monolithic model in the same run, keeps their
JSON reports in ``--out`` and prints a Markdown table. Runs are sequential, so they do not compete for
cores with one another.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _words(text: str) -> list[str]:
    values = [x for x in text.split(",") if x]
    unknown = sorted(set(values) - {"shm", "tcp", "verbs", "auto"})
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown transport(s) {', '.join(unknown) or text!r}")
    return values


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f}"


def _ms_pair(tbt: dict) -> str:
    if not tbt["samples"]:
        return "-"
    return f"{tbt['p50'] * 1e3:.2f} / {tbt['p99'] * 1e3:.2f}"


HEADER = ("| workers | n | transport | tokens/s offloaded | tokens/s monolithic | time between tokens p50 / p99 ms, "
          "offloaded | same, monolithic | network / layer us (request + reply) | compute / layer us (model + "
          "attention) | monolithic compute / layer us | check |\n"
          "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")


def table_row(report: dict) -> str:
    off, mono = report["offloaded"], report["monolithic"]
    layer = off["per_layer_s"]
    network = (f"{_us(layer['network'])} ({_us(layer['network_request'])} + {_us(layer['network_reply'])})"
               if layer["network"] is not None else "-")
    compute = f"{_us(layer['compute'])} ({_us(layer['model_compute'])} + {_us(layer['attention_compute'])})"
    return (f"| {report['attention_workers']} | {report['micro_batches']} | {report['transport']} | "
            f"{off['tokens_per_second']:.0f} | {mono['tokens_per_second']:.0f} | "
            f"{_ms_pair(off['time_between_tokens_s'])} | {_ms_pair(mono['time_between_tokens_s'])} | {network} | "
            f"{compute} | {_us(mono['per_layer_s']['compute'])} | {report['check']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lamina_net.decode.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=_ints, default=[1, 2], help="attention worker counts (default 1,2)")
    parser.add_argument("--micro-batches", type=_ints, default=[1, 2, 3], help="n values (default 1,2,3)")
    parser.add_argument("--transports", type=_words, default=["shm", "tcp"], help="default shm,tcp")
    parser.add_argument("--out", default=None, help="folder for the JSON reports (default: a temporary one)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more lamina-net decode flags")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    out = args.out or tempfile.mkdtemp(prefix="lamina-decode-sweep-")
    os.makedirs(out, exist_ok=True)
    rows, status = [], 0
    for transport in args.transports:
        for workers in args.workers:
            for n in args.micro_batches:
                path = os.path.join(out, f"decode-{transport}-w{workers}-n{n}.json")
                command = [sys.executable, "-m", "lamina_net", "decode", "--check", "--json", path,
                           "--attention-workers", str(workers), "--micro-batches", str(n),
                           "--transport", transport, *extra]
                print("#", " ".join(command[1:]), file=sys.stderr, flush=True)
                done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0 or not os.path.exists(path):
                    status = 1
                    tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
                    rows.append(f"| {workers} | {n} | {transport} | failed: {tail[0]} |")
                    continue
                with open(path) as f:
                    rows.append(table_row(json.load(f)))
    print(HEADER)
    print("\n".join(rows))
    print(f"\nJSON reports in {out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
