#!/usr/bin/env bash
# `tollgate proxy` (live calls wait for their slot instead of failing) against
# the gateway playing Celigo, and its own cost where nothing waits.
#
#   bench/proxy.sh                        # about 2 min (plus the build: 2-3 min when the code changed)
#   CLIENTS=32 CALLS=4000 DUR=5 bench/proxy.sh
#   SCENARIOS=1 bench/proxy.sh            # a subset: 1 (= 1a 1b), 1a, 1b, 2
#   BIN=/path/to/tollgate bench/proxy.sh  # another build of tollgate (an older commit's)
#
# Scenarios and targets:
#   1. $CLIENTS client threads (bench/proxy/client.py: Python, one keep-alive
#      http.client connection each) send GET requests as fast as they can,
#      $CALLS calls in all (at most $CALL_SECONDS s), to `tollgate serve
#      --profile celigo` (a leaky bucket of 1,000 refilling 300/s per
#      Authorization header; 429 with Retry-After in whole seconds) in front of
#      nginx `return 200`. A fresh gateway for each case.
#      a. directly, with Celigo's own retry pattern: on a 429 wait Retry-After
#         plus up to 250 ms of jitter, at most 5 attempts, then failed for good.
#         (a reference: no target)
#      b. through `tollgate proxy` (bench/proxy/celigo.toml: one upstream
#         `celigo`, profile = "celigo", the Authorization header added by the
#         proxy, concurrency $PROXY_CONCURRENCY), no retry logic in the clients.
#         Targets: 0 failed calls, <= 0.1% of the gateway's calls answered 429
#         (its tollgate_decisions_total denied / all decisions), utilisation
#         >= 98%.
#      Each prints failed calls, the gateway's 429s (and % of the calls it
#      got), completed calls/s against the allowed rate, utilisation = least
#      time the limits allow for the K completed calls (max(0, K-1000)/300 s)
#      / elapsed (the clients' start to the end of the last call), and p50/p99
#      of every call (first attempt sent -> final answer; failed ones included).
#   2. the proxy's own cost: bench/proxy/unlimited.toml (a token bucket of
#      100,000,000 refilling 100,000,000/s) in front of nginx `return 200`.
#      oha -c $CONNS, ${DUR} s runs (each proxy warmed for 2 s first):
#      i.  peak throughput of nginx direct, nginx as a plain reverse proxy
#          (proxy_pass, keepalive upstream) and tollgate proxy, both in front
#          of the same nginx: tollgate / nginx proxy >= 1.0. Also the floor
#          of the crates tollgate is built on: a bare hyper reverse proxy
#          (crates/bench/src/bin/bare-proxy.rs: hyper's server, hyper-util's
#          pooled client, nothing else), pinned as tollgate is; printed
#          with tollgate / bare and bare / nginx proxy.
#      ii. at half of tollgate proxy's peak (oha -q, --latency-correction),
#          p50 and p99 direct and through tollgate proxy: added p50 <= 150 us,
#          added p99 <= 1 ms (nginx proxy and the bare hyper proxy measured
#          too, for reference).
#
# Layout on this 2-core machine: scenario 1 pins nothing. In scenario 2, as in
# bench/gateway.sh, the proxy under test (nginx: one worker; tollgate: its
# tokio runtime sees one CPU, so one worker thread) is pinned to PROXY_CPU (1),
# oha and the nginx backend to LOAD_CPU (0). tollgate proxy and the gateway
# run with no access log (nginx has access_log off). Everything listens on
# 127.0.0.1 on free ports; every process started here is stopped on exit.
#
# Needs: nginx (apt-get if missing), oha (cargo install into $OHA_ROOT if
# missing), python3, curl, taskset. Helpers: bench/proxy/client.py (the
# clients), bench/proxy/figures.py (scenario 1's figures), bench/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CLIENTS=${CLIENTS:-64}                    # scenario 1: client threads
CALLS=${CALLS:-6000}                      # scenario 1: calls in all (the limits allow them in (6000-1000)/300 = 16.7 s)
CALL_SECONDS=${CALL_SECONDS:-60}          # scenario 1: no call starts after this
PROXY_CONCURRENCY=${PROXY_CONCURRENCY:-64}
DUR=${DUR:-10}                            # scenario 2: seconds per measured run
CONNS=${CONNS:-64}                        # scenario 2: oha connections
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
SCENARIOS=${SCENARIOS:-"1a 1b 2"}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
# KEEP_WORK=1: keep the work directory (configs, client and oha output, logs)
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
TOLLGATE=${BIN:-$target/release/tollgate}   # BIN=/path/to/tollgate: another build
BARE="$target/release/bare-proxy"
PX="$ROOT/bench/proxy"
CAPACITY=1000 RATE=300                    # Celigo's limits (the bundled profile)

