#!/usr/bin/env bash
# tollgate's Redis store (issue 6, "Performance"), against one redis-server
# that this script starts on a free loopback port (--save "" --appendonly no).
#
#   bench/redis.sh                   # about 3 min 15 s with the profile (plus the first build;
#                                    # CARGO_TARGET_DIR defaults to /work/target-rbench)
#   SECS=5 ROUNDS=2 GW_DUR=10 PROFILE=auto bench/redis.sh
#
# Cases and targets:
#   1. round trips per decision: $DECISIONS decisions through RedisStore::decide
#      for bench/redis/one_limit.toml (one fixed window) and three_limits.toml
#      (token bucket + fixed window + tiered), one at a time and 16 in
#      flight. CONFIG RESETSTAT before, INFO commandstats after, MONITOR
#      during (it tells the commands clients sent from those decide.lua ran
#      inside Redis): one at a time, exactly 1 FCALL per decision; 16 in
#      flight, decisions queued together share one FCALL (the client's
#      count of calls equals Redis's, at most one per decision); nothing
#      else from the client. The script stops here, failing, if that does
#      not hold.
#   2. store throughput, $CONC decisions in flight from one process (tokio
#      multi-thread), $SECS s each after a 1 s warm-up, $TENANTS tenants in
#      turn, the same redis crate and the same pool of 4 multiplexed
#      connections on both sides:
#        a. tollgate: RedisStore::decide, one fixed-window limit
#        b. envoy-style: one pipeline per request of INCRBY key 1 + EXPIRE key
#           60 on envoy ratelimit's key (domain_key_value_windowstart), the
#           count compared with the limit (what envoy's Redis fixed-window
#           cache does for one descriptor)
#        c. tollgate with three limits per request (all decided atomically)
#      decisions/s, a/b                                                 >= 0.8x
#      Also per run: redis-server's CPU, the client's CPU per decision and
#      Redis's own time per decision (commandstats usec).
#   3. `tollgate serve --demo-upstream` with one token bucket per tenant, the
#      same config with [store] memory and with [store] kind = "redis", the
#      same load (oha -c $GW_CONNS -z ${GW_DUR}s, one tenant): never-deny, and
#      most denied (capacity 100, refill 1000/s). redis/memory req/s    >= 0.5x
#      The Redis runs count FCALL per request; if the gateway did not
#      decide on Redis (not wired yet) the case is reported as PENDING.
#   (A hot key on 3 processes with and without a lease: bench/lease.sh.)
#   PROFILE=auto (default) runs bench/redis/profile/instructions.sh when a/b
#   misses 0.8x: redis-server's instructions per decision of decide.lua,
#   counted exactly by callgrind (PROFILE=1 always, 0 never).
#
# Nothing is pinned: redis-server, the client (2 tokio workers), the gateway
# and oha share the 2 cores. Everything listens on 127.0.0.1; every process
# started here is stopped on exit.
#
# Needs: redis-server and redis-tools (apt-get if missing), oha (cargo install
# into $OHA_ROOT if missing), python3, curl. The client is crates/bench's
# redis-bench binary; parsing helpers in bench/redis/stats.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DECISIONS=${DECISIONS:-10000}  # case 1, per policy
SECS=${SECS:-5}                # case 2, seconds per measured run
ROUNDS=${ROUNDS:-2}            # case 2, runs per client (best is reported)
CONC=${CONC:-64}               # case 2, decisions in flight
TENANTS=${TENANTS:-1000}       # case 2, distinct keys
GW_DUR=${GW_DUR:-10}           # case 3, seconds per measured run
GW_CONNS=${GW_CONNS:-64}       # case 3, oha connections
PROFILE=${PROFILE:-auto}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-rbench}
target=$CARGO_TARGET_DIR
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
RBENCH="$target/release/redis-bench"
TOLLGATE="$target/release/tollgate"
POLICY1="$ROOT/bench/redis/one_limit.toml"
POLICY3="$ROOT/bench/redis/three_limits.toml"
STATS="python3 $ROOT/bench/redis/stats.py"

source bench/tools.sh

