#!/usr/bin/env bash
# Leased quota for hot keys (a limit's `lease`, docs/fleet.md): one hot key
# decided by 3 processes on one redis-server (started here on a free loopback
# port, --save "" --appendonly no), without and with `lease = { max =
# $LEASE_MAX, ttl = "1s" }`, the same quota that never binds
# (bench/lease/hot.toml). A slice should cover what a process admits for the
# key in a few round trips: at ~150k decisions/s per process, 1,000 (the
# default); LEASE_MAX=100 shows an undersized slice.
#
#   bench/lease.sh                 # about 2 min (plus the first release build;
#                                  # CARGO_TARGET_DIR defaults to /work/target-rbench)
#   SECS=5 GW_DUR=5 ROUNDS=2 bench/lease.sh
#
# Cases (ROUNDS runs each, every run reported, the best compared):
#   1. the engine: 3 redis-bench processes (`engine` client: Engine::decide_async,
#      as the gateway decides), each $CONC decisions in flight on the one key,
#      measured together for $SECS s; decisions/s summed.
#   2. the gateway: 3 `tollgate serve --demo-upstream`, each driven by its own
#      oha -c $GW_CONNS -z ${GW_DUR}s on the one key; requests/s summed.
#      For reference, the ceiling: the same 3 gateways on the memory store
#      (each its own quota: no Redis at all).
#   Target (issue "leased quota"): with / without >= 5x, at the stated bound.
#   Each case also counts Redis's FCALLs per decision (INFO commandstats).
#
# Nothing is pinned: redis-server, the 3 processes and the load share the 2
# cores. Everything listens on 127.0.0.1; every process started here is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECS=${SECS:-5}
GW_DUR=${GW_DUR:-5}
ROUNDS=${ROUNDS:-2}
CONC=${CONC:-64}
LEASE_MAX=${LEASE_MAX:-1000}
GW_CONNS=${GW_CONNS:-16}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-rbench}
target=$CARGO_TARGET_DIR
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
RBENCH="$target/release/redis-bench"
TOLLGATE="$target/release/tollgate"
HOT="$ROOT/bench/lease/hot.toml"

source bench/tools.sh
ensure_tools redis-server:redis-server redis-cli:redis-tools curl:curl
log "building redis-bench and tollgate (release, $target)..."
cargo build --release -q -p tollgate-bench --bin redis-bench
cargo build --release -q -p tollgate
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev+=" with uncommitted changes under crates/ or Cargo files"
log "tollgate $rev; $(redis-server --version | sed 's/.* v=\([^ ]*\).*/redis-server \1/'); $(nproc) cpus"

start_work lease
read -r REDIS_PORT P1 P2 P3 A1 A2 A3 < <(free_ports 7)
URL="redis://127.0.0.1:$REDIS_PORT"
cli() { redis-cli -p "$REDIS_PORT" "$@"; }
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" --daemonize no &
pids+=("$!")
for _ in $(seq 1 50); do cli ping >/dev/null 2>&1 && break; sleep 0.1; done
cli ping >/dev/null

# policy LEASE: the hot limit, with its lease line or without.
policy() {
  if [ "$1" = with ]; then sed "s/^lease = { max = [0-9]*/lease = { max = $LEASE_MAX/" "$HOT"; else grep -v '^lease' "$HOT"; fi
}
fcalls() { cli info commandstats | awk -F'[=,]' '/^cmdstat_fcall:/ { print $2 }'; }
kv() { tr ' ' '\n' < "$1" | awk -F= -v k="$2" '$1 == k { print $2 }'; }

declare -A BEST
note_best() { # note_best KEY VALUE
  python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$2" "${BEST[$1]:-0}" && BEST[$1]=$2 || true
}

# ---------------------------------------------------------------- 1. engine
log ""
log "== 1. the engine: 3 processes, $CONC in flight each, one key, ${SECS}s"
engine_run() { # engine_run with|without ROUND
  local cfg="$work/engine-$1.toml" i total=0 n=0 f0 f1
  policy "$1" > "$cfg"
  cli flushall > /dev/null
  f0=0; cli config resetstat > /dev/null
  local ps=()
  for i in 1 2 3; do
    "$RBENCH" engine --url "$URL" --policy "$cfg" --secs "$SECS" --concurrency "$CONC" \
      --tenants 1 --warmup 1 > "$work/engine-$1-$i.out" 2> "$work/engine-$1-$i.err" &
    ps+=("$!"); pids+=("$!")
  done
  for i in "${ps[@]}"; do wait "$i" || { log "ERROR: redis-bench failed: $(cat "$work"/engine-"$1"-*.err)"; exit 1; }; forget "$i"; done
  f1=$(fcalls); f1=${f1:-0}
  local per="" denied=0
  for i in 1 2 3; do
    local rate d
    rate=$(kv "$work/engine-$1-$i.out" rate); d=$(kv "$work/engine-$1-$i.out" decisions)
    denied=$((denied + $(kv "$work/engine-$1-$i.out" denied)))
    per+="$rate "; total=$(python3 -c "print(round($total + $rate))"); n=$((n + d))
  done
  log "  $1 lease, run $2: $total decisions/s (per process: ${per% }), $denied denied, $(python3 -c "print(f'{$f1 / max($n, 1):.3f}')") FCALL per decision (warm-up included)"
  note_best "engine_$1" "$total"
}
for round in $(seq 1 "$ROUNDS"); do
  engine_run without "$round"
  engine_run with "$round"
