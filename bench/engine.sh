#!/usr/bin/env bash
# tollgate vs governor 0.10: time per decision and memory per key, with ratios.
#
#   bench/engine.sh            # everything (about 2 minutes on 2 cores)
#   bench/engine.sh b_keyed    # only criterion ids matching a filter (memory always runs)
#   RUNS=3 bench/engine.sh     # time 3 times and report each id's best figure
#
# On a shared machine (other builds running) one run can be off by 50%; the
# best of a few runs estimates the uncontended cost. Respects CARGO_TARGET_DIR
# and CRITERION_HOME. Needs python3 (bench/summary.py prints the table).
# Figures measured on the project's machine are in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}
criterion_dir=${CRITERION_HOME:-$target_dir/criterion}
runs=${RUNS:-1}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for run in $(seq 1 "$runs"); do
    echo "== timing run $run of $runs"
    cargo bench -p tollgate-bench --bench engine -- "$@"
    python3 bench/summary.py collect "$criterion_dir" "$work/best.json"
done
cargo bench -p tollgate-bench --bench memory | tee "$work/memory.txt"
python3 bench/summary.py report "$work/best.json" "$work/memory.txt" "$runs"