# ---------------------------------------------------------------- tools
ensure_tools redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools curl:curl
log "building redis-bench and tollgate (release, $target)..."
cargo build --release -q -p tollgate-bench --bin redis-bench
GATEWAY_BUILT=1
cargo build --release -q -p tollgate || { GATEWAY_BUILT=0; log "WARNING: tollgate did not build; case 3 is skipped"; }
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev+=" with uncommitted changes under crates/ or Cargo files"
REDIS_VERSION=$(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')
log "tollgate $rev; redis-server $REDIS_VERSION; oha $($OHA --version | awk '{print $2}'); $(nproc) cpus"

# ---------------------------------------------------------------- processes
start_work rbench
read -r REDIS_PORT GW_PORT ADMIN_PORT < <(free_ports 3)
URL="redis://127.0.0.1:$REDIS_PORT"
cli() { redis-cli -p "$REDIS_PORT" "$@"; }

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" --daemonize no &
REDIS_PID=$!; pids+=("$REDIS_PID")
for _ in $(seq 1 50); do cli ping >/dev/null 2>&1 && break; sleep 0.1; done
cli ping >/dev/null || { log "ERROR: redis-server did not start: $(tail -5 "$work/redis.log")"; exit 1; }
log "redis-server $REDIS_VERSION on $URL (pid $REDIS_PID)"

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

declare -A R  # results, printed at the end

# client_start ARGS...: start redis-bench with --handshake, talking through two
# FIFOs; returns once it is connected and warmed up (it printed "ready").
client_start() {
  rm -f "$work/rb.in" "$work/rb.out"
  mkfifo "$work/rb.in" "$work/rb.out"
  "$RBENCH" "$@" --url "$URL" --handshake < "$work/rb.in" > "$work/rb.out" &
  RB_P=$!; pids+=("$RB_P")
  exec {RB_IN}>"$work/rb.in" {RB_OUT}<"$work/rb.out"
  local line=""
  read -r -t 120 -u "$RB_OUT" line || true
  [ "$line" = ready ] || { log "ERROR: redis-bench did not get ready (said '$line')"; exit 1; }
}
# client_go: start the measured run; client_wait FILE: its result line into FILE.
client_go() { echo go >&"$RB_IN"; }
client_wait() {
  local line="" rc=0
  read -r -t 600 -u "$RB_OUT" line || true
  printf '%s\n' "$line" > "$1"
  exec {RB_IN}>&- {RB_OUT}<&-
  wait "$RB_P" || rc=$?
  forget "$RB_P"
  [ "$rc" = 0 ] && [ -n "$line" ] || { log "ERROR: redis-bench failed (exit $rc): $line"; exit 1; }
}
kv() { $STATS kv "$1" "$2"; }
# CPU other processes (not this script's) took during a measured run, % of a core.
FOREIGN_MAX=0

# ---------------------------------------------------------------- 1. round trips
log ""
log "== 1. round trips per decision ($DECISIONS decisions each, 100 tenants)"
roundtrips() { # roundtrips LABEL POLICY IN_FLIGHT
  local label=$1 policy=$2 mon
  client_start tollgate --policy "$policy" --decisions "$DECISIONS" --concurrency "$3" --tenants 100 --warmup 0.2
  cli config resetstat > /dev/null
  redis-cli -p "$REDIS_PORT" monitor > "$work/monitor.$label" &
  mon=$!; pids+=("$mon")
  for _ in $(seq 1 50); do [ -s "$work/monitor.$label" ] && break; sleep 0.05; done
  client_go
  client_wait "$work/rt.$label"
  sleep 0.5   # MONITOR's feed is asynchronous
  stop "$mon"
  cli info commandstats > "$work/stats.$label"
  log "  $label ($(basename "$policy"), $3 in flight): $(kv "$work/rt.$label" decisions) decisions, $(kv "$work/rt.$label" admitted) admitted, $(kv "$work/rt.$label" calls) calls"
  if ! $STATS roundtrips "$work/stats.$label" "$work/monitor.$label" "$(kv "$work/rt.$label" decisions)" "$(kv "$work/rt.$label" calls)" > "$work/rt-report.$label"; then
    cat "$work/rt-report.$label" >&2
    log ""
    log "FAILED: a decision with $label did not take exactly one Redis round trip (one FCALL)."
    exit 1
  fi
  if [ "$3" = 1 ] && [ "$(kv "$work/rt.$label" calls)" != "$(kv "$work/rt.$label" decisions)" ]; then
    log "FAILED: one at a time, $label took $(kv "$work/rt.$label" calls) calls for $(kv "$work/rt.$label" decisions) decisions."
    exit 1
  fi
  sed '$d' "$work/rt-report.$label" >&2
  R[rt_$label]=$(tail -1 "$work/rt-report.$label")
}
roundtrips one "$POLICY1" 1
roundtrips three "$POLICY3" 1
roundtrips one16 "$POLICY1" 16
roundtrips three16 "$POLICY3" 16

# ---------------------------------------------------------------- 2. throughput
log ""
log "== 2. store throughput: $CONC decisions in flight, ${SECS}s per run, $TENANTS tenants, pool of 4 connections, best of $ROUNDS"
# measure NAME ARGS...: one measured run; sets R[NAME_*] to the best so far
measure() {
  local name=$1; shift
  local r0 r1 rate cpu_redis
  client_start "$@" --secs "$SECS" --concurrency "$CONC" --tenants "$TENANTS" --warmup 1
  cli config resetstat > /dev/null
  r0=$(cpu_ticks "$REDIS_PID")
  foreign_begin
  client_go
  client_wait "$work/tp.$name"
  foreign_end
  r1=$(cpu_ticks "$REDIS_PID")
  cli info commandstats > "$work/tpstats.$name"
  rate=$(kv "$work/tp.$name" rate)
  local secs decisions
  secs=$(kv "$work/tp.$name" secs); decisions=$(kv "$work/tp.$name" decisions)
  cpu_redis=$(python3 -c "import sys; print(round(100 * (int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) / float(sys.argv[4])))" "$r0" "$r1" "$CLK_TCK" "$secs")
  local server
  server=$($STATS server "$work/tpstats.$name" "$decisions")
  log "  $name: $rate decisions/s, p50 $(kv "$work/tp.$name" p50_us) us, p99 $(kv "$work/tp.$name" p99_us) us; client cpu $(kv "$work/tp.$name" cpu_pct)% ($(kv "$work/tp.$name" cpu_us_per_decision) us/decision), redis-server cpu ${cpu_redis}%; Redis $(sed 's/.*usec_per_decision=\([^ ]*\).*/\1/' <<<"$server") us/decision ($(sed 's/.*detail=//' <<<"$server"))"
  [ "$(kv "$work/tp.$name" denied)" = 0 ] || log "  WARNING: $name denied $(kv "$work/tp.$name" denied) decisions (quotas are meant never to bind)"
  if python3 -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$rate" "${R[${name}_rate]:-0}"; then
    R[${name}_rate]=$rate
    R[${name}_p50]=$(kv "$work/tp.$name" p50_us); R[${name}_p99]=$(kv "$work/tp.$name" p99_us)
    R[${name}_cpu]=$(kv "$work/tp.$name" cpu_pct); R[${name}_cpu_us]=$(kv "$work/tp.$name" cpu_us_per_decision)
    R[${name}_redis_cpu]=$cpu_redis
    R[${name}_server_us]=$(sed 's/.*usec_per_decision=\([^ ]*\).*/\1/' <<<"$server")
    R[${name}_server]=$(sed 's/.*detail=//' <<<"$server")
  fi
}
for round in $(seq 1 "$ROUNDS"); do
  measure tollgate1 tollgate --policy "$POLICY1"
  measure envoy envoy --quota 1000000000 --window 60
  measure tollgate3 tollgate --policy "$POLICY3"
done
ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "${R[tollgate1_rate]}" "${R[envoy_rate]}")
log "  tollgate (1 limit) / envoy-style: ${ratio}x (target >= 0.8x)"

