#!/usr/bin/env bash
# The suite under sanitizers, on builds kept out of the default install
# (CMake option LAMINA_NET_SANITIZE, one build folder and venv each under build/):
#   asan: the tier-0 suite under AddressSanitizer + UndefinedBehaviorSanitizer
#   tsan: the concurrency tests (progress engines, shm rings, the device proxy
#         ring with many producers) under ThreadSanitizer
#   fuzz: the libFuzzer targets of the C++ decoders, a short run each (tests/fuzz/cpp)
# Usage: scripts/test_sanitizers.sh [asan] [tsan] [fuzz]   (default: all three)
# Needs scripts/setup.sh first (the venvs reuse .venv's packages: no downloads).
# The module is loaded into the normal, uninstrumented interpreter, so the
# sanitizer runtime comes first through LD_PRELOAD, with libstdc++ (else the
# runtime finds no __cxa_throw to intercept: the interpreter does not link it,
# and the first C++ exception aborts); CUDA is left out (nothing
# here can run it, and nvcc does not take the host sanitizer flags).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
modes=("$@")
((${#modes[@]})) || modes=(asan tsan fuzz)

# Runs of the sanitized suite pass -p no:randomly etc. through PYTEST_ARGS.
install_variant() {  # $1: variant name, $2: LAMINA_NET_SANITIZE value
  local dir="$repo/build/sanitize-$1"
  mkdir -p "$dir"
  if [ ! -x "$dir/venv/bin/python" ]; then
    python3 -m venv "$dir/venv" || return 1
  fi
  local site_new site_dev
  site_new=$("$dir/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  site_dev=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # .venv's third-party packages, without its editable lamina-net (a .pth
  # folder's own .pth files are not read).
  echo "$site_dev" > "$site_new/lamina-dev-deps.pth"
  # With line tables and unstripped, so that reports name functions and lines.
  echo "== building the $1 variant (LAMINA_NET_SANITIZE=$2)"
  LAMINA_NET_WITH_CUDA=OFF flock /tmp/lamina-build.lock "$dir/venv/bin/python" -m pip install -q \
    --no-build-isolation --no-deps --force-reinstall \
    -C "cmake.define.LAMINA_NET_SANITIZE=$2" -C "build-dir=$dir/cmake" \
    -C cmake.build-type=RelWithDebInfo -C install.strip=false "$repo" 2>&1 \
    | grep -v '^WARNING: Location'
  return "${PIPESTATUS[0]}"
}

run_suite() {  # $1: variant, $2: runtime library, $3...: pytest arguments
  local variant=$1 runtime=$2
  shift 2
  local work
  work=$(mktemp -d)
  # From outside the checkout, so that `import lamina_net` is the sanitized install.
  (cd "$work" && LD_PRELOAD="$runtime" LAMINA_NET_SANITIZED="$variant" \
    "$repo/build/sanitize-$variant/venv/bin/python" -m pytest -p no:cacheprovider \
    --rootdir "$repo" -c "$repo/pyproject.toml" "$@")
  local rc=$?
  rm -rf "$work"
  return $rc
}

status=0
for mode in "${modes[@]}"; do
  case "$mode" in
    asan)
      install_variant asan address,undefined || { status=1; continue; }
      # Leaks: the interpreter's own allocations at exit drown the report, so
      # LeakSanitizer is off here; bench/soak.py checks growth instead.
      ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=0 \
      UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        run_suite asan "$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" "$repo/tests" --ignore="$repo/tests/verbs" -q \
          -m "not slow" ${PYTEST_ARGS:-} || status=1
      ;;
    tsan)
      install_variant tsan thread || { status=1; continue; }
      # setarch -R: gcc 12's TSan runtime refuses the kernel's 28-bit mmap
      # randomisation ("unexpected memory mapping").
      TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0 \
        setarch "$(uname -m)" -R bash -c "$(declare -f run_suite); repo='$repo'; run_suite tsan \
          '$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)' '$repo/tests/test_device.py' '$repo/tests/test_transports.py' \
          '$repo/tests/test_shm_direct.py' '$repo/tests/test_faults.py' -q -m 'not slow' ${PYTEST_ARGS:-}" \
        || status=1
      ;;
    fuzz)
      bash "$repo/tests/fuzz/cpp/run.sh" || status=1
      ;;
    *)
      echo "test_sanitizers.sh: unknown mode '$mode' (asan, tsan, fuzz)" >&2
      status=2
      ;;
  esac
done
exit $status
