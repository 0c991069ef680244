#!/usr/bin/env bash
# Tests lamina-net as users install it: a regular (non-editable) `pip install .`
# into a fresh virtual environment, used from outside the checkout.
#   - the package imports, `lamina-net info` runs, the device header is installed
#     (lamina_net.get_include()) and compiles with g++ on its own;
#   - a two-process put over shm and tcp works from a directory outside the tree;
#   - run from the checkout's root, `import lamina_net` says what is wrong
#     (the source tree has no compiled module) instead of a circular import.
# Needs scripts/setup.sh first (it reuses .venv's packages: no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# --system-site-packages would see the editable install; give the new venv
# .venv's third-party packages through a .pth instead, minus lamina-net.
python3 -m venv "$work/venv"
site_new=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site_dev=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$site_dev" > "$site_new/lamina-dev-deps.pth"
# A wheel, built in the editable install's build folder (incremental; the lock
# keeps a concurrent rebuild out of it).
flock /tmp/lamina-build.lock "$work/venv/bin/python" -m pip install -q --no-build-isolation --no-deps "$repo" \
  2>&1 | grep -v '^WARNING: Location' || true
cd "$work"
py="$work/venv/bin/python"
"$py" - <<'PY'
import os, subprocess, sys
import lamina_net as ln
where = os.path.dirname(ln.__file__)
assert where.startswith(sys.prefix), f"imported {where}, not the new installation in {sys.prefix}"
inc = ln.get_include()
assert os.path.isfile(os.path.join(inc, "lamina_net", "device.cuh")), inc
assert inc.startswith(where), f"header not installed with the package: {inc}"
src = os.path.join(os.getcwd(), "k.cpp")
open(src, "w").write("#include <lamina_net/device.cuh>\nint f(lamina::DeviceChannel c){return c.flush();}\n")
subprocess.check_call(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", inc, "-c", src, "-o", "k.o"])
print("installed at", where, "header at", inc)
PY
"$work/venv/bin/lamina-net" info >/dev/null
"$py" -c "
import sys; sys.path.insert(0, '$repo/tests')
from _workers import every_op
from harness import run_ranks, assert_all_ok
for t in ('shm', 'tcp'):
    assert_all_ok(run_ranks(every_op, args=(t, True), timeout=120))
    print('installed package:', t, 'ok')
"
# From the checkout's root, Python finds the source tree first.
cd "$repo"
if out=$("$py" -c "import lamina_net" 2>&1); then
  echo "installed-package test: importing the source tree should fail with a clear message" >&2
  exit 1
fi
echo "$out" | grep -q "compiled module (_core) is missing" || {
  echo "installed-package test: unclear message from the source tree: $out" >&2; exit 1; }
echo "installed-package test: 4 passed, 0 failed"