# ---------------------------------------------------------------- 3. gateway
log ""
GATEWAY="http://127.0.0.1:$GW_PORT"
ADMIN="http://127.0.0.1:$ADMIN_PORT"
wait_http() { # wait_http URL PID
  local i
  for i in $(seq 1 100); do
    curl -s -o /dev/null "$1" && return 0
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}
gateway_config() { # gateway_config STORE CAPACITY REFILL
  if [ "$1" = redis ]; then printf '[store]\nkind = "redis"\nurl = "%s"\n\n' "$URL"; else printf '[store]\nkind = "memory"\n\n'; fi
  cat <<EOF
[[limit]]
name = "tenant"
key = ["header:x-tenant-id"]
algorithm = "token_bucket"
capacity = $2
refill = "$3"
EOF
}
# gateway_run NAME STORE CAPACITY REFILL: sets GW_RPS GW_2XX GW_429 GW_ALL GW_FCALL GW_ERR
gateway_run() {
  local name=$1 store=$2 cfg="$work/gw-$1.toml" gw
  gateway_config "$store" "$3" "$4" > "$cfg"
  GW_ERR=""
  if ! "$TOLLGATE" check "$cfg" > "$work/gw-$name.check" 2>&1; then
    GW_ERR="tollgate check: $(head -3 "$work/gw-$name.check" | tr '\n' ' ')"; return 0
  fi
  "$TOLLGATE" serve --config "$cfg" --demo-upstream --listen "127.0.0.1:$GW_PORT" \
    --admin "127.0.0.1:$ADMIN_PORT" --access-log off 2> "$work/gw-$name.log" &
  gw=$!; pids+=("$gw")
  if ! wait_http "$ADMIN/healthz" "$gw"; then
    GW_ERR="serve did not start: $(grep -v '^$' "$work/gw-$name.log" | tail -3 | tr '\n' ' ')"; stop "$gw"; return 0
  fi
  "$OHA" --no-tui -c "$GW_CONNS" -z 2s -H "x-tenant-id: acme" "$GATEWAY/" > /dev/null 2>&1 || true
  cli config resetstat > /dev/null
  local r0 r1
  r0=$(cpu_ticks "$REDIS_PID")
  foreign_begin
  "$OHA" --no-tui --output-format json -c "$GW_CONNS" -z "${GW_DUR}s" -H "x-tenant-id: acme" "$GATEWAY/" \
    > "$work/gw-$name.json" 2> "$work/gw-$name.oha.err" || { GW_ERR="oha failed: $(cat "$work/gw-$name.oha.err")"; stop "$gw"; return 0; }
  foreign_end
  r1=$(cpu_ticks "$REDIS_PID")
  GW_REDIS_CPU=$(python3 -c "import sys; print(round(100 * (int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]) / float(sys.argv[4])))" "$r0" "$r1" "$CLK_TCK" "$GW_DUR")
  cli info commandstats > "$work/gw-$name.stats"
  stop "$gw"
  read -r GW_RPS GW_2XX GW_429 GW_ALL < <(python3 - "$work/gw-$name.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
print(round(d["summary"]["requestsPerSec"]), ok, codes.get("429", 0), sum(codes.values()))
PY
)
  GW_FCALL=$(awk -F'[=,]' '/^cmdstat_fcall:/ { print $2 }' "$work/gw-$name.stats"); GW_FCALL=${GW_FCALL:-0}
  GW_FCALL_US=$(awk -F'[=,]' '/^cmdstat_fcall:/ { print $6 }' "$work/gw-$name.stats"); GW_FCALL_US=${GW_FCALL_US:-0}
  if grep -Eqi "panic|error" "$work/gw-$name.log"; then
    log "  $name: tollgate's stderr had errors: $(grep -Ei 'panic|error' "$work/gw-$name.log" | sort | uniq -c | head -3 | tr '\n' ' ')"
  fi
}
R[gw]=skipped
if [ "$GATEWAY_BUILT" = 1 ]; then
  log "== 3. tollgate serve --demo-upstream, [store] memory vs redis, oha -c $GW_CONNS -z ${GW_DUR}s, one tenant"
  R[gw]=done
  for load in allow deny; do
    if [ $load = allow ]; then cap=1000000; refill=1000000/s; else cap=100; refill=1000/s; fi
    for store in memory redis; do
      gateway_run "$load-$store" "$store" "$cap" "$refill"
      if [ -n "$GW_ERR" ]; then
        log "  $load, $store: NOT RUN: $GW_ERR"
        R[gw_${load}_${store}]=error; R[gw_${load}_${store}_note]=$GW_ERR
        continue
      fi
      note=""
      if [ "$store" = redis ]; then
        note=", requests per FCALL $(python3 -c "import sys; print(f'{int(sys.argv[2]) / max(int(sys.argv[1]), 1):.1f}')" "$GW_FCALL" "$GW_ALL") at $GW_FCALL_US us each, redis-server cpu $GW_REDIS_CPU%"
        R[gw_${load}_fcall_us]=$GW_FCALL_US; R[gw_${load}_redis_cpu]=$GW_REDIS_CPU
        # The gateway on Redis sends an FCALL per decision, or one for
        # several queued together; none means it decided in memory.
        if [ "$GW_FCALL" = 0 ]; then
          R[gw_${load}_redis_pending]="$GW_FCALL FCALL for $GW_ALL requests: the gateway did not decide on Redis"
        fi
      fi
      log "  $load, $store: $GW_RPS req/s, 2xx $GW_2XX, 429 $GW_429 of $GW_ALL$note"
      R[gw_${load}_${store}]=$GW_RPS; R[gw_${load}_${store}_2xx]=$GW_2XX; R[gw_${load}_${store}_all]=$GW_ALL
    done
  done
