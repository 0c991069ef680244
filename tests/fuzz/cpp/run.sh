#!/usr/bin/env bash
# Builds the libFuzzer targets of the C++ decoders (clang, ASan + UBSan) and
#   1. replays every saved crash in tests/fuzz/cpp/regressions/<target>/ (each must pass now),
#   2. fuzzes each target for FUZZ_SECONDS (default 20) from seeds of valid input.
# Needs clang and its runtime (scripts/setup.sh installs them). A long run:
#   FUZZ_SECONDS=3600 bash tests/fuzz/cpp/run.sh     (figures in the README's reliability section)
# A crash leaves its input in build/fuzz/crashes/<target>/: copy it to
# regressions/<target>/ once fixed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
build="$repo/build/fuzz"
seconds=${FUZZ_SECONDS:-20}
command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }

cmake -S "$repo" -B "$build/cmake" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
  -DLAMINA_NET_BUILD_FUZZERS=ON -DLAMINA_NET_SANITIZE=address,undefined -DLAMINA_NET_WITH_CUDA=OFF \
  -DLAMINA_NET_BUILD_BENCH=OFF >"$build.configure.log" 2>&1 || { cat "$build.configure.log" >&2; exit 1; }
flock /tmp/lamina-build.lock cmake --build "$build/cmake" -j 2 >"$build.build.log" 2>&1 \
  || { tail -50 "$build.build.log" >&2; exit 1; }

"$repo/.venv/bin/python" "$here/seeds.py" "$build/corpus" || exit 1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
for bin in "$build/cmake"/fuzz_*; do
  name=$(basename "$bin")
  if [ -d "$here/regressions/$name" ] && ls "$here/regressions/$name"/* >/dev/null 2>&1; then
    if ! "$bin" -runs=0 "$here/regressions/$name"/* >"$build/$name.replay.log" 2>&1; then
      echo "fuzz: $name fails a saved regression:" >&2; tail -30 "$build/$name.replay.log" >&2; status=1; continue
    fi
  fi
  mkdir -p "$build/corpus/$name" "$build/crashes/$name"
  if "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
       -artifact_prefix="$build/crashes/$name/" "$build/corpus/$name" >"$build/$name.log" 2>&1; then
    echo "fuzz: $name: $(grep -o 'Done [0-9]* runs' "$build/$name.log" | tail -1) in ${seconds} s, no crash"
  else
    echo "fuzz: $name CRASHED; input saved in $build/crashes/$name/" >&2
    grep -A25 "ERROR\|SUMMARY\|runtime error" "$build/$name.log" | head -40 >&2
    status=1
  fi
done
exit $status
