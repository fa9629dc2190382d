#!/usr/bin/env bash
# CPU per proxied request of two builds of `tollgate serve`, in turn: A, B,
# A, B, ... On this VM req/s moves by 30% between runs of one binary, so two
# builds are compared by what the proxy process itself spends (user + system
# time from /proc) per request, measured in alternation so a drift of the
# machine reaches both alike. Every round is printed.
#
#   bench/gateway-cpu.sh OLD_BIN NEW_BIN             # 3 rounds of 5 s each
#   ROUNDS=5 DUR=10 bench/gateway-cpu.sh OLD NEW
#
# Each proxy runs pinned to cpu 1 (one worker) with a never-binding token
# bucket and `--access-log off`; wrk -t1 -c64 on cpu 0 sends
# `x-tenant-id: acme` for 1 s of warm-up, then DUR seconds measured; behind
# it, the same upstream as bench/gateway.sh (nginx, `return 200 "ok\n"`).
set -euo pipefail
cd "$(dirname "$0")/.."
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
source bench/tools.sh
[ $# -eq 2 ] || { echo "usage: bench/gateway-cpu.sh OLD_BIN NEW_BIN" >&2; exit 2; }
A=$1 B=$2 ROUNDS=${ROUNDS:-3} DUR=${DUR:-5}
NO_OHA=1 ensure_tools nginx:nginx wrk:wrk taskset:util-linux curl:curl
start_work gwcpu
read -r UP PX AD < <(free_ports 3)
start_upstream "$UP" 0
cfg="$work/tollgate.toml"
printf '[[limit]]\nname = "tenant"\nkey = ["header:x-tenant-id"]\nalgorithm = "token_bucket"\ncapacity = 1000000000\nrefill = "1000000000/s"\n' > "$cfg"
tick=$(getconf CLK_TCK)

# measure NAME BIN: one round of one build
measure() {
  taskset -c 1 "$2" serve --config "$cfg" --upstream "http://127.0.0.1:$UP" --listen "127.0.0.1:$PX" \
    --admin "127.0.0.1:$AD" --access-log off 2> /dev/null &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$AD/healthz" "$pid"
  local url="http://127.0.0.1:$PX/" before after reqs
  taskset -c 0 wrk -t1 -c64 -d1s -H "x-tenant-id: acme" "$url" > /dev/null
  before=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  reqs=$(taskset -c 0 wrk -t1 -c64 -d"${DUR}s" -H "x-tenant-id: acme" "$url" | awk '/requests in/ { print $1 }')
  after=$(awk '{ print $14 + $15 }' "/proc/$pid/stat")
  stop "$pid"
  python3 -c 'import sys
name, reqs, ticks, hz, dur = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
print(f"{name}  {reqs / dur:>9,.0f} req/s  {ticks / hz / reqs * 1e6:6.2f} us of CPU a request")' \
    "$1" "$reqs" "$((after - before))" "$tick" "$DUR"
}

log "A = $A"
log "B = $B"
for round in $(seq 1 "$ROUNDS"); do
  measure "round $round A" "$A"
  measure "round $round B" "$B"
done
