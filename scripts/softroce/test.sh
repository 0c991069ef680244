#!/usr/bin/env bash
# Runs the verbs test suite (tests/verbs, pytest -m verbs) for real inside the
# Soft-RoCE guest: one boot for the whole suite. Builds the C++ transport
# check on the host first. The package must already be installed in .venv
# (scripts/setup.sh); the guest sees this host's file system.
#
#   scripts/softroce/test.sh [--bench] [pytest args...]
#
# --bench: also run bench/verbs_vs_perftest.py in the same boot.
# Output: the guest's log is also saved in .vm/out/ (pytest.log, bench.log).
set -euo pipefail
cd "$(dirname "$0")/../.."
run_bench=0
if [ "${1:-}" = "--bench" ]; then
  run_bench=1
  shift
fi
[ -x .venv/bin/python ] || { echo "softroce test: .venv missing; run scripts/setup.sh" >&2; exit 1; }
.venv/bin/python -c "import lamina_net, lamina_net._core" || {
  echo "softroce test: lamina_net does not import; run scripts/setup.sh" >&2; exit 1; }
[ -x .vm/venv/bin/vng ] || bash scripts/softroce/setup.sh
tests/verbs/build_cpp_check.sh
# The device API's CPU producer library (tests/device/cpu_producers.cpp),
# built here because the guest's root is read-only (the tests reuse it by hash).
.venv/bin/python tests/device/producers.py || echo "softroce test: could not prebuild tests/device/cpu_producers.cpp" >&2

pytest_args=""
if (($#)); then pytest_args=$(printf ' %q' "$@"); fi
bench_cmd=true
if [ "$run_bench" = 1 ]; then
  # The benchmark alone takes ~30 min under TCG (each size a lamina-net /
  # perftest pair, five rounds): give the boot an hour unless told otherwise.
  export LAMINA_GUEST_TIMEOUT=${LAMINA_GUEST_TIMEOUT:-3600}
  bench_cmd='.venv/bin/python bench/verbs_vs_perftest.py --json "$LAMINA_GUEST_OUT/bench.json" 2>&1 | tee "$LAMINA_GUEST_OUT/bench.log"; bench_rc=${PIPESTATUS[0]}'
fi
# The guest's root file system is read-only: no pytest cache, no bytecode.
scripts/softroce/run-in-guest.sh "
set -o pipefail
.venv/bin/python -m pytest tests/verbs -m verbs -v -p no:cacheprovider -o addopts='-ra --strict-markers' \
  --timeout=600 $pytest_args 2>&1 | tee \"\$LAMINA_GUEST_OUT/pytest.log\"
test_rc=\${PIPESTATUS[0]}
bench_rc=0
$bench_cmd
[ \"\$test_rc\" = 0 ] || exit \"\$test_rc\"
exit \"\$bench_rc\"
"
