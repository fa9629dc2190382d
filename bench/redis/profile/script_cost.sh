#!/usr/bin/env bash
# Where decide.lua's time goes inside Redis: server microseconds per call
# (INFO commandstats usec_per_call, best of $REPS) of the real script and of
# copies of it cut short at successive points, driven by redis-benchmark
# (-c 16 -P 8, 1,000 random keys) with the arguments tollgate's store sends
# for bench/redis/one_limit.toml and three_limits.toml. Plus, for scale: a
# Lua script that returns at once, closure creation alone, a lean
# fixed-window script (lean_fixed_window.lua, not tollgate's), and envoy's
# two commands.
#
#   bench/redis/profile/script_cost.sh PORT      # a redis-server of ours on 127.0.0.1:PORT
#
# Run by bench/redis.sh with PROFILE=1; it FLUSHALLs and SCRIPT FLUSHes that server.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PORT=$1
REPS=${REPS:-3}
N=${N:-60000}
SCRIPT=crates/store/src/redis/decide.lua
cli() { redis-cli -p "$PORT" "$@"; }
work=$(mktemp -d /tmp/rbprofile.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The arguments RedisStore::invocation sends (captured with MONITOR from
# bench/redis.sh's policies; "" = use Redis TIME).
ARGS1=(d "" 1 10 f 1 1 0 0 0 1000000000 F 60000000000 0)
ARGS3=(d "" 1 13 g 1 1 0 0 0 1000000 1000000 1000000000 1000 0 1000000000 0
       10 f 1 1 0 0 0 1000000000 F 60000000000 0
       19 t 1 1 0 0 0 3 1000000000 F 60000000000 0 1000000000 F 3600000000000 0 1000000000 F 86400000000000 0)

# cut NAME MARKER: decide.lua returning just before the line MARKER starts.
cut() {
  python3 - "$SCRIPT" "$2" > "$work/$1.lua" <<'PY'
import sys
s, mark = open(sys.argv[1]).read(), sys.argv[2]
i = s.index(mark)
sys.stdout.write(s[:i] + "\ndo return {0, 0, 0, 0} end\n" + s[i:])
PY
}
cut top '---------------------------------------------------------------- slots'
cut parsed 'local function save(i)'
cut earliest "if op == 'u' then return report"
cut fixpoint 'if not fits then'
cp "$SCRIPT" "$work/full.lua"
printf '%s' "return {0, 0, 0, 0, 1, 0, 0, -1}" > "$work/nop.lua"
printf '%s' "local t = {} for i = 1, 30 do t[i] = function() return i end end return 1" > "$work/closures30.lua"
cp bench/redis/profile/lean_fixed_window.lua "$work/lean.lua"

# usec NAME KEYS ARGS...: best usec_per_call of the named script's EVALSHA
usec() {
  local name=$1 nkeys=$2; shift 2
  local sha keys=() best="" u k
  sha=$(cli script load "$(cat "$work/$name.lua")")
  for k in $(seq 1 "$nkeys"); do keys+=("$name.$nkeys.$k:__rand_int__"); done
  for _ in $(seq 1 "$REPS"); do
    cli config resetstat > /dev/null
    redis-benchmark -p "$PORT" -n "$N" -c 16 -P 8 -r 1000 -q EVALSHA "$sha" "$nkeys" "${keys[@]}" "$@" > /dev/null 2>&1
    local stat
    stat=$(cli info commandstats | grep '^cmdstat_evalsha:')
    case $stat in *failed_calls=0*) ;; *) echo "script $name failed: $stat" >&2; exit 1 ;; esac
    u=$(sed 's/.*usec_per_call=\([0-9.]*\).*/\1/' <<<"$stat")
    best=$(python3 -c "import sys; print(min(float(a) for a in sys.argv[1:] if a))" "$u" "$best")
  done
  echo "$best"
}
cmd_usec() { # cmd_usec COMMAND ARGS...: best usec_per_call of a plain command
  local best="" u name
  name=$(tr 'A-Z' 'a-z' <<<"$1")
  for _ in $(seq 1 "$REPS"); do
    cli config resetstat > /dev/null
    redis-benchmark -p "$PORT" -n "$N" -c 16 -P 8 -r 1000 -q "$@" > /dev/null 2>&1
    u=$(cli info commandstats | grep "^cmdstat_$name:" | sed 's/.*usec_per_call=\([0-9.]*\).*/\1/')
    best=$(python3 -c "import sys; print(min(float(a) for a in sys.argv[1:] if a))" "$u" "$best")
  done
  echo "$best"
}

cli flushall > /dev/null
cli script flush > /dev/null
printf '%-62s %10s %10s\n' "server time per EVALSHA (best of $REPS, µs)" "1 limit" "3 limits"
row() { printf '%-62s %10s %10s\n' "$1" "$2" "$3"; }
row "Lua returning 8 integers at once (EVALSHA + args baseline)" "$(usec nop 1 "${ARGS1[@]}")" "$(usec nop 3 "${ARGS3[@]}")"
row "creating 30 closures, nothing else" "$(usec closures30 1 "${ARGS1[@]}")" ""
row "decide.lua up to its slots (TIME + ~21 top-level closures)" "$(usec top 1 "${ARGS1[@]}")" "$(usec top 3 "${ARGS3[@]}")"
row "  + parse the slots, GET each key, build the meters" "$(usec parsed 1 "${ARGS1[@]}")" "$(usec parsed 3 "${ARGS3[@]}")"
row "  + each slot's earliest instant" "$(usec earliest 1 "${ARGS1[@]}")" "$(usec earliest 3 "${ARGS3[@]}")"
row "  + fixpoint and hold" "$(usec fixpoint 1 "${ARGS1[@]}")" "$(usec fixpoint 3 "${ARGS3[@]}")"
row "  + commit, save (SET PX), usage, reply = decide.lua" "$(usec full 1 "${ARGS1[@]}")" "$(usec full 3 "${ARGS3[@]}")"
row "lean fixed-window Lua (profile/lean_fixed_window.lua)" "$(usec lean 1 "${ARGS1[@]}")" ""
incr=$(cmd_usec INCRBY "bench_tenant_t:__rand_int___0" 1)
expire=$(cmd_usec EXPIRE "bench_tenant_t:__rand_int___0" 60)
row "envoy: INCRBY + EXPIRE ($incr + $expire)" "$(python3 -c "print(round($incr + $expire, 2))")" ""
cli flushall > /dev/null
cli script flush > /dev/null
