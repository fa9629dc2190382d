#!/usr/bin/env bash
# `tollgate proxy`'s cache of reads (docs/cache.md): the calls it saves when
# several workflows read the same records, and what a hit costs against a
# call.
#
#   bench/cache.sh                        # about 5 min (plus the build: 2-3 min when the code changed)
#   COMPANIES=2000 DUR=5 bench/cache.sh   # about 1 min 40 s
#   SCENARIOS=1 bench/cache.sh            # a subset: 1 (= 1a 1b), 1a, 1b, 2, 3
#   TOLLGATE=/path/to/tollgate bench/cache.sh   # that binary, no build
#
# Scenarios and targets:
#   1. shared-data replay, the GTM rate-limiting guide's example ("three
#      workflows each fetch the same company record within 5 s"): three
#      workflows (bench/cache/workflows.py: Python, $THREADS threads each,
#      one keep-alive http.client connection per thread, the second and
#      third starting $STAGGER s and 2 x $STAGGER s after the first) each GET
#      /crm/v3/objects/companies/{id} for $COMPANIES company ids, in the same
#      order, as fast as they are answered (no workflow more than $MAX_LEAD
#      ids ahead of the others), through `tollgate proxy`
#      (profile = "hubspot", the Authorization header added by the proxy,
#      concurrency $PROXY_CONCURRENCY) to `tollgate serve --profile hubspot
#      --demo-upstream` (the gateway playing HubSpot: 200 requests per
#      rolling second per Authorization; its demo upstream answers a GET with
#      a JSON echo of the path, the same body for the same URL). A fresh
#      gateway and proxy for each pass:
#      a. bench/cache/hubspot.toml: no cache route (the reference: every
#         read is a call; 3 x $COMPANIES calls at 200/s).
#      b. bench/cache/hubspot-cached.toml: the same plus
#         [[upstream.cache]] path_prefix = "/crm/v3/objects/companies",
#         ttl = "5m".
#      Each prints the reads, the upstream calls (the proxy's
#      tollgate_upstream_calls_total and the gateway's admitted
#      tollgate_decisions_total), the proxy's
#      tollgate_proxy_calls_saved_total{reason="hit"|"coalesced"}, the
#      elapsed time, calls saved as a share of reads, the Tollgate-Cache
#      values the clients saw, and how far apart the three reads of each id
#      started (max, p99, ids over 5 s).
#      Identical responses: a response is its status, Content-Type and body.
#      For every id the three workflows' responses must be equal, the body
#      must name the path asked for (the echo's "path": an answer for
#      another record is caught), pass b's must equal pass a's (where every
#      read was a call), and a sample of $SAMPLE ids read from the gateway
#      directly after pass b must equal both.
#      Targets (pass b): calls saved >= 60% of reads (two of every three),
#      every response identical.
#      Each pass also prints the proxy's line sampled each second: the
#      slowest 5 s while reads waited, the first 429, the lowest effective
#      rate it paced at (where the time went, if a pass is slow).
#   2. what a hit costs against a call: bench/cache/local.toml (a token
#      bucket of 100,000,000 refilling 100,000,000/s, one cache route
#      /v1/cached, ttl 5m) in front of nginx `return 200`. oha -c $CONNS,
#      ${DUR} s runs (each warmed for 2 s first):
#      i.  peak throughput of (a) a hit: /local/v1/cached/company, one URL,
#          kept after its first read; (b) a miss: /local/v1/items, outside
#          the route, a call to nginx every time. Target: hit / miss >= 5.
#          Also, for reference, (c) misses on the route: a random URL under
#          /local/v1/cached per request (oha --rand-regex-url: each one
#          fetched, read whole and kept), and the proxy's CPU per request
#          in each.
#          And, for reference, nginx `return 200` alone on the proxy's cpu:
#          a ceiling for any answer from memory on this layout.
#      ii. at half of the hit peak (oha -q, --latency-correction), p50 and
#          p99 of hits and of nginx directly (that second nginx, on the
#          proxy's cpu, so both answer from the same core) at the same rate.
#          Target: added p99 (hits - nginx direct) <= 200 us. The same
#          again at $LOW_RATE req/s, for reference (at half the hit peak
#          oha's core is busy, and its stalls reach both p99s).
#   3. the fleet's shared cache (cache_store = "redis", bench/cache/shared.toml:
#      scenario 2's config on a redis-server this script starts, pinned to
#      LOAD_CPU, no persistence): (a) the peak of hits, each one round trip
#      to Redis, and the proxy's CPU per hit; (b) p50 / p99 of shared hits
#      at $LOW_RATE req/s against nginx `return 200` directly on the
#      proxy's cpu at the same rate. No target: what sharing a fleet's cache
#      costs a hit (reference).
#
# Layout on this 2-core machine: scenario 1 pins nothing (the gateway, the
# proxy and the Python clients share both cores; the pace is the gateway's
# 200/s). In scenario 2, as in bench/proxy.sh, `tollgate proxy` (its tokio
# runtime sees one CPU, so one worker thread) is pinned to PROXY_CPU (1),
# oha and the nginx backend to LOAD_CPU (0). The nginx measured directly
# runs on PROXY_CPU, started once the proxy's peaks are measured: a hit
# involves no backend, so hits and nginx direct answer from the same core.
# The proxy and the gateway run with no access log (nginx has access_log
# off). Everything listens on 127.0.0.1 on free ports; every process
# started here is stopped on exit, and every client run is bounded
# (timeout, oha -z).
#
# Needs: nginx and (for 3) redis-server (apt-get if missing), oha (cargo install into $OHA_ROOT if
# missing), python3, curl, taskset. Helpers: bench/cache/workflows.py (the
# workflows and the direct check), bench/cache/*.toml (the proxy configs),
# bench/tools.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

