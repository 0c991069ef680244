#!/usr/bin/env bash
# The README's test command: sets up a fresh machine (scripts/setup.sh) and
# runs the whole suite.
#   tier 0 (here): unit, tcp/shm multi-process, hostile peers, device API in CPU threads,
#                  planner, decode pipeline, fault injection; then the installed package
#                  (scripts/test_installed.sh), the decode tests on the last transformers 4.x
#                  (scripts/test_decode_versions.sh), and the sanitizer jobs: the tier-0 suite under
#                  ASan+UBSan, the concurrency tests under TSan, a short libFuzzer run of each C++
#                  decoder (scripts/test_sanitizers.sh; LAMINA_NET_SKIP_SANITIZERS=1 skips them)
#   tier 1 (Soft-RoCE guest): the verbs transport for real, pyverbs interop
# LAMINA_NET_SKIP_VERBS=1 skips tier 1 (it needs qemu; about 5 minutes under TCG).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

status=0
.venv/bin/python -m pytest tests --ignore=tests/verbs "$@" || status=$?
# The package as users install it (pip install ., used from outside the checkout).
bash scripts/test_installed.sh || status=$?
bash scripts/test_decode_versions.sh || status=$?
if [ "${LAMINA_NET_SKIP_SANITIZERS:-0}" != 1 ]; then
  bash scripts/test_sanitizers.sh || status=$?
fi

if [ "${LAMINA_NET_SKIP_VERBS:-0}" != 1 ]; then
  if [ -f scripts/softroce/test.sh ]; then
    bash scripts/softroce/test.sh || status=$?
  else
    echo "verbs tier: scripts/softroce/test.sh missing" >&2
    status=1
  fi
fi
exit $status
