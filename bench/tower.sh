#!/usr/bin/env bash
# tollgate's tower layer (crates/tower) against tower_governor on the same
# axum app and quota: throughput at peak, the target of the ecosystem issue
# (tollgate / tower_governor >= 1.0x).
#
#   bench/tower.sh                      # about 4 min (plus the first build)
#   ROUNDS=1 DUR=5 bench/tower.sh       # about 1 min
#
# The app (crates/bench/src/bin/tower-bench.rs): axum, one route `GET /`
# answering "ok", behind tollgate's RateLimitLayer, behind tower_governor
# 0.8 (GlobalKeyExtractor, use_headers), or behind nothing, with one quota
# for everyone:
#   open: a quota the load never reaches (10^9 per second): what a layer
#         costs a request it lets through;
#   deny: bursts of 100, then 1,000 per second: nearly every request is
#         refused with 429, so this is what a refusal costs.
# Both layers write rate-limit headers on every answer (tollgate the IETF
# RateLimit-Policy / RateLimit pair, tower_governor x-ratelimit-*).
#
# Layout (2 cores): the app on PROXY_CPU (1; its tokio runtime then has one
# worker), oha -c $CONNS on LOAD_CPU (0), ${DUR} s runs after a 2 s warm-up.
# The layers run in turn, $ROUNDS rounds, so drift on this VM touches both.
# Each run prints req/s and the app's CPU per request; the verdict takes
# the median of the rounds' ratios.
#
# Needs: oha (cargo install into $OHA_ROOT if missing), python3, curl, taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DUR=${DUR:-10}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac

source bench/tools.sh
ensure_tools curl:curl taskset:util-linux python3:python3
rev=$(tree_state)
log "building tower-bench (release, $target) from $rev..."
cargo build --release -q -p tollgate-bench --bin tower-bench
APP="$target/release/tower-bench"
log "$(date -u '+%Y-%m-%d %H:%M UTC'): $rev, oha $($OHA --version | awk '{print $2}'), $(nproc) cpus, nice $(nice)"

start_work towerbench
read -r PORT < <(free_ports 1)
URL="http://127.0.0.1:$PORT/"
FOREIGN_MAX=0
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.2f}')" "$@"; }

# measure LAYER MODE: one run; sets RPS CPU_US CODES
measure() {
  taskset -c "$PROXY_CPU" "$APP" "127.0.0.1:$PORT" "$1" "$2" 2>>"$work/app.err" &
  local pid=$!; pids+=("$pid")
  wait_http "$URL" "$pid"
  taskset -c "$LOAD_CPU" "$OHA" --no-tui -z 2s -c "$CONNS" "$URL" > /dev/null 2>&1
  local c0 c1
  c0=$(tree_cpu_s "$pid")
  foreign_begin
  taskset -c "$LOAD_CPU" "$OHA" --no-tui --output-format json -z "${DUR}s" -c "$CONNS" "$URL" > "$work/run.json"
  foreign_end
  c1=$(tree_cpu_s "$pid")
  stop "$pid"
  read -r _ _ RPS _ ALL < <(oha_figures "$work/run.json")
  CPU_US=$(python3 -c "import sys; print(f'{1e6 * (float(sys.argv[2]) - float(sys.argv[1])) / int(sys.argv[3]):.1f}')" "$c0" "$c1" "$ALL")
  CODES=$(python3 -c 'import json,sys; print(" ".join(f"{k}:{v}" for k, v in sorted(json.load(open(sys.argv[1])).get("statusCodeDistribution", {}).items())))' "$work/run.json")
}

for mode in open deny; do
  log ""
  log "== $mode: the app on cpu $PROXY_CPU, oha -c $CONNS on cpu $LOAD_CPU, ${DUR} s runs, $ROUNDS round(s)"
  ratios=()
  for round in $(seq "$ROUNDS"); do
    declare -A rps=() cpu=()
    for layer in none tollgate governor; do
      [ "$mode" = deny ] && [ "$layer" = none ] && continue
      measure "$layer" "$mode"
      rps[$layer]=$RPS cpu[$layer]=$CPU_US
      log "  round $round, $layer: $RPS req/s, $CPU_US us of CPU per request ($CODES)"
    done
    r=$(ratio_of "${rps[tollgate]}" "${rps[governor]}")
    ratios+=("$r")
    extra=""
    [ "$mode" = open ] && extra=", none ${rps[none]} req/s (${cpu[none]} us)"
    row "$mode $round" "tollgate ${rps[tollgate]} req/s (${cpu[tollgate]} us/request), tower_governor ${rps[governor]} (${cpu[governor]} us) = ${r}x$extra" "" ""
    unset rps cpu
  done
  m=$(median "${ratios[@]}")
  row "$mode" "median tollgate / tower_governor: ${m}x (rounds: ${ratios[*]})" ">= 1.0x" "$(verdict "$m >= 1.0")"
done

echo
echo "tollgate tower layer vs tower_governor (bench/tower.sh) at $rev, $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cpus, loopback, oha -c $CONNS, ${DUR} s runs"
echo "other processes used at most ${FOREIGN_MAX}% of a core during a measured run"
print_table
