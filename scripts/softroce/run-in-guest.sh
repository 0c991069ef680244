#!/usr/bin/env bash
# Boots a QEMU guest (virtme-ng, TCG, 9p root = this host's root file system,
# read-only with a writable /tmp), brings up Soft-RoCE and runs the given shell
# commands inside it, in this repository's root. Exits with their exit code.
#
#   scripts/softroce/run-in-guest.sh '<commands>'
#
# Inside the guest: rdma_rxe is loaded, dummy0 has 10.99.0.1/24 and rxe0 sits
# on it (RoCE v2). LAMINA_GUEST_OUT points to a directory that is writable in
# the guest and visible on the host afterwards (.vm/out). Environment variables
# named LAMINA_* and PYTEST_* are passed through.
#
# Settings (environment): LAMINA_GUEST_TIMEOUT seconds for the whole boot
# (default 1800), LAMINA_GUEST_MEMORY (2G), LAMINA_GUEST_CPUS (2).
# Needs scripts/softroce/setup.sh to have run (it says so otherwise).
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 '<commands>'" >&2; exit 2; }
user_commands=$1
repo=$(cd "$(dirname "$0")/../.." && pwd)
vng="$repo/.vm/venv/bin/vng"
[ -x "$vng" ] || { echo "run-in-guest: $vng missing; run scripts/softroce/setup.sh" >&2; exit 1; }
kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$kernel" ] || { echo "run-in-guest: no /boot/vmlinuz-*; run scripts/softroce/setup.sh" >&2; exit 1; }

out="$repo/.vm/out"
mkdir -p "$out"
rc_file="$out/guest-rc"
rm -f "$rc_file"
script="$out/guest-script.sh"

{
  echo '#!/bin/bash'
  echo 'set -uo pipefail'
  # Pass through the caller's PATH and the project's settings.
  printf 'export PATH=%q\n' "$PATH"
  printf 'export HOME=%q\n' "${HOME:-/root}"
  while IFS='=' read -r name _; do
    case "$name" in LAMINA_*|PYTEST_*) printf 'export %s=%q\n' "$name" "${!name}" ;; esac
  done < <(env)
  printf 'export LAMINA_GUEST_OUT=%q\n' "$out"
  # rxe under full emulation can take longer than the usual 67 ms ACK timeout
  # (IB_TIMEOUT 14); the retransmissions that follow trip rxe bugs (a replayed
  # ATOMIC answered with a remote access error). 17 = 0.54 s per try.
  printf 'export LAMINA_NET_IB_TIMEOUT=%q\n' "${LAMINA_NET_IB_TIMEOUT:-17}"
  printf 'export PYTHONDONTWRITEBYTECODE=1\n'
  printf 'cd %q\n' "$repo"
  cat <<'GUEST'
guest_setup() {
  set -e
  modprobe rdma_rxe
  ip link add dummy0 type dummy 2>/dev/null || true
  ip link set dummy0 up
  ip addr replace 10.99.0.1/24 dev dummy0
  ip link set lo up
  rdma link show rxe0 >/dev/null 2>&1 || rdma link add rxe0 type rxe netdev dummy0
  for _ in $(seq 1 50); do
    ibv_devinfo -d rxe0 2>/dev/null | grep -q PORT_ACTIVE && return 0
    sleep 0.1
  done
  echo "guest: rxe0 port never became ACTIVE" >&2
  ibv_devinfo -d rxe0 >&2 || true
  return 1
}
# Locked memory: verbs pins registered memory.
ulimit -l unlimited 2>/dev/null || true
if ! (guest_setup); then
  echo 97 > "$LAMINA_GUEST_OUT/guest-rc"
  exit 97
fi
echo "guest: rxe0 ready on dummy0 10.99.0.1 ($(uname -r))"
GUEST
  printf 'bash -c %q\n' "$user_commands"
  echo 'rc=$?'
  echo 'echo "$rc" > "$LAMINA_GUEST_OUT/guest-rc"'
  echo 'sync'
  echo 'exit $rc'
} > "$script"
chmod +x "$script"

timeout_s=${LAMINA_GUEST_TIMEOUT:-1800}
# vng runs virtme-run from PATH.
export PATH="$repo/.vm/venv/bin:$PATH"
set +e
timeout --foreground -k 10 "$timeout_s" "$vng" --disable-kvm --force-9p --quiet \
  -r "$kernel" --memory "${LAMINA_GUEST_MEMORY:-2G}" --cpus "${LAMINA_GUEST_CPUS:-2}" \
  --rwdir "$out" --cwd "$repo" -- "$script" </dev/null
vng_rc=$?
set -e
if [ ! -s "$rc_file" ]; then
  echo "run-in-guest: the guest did not report an exit code (vng exit $vng_rc; timeout ${timeout_s}s?)" >&2
  exit 98
fi
exit "$(cat "$rc_file")"
