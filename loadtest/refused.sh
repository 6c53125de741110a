#!/usr/bin/env bash
# How fast imgedge refuses, and that a refusal contacts nothing (issue 9's "a refused request
# answered in under 1 ms with no connection made"). For each kind of refusal, wrk sends the same
# request over one keep-alive connection for SECONDS_RUN seconds and reports the latency
# percentiles (client-measured, loopback included); then the origin's request count and imgedge's
# upstream fetch counter must both still be 0.
#
# Usage: [EDGE_BIN=path/to/imgedge] [SECONDS_RUN=3] bash loadtest/refused.sh
#   EDGE_BIN unset: `cargo build --release --quiet`, then target/release/imgedge.
# Prints one line per refusal: `refused KIND status=... code=... rps=... p50_us=... p99_us=...
# max_us=...`, then `origin_requests=0 upstream_fetches=0` (or fails), and writes the same lines,
# with the command and the binary, to loadtest/reports/refused-<UTC>.md (REPORT_DIR to write
# elsewhere), also when the last check fails.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
. "$here/lib/lib.sh"

cmdline=$(lt_cmdline '^(EDGE_BIN|SECONDS_RUN|CORPUS|CARGO_TARGET_DIR)=' "$@")
stamp=$(date -u +%Y%m%dT%H%M%SZ)
seconds=${SECONDS_RUN:-3}
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || lt_die "SECONDS_RUN must be a positive integer"
command -v wrk >/dev/null || lt_die "wrk is required (apt-get install wrk)"
lt_ensure_corpus
# the work folder is lt_start's: lt_cleanup removes it (kept on failure or with LT_KEEP=1)
LT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-refused.XXXXXX")
work=$LT_TMP
trap lt_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
lt_release_bin "$work"
EDGE_BIN=$run_bin
# Any host allowed (so the address guard decides), the origin trusted only as 127.0.0.1 on its
# port: every other spelling of a private address is refused before a connection is made.
export LT_ALLOWED_HOSTS='[]'
lt_start

# The latency percentiles of one request, repeated over one connection.
refused() { # kind path
  local kind=$1 path=$2 status code out
  status=$(curl -s -o "$work/body" -w '%{http_code}' --max-time 5 "$BASE$path")
  code=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["error"])' "$work/body" 2>/dev/null || echo "not-json")
  [[ $status =~ ^4 ]] || lt_die "$kind: expected a 4xx refusal, got $status ($(head -c 200 "$work/body"))"
  out=$(wrk -t1 -c1 -d"${seconds}s" --latency "$BASE$path" 2>&1)
  printf '%s\n' "$out" | python3 -c '
import re, sys
kind, status, code = sys.argv[1:4]
text = sys.stdin.read()
def us(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return round(float(n) * {"us": 1, "ms": 1e3, "s": 1e6}[u])
pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)", text, re.M))
mx = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", text).group(1)
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50, p99 = us(pct["50"]), us(pct["99"])
print(f"refused {kind} status={status} code={code} rps={rps:.0f} p50_us={p50} p99_us={p99} max_us={us(mx)}")
' "$kind" "$status" "$code" | tee -a "$work/lines"
}

# /image-proxy?url= + TARGET, percent-encoded as a client library would.
img() { printf '/image-proxy?url=%s' "$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1")"; }
refused private-localhost "$(img "http://localhost:$OPORT/x.jpg")"
refused private-v4-mapped "$(img "http://[::ffff:7f00:1]:$OPORT/x.jpg")"
refused private-octal "$(img "http://0177.0.0.2:$OPORT/x.jpg")"
refused private-6to4 "$(img "http://[2002:7f00:1::1]:$OPORT/x.jpg")"
refused port-not-allowed "$(img "http://127.0.0.1:9/x.jpg")"
refused bad-url "$(img "file:///etc/passwd")"
refused bad-path "/storage/v1/object/public/b/%2e%2e/%2e%2e/x.jpg"
refused uri-too-long "/storage/v1/object/public/$(head -c 5000 /dev/zero | tr '\0' a)"

hits=$(curl -s --max-time 5 "$ORIGIN/__hits" | python3 -c 'import json,sys; print(sum(json.load(sys.stdin).values()))')
# Fetches that reached an origin: every outcome but `refused` (counted before any connection).
fetches=0
for outcome in ok error timeout; do
  fetches=$((fetches + $(lt_metrics_sum "$BASE" imgedge_upstream_requests_total "outcome=\"$outcome\"")))
done
echo "origin_requests=$hits upstream_fetches=${fetches:-0}" | tee -a "$work/lines"
report_dir=${REPORT_DIR:-$here/reports}
mkdir -p "$report_dir"
report=$report_dir/refused-$stamp.md
{
  echo "# Refusals: bash loadtest/refused.sh, $stamp"
  echo
  echo "Command: \`$cmdline\`"
  echo
  echo "imgedge: $bin_version, $bin_source, sha256 ${bin_sha:0:12}; $(nproc) cores; each refusal sent by \`wrk -t1 -c1\` for $seconds s over one keep-alive connection (latency from wrk, loopback included)."
  echo
  echo '```text'
  cat "$work/lines"
  echo '```'
} >"$report"
echo "report: $report" >&2
[[ $hits == 0 && ${fetches:-0} == 0 ]] || lt_die "a refused request reached the origin"
