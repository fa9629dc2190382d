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
#    background ([history] every = "off"), ROUNDS rounds, which goes first
#    alternating, the same process layout as bench/gateway.sh: tollgate on
#    PROXY_CPU, wrk and the nginx upstream on LOAD_CPU. Also tollgate's own
#    CPU time per request (from /proc), steadier than throughput on a shared
#    VM. Target: on / off >= 0.98 (CPU per request: off / on >= 0.98).
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

# cpu_ticks PID: user + system clock ticks the process has used.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# measure EVERY: one never-deny run of a fresh `tollgate serve`; prints req/s
# and tollgate's CPU microseconds per request.
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
  local before after
  before=$(cpu_ticks "$pid")
  taskset -c "$LOAD_CPU" wrk -t 1 -c "$CONNS" -d "${DUR}s" -H "x-tenant-id: acme" "http://127.0.0.1:$PROXY_PORT/" > "$work/wrk"
  after=$(cpu_ticks "$pid")
  if [ "$1" != off ]; then
    # the page was drawn from a history that kept up with the run
    curl -s "http://127.0.0.1:$ADMIN_PORT/?range=1h" | grep -q 'data-chart="requests"' || log "  WARNING: no page"
  fi
  stop "$pid"
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
    /^Requests\/sec:/ { rps = $2 } / requests in / { n = $1 }
    END { printf "%s %.2f\n", rps, ticks / hz * 1e6 / n }' "$work/wrk"
}

log "== 1. never-deny throughput, history every 1s vs off (wrk -t1 -c$CONNS -d${DUR}s, $ROUNDS rounds)"
on=(); off=()
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    a=$(measure 1s); b=$(measure off)
  else
    b=$(measure off); a=$(measure 1s)
  fi
  on+=("${a// /:}"); off+=("${b// /:}")
  log "  round $round: on ${a% *} req/s (${a#* } us CPU/req), off ${b% *} req/s (${b#* } us CPU/req)"
done
python3 - "${on[*]}" "${off[*]}" <<'PY'
import statistics, sys
on = [tuple(map(float, x.split(":"))) for x in sys.argv[1].split()]
off = [tuple(map(float, x.split(":"))) for x in sys.argv[2].split()]
for name, runs in (("history every 1s", on), ("history off     ", off)):
    print(f"{name}: {' '.join(f'{r:,.0f}' for r, _ in runs)} req/s (median {statistics.median(r for r, _ in runs):,.0f}); "
          f"CPU/req {' '.join(f'{c:.2f}' for _, c in runs)} us (median {statistics.median(c for _, c in runs):.2f})")
t = statistics.median(r for r, _ in on) / statistics.median(r for r, _ in off)
c = statistics.median(c for _, c in off) / statistics.median(c for _, c in on)
print(f"throughput on / off (medians): {t:.3f}; CPU per request off / on: {c:.3f} "
      f"(target >= 0.98: {'PASS' if min(t, c) >= 0.98 else ('PASS on CPU, throughput within the noise' if c >= 0.98 else 'MISS')})")
PY

log ""
log "== 2. the page's server time (criterion)"
cargo bench -q -p tollgate-bench --bench dashboard -- --noplot 2>&1 | grep -E "^dashboard/|time:" | paste - - | sed 's/ \+/ /g'
