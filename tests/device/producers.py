"""Builds and loads tests/device/cpu_producers.cpp: the device API driven from CPU threads.

The library is compiled with g++ against ``lamina_net.get_include()`` alone
(the header must need nothing else). Builds are cached under
``build/device-check/<hash of source, header and flags>/`` when that is
writable, so a read-only checkout (the Soft-RoCE guest) reuses what the host
built (``python tests/device/producers.py`` builds it; scripts/softroce/test.sh
runs that), and otherwise go to the caller's directory.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from ctypes import POINTER, c_char_p, c_double, c_int, c_longlong, c_uint, c_ulonglong, c_void_p
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SOURCE = os.path.join(HERE, "cpu_producers.cpp")
LIB_NAME = "libcpu_producers.so"
FLAGS = ["-std=c++17", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]

# Operations of ln_produce.
PUT, PUT_SIGNAL, SIGNAL = 0, 1, 2


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def _include_dir() -> str:
    import lamina_net

    return lamina_net.get_include()


def _key(include: str) -> str:
    h = hashlib.sha256()
    for path in (SOURCE, os.path.join(include, "lamina_net", "device.cuh")):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def cached_path() -> str:
    return os.path.join(REPO, "build", "device-check", _key(_include_dir()), LIB_NAME)


def build(fallback_dir: Optional[str] = None) -> str:
    """The path of a library built from the current source and header.

    Uses the cache when it holds one; else compiles (into the cache when it
    is writable, else into fallback_dir). Raises RuntimeError (with the
    reason) when no compiler is found or the build fails.
    """
    cached = cached_path()
    if os.path.isfile(cached):
        return cached
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH to build tests/device/cpu_producers.cpp")
    out_dir = os.path.dirname(cached)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".probe-{os.getpid()}")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError:
        if fallback_dir is None:
            raise
        out_dir = fallback_dir
    out = os.path.join(out_dir, LIB_NAME)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = [cxx, *FLAGS, "-I", _include_dir(), SOURCE, "-o", tmp, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    os.replace(tmp, out)  # atomic: concurrent builders of the same key agree
    return out


class Lib:
    """ctypes view of the library; every call takes the handle's bytes and
    releases the GIL while it runs."""

    def __init__(self, path: str):
        self.path = path
        L = ctypes.CDLL(path)
        self._lib = L
        u64, i64, u32 = c_ulonglong, c_longlong, c_uint
        sig = {
            "ln_handle_bytes": ([], u64), "ln_descriptor_bytes": ([], u64), "ln_descriptor_align": ([], u64),
            "ln_control_bytes": ([], u64), "ln_handle_offset": ([c_int], u64), "ln_abi_version": ([], u32),
            "ln_put": ([c_char_p, u32, u64, u32, u64, u64], c_int),
            "ln_put_signal": ([c_char_p, u32, u64, u32, u64, u64, u32, u64, u64], c_int),
            "ln_signal": ([c_char_p, u32, u64, u64], c_int),
            "ln_flush": ([c_char_p], c_int),
            "ln_wait": ([c_char_p, u32, u64, u64], c_int),
            "ln_wait_timed": ([c_char_p, u32, u64, u64, POINTER(i64)], c_int),
            "ln_wait_source_free": ([c_char_p, u64], c_int),
            "ln_put_ticket": ([c_char_p, u32, u64, u32, u64, u64, POINTER(u64)], c_int),
            "ln_status": ([c_char_p], c_int),
            "ln_error_code": ([c_char_p], u64),
            "ln_fill_pattern": ([c_void_p, u64, u64, u64, u64], None),
            "ln_check_pattern": ([c_void_p, u64, u64, u64, u64], i64),
            "ln_check_signal_order": ([c_void_p, c_void_p, c_int, u64, u64, u64, c_double, POINTER(u64)], i64),
            "ln_produce": ([c_char_p, c_int, i64, c_int, u32, u32, u64, u32, u64, u64, u64, c_int,
                            POINTER(c_int), POINTER(i64), POINTER(i64)], c_int),
            "ln_reuse_source": ([c_char_p, c_int, i64, u32, u32, u64, u64, POINTER(c_int)], c_int),
            "ln_post_raw": ([c_char_p, u32, u32, u64, u32, u64, u64, u32, u64, u64], c_int),
            "ln_post_wrong_ticket": ([c_char_p, u64], c_int),
        }
        for name, (args, res) in sig.items():
            fn = getattr(L, name)
            fn.argtypes = args
            fn.restype = res
            setattr(self, name, fn)

    def produce(self, handle: bytes, threads: int, per_thread: int, op: int, *, dst_w: int = 0, src_w: int = 0,
                nbytes: int = 64, sig_w: int = 1, sig_off: int = 0, sig_stride: int = 0, wrap: int = 0,
                flush: bool = False) -> dict:
        """Runs ln_produce; {rc, statuses, posted, elapsed_s (per thread)}."""
        statuses = (c_int * threads)()
        posted = (c_longlong * threads)()
        elapsed = (c_longlong * threads)()
        rc = self.ln_produce(handle, threads, per_thread, op, dst_w, src_w, nbytes, sig_w, sig_off, sig_stride, wrap,
                             int(flush), statuses, posted, elapsed)
        return {"rc": rc, "statuses": list(statuses), "posted": list(posted),
                "elapsed_s": [e / 1e9 for e in elapsed]}

    def reuse_source(self, handle: bytes, threads: int, per_thread: int, *, dst_w: int, src_w: int, nbytes: int,
                     seed: int) -> list:
        """Runs ln_reuse_source; thread statuses."""
        statuses = (c_int * threads)()
        self.ln_reuse_source(handle, threads, per_thread, dst_w, src_w, nbytes, seed, statuses)
        return list(statuses)

    def wait_timed(self, handle: bytes, window: int, offset: int, value: int) -> tuple:
        """(status, seconds) of a device wait on a local word."""
        ns = c_longlong(0)
        s = self.ln_wait_timed(handle, window, offset, value, ctypes.byref(ns))
        return s, ns.value / 1e9

    def fill(self, region, nrecords: int, nbytes: int, seed: int, first: int = 0) -> None:
        assert (first + nrecords) * nbytes <= region.nbytes
        self.ln_fill_pattern(region.ptr, first, nrecords, nbytes, seed)

    def first_bad(self, region, nrecords: int, nbytes: int, seed: int, first: int = 0) -> int:
        """The first record of region that does not hold its pattern, or -1."""
        assert (first + nrecords) * nbytes <= region.nbytes
        return self.ln_check_pattern(region.ptr, first, nrecords, nbytes, seed)

    def check_signal_order(self, inbox, signals, words: int, per_word: int, nbytes: int, seed: int,
                           timeout: float) -> tuple:
        obs = c_ulonglong(0)
        rc = self.ln_check_signal_order(inbox.ptr, signals.ptr, words, per_word, nbytes, seed, timeout,
                                        ctypes.byref(obs))
        return rc, obs.value


def load(path: str) -> Lib:
    return Lib(path)


if __name__ == "__main__":
    # Prebuilds the cached library (scripts/softroce/test.sh, before the guest boots).
    try:
        print(build())
    except (RuntimeError, OSError) as e:
        print(f"tests/device/producers.py: {e}", file=sys.stderr)
        sys.exit(1)
