# Sourced by the bench scripts: installs what they need when it is missing.
# ensure_tools CMD:PACKAGE... installs the Debian packages of missing
# commands (apt-get); then NGINX and OHA name the binaries (oha is built
# once into $OHA_ROOT: Debian has none, and wrk has no constant-rate mode).

log() { printf '%s\n' "$*" >&2; }

ensure_tools() {
  local need_apt=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
  done
  if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]} (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q "${need_apt[@]}" >/dev/null; }
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  [ "${NO_OHA:-}" = 1 ] && return 0 # (a script that sends no load of its own)
  OHA=$(command -v oha || true)
  if [ -z "$OHA" ]; then
    OHA="$OHA_ROOT/bin/oha"
    if [ ! -x "$OHA" ]; then
      log "installing oha into $OHA_ROOT (cargo install, a few minutes once)..."
      cargo install oha --locked --root "$OHA_ROOT" -q
    fi
  fi
}

# start_work NAME: a work directory ($work) and the list of processes this
# script started ($pids); on exit every one is stopped and the directory
# removed (KEEP_WORK=1 keeps it). forget PID / stop PID manage the list.
start_work() {
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  pids=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP_WORK:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}
forget() { # forget PID: no longer ours to stop
  local q keep=()
  for q in "${pids[@]}"; do [ "$q" = "$1" ] || keep+=("$q"); done
  pids=("${keep[@]}")
}
stop() { # stop PID: end one process we started, wait for it
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  forget "$1"
}

# free_ports N: N loopback ports nothing listens on, space-separated.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
}

# Shared by the scripts that start servers (proxy.sh; gateway.sh and egress.sh
# still have their own copies of wait_http and the nginx and foreign-CPU
# helpers, which win there since they are defined after this file is sourced).
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

wait_http() { # wait_http URL [PID]: until it answers at all
  local i
  for i in $(seq 1 100); do
    curl -s -m 2 -o /dev/null "$1" && return 0
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then break; fi
    sleep 0.1
  done
  log "ERROR: $1 did not come up"; return 1
}

nginx_common() { # nginx_common DIR: the main-context lines of a one-worker nginx living in DIR
  local dir=$1
  mkdir -p "$dir/tmp"
  cat <<EOT
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
$( [ "$(id -u)" = 0 ] && echo "user $(id -un);" )
worker_rlimit_nofile 65536;
events { worker_connections 16384; multi_accept on; }
EOT
}
nginx_http_common() { # nginx_http_common DIR: the http-context lines (no access log, long keep-alive)
  local dir=$1
  cat <<EOT
  access_log off;
  client_body_temp_path $dir/tmp/body; proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi; uwsgi_temp_path $dir/tmp/uwsgi; scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
EOT
}

