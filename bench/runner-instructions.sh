#!/usr/bin/env bash
# User-space instructions per job of `tollgate run`, counted by valgrind's
# cachegrind: the runner's whole cost (reading and importing the jobs into
# SQLite, the scheduler, the HTTP client, results.jsonl, the summary) over
# jobs that no limit makes wait, against nginx answering `return 200`. Jobs
# a second on a shared VM move by 30% from run to run; this count repeats
# within a percent, so it shows what a change did (bench/egress.sh's
# scenario 4 has the jobs a second).
#
#   bench/runner-instructions.sh            # about 2 minutes after the build
#   BIN=/path/to/tollgate bench/runner-instructions.sh   # another build
#
# It runs N0 and N1 jobs (2,000 and 22,000) and divides the difference by
# N1 - N0, so the start (loading the config, opening the state) cancels
# out. Respects CARGO_TARGET_DIR. Not a time: SHA-256 under valgrind runs
# without the CPU's SHA extensions, so digests count more than they cost.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N0=${N0:-2000}
N1=${N1:-22000}
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
source bench/tools.sh
NO_OHA=1 ensure_tools nginx:nginx valgrind:valgrind curl:curl
if [ -z "${BIN:-}" ]; then
  cargo build --release -q -p tollgate
  BIN="$target/release/tollgate"
fi
start_work runinstr
read -r UP < <(free_ports 1)
up="$work/nginx"; mkdir -p "$up"
{ nginx_common "$up"; echo "http {"; nginx_http_common "$up"
  echo "  server { listen 127.0.0.1:$UP backlog=4096; location / { default_type application/json; return 200 '{\"ok\":true}'; } } }"
} > "$up/nginx.conf"
"$NGINX" -p "$up" -c "$up/nginx.conf" -e "$up/error.log" & pids+=($!)
wait_http "http://127.0.0.1:$UP/"
sed -e "s/@UPSTREAM@/127.0.0.1:$UP/g" -e "s/@CONCURRENCY@/32/g" bench/egress/unlimited.toml > "$work/config.toml"

# count N: the instructions of a run of N POST jobs, from a fresh state
count() {
  python3 - "$1" "127.0.0.1:$UP" "$work/jobs" <<'PY'
import sys
n, base, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "w") as f:
    for i in range(n):
        f.write(f'{{"id":"j{i}","method":"POST","url":"http://{base}/v1/items/{i}","body":{{"i":{i}}}}}\n')
PY
  rm -rf "$work/state"
  valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null --log-file="$work/vg.log" \
    "$BIN" run --config "$work/config.toml" --state "$work/state" --progress quiet --jobs "$work/jobs" > /dev/null 2> "$work/run.err"
  awk '/I *refs:/ { gsub(",", "", $NF); print $NF }' "$work/vg.log"
}

log "counting runs of $N0 and $N1 jobs (tollgate: $BIN)..."
a=$(count "$N0")
b=$(count "$N1")
printf 'tollgate run: %d instructions a job (user space; %d jobs: %d, %d jobs: %d)\n' \
  $(( (b - a) / (N1 - N0) )) "$N0" "$a" "$N1" "$b"
