#!/usr/bin/env bash
# `tollgate simulate` end to end on one core: lines per second and peak memory
# for a large generated trace (default 10 million lines, many tenants).
# usage: bench/simulate.sh [LINES]
#        RUNS=3 bench/simulate.sh 2000000   # each mode N times, every run printed,
#                                           # and how many reached 1 M lines/s
# On a shared VM one binary's lines/s moves by 1.5x and more from run to run
# (bench/RESULTS.md), so one run says little about the >= 1 M lines/s target.
set -euo pipefail
cd "$(dirname "$0")/.."
lines=${1:-10000000}
runs=${RUNS:-1}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p tollgate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "generating $lines trace lines..."
python3 - "$lines" > "$work/trace.jsonl" <<'PY'
import sys, random
n = int(sys.argv[1]); rng = random.Random(1); w = sys.stdout.write
for i in range(n):
    tenant = "tenant-%d" % min(int(rng.expovariate(1 / 300)), 50000)
    w('{"t":%.6f,"method":"GET","path":"/v1/jobs","headers":{"x-tenant-id":"%s"},"ip":"10.0.%d.%d","latency":%.3f}\n'
      % (i * 0.0001, tenant, rng.randint(0, 9), rng.randint(1, 254), rng.uniform(0.01, 0.3)))
PY
bytes=$(stat -c %s "$work/trace.jsonl")
echo "trace: $lines lines, $((bytes / 1048576)) MiB; policy: examples/quickstart.toml (3 limits)"
for run in $(seq 1 "$runs"); do
for mode in decisions summary; do
  if [ "$mode" = decisions ]; then args=(--out /dev/null); else args=(--summary); fi
  start=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$work/rss" taskset -c 0 "$target/release/tollgate" simulate \
    --config examples/quickstart.toml --trace "$work/trace.jsonl" "${args[@]}" > "$work/out"
  end=$(date +%s.%N)
  python3 - "$lines" "$start" "$end" "$(cat "$work/rss")" "$mode" "$run" "$work/runs" <<'PY'
import sys
n, s, e, rss, mode, run = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
rate = n / (e - s) / 1e6
print(f"simulate ({mode:9}): {e - s:6.2f} s, {rate:5.2f} M lines/s on one core, peak RSS {rss / 1024:.1f} MiB (run {run})")
with open(sys.argv[7], "a") as runs:
    runs.write(f"{mode} {rate}\n")
PY
done
done
if [ "$runs" -gt 1 ]; then
  python3 - "$work/runs" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    mode, rate = line.split()
    rates.setdefault(mode, []).append(float(rate))
for mode, r in rates.items():
    met = sum(x >= 1.0 for x in r)
    print(f"{mode:9}: >= 1 M lines/s in {met} of {len(r)} runs (lowest {min(r):.2f}, median {statistics.median(r):.2f}, highest {max(r):.2f})")
PY
fi