COMPANIES=${COMPANIES:-10000}             # scenario 1: company ids; reads = 3 x this
THREADS=${THREADS:-16}                    # scenario 1: threads per workflow
STAGGER=${STAGGER:-0.25}                  # scenario 1: seconds between the workflows' starts
MAX_LEAD=${MAX_LEAD:-100}                 # scenario 1: ids a workflow may run ahead of the others
CALL_SECONDS=${CALL_SECONDS:-240}         # scenario 1: no read starts after this (pass a needs 3 x COMPANIES / 200 s)
SAMPLE=${SAMPLE:-50}                      # scenario 1: ids read from the gateway directly
PROXY_CONCURRENCY=${PROXY_CONCURRENCY:-64}
DUR=${DUR:-10}                            # scenario 2: seconds per measured run
CONNS=${CONNS:-64}                        # scenario 2: oha connections
LOW_RATE=${LOW_RATE:-5000}                # scenario 2 ii: also at this rate (0: not)
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
SCENARIOS=${SCENARIOS:-"1a 1b 2 3"}
OHA_ROOT=${OHA_ROOT:-/work/tools-oha}
# KEEP_WORK=1: keep the work directory (configs, client and oha output, hashes, logs)
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target="$ROOT/$target" ;; esac
CX="$ROOT/bench/cache"
RATE=200                                  # HubSpot's per-second cap (the bundled profile)
COMPANY_PATH=/crm/v3/objects/companies

source bench/tools.sh

want() { case " $SCENARIOS " in *" $1 "* | *" ${1:0:1} "*) return 0 ;; esac; return 1; }

# ---------------------------------------------------------------- tools
ensure_tools nginx:nginx curl:curl taskset:util-linux python3:python3 redis-server:redis-server
if [ -n "${TOLLGATE:-}" ]; then
  rev="the given binary $TOLLGATE (the tree is at $(tree_state))"
else
  TOLLGATE="$target/release/tollgate"
  rev=$(tree_state)
  log "building tollgate (release, $target) from $rev..."
  cargo build --release -q -p tollgate
  if [ "$(tree_state)" != "$rev" ]; then
    log "WARNING: the code changed during the build (now $(tree_state)): the binary may be either"
    rev+=" (changed during the build)"
  fi
