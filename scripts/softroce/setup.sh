#!/usr/bin/env bash
# Installs what the Soft-RoCE (rxe) guest needs: QEMU, a Debian kernel that
# ships rdma_rxe, rdma-core user space, perftest, Debian's pyverbs, and
# virtme-ng (in its own venv, .vm/venv) to boot the guest on the host's root
# file system. Idempotent and non-interactive; fails loudly.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(
  qemu-system-x86 linux-image-amd64 rdma-core ibverbs-providers libibverbs-dev
  ibverbs-utils perftest iproute2 kmod python3-pyverbs python3-venv busybox-static
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "softroce setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# virtme-ng lives in its own venv so it never touches the project's .venv.
# It runs with Debian's python3 so the guest's init can find it too.
VENV=.vm/venv
if [ ! -x "$VENV/bin/vng" ]; then
  echo "softroce setup: installing virtme-ng into $VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q virtme-ng
fi

kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$kernel" ] || { echo "softroce setup: no /boot/vmlinuz-* after installing linux-image-amd64" >&2; exit 1; }
version=${kernel#/boot/vmlinuz-}
find "/lib/modules/$version" -name 'rdma_rxe.ko*' | grep -q . || {
  echo "softroce setup: kernel $version has no rdma_rxe module" >&2; exit 1; }
/usr/bin/python3 -c 'import pyverbs.device' || { echo "softroce setup: Debian python3-pyverbs does not import" >&2; exit 1; }
echo "softroce setup: ready (guest kernel $kernel, vng $("$VENV/bin/vng" --version 2>/dev/null | head -n 1))"
