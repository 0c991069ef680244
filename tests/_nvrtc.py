"""A few lines of ctypes over NVRTC: compiles CUDA C++ to PTX with no GPU and no nvcc.

Used by the tests to check that ``lamina_net/device.cuh`` compiles the way
cupy's RawModule compiles it (NVRTC: no host compiler, no standard headers).
``find_nvrtc()`` looks at $LAMINA_NET_NVRTC, the ``nvidia-cuda-nvrtc`` wheel
(``nvidia/cu13/lib``), cupy's CUDA path and the loader's path.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from typing import Optional, Sequence


def find_nvrtc() -> Optional[str]:
    candidates = []
    if os.environ.get("LAMINA_NET_NVRTC"):
        candidates.append(os.environ["LAMINA_NET_NVRTC"])
    try:
        import nvidia  # the nvidia-cuda-nvrtc wheel (a namespace package)

        for root in getattr(nvidia, "__path__", []):
            candidates += sorted(glob.glob(os.path.join(root, "cu1*", "lib", "libnvrtc.so*")), reverse=True)
            candidates += sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")), reverse=True)
    except ImportError:
        pass
    for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
        candidates += sorted(glob.glob(os.path.join(d, "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for c in candidates:
        if "builtins" in os.path.basename(c) or ".alt." in os.path.basename(c):
            continue
        # libnvrtc dlopens its builtins by soname: load the ones beside it first.
        for builtins in sorted(glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*"))):
            if ".alt." not in builtins:
                try:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
        try:
            ctypes.CDLL(c)
            return c
        except OSError:
            continue
    return None


def compile_to_ptx(source: str, options: Sequence[str], library: Optional[str] = None, name: str = "k.cu") -> str:
    """PTX of ``source``; raises RuntimeError with NVRTC's log when it does not compile."""
    lib = ctypes.CDLL(library or find_nvrtc())
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    if rc != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed ({rc})")
    try:
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