done
ENGINE_RATIO=$(ratio_of "${BEST[engine_with]}" "${BEST[engine_without]}")
log "  with / without: ${ENGINE_RATIO}x (best runs; target >= 5x)"

# ---------------------------------------------------------------- 2. gateway
log ""
log "== 2. the gateway: 3 tollgate serve, one oha -c $GW_CONNS -z ${GW_DUR}s each, one key"
gateway_run() { # gateway_run with|without|memory ROUND
  local cfg="$work/gw-$1.toml" i gws=() ohas=() listen admin total=0 all=0 ok=0
  if [ "$1" = memory ]; then
    policy without > "$cfg"
  else
    { printf '[store]\nkind = "redis"\nurl = "%s"\n\n' "$URL"; policy "$1"; } > "$cfg"
  fi
  cli flushall > /dev/null
  local ports=("$P1:$A1" "$P2:$A2" "$P3:$A3")
  for i in 0 1 2; do
    listen=${ports[$i]%%:*}; admin=${ports[$i]##*:}
    "$TOLLGATE" serve --config "$cfg" --demo-upstream --listen "127.0.0.1:$listen" \
      --admin "127.0.0.1:$admin" --access-log off 2> "$work/gw-$1-$i.log" &
    gws+=("$!"); pids+=("$!")
  done
  for i in 0 1 2; do wait_http "http://127.0.0.1:${ports[$i]##*:}/healthz" "${gws[$i]}"; done
  for i in 0 1 2; do
    "$OHA" --no-tui -c "$GW_CONNS" -z 1s -H "x-tenant-id: hot" "http://127.0.0.1:${ports[$i]%%:*}/" > /dev/null 2>&1 &
    ohas+=("$!")
  done
  for i in "${ohas[@]}"; do wait "$i" || true; done
  ohas=()
  cli config resetstat > /dev/null
  for i in 0 1 2; do
    "$OHA" --no-tui --output-format json -c "$GW_CONNS" -z "${GW_DUR}s" -H "x-tenant-id: hot" \
      "http://127.0.0.1:${ports[$i]%%:*}/" > "$work/gw-$1-$i.json" 2> /dev/null &
    ohas+=("$!")
  done
  for i in "${ohas[@]}"; do wait "$i" || true; done
  local f leased=0
  f=$(fcalls); f=${f:-0}
  local per=""
  for i in 0 1 2; do
    read -r _ _ rps two total_i < <(oha_figures "$work/gw-$1-$i.json")
    per+="$rps "; total=$((total + rps)); ok=$((ok + two)); all=$((all + total_i))
    leased=$(python3 -c "print(round($leased + $(prom_value "http://127.0.0.1:${ports[$i]##*:}/metrics" tollgate_store_leased_total)))")
  done
  for i in "${gws[@]}"; do stop "$i"; done
  log "  $1$([ "$1" = memory ] && echo " store" || echo " lease"), run $2: $total req/s (per gateway: ${per% }), 2xx $ok of $all, $leased decided on slices, $(python3 -c "print(f'{$f / max($all, 1):.3f}')") FCALL per request"
  note_best "gw_$1" "$total"
}
for round in $(seq 1 "$ROUNDS"); do
  gateway_run without "$round"
  gateway_run with "$round"
  gateway_run memory "$round"
done
GW_RATIO=$(ratio_of "${BEST[gw_with]}" "${BEST[gw_without]}")
log "  with / without: ${GW_RATIO}x (best runs; target >= 5x); with / memory store: $(ratio_of "${BEST[gw_with]}" "${BEST[gw_memory]}")x"

echo
echo "hot key on 3 processes, one redis-server, lease max $LEASE_MAX, tollgate $rev"
printf '%-34s %14s %14s %8s %s\n' case without with ratio verdict
printf '%-34s %14s %14s %8s %s\n' "engine (decisions/s)" "${BEST[engine_without]}" "${BEST[engine_with]}" "${ENGINE_RATIO}x" "$(verdict "$ENGINE_RATIO >= 5")"
printf '%-34s %14s %14s %8s %s\n' "gateway (requests/s)" "${BEST[gw_without]}" "${BEST[gw_with]}" "${GW_RATIO}x" "$(verdict "$GW_RATIO >= 5")"
printf '%-34s %14s %14s %8s\n' "gateway, memory store (ceiling)" "" "${BEST[gw_memory]}" "$(ratio_of "${BEST[gw_with]}" "${BEST[gw_memory]}")x"
