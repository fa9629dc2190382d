#!/usr/bin/env bash
# `tollgate run` (the egress runner) against `tollgate serve` enforcing the
# same limits, against another client sharing the quota, against the sleep
# loop of a CRM's rate-limit page, and against an unlimited local upstream (its
# own overhead).
#
#   bench/egress.sh                       # about 4 min (plus the first build)
#   nice -n -10 bench/egress.sh
#   CONCURRENCIES="64" OVERHEAD_JOBS=20000 bench/egress.sh
#
# Scenarios and targets:
#   1. the runner's limits match the gateway's; zero 429s, utilisation >= 98%
#      (the runner's own figure: least time the limits allow / elapsed)
#      a. fixed_window 200 per 1 s per Authorization (the CRM page's shape, scaled),
#         bench/egress/fixed_window.toml read by both sides, $FIXED_JOBS jobs
#      b. Celigo's rate-limit page: --profile celigo / profile = "celigo" (leaky
#         bucket 1,000 refilling 300/s), $CELIGO_JOBS jobs
#   2. the same two, while oha sends at a constant half of the allowed rate
#      with the same Authorization header for the whole run (started 0.5 s
#      before the runner, stopped when it ends): <= 1% of the runner's calls
#      get a 429, and utilisation of what is left (allowed rate - the other
#      client's 2xx rate, from oha's status counts; also from the gateway's
#      log over the same span, and the verdict takes the lower) >= 90%. How it
#      is computed: bench/egress/analyse.py (shared).
#   3. the CRM page's job: 10,000 ids in chunks of 200 (50 calls) via --records
#      --bulk against --profile crm (100 per rolling 60 s), vs the page's own
#      pattern (bench/egress/crm_loop.py: urllib, time.sleep(0.9) after
#      each call) against the same gateway under another key: wall times, ratio.
#   4. runner overhead: $OVERHEAD_JOBS jobs against nginx `return 200`, limits
#      that never bind, concurrency each of $CONCURRENCIES: >= 20,000 jobs/s,
#      counting the wall time of the whole `tollgate run` (import included).
#   5. against an enforcer that is not tollgate: nginx's limit_req, 100 r/s
#      per Authorization header, burst 20, nodelay (arrival times to the
#      millisecond, no Retry-After). The runner paces by a token bucket of
#      capacity 20 refilling at the profile's rate:
#      a. the right profile (100/s), $LR_RIGHT_RUNS runs of $LR_RIGHT_JOBS jobs:
#         0 429s in every run;
#      b. a profile 1.6x too fast (160/s) and c. 3x too fast (300/s), for
#         $LR_SECONDS s at most: within 10 s at >= 85% (b) / 80% (c) of the
#         real rate, and <= 2% (b) / 3% (c) of calls answered 429 (the
#         adaptive pacing's targets).
#      Each prints calls, the 429 share, 2xx/s against the real 100/s, and
#      the time to converge (the first second from which every full second
#      has at least that share of 100 2xx), all from nginx's access log.
#
# Everything listens on 127.0.0.1 on free ports; every process started here is
# stopped on exit. Nothing is pinned (the runner is multi-threaded; at these
# rates the gateway uses little CPU). Each runner gets `timeout $RUN_TIMEOUT`.
#
# Needs: nginx (apt-get if missing), oha (cargo install into $OHA_ROOT if
# missing), python3, curl, GNU time (/usr/bin/time, optional: CPU figures).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

FIXED_JOBS=${FIXED_JOBS:-3000}
CELIGO_JOBS=${CELIGO_JOBS:-6000}
OVERHEAD_JOBS=${OVERHEAD_JOBS:-100000}
CONCURRENCIES=${CONCURRENCIES:-"32 64 128"}
RUNNER_CONCURRENCY=${RUNNER_CONCURRENCY:-32}   # scenarios 1-3
OTHER_SHARE=${OTHER_SHARE:-0.5}                # scenario 2: the other client's rate / allowed rate
RUN_TIMEOUT=${RUN_TIMEOUT:-180}
LR_RIGHT_JOBS=${LR_RIGHT_JOBS:-1000}      # scenario 5a (10 s at the real rate)...
LR_RIGHT_RUNS=${LR_RIGHT_RUNS:-3}         # ...this many times (the adaptive-pacing issue asks for 20)
LR_SECONDS=${LR_SECONDS:-30}              # scenarios 5b, 5c: the runner is stopped after this
SCENARIOS=${SCENARIOS:-"1a 2a 1b 2b 3 4 5a 5b 5c"}      # a subset to run
# KEEP_WORK=1: keep the work directory (configs, jobs, access logs, oha output, states)
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-egbench}
target=$CARGO_TARGET_DIR
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
TOLLGATE="$target/release/tollgate"
EG="$ROOT/bench/egress"
FOREIGN="$ROOT/bench/gateway/foreign_cpu.py"   # CPU other processes took during a run
ANALYSE="python3 $EG/analyse.py"

