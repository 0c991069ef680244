#!/usr/bin/env bash
# The README's main job: sets up (scripts/setup.sh), then on local processes
#   1. the latency benchmark over every available transport, side by side with
#      the plain C reference ping-pongs (ratios);
#   2. the reference decode pipeline (attention offloaded to 2 workers),
#      checked token for token against the monolithic model;
#   3. the deployment planner for the paper's LLaMA3-70B on H100 + H20.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
. .venv/bin/activate
echo "== lamina-net bench latency"
lamina-net bench latency --json out/latency.json
echo "== lamina-net decode --check"
lamina-net decode --attention-workers 2 --micro-batches 2 --check
echo "== lamina-net plan"
lamina-net plan --model llama3-70b --compute h100 --attention h20 --context 4096 --batch 300 --alpha 0.2
echo "results: out/latency.json"