source bench/tools.sh

want() { case " $SCENARIOS " in *" $1 "* | *" ${1:0:1} "*) return 0 ;; esac; return 1; }

# ---------------------------------------------------------------- tools
ensure_tools nginx:nginx curl:curl taskset:util-linux
rev=$(tree_state)
log "building tollgate (release, $target) from $rev..."
cargo build --release -q -p tollgate
want 2 && cargo build --release -q -p tollgate-bench --bin bare-proxy
if [ "$(tree_state)" != "$rev" ]; then
  log "WARNING: the code changed during the build (now $(tree_state)): the binary may be either"
  rev+=" (changed during the build)"
fi
log "$(date -u '+%Y-%m-%d %H:%M UTC'): tollgate $("$TOLLGATE" --version | awk '{print $2}') ($rev), nginx $($NGINX -v 2>&1 | sed 's/.*\///'), oha $($OHA --version | awk '{print $2}'), python $(python3 -c 'import platform; print(platform.python_version())'), $(nproc) cpus, nice $(nice)"

# ---------------------------------------------------------------- processes
start_work pxbench
read -r UP_PORT GW_PORT GW_ADMIN_PORT PX_PORT PX_ADMIN_PORT NPX_PORT BARE_PORT < <(free_ports 7)
UPSTREAM="127.0.0.1:$UP_PORT"
GATEWAY="127.0.0.1:$GW_PORT"
GW_ADMIN="http://127.0.0.1:$GW_ADMIN_PORT"
PROXY="127.0.0.1:$PX_PORT"
PX_ADMIN="http://127.0.0.1:$PX_ADMIN_PORT"
NGINX_PROXY="127.0.0.1:$NPX_PORT"