source bench/tools.sh

# ---------------------------------------------------------------- tools
ensure_tools nginx:nginx curl:curl
TIME=""
[ -x /usr/bin/time ] && TIME=/usr/bin/time
log "building tollgate (release, $target)..."
cargo build --release -q -p tollgate
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock 2>/dev/null || rev+=" with uncommitted changes under crates/ or Cargo files"
log "tollgate $("$TOLLGATE" --version | awk '{print $2}') ($rev), nginx $($NGINX -v 2>&1 | sed 's/.*\///'), oha $($OHA --version | awk '{print $2}'), $(nproc) cpus, nice $(nice)"

# ---------------------------------------------------------------- processes
start_work egbench
read -r GW_PORT ADMIN_PORT UP_PORT LR_PORT < <(free_ports 4)
GATEWAY="127.0.0.1:$GW_PORT"
ADMIN="http://127.0.0.1:$ADMIN_PORT"

wait_http() { # wait_http URL [PID]
  local i
  for i in $(seq 1 100); do
    curl -s -o /dev/null "$1" && return 0
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then break; fi
    sleep 0.1
  done
  log "ERROR: $1 did not come up"; return 1
}

# render TEMPLATE OUT CONCURRENCY: fill in the addresses
render() {
  sed -e "s/@GATEWAY@/$GATEWAY/g" -e "s/@UPSTREAM@/127.0.0.1:$UP_PORT/g" -e "s/@CONCURRENCY@/$3/g" "$1" > "$2"
}

# start_gateway NAME (--config FILE | --profile P): JSON access log to $work/NAME.access
start_gateway() {
  local name=$1; shift
  "$TOLLGATE" serve "$@" --demo-upstream --listen "$GATEWAY" --admin "127.0.0.1:$ADMIN_PORT" \
    --access-log json > "$work/$name.access" 2>>"$work/gateway.err" &
  GW_PID=$!; pids+=("$GW_PID")
  wait_http "$ADMIN/healthz" "$GW_PID"
}

# jobs N PATH OUT: N POST jobs to the gateway's PATH
make_jobs() {
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import sys
n, base, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with open(out, "w") as f:
    for i in range(n):
        f.write(f'{{"id":"j{i}","method":"POST","url":"http://{base}{path}/{i}","body":{{"i":{i}}}}}\n')
PY
}

