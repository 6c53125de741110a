#!/usr/bin/env bash
# tests/run.sh: the test command (README.md "Test", what .ci/run runs): every check, the first
# failure stopping the run (its exit status is the run's).
#
#   bash tests/run.sh
#
# fmt, clippy, rustdoc (warnings are errors), the unit and integration tests; then one release
# build (`cargo build --release --locked`) that every later step uses: the k6 smoke test, HTTP
# caching conformance, the operator's Prometheus checks and the container check, one after
# another, and Supabase's acceptance suite beside them. Each step is announced on stderr with the
# seconds since the start.
#
# The steps before the release build leave out the default "jemalloc" feature: jemalloc is the
# release binary's allocator, and its C build (configure and make, about 1.5 minutes of a core)
# would otherwise run twice, once per profile. The tests' binaries use the system allocator;
# the release build, and every step after it, jemalloc.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf 'test: [%4ds] %s\n' "$SECONDS" "$*" >&2; }

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy --all-targets --no-default-features -- -D warnings"
cargo clippy --all-targets --no-default-features -- -D warnings
step "cargo doc --no-deps --document-private-items (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --no-default-features --quiet
step "cargo test --no-default-features"
cargo test --no-default-features
step "cargo build --release --locked"
cargo build --release --locked

# Supabase's acceptance suite, the longest check (about a minute, one core of Node and
# Postgres), runs beside the four others, which mostly wait on timers and sockets; its output is
# shown when it ends. In a session of its own, so that a failure here stops all of it.
supabase_log=$(mktemp "${TMPDIR:-/tmp}/imgedge-test-supabase.XXXXXX")
step "tests/supabase/run.sh (beside the next four steps; its output follows them)"
setsid bash tests/supabase/run.sh >"$supabase_log" 2>&1 &
supabase=$!
trap 'kill -TERM -- -"$supabase" 2>/dev/null || true; rm -f "$supabase_log"' EXIT
step "loadtest/run.sh smoke"
bash loadtest/run.sh smoke
step "loadtest/conformance.sh"
CONFORMANCE_MIN=150 bash loadtest/conformance.sh
step "tests/operator/run.sh"
bash tests/operator/run.sh
step "docker/check.sh"
bash docker/check.sh
step "tests/supabase/run.sh (waiting for it)"
supabase_rc=0
wait "$supabase" || supabase_rc=$?
cat "$supabase_log"
((supabase_rc == 0)) || { step "tests/supabase/run.sh failed (exit $supabase_rc)"; exit "$supabase_rc"; }
step "all passed"
