"""Tier 2 (one GPU): the device API on a GPU and the GPU-path defects of issue 15, item 10.

Kernels (cupy RawModule, compiled by NVRTC against ``lamina_net.get_include()``)
put and signal through the proxy into another process and wait on signals its
peer writes; the stream-ordered host API is captured in CUDA graphs and
replayed; kernels stop with an error, within their bound, when the peer dies or
the channel closes. Skipped, with the reason, without a GPU or cupy.

The build checks (NVRTC compiles the header and every kernel source here; nvcc
compiles every .cu file of the library for sm_80 and sm_90) and the typed
errors of the stream API without a GPU need no GPU and run wherever they can.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import lamina_net as ln
from lamina_net import _core
from lamina_net import device as lnd

from conftest import compiler_env, assert_all_ok, nvcc_path, run_ranks
import _gpu_workers as gw
import _nvrtc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_unavailable() -> str | None:
    if not _core.HAVE_CUDA:
        return "lamina-net built without CUDA"
    if not getattr(_core, "HAVE_CUDA_KERNELS", False):
        return "lamina-net built without its CUDA kernels (no nvcc at build time)"
    versions = _core.cuda_versions()
    if "no CUDA driver" in versions or "older than the runtime" in versions:
        return f"no usable CUDA driver: {versions}"
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install 'lamina-net[cupy]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return "no CUDA device"
    except Exception as e:  # cupy's CUDARuntimeError and friends
        return f"no CUDA device: {e}"
    return None


GPU_REASON = _gpu_unavailable()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- kernels through the proxy

SIZES = [1, 8, 4096, 65536 + 3, 1 << 20, (3 << 20) + 5]


@needs_gpu
@pytest.mark.parametrize("target", ["host", "gpu"])
def test_kernel_put_signal_into_another_process_over_sizes(transport, target):
    out = assert_all_ok(run_ranks(gw.kernel_put_signal_sizes, args=(transport, SIZES, target), timeout=180))
    assert out[0]["statuses"] == [[0, 0]] * len(SIZES), out[0]
    assert out[0]["error"] is None
    assert out[0]["executed"] == len(SIZES)
    assert out[1]["results"] == [([0, 0], 0)] * len(SIZES), out[1]  # waited, every byte right, acked


@needs_gpu
def test_kernel_waits_on_a_signal_written_by_the_peer(transport):
    out = assert_all_ok(run_ranks(gw.kernel_wait_for_host_signal, args=(transport, 5), timeout=120))
    assert out[1]["status"] == lnd.OK and out[1]["word"] == 5, out[1]


@needs_gpu
@pytest.mark.parametrize("how", ["killed", "closed"])
def test_kernel_stopped_by_an_error_instead_of_hanging(transport, how):
    bound = 20.0
    results = run_ranks(gw.kernel_stopped_by_error, args=(transport, how, bound), expect_dead=(1,), timeout=120)
    status, value = results[0]
    assert status == "ok", value
    assert value["status"] == lnd.CHANNEL_ERROR, value
    assert value["kernel_s"] < bound / 2 and value["host_s"] < bound / 2, value
    assert value["error"] is not None
    assert value["stream_error"] is not None and "channel failed" in value["stream_error"], value


# --------------------------------------------------------------------------- the stream-ordered host API

@needs_gpu
def test_stream_wait_is_bounded_and_fails_the_channel_after_it(transport):
    out = assert_all_ok(run_ranks(gw.stream_wait_times_out, args=(transport,), timeout=120))
    r = out[0]
    assert 0.4 < r["seconds"] < 10, r
    assert "stream wait on local window 0" in r["stream_error"] and "timed out" in r["stream_error"], r
    assert "2 stream operations failed" in r["stream_error"], r  # the signal after it was refused
    assert r["error_code"] == 5, r  # kErrorStreamWait: later device operations stop
    assert "region's word" in r["endpoint_stream_error"], r
    assert out[1]["word"] == 0  # the refused signal never arrived


@needs_gpu
@pytest.mark.parametrize("api", ["device", "channel"])
@pytest.mark.parametrize("nbytes", [8, 65536])
def test_stream_ops_captured_in_a_cuda_graph_and_replayed(transport, api, nbytes):
    replays = 300
    out = assert_all_ok(run_ranks(gw.stream_graph_replay, args=(transport, nbytes, replays, api), timeout=240))
    for rank in (0, 1):
        assert out[rank]["rounds"] == replays + 1, out
        assert out[rank]["stream_error"] is None, out
    assert out[1]["bad"] == 0, out


# --------------------------------------------------------------------------- item 10 defects

@needs_gpu
@pytest.mark.parametrize("arrays", ["cupy", "torch"])
def test_host_put_of_a_gpu_array_waits_for_the_stream_that_produced_it(transport, arrays):
    if arrays == "torch" and not _torch_cuda():
        pytest.skip("torch without CUDA")
    out = assert_all_ok(run_ranks(gw.put_ordered_after_producer, args=(transport, arrays), timeout=120))
    assert out[1] == [7], out  # the produced bytes, not the zeros before them


@needs_gpu
def test_gpu_staging_copy_does_not_wait_for_other_streams(transport):
    out = assert_all_ok(run_ranks(gw.copy_does_not_wait_for_other_streams, args=(transport,), timeout=120))
    assert out[1] is True
    assert out[0]["put_s"] < 5.0 and out[0]["spinner_timed_out"] == 0, out[0]


@needs_gpu
def test_gpu_signal_words_are_not_polled_by_the_cpu():
    out = assert_all_ok(run_ranks(gw.gpu_words_on_the_host, world=1, args=("tcp",), timeout=60))[0]
    assert out["read"] == 42
    assert "GPU memory" in out["wait"], out


@needs_gpu
def test_verbs_refuses_an_unregistered_gpu_source():
    out = assert_all_ok(run_ranks(gw.verbs_unregistered_gpu_source, timeout=120))
    if "skip" in out[0]:
        pytest.skip(f"verbs not available: {out[0]['skip']}")
    for n in (8, 4096):
        assert "not inside a region registered" in out[0][n], out[0]


@needs_gpu
@pytest.mark.parametrize("arrays", ["cupy", "torch"])
def test_example_device_put_cupy_runs(arrays):
    if arrays == "torch" and not _torch_cuda():
        pytest.skip("torch without CUDA")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "device_put_cupy.py"), "--arrays", arrays,
                           "--nbytes", str(1 << 16)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok") >= 2, proc.stdout


# --------------------------------------------------------------------------- without a GPU

@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is usable here: the GPU tests above cover this")
def test_stream_api_without_a_gpu_is_a_clear_typed_error():
    with ln.StoreServer() as server, ln.Endpoint(0, 1, server.address, group="no-gpu", timeout=5,
                                                 transports=("tcp",)) as ep:
        word = ep.register(np.zeros(1, np.uint64))
        with pytest.raises((ln.TransportError, ln.UsageError), match="CUDA|GPU"):
            word.wait(0, 1, stream=0)
        with pytest.raises(ln.UsageError, match="stream= is required|stream must be"):
            word.wait(0, 1, stream="default")
        assert ep.stream_error is None


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is usable here: the GPU tests above cover this")
def test_channel_stream_forms_without_a_gpu_are_typed_errors(transport):
    out = assert_all_ok(run_ranks(gw.stream_api_errors_without_gpu, args=(transport,), timeout=60))[0]
    gpu_missing = ("TransportError: stream-ordered operations need a usable GPU" if _core.HAVE_CUDA_KERNELS
                   else "UsageError: stream-ordered operations need lamina-net built with CUDA")
    for name in ("put", "put_signal", "signal", "wait", "wait_channel"):
        assert out[name].startswith(gpu_missing), (name, out[name])
    assert out["bad_stream"].startswith("UsageError: stream must be"), out
    assert out["unregistered"].startswith("UsageError: stream put: the source must lie inside a Region"), out
    assert out["timeout"].startswith("UsageError: timeout= does not apply"), out
    assert out["bad_method"].startswith("UsageError: method must be one of"), out
    assert "need a GPU device channel" in out["cpu_ring"] or "built with CUDA" in out["cpu_ring"], out
    assert out["host_signal"] == 1 and out["stream_error"] is None, out


def test_stream_handles_from_torch_cupy_protocols_and_ints():
    class TorchLike:
        cuda_stream = 0x1234

    class CupyLike:
        ptr = 0x5678

    class Protocol:
        def __cuda_stream__(self):
            return (0, 0x9ABC)

    assert lnd.stream_handle(0) == 0 and lnd.stream_handle(np.int64(7)) == 7
    assert lnd.stream_handle(TorchLike()) == 0x1234
    assert lnd.stream_handle(CupyLike()) == 0x5678
    assert lnd.stream_handle(Protocol()) == 0x9ABC
    for bad in (None, True, -1, "s", 1.5):
        with pytest.raises(ln.UsageError):
            lnd.stream_handle(bad)


def test_gpu_sources_wait_for_their_producer_stream(monkeypatch):
    from lamina_net import _arrays

    calls = []
    monkeypatch.setattr(_core, "cuda_stream_synchronize", calls.append)

    class Cai:
        def __init__(self, stream):
            self.__cuda_array_interface__ = {"shape": (4,), "typestr": "|u1", "data": (0x1000, False),
                                             "version": 3, "stream": stream}

    _arrays.wait_for_producer(Cai(None))     # v3: nothing to wait for
    _arrays.wait_for_producer(Cai(0x77))
    _arrays.wait_for_producer(Cai(1))        # the legacy default stream
    _arrays.wait_for_producer(np.zeros(4))   # host memory
    assert calls == [0x77, 1]
    with pytest.raises(ln.UsageError, match="stream"):
        _arrays.wait_for_producer(Cai(0))    # disallowed by the protocol


def test_info_prints_the_cuda_versions():
    out = subprocess.run([sys.executable, "-m", "lamina_net", "info"], capture_output=True, text=True,
                         check=True).stdout
    line = [x for x in out.splitlines() if x.strip().startswith("CUDA:")]
    assert len(line) == 1, out
    if _core.HAVE_CUDA:
        assert "runtime" in line[0], line


# --------------------------------------------------------------------------- build checks (no GPU needed)

def _kernel_sources() -> dict:
    spec = importlib.util.spec_from_file_location("device_put_cupy", os.path.join(REPO, "examples",
                                                                                  "device_put_cupy.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # imports neither cupy nor torch at module level
    spec = importlib.util.spec_from_file_location("gpu_latency", os.path.join(REPO, "bench", "gpu_latency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    header_only = "#include <lamina_net/device.cuh>\nextern \"C\" __global__ void k(lamina::DeviceChannel c, int* s)" \
                  " { s[0] = c.put_signal_warp(0, 0, 0, 0, 8, 1, 0); s[1] = c.flush_block(); }\n"
    return {"header": header_only, "example": example.KERNELS, "tests": gw.KERNELS, "bench": bench.KERNELS}


NVRTC = _nvrtc.find_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="no NVRTC library found (the nvidia-cuda-nvrtc wheel, cupy's CUDA, or "
                                          "$LAMINA_NET_NVRTC)")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("name", ["header", "example", "tests", "bench"])
def test_kernels_compile_with_nvrtc_against_the_installed_header(name, arch):
    ptx = _nvrtc.compile_to_ptx(_kernel_sources()[name], [f"--gpu-architecture={arch}", "-std=c++17",
                                                          f"-I{ln.get_include()}"], NVRTC, f"{name}.cu")
    assert ".entry" in ptx and "ld.acquire.sys" in ptx


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc is neither on PATH nor in /usr/local/cuda/bin")
def test_every_cu_file_of_the_library_compiles_for_sm80_and_sm90(tmp_path):
    sources = sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cu"), recursive=True))
    assert sources, "the library has CUDA sources (csrc/proxy/stream_ops.cu)"
    for src in sources:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmd = [nvcc_path(), "-std=c++17", "-O2", "-c", src, "-o", str(obj), f"-I{REPO}/csrc",
               f"-I{REPO}/csrc/device/include", "-Xcompiler", "-fPIC,-Wall",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=compiler_env(), timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
        assert obj.stat().st_size > 0


@pytest.mark.skipif(not getattr(_core, "HAVE_CUDA_KERNELS", False), reason="built without the CUDA kernels")
def test_the_installed_module_carries_the_kernels():
    assert _core.HAVE_CUDA_KERNELS and _core.HAVE_CUDA
    assert hasattr(_core, "StreamOps")


def test_device_channel_windows_added_later_reach_the_proxy(transport, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "tests", "device"))
    import producers

    if producers.compiler() is None and not os.path.isfile(producers.cached_path()):
        pytest.skip("no g++ (or $CXX) on PATH: cannot build tests/device/cpu_producers.cpp")
    lib_path = producers.build(str(tmp_path))
    out = assert_all_ok(run_ranks(gw.added_windows, args=(transport, lib_path), timeout=120))
    r = out[0]
    assert r["first"] == (0, 0) and r["again"] == (0, 0) and r["sig_window"] == 1, r
    assert r["old_put"] == lnd.INVALID_ARGUMENT, r
    assert r["new_put"] == lnd.OK and r["flush"] == lnd.OK and r["error"] is None, r
    assert "at most 16" in r["limit"], r
    assert out[1] is True
