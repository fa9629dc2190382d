#!/usr/bin/env bash
# The project's test command (the README gives it; .ci/run calls it):
# formatting, lints with warnings denied, then every test of the workspace,
# closing with the workspace's total.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# A real redis-server for the Redis store's tests (docs/architecture.md:
# nothing of our own is mocked): installed from Debian when missing, started on
# a free loopback port, stopped on exit. Tests that kill and restart Redis
# start their own servers with the same binary.
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (apt-get)"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq redis-server >/dev/null
fi
# Clients others wrote, as the proxy's users call it (crates/proxy/tests/clients.rs):
# Python's requests, httpx (with h2) and websockets, curl, Node's fetch.
if ! python3 -c 'import requests, httpx, h2, websockets' 2>/dev/null; then
  echo "installing requests, httpx, h2 and websockets (pip)"
  python3 -m pip install -q requests httpx h2 websockets >/dev/null 2>&1 || python3 -m pip install -q --break-system-packages requests httpx h2 websockets >/dev/null
fi
# Envoy's rate limit service as Envoy's users' tools see it
# (crates/gateway/tests/rls.rs): grpcio with Envoy's API from xds-protos.
if ! python3 -c 'import grpc, envoy.service.ratelimit.v3.rls_pb2_grpc' 2>/dev/null; then
  echo "installing grpcio and xds-protos (pip)"
  python3 -m pip install -q grpcio xds-protos >/dev/null 2>&1 || python3 -m pip install -q --break-system-packages grpcio xds-protos >/dev/null
fi
missing=""
command -v curl >/dev/null || missing="$missing curl"
command -v node >/dev/null || missing="$missing nodejs"
# The dashboards as a browser shows them (crates/cli/tests/dashboard.rs:
# headless Chromium) and the alerts as Prometheus rules (promtool).
command -v chromium >/dev/null || missing="$missing chromium"
command -v promtool >/dev/null || missing="$missing prometheus"
if [ -n "$missing" ]; then
  echo "installing$missing (apt-get)"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq $missing >/dev/null
fi
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis_dir=$(mktemp -d)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$redis_dir" >"$redis_dir/log" 2>&1 &
redis_pid=$!
cleanup() { kill "$redis_pid" 2>/dev/null || true; rm -rf "$redis_dir" "${log:-}"; }
trap cleanup EXIT
for _ in $(seq 100); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$redis_port" ping >/dev/null || { echo "redis-server did not start:"; cat "$redis_dir/log"; exit 1; }
export TOLLGATE_TEST_REDIS="redis://127.0.0.1:$redis_port"
echo "redis-server $(redis-server --version | awk '{print $3}') on $TOLLGATE_TEST_REDIS"

# A fresh clone gains nothing from incremental compilation, and its caches
# would double what target/ takes on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# cargo prints one "test result" line per test binary (doc-tests last, often
# with 0 tests): sum them so the last line says what the whole run did.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tollgate: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
