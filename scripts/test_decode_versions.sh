#!/usr/bin/env bash
# Runs the decode tests on the other end of the supported transformers range.
# The main .venv has the newest tested 5.x (scripts/requirements-dev.txt); this
# script keeps a second virtual environment with the last 4.x, installs
# lamina-net into it as users do (a wheel, not editable) and runs
# tests/test_decode.py and tests/test_decode_pipeline.py from a directory
# outside the checkout, so they import the installed package.
#   TF_VERSION    transformers release to test (default: the range's 4.x end)
#   TF_VENV       where the environment lives (default build/venv-tf4: build/ is ignored by git)
# Extra arguments go to pytest. Needs scripts/setup.sh first (the wheel is built
# with .venv's build tools, incrementally in the editable install's build folder).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tf_version=${TF_VERSION:-4.57.6}
venv=${TF_VENV:-$repo/build/venv-tf${tf_version%%.*}}
py="$venv/bin/python"

if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
quiet() { grep -v '^WARNING: Location' || true; }
# torch first, pinned: the CPU build lies on disk (seconds); unpinned, pip would fetch GBs.
"$py" -m pip install -q "torch==2.13.0" 2>&1 | quiet
"$py" -m pip install -q "transformers==$tf_version" "numpy>=1.22" "pytest>=7" "pytest-timeout>=2" 2>&1 | quiet

# The wheel, built by .venv's toolchain under the build lock (the editable install's
# build folder, so only what changed is compiled), installed without dependencies.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
flock /tmp/lamina-build.lock .venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w "$wheels" . 2>&1 | quiet
"$py" -m pip install -q --force-reinstall --no-deps "$wheels"/lamina_net-*.whl 2>&1 | quiet

cd "$wheels"  # outside the checkout: `import lamina_net` must find the installed package
"$py" - "$tf_version" <<'PY'
import sys
import lamina_net, transformers
from lamina_net.decode import converter
assert lamina_net.__file__.startswith(sys.prefix), f"imported {lamina_net.__file__}, not the package in {sys.prefix}"
assert transformers.__version__ == sys.argv[1], transformers.__version__
assert converter.transformers_supported(), f"{transformers.__version__} is outside {converter.SUPPORTED_TRANSFORMERS}"
print(f"decode tests on transformers {transformers.__version__} (supported {converter.SUPPORTED_TRANSFORMERS}), "
      f"lamina-net from {lamina_net.__file__}")
PY
status=0
"$py" -m pytest -p no:cacheprovider -q "$repo/tests/test_decode.py" "$repo/tests/test_decode_pipeline.py" "$@" || status=$?
exit $status