fi

# ---------------------------------------------------------------- profile
run_profile=0
case $PROFILE in
  1) run_profile=1 ;;
  auto) python3 -c "import sys; sys.exit(not float(sys.argv[1]) < 0.8)" "$ratio" && run_profile=1 ;;
esac
if [ $run_profile = 1 ]; then
  log ""
  log "== profile: redis-server's instructions per decision, counted by callgrind (bench/redis/profile/instructions.sh)"
  bench/redis/profile/instructions.sh > "$work/profile.txt"
  log "  (printed with the summary)"
fi

# ---------------------------------------------------------------- table
{
  for k in "${!R[@]}"; do printf '%s=%s\n' "$k" "${R[$k]}"; done
  printf 'foreign_max=%s\n' "$FOREIGN_MAX"
  printf 'conc=%s\nsecs=%s\ngw_dur=%s\ngw_conns=%s\nrounds=%s\ndecisions=%s\nredis=%s\ncpus=%s\n' \
    "$CONC" "$SECS" "$GW_DUR" "$GW_CONNS" "$ROUNDS" "$DECISIONS" "$REDIS_VERSION" "$(nproc)"
} > "$work/results"
echo
[ $run_profile = 1 ] && { cat "$work/profile.txt"; echo; }
python3 - "$work/results" <<'PY'
import sys
r = dict(line.rstrip("\n").split("=", 1) for line in open(sys.argv[1]))
def verdict(ok): return "PASS" if ok else "MISS"
def rt(key):
    d = dict(p.split("=") for p in r[key].split())
    return float(d["fcall_per_decision"]), int(d["client_other"]), float(d["inner_per_decision"])
