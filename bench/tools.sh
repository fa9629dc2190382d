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