# runner NAME CONFIG ARGS...: `tollgate run` into $work/NAME.state; sets WALL,
# CPU (user+sys s), RSS (MiB), RC and the summary's fields (done, throttled, ...)
runner() {
  local name=$1 cfg=$2; shift 2
  rm -rf "$work/$name.state"
  local t0 t1
  python3 "$FOREIGN" snap "$work/foreign.before" $$
  cpu_sample > "$work/cpu.before"
  t0=$(date +%s.%N)
  set +e
  if [ -n "$TIME" ]; then
    TOKEN=${TOKEN:-t0ken} timeout "$RUN_TIMEOUT" "$TIME" -o "$work/$name.time" -f "%U %S %M" \
      "$TOLLGATE" run --config "$cfg" --state "$work/$name.state" --progress quiet "$@" \
      > "$work/$name.out" 2> "$work/$name.err"
  else
    TOKEN=${TOKEN:-t0ken} timeout "$RUN_TIMEOUT" \
      "$TOLLGATE" run --config "$cfg" --state "$work/$name.state" --progress quiet "$@" \
      > "$work/$name.out" 2> "$work/$name.err"
  fi
  RC=$?
  set -e
  t1=$(date +%s.%N)
  cpu_sample > "$work/cpu.after"
  python3 "$FOREIGN" snap "$work/foreign.after" $$
  FOREIGN_PCT=$(python3 "$FOREIGN" diff "$work/foreign.before" "$work/foreign.after")
  # (cpu_sample's columns: cpuN busy idle steal)
  STEAL=$(awk 'NR==FNR { t[$1] = $2 + $3 + $4; s[$1] = $4; next } { dt += $2 + $3 + $4 - t[$1]; ds += $4 - s[$1] }
    END { printf "%.0f", (dt > 0 ? 100 * ds / dt : 0) }' "$work/cpu.before" "$work/cpu.after")
  if [ "$FOREIGN_PCT" -gt 5 ] || [ "$STEAL" -gt 2 ]; then
    log "  WARNING: during this run other processes used ${FOREIGN_PCT}% of a core, steal ${STEAL}%"
  fi
  WALL=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$t0" "$t1")
  CPU="?"; RSS="?"
  if [ -s "$work/$name.time" ]; then
    read -r CPU RSS < <(awk 'END { printf "%.2f %.0f\n", $1 + $2, $3 / 1024 }' "$work/$name.time")
  fi
  eval "$($ANALYSE summary "$work/$name.out")"
  if [ "$RC" != 0 ] || [ "$summary_ok" != 1 ]; then
    log "  runner $name: exit $RC"; sed 's/^/    /' "$work/$name.err" | tail -5 >&2
  fi
  if [ "$summary_ok" != 1 ]; then
    done=0 dead=0 retried=0 throttled=0 calls=0 elapsed_s=0 elapsed_h=? per_min=0 util=n/a
  fi
  SUMMARY=$(grep '^tollgate run:' "$work/$name.out" || echo "(no summary; exit $RC)")
}

want() { case " $SCENARIOS " in *" $1 "*) return 0 ;; esac; return 1; }

# ---------------------------------------------------------------- 1 and 2
# shape NAME GATEWAY_ARGS CONFIG JOBS ALLOWED_RATE SHAPE_SPEC
shape() {
  local name=$1 gw_args=$2 cfg=$3 n=$4 allowed=$5 spec=$6
  make_jobs "$n" "$GATEWAY" /v1/imports "$work/$name.jobs"
  local v
  if want "1$name"; then
  log ""
  log "== 1$name. limits match, nobody else: $n jobs ($gw_args), concurrency $RUNNER_CONCURRENCY"
  # shellcheck disable=SC2086
  start_gateway "1$name" $gw_args
  TOKEN=alone runner "1$name" "$cfg" --jobs "$work/$name.jobs"
  stop "$GW_PID"
  eval "$($ANALYSE gateway "$work/1$name.access" /v1/imports)"
  log "  $SUMMARY"
  log "  wall $WALL s (cpu ${CPU} s, max RSS ${RSS} MiB); gateway saw $gw_count calls: $gw_2xx 2xx, $gw_429 429"
  v=$(verdict "$throttled == 0 and $gw_429 == 0 and '$util' != 'n/a' and float('$util') >= 98 and $done == $n")
  log "  target zero 429s, utilisation >= 98%: $v (429s $throttled, utilisation $util%)"
  row "1$name" "$calls calls, elapsed $elapsed_h, 429s $throttled, utilisation $util%" "0 429s, util >= 98%" "$v"
  fi
  want "2$name" || return 0

  local rate
  rate=$(python3 -c "import sys; print(round(float(sys.argv[1]) * float(sys.argv[2])))" "$allowed" "$OTHER_SHARE")
  log ""
  log "== 2$name. quota shared: oha -q $rate (of $allowed/s) with the same key for the whole run"
  # shellcheck disable=SC2086
  start_gateway "2$name" $gw_args
  "$OHA" --no-tui --output-format json -z 600s -q "$rate" -c 4 -m POST -d '{"other":true}' \
    -H "authorization: Bearer shared" "http://$GATEWAY/v1/other" > "$work/2$name.oha" 2> "$work/2$name.oha.err" &
  local oha_pid=$!; pids+=("$oha_pid")
  sleep 0.5
  TOKEN=shared runner "2$name" "$cfg" --jobs "$work/$name.jobs"
  kill -INT "$oha_pid" 2>/dev/null || true
  wait "$oha_pid" 2>/dev/null || true
  forget "$oha_pid"
  stop "$GW_PID"
  log "  $SUMMARY"
  eval "$($ANALYSE shared "$spec" "$work/2$name.access" "$work/2$name.oha" /v1/imports /v1/other)"
  local share429
  share429=$(python3 -c "import sys; print(f'{100 * int(sys.argv[1]) / max(int(sys.argv[2]), 1):.2f}')" "$throttled" "$calls")
  log "  other client: $sh_o_ok 2xx, $sh_o_429 429 in $sh_o_secs s (oha) = $sh_o 2xx/s; gateway log, while the runner was measured: $sh_o_log 2xx/s"
  log "  left for the runner: $allowed - $sh_o = $sh_left/s (gateway log: $sh_left_log/s); $sh_how"
  log "  runner: $calls calls, $throttled 429s ($share429%; gateway log: $sh_r_429), retried $retried, done $done, wall $WALL s"
  v=$(verdict "float('$share429') <= 1 and float('$sh_util_min') >= 90 and $done == $n")
  log "  target <= 1% 429s, utilisation of what is left >= 90%: $v (429s $share429%; utilisation $sh_util% with oha's rate, $sh_util_log% with the log's; runner's own figure $util%)"
  row "2$name" "$calls calls, elapsed $elapsed_h, 429s $throttled ($share429%), other $sh_o/s admitted (log $sh_o_log/s), runner $sh_got/s of $sh_left/s left = $sh_util% (log $sh_util_log%)" "<= 1% 429s, util >= 90%" "$v"
}