rows = []
for label, name in (("1 limit", "one"), ("3 limits", "three")):
    e, o, inner = rt(f"rt_{name}")
    rows.append((f"round trips per decision, {label}, one at a time ({int(r['decisions']):,} decisions)",
                 f"{e:.2f} FCALL, {o} other", "", "", "1 FCALL, 0 other", verdict(e == 1.0 and o == 0)))
    e, o, inner = rt(f"rt_{name}16")
    rows.append((f"round trips per decision, {label}, 16 in flight (queued ones share a call)",
                 f"{e:.2f} FCALL, {o} other", "", "", "<= 1 FCALL, 0 other", verdict(e <= 1.0 and o == 0)))
t1, env, t3 = float(r["tollgate1_rate"]), float(r["envoy_rate"]), float(r["tollgate3_rate"])
rows.append((f"store decisions/s, 1 fixed window, {r['conc']} in flight", f"{t1:,.0f}", f"{env:,.0f}",
             f"{t1 / env:.2f}x", ">= 0.8x", verdict(t1 / env >= 0.8)))
rows.append(("store decisions/s, tollgate 3 limits vs envoy 1", f"{t3:,.0f}", f"{env:,.0f}", f"{t3 / env:.2f}x", "", ""))
rows.append(("  p50 / p99 latency (us), 1 limit", f"{r['tollgate1_p50']} / {r['tollgate1_p99']}",
             f"{r['envoy_p50']} / {r['envoy_p99']}", "", "", ""))
