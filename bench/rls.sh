#!/usr/bin/env bash
# Envoy's rate limit service: tollgate serve's [rls] listener against
# limitador-server (Kuadrant's RLS, in-memory storage), both answering
# `ShouldRateLimit` for the same descriptors, driven by the same gRPC load
# tool. Target of the ecosystem issue: tollgate / limitador >= 1.0x in
# decisions per second, for a fixed window (what both support).
#
#   bench/rls.sh                                  # about 3 min (plus the builds)
#   LIMITADOR=/path/to/limitador-server bench/rls.sh
#   ROUNDS=1 DUR=5 bench/rls.sh
#
# limitador: LIMITADOR names a built limitador-server; without it the
# script runs `cargo install limitador-server` (crates.io, its own release
# profile) into $LIMITADOR_ROOT once. It needs protoc and libclang (apt-get
# protobuf-compiler libclang-dev; the script installs them when missing).
#
# Cases (each server pinned to PROXY_CPU, the load tool to LOAD_CPU):
#   1. one fixed window of 10^9 a minute per tenant (no request is
#      refused), tenant from the descriptor, 100 tenants cycling:
#      tollgate [[limit]] key = ["descriptor:tenant"], match.domain;
#      limitador namespace = the domain, variables = descriptors[0]['tenant'].
#      Both write rate-limit headers (tollgate its RateLimit pair,
#      limitador `-H DRAFT_VERSION_03`).
#   2. tollgate alone, three limits on each request (that fixed window, a
#      token bucket per tenant and a sliding window for everyone), all
#      decided at once: what the all-or-nothing decision costs.
# The load tool (crates/bench/src/bin/rls-load.rs, tonic with Envoy's
# generated client): $CONC callers over $CONNS HTTP/2 connections, ${DUR} s
# per run after a 2 s warm-up. The servers run in turn, $ROUNDS rounds;
# the verdict takes the median of the rounds' ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DUR=${DUR:-10}
CONC=${CONC:-64}
CONNS=${CONNS:-4}
TENANTS=${TENANTS:-100}
ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
LIMITADOR_ROOT=${LIMITADOR_ROOT:-/work/tools-limitador}
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac

source bench/tools.sh
ensure_tools curl:curl taskset:util-linux python3:python3 protoc:protobuf-compiler
# (limitador's storages build zstd and rocksdb bindings: bindgen needs libclang)
if [ -z "${LIMITADOR:-}" ] && ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  log "installing libclang-dev (apt-get), for building limitador-server..."
  apt-get install -y -q libclang-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libclang-dev >/dev/null; }
fi
rev=$(tree_state)
log "building tollgate and rls-load (release, $target) from $rev..."
cargo build --release -q -p tollgate -p tollgate-bench --bin tollgate --bin rls-load
TOLLGATE="$target/release/tollgate"
LOAD="$target/release/rls-load"
if [ -z "${LIMITADOR:-}" ]; then
  LIMITADOR="$LIMITADOR_ROOT/bin/limitador-server"
  if [ ! -x "$LIMITADOR" ]; then
    log "installing limitador-server from crates.io into $LIMITADOR_ROOT (once; its release profile)..."
    cargo install -q limitador-server --locked --root "$LIMITADOR_ROOT"
  fi
fi
log "$(date -u '+%Y-%m-%d %H:%M UTC'): tollgate at $rev, $("$LIMITADOR" --version 2>&1 | head -1), $(nproc) cpus, nice $(nice)"

start_work rlsbench
read -r TG_RLS TG_HTTP TG_ADMIN LM_RLS LM_HTTP < <(free_ports 5)
FOREIGN_MAX=0
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.2f}')" "$@"; }

tollgate_config() { # tollgate_config FILE three|one
  { cat <<EOT
[gateway]
listen = "127.0.0.1:$TG_HTTP"
admin_listen = "127.0.0.1:$TG_ADMIN"
access_log = "off"

[rls]
listen = "127.0.0.1:$TG_RLS"

[[limit]]
name = "per-tenant"
key = ["descriptor:tenant"]
match = { domain = "bench" }
algorithm = "fixed_window"
every = "1m"
quota = 1000000000
EOT
    if [ "$2" = three ]; then cat <<EOT

[[limit]]
name = "tenant-burst"
key = ["descriptor:tenant"]
match = { domain = "bench" }
algorithm = "token_bucket"
capacity = 1000000
refill = "1000000/s"

[[limit]]
name = "everyone"
match = { domain = "bench" }
algorithm = "sliding_window"
every = "1m"
quota = 1000000000
EOT
    fi
  } > "$1"
}
tollgate_config "$work/one.toml" one
tollgate_config "$work/three.toml" three
cat > "$work/limits.yaml" <<'EOT'
---
- namespace: bench
  max_value: 1000000000
  seconds: 60
  conditions: []
  variables:
    - descriptors[0]['tenant']
