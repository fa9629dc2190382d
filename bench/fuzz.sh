#!/usr/bin/env bash
# Hostile input at volume: the property harnesses that run in CI with 256
# cases each (crates/*/tests/hostile_input.rs), here with many more, in
# release mode. Each one fails on a panic or on an error that does not say
# what and where; proptest then prints the smallest input that fails.
#
#   bench/fuzz.sh                  # CASES=100000 per property: about 10 min on 2 cores
#   CASES=20000 bench/fuzz.sh      # about 2 min
#
# What is fed to what:
#   core:   valid configs damaged by up to 5 byte edits; durations, rates,
#           numbers and key parts of any text
#   http:   request paths built from hostile pieces (dot segments plain and
#           encoded, doubled and encoded slashes, backslashes, bare %):
#           normalized, no dot or empty segment is left, even as an upstream
#           would decode it, and normalizing again changes nothing;
#           Retry-After, RateLimit and X-RateLimit-* values of any text
#   sim:    trace lines damaged byte by byte
#   egress: job lines, bulk templates (in the config) and bulk records
#           damaged byte by byte; what is read is sent only under the
#           upstream's base URL
#   gateway: request heads damaged byte by byte, and paths climbing out of
#           a route's path_prefix, written raw to the gateway's socket: an
#           HTTP answer or a close, never a relay outside the prefix
#   proxy:  job batches damaged byte by byte, POSTed to the proxy's job
#           intake (crates/proxy/tests/jobs.rs): a 202 or a refusal that
#           names why, never a 5xx, and the proxy keeps serving
#   store:  random policies and traffic decided by the memory store and by
#           the Redis store (a redis-server the test starts), which must
#           agree decision for decision (CASES / 10 cases: each is a trace)
set -euo pipefail
cd "$(dirname "$0")/.."
CASES=${CASES:-100000}
export TOLLGATE_FUZZ_CASES=$CASES
echo "$(date -u '+%Y-%m-%d %H:%M UTC'): $CASES cases per property, at $(git rev-parse --short HEAD)"
status=0
for crate in tollgate-core tollgate-http tollgate-sim tollgate-egress tollgate-gateway; do
  start=$(date +%s)
  if out=$(cargo test --release -q -p "$crate" --test hostile_input 2>&1); then
    echo "$crate: $(echo "$out" | grep -E '^test result' | sed 's/; finished.*//') ($(( $(date +%s) - start )) s with the build)"
  else
    status=1
    echo "$crate: FAILED"
    echo "$out" | grep -E -A30 'minimal failing input|panicked' | head -60
  fi
done
start=$(date +%s)
if out=$(cargo test --release -q -p tollgate-proxy --test jobs hostile 2>&1); then
  echo "tollgate-proxy (job intake): $(echo "$out" | grep -E '^test result' | sed 's/; finished.*//') ($(( $(date +%s) - start )) s with the build)"
else
  status=1
  echo "tollgate-proxy (job intake): FAILED"
  echo "$out" | grep -E -A30 'panicked' | head -60
fi
start=$(date +%s)
if out=$(TOLLGATE_DIFF_CASES=$(( CASES / 10 )) cargo test --release -q -p tollgate-store --test differential 2>&1); then
  echo "tollgate-store (Redis vs memory): $(echo "$out" | grep -E '^test result' | sed 's/; finished.*//'), $(( CASES / 10 )) cases ($(( $(date +%s) - start )) s with the build)"
else
  status=1
  echo "tollgate-store (Redis vs memory): FAILED"
  echo "$out" | grep -E -A30 'minimal failing input|panicked' | head -60
fi
exit $status
