#!/usr/bin/env bash
# The GPU check of lamina-net, for a machine with an NVIDIA GPU (one H200 is
# enough; about 3-5 minutes there, 8 at most):
#   1. builds lamina-net with its CUDA kernels (sm_80, sm_90);
#   2. prints the CUDA driver and runtime versions (a driver older than the
#      linked CUDA 13 runtime stops the check here, with that reason);
#   3. runs the GPU latency benchmark (bench/gpu_latency.py: a ping-pong of
#      put_signal + wait between two processes on the GPU through the proxy;
#      one-way latency per size, kernel end to peer kernel start) and prints
#      its table;
#   4. runs tests/test_gpu.py, tests/test_gpu_device.py and
#      tests/test_cuda_sendrecv.py, each test bounded.
# Exits non-zero when a step fails. Results (logs, JSON) go to
# $LAMINA_GPU_CHECK_OUT (default build/gpu-check).
#
# Python: $LAMINA_GPU_PYTHON, else a python3 whose torch or cupy sees a GPU
# (built into it in place, offline: pip --no-build-isolation --no-deps, so it
# needs scikit-build-core, pybind11, cmake, ninja, numpy and pytest there),
# else scripts/setup.sh's .venv (CPU torch, no cupy: most GPU tests skip).
# LAMINA_GPU_CHECK_SKIP_BUILD=1 with LAMINA_GPU_PYTHON: use that build as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${LAMINA_GPU_CHECK_OUT:-build/gpu-check}
mkdir -p "$out"
failed=()
step() { echo; echo "==== $* ($(( $(date +%s) - start )) s)"; }

step "python"
PY=${LAMINA_GPU_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3 /opt/torch/.venv/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" - <<'EOF' >/dev/null 2>&1
import sys
try:
    import cupy
    sys.exit(0 if cupy.cuda.runtime.getDeviceCount() > 0 else 1)
except Exception:
    import torch
    sys.exit(0 if torch.cuda.is_available() else 1)
EOF
    then PY=$(command -v "$cand"); break; fi
  done
fi
if [ -n "$PY" ] && [ -n "${LAMINA_GPU_CHECK_SKIP_BUILD:-}" ]; then
  echo "using $PY, already built (LAMINA_GPU_CHECK_SKIP_BUILD)"
elif [ -n "$PY" ]; then
  echo "using $PY"
  step "build (in place, offline)"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1
  rc=$?
  grep -v '^WARNING: Location' "$out/build.log" | tail -40
  if [ $rc -ne 0 ] || ! "$PY" -c "import lamina_net._core"; then
    echo "gpu_check: the build failed (see $out/build.log)"
    exit 1
  fi
else
  echo "no python with a GPU-enabled torch or cupy: scripts/setup.sh"
  step "build (scripts/setup.sh)"
  bash scripts/setup.sh 2>&1 | tee "$out/build.log" || { echo "gpu_check: scripts/setup.sh failed"; exit 1; }
  PY=.venv/bin/python
fi

step "versions"
"$PY" -m lamina_net info | tee "$out/info.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
fi
"$PY" - <<'EOF' || { echo "gpu_check: stopping: no usable CUDA driver (see the CUDA line above)"; exit 1; }
import sys
from lamina_net import _core
v = _core.cuda_versions()
print("cuda:", v, "| kernels:", _core.HAVE_CUDA_KERNELS)
sys.exit(0 if _core.HAVE_CUDA and _core.HAVE_CUDA_KERNELS and "older" not in v and "no CUDA driver" not in v else 1)
EOF

# The benchmark first: its table is what the README shows, and a hanging test
# must not take its time. Each test is bounded (--timeout), so one hang costs
# at most that; the nvcc compile check of the .cu files runs in CI already.
step "GPU latency benchmark"
if ! timeout 150 "$PY" bench/gpu_latency.py --json "$out/gpu-latency.json" 2>&1 | tee "$out/bench.log"; then
  failed+=("benchmark")
fi

step "GPU tests"
if ! timeout 330 "$PY" -m pytest tests/test_gpu.py tests/test_gpu_device.py tests/test_cuda_sendrecv.py -q -rs \
    -p no:cacheprovider --timeout=90 --durations=12 -k "not every_cu_file" 2>&1 | tee "$out/tests.log"; then
  failed+=("tests")
fi

step "done"
echo "gpu_check: $(( $(date +%s) - start )) s; results in $out"
if ((${#failed[@]})); then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: ok"
