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
