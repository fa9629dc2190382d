#!/usr/bin/env bash
# Instructions redis-server runs per decision of decide.lua, counted by
# callgrind: repeatable to the instruction whatever else the machine does
# (seconds on this 2-core VM vary by 30% from run to run), so a change to
# the script can be weighed exactly. Each case runs 1,000 FCALLs of 8
# decisions (one slot each, 1,000 keys in turn) through `redis-cli --pipe`
# into a redis-server under valgrind, minus the same server loading the
# library and running nothing.
#
#   bench/redis/profile/instructions.sh [LIBRARY.lua]     # default: decide.lua
#
# Cases: a fixed window that admits (bench/redis/one_limit.toml's spec), a
# token bucket that admits, a token bucket that denies 6 of 8, and a no-op
# library taking the same arguments (what Redis costs around any function).
# Needs valgrind and redis-server (apt-get if missing); about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/../../.."
LIB=${1:-crates/store/src/redis/decide.lua}
for need in redis-server:redis-server redis-cli:redis-tools valgrind:valgrind; do
  command -v "${need%%:*}" > /dev/null || { apt-get update -qq > /dev/null; apt-get install -y -qq "${need#*:}" > /dev/null; }
done
work=$(mktemp -d /tmp/rbinstr.XXXXXX)
trap 'rm -rf "$work"' EXIT

cat > "$work/noop.lua" <<'LUA'
local function run(keys, argv)
  local out = {}
  for i = 1, #keys do out[#out + 1], out[#out + 2], out[#out + 3] = 3, 999, 5000000000 end
  return out
end
redis.register_function('TOLLGATE_FUNCTION', run)
LUA

# instructions FILE.resp: redis-server's total under callgrind, running FILE.
instructions() {
  local port out
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  out="$work/callgrind.$port"
  valgrind --tool=callgrind --callgrind-out-file="$out" redis-server --port "$port" --bind 127.0.0.1 \
    --save "" --appendonly no --dir "$work" > "$work/valgrind.$port.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do redis-cli -p "$port" ping > /dev/null 2>&1 && break; sleep 0.2; done
  redis-cli -p "$port" --pipe < "$1" > "$work/pipe.$port.log" 2>&1
  grep -q "errors: 0" "$work/pipe.$port.log" || { echo "errors running $1:" >&2; head -5 "$work/pipe.$port.log" >&2; }
  redis-cli -p "$port" shutdown nosave > /dev/null 2>&1 || true
  wait "$pid" || true
  awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

FIXED='f,0,0,0,1000000000,F,60000000000,0'                        # one_limit.toml: 1e9 a minute
BUCKET='g,0,0,0,1000000000,1,1000,1000,0,999999999000,0'          # 1e9 burst, 1e6/s
SPENT='g,0,0,0,2,1,1000000000000,1000000000000,0,1000000000000,0' # 2 burst, 1 per 1000 s
python3 bench/redis/profile/calls.py "$LIB" "$work/zero.resp" 8 0 "$FIXED"
python3 bench/redis/profile/calls.py "$work/noop.lua" "$work/noop.resp" 8 1000 "$FIXED"
python3 bench/redis/profile/calls.py "$LIB" "$work/fixed.resp" 8 1000 "$FIXED"
python3 bench/redis/profile/calls.py "$LIB" "$work/bucket.resp" 8 1000 "$BUCKET"
python3 bench/redis/profile/calls.py "$LIB" "$work/spent.resp" 8 1000 "$SPENT"
zero=$(instructions "$work/zero.resp")
echo "instructions per decision in redis-server $(redis-server --version | awk '{print $3}'), FCALLs of 8 decisions:"
for case in noop fixed bucket spent; do
  total=$(instructions "$work/$case.resp")
  printf '  %-7s %8d\n' "$case" $(( (total - zero) / 8000 ))
done