render "$EG/fixed_window.toml" "$work/fixed.toml" "$RUNNER_CONCURRENCY"
render "$EG/celigo.toml" "$work/celigo.toml" "$RUNNER_CONCURRENCY"
"$TOLLGATE" check "$work/fixed.toml" >/dev/null
shape a "--config $work/fixed.toml" "$work/fixed.toml" "$FIXED_JOBS" 200 fixed:200:1
shape b "--profile celigo" "$work/celigo.toml" "$CELIGO_JOBS" 300 bucket:1000:300

# ---------------------------------------------------------------- 3
if want 3; then
log ""
log "== 3. the CRM page's job: 10,000 ids in chunks of 200 against --profile crm (100 per rolling 60 s)"
python3 -c "
import sys
with open(sys.argv[1], 'w') as f:
    for i in range(10000): f.write(f'\"opp-{i}\"\n')" "$work/ids.jsonl"
render "$EG/crm_bulk.toml" "$work/crm.toml" "$RUNNER_CONCURRENCY"
start_gateway 3 --profile crm
TOKEN=crm-runner runner 3 "$work/crm.toml" --records "$work/ids.jsonl" --bulk probability
log "  $SUMMARY"
log "  tollgate run: wall $WALL s (import included), elapsed $elapsed_h, cpu $CPU s"
read -r py_calls py_bad py_wall < <(python3 "$EG/crm_loop.py" "http://$GATEWAY" crm-python "$work/ids.jsonl")
eval "$($ANALYSE gateway "$work/3.access" /graphql)"
stop "$GW_PID"
ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.0f}')" "$py_wall" "$WALL")
log "  page's loop:  $py_calls calls, $py_bad non-2xx, wall $py_wall s"
log "  gateway saw $gw_count /graphql calls: $gw_2xx 2xx, $gw_429 429"
v=$(verdict "$done == 50 and $throttled == 0 and $py_bad == 0 and float('$py_wall') > float('$WALL')")
log "  loop / runner: ${ratio}x ($v: 50 calls each, zero 429s, the runner faster)"
row 3 "runner $calls calls in $WALL s (429s $throttled) vs loop $py_calls calls in $py_wall s (non-2xx $py_bad): ${ratio}x" "faster, 0 429s" "$v"
fi

