#!/usr/bin/env bash
# Regenerates docs/bench/: the current results of every benchmark, one file
# set per benchmark (NAME.json records, NAME.md table with hardware, date and
# command, NAME.png plot), overwriting the previous ones; git keeps the history.
#
#   bash scripts/bench_docs.sh            # latency, bandwidth, exchange, api-overheads (this machine)
#   bash scripts/bench_docs.sh --verbs    # also the verbs/perftest comparison, in the Soft-RoCE guest (~30 min)
#   bash scripts/bench_docs.sh --only exchange   # one of: latency, bandwidth, exchange, api-overheads, verbs
#
# Run it on an otherwise idle machine: the figures are ratios measured side by
# side, but a busy machine widens the spread. Needs scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=docs/bench
[ -x "$py" ] || { echo "bench_docs: no .venv; run scripts/setup.sh first" >&2; exit 1; }
want="latency bandwidth exchange api-overheads"
case "${1:-}" in
  --verbs) want="$want verbs" ;;
  --only) want="${2:?--only needs a benchmark name}" ;;
  "") ;;
  *) echo "usage: $0 [--verbs | --only latency|bandwidth|exchange|api-overheads|verbs]" >&2; exit 2 ;;
esac
mkdir -p "$out"
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
hardware=$("$py" -c 'from lamina_net.bench_report import hardware_description as h; print(h())')
today=$(date -u +%Y-%m-%d)
load() { cut -d' ' -f1-3 /proc/loadavg; }  # other work on the machine widens the spread: say how much there was

# NAME, command: writes NAME.md from NAME.json (header, the table, the command's own printed table).
write_md() {
  local name=$1 cmd=$2 printed=$3 load_before=$4
  {
    echo "# lamina-net bench: $name (current results)"
    echo
    echo "Hardware: $hardware. Date: $today. Load average (1, 5, 15 min) before the run: $load_before, after: $(load)."
    echo "Regenerate: \`bash scripts/bench_docs.sh --only $name\`, which runs"
    echo
    echo '```sh'
    echo "$cmd"
    echo '```'
    echo
    "$py" -m lamina_net bench table "$out/$name.json" --markdown
    echo
    echo "As printed by the command (ratios: lamina-net / the other system, same run):"
    echo
    echo '```'
    cat "$printed"
    echo '```'
  } > "$out/$name.md"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in $want; do
  case "$name" in
    latency)
      before=$(load)
      cmd="lamina-net bench latency --repeat 5 --json $out/latency.json --plot $out/latency.png"
      "$py" -m lamina_net bench latency --repeat 5 --json "$out/latency.json" --plot "$out/latency.png" | tee "$tmp/printed"
      write_md latency "$cmd" "$tmp/printed" "$before" ;;
    bandwidth)
      before=$(load)
      cmd="lamina-net bench bandwidth --json $out/bandwidth.json --plot $out/bandwidth.png"
      "$py" -m lamina_net bench bandwidth --json "$out/bandwidth.json" --plot "$out/bandwidth.png" | tee "$tmp/printed"
      write_md bandwidth "$cmd" "$tmp/printed" "$before" ;;
    exchange)
      before=$(load)
      cmd="lamina-net bench exchange --model llama3-70b --batch 1,32,300 --attention-ranks 2 --json $out/exchange.json --plot $out/exchange.png"
      "$py" -m lamina_net bench exchange --model llama3-70b --batch 1,32,300 --attention-ranks 2 \
        --json "$out/exchange.json" --plot "$out/exchange.png" | tee "$tmp/printed"
      write_md exchange "$cmd" "$tmp/printed" "$before" ;;
    api-overheads)
      # pytest-benchmark's own JSON (per test: stats in seconds) and its printed table.
      before=$(load)
      "$py" -m pytest bench/test_api_overheads.py -q -p no:cacheprovider -o addopts= \
        --benchmark-json "$out/api-overheads.json" --benchmark-columns=min,median,iqr,rounds \
        --benchmark-sort=name | tee "$tmp/printed"
      {
        echo "# lamina-net bench: api-overheads (current results)"
        echo
        echo "Hardware: $hardware. Date: $today. Load average before the run: $before, after: $(load)."
        echo "Python API per-call time, both ranks endpoints of one process"
        echo "(bench/test_api_overheads.py). Regenerate: \`bash scripts/bench_docs.sh --only api-overheads\`, which runs"
        echo
        echo '```sh'
        echo "pytest bench/test_api_overheads.py --benchmark-json $out/api-overheads.json"
        echo '```'
        echo
        echo '```'
        awk '/ benchmark: /{p=1} /^Legend:/{p=0} p' "$tmp/printed"
        echo '```'
      } > "$out/api-overheads.md" ;;
    verbs)
      # Only the Soft-RoCE guest (or an RDMA host) can run it; the guest writes .vm/out/bench.{json,log}.
      bash scripts/softroce/test.sh --bench
      cp .vm/out/bench.json "$out/verbs.json"
      cp .vm/out/bench.log "$out/verbs.txt" ;;
    *) echo "bench_docs: unknown benchmark $name" >&2; exit 2 ;;
  esac
done
echo "bench_docs: wrote $(ls "$out" | tr '\n' ' ')"
