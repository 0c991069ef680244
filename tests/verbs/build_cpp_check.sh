#!/usr/bin/env bash
# Builds tests/verbs/cpp/verbs_transport_check (the transport checked below the
# channel layer) into build/verbs-check/. Host-side; the binary runs in the guest.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=build/verbs-check
mkdir -p "$out"
sources=(
  tests/verbs/cpp/verbs_transport_check.cpp
  csrc/common/error.cpp csrc/common/log.cpp csrc/common/settings.cpp csrc/common/clock.cpp
  csrc/memory/region.cpp csrc/transports/rendezvous.cpp
)
# shellcheck disable=SC1091
mapfile -t verbs_sources < <(sed -n 's|^ *\(csrc/transports/verbs/[a-z_]*\.cpp\)$|\1|p' csrc/transports/verbs/sources.cmake)
g++ -std=c++20 -O2 -g -Wall -Wextra -Wno-unused-parameter -Icsrc "${sources[@]}" "${verbs_sources[@]}" \
  -ldl -lpthread -o "$out/verbs_transport_check"
# libibverbs must be dlopen'ed, never linked.
if nm -u "$out/verbs_transport_check" | grep -E ' (ibv_|_ibv_|cu[A-Z])'; then
  echo "build_cpp_check: the binary references libibverbs/libcuda symbols directly (must go through dlsym)" >&2
  exit 1
fi
echo "built $out/verbs_transport_check"
