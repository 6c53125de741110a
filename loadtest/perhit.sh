#!/usr/bin/env bash
# Deterministic per-hit costs of one imgedge binary: user-space instructions per memory hit
# (valgrind's callgrind) and system calls per hit (strace -c), over N keep-alive GETs that are all
# memory hits (the first 20 corpus images of at most 1 MiB through /image-proxy, warmed first).
# CPU time under wrk moves by up to 20% between identical runs on a shared 2-core machine; these
# counts repeat, so two binaries can be compared one after the other (as for issue 8's
# restructuring, docs/benchmarks.md).
#
# Usage: [EDGE_BIN=path/to/imgedge] bash loadtest/perhit.sh [N=3000]
#   EDGE_BIN unset: `cargo build --release --quiet`, then target/release/imgedge.
#   Needs valgrind and strace (installed from Debian when missing, as root).
# Prints `instructions_per_hit=... syscalls_per_hit=...` and the syscall table.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
. "$here/lib/lib.sh"

n=${1:-3000}
[[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || lt_die "N must be a positive integer, not '$n'"
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v strace >/dev/null || need+=(strace)
if ((${#need[@]})); then
  lt_log "installing ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
lt_ensure_corpus
work=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-perhit.XXXXXX")
lt_release_bin "$work"
real_bin=$run_bin
awk -F'\t' '$2 <= 1048576 {print $1}' "$MANIFEST" | head -20 >"$work/names"

# N keep-alive GETs over one connection, round robin over the names; fails on any non-200.
hits() { # count
  python3 - "$PORT" "$OPORT" "$1" "$work/names" <<'EOF'
import http.client, sys
port, oport, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
paths = [f"/image-proxy?url=http://127.0.0.1:{oport}/{l.strip()}" for l in open(sys.argv[4]) if l.strip()]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
for i in range(n):
    c.request("GET", paths[i % len(paths)])
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"{paths[i % len(paths)]}: HTTP {r.status}")
EOF
}

# 1. Instructions: imgedge under callgrind, counters zeroed after the warm pass.
lt_log "1/2 callgrind: $n hits (about $((n / 100 + 20)) s)"
cat >"$work/under-callgrind" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/callgrind.out "$real_bin" "\$@"
EOF
chmod +x "$work/under-callgrind"
EDGE_BIN=$work/under-callgrind LT_WAIT_TRIES=600 lt_start
hits $((2 * $(wc -l <"$work/names")))
callgrind_control -z "$LT_IMGEDGE_PID" >/dev/null
hits "$n"
callgrind_control -d "$LT_IMGEDGE_PID" >/dev/null
dumps=("$work"/callgrind.out.*)
dump=${dumps[0]}
[[ -e $dump ]] || lt_die "callgrind wrote no dump in $work"
instructions=$(awk '/^summary:/ {print $2}' "$dump")
lt_stop "$LT_IMGEDGE_PID"
lt_stop "$LT_ORIGIN_PID"
rm -rf "$LT_TMP"

# 2. System calls: the same hits under strace -c (counts only; strace's timings are its own).
lt_log "2/2 strace: $n hits"
EDGE_BIN=$real_bin lt_start
hits $((2 * $(wc -l <"$work/names")))
strace -c -f -p "$LT_IMGEDGE_PID" -o "$work/strace.txt" 2>/dev/null &
tracer=$!
sleep 1
hits "$n"
sleep 0.5
kill -INT "$tracer"
wait "$tracer" 2>/dev/null || true
# The total line: % time, seconds, usecs/call, calls, [errors], "total".
syscalls=$(awk '$NF == "total" {print $4}' "$work/strace.txt")
[[ -n $syscalls ]] || lt_die "no total in strace's table: $(cat "$work/strace.txt")"

awk -v i="$instructions" -v s="$syscalls" -v n="$n" -v b="$bin_source" -v sha="$bin_sha" 'BEGIN {
  printf "binary: %s (sha256 %.12s)\n", b, sha
  printf "instructions_per_hit=%.0f syscalls_per_hit=%.2f (over %d hits; syscalls include the RSS sampler)\n", i / n, s / n, n }'
sed -n '1,12p' "$work/strace.txt"
rm -rf "$work"