rows.append(("  Redis time per decision (us, commandstats)", f"{float(r['tollgate1_server_us']):.2f}",
             f"{float(r['envoy_server_us']):.2f}", f"{float(r['tollgate1_server_us']) / max(float(r['envoy_server_us']), 1e-9):.1f}x", "", ""))
rows.append(("  redis-server cpu / client cpu (% of a core)", f"{r['tollgate1_redis_cpu']} / {r['tollgate1_cpu']}",
             f"{r['envoy_redis_cpu']} / {r['envoy_cpu']}", "", "", ""))
rows.append(("  client cpu per decision (us)", r["tollgate1_cpu_us"], r["envoy_cpu_us"], "", "", ""))
if r.get("gw") == "done":
    for load, label in (("allow", "never-deny"), ("deny", "mostly denied (100 + 1000/s)")):
        m, x = r.get(f"gw_{load}_memory"), r.get(f"gw_{load}_redis")
        pending = r.get(f"gw_{load}_redis_pending")
        if m in (None, "error") or x in (None, "error"):
            note = r.get(f"gw_{load}_redis_note") or r.get(f"gw_{load}_memory_note") or "not run"
            rows.append((f"gateway req/s, {label}: redis / memory", "error", m or "", "", ">= 0.5x", "PENDING"))
            print(f"gateway {load}: {note}")
            continue
        m, x = float(m), float(x)
        share = 100 - 100 * int(r[f"gw_{load}_redis_2xx"]) / max(int(r[f"gw_{load}_redis_all"]), 1)
        rows.append((f"gateway req/s, {label}: redis / memory (redis denied {share:.0f}%)", f"{x:,.0f}", f"{m:,.0f}",
                     f"{x / m:.2f}x", ">= 0.5x", "PENDING" if pending else verdict(x / m >= 0.5)))
        if pending:
            print(f"gateway {load}: PENDING, {pending}")
head = ("case", "tollgate", "peer", "ratio", "target", "")
w = [max(len(row[i]) for row in rows + [head]) for i in range(6)]
print(f"tollgate's Redis store, redis-server {r['redis']}, {r['cpus']} cpus, loopback; peer = envoy-style "
      f"INCRBY+EXPIRE client (store rows) or the memory store (gateway rows)")
print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)).rstrip())
print("  ".join("-" * w[i] for i in range(6)).rstrip())
for row in rows:
    print("  ".join(c.ljust(w[i]) if i in (0, 4, 5) else c.rjust(w[i]) for i, c in enumerate(row)).rstrip())
print()
for load in ("allow", "deny"):
    if r.get(f"gw_{load}_fcall_us"):
        print(f"gateway {load} on Redis: {r[f'gw_{load}_fcall_us']} us of Redis time per FCALL, redis-server cpu {r[f'gw_{load}_redis_cpu']}%")
print(f"other processes took at most {r['foreign_max']}% of a core during a measured run")
print(f"store runs: best of {r['rounds']} x {r['secs']} s; gateway runs: oha -c {r['gw_conns']} -z {r['gw_dur']}s after a 2 s warm-up")
print(f"Redis per decision: tollgate 1 limit {r['tollgate1_server']}; 3 limits {r['tollgate3_server']} "
      f"({float(r['tollgate3_server_us']):.2f} us, redis-server cpu {r['tollgate3_redis_cpu']}%); envoy {r['envoy_server']}")
PY