# ---------------------------------------------------------------- 4
if want 4; then
log ""
log "== 4. runner overhead: $OVERHEAD_JOBS jobs, nginx return 200 on 127.0.0.1:$UP_PORT, limits that never bind"
up="$work/nginx"; mkdir -p "$up"
{ nginx_common "$up"
  echo "http {"; nginx_http_common "$up"
  cat <<EOF
  server {
    listen 127.0.0.1:$UP_PORT backlog=4096;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOF
} > "$up/nginx.conf"
"$NGINX" -p "$up" -c "$up/nginx.conf" -e "$up/error.log" &
UP_PID=$!; pids+=("$UP_PID")
wait_http "http://127.0.0.1:$UP_PORT/" "$UP_PID"
python3 - "$OVERHEAD_JOBS" "127.0.0.1:$UP_PORT" "$work/overhead.jobs" <<'PY'
import sys
n, base, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "w") as f:
    for i in range(n):
        f.write(f'{{"id":"j{i}","method":"POST","url":"http://{base}/v1/items/{i}","body":{{"i":{i}}}}}\n')
PY
for c in $CONCURRENCIES; do
  render "$EG/unlimited.toml" "$work/unlimited-$c.toml" "$c"
  runner "4-c$c" "$work/unlimited-$c.toml" --jobs "$work/overhead.jobs"
  results=$(wc -l < "$work/4-c$c.state/results.jsonl" 2>/dev/null || echo 0)
  read -r jps jps_el < <(python3 -c "
import sys
n, wall, el = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f'{n / wall:.0f}', f'{n / el:.0f}' if el > 0 else 'n/a')" "$OVERHEAD_JOBS" "$WALL" "$elapsed_s")
  log "  concurrency $c: $SUMMARY"
  log "    wall $WALL s -> $jps jobs/s (import included); summary elapsed $elapsed_h -> $jps_el jobs/s; cpu $CPU s, max RSS $RSS MiB; results.jsonl $results lines; other processes ${FOREIGN_PCT}% of a core"
  v=$(verdict "$done == $OVERHEAD_JOBS and $results == $OVERHEAD_JOBS and $jps >= 20000")
  log "    target >= 20,000 jobs/s: $v"
  row "4 c=$c" "$OVERHEAD_JOBS jobs, wall $WALL s = $jps jobs/s (elapsed $elapsed_h = $jps_el/s), cpu $CPU s, RSS $RSS MiB, foreign ${FOREIGN_PCT}%" ">= 20,000 jobs/s" "$v"
  rm -rf "$work/4-c$c.state"
done
stop "$UP_PID"
fi

