#!/usr/bin/env bash
# `tollgate proxy` as the coordinator of live and batch work (docs/coordinator.md):
# job intake over HTTP, and a live client sharing one quota with a 50,000-job
# batch, the vendor played by `tollgate serve` enforcing the same limit.
#
#   bench/coordinator.sh                 # about 3 min (plus the first release build;
#                                        # CARGO_TARGET_DIR defaults to /work/target-rbench)
#   JOBS=20000 BATCH_JOBS=10000 LIVE_SECS=10 bench/coordinator.sh
#
# 1. Intake: $JOBS jobs POSTed to /_tollgate/jobs in JSONL batches of 1,000
#    (bench/coordinator/drive.py intake: one keep-alive connection), each
#    batch recorded in the SQLite state before its 202. The upstream's limit
#    is 1 a second, so what the proxy sends meanwhile costs next to nothing.
#    Target (issue "coordinator"): >= 20,000 jobs/s accepted durably.
# 2. Mixed load: the vendor (`tollgate serve --demo-upstream`) enforces a
#    token bucket of $CAPACITY refilling $RATE/s and answers 429 past it; the
#    proxy keeps the same limit with reserve = "20%". A live client calls at
#    $LIVE_RATE/s for $LIVE_SECS s (drive.py live: open loop, latency from
#    each call's slot to its answer):
#      a. alone;
#      b. while a batch of $BATCH_JOBS jobs (pushed first) drains.
#    Printed: live p50/p99 with and without the batch (target: p99 within one
#    token interval, 1/$RATE s, of the live-only run), the batch's jobs/s,
#    the vendor's 429s (target 0), and utilisation = calls the vendor
#    admitted / what its bucket allowed from the batch's start to its end
#    (capacity + rate x elapsed; target >= 98%).
# Nothing is pinned: both processes and the clients share the 2 cores.
# Everything listens on 127.0.0.1; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

JOBS=${JOBS:-100000}
BATCH_JOBS=${BATCH_JOBS:-50000}
CAPACITY=${CAPACITY:-100}
RATE=${RATE:-1000}
LIVE_RATE=${LIVE_RATE:-100}
LIVE_SECS=${LIVE_SECS:-20}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-rbench}
target=$CARGO_TARGET_DIR
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
TOLLGATE="$target/release/tollgate"

source bench/tools.sh
ensure_tools curl:curl python3:python3
log "building tollgate (release, $target)..."
cargo build --release -q -p tollgate
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev+=" with uncommitted changes under crates/ or Cargo files"
log "tollgate $rev; $(nproc) cpus"
start_work coordinator

# vendor NAME: `tollgate serve` enforcing the bucket; sets VENDOR, VENDOR_ADMIN.
vendor() {
  read -r vp va < <(free_ports 2)
  cat > "$work/vendor.toml" <<TOML
[gateway]
listen = "127.0.0.1:$vp"
admin_listen = "127.0.0.1:$va"
access_log = "off"
[[limit]]
name = "api"
algorithm = "token_bucket"
capacity = $CAPACITY
refill = "$RATE/s"
TOML
  "$TOLLGATE" serve --config "$work/vendor.toml" --demo-upstream >"$work/vendor-$1.log" 2>&1 &
  pids+=($!); VENDOR_PID=$!
  VENDOR="127.0.0.1:$vp"; VENDOR_ADMIN="127.0.0.1:$va"
  wait_http "http://$VENDOR_ADMIN/healthz" "$VENDOR_PID"
}

# proxy NAME LIMIT_LINES: a fresh proxy and state in front of $VENDOR; sets PROXY, PROXY_ADMIN.
proxy() {
  read -r pp pa < <(free_ports 2)
  rm -rf "$work/state-$1"
  cat > "$work/proxy-$1.toml" <<TOML
[proxy]
listen = "127.0.0.1:$pp"
admin_listen = "127.0.0.1:$pa"
access_log = "off"
state = "$work/state-$1"
[[upstream]]
name = "vendor"
base_url = "http://$VENDOR"
concurrency = 64
$2
TOML
  "$TOLLGATE" proxy --config "$work/proxy-$1.toml" >"$work/proxy-$1.log" 2>&1 &
  pids+=($!); PROXY_PID=$!
  PROXY="127.0.0.1:$pp"; PROXY_ADMIN="127.0.0.1:$pa"
  wait_http "http://$PROXY_ADMIN/healthz" "$PROXY_PID"
}

