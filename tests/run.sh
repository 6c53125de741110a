#!/usr/bin/env bash
# tests/run.sh: the test command (README.md "Test", what .ci/run runs): every check, in an order
# that keeps two cores busy.
#
#   bash tests/run.sh
#
# The one release build (`cargo build --release --locked`, its output in
# target/release-build.log) runs in the background beside the checks that only compile: fmt,
# clippy, rustdoc and the test build (`cargo test --no-run`). Cargo locks target/debug and
# target/release apart, so the two never wait for each other, and each fills the other's serial
# stretches (jemalloc's configure script, a crate's final codegen and link). The tests themselves
# run only after the release build has finished, on a quiet machine: several measure time.
# Then the steps that use the release build: the k6 smoke test, HTTP caching conformance,
# Supabase's acceptance suite, the operator's Prometheus checks and the container check.
# Each step is announced on stderr with the seconds since the start; the first failure stops
# the run (the background build is stopped with it) and is the exit status.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf 'test: [%4ds] %s\n' "$SECONDS" "$*" >&2; }

release_pid=
stop_release() {
  if [[ -n $release_pid ]] && kill -0 "$release_pid" 2>/dev/null; then
    kill -- "$release_pid" 2>/dev/null || true
    wait "$release_pid" 2>/dev/null || true
  fi
}
trap stop_release EXIT

step "cargo fmt --check"
cargo fmt --check

mkdir -p target
step "cargo build --release --locked: in the background, output in target/release-build.log"
cargo build --release --locked >target/release-build.log 2>&1 &
release_pid=$!

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
step "cargo doc --no-deps --document-private-items (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --quiet
step "cargo test --no-run"
cargo test --no-run

step "waiting for the release build"
if ! wait "$release_pid"; then
  release_pid=
  tail -n 40 target/release-build.log >&2
  step "the release build failed (target/release-build.log)"
  exit 1
fi
release_pid=
tail -n 1 target/release-build.log >&2

step "cargo test"
cargo test
step "loadtest/run.sh smoke"
bash loadtest/run.sh smoke
step "loadtest/conformance.sh"
CONFORMANCE_MIN=150 bash loadtest/conformance.sh
step "tests/supabase/run.sh"
bash tests/supabase/run.sh
step "tests/operator/run.sh"
bash tests/operator/run.sh
step "docker/check.sh"
bash docker/check.sh
step "all passed"
