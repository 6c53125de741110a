#!/usr/bin/env bash
# One load scenario against one target, with the target's own CPU time and peak RSS measured from
# /proc while the load runs (the load generator shares the machine, so CPU per request is the fair
# figure on a small box, not requests per second alone). loadtest/bench.sh runs it once per
# scenario and target and parses its output line.
#
# Usage: bash loadtest/lib/load.sh BASE SCENARIO PID...
#   BASE      e.g. http://127.0.0.1:18081
#   SCENARIO  hits-small  /image-proxy?url=ORIGIN/NAME for every image <= 1 MiB
#             hits-mixed  the same for every image <= 5 MiB
#             large       the same for every image > 5 MiB (16 connections unless CONNS is set)
#             supabase    /storage/v1/object/public/wallpapers/NAME for every image <= 5 MiB
#   PID...    the target's processes (all of them: nginx workers, varnish child, ...)
# Every path is fetched once first (a warm pass, so the hit scenarios measure hits), then
# `wrk -t1 -c CONNS -d SECONDS_RUN` cycles through them (loadtest/lib/paths.lua).
# Env: CORPUS (default /tmp/imgproxy-corpus), SECONDS_RUN (10), CONNS (64), ORIGIN (http://127.0.0.1:18080)
# Prints one line: SCENARIO BASE rps= MBps= p50_ms= p99_ms= errors= cpu_us_per_req= peak_rss_mb= start_rss_mb=
# (start_rss_mb: the targets' RSS after the warm pass, before the load; peak minus start is what the
# load added). Needs wrk (installed from Debian when missing, as root) and curl.
set -euo pipefail
die() { printf 'load.sh: %s\n' "$*" >&2; exit 1; }
(($# >= 3)) || die "usage: bash loadtest/lib/load.sh BASE SCENARIO PID..."
base=$1 scenario=$2; shift 2; pids=("$@")
corpus=${CORPUS:-/tmp/imgproxy-corpus} origin=${ORIGIN:-http://127.0.0.1:18080}
secs=${SECONDS_RUN:-10} conns=${CONNS:-64}
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v wrk >/dev/null; then
  ((EUID == 0)) || die "wrk is required: apt-get install wrk (as root)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
m=$corpus/MANIFEST.tsv
[[ -s $m ]] || die "no corpus manifest at $m (bash loadtest/corpus.sh builds one)"
list=$(mktemp); trap 'rm -f "$list" "$list.out"' EXIT
case $scenario in
  hits-small) awk -F'\t' -v o="$origin" '$2 <= 1048576 {print "/image-proxy?url=" o "/" $1}' "$m" >"$list";;
  hits-mixed) awk -F'\t' -v o="$origin" '$2 <= 5242880 {print "/image-proxy?url=" o "/" $1}' "$m" >"$list";;
  large)      awk -F'\t' -v o="$origin" '$2 > 5242880 {print "/image-proxy?url=" o "/" $1}' "$m" >"$list"; conns=${CONNS:-16};;
  supabase)   awk -F'\t' '$2 <= 5242880 {print "/storage/v1/object/public/wallpapers/" $1}' "$m" >"$list";;
  *) echo "unknown scenario $scenario" >&2; exit 2;;
esac
[[ -s $list ]] || die "no image of $m fits scenario $scenario"
# warm pass: every path once, so hit scenarios measure hits
while read -r p; do curl -fsS -o /dev/null "$base$p" || true; done <"$list"
cpu() { local t=0 v; for p in "${pids[@]}"; do v=$(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null) && t=$((t + v)); done; echo $t; }
rss() { local t=0 v; for p in "${pids[@]}"; do v=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null) && t=$((t + v)); done; echo $t; }
c0=$(cpu); peak=$(rss); start=$peak
PATHS=$list wrk -t1 -c"$conns" -d"${secs}s" --timeout 30s -s "$here/paths.lua" "$base" >"$list.out" 2>&1 &
w=$!
while kill -0 $w 2>/dev/null; do r=$(rss); ((r > peak)) && peak=$r; sleep 0.2; done
wait $w || true
c1=$(cpu); tck=$(getconf CLK_TCK)
line=$(grep '^RESULT' "$list.out") || { cat "$list.out" >&2; exit 1; }
requests=0 seconds=0 bytes=0 errors=0 p50_ms=0 p99_ms=0 # set from the RESULT line:
eval "${line#RESULT }"
awk -v s="$scenario" -v b="$base" -v n="$requests" -v t="$seconds" -v by="$bytes" -v e="$errors" \
    -v p50="$p50_ms" -v p99="$p99_ms" -v c=$((c1 - c0)) -v tck="$tck" -v pk="$peak" -v st="$start" 'BEGIN {
  printf "%s %s rps=%.0f MBps=%.0f p50_ms=%s p99_ms=%s errors=%d cpu_us_per_req=%.1f peak_rss_mb=%.0f start_rss_mb=%.0f\n",
    s, b, n / t, by / t / 1048576, p50, p99, e, (n ? c / tck * 1e6 / n : 0), pk / 1024, st / 1024 }'
