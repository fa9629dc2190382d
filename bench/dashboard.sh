#!/usr/bin/env bash
# What the dashboard costs the gateway, and what its page costs to draw.
#
#   bench/dashboard.sh                   # about 4 minutes (plus the first builds)
#   DUR=10 ROUNDS=3 bench/dashboard.sh
#
# 1. never-deny throughput of `tollgate serve` (wrk -t1 -c$CONNS -d$DUR) with
#    its history recorded every second ([history] every = "1s", ten times the
#    default rate: /metrics scraped, the history and its SQLite file
#    written, the alerts evaluated) and with nothing recorded in the
#    background ([history] every = "off"), alternated ROUNDS times, the
#    same process layout as bench/gateway.sh: tollgate on PROXY_CPU, wrk and
#    the nginx upstream on LOAD_CPU. Target: on / off >= 0.98.
# 2. the page's server time (criterion, benches/dashboard.rs): 30 days by
#    the hour and 48 hours by the minute of a busy face's series, and the
#    gateway's busiest of 10,000 keys. Target: <= 100 ms.
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
TOLLGATE="$target/release/tollgate"
BENCH_DIR="$ROOT/bench"

source bench/tools.sh
ensure_tools nginx:nginx wrk:wrk taskset:util-linux curl:curl
log "building tollgate (release, $target)..."
cargo build --release -q -p tollgate
start_work dashbench
read -r UP_PORT PROXY_PORT ADMIN_PORT < <(free_ports 3)
start_upstream "$UP_PORT" "$LOAD_CPU"

# measure EVERY: one never-deny run of a fresh `tollgate serve`; prints req/s.
measure() {
  local cfg="$work/serve-$1.toml"
  cat > "$cfg" <<TOML
[history]
path = "$work/history-$1.sqlite"
every = "$1"

[[limit]]
name = "tenant"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = 1000000000
refill = "1000000000/s"
TOML
  taskset -c "$PROXY_CPU" "$TOLLGATE" serve --config "$cfg" --upstream "http://127.0.0.1:$UP_PORT" \
    --listen "127.0.0.1:$PROXY_PORT" --admin "127.0.0.1:$ADMIN_PORT" --access-log off 2>>"$work/tollgate.log" &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$ADMIN_PORT/healthz" "$pid"
  taskset -c "$LOAD_CPU" wrk -t 1 -c "$CONNS" -d 2s -H "x-tenant-id: acme" "http://127.0.0.1:$PROXY_PORT/" >/dev/null
  taskset -c "$LOAD_CPU" wrk -t 1 -c "$CONNS" -d "${DUR}s" -H "x-tenant-id: acme" "http://127.0.0.1:$PROXY_PORT/" > "$work/wrk"
  if [ "$1" != off ]; then
    # the page was drawn from a history that kept up with the run
    curl -s "http://127.0.0.1:$ADMIN_PORT/?range=1h" | grep -q 'data-chart="requests"' || log "  WARNING: no page"
  fi
  stop "$pid"
  awk '/^Requests\/sec:/ { print $2 }' "$work/wrk"
}

log "== 1. never-deny throughput, history every 1s vs off (wrk -t1 -c$CONNS -d${DUR}s, $ROUNDS rounds)"
on=(); off=()
for round in $(seq 1 "$ROUNDS"); do
  a=$(measure 1s); on+=("$a")
  b=$(measure off); off+=("$b")
  log "  round $round: on $a req/s, off $b req/s"
done
python3 - "${on[*]}" "${off[*]}" <<'PY'
import statistics, sys
on = [float(x) for x in sys.argv[1].split()]
off = [float(x) for x in sys.argv[2].split()]
mo, mf = statistics.mean(on), statistics.mean(off)
print(f"history every 1s: {' '.join(f'{x:,.0f}' for x in on)} req/s (mean {mo:,.0f})")
print(f"history off:      {' '.join(f'{x:,.0f}' for x in off)} req/s (mean {mf:,.0f})")
print(f"on / off: {mo / mf:.3f} (target >= 0.98: {'PASS' if mo / mf >= 0.98 else 'MISS'})")
PY

log ""
log "== 2. the page's server time (criterion)"
cargo bench -q -p tollgate-bench --bench dashboard -- --noplot 2>&1 | grep -E "^dashboard/|time:" | paste - - | sed 's/ \+/ /g'
