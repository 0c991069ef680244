"""``lamina-net info``: build options, usable transports and LAMINA_NET_* settings."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", action="store_true", help="also list every LAMINA_NET_* setting")


def run(args) -> int:
    from . import __version__, _core

    ok, why = _core.verbs_available()
    print(f"lamina-net {__version__}")
    print(f"  built with verbs: {_core.HAVE_VERBS}   built with CUDA: {_core.HAVE_CUDA}")
    print(f"  transports: tcp, shm{', verbs' if ok else ''}")
    if not ok:
        print(f"  verbs unavailable: {why}")
    # The device API: the proxy always; each direct back end where its probe passes.
    print("  device paths: proxy (every transport)")
    for path, available, detail, failed in _core.direct_paths():
        if available:
            print(f"    {path}: available ({detail})")
        else:
            print(f"    {path}: unavailable, falls back to the proxy:")
            for line in failed:
                print(f"      - {line}")
    # The runtime is linked statically: the driver must be at least as new
    # (cuda_versions says so in the same line when it is not).
    cuda = _core.cuda_versions() if _core.HAVE_CUDA else "built without CUDA"
    kernels = getattr(_core, "HAVE_CUDA_KERNELS", False)
    print(f"  CUDA: {cuda}" + ("" if not _core.HAVE_CUDA else
                                "; stream-ordered operations: " + ("yes" if kernels else "no (built without nvcc)")))
    if args.settings:
        print("\nsetting                         default     current     description")
        for name, default, current, desc in _core.settings():
            print(f"  LAMINA_NET_{name:<20} {default!s:<11} {current!s:<11} {desc}")
    return 0
