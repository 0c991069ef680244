#!/usr/bin/env bash
# Sets up a fresh machine for lamina-net: system packages, a virtual
# environment in .venv with the pinned CPU torch, and the package itself
# (built by scikit-build-core, installed editable so rebuilds are incremental).
# Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# libibverbs-dev gives verbs headers at build time (the library is dlopen'ed at
# run time). The Soft-RoCE guest tooling is installed by scripts/softroce/setup.sh.
dpkg -s libibverbs-dev >/dev/null 2>&1 || need_apt+=(libibverbs-dev)
# clang and its runtime: the libFuzzer targets of the C++ decoders (tests/fuzz/cpp).
command -v clang++ >/dev/null 2>&1 || need_apt+=(clang)
dpkg -s libclang-rt-14-dev >/dev/null 2>&1 || need_apt+=(libclang-rt-14-dev)
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch lies on disk; pin it first so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r scripts/requirements-dev.txt
python -m pip install -q --no-build-isolation -e ".[test]"
python -c "import lamina_net, sys; print('lamina-net', lamina_net.__version__, 'ready in', sys.prefix)"