fi
log "$(date -u '+%Y-%m-%d %H:%M UTC'): tollgate $("$TOLLGATE" --version | awk '{print $2}') ($rev), nginx $($NGINX -v 2>&1 | sed 's/.*\///'), oha $($OHA --version | awk '{print $2}'), python $(python3 -c 'import platform; print(platform.python_version())'), $(nproc) cpus, nice $(nice)"

# ---------------------------------------------------------------- processes
start_work cachebench
read -r UP_PORT GW_PORT GW_ADMIN_PORT PX_PORT PX_ADMIN_PORT DIRECT_PORT REDIS_PORT < <(free_ports 7)
UPSTREAM="127.0.0.1:$UP_PORT"
DIRECT="127.0.0.1:$DIRECT_PORT"
REDIS="127.0.0.1:$REDIS_PORT"
GATEWAY="127.0.0.1:$GW_PORT"
GW_ADMIN="http://127.0.0.1:$GW_ADMIN_PORT"
PROXY="127.0.0.1:$PX_PORT"
PX_ADMIN="http://127.0.0.1:$PX_ADMIN_PORT"

start_nginx() { # start_nginx NAME HOST:PORT CPU: nginx `return 200`, one worker on CPU; sets NG_PID
  local dir="$work/$1"
  mkdir -p "$dir"
  { nginx_common "$dir"
    echo "http {"; nginx_http_common "$dir"
    cat <<EOF
  server {
    listen $2 backlog=4096;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
EOF
  } > "$dir/nginx.conf"
  taskset -c "$3" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  NG_PID=$!; pids+=("$NG_PID")
  wait_http "http://$2/" "$NG_PID"
}

start_gateway() { # tollgate serve --profile hubspot with its demo upstream
  "$TOLLGATE" serve --profile hubspot --demo-upstream --listen "$GATEWAY" \
    --admin "127.0.0.1:$GW_ADMIN_PORT" --access-log off 2>>"$work/gateway.err" &
  GW_PID=$!; pids+=("$GW_PID")
  wait_http "$GW_ADMIN/healthz" "$GW_PID"
}


# prom_sum URL REGEX: the sum of the samples whose name{labels} match REGEX
prom_sum() {
  curl -s -m 5 "$1" | awk -v re="$2" '$0 !~ /^#/ && $1 ~ re { s += $2 } END { printf "%d\n", s }'
}
pct_of() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{100 * a / b:.1f}' if b else '-')" "$1" "$2"; }
json_get() { python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(' '.join(str(d[k]) for k in sys.argv[2:]))" "$@"; }

# watch_line FILE: every second until stopped, "t calls calls_429 waiting
# effective_rate" from the proxy's /metrics (sets WATCH_PID)
watch_line() {
  local out=$1
  ( t0=$(date +%s.%N)
    while :; do
      curl -s -m 1 "$PX_ADMIN/metrics" | awk -v t="$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")" '
        $1 ~ /^tollgate_upstream_calls_total/ { c += $2; if ($1 ~ /outcome="429"/) r += $2 }
        $1 ~ /^tollgate_proxy_waiting/ { w = $2 }
        $1 ~ /upstream_effective_rate/ { e = $2 }
        END { printf "%s %d %d %d %s\n", t, c, r, w, (e == "" ? "-" : e) }' >> "$out"
      sleep 1
    done ) &
  WATCH_PID=$!; pids+=("$WATCH_PID")
}
# line_summary FILE: the slowest the line sent over any 5 s while reads
# waited throughout, the first 429, the lowest effective rate it paced at
line_summary() {
  python3 - "$1" <<'PY'
import sys
rows = [[float(x) if i in (0, 4) and x != "-" else (int(x) if x != "-" else None) for i, x in enumerate(l.split())]
        for l in open(sys.argv[1]) if len(l.split()) == 5]
slowest, first429, low = None, None, None
for i, a in enumerate(rows):
    if a[2] > 0 and first429 is None:
        first429 = a[0]
    if a[4] is not None:
        low = a[4] if low is None else min(low, a[4])
    for j in range(i + 1, len(rows)):
        if rows[j][3] == 0 or a[3] == 0:
            break
        if rows[j][0] - a[0] >= 5:
            r = (rows[j][1] - a[1]) / (rows[j][0] - a[0])
            if slowest is None or r < slowest[0]:
                slowest = (r, a[0])
            break
print((f"slowest 5 s with reads waiting {slowest[0]:.0f} calls/s (from {slowest[1]:.0f} s)" if slowest else "never 5 s with reads waiting")
      + (f"; first 429 by {first429:.0f} s" if first429 is not None else "; no 429")
      + (f"; effective rate at least {low:.1f}/s" if low is not None else ""))
PY
}

FOREIGN_MAX=0

# ---------------------------------------------------------------- 1
# replay NAME TEMPLATE: a fresh gateway and proxy; the three workflows; the
# figures. Sets READS UP_CALLS GW_ADMITTED GW_DENIED HIT COAL SAVED_PCT
# ELAPSED; leaves the gateway running (GW_PID) for the direct check.
replay() {
  local name=$1 template=$2
  start_gateway
  start_proxy "$template"
  watch_line "$work/$name.line"
  foreign_begin
  timeout $((CALL_SECONDS + 120)) python3 "$CX/workflows.py" run "http://$PROXY/hubspot$COMPANY_PATH" \
    --companies "$COMPANIES" --threads "$THREADS" --stagger "$STAGGER" --max-lead "$MAX_LEAD" --max-seconds "$CALL_SECONDS" \
    --echo-path "$COMPANY_PATH" --hashes "$work/$name.hashes" > "$work/$name.json"
  foreign_end
  stop "$WATCH_PID"
  curl -s -m 5 "$PX_ADMIN/metrics" | grep -E '^tollgate_proxy_(requests|upstream_calls|calls_saved)_total|^tollgate_proxy_cache_(entries|bytes)|upstream_(effective|limits)_rate' \
    > "$work/$name.proxy-metrics" || true
  UP_CALLS=$(prom_sum "$PX_ADMIN/metrics" '^tollgate_upstream_calls_total')
  HIT=$(prom_sum "$PX_ADMIN/metrics" '^tollgate_proxy_calls_saved_total.*reason="hit"')
  COAL=$(prom_sum "$PX_ADMIN/metrics" '^tollgate_proxy_calls_saved_total.*reason="coalesced"')
  GW_ADMITTED=$(prom_sum "$GW_ADMIN/metrics" '^tollgate_decisions_total.*limit="per-second".*outcome="admitted"')
  GW_DENIED=$(prom_sum "$GW_ADMIN/metrics" '^tollgate_decisions_total.*limit="per-second".*outcome="denied"')
  GW_R429=$(prom_sum "$GW_ADMIN/metrics" '^tollgate_responses_total.*code="429"')
  stop "$PX_PID"
  local ok failed statuses cache unfinished
  read -r READS ok failed ELAPSED unfinished < <(json_get "$work/$name.json" requests ok failed elapsed unfinished)
  SAVED_PCT=$(pct_of "$((HIT + COAL))" "$READS")
  log "  clients: $READS reads ($ok 2xx, $failed failed; statuses $(json_get "$work/$name.json" statuses)) in $ELAPSED s = $(python3 -c "print(f'{$READS / $ELAPSED:.1f}')")/s; p50/p99 per read $(json_get "$work/$name.json" p50_ms p99_ms | sed 's/ /\//') ms"
  log "  Tollgate-Cache seen: $(json_get "$work/$name.json" cache)"
  log "  reads of one id started apart: max $(json_get "$work/$name.json" spread_max_s) s, p99 $(json_get "$work/$name.json" spread_p99_s) s; ids over 5 s: $(json_get "$work/$name.json" over_within)"
  log "  upstream calls: proxy $UP_CALLS, gateway admitted $GW_ADMITTED (denied $GW_DENIED, 429s $GW_R429) = $(python3 -c "print(f'{$GW_ADMITTED / $ELAPSED:.1f}')")/s over the run"
  LINE=$(line_summary "$work/$name.line")
  log "  the proxy's line, sampled each second: $LINE"
  log "  calls saved: hit $HIT + coalesced $COAL = $((HIT + COAL)) = $SAVED_PCT% of reads (1 - calls/reads: $(python3 -c "print(f'{100 * (1 - $UP_CALLS / $READS):.1f}' if $READS else '-')")%)"
  log "  responses: $(json_get "$work/$name.json" complete) ids complete, $(json_get "$work/$name.json" identical) with three identical answers naming their path, $(json_get "$work/$name.json" differ) differing, $(json_get "$work/$name.json" wrong_path) naming another path"
  [ "$unfinished" = 0 ] || log "  WARNING: $unfinished client threads had not finished"
  [ "$(json_get "$work/$name.json" over_within)" = 0 ] || log "  WARNING: some ids were read more than 5 s apart (not the scenario); try a smaller MAX_LEAD"
}

if want 1a; then
  log ""
  log "== 1a. three workflows x $COMPANIES companies ($THREADS threads each, started ${STAGGER} s apart, at most $MAX_LEAD ids ahead) through tollgate proxy, NO cache route, to tollgate serve --profile hubspot --demo-upstream"
  replay 1a "$CX/hubspot.toml"
  a_reads=$READS a_calls=$UP_CALLS a_elapsed=$ELAPSED a_saved=$SAVED_PCT
  row 1a "$READS reads, $UP_CALLS upstream calls (gateway $GW_ADMITTED, denied $GW_DENIED), saved $((HIT + COAL)) = $SAVED_PCT%, $ELAPSED s" "(reference)" ""
  stop "$GW_PID"
fi
if want 1b; then
  log ""
  log "== 1b. the same through tollgate proxy WITH [[upstream.cache]] path_prefix = \"$COMPANY_PATH\", ttl = \"5m\""
  replay 1b "$CX/hubspot-cached.toml"
  log "  $(grep -E 'cache_(entries|bytes)' "$work/1b.proxy-metrics" | sed 's/tollgate_proxy_//' | tr '\n' ' ')"
  # identical: within each pass (above), across passes, and against the gateway read directly
  hashes=(--hashes "$work/1b.hashes")
  [ -f "$work/1a.hashes" ] && hashes=(--hashes "$work/1a.hashes" --hashes "$work/1b.hashes")
  python3 "$CX/workflows.py" check "http://$GATEWAY$COMPANY_PATH" --ids "$COMPANIES" --sample "$SAMPLE" \
    --echo-path "$COMPANY_PATH" --header "authorization: Bearer bench" "${hashes[@]}" > "$work/check.json"
  stop "$GW_PID"
  read -r complete identical < <(json_get "$work/1b.json" complete identical)
  read -r sample fetched same across < <(python3 -c "import json; d = json.load(open('$work/check.json')); print(d['sample'], d['fetched'], ','.join(map(str, d['same'])), d['across_passes'])")
  log "  direct from the gateway: $fetched of $sample sampled ids read; equal to each pass's answer: $same (passes: ${hashes[*]//--hashes /})"
  [ "$across" = None ] || log "  pass a against pass b: $across of $COMPANIES ids identical"
  grep -q '"mismatches": \[\]' "$work/check.json" || log "  mismatches: $(python3 -c "import json; print(json.load(open('$work/check.json'))['mismatches'])")"
  same_all=$(python3 -c "print(all(int(x) == $sample for x in '$same'.split(',')))")
  across_ok=$( [ "$across" = None ] && echo True || python3 -c "print($across == $COMPANIES)")
  ident=$(verdict "$complete == $COMPANIES and $identical == $COMPANIES and $fetched == $sample and $same_all and $across_ok")
  vs=$(verdict "float('$SAVED_PCT') >= 60")
  log "  target calls saved >= 60%: $vs; every response identical: $ident"
  speed=""
  [ -n "${a_elapsed:-}" ] && speed=", $(ratio_of "$a_elapsed" "$ELAPSED")x faster than 1a"
  row 1b "$READS reads, $UP_CALLS upstream calls (gateway $GW_ADMITTED, denied $GW_DENIED), saved $HIT hit + $COAL coalesced = $SAVED_PCT%, $ELAPSED s$speed" ">= 60% saved" "$vs"
  row "1b identical" "$identical/$COMPANIES ids: 3 equal answers naming their path; pass a = pass b: ${across/None/-}; direct sample $fetched: equal $same" "all identical" "$ident"
fi

warm() { taskset -c "$LOAD_CPU" "$OHA" --no-tui -z 2s -c "$CONNS" "$@" > /dev/null 2>&1; }
# cache_of URL: the Tollgate-Cache header of one GET (none: -)
cache_of() { curl -s -m 5 -o /dev/null -D - "$1" | awk -F': *' 'tolower($1) == "tollgate-cache" { v = $2 } END { gsub(/\r/, "", v); print (v == "" ? "-" : v) }'; }
px_saved() { prom_sum "$PX_ADMIN/metrics" '^tollgate_proxy_calls_saved_total.*reason="hit"'; }
px_calls() { prom_sum "$PX_ADMIN/metrics" '^tollgate_upstream_calls_total'; }

if want 2; then
  log ""
  log "== 2. a hit against a miss: nginx return 200 on $UPSTREAM (cpu $LOAD_CPU), tollgate proxy (bench/cache/local.toml) on cpu $PROXY_CPU, oha -c $CONNS on cpu $LOAD_CPU, ${DUR} s runs"
  start_nginx backend "$UPSTREAM" "$LOAD_CPU"; UP_PID=$NG_PID
  start_proxy "$CX/local.toml" taskset -c "$PROXY_CPU"
  D_URL="http://$DIRECT/v1/cached/company"
  H_URL="http://$PROXY/local/v1/cached/company"
  M_URL="http://$PROXY/local/v1/items"
  # (--rand-regex-url takes the dots of 127.0.0.1 as they are)
  R_URL="http://$PROXY/local/v1/cached/[0-9]{12}"
  first=$(cache_of "$H_URL"); second=$(cache_of "$H_URL"); outside=$(cache_of "$M_URL")
  log "  Tollgate-Cache: the hit URL's first read $first, second $second; the miss URL's $outside"
  [ "$second" = hit ] || log "  WARNING: the hit URL is not served from the cache"

  s0=$(px_saved); k0=$(px_calls)
  warm "$H_URL"
  run_oha peak-hit "$H_URL" "$PX_PID"
  peak_h=$RPS cpu_h=$CPU_US busy_h=$BUSY
  s1=$(px_saved); k1=$(px_calls)
  log "  i. peak, hit:                 $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request); saved as hits during warm-up + run: $((s1 - s0)), upstream calls: $((k1 - k0))"
  warm "$M_URL"
  run_oha peak-miss "$M_URL" "$PX_PID"
  peak_m=$RPS cpu_m=$CPU_US busy_m=$BUSY
  s2=$(px_saved); k2=$(px_calls)
  log "     peak, miss (outside route): $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request); saved during warm-up + run: $((s2 - s1)), upstream calls: $((k2 - k1))"
  warm --rand-regex-url "$R_URL"
  run_oha peak-route-miss "$R_URL" "$PX_PID" --rand-regex-url
  peak_r=$RPS cpu_r=$CPU_US busy_r=$BUSY
  s3=$(px_saved); k3=$(px_calls)
  log "     peak, miss on the route:   $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request); saved during warm-up + run: $((s3 - s2)), upstream calls: $((k3 - k2)); $(curl -s -m 5 "$PX_ADMIN/metrics" | grep -E '^tollgate_proxy_cache_(entries|bytes)' | sed 's/tollgate_proxy_//' | tr '\n' ' ')"
  hm=$(ratio_of "$peak_h" "$peak_m")
  v=$(verdict "$peak_h >= 5 * $peak_m")
  cpu_ratio=$(python3 -c "import sys; h, m = sys.argv[1], sys.argv[2]; print(f'{float(m) / float(h):.2f}' if '-' not in (h, m) else '-')" "$cpu_h" "$cpu_m")
  start_nginx direct "$DIRECT" "$PROXY_CPU"; DIRECT_PID=$NG_PID
  warm "$D_URL"
  run_oha peak-direct "$D_URL" "$DIRECT_PID"
  peak_d=$RPS cpu_d=$CPU_US busy_d=$BUSY
  log "     peak, nginx return 200 on the proxy's cpu (a ceiling for any answer from memory): $RPS req/s ($OK/$ALL 2xx; cpu $PROXY_CPU $BUSY% busy; $CPU_US us of CPU per request)"
  log "     hit / miss: ${hm}x (target >= 5: $v); CPU per request miss / hit: ${cpu_ratio}x; hit / miss on the route: $(ratio_of "$peak_h" "$peak_r")x"
  row "2i" "peak req/s: hit $peak_h, miss $peak_m = ${hm}x (proxy CPU/request: hit $cpu_h us, miss $cpu_m us = ${cpu_ratio}x; proxy core busy $busy_h% / $busy_m%)" ">= 5x" "$v"
  row "2i route miss" "a new URL on the route each request: $peak_r req/s, $cpu_r us CPU/request (proxy core busy $busy_r%)" "(reference)" ""
  row "2i ceiling" "nginx return 200 on the proxy's cpu: $peak_d req/s, $cpu_d us CPU/request (core busy $busy_d%) = $(ratio_of "$peak_d" "$peak_m")x the miss" "(reference)" ""

  half=$((peak_h / 2))
  log "  ii. at a constant $half req/s (half of the hit peak), oha -q $half --latency-correction"
  run_oha half-direct "$D_URL" - -q "$half" --latency-correction
  d50=$P50 d99=$P99
  log "     nginx direct (return 200 on cpu $PROXY_CPU): p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx)"
  run_oha half-hit "$H_URL" "$PX_PID" -q "$half" --latency-correction
  h50=$P50 h99=$P99
  log "     hits:         p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
  add50=$((h50 - d50)) add99=$((h99 - d99))
  v99=$(verdict "$add99 <= 200")
  log "     added by a hit: p50 +$add50 us, p99 +$add99 us (target <= 200 us: $v99)"
  row "2ii p99" "at $half req/s: nginx direct $d99 us, hits $h99 us (+$add99)" "<= +200 us" "$v99"
  row "2ii p50" "at $half req/s: nginx direct $d50 us, hits $h50 us (+$add50)" "(reference)" ""
  if [ "$LOW_RATE" -gt 0 ]; then
    log "     and at $LOW_RATE req/s, where the load core is mostly idle (for reference)"
    run_oha low-direct "$D_URL" - -q "$LOW_RATE" --latency-correction
    l_d50=$P50 l_d99=$P99
    log "     nginx direct: p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx)"
    run_oha low-hit "$H_URL" "$PX_PID" -q "$LOW_RATE" --latency-correction
    log "     hits:         p50 $P50 us, p99 $P99 us ($RPS req/s, $OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request)"
    log "     added by a hit: p50 +$((P50 - l_d50)) us, p99 +$((P99 - l_d99)) us"
    row "2ii low" "at $LOW_RATE req/s: nginx direct p50/p99 $l_d50/$l_d99 us, hits $P50/$P99 us (+$((P50 - l_d50))/+$((P99 - l_d99)))" "(reference)" ""
  fi
  curl -s -m 5 "$PX_ADMIN/metrics" | grep -E '^tollgate_proxy_(requests|upstream_calls|calls_saved)_total' | sed 's/^/  tollgate proxy: /' >&2 || true
  stop "$PX_PID"; stop "$UP_PID"; stop "$DIRECT_PID"
fi

if want 3; then
  log ""
  log "== 3. hits from the fleet's shared cache: redis-server and nginx return 200 on cpu $LOAD_CPU, tollgate proxy (bench/cache/shared.toml) on cpu $PROXY_CPU, oha -c $CONNS on cpu $LOAD_CPU, ${DUR} s runs"
  taskset -c "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --loglevel warning > "$work/redis.log" 2>&1 &
  RD_PID=$!; pids+=("$RD_PID")
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  start_nginx backend3 "$UPSTREAM" "$LOAD_CPU"; UP_PID=$NG_PID
  mkdir -p "$work/redis"; cfg3="$work/redis/shared.toml"
  sed -e "s/@REDIS@/$REDIS/g" "$CX/shared.toml" > "$cfg3"
  start_proxy "$cfg3" taskset -c "$PROXY_CPU"
  S_URL="http://$PROXY/local/v1/cached/company"
  first=$(cache_of "$S_URL"); second=$(cache_of "$S_URL")
  log "  Tollgate-Cache: the URL's first read $first, second $second; Redis keys: $(redis-cli -p "$REDIS_PORT" dbsize)"
  [ "$second" = hit ] || log "  WARNING: the URL is not served from the shared cache"
  s0=$(px_saved); k0=$(px_calls)
  r0=$(redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ { print $2 + 0 }')
  warm "$S_URL"
  run_oha shared-hit "$S_URL" "$PX_PID"
  peak_s=$RPS cpu_s=$CPU_US busy_s=$BUSY
  s1=$(px_saved); k1=$(px_calls)
  r1=$(redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/ { print $2 + 0 }')
  log "  a. peak, shared hit: $RPS req/s ($OK/$ALL 2xx; proxy cpu $BUSY% busy; $CPU_US us of CPU per request); saved as hits during warm-up + run: $((s1 - s0)), upstream calls: $((k1 - k0)), Redis commands: $((r1 - r0))"
  row "3a" "peak shared hits: $peak_s req/s, proxy $cpu_s us CPU/request (core busy $busy_s%); $((s1 - s0)) hits, $((k1 - k0)) upstream calls, $((r1 - r0)) Redis commands" "(reference)" ""
  start_nginx direct3 "$DIRECT" "$PROXY_CPU"; DIRECT_PID=$NG_PID
  rate=$LOW_RATE; [ "$rate" -gt 0 ] || rate=5000
  run_oha shared-low-direct "http://$DIRECT/v1/cached/company" - -q "$rate" --latency-correction
  sd50=$P50 sd99=$P99
  run_oha shared-low-hit "$S_URL" "$PX_PID" -q "$rate" --latency-correction
  log "  b. at $rate req/s: nginx direct p50 $sd50 us, p99 $sd99 us; shared hits p50 $P50 us, p99 $P99 us ($OK/$ALL 2xx; $CPU_US us of CPU per request): +$((P50 - sd50)) / +$((P99 - sd99)) us"
  row "3b" "at $rate req/s: nginx direct p50/p99 $sd50/$sd99 us, shared hits $P50/$P99 us (+$((P50 - sd50))/+$((P99 - sd99)))" "(reference)" ""
  stop "$PX_PID"; stop "$UP_PID"; stop "$DIRECT_PID"; stop "$RD_PID"
fi

stderr_warnings gateway proxy

# ---------------------------------------------------------------- table
echo
echo "tollgate proxy cache (bench/cache.sh) at $rev, $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cpus, loopback; 1: $COMPANIES companies x 3 workflows, $THREADS threads each; 2: oha -c $CONNS, ${DUR} s"
echo "other processes used at most ${FOREIGN_MAX}% of a core during a measured run"
print_table