# counter URL SERIES_PREFIX: the sum of the series starting so.
counter() {
  curl -s "$1" | awk -v p="$2" 'index($0, p) == 1 { s += $NF } END { printf "%d\n", s }'
}

bucket="[[upstream.limit]]
name = \"api\"
algorithm = \"token_bucket\"
capacity = $CAPACITY
refill = \"$RATE/s\""

log "1. intake: $JOBS jobs in batches of 1,000"
vendor intake
proxy intake "[[upstream.limit]]
name = \"slow\"
algorithm = \"token_bucket\"
capacity = 1
refill = \"1/s\""
python3 bench/coordinator/drive.py intake "$PROXY" "$VENDOR" --jobs "$JOBS" --batch 1000 | tee "$work/intake.json"
stop "$PROXY_PID"; stop "$VENDOR_PID"

log "2a. live only: $LIVE_RATE/s for $LIVE_SECS s"
vendor alone
proxy alone "reserve = \"20%\"
$bucket"
python3 bench/coordinator/drive.py live "$PROXY" --admin "$PROXY_ADMIN" --rate "$LIVE_RATE" --seconds "$LIVE_SECS" | tee "$work/alone.json"
stop "$PROXY_PID"; stop "$VENDOR_PID"

log "2b. live with a batch of $BATCH_JOBS jobs"
vendor mixed
proxy mixed "reserve = \"20%\"
$bucket"
before=$(date +%s.%N)
python3 bench/coordinator/drive.py live "$PROXY" --admin "$PROXY_ADMIN" --rate "$LIVE_RATE" --seconds "$LIVE_SECS" \
  --push "$BATCH_JOBS" --vendor "$VENDOR" | tee "$work/mixed.json"
admitted=$(( $(counter "http://$VENDOR_ADMIN/metrics" 'tollgate_decisions_total{limit="api",outcome="admitted"') \
  + $(counter "http://$VENDOR_ADMIN/metrics" 'tollgate_decisions_total{limit="api",outcome="held"') ))
denied=$(counter "http://$VENDOR_ADMIN/metrics" 'tollgate_decisions_total{limit="api",outcome="denied"')
stop "$PROXY_PID"; stop "$VENDOR_PID"

python3 - "$work" "$CAPACITY" "$RATE" "$admitted" "$denied" <<'PY'
import json, sys
work, capacity, rate, admitted, denied = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
intake = json.load(open(f"{work}/intake.json"))
alone = json.load(open(f"{work}/alone.json"))["live"]
mixed = json.load(open(f"{work}/mixed.json"))
live, batch = mixed["live"], mixed["batch"]
allowed = capacity + rate * batch["seconds"]
interval_ms = 1000 / rate
print()
print(f"intake: {intake['jobs']} jobs in {intake['seconds']} s = {intake['jobs_per_s']} jobs/s (target >= 20000)")
print(f"live alone:      p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms, max {alone['max_ms']} ms, statuses {alone['statuses']}")
print(f"live with batch: p50 {live['p50_ms']} ms, p99 {live['p99_ms']} ms, max {live['max_ms']} ms, statuses {live['statuses']}")
print(f"  p99 difference {round(live['p99_ms'] - alone['p99_ms'], 3)} ms (target <= one token interval, {interval_ms:.3f} ms)")
print(f"batch: {batch['jobs']} jobs in {batch['seconds']} s = {batch['jobs_per_s']} jobs/s")
print(f"vendor: {admitted} admitted, {denied} answered 429 (target 0)")
print(f"utilisation: {admitted} / {allowed:.0f} allowed = {100 * admitted / allowed:.1f}% (target >= 98%)")
PY