EOT

# measure NAME PORT CMD...: start the server (pinned), warm, one run; sets RPS OK OVER ERR P50 P99 CPU_US
measure() {
  local name=$1 port=$2; shift 2
  taskset -c "$PROXY_CPU" "$@" >>"$work/$name.log" 2>&1 &
  local pid=$!; pids+=("$pid")
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  taskset -c "$LOAD_CPU" "$LOAD" "127.0.0.1:$port" bench 2 "$CONC" "$CONNS" "$TENANTS" > /dev/null
  local c0 c1
  c0=$(tree_cpu_s "$pid")
  foreign_begin
  taskset -c "$LOAD_CPU" "$LOAD" "127.0.0.1:$port" bench "$DUR" "$CONC" "$CONNS" "$TENANTS" > "$work/run.json"
  foreign_end
  c1=$(tree_cpu_s "$pid")
  stop "$pid"
  read -r RPS OK OVER ERR P50 P99 < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["rps"], d["ok"], d["over"], d["errors"], d["p50_us"], d["p99_us"])' "$work/run.json")
  CPU_US=$(python3 -c "import sys; n = int(sys.argv[3]) + int(sys.argv[4]) + int(sys.argv[5]); print(f'{1e6 * (float(sys.argv[2]) - float(sys.argv[1])) / n:.1f}' if n else '-')" "$c0" "$c1" "$OK" "$OVER" "$ERR")
  log "  $name: $RPS decisions/s (OK $OK, OVER_LIMIT $OVER, errors $ERR; p50 $P50 us, p99 $P99 us; server $CPU_US us of CPU per decision)"
}

log ""
log "== RLS: servers on cpu $PROXY_CPU, rls-load ($CONC callers, $CONNS connections, $TENANTS tenants) on cpu $LOAD_CPU, ${DUR} s runs, $ROUNDS round(s)"
ratios=() threes=()
for round in $(seq "$ROUNDS"); do
  log " round $round"
  measure tollgate "$TG_RLS" "$TOLLGATE" serve --config "$work/one.toml"
  tg=$RPS tg_cpu=$CPU_US tg_err=$ERR tg_p=$P50/$P99
  measure limitador "$LM_RLS" "$LIMITADOR" -b 127.0.0.1 -p "$LM_RLS" -B 127.0.0.1 -P "$LM_HTTP" -H DRAFT_VERSION_03 "$work/limits.yaml" memory
  lm=$RPS lm_cpu=$CPU_US lm_err=$ERR lm_p=$P50/$P99
  measure tollgate-three "$TG_RLS" "$TOLLGATE" serve --config "$work/three.toml"
  t3=$RPS t3_cpu=$CPU_US
  r=$(ratio_of "$tg" "$lm")
  ratios+=("$r") threes+=("$(ratio_of "$t3" "$tg")")
  row "1 round $round" "tollgate $tg/s ($tg_cpu us/decision, p50/p99 $tg_p us, $tg_err errors), limitador $lm/s ($lm_cpu us, $lm_p us, $lm_err errors) = ${r}x" "" ""
  row "2 round $round" "tollgate, three limits a request: $t3/s ($t3_cpu us/decision) = $(ratio_of "$t3" "$tg")x one limit" "" ""
done
m=$(median "${ratios[@]}")
row "1" "median tollgate / limitador, one fixed window: ${m}x (rounds: ${ratios[*]})" ">= 1.0x" "$(verdict "$m >= 1.0")"
row "2" "median three limits / one: $(median "${threes[@]}")x (rounds: ${threes[*]})" "(reference)" ""

echo
echo "Envoy RLS: tollgate vs limitador (bench/rls.sh) at $rev, $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cpus, loopback, $CONC callers over $CONNS connections, ${DUR} s runs"
echo "other processes used at most ${FOREIGN_MAX}% of a core during a measured run"
print_table