start_backend() { # nginx `return 200` on $UPSTREAM, one worker on LOAD_CPU
  local dir="$work/backend"
  mkdir -p "$dir"
  { nginx_common "$dir"
    echo "http {"; nginx_http_common "$dir"
    cat <<EOF
  server {
    listen $UPSTREAM backlog=4096;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOF
  } > "$dir/nginx.conf"
  taskset -c "$LOAD_CPU" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  UP_PID=$!; pids+=("$UP_PID")
  wait_http "http://$UPSTREAM/" "$UP_PID"
}

start_nginx_proxy() { # nginx as a plain reverse proxy to the backend, one worker on PROXY_CPU
  local dir="$work/nginx-proxy"
  mkdir -p "$dir"
  { nginx_common "$dir"
    echo "http {"; nginx_http_common "$dir"
    cat <<EOF
  upstream backend { server $UPSTREAM; keepalive 256; keepalive_requests 100000000; keepalive_timeout 300s; }
  server {
    listen $NGINX_PROXY backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } > "$dir/nginx.conf"
  "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
  taskset -c "$PROXY_CPU" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  NPX_PID=$!; pids+=("$NPX_PID")
  wait_http "http://$NGINX_PROXY/" "$NPX_PID"
}

start_gateway() { # tollgate serve --profile celigo in front of the backend
  "$TOLLGATE" serve --profile celigo --upstream "http://$UPSTREAM" --listen "$GATEWAY" \
    --admin "127.0.0.1:$GW_ADMIN_PORT" --access-log off 2>>"$work/gateway.err" &
  GW_PID=$!; pids+=("$GW_PID")
  wait_http "$GW_ADMIN/healthz" "$GW_PID"
}


start_bare() { # the bare hyper proxy to the backend, on PROXY_CPU
  taskset -c "$PROXY_CPU" "$BARE" "127.0.0.1:$BARE_PORT" "http://$UPSTREAM" 2>>"$work/bare.err" &
  BARE_PID=$!; pids+=("$BARE_PID")
  wait_http "http://127.0.0.1:$BARE_PORT/" "$BARE_PID"
}

FOREIGN_MAX=0

# ---------------------------------------------------------------- 1
# celigo_case NAME URL CLIENT_ARGS...: a fresh gateway (and, for 1b, proxy);
# the clients; the gateway's decisions; sets the figures.py assignments
celigo_case() {
  local name=$1 url=$2; shift 2
  start_gateway
  [ "$name" = 1b ] && start_proxy "$PX/celigo.toml"
  foreign_begin
  timeout $((CALL_SECONDS + 150)) python3 "$PX/client.py" "$url" --clients "$CLIENTS" --total "$CALLS" \
    --max-seconds "$CALL_SECONDS" "$@" > "$work/$name.json"
  foreign_end
  local admitted denied
  admitted=$(prom_value "$GW_ADMIN/metrics" 'tollgate_decisions_total{limit="account",outcome="admitted"}')
  denied=$(prom_value "$GW_ADMIN/metrics" 'tollgate_decisions_total{limit="account",outcome="denied"}')
  GW_R429=$(prom_value "$GW_ADMIN/metrics" 'tollgate_responses_total{code="429"}')
  if [ "$name" = 1b ]; then
    curl -s -m 5 "$PX_ADMIN/metrics" | grep -E '^tollgate_proxy_(requests|upstream_calls)_total' > "$work/1b.proxy-metrics" || true
    stop "$PX_PID"
  fi
  stop "$GW_PID"
  eval "$(python3 "$PX/figures.py" celigo "$work/$name.json" "$admitted" "$denied" "$CAPACITY" "$RATE")"
  log "  clients: $calls calls, $ok completed, $failed failed for good ($failed_429 after 429s, $failed_status other status, $failed_error connection errors), $attempts attempts, $seen_429 429s seen"
  log "  gateway: $up_calls calls, $up_429 answered 429 = $up_429_pct% (responses 429: $GW_R429)"
  log "  rate: $per_s completed/s over $elapsed s; past the burst $past_burst_per_s/s of $RATE/s allowed; least time for $ok calls $least s -> utilisation $util%"
  log "  latency per call: p50 $p50 ms, p99 $p99 ms, max $max ms (a call started at ${max_at} s); other processes ${FOREIGN}% of a core"
  [ "$unfinished" = 0 ] || log "  WARNING: $unfinished client threads had not finished"
}

if want 1a || want 1b; then
  start_backend
fi
if want 1a; then
  log ""
  log "== 1a. $CLIENTS clients, $CALLS GETs, straight to the gateway (--profile celigo) with Celigo's retry: Retry-After + up to 250 ms, 5 attempts"
  celigo_case 1a "http://$GATEWAY/v1/items" --retry-429 5 --header "authorization: Bearer bench"
  row 1a "failed $failed, gateway 429s $up_429 = $up_429_pct% of $up_calls, $per_s/s in $elapsed s, util $util%, p50/p99 $p50/$p99 ms" "(reference)" ""
fi
if want 1b; then
  log ""
  log "== 1b. the same clients (no retry) through tollgate proxy (profile celigo, concurrency $PROXY_CONCURRENCY)"
  celigo_case 1b "http://$PROXY/celigo/v1/items"
  log "  proxy: $(tr '\n' ' ' < "$work/1b.proxy-metrics" | sed 's/tollgate_proxy_//g'); responses retried by the proxy (Tollgate-Attempts > 1): $tg_retried"
  v=$(verdict "$failed == 0 and $calls == $CALLS and float('$up_429_pct') <= 0.1 and float('$util') >= 98")
  log "  target 0 failed, <= 0.1% 429s, utilisation >= 98%: $v"
  row 1b "failed $failed, gateway 429s $up_429 = $up_429_pct% of $up_calls, $per_s/s in $elapsed s, util $util%, p50/p99 $p50/$p99 ms" "0 failed, <= 0.1% 429, util >= 98%" "$v"
fi
if want 1a || want 1b; then
  stop "$UP_PID"
fi

warm() { taskset -c "$LOAD_CPU" "$OHA" --no-tui -z 2s -c "$CONNS" "$1" > /dev/null 2>&1; }

if want 2; then
  log ""
  log "== 2. the proxy's own cost: nginx return 200 on $UPSTREAM (cpu $LOAD_CPU), proxies on cpu $PROXY_CPU, oha -c $CONNS on cpu $LOAD_CPU, ${DUR} s runs"
  start_backend
  start_nginx_proxy
  start_proxy "$PX/unlimited.toml" taskset -c "$PROXY_CPU"
  start_bare
  B_URL="http://127.0.0.1:$BARE_PORT/v1/items"
  D_URL="http://$UPSTREAM/v1/items"; N_URL="http://$NGINX_PROXY/v1/items"; T_URL="http://$PROXY/local/v1/items"
  warm "$D_URL"
  run_oha peak-direct "$D_URL" -
  peak_d=$RPS
  log "  i. peak, nginx direct:     $RPS req/s ($OK/$ALL 2xx)"
  warm "$N_URL"
  run_oha peak-nginx "$N_URL" "$NPX_PID"
  peak_n=$RPS cpu_n=$CPU_US
  log "     peak, nginx proxy:      $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; nginx $CPU_US us of CPU per request)"
  warm "$T_URL"
  run_oha peak-tollgate "$T_URL" "$PX_PID"
  peak_t=$RPS cpu_t=$CPU_US
  log "     peak, tollgate proxy:   $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; tollgate $CPU_US us of CPU per request)"
  warm "$B_URL"
  run_oha peak-bare "$B_URL" "$BARE_PID"
  peak_b=$RPS cpu_b=$CPU_US
  log "     peak, bare hyper proxy: $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
  ratio=$(ratio_of "$peak_t" "$peak_n")
  v=$(verdict "$peak_t >= $peak_n")
  log "     tollgate / nginx proxy: ${ratio}x (target >= 1.0: $v); tollgate / bare hyper: $(ratio_of "$peak_t" "$peak_b")x; bare hyper / nginx proxy: $(ratio_of "$peak_b" "$peak_n")x"
  row "2i" "peak req/s: direct $peak_d, nginx proxy $peak_n, tollgate proxy $peak_t = ${ratio}x (CPU/request: nginx $cpu_n us, tollgate $cpu_t us)" ">= 1.0x nginx proxy" "$v"
  row "2i floor" "bare hyper proxy $peak_b req/s ($cpu_b us/request) = $(ratio_of "$peak_b" "$peak_n")x nginx proxy; tollgate = $(ratio_of "$peak_t" "$peak_b")x bare hyper" "(reference)" ""

  half=$((peak_t / 2))
  log "  ii. at a constant $half req/s (half of tollgate proxy's peak), oha -q $half --latency-correction"
  run_oha half-direct "$D_URL" - -q "$half" --latency-correction
  d50=$P50 d99=$P99
  log "     direct:         p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx)"
  run_oha half-tollgate "$T_URL" "$PX_PID" -q "$half" --latency-correction
  t50=$P50 t99=$P99
  log "     tollgate proxy: p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
  run_oha half-nginx "$N_URL" "$NPX_PID" -q "$half" --latency-correction
  n50=$P50 n99=$P99
  log "     nginx proxy:    p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
  run_oha half-bare "$B_URL" "$BARE_PID" -q "$half" --latency-correction
  b50=$P50 b99=$P99
  log "     bare hyper:     p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
  add50=$((t50 - d50)) add99=$((t99 - d99))
  v50=$(verdict "$add50 <= 150"); v99=$(verdict "$add99 <= 1000")
  log "     added by tollgate proxy: p50 +$add50 us (target <= 150 us: $v50), p99 +$add99 us (target <= 1,000 us: $v99); by nginx proxy: p50 +$((n50 - d50)) us, p99 +$((n99 - d99)) us"
  row "2ii p50" "at $half req/s: direct $d50 us, tollgate $t50 us (+$add50), nginx proxy $n50 us (+$((n50 - d50)))" "<= +150 us" "$v50"
  row "2ii p99" "at $half req/s: direct $d99 us, tollgate $t99 us (+$add99), nginx proxy $n99 us (+$((n99 - d99)))" "<= +1,000 us" "$v99"
  row "2ii floor" "at $half req/s: bare hyper proxy p50 $b50 us (+$((b50 - d50))), p99 $b99 us (+$((b99 - d99)))" "(reference)" ""
  curl -s -m 5 "$PX_ADMIN/metrics" | grep -E '^tollgate_proxy_(requests|upstream_calls)_total' | sed 's/^/  tollgate proxy: /' >&2 || true
  stop "$PX_PID"; stop "$NPX_PID"; stop "$BARE_PID"; stop "$UP_PID"
fi

stderr_warnings gateway proxy bare

# ---------------------------------------------------------------- table
echo
echo "tollgate proxy (bench/proxy.sh) at $rev, $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cpus, loopback; 1: $CLIENTS clients, $CALLS calls; 2: oha -c $CONNS, ${DUR} s"
echo "other processes used at most ${FOREIGN_MAX}% of a core during a measured run"
print_table
