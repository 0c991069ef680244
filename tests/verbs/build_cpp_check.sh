#!/usr/bin/env bash
# Builds tests/verbs/cpp/verbs_transport_check (the transport checked below the
# channel layer) and tests/verbs/cpp/rxe_direct_check (the device API's direct
# back end on rxe) into build/verbs-check/. Host-side; the binaries run in the guest.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/verbs-check
mkdir -p "$out"
sources=(
  csrc/common/error.cpp csrc/common/log.cpp csrc/common/settings.cpp csrc/common/clock.cpp
  csrc/memory/region.cpp csrc/memory/cuda_memory.cpp csrc/transports/rendezvous.cpp
)
# shellcheck disable=SC1091
mapfile -t verbs_sources < <(sed -n 's|^ *\(csrc/transports/verbs/[a-z_]*\.cpp\)$|\1|p' csrc/transports/verbs/sources.cmake)
for check in verbs_transport_check rxe_direct_check; do
  g++ -std=c++20 -O2 -g -Wall -Wextra -Wno-unused-parameter -Icsrc -Icsrc/device/include "tests/verbs/cpp/$check.cpp" \
    "${sources[@]}" "${verbs_sources[@]}" -ldl -lpthread -o "$out/$check"
  # libibverbs must be dlopen'ed, never linked.
  if nm -u "$out/$check" | grep -E ' (ibv_|_ibv_|cu[A-Z])'; then
    echo "build_cpp_check: $check references libibverbs/libcuda symbols directly (must go through dlsym)" >&2
    exit 1
  fi
  echo "built $out/$check"
done
