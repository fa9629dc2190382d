#!/usr/bin/env bash
# Instructions per keyed decision, tollgate and governor 0.10 side by side,
# counted by valgrind's cachegrind: unlike time on a shared VM (where the same
# binary's ns per decision moves by 30% from run to run), a count shows what a
# change did. It is not a time: cache misses and divisions cost more than
# their count says (bench/engine.sh has times).
#
#   bench/instructions.sh            # about two minutes after the build
#   N=300000 bench/instructions.sh   # decisions per subject (default 1,000,000)
#   BIN=/path/engine-instructions bench/instructions.sh   # another build's subject (an older commit's)
#
# Each subject (crates/bench/src/bin/engine-instructions.rs) tracks 10,000
# keys, then makes N decisions; it runs at 0 and at N decisions and the
# difference over N is its count per decision. Both runs start the clock,
# whose calibration takes a varying number of instructions (about ±1 M a
# run): at N = 100,000 the same binary's count moved by up to ±45 a
# decision, at the default 1,000,000 by a few. Respects CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-1000000}
target=${CARGO_TARGET_DIR:-target}
if ! command -v valgrind >/dev/null; then
    echo "installing valgrind..."
    apt-get install -y -q valgrind >/dev/null || sudo apt-get install -y -q valgrind >/dev/null
fi
cargo build --release -q -p tollgate-bench --bin engine-instructions
bin=${BIN:-$target/release/engine-instructions}
count() { # subject decisions -> instructions
    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 |
        awk '/I *refs:/ { gsub(",", "", $NF); print $NF }'
}
declare -A per
for subject in governor tollgate tollgate-three tollgate-three-buckets tollgate-tiered tollgate-fixed tollgate-sliding; do
    base=$(count "$subject" 0)
    total=$(count "$subject" "$n")
    per[$subject]=$(( (total - base) / n ))
    printf '%-22s %6d instructions a decision\n' "$subject" "${per[$subject]}"
done
python3 - "${per[governor]}" "${per[tollgate]}" "${per[tollgate-three]}" "${per[tollgate-three-buckets]}" "${per[tollgate-tiered]}" "${per[tollgate-fixed]}" "${per[tollgate-sliding]}" <<'PY'
import sys
gov, one, three, buckets, tiered, fixed, sliding = map(int, sys.argv[1:])
print(f"keyed token bucket: tollgate / governor = {one / gov:.2f}x")
print(f"three limits (token bucket + fixed + sliding window, one key) / one token bucket = {three / one:.2f}x")
print(f"three token buckets (one key) / one = {buckets / one:.2f}x (what combining limits costs, without the windows' own work)")
print(f"tiered (minute, hour and day pools) / one token bucket = {tiered / one:.2f}x")
print(f"the three limits' own decisions added up (token bucket + fixed + sliding window, each alone) / one token bucket = {(one + fixed + sliding) / one:.2f}x")
PY
