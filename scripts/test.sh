#!/usr/bin/env bash
# The project's test command (the README gives it; .ci/run calls it):
# formatting, lints with warnings denied, then every test of the workspace,
# closing with the workspace's total.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# cargo prints one "test result" line per test binary (doc-tests last, often
# with 0 tests): sum them so the last line says what the whole run did.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tollgate: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