# ---------------------------------------------------------------- 5
# limit_req_case NAME PROFILE_RATE JOBS SECONDS SHARE: the runner with a
# profile of PROFILE_RATE/s against nginx's 100 r/s, stopped after SECONDS;
# sets lr_* (calls, 429s, 2xx/s, the second from which every full second
# had at least SHARE of 100 2xx)
limit_req_case() {
  local name=$1 rate=$2 jobs=$3 secs=$4 share=$5
  local dir="$work/limit-req-$name"
  mkdir -p "$dir/www"
  echo '{"ok":true}' > "$dir/www/ok.json"
  { nginx_common "$dir"
    echo "http {"; nginx_http_common "$dir"
    cat <<EOT
  log_format arrivals '\$msec \$status';
  limit_req_zone \$http_authorization zone=perkey:16m rate=100r/s;
  limit_req_status 429;
  server {
    listen 127.0.0.1:$LR_PORT backlog=4096;
    access_log $dir/access.log arrivals;
    root $dir/www;
    # (a file, not \`return\`, which answers before limit_req is applied;
    # the jobs POST, which a file answers 405: made a 200 after the limit)
    location / { limit_req zone=perkey burst=20 nodelay; error_page 405 =200 @ok; try_files /ok.json =404; }
    location @ok { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOT
  } > "$dir/nginx.conf"
  "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  local lr_pid=$!; pids+=("$lr_pid")
  wait_http "http://127.0.0.1:$LR_PORT/warm" "$lr_pid"
  : > "$dir/access.log"
  sed -e "s/@LIMIT_REQ@/127.0.0.1:$LR_PORT/g" -e "s/@CAPACITY@/20/g" -e "s/@RATE@/$rate/g" \
    -e "s/@CONCURRENCY@/$RUNNER_CONCURRENCY/g" "$EG/limit_req.toml" > "$dir/runner.toml"
  make_jobs "$jobs" "127.0.0.1:$LR_PORT" /v1/items "$dir/jobs"
  RUN_TIMEOUT=$secs TOKEN=lr-$name runner "5$name" "$dir/runner.toml" --jobs "$dir/jobs"
  sleep 0.2
  stop "$lr_pid"
  read -r lr_calls lr_ok lr_429 lr_pct lr_rate lr_conv lr_secs < <(python3 - "$dir/access.log" "$share" <<'PY'
import sys
share = float(sys.argv[2])
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
times = [float(t) for t, _ in rows]
codes = [c for _, c in rows]
if not times:
    print(0, 0, 0, "0.00", "0.0", "never", "0.0"); sys.exit()
t0, t1 = times[0], times[-1]
ok = codes.count("200"); n429 = codes.count("429")
span = max(t1 - t0, 1e-9)
per = {}
for t, c in zip(times, codes):
    if c == "200":
        per[int(t - t0)] = per.get(int(t - t0), 0) + 1
full = int(span)  # whole seconds observed
conv = "never"
for w in range(full):
    if all(per.get(x, 0) >= share * 100 for x in range(w, full)):
        conv = str(w); break
print(len(codes), ok, n429, f"{100 * n429 / len(codes):.2f}", f"{ok / span:.1f}", conv, f"{span:.1f}")
PY
)
  log "  nginx saw $lr_calls calls in $lr_secs s: $lr_ok 2xx, $lr_429 429 ($lr_pct%); $lr_rate 2xx/s of the real 100/s; at >= $(python3 -c "print(round(100 * $share))")% of it from second $lr_conv"
  log "  runner: $SUMMARY"
}

if want 5a; then
  log ""
  log "== 5a. nginx limit_req (100 r/s, burst 20, nodelay), the right profile: $LR_RIGHT_RUNS runs of $LR_RIGHT_JOBS jobs"
  runs_429="" runs_rate="" clean=0
  for run in $(seq 1 "$LR_RIGHT_RUNS"); do
    limit_req_case "a$run" 100 "$LR_RIGHT_JOBS" "$RUN_TIMEOUT" 0.85
    runs_429+="${runs_429:+ }$lr_429"; runs_rate+="${runs_rate:+ }$lr_rate"
    [ "$lr_429" = 0 ] && [ "$lr_calls" -gt 0 ] && clean=$((clean + 1))
  done
  v=$(verdict "$clean == $LR_RIGHT_RUNS")
  log "  target zero 429s in every run: $v ($clean of $LR_RIGHT_RUNS runs clean; 429s per run: $runs_429)"
  row 5a "$LR_RIGHT_RUNS runs of $LR_RIGHT_JOBS jobs: 429s per run $runs_429; 2xx/s $runs_rate" "0 429s in every run" "$v"
fi
for c in "b 160 1.6 0.85 2" "c 300 3 0.80 3"; do
  read -r case rate factor share max429 <<< "$c"
  want "5$case" || continue
  log ""
  log "== 5$case. nginx limit_req (100 r/s, burst 20, nodelay), a profile ${factor}x too fast (${rate}/s), stopped after $LR_SECONDS s"
  limit_req_case "$case" "$rate" $((LR_SECONDS * rate)) "$LR_SECONDS" "$share"
  v=$(verdict "'$lr_conv' != 'never' and int('$lr_conv' if '$lr_conv' != 'never' else 99) <= 10 and float('$lr_pct') <= $max429")
  log "  target at >= $(python3 -c "print(round(100 * $share))")% of the real rate within 10 s, <= $max429% 429s: $v"
  row "5$case" "$lr_calls calls in $lr_secs s, 429s $lr_429 ($lr_pct%), $lr_rate 2xx/s of 100/s, >= $(python3 -c "print(round(100 * $share))")% from second $lr_conv" ">= $(python3 -c "print(round(100 * $share))")% within 10 s, <= $max429% 429s" "$v"
done

if [ -s "$work/gateway.err" ] && grep -Eqi "panic|error" "$work/gateway.err"; then
  log ""; log "the gateway's stderr had errors:"; grep -Ei "panic|error" "$work/gateway.err" | sort | uniq -c | head >&2
fi

# ---------------------------------------------------------------- table
echo
echo "tollgate run (bench/egress.sh): $(nproc) cpus, loopback, runner concurrency $RUNNER_CONCURRENCY (1-3)"
print_table
