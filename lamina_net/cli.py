"""The ``lamina-net`` command line: ``bench``, ``decode``, ``plan``, ``info``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when chosen, so ``lamina-net plan``
works without the compiled core or torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = {
    "bench": ("lamina_net.bench_cli", "benchmarks over tcp/shm/verbs: ping-pong latency (host and device API), "
                                       "device put rate"),
    "decode": ("lamina_net.decode.cli", "reference decode pipeline with attention offloaded to workers"),
    "plan": ("lamina_net.plan.cli", "size and price an attention-offloaded deployment"),
    "info": ("lamina_net.info_cli", "build options, available transports and settings"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamina-net", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Argument definitions are cheap to import; heavy imports happen in run().
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