# nginx_limit_req UP_PORT PROXY_PORT RATE BURST [LISTEN_EXTRA]: the http-context
# lines of nginx as the peer of `tollgate serve` (bench/gateway.sh,
# bench/gateway-instructions.sh): limit_req keyed by x-tenant-id at RATE
# (e.g. 1000r/s) with BURST, 429 when denied, relaying to 127.0.0.1:UP_PORT
# over kept-alive connections.
nginx_limit_req() {
  cat <<EOF
  upstream shared { server 127.0.0.1:$1; keepalive 256; keepalive_requests 100000000; keepalive_timeout 300s; }
  limit_req_zone \$http_x_tenant_id zone=tenant:64m rate=$3;
  limit_req_status 429;
  server {
    listen 127.0.0.1:$2 backlog=4096${5:-};
    location / {
      limit_req zone=tenant burst=$4 nodelay;
      proxy_pass http://shared;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # tollgate adds this too. It also sends an x-request-id both ways; that
      # is left out here: nginx's \$request_id calls OpenSSL's RAND_bytes per
      # request, which cost nginx about 20% in a (noisy) trial.
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
EOF
}

# prom_value URL NAME{LABELS}: one sample of a Prometheus text page (0 if absent)
# start_upstream PORT CPU: the shared upstream the proxies under test relay
# to, nginx with one worker answering `200 ok` on 127.0.0.1:PORT, pinned to
# CPU; its pid in STARTED (and in $pids).
start_upstream() {
  local dir="$work/upstream"
  mkdir -p "$dir"
  { nginx_common "$dir"
    echo "http {"; nginx_http_common "$dir"
    cat <<EOF
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
  } > "$dir/nginx.conf"
  taskset -c "$2" "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  STARTED=$!; pids+=("$STARTED")
  wait_http "http://127.0.0.1:$1/" "$STARTED"
}

prom_value() {
  curl -s -m 5 "$1" | awk -v m="$2" '$1 == m { v = $2 } END { print (v == "" ? 0 : v) }'
}

# foreign_begin / foreign_end: CPU other processes used in between (FOREIGN,
# % of a core; FOREIGN_MAX the most seen), warning past 5% (bench/gateway/foreign_cpu.py)
foreign_begin() { python3 "$BENCH_DIR/gateway/foreign_cpu.py" snap "$work/foreign.before" $$; }
foreign_end() {
  python3 "$BENCH_DIR/gateway/foreign_cpu.py" snap "$work/foreign.after" $$
  FOREIGN=$(python3 "$BENCH_DIR/gateway/foreign_cpu.py" diff "$work/foreign.before" "$work/foreign.after")
  [ "$FOREIGN" -le "${FOREIGN_MAX:-0}" ] || FOREIGN_MAX=$FOREIGN
  [ "$FOREIGN" -le 5 ] || log "  WARNING: other processes used ${FOREIGN}% of a core during this run"
}

# oha_figures JSON: "p50_us p99_us req_per_s 2xx all" from oha --output-format json
oha_figures() {
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
us = lambda v: round(v * 1e6) if v is not None else -1
print(us(p["p50"]), us(p["p99"]), round(d["summary"]["requestsPerSec"]), ok, sum(codes.values()))
PY
}

# The summary table's rows: row CASE FIGURES TARGET VERDICT (printed at the end)
declare -a TABLE=()
row() { TABLE+=("$(printf '%s|' "$@")"); }

# cpu_sample > FILE (cpuN busy idle steal), then cpu_busy BEFORE AFTER N:
# percent busy of cpuN in between
cpu_sample() { awk '/^cpu[0-9]/ { print $1, $2+$3+$4+$7+$8, $5+$6, $9 }' /proc/stat; }
cpu_busy() {
  awk -v c="cpu$3" 'NR==FNR { if ($1 == c) { b = $2; i = $3 } next }
    $1 == c { db = $2 - b; di = $3 - i; printf "%.0f", 100 * db / (db + di) }' "$1" "$2"
}

# ratio_of A B: A / B to two decimals
ratio_of() { python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$1" "$2"; }

# verdict PYTHON_EXPRESSION: PASS or MISS
verdict() { if python3 -c "import sys; sys.exit(0 if ($1) else 1)"; then echo PASS; else echo MISS; fi; }

# tree_cpu_s PID: CPU seconds (user + sys) used so far by PID and everything below it
tree_cpu_s() {
  python3 - "$1" <<'PY'
import os, sys
root, kids, cpu = int(sys.argv[1]), {}, {}
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(name))
        cpu[int(name)] = int(rest[11]) + int(rest[12])
todo, total = [root], 0
while todo:
    p = todo.pop()
    total += cpu.get(p, 0)
    todo += kids.get(p, [])
print(f"{total / os.sysconf('SC_CLK_TCK'):.2f}")
PY
}

# print_table: the rows of TABLE ("case|figures|target|verdict") as aligned
# columns under a header.
print_table() {
  printf '%s\n' "${TABLE[@]}" | python3 -c '
import sys
rows = [l.rstrip("\n").rstrip("|").split("|") for l in sys.stdin if l.strip()]
rows = [r + [""] * (4 - len(r)) for r in rows]
rows.insert(0, ["case", "figures", "target", ""])
w = [max(len(r[i]) for r in rows) for i in range(4)]
for i, r in enumerate(rows):
    print("  ".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip())
    if i == 0: print("  ".join("-" * x for x in w))
'
}

# stderr_warnings NAME...: what $work/NAME.err said of panics, errors and
# warnings, counted, if anything.
stderr_warnings() {
  local f
  for f in "$@"; do
    if [ -s "$work/$f.err" ] && grep -Eqi "panic|error|warn" "$work/$f.err"; then
      log ""; log "the $f's stderr had warnings or errors:"; grep -Ei "panic|error|warn" "$work/$f.err" | sed 's/^[^ ]* //' | sort | uniq -c | head >&2
    fi
  done
}

# tree_state: the commit, and a digest of any uncommitted change to the code
# built (tracked diffs and untracked files under crates/ and the Cargo files)
tree_state() {
  local r d
  r=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")
  d=$( { git -C "$ROOT" diff HEAD -- crates Cargo.toml Cargo.lock
         git -C "$ROOT" ls-files --others --exclude-standard -- crates | sort | (cd "$ROOT" && xargs -r cat); } 2>/dev/null | sha1sum | cut -c1-8)
  if [ "$d" = "$(printf '' | sha1sum | cut -c1-8)" ]; then echo "$r"; else echo "$r + uncommitted changes under crates/ or Cargo files (digest $d)"; fi
}

# start_proxy TEMPLATE [CMD_PREFIX...]: tollgate proxy with the template's
# @GATEWAY@, @UPSTREAM@ and @CONCURRENCY@ filled in
start_proxy() {
  local template=$1; shift
  local cfg="$work/$(basename "$template")"
  sed -e "s/@GATEWAY@/$GATEWAY/g" -e "s/@UPSTREAM@/$UPSTREAM/g" -e "s/@CONCURRENCY@/$PROXY_CONCURRENCY/g" \
    "$template" > "$cfg"
  "$TOLLGATE" check "$cfg" >/dev/null
  "$@" "$TOLLGATE" proxy --config "$cfg" --listen "$PROXY" --admin "127.0.0.1:$PX_ADMIN_PORT" \
    2>>"$work/proxy.err" &
  PX_PID=$!; pids+=("$PX_PID")
  wait_http "$PX_ADMIN/healthz" "$PX_PID"
}

# ---------------------------------------------------------------- 2
# run_oha NAME URL PID [oha args]: $work/NAME.json; sets P50 P99 (us) RPS OK ALL,
# BUSY (proxy cpu % busy) and CPU_US (CPU per request of process tree PID; - for none)
run_oha() {
  local name=$1 url=$2 pid=$3 c0=0 c1=0; shift 3
  foreign_begin
  [ "$pid" = - ] || c0=$(tree_cpu_s "$pid")
  cpu_sample > "$work/cpu.before"
  taskset -c "$LOAD_CPU" "$OHA" --no-tui --output-format json -z "${DUR}s" -c "$CONNS" "$@" "$url" \
    > "$work/$name.json" 2> "$work/$name.err" || { log "oha failed: $(cat "$work/$name.err")"; return 1; }
  cpu_sample > "$work/cpu.after"
  [ "$pid" = - ] || c1=$(tree_cpu_s "$pid")
  foreign_end
  BUSY=$(cpu_busy "$work/cpu.before" "$work/cpu.after" "$PROXY_CPU")
  read -r P50 P99 RPS OK ALL < <(oha_figures "$work/$name.json")
  CPU_US=$(python3 -c "import sys; c, n = float(sys.argv[1]), int(sys.argv[2]); print(f'{1e6 * c / n:.0f}' if n and c else '-')" "$(python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$c0" "$c1")" "$ALL")
  [ "$OK" = "$ALL" ] || log "  WARNING: $((ALL - OK)) of $ALL answers were not 2xx: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("statusCodeDistribution"))' "$work/$name.json")"
}
