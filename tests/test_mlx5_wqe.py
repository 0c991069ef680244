"""Byte-level tests of the direct back end's mlx5 format (issue 17, item 7).

tests/device/mlx5_check.cpp is compiled with g++ against the installed
device headers (``lamina_net.get_include()``) and rdma-core's
``infiniband/mlx5dv.h``; each case compares what lamina_net/direct/mlx5.cuh
writes with rdma-core's helpers and structures (ctrl, data, raddr, atomic and
inline segments, whole WQEs over opcodes, sizes, index wrap and queue sizes,
the doorbell value, CQE parsing for success, wrap and every error syndrome),
or drives the shared queue logic (work_queue.cuh) from CPU threads over mlx5
bytes against a CPU stand-in for the NIC. No mlx5 NIC is needed or used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

import lamina_net as ln
from conftest import compiler_env, nvcc_path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "device"))
import producers  # noqa: E402
SOURCE = os.path.join(HERE, "device", "mlx5_check.cpp")
MLX5DV = "/usr/include/infiniband/mlx5dv.h"
CASES = ["ctrl_seg", "segments", "wqe_bytes", "doorbell_bytes", "cqe_parse", "queue_many_producers",
         "queue_error_cqe", "queue_bad_arguments", "queue_full_times_out"]


@pytest.fixture(scope="module")
def mlx5_check(tmp_path_factory) -> str:
    cxx = producers.compiler()
    if cxx is None:
        pytest.skip("no g++ on PATH")
    if not os.path.isfile(MLX5DV):
        pytest.skip(f"{MLX5DV} missing (apt-get install libibverbs-dev; scripts/setup.sh does)")
    include = ln.get_include()
    h = hashlib.sha256(open(SOURCE, "rb").read())
    for name in ("work_queue.cuh", "mlx5.cuh"):
        h.update(open(os.path.join(include, "lamina_net", "direct", name), "rb").read())
    out = str(tmp_path_factory.mktemp("mlx5") / f"mlx5_check-{h.hexdigest()[:12]}")
    cmd = [cxx, "-std=c++17", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-I", include, SOURCE, "-o", out,
           "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=compiler_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("case", CASES)
def test_mlx5_format_against_rdma_core(mlx5_check, case):
    proc = subprocess.run([mlx5_check, case], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"PASS {case}" in proc.stdout, proc.stdout + proc.stderr


def test_mlx5_check_fails_on_a_wrong_segment(mlx5_check, tmp_path):
    """The comparison can fail: a builder with one wrong byte is caught."""
    include = ln.get_include()
    bad = tmp_path / "include"
    shutil.copytree(include, bad)
    header = bad / "lamina_net" / "direct" / "mlx5.cuh"
    text = header.read_text()
    wrong = text.replace("put32(p + 4, be32((qpn << 8) | ds));", "put32(p + 4, be32((qpn << 8) | (ds ^ 1)));")
    assert wrong != text
    header.write_text(wrong)
    out = str(tmp_path / "mlx5_check_bad")
    proc = subprocess.run([producers.compiler(), "-std=c++17", "-O1", "-I", str(bad), SOURCE, "-o", out, "-lpthread"],
                          capture_output=True, text=True, env=compiler_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([out, "ctrl_seg"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "FAIL ctrl_seg" in proc.stdout, proc.stdout


def test_mlx5_direct_headers_compile_alone_with_gxx(tmp_path):
    """Each direct header is a leaf: g++ -std=c++17 takes it with nothing but the include dir."""
    cxx = producers.compiler()
    if cxx is None:
        pytest.skip("no g++ on PATH")
    for name in ("work_queue.cuh", "mlx5.cuh", "rxe.cuh"):
        src = tmp_path / f"{name}.cpp"
        src.write_text(f"#include <lamina_net/direct/{name}>\n")
        proc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Werror", "-c",
                               "-I", ln.get_include(), str(src), "-o", str(tmp_path / f"{name}.o")],
                              capture_output=True, text=True, env=compiler_env(), timeout=120)
        assert proc.returncode == 0, name + ": " + proc.stderr


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_mlx5_direct_queue_compiles_for_the_gpu(tmp_path, arch):
    """The queue code the CPU tests run, instantiated in a kernel for mlx5 and rxe bytes, builds with nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc is neither on PATH nor in /usr/local/cuda/bin")
    out = tmp_path / f"direct_{arch}.o"
    cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
           "-c", "-I", ln.get_include(), os.path.join(HERE, "device", "direct_kernel.cu"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=compiler_env(), timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    assert out.stat().st_size > 0


def test_mlx5_probe_names_each_failed_check():
    """Without an mlx5 NIC the probe says why, one line per check, and info prints it."""
    from lamina_net import _core

    paths = {p[0]: p for p in _core.direct_paths()}
    assert set(paths) == {"direct-mlx5", "direct-rxe"}
    for name, (_, available, detail, failed) in paths.items():
        if available:
            assert detail, name
        else:
            assert failed and all(isinstance(line, str) and line for line in failed), name
    _, mlx5_ok, _, mlx5_failed = paths["direct-mlx5"]
    assert not mlx5_ok  # the mlx5 host setup is not built: never claimed available
    assert any("host setup" in line for line in mlx5_failed)
    out = subprocess.run([sys.executable, "-m", "lamina_net.cli", "info"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "device paths: proxy" in out.stdout and "direct-mlx5: unavailable" in out.stdout
