#!/usr/bin/env bash
# The direct-path check, for a machine with an mlx5 (ConnectX) NIC and an
# NVIDIA GPU. It cannot run on the development machines (no mlx5, no GPU):
# what was verified where is in docs/direct.md.
#   1. the capability probe (lamina-net info): which direct path is available,
#      and every failed check where one is not;
#   2. the mlx5 format tests (pytest tests -k mlx5: byte for byte against this
#      machine's rdma-core) and, when an rxe device exists, the direct rxe tests;
#   3. the latency benchmark over verbs: the host API and the device API side
#      by side, with NCCL send/recv as the baseline when two GPUs exist;
#   4. a table: each device path with its status and, where it ran, its p50.
# Today the direct-mlx5 row reads "unavailable" with the probe's reason: the
# mlx5 host setup (DEVX queues in GPU memory, UAR mapping) is not built, so
# device channels run through the proxy. Exits non-zero when a step fails.
# Results go to $LAMINA_IBGDA_CHECK_OUT (default build/ibgda-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${LAMINA_IBGDA_CHECK_OUT:-build/ibgda-check}
mkdir -p "$out"
PY=${LAMINA_IBGDA_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "ibgda_check: $PY missing: run scripts/setup.sh (or set LAMINA_IBGDA_PYTHON)"; exit 1; }
failed=()

echo "==== probe"
"$PY" -m lamina_net.cli info | tee "$out/info.txt" || failed+=(probe)

# LAMINA_IBGDA_SKIP_FORMAT_TESTS=1 skips them (they compile C++: 13 min in an emulated guest).
if [ -z "${LAMINA_IBGDA_SKIP_FORMAT_TESTS:-}" ]; then
  echo "==== mlx5 format tests"
  "$PY" -m pytest tests -k mlx5 -q -p no:randomly 2>&1 | tee "$out/mlx5-tests.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=(mlx5-tests)
fi

if "$PY" -c "from lamina_net import _core; import sys; sys.exit(0 if dict((p[0], p[1]) for p in _core.direct_paths())['direct-rxe'] else 1)"; then
  echo "==== direct rxe tests"
  if [ ! -x build/verbs-check/rxe_direct_check ]; then
    bash tests/verbs/build_cpp_check.sh >"$out/build-check.log" 2>&1 || failed+=(build-check)
  fi
  "$PY" -m pytest tests/verbs/test_verbs_direct.py -q -p no:randomly 2>&1 | tee "$out/rxe-tests.log" | tail -5
  [ "${PIPESTATUS[0]}" = 0 ] || failed+=(rxe-tests)
fi

echo "==== latency: host and device API over verbs"
baseline=none
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)" 2>/dev/null; then baseline=nccl; fi
"$PY" -m lamina_net.cli bench latency --transport verbs --path host,device --sizes 8,4096,65536 \
  --iterations "${LAMINA_IBGDA_ITERATIONS:-2000}" --baseline "$baseline" --json "$out/latency.json" 2>&1 | tee "$out/latency.txt" || failed+=(latency)

echo "==== device paths"
"$PY" - "$out/latency.json" <<'PYEOF'
import json, os, sys
from lamina_net import _core
records = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else []
def p50(path):
    rows = [r for r in records if r.get("path") == path and r.get("size_bytes") == 8]
    return f"{rows[0]['p50_us']:.2f} us" if rows and "p50_us" in rows[0] else "-"
print(f"{'path':<13} {'status':<12} {'8 B p50':>10}  why")
for name, key in (("host", "host"), ("proxy", "device")):
    value = p50(key)
    print(f"{name:<13} {'ran' if value != '-' else 'not run':<12} {value:>10}")
for path, available, detail, failed in _core.direct_paths():
    print(f"{path:<13} {'available' if available else 'unavailable':<12} {'-':>10}  {detail or '; '.join(failed)}")
PYEOF

if ((${#failed[@]})); then
  echo "ibgda_check: failed: ${failed[*]}"
  exit 1
fi
echo "ibgda_check: done (results in $out)"
