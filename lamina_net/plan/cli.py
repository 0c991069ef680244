"""``lamina-net plan``: size and price an attention-offloaded deployment.

Imports nothing heavy at module level: lamina_net/cli.py imports this module
for every command line it parses. matplotlib is imported only for ``--plot``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

PROG = "lamina-net plan"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _open_fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {value:g}")
    return value


def _efficiency(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def _non_negative(text: str) -> float:
    value = _float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _split(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected A,B (compute,attention device counts), got {text!r}")
    return _positive_int(parts[0].strip()), _positive_int(parts[1].strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the ``plan`` flags on ``parser`` (a subparser of lamina-net)."""
    what = parser.add_argument_group("what to serve")
    what.add_argument("--model", metavar="NAME|PATH", default="llama3-70b",
                      help="preset (llama-33b, llama-65b, llama3-70b) or a Hugging Face config.json "
                           "(or its directory); default %(default)s")
    what.add_argument("--dtype", metavar="DTYPE", default=None,
                      help="override the config's torch_dtype for weights, KV cache and activations "
                           "(float16, bfloat16, float32, fp8)")
    what.add_argument("--context", metavar="TOKENS", type=_positive_int, default=4096,
                      help="tokens in each request's KV cache (prompt + generated so far); default %(default)s")
    what.add_argument("--batch", metavar="N", type=_positive_int, default=300,
                      help="requests decoded together in one iteration; default %(default)s")
    what.add_argument("--alpha", metavar="FRACTION", type=_open_fraction, default=0.2,
                      help="networking may add this fraction of MTIME+ATIME; sizes the minimum "
                           "bandwidth; default %(default)s")

    where = parser.add_argument_group("hardware")
    where.add_argument("--compute", metavar="DEVICE", default="h100",
                       help="device for weights and non-attention operators; default %(default)s")
    where.add_argument("--attention", metavar="DEVICE", default="h20",
                       help="device for the KV cache and attention; default %(default)s")
    where.add_argument("--devices", metavar="FILE", default=None,
                       help="JSON file of extra devices: {name: {bf16_tflops, memory_gb, "
                            "memory_bandwidth_gbs, price_per_hour, nic_gbps}}")
    where.add_argument("--max-devices", metavar="N", type=_positive_int, default=8,
                       help="largest a, b and tensor-parallel size to enumerate; default %(default)s")
    where.add_argument("--dop", type=_split, action="append", metavar="A,B",
                       help="only these DOP(a, b) splits (repeatable)")
    where.add_argument("--tp", type=_positive_int, action="append", metavar="N",
                       help="only these homogeneous N x compute deployments (repeatable)")

    model = parser.add_argument_group("model assumptions")
    model.add_argument("--compute-efficiency", metavar="FRACTION", type=_efficiency, default=0.6,
                       help="achieved fraction of peak FLOPS; default %(default)s")
    model.add_argument("--memory-efficiency", metavar="FRACTION", type=_efficiency, default=0.8,
                       help="achieved fraction of HBM bandwidth; default %(default)s")
    model.add_argument("--network-efficiency", metavar="FRACTION", type=_efficiency, default=0.9,
                       help="achieved fraction of NIC line rate; default %(default)s")
    model.add_argument("--memory-fraction", metavar="FRACTION", type=_efficiency, default=0.9,
                       help="share of device memory for weights and KV cache; default %(default)s")
    model.add_argument("--rtt-us", metavar="US", type=_non_negative, default=33.0,
                       help="compute->attention->compute round trip per layer, us (paper: 33); "
                            "default %(default)s")
    model.add_argument("--microbatches", metavar="N", type=_positive_int, default=1,
                       help="split the batch so compute and attention devices overlap "
                            "(1 = no overlap, 2 = Lamina's ping-pong); default %(default)s")

    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None, help="also write the numbers as JSON")
    out.add_argument("--plot", metavar="PATH", default=None,
                     help="also write a PNG of tokens per dollar against batch size (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Print the plan table (and write --json/--plot); 2 with a message on bad input."""
    # Imported here so parsing `lamina-net <other command>` stays cheap.
    from .devices import device_catalog, resolve_device
    from .errors import PlanError
    from .estimate import Assumptions, make_plan
    from .model import load_model
    from .report import format_table, plan_to_dict, plot_tokens_per_dollar

    try:
        model = load_model(args.model, args.dtype)
        catalog = device_catalog(args.devices)
        compute = resolve_device(catalog, args.compute, "compute")
        attention = resolve_device(catalog, args.attention, "attention")
        assumptions = Assumptions(
            compute_efficiency=args.compute_efficiency,
            memory_efficiency=args.memory_efficiency,
            network_efficiency=args.network_efficiency,
            memory_fraction=args.memory_fraction,
            round_trip_us=args.rtt_us,
            microbatches=args.microbatches,
        )
        plan = make_plan(model, compute, attention, batch=args.batch, context=args.context, alpha=args.alpha,
                         assumptions=assumptions, max_devices=args.max_devices,
                         dop_splits=args.dop, tp_sizes=args.tp)
        sys.stdout.write(format_table(plan))
        if args.json:
            _write_json(plan_to_dict(plan), args.json)
            print(f"wrote {args.json}")
        if args.plot:
            plot_tokens_per_dollar(plan, args.plot)
            print(f"wrote {args.plot}")
    except PlanError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _write_json(document: dict, path: str) -> None:
    import json

    from .errors import PlanError

    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, allow_nan=False)
            handle.write("\n")
    except OSError as exc:
        raise PlanError(f"cannot write {path}: {exc}") from exc


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m lamina_net.plan``)."""
    parser = argparse.ArgumentParser(prog=PROG, description="size and price an attention-offloaded deployment")
    add_arguments(parser)
    return run(parser.parse_args(argv))
