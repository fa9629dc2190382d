#!/usr/bin/env bash
# User-space instructions per request, `tollgate serve` and nginx's limit_req
# side by side, counted by valgrind's callgrind while each serves the same
# requests: a proxied request (never denied) and a denied one (429). Unlike
# req/s on a shared VM (which moved by 30% and more from run to run), a count
# repeats within a percent or two, so it shows what a change to the request
# path did. It leaves out the kernel (the syscalls per request are the same
# for both: two reads and two writev on a kept-alive pair of connections) and
# it is not a time.
#
#   bench/gateway-instructions.sh            # about 3 minutes after the build
#   N=2000 bench/gateway-instructions.sh     # requests counted per case (default 5,000)
#   BIN=/path/to/tollgate bench/gateway-instructions.sh   # another build
#
# Each proxy runs under callgrind on one CPU with one worker, behind it the
# same upstream (nginx, `return 200 "ok\n"`), in front of it oha with 64
# connections and `x-tenant-id: acme`. 500 requests warm it up, the counters
# are zeroed, N requests are sent, the counters are dumped: the dump's total
# over N is the figure. Respects CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N=${N:-5000}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
source bench/tools.sh
log() { printf '%s\n' "$*" >&2; }
ensure_tools nginx:nginx valgrind:valgrind taskset:util-linux curl:curl
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p tollgate
  BIN="$target/release/tollgate"
fi
start_work gwinstr
read -r UP PX AD < <(free_ports 3)
start_upstream "$UP" 0

# count NAME PID URL: the instructions of N requests, from callgrind's dump
count() {
  local name=$1 pid=$2 url=$3 out="$work/$1.cg"
  "$OHA" -n 500 -c 64 --no-tui -H "x-tenant-id: acme" "$url" > /dev/null
  callgrind_control -z "$pid" > /dev/null 2>&1
  "$OHA" -n "$N" -c 64 --no-tui -H "x-tenant-id: acme" "$url" > /dev/null
  callgrind_control -d "$pid" > /dev/null 2>&1
  local i
  for i in $(seq 1 50); do [ -s "$out.1" ] && break; sleep 0.1; done
  awk '/^summary:/ { print $2 }' "$out.1"
}

# tollgate CAPACITY REFILL: its instructions per request
tollgate() {
  local cfg="$work/tollgate.toml"
  printf '[[limit]]\nname = "tenant"\nkey = ["header:x-tenant-id"]\nalgorithm = "token_bucket"\ncapacity = %s\nrefill = "%s"\n' "$1" "$2" > "$cfg"
  taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$work/tollgate.cg" \
    "$BIN" serve --config "$cfg" --upstream "http://127.0.0.1:$UP" --listen "127.0.0.1:$PX" \
    --admin "127.0.0.1:$AD" --access-log off 2> /dev/null &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$AD/healthz" "$pid"
  local total; total=$(count tollgate "$pid" "http://127.0.0.1:$PX/")
  stop "$pid"; rm -f "$work"/tollgate.cg*
  echo $(( total / N ))
}

# nginx RATE BURST: its instructions per request (one process, no master)
nginx_proxy() {
  local dir="$work/nginx-proxy"; rm -rf "$dir"; mkdir -p "$dir"
  { nginx_common "$dir"; echo "master_process off;"; echo "http {"; nginx_http_common "$dir"
    nginx_limit_req "$UP" "$PX" "$1" "$2"
    echo "}"
  } > "$dir/nginx.conf"
  taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$work/nginx.cg" \
    "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" 2> /dev/null &
  local pid=$!; pids+=("$pid")
  wait_http "http://127.0.0.1:$PX/" "$pid"
  local total; total=$(count nginx "$pid" "http://127.0.0.1:$PX/")
  stop "$pid"; rm -f "$work"/nginx.cg*
  echo $(( total / N ))
}

log "counting $N requests a case (tollgate: $BIN)..."
t_pass=$(tollgate 1000000000 1000000000/s)
n_pass=$(nginx_proxy 1000000r/s 1000)
t_deny=$(tollgate 1 1/h)
n_deny=$(nginx_proxy 1r/m 1)
python3 - "$t_pass" "$n_pass" "$t_deny" "$n_deny" <<'PY'
import sys
tp, np_, td, nd = map(int, sys.argv[1:])
print(f"{'case':<24} {'tollgate':>9} {'nginx':>9}  ratio (instructions a request, user space)")
print(f"{'proxied (never denied)':<24} {tp:>9,} {np_:>9,}  {tp / np_:.2f}x")
print(f"{'denied (429)':<24} {td:>9,} {nd:>9,}  {td / nd:.2f}x")
PY
