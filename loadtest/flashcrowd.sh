#!/usr/bin/env bash
# Flash-crowd benchmark (issue 4): 200 connections at once over the whole corpus (the six 7–16 MB
# images included), cold, against a fresh imgedge with memory.budget_bytes = 128 MiB and a 48 MiB
# memory tier; then 1 million memory-tier hits. Everything listens on and talks to 127.0.0.1 only.
#
# Usage (from anywhere):  bash loadtest/flashcrowd.sh
#
# Steps:
#   1. binary: EDGE_BIN, else `cargo build --release --quiet` and target/release/imgedge (a copy
#      runs, from the log folder, so a rebuild during the run changes nothing)
#   2. origin: loadtest/peers.sh start (nginx serving CORPUS at 127.0.0.1:18080/NAME; its
#      nginx/Varnish caches on 18081/18082 are not used; the corpus is built when missing)
#   3. imgedge on a free 127.0.0.1 port; idle RSS (VmRSS) 2 s after /health first answers
#   4. sampler, every 100 ms: `t_ms rss_kb health_status health_ms level` (RSS from
#      /proc/PID/status; /health by curl -m 2, status 000 when curl fails; level = memory.level)
#   5. the crowd: wrk -t2 -c200 -d20s --timeout 30s -s loadtest/flashcrowd.lua over
#      /image-proxy?url=http://127.0.0.1:18080/NAME for every manifest line; then 30 s more of
#      sampling, and /health's cache.memory.bytes
#   6. 1M hits: FC_HITS_IMAGES images <= 1 MiB (spread over that size range), warmed, then
#      wrk -t2 -c64 until FC_HITS requests (duration from a 5 s pilot; at most
#      FC_HITS_MAX_SECONDS of wrk in all); RSS before and after against the tier's bytes
#   7. reports/flashcrowd-<UTC>.md and reports/flashcrowd-<UTC>.svg (flashcrowd_plot.py)
#
# Targets: idle RSS < 20 MiB; peak RSS <= 128 MiB; only 200 and 503 answers; no wrk connect/read/
# write/timeout errors; every /health probe answered (200 or 503); RSS at crowd end + 30 s <=
# 40 MiB + the memory tier's bytes; after 1M hits RSS grown by no more than the tier's bytes grew.
#
# Env:
#   EDGE_BIN             imgedge binary (default: build the release binary)
#   CORPUS               image folder with MANIFEST.tsv (default /tmp/imgproxy-corpus)
#   FC_LOG_DIR           logs, samples, wrk output, binary copy (default a new
#                        /tmp/imgedge-flashcrowd.XXXXXX; always kept)
#   FC_HITS              requests for the hits phase (default 1000000; 0 skips it)
#   FC_HITS_MAX_SECONDS  cap on the hits phase's wrk time, pilot included (default 300)
#   FC_HITS_IMAGES       images in the hits set (default 16)
# Any other IMGEDGE_* variable in the environment reaches imgedge and is listed in the report; the
# six this script sets (listen, allowed hosts, budget, tier, sample interval, log level) win.
#
# Exit status: 0 every target met, 3 a target missed, 1 the run failed (a report marked INCOMPLETE
# is still written once imgedge was started). imgedge, wrk and the sampler (by PID) and the peers
# (peers.sh stop, then until 18080-18082 are free) are stopped on exit, also on failure, Ctrl-C or
# SIGTERM (a script started with `&` from another script ignores SIGINT: stop it with TERM).
# shellcheck disable=SC2317 # cleanup runs from the EXIT trap
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
me=flashcrowd.sh
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

cmdline=$(lt_cmdline '^(EDGE_BIN|CORPUS|CARGO_TARGET_DIR|FC_[A-Z_]+)=')

# ---- knobs ----
CORPUS=${CORPUS:-/tmp/imgproxy-corpus}
manifest=$CORPUS/MANIFEST.tsv
[[ -z ${FC_TOOLS:-} ]] || log "FC_TOOLS is ignored: the origin is started with loadtest/peers.sh"
hits_target=${FC_HITS:-1000000}
hits_max_s=${FC_HITS_MAX_SECONDS:-300}
hits_images=${FC_HITS_IMAGES:-16}
[[ $hits_target =~ ^[0-9]+$ && $hits_max_s =~ ^[0-9]+$ && $hits_images =~ ^[1-9][0-9]*$ ]] ||
  die "FC_HITS, FC_HITS_MAX_SECONDS and FC_HITS_IMAGES must be integers"
origin=http://127.0.0.1:18080

budget=134217728              # memory.budget_bytes, 128 MiB
tier_cap=50331648             # cache.memory_capacity_bytes, 48 MiB
crowd_conns=200 crowd_threads=2 crowd_secs=20 after_secs=30
hits_conns=64 hits_threads=2

stamp=$(date -u +%Y%m%dT%H%M%SZ)
started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
reports=$here/reports
report=$reports/flashcrowd-$stamp.md
svg=$reports/flashcrowd-$stamp.svg
mkdir -p "$reports"
logdir=${FC_LOG_DIR:-$(mktemp -d /tmp/imgedge-flashcrowd.XXXXXX)}
mkdir -p "$logdir"
ilog=$logdir/imgedge.log
samples=$logdir/samples.txt     # t_ms rss_kb health_status health_ms level (the crowd)
hits_samples=$logdir/hits-samples.txt # the same through the hits phase
sample_out=$samples             # where the running sampler writes
stopfile=$logdir/sampler.stop
load1_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- state (for the report and the cleanup) ----
imgedge_pid='' imgedge_started=0 sampler_pid='' wrk_pid='' peers_started=0 finished=0
bin_source='' bin_sha='' bin_version='' run_bin='' port='' base=''
idle_rss_kb='' t0_us='' crowd_start_ms='' crowd_end_ms='' after_ms=''
crowd_result='' hwm_kb='' tier_bytes_after='' tier_entries_after='' rss_after_kb='' health_after=''
hits_result_lines=() hits_total=0 hits_wrk_s=0 hits_rss_before_kb='' hits_rss_after_kb=''
hits_rss_settled_kb='' hits_tier_before='' hits_tier_after='' hits_metric_delta='' hits_pilot_rps=''
hits_set_bytes='' hits_set_n=0 hits_note='' hits_trace='' hits_t0_ms='' hits_stats=''
hits_delta_misses='' hits_delta_upstream='' hits_delta_collapsed='' hits_delta_shed='' hits_delta_status='' hits_log_lines=''
cmd_imgedge='' cmd_crowd='' cmd_hits=()
declare -A metric_after=()

# ---- helpers ----
now_us() { local t=${EPOCHREALTIME/./}; printf '%s' "$((10#$t))"; }
rel_ms() { printf '%s' "$((($(now_us) - t0_us) / 1000))"; }
rss_kb() { # pid -> VmRSS in kB (empty when gone), without forking
  local k v _
  while read -r k v _; do [[ $k == VmRSS: ]] && { printf '%s' "$v"; return 0; }; done <"/proc/$1/status" 2>/dev/null
  return 0
}
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null || true; }
mibf() { awk -v k="$1" 'BEGIN { if (k == "") print "?"; else printf "%.1f", k / 1024 }'; } # kB -> MiB
bmibf() { awk -v b="$1" 'BEGIN { if (b == "") print "?"; else printf "%.1f", b / 1048576 }'; } # bytes -> MiB
json_get() { # file dotted.key -> value (empty when missing)
  python3 -c '
import json, sys
try:
    v = json.load(open(sys.argv[1]))
    for k in sys.argv[2].split("."):
        v = v[k]
    print(v if not isinstance(v, (dict, list)) else json.dumps(v))
except Exception:
    pass' "$1" "$2"
}
health_json() { # -> saves /health to $logdir/health.json (any status), true when it answered
  curl -s -m 5 -o "$logdir/health.json" "$base/health" 2>/dev/null
}
metrics_sum() { lt_metrics_sum "$base" "$@"; }
metrics_series() { # metric-name -> "label=value n, ..." of every series
  { curl -sS -m 5 "$base/metrics" 2>/dev/null || true; } |
    awk -v m="$1" 'index($1, m "{") == 1 { l = $1; sub(/^[^{]*\{/, "", l); sub(/\}$/, "", l); gsub(/"/, "", l); out = out (out ? ", " : "") l " " $NF } END { print out }'
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# ---- the sampler: one probe per 100 ms tick, each in its own background subshell so a slow
# /health does not stretch the RSS cadence (a probe lasts at most 2 s: at most ~20 in flight) ----
probe() { # t_ms
  local t=$1 rss out tail code tt ms level=-
  rss=$(rss_kb "$imgedge_pid")
  out=$(curl -s -m 2 -w '\n%{http_code} %{time_total}' "$base/health" 2>/dev/null) || true
  tail=${out##*$'\n'}
  read -r code tt <<<"$tail" || true
  [[ $code =~ ^[0-9]{3}$ ]] || code=000
  [[ $tt =~ ^[0-9.]+$ ]] || tt=0
  printf -v ms '%.1f' "${tt}e3"
  [[ $out =~ \"level\":\"([a-z]+)\" ]] && level=${BASH_REMATCH[1]}
  printf '%s %s %s %s %s\n' "$t" "${rss:-0}" "$code" "$ms" "$level" >>"$sample_out"
}
sampler() { # max_seconds
  local limit_us=$(($1 * 1000000)) next now
  next=$(now_us)
  while [[ ! -e $stopfile ]]; do
    now=$(now_us)
    ((now - t0_us < limit_us)) || break
    probe "$(((now - t0_us) / 1000))" &
    next=$((next + 100000))
    now=$(now_us)
    if ((next > now)); then sleep "$(printf '0.%06d' $((next - now)))"; else next=$now; fi
  done
  wait
}
stop_sampler() {
  local i
  [[ -n $sampler_pid ]] || return 0
  touch "$stopfile"
  for ((i = 0; i < 40; i++)); do kill -0 "$sampler_pid" 2>/dev/null || break; sleep 0.1; done
  kill "$sampler_pid" 2>/dev/null || true
  wait "$sampler_pid" 2>/dev/null || true
  sampler_pid=
  if [[ -f $sample_out ]]; then sort -n -o "$sample_out" "$sample_out"; fi
  return 0
}

run_wrk() { # out-file seconds conns threads paths-file -> wrk in the background, bounded; sets wrk_pid
  local out=$1 secs=$2 conns=$3 threads=$4 paths=$5
  PATHS=$paths WRK_THREADS=$threads timeout -k 5 $((secs + 60)) \
    wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 30s -s "$here/flashcrowd.lua" "$base" >"$out" 2>&1 &
  wrk_pid=$!
}
wait_wrk() { # -> exit status of wrk
  local rc=0
  wait "$wrk_pid" || rc=$?
  wrk_pid=
  return "$rc"
}

# ---- report ----
sample_stats() { # -> key=value lines over the samples (t_ms >= crowd start)
  [[ -s $samples ]] || return 0
  awk -v cs="${crowd_start_ms:-0}" -v ce="${crowd_end_ms:-0}" -v am="${after_ms:-0}" '
    { n++; if ($3 != 200 && $3 != 503) fail++; if ($3 == 503) s503++
      if ($4 + 0 > maxh) { maxh = $4 + 0; maxh_t = $1 }
      if ($3 == 000) { if (!ff) ff = $1; lf = $1 }
      if ($1 >= cs && $2 > peak) { peak = $2; peak_t = $1 }
      if ($1 <= am && $1 >= ce) last = $2
      lv[$5]++; if (!($5 in first)) first[$5] = $1 }
    END {
      printf "probes=%d\nprobe_failures=%d\nprobe_503=%d\nprobe_max_ms=%.1f\nprobe_max_t=%s\n", n, fail, s503, maxh, maxh_t
      printf "first_failure_ms=%s\nlast_failure_ms=%s\npeak_kb=%d\npeak_t=%s\nrss_at_after_kb=%s\n", ff, lf, peak, peak_t, last
      out = ""; for (l in lv) out = out (out ? ", " : "") l " " lv[l] " (first at " first[l] " ms)"
      printf "levels=%s\n", out
    }' "$samples"
  awk '{print $4 + 0}' "$samples" | sort -n | awk '{h[NR] = $1} END {
    i = int(NR * 0.99); if (i < 1) i = 1
    printf "probe_p50_ms=%.1f\nprobe_p99_ms=%.1f\n", h[int((NR + 1) / 2)], h[i] }'
}
rss_at() { # offset-ms-after-crowd-end -> rss_kb of the last sample at or before it
  awk -v t=$((crowd_end_ms + $1)) '$1 <= t { r = $2 } END { print r }' "$samples"
}
recovered_at() { # target_kb -> ms after crowd end from which every later sample is <= target (empty: never)
  awk -v ce="$crowd_end_ms" -v tg="$1" '$1 >= ce { if ($2 > tg) ok = ""; else if (ok == "") ok = $1 - ce } END { print ok }' "$samples"
}
phase_stats() { # samples-file -> one line: peak RSS, probes, unanswered, max /health ms, levels seen
  [[ -s $1 ]] || { echo "no samples"; return 0; }
  awk '{ n++; if ($3 != 200 && $3 != 503) f++; if ($2 > p) { p = $2; pt = $1 }; if ($4 + 0 > mh) mh = $4 + 0
         lv[$5]++ }
       END { out = ""; for (l in lv) out = out (out ? ", " : "") l " " lv[l]
             printf "peak RSS %.1f MiB (at t=%.1f s), %d /health probes, %d unanswered, max %.1f ms; levels (samples): %s\n", p / 1024, pt / 1000, n, f, mh, out }' "$1"
}
verdict() {
  if [[ $1 == 1 ]]; then echo "**pass**"; elif [[ -z $1 ]]; then echo "not measured"; else echo "**FAIL**"; fi
}

declare -A pass=()
evaluate() { # fills pass[...]: 1 met, 0 missed, empty not measured
  local k v
  while IFS='=' read -r k v; do
    [[ $k =~ ^[a-z_0-9]+$ ]] && printf -v "S_$k" '%s' "$v"
  done < <(sample_stats)
  peak_kb=${hwm_kb:-0}
  ((${S_peak_kb:-0} > peak_kb)) && peak_kb=$S_peak_kb
  after_target_kb=''
  [[ -n $tier_bytes_after ]] && after_target_kb=$((40 * 1024 + tier_bytes_after / 1024))
  pass[idle]=0; [[ -n $idle_rss_kb ]] && ((idle_rss_kb < 20 * 1024)) && pass[idle]=1
  pass[peak]=0; [[ -n $crowd_end_ms ]] && ((peak_kb > 0 && peak_kb <= budget / 1024)) && pass[peak]=1
  pass[status]=0; [[ -n $crowd_result && $(lt_kv status_other "$crowd_result") == 0 ]] && pass[status]=1
  pass[errors]=0
  if [[ -n $crowd_result ]] && (($(lt_kv connect "$crowd_result") + $(lt_kv read "$crowd_result") + $(lt_kv write "$crowd_result") + $(lt_kv timeout "$crowd_result") == 0)); then pass[errors]=1; fi
  pass[health]=0; [[ -n $after_ms && ${S_probes:-0} -gt 0 && ${S_probe_failures:-1} == 0 ]] && pass[health]=1
  pass[after]=0; [[ -n $after_target_kb && -n $rss_after_kb ]] && ((rss_after_kb <= after_target_kb)) && pass[after]=1
  pass[hits_alt]=0
  if [[ -n $hits_rss_after_kb && -n $idle_rss_kb && -n $hits_tier_after ]] && ((hits_rss_after_kb - idle_rss_kb <= hits_tier_after / 1024)); then pass[hits_alt]=1; fi
  pass[hits]=0
  if [[ -n $hits_rss_after_kb && -n $hits_rss_before_kb && -n $hits_tier_before && -n $hits_tier_after ]]; then
    local tg=$(((hits_tier_after - hits_tier_before) / 1024))
    ((tg < 0)) && tg=0
    ((hits_rss_after_kb - hits_rss_before_kb <= tg && hits_total >= hits_target)) && pass[hits]=1
  fi
  # empty = not measured (a run that stopped early)
  [[ -n $idle_rss_kb ]] || pass[idle]=''
  [[ -n $after_ms ]] || { pass[peak]=''; pass[health]=''; }
  [[ -n $crowd_result ]] || { pass[status]=''; pass[errors]=''; }
  [[ -n $rss_after_kb && -n $after_target_kb ]] || pass[after]=''
  [[ -n $hits_rss_after_kb ]] || { pass[hits]=''; pass[hits_alt]=''; }
  return 0
}

write_report() { # [status line]
  local status=${1:-} tmp rev dirty wrk_v l k
  evaluate
  wrk_v=$( (wrk -v 2>&1 || true) | sed -n 1p)
  rev=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock config build.rs 2>/dev/null | awk '{print $2}' | tr '\n' ' ')
  local all=1
  for k in idle peak status errors health after; do [[ ${pass[$k]} == 1 ]] || all=0; done
  ((hits_target == 0)) || [[ ${pass[hits]} == 1 ]] || all=0
  tmp=$(mktemp)
  {
    echo "# Flash crowd: $stamp"
    echo
    [[ -n $status ]] && { echo "**$status**"; echo; }
    echo "Command: \`$cmdline\`"
    echo
    echo "Started $started_at, finished $(date -u '+%Y-%m-%d %H:%M:%S UTC'). Logs, samples and wrk output: \`$logdir\`."
    echo
    echo "## Targets"
    echo
    echo "| target | measured | limit | result |"
    echo "|---|---|---|---|"
    echo "| idle RSS, 2 s after /health first answered | $(mibf "$idle_rss_kb") MiB | < 20 MiB | $(verdict "${pass[idle]}") |"
    echo "| peak RSS, start to crowd end + ${after_secs} s (kernel VmHWM; 100 ms samples) | $(mibf "$peak_kb") MiB (VmHWM $(mibf "$hwm_kb"); sampled $(mibf "${S_peak_kb:-}") at t=${S_peak_t:-?} ms) | <= 128 MiB budget | $(verdict "${pass[peak]}") |"
    echo "| answers during the crowd | 200: $(lt_kv status_200 "$crowd_result"), 503: $(lt_kv status_503 "$crowd_result"), other: $(lt_kv status_other "$crowd_result") | only 200 and 503 | $(verdict "${pass[status]}") |"
    echo "| wrk socket errors (connect/read/write/timeout) | $(lt_kv connect "$crowd_result")/$(lt_kv read "$crowd_result")/$(lt_kv write "$crowd_result")/$(lt_kv timeout "$crowd_result") | 0 | $(verdict "${pass[errors]}") |"
    echo "| /health answering (probes every 100 ms, curl -m 2) | ${S_probes:-0} probes, ${S_probe_failures:-?} unanswered, max $(printf '%s' "${S_probe_max_ms:-?}") ms | every probe 200 or 503 | $(verdict "${pass[health]}") |"
    echo "| RSS at crowd end + ${after_secs} s | $(mibf "$rss_after_kb") MiB (tier ${tier_bytes_after:+$(bmibf "$tier_bytes_after") MiB}) | <= 40 MiB + tier = $(mibf "$after_target_kb") MiB | $(verdict "${pass[after]}") |"
    if ((hits_target > 0)); then
      echo "| RSS after $hits_total hits (target $hits_target), growth over the hits phase | $(mibf "$hits_rss_before_kb") → $(mibf "$hits_rss_after_kb") MiB ($(awk -v a="${hits_rss_after_kb:-0}" -v b="${hits_rss_before_kb:-0}" 'BEGIN {printf "%+.1f", (a - b) / 1024}') MiB); tier $(bmibf "$hits_tier_before") → $(bmibf "$hits_tier_after") MiB | growth <= tier growth, >= $hits_target hits | $(verdict "${pass[hits]}") |"
      echo "| (stricter reading, not in the exit status) RSS after the hits − idle RSS | $(mibf "$hits_rss_after_kb") − $(mibf "$idle_rss_kb") = $(awk -v a="${hits_rss_after_kb:-0}" -v b="${idle_rss_kb:-0}" 'BEGIN {printf "%.1f", (a - b) / 1024}') MiB | <= tier bytes $(bmibf "$hits_tier_after") MiB | $(verdict "${pass[hits_alt]}") |"
    else
      echo "| RSS after 1M hits | not run (FC_HITS=0) | | |"
    fi
    echo
    echo "## Machine"
    echo
    echo "- CPUs: $(nproc) ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)); memory $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); kernel $(uname -sr)"
    echo "- load average at start: $load1_start; at end: $(cut -d' ' -f1-3 /proc/loadavg) (wrk, the nginx origin and imgedge share these CPUs)"
    echo "- wrk: $wrk_v"
    echo
    echo "## Binary and configuration"
    echo
    echo "- imgedge: ${bin_source:-?}; \`${EDGE_BIN:-?}\`, sha256 \`${bin_sha:-?}\` (${bin_version:-?}); ran as the copy \`$run_bin\`"
    echo "- repository at report time: git $rev${dirty:+, uncommitted changes in: $dirty}"
    echo "- corpus: \`$CORPUS\`, $(wc -l <"$manifest") images, $(awk -F'\t' '{s += $2} END {printf "%.1f MiB", s / 1048576}' "$manifest") ($(awk -F'\t' '$2 > 5242880 {n++; s += $2} END {printf "%d over 5 MiB, %.1f MiB", n, s / 1048576}' "$manifest")), served by the nginx origin of \`peers.sh\` on 127.0.0.1:18080"
    echo "- imgedge environment (everything else: config/default.toml, embedded):"
    echo
    echo '```'
    env | grep '^IMGEDGE_' | sort || true
    echo '```'
    echo
    echo "Pressure levels at these settings: $(awk -v b="$budget" -v e="${IMGEDGE_MEMORY__EVICTING:-0.70}" -v w="${IMGEDGE_MEMORY__WARNING:-0.75}" -v y="${IMGEDGE_MEMORY__BYPASS:-0.80}" -v c="${IMGEDGE_MEMORY__CRITICAL:-0.90}" -v m="${IMGEDGE_MEMORY__EMERGENCY:-0.95}" 'BEGIN { printf "evicting %.1f MiB, warning %.1f, bypass %.1f, critical %.1f, emergency %.1f", e * b / 1048576, w * b / 1048576, y * b / 1048576, c * b / 1048576, m * b / 1048576 }') (fractions of the 128 MiB budget); in-flight fill reservations capped at ${IMGEDGE_MEMORY__INFLIGHT_FILL_BYTES:-25% of the budget, 32 MiB}."
    echo
    echo "## The crowd"
    echo
    echo "$crowd_conns connections opened together by \`wrk -t$crowd_threads -c$crowd_conns -d${crowd_secs}s --timeout 30s\`, cold, cycling through all $(wc -l 2>/dev/null <"$logdir/crowd-paths.txt" || echo '?') manifest paths (thread k starts at path k×N/2). Window on the plot: t=${crowd_start_ms:-?} to ${crowd_end_ms:-?} ms."
    echo
    echo "- wrk: ${crowd_result:-no RESULT line}"
    echo "- answers that were 503: $(awk -v a="$(lt_kv status_503 "$crowd_result")" -v n="$(lt_kv requests "$crowd_result")" 'BEGIN { if (n > 0) printf "%.1f%%", 100 * a / n; else print "?" }') (a 503 is a few hundred bytes and answered at once, a 200 streams up to 16 MB, so the count is weighted towards 503s); samples at critical or emergency: $(awk '$5 == "critical" || $5 == "emergency" {n++} END {print n + 0}' "$samples" 2>/dev/null || echo '?') of ${S_probes:-?} (100 ms each)"
    echo "- rps $(awk -v n="$(lt_kv requests "$crowd_result")" -v s="$(lt_kv seconds "$crowd_result")" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "?" }'), $(awk -v b="$(lt_kv bytes "$crowd_result")" -v s="$(lt_kv seconds "$crowd_result")" 'BEGIN { if (s > 0) printf "%.0f MiB/s", b / s / 1048576; else print "?" }'); latency p50 $(lt_kv p50_ms "$crowd_result") ms, p99 $(lt_kv p99_ms "$crowd_result") ms, max $(lt_kv max_ms "$crowd_result") ms"
    echo "- imgedge /metrics after the crowd + ${after_secs} s: requests ${metric_after[requests]:-?}; shed ${metric_after[shed]:-?}; upstream fetches ${metric_after[upstream]:-?}; collapsed ${metric_after[collapsed]:-?}; memory-tier hits ${metric_after[hits]:-?}, misses ${metric_after[misses]:-?}; level transitions: ${metric_after[transitions]:-none}"
    echo "- wrk's \`response()\` callback makes it buffer every body it reads (up to 16 MB each): the client uses more CPU than a plain wrk run, on the same 2 CPUs."
    echo
    echo "### /health during the crowd and the ${after_secs} s after"
    echo
    echo "- probes: ${S_probes:-0} (one per 100 ms tick), unanswered (curl failed or timed out, status 000): ${S_probe_failures:-?}${S_first_failure_ms:+ (first at t=$S_first_failure_ms ms, last at t=$S_last_failure_ms ms)}, answered 503 (critical): ${S_probe_503:-?}"
    echo "- latency: p50 ${S_probe_p50_ms:-?} ms, p99 ${S_probe_p99_ms:-?} ms, max ${S_probe_max_ms:-?} ms (at t=${S_probe_max_t:-?} ms)"
    echo "- levels seen (samples, first time): ${S_levels:-?}"
    echo
    echo "### After the crowd"
    echo
    echo "| after crowd end | +0 s | +5 s | +10 s | +15 s | +20 s | +${after_secs} s |"
    echo "|---|--:|--:|--:|--:|--:|--:|"
    if [[ -n $crowd_end_ms && -s $samples ]]; then
      echo "| RSS MiB | $(mibf "$(rss_at 0)") | $(mibf "$(rss_at 5000)") | $(mibf "$(rss_at 10000)") | $(mibf "$(rss_at 15000)") | $(mibf "$(rss_at 20000)") | $(mibf "$(rss_at $((after_secs * 1000)))") |"
    fi
    echo
    echo "At crowd end + ${after_secs} s: RSS $(mibf "$rss_after_kb") MiB (VmRSS read with /health), memory tier ${tier_entries_after:-?} entries, ${tier_bytes_after:-?} bytes ($(bmibf "$tier_bytes_after") MiB); target 40 MiB + tier = $(mibf "$after_target_kb") MiB. RSS stayed under that target from $(if [[ -n $after_target_kb && -n $crowd_end_ms ]]; then r=$(recovered_at "$after_target_kb"); [[ -n $r ]] && echo "crowd end + $(awk -v r="$r" 'BEGIN {printf "%.1f", r / 1000}') s" || echo "(never within the window)"; else echo "?"; fi) on. /health then: \`${health_after:-?}\`."
    echo
    echo "![RSS over time]($(basename "$svg"))"
    echo
    echo "## ${hits_target} hits"
    echo
    if ((hits_target > 0)); then
      echo "$hits_set_n images ≤ 1 MiB ($(bmibf "$hits_set_bytes") MiB together, spread over the ≤ 1 MiB sizes), each fetched twice to warm (second answer checked to be a memory hit), then \`wrk -t$hits_threads -c$hits_conns --timeout 30s\`: a 5 s pilot (${hits_pilot_rps:-?} rps), then runs sized to reach $hits_target requests, at most ${hits_max_s} s of wrk in all.${hits_note:+ $hits_note}"
      echo
      echo "- requests: $hits_total in ${hits_wrk_s} s of wrk; memory-tier hits counted by imgedge over the phase: ${hits_metric_delta:-?}"
      echo "- RSS before the pilot (after warming): $(mibf "$hits_rss_before_kb") MiB; right after the last run: $(mibf "$hits_rss_after_kb") MiB; 5 s later: $(mibf "$hits_rss_settled_kb") MiB"
      echo "- memory tier: $(bmibf "$hits_tier_before") MiB before, $(bmibf "$hits_tier_after") MiB after (${hits_tier_before:-?} → ${hits_tier_after:-?} bytes)"
      echo "- RSS through the phase (each run's start and end, MiB): ${hits_trace:-?}"
      echo "- sampler through the phase (100 ms, \`$hits_samples\`, t on the crowd's clock, the phase from t=$(awk -v t="${hits_t0_ms:-0}" 'BEGIN {printf "%.1f", t / 1000}') s): ${hits_stats:-?}"
      echo "- imgedge /metrics over the phase: memory-tier misses ${hits_delta_misses:-?}, upstream fetches ${hits_delta_upstream:-?}, collapsed ${hits_delta_collapsed:-?}, shed ${hits_delta_shed:-?}; /image-proxy answers by status: ${hits_delta_status:-?}"
      echo "- imgedge log lines written during the phase: ${hits_log_lines:-?}"
      echo "- stricter reading: RSS after the hits minus idle RSS is $(awk -v a="${hits_rss_after_kb:-0}" -v b="${idle_rss_kb:-0}" 'BEGIN {printf "%.1f", (a - b) / 1024}') MiB against $(bmibf "$hits_tier_after") MiB in the tier (5 s later $(awk -v a="${hits_rss_settled_kb:-0}" -v b="${idle_rss_kb:-0}" 'BEGIN {printf "%.1f", (a - b) / 1024}') MiB); the process had served the crowd first, so this includes what the crowd left behind."
      echo
      echo '```'
      for l in "${hits_result_lines[@]}"; do echo "$l"; done
      echo '```'
    else
      echo "Not run (FC_HITS=0)."
    fi
    echo
    echo "## imgedge log (level warn)"
    echo
    if [[ -s $ilog ]]; then
      echo "$(lt_strip_ansi <"$ilog" | grep -cE '(^| )WARN ' || true) WARN, $(lt_strip_ansi <"$ilog" | grep -cE '(^| )ERROR ' || true) ERROR, $(grep -ci 'panick' "$ilog" || true) panic lines; first 40:"
      echo
      echo '```'
      lt_strip_ansi <"$ilog" | sed -n 1,40p
      echo '```'
    else
      echo "Empty: no warnings, errors or panics."
    fi
    echo
    echo "## Commands"
    echo
    echo '```sh'
    echo "$cmdline"
    echo "# origin:"
    echo "bash loadtest/peers.sh start $CORPUS"
    echo "# imgedge:"
    echo "${cmd_imgedge:-?}"
    echo "# the crowd (PATHS: one /image-proxy?url=$origin/NAME line per manifest image):"
    echo "${cmd_crowd:-?}"
    echo "# hits phase:"
    for l in "${cmd_hits[@]}"; do echo "$l"; done
    echo "# plot:"
    echo "python3 loadtest/flashcrowd_plot.py --samples $samples --crowd-start ${crowd_start_ms:-?} --crowd-end ${crowd_end_ms:-?} --after-target-mib $(mibf "$after_target_kb") --hwm-mib $(mibf "$hwm_kb") --out $svg"
    echo '```'
    echo
    if [[ -n $status ]]; then
      echo "Overall: incomplete run, see the status line at the top."
    else
      echo "Overall: $( ((all)) && echo "every target met" || echo "**a target was missed** (see Targets)")."
    fi
  } >"$tmp"
  mv "$tmp" "$report"
  return 0
}

# ---- cleanup: wrk, the sampler, imgedge (by PID), then the peers ----
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n $wrk_pid ]] && { lt_stop "$wrk_pid"; wrk_pid=; }
  stop_sampler
  if ((!finished && imgedge_started)); then
    write_report "INCOMPLETE: the run stopped early (exit status $rc)" || true
    log "incomplete report: $report"
  fi
  [[ -n $imgedge_pid ]] && { lt_stop "$imgedge_pid"; imgedge_pid=; }
  if ((peers_started)); then
    bash "$here/peers.sh" stop >&2 || true
    lt_wait_peer_ports_free || log "ports 18080-18082 still busy 10 s after peers.sh stop"
  fi
  log "logs: $logdir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- 1. tools and binary ----
if ! command -v wrk >/dev/null; then
  log "installing wrk"
  if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }; then
    die "cannot install wrk"
  fi
fi
lt_release_bin "$logdir"

# ---- 2. origin (peers.sh) ----
peers_started=1
lt_peers_start "$CORPUS"
[[ -s $manifest ]] || die "no corpus manifest at $manifest"
first_name=$(sed -n 1p "$manifest" | cut -f1)
curl -fsS -m 10 -o /dev/null "$origin/$first_name" || die "the origin does not serve $origin/$first_name"

# ---- 3. imgedge ----
port=$(free_port)
base=http://127.0.0.1:$port
export IMGEDGE_SERVER__LISTEN=127.0.0.1:$port
export IMGEDGE_UPSTREAM__ALLOWED_HOSTS='["127.0.0.1:18080"]'
export IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS='["127.0.0.1:18080"]'
export IMGEDGE_MEMORY__BUDGET_BYTES=$budget
export IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=$tier_cap
export IMGEDGE_MEMORY__SAMPLE_INTERVAL=100ms
export IMGEDGE_LOG__LEVEL=warn
cmd_imgedge="IMGEDGE_SERVER__LISTEN=127.0.0.1:$port IMGEDGE_UPSTREAM__ALLOWED_HOSTS='[\"127.0.0.1:18080\"]' IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS='[\"127.0.0.1:18080\"]' IMGEDGE_MEMORY__BUDGET_BYTES=$budget IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=$tier_cap IMGEDGE_MEMORY__SAMPLE_INTERVAL=100ms IMGEDGE_LOG__LEVEL=warn $run_bin"
log "starting imgedge on 127.0.0.1:$port (log: $ilog)"
"$run_bin" >"$ilog" 2>&1 &
imgedge_pid=$!
imgedge_started=1
for ((i = 0; i < 200; i++)); do
  curl -fsS -o /dev/null -m 2 "$base/health" 2>/dev/null && break
  kill -0 "$imgedge_pid" 2>/dev/null || { wait "$imgedge_pid" 2>/dev/null || true; imgedge_pid=; tail -20 "$ilog" >&2; die "imgedge exited during start-up"; }
  sleep 0.1
done
((i < 200)) || { tail -20 "$ilog" >&2; die "imgedge did not answer /health within 20 s"; }
sleep 2
idle_rss_kb=$(rss_kb "$imgedge_pid")
[[ -n $idle_rss_kb ]] || die "imgedge exited"
log "imgedge up, pid $imgedge_pid, idle RSS $(mibf "$idle_rss_kb") MiB"

# ---- 4.-5. sampler and the crowd ----
awk -F'\t' -v o="$origin" 'NF >= 2 {print "/image-proxy?url=" o "/" $1}' "$manifest" >"$logdir/crowd-paths.txt"
: >"$samples"
rm -f "$stopfile"
t0_us=$(now_us)
sampler $((2 + crowd_secs + 65 + after_secs + 30)) &
sampler_pid=$!
sleep 2
crowd_start_ms=$(rel_ms)
cmd_crowd="PATHS=$logdir/crowd-paths.txt WRK_THREADS=$crowd_threads wrk -t$crowd_threads -c$crowd_conns -d${crowd_secs}s --timeout 30s -s loadtest/flashcrowd.lua $base"
log "crowd: $cmd_crowd"
run_wrk "$logdir/crowd.wrk.txt" "$crowd_secs" "$crowd_conns" "$crowd_threads" "$logdir/crowd-paths.txt"
wait_wrk || log "wrk exited with status $? (see $logdir/crowd.wrk.txt)"
crowd_end_ms=$(rel_ms)
crowd_result=$(grep '^RESULT' "$logdir/crowd.wrk.txt" | sed 's/^RESULT //') || true
[[ -n $crowd_result ]] || { cat "$logdir/crowd.wrk.txt" >&2; die "no RESULT line from wrk"; }
log "crowd: $crowd_result"
kill -0 "$imgedge_pid" 2>/dev/null || { imgedge_pid=; die "imgedge exited during the crowd"; }
log "sampling ${after_secs} s more"
while (($(rel_ms) < crowd_end_ms + after_secs * 1000)); do sleep 0.1; done
after_ms=$(rel_ms)
rss_after_kb=$(rss_kb "$imgedge_pid")
health_json || true
tier_bytes_after=$(json_get "$logdir/health.json" cache.memory.bytes)
tier_entries_after=$(json_get "$logdir/health.json" cache.memory.entries)
health_after=$(tr -d '\n' <"$logdir/health.json" 2>/dev/null | cut -c1-600)
hwm_kb=$(status_kb "$imgedge_pid" VmHWM)
stop_sampler
metric_after[requests]=$(metrics_series imgedge_requests_total)
metric_after[shed]=$(metrics_sum imgedge_shed_total)
metric_after[upstream]=$(metrics_series imgedge_upstream_requests_total)
metric_after[collapsed]=$(metrics_sum imgedge_collapsed_total)
metric_after[hits]=$(metrics_sum imgedge_cache_requests_total 'result="hit"')
metric_after[misses]=$(metrics_sum imgedge_cache_requests_total 'result="miss"')
metric_after[transitions]=$(metrics_series imgedge_memory_pressure_transitions_total)
log "crowd end + ${after_secs} s: RSS $(mibf "$rss_after_kb") MiB, tier ${tier_bytes_after:-?} bytes, VmHWM $(mibf "$hwm_kb") MiB"

# ---- 6. hits ----
if ((hits_target > 0)); then
  # hits_images images <= 1 MiB, evenly spread over their sizes
  awk -F'\t' '$2 <= 1048576 {print $2 "\t" $1}' "$manifest" | sort -n |
    awk -F'\t' -v k="$hits_images" '{s[NR] = $0} END { if (NR < k) k = NR; for (i = 0; i < k; i++) print s[int(i * NR / k) + 1] }' >"$logdir/hits-set.tsv"
  hits_set_n=$(wc -l <"$logdir/hits-set.tsv")
  hits_set_bytes=$(awk -F'\t' '{s += $1} END {print s + 0}' "$logdir/hits-set.tsv")
  awk -F'\t' -v o="$origin" '{print "/image-proxy?url=" o "/" $2}' "$logdir/hits-set.tsv" >"$logdir/hits-paths.txt"
  log "hits: warming $hits_set_n images ($(bmibf "$hits_set_bytes") MiB)"
  while read -r p; do
    curl -sS -m 30 -o /dev/null "$base$p" || true
    cs=$(curl -sS -m 30 -o /dev/null -D - "$base$p" 2>/dev/null | tr -d '\r' | awk -F': ' 'tolower($1) == "cache-status" {print $2}') || true
    [[ $cs == *hit* ]] || hits_note+="${hits_note:+ }Warm: ${p##*/} answered \`${cs:-no Cache-Status}\` on its second fetch."
  done <"$logdir/hits-paths.txt"
  sleep 1
  hits_rss_before_kb=$(rss_kb "$imgedge_pid")
  health_json || true
  hits_tier_before=$(json_get "$logdir/health.json" cache.memory.bytes)
  hm0=$(metrics_sum imgedge_cache_requests_total 'result="hit"')
  hmiss0=$(metrics_sum imgedge_cache_requests_total 'result="miss"')
  hup0=$(metrics_sum imgedge_upstream_requests_total)
  hcol0=$(metrics_sum imgedge_collapsed_total)
  hshed0=$(metrics_sum imgedge_shed_total)
  h200_0=$(metrics_sum imgedge_requests_total 'route="image-proxy",status="200"')
  hall0=$(metrics_sum imgedge_requests_total 'route="image-proxy"')
  hlog0=$(wc -l <"$ilog")
  sample_out=$hits_samples
  : >"$sample_out"
  rm -f "$stopfile"
  hits_t0_ms=$(rel_ms)
  sampler $((hits_max_s + 120)) &
  sampler_pid=$!
  hits_trace="$(mibf "$hits_rss_before_kb")"
  run=0 secs=5
  while :; do
    run=$((run + 1))
    cmd_hits+=("PATHS=$logdir/hits-paths.txt WRK_THREADS=$hits_threads wrk -t$hits_threads -c$hits_conns -d${secs}s --timeout 30s -s loadtest/flashcrowd.lua $base")
    log "hits run $run: ${secs} s (so far $hits_total requests)"
    run_wrk "$logdir/hits-$run.wrk.txt" "$secs" "$hits_conns" "$hits_threads" "$logdir/hits-paths.txt"
    wait_wrk || log "wrk exited with status $? (see $logdir/hits-$run.wrk.txt)"
    r=$(grep '^RESULT' "$logdir/hits-$run.wrk.txt" | sed 's/^RESULT //') || true
    [[ -n $r ]] || { cat "$logdir/hits-$run.wrk.txt" >&2; die "no RESULT line from wrk (hits run $run)"; }
    kill -0 "$imgedge_pid" 2>/dev/null || { imgedge_pid=; die "imgedge exited during the hits phase"; }
    hits_result_lines+=("run $run (${secs} s): $r")
    hits_total=$((hits_total + $(lt_kv requests "$r")))
    hits_wrk_s=$((hits_wrk_s + secs))
    hits_trace+=" → $(mibf "$(rss_kb "$imgedge_pid")")"
    rps=$(awk -v n="$(lt_kv requests "$r")" -v s="$(lt_kv seconds "$r")" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print 0 }')
    ((run == 1)) && hits_pilot_rps=$rps
    ((hits_total < hits_target)) || break
    left=$((hits_max_s - hits_wrk_s))
    if ((left < 1)); then
      hits_note+="${hits_note:+ }Stopped at the ${hits_max_s} s cap with $hits_total of $hits_target requests."
      break
    fi
    ((rps > 0)) || die "hits run $run answered nothing"
    secs=$(awk -v n=$((hits_target - hits_total)) -v r="$rps" 'BEGIN { s = int(n / r * 1.1) + 2; print s }')
    ((secs <= left)) || secs=$left
  done
  hits_rss_after_kb=$(rss_kb "$imgedge_pid")
  health_json || true
  hits_tier_after=$(json_get "$logdir/health.json" cache.memory.bytes)
  hits_metric_delta=$(($(metrics_sum imgedge_cache_requests_total 'result="hit"') - hm0))
  hits_delta_misses=$(($(metrics_sum imgedge_cache_requests_total 'result="miss"') - hmiss0))
  hits_delta_upstream=$(($(metrics_sum imgedge_upstream_requests_total) - hup0))
  hits_delta_collapsed=$(($(metrics_sum imgedge_collapsed_total) - hcol0))
  hits_delta_shed=$(($(metrics_sum imgedge_shed_total) - hshed0))
  h200=$(($(metrics_sum imgedge_requests_total 'route="image-proxy",status="200"') - h200_0))
  hits_delta_status="200: $h200, other: $(($(metrics_sum imgedge_requests_total 'route="image-proxy"') - hall0 - h200))"
  stop_sampler
  hits_stats=$(phase_stats "$hits_samples")
  hits_log_lines="$(tail -n +"$((hlog0 + 1))" "$ilog" | wc -l) (level changes: $(tail -n +"$((hlog0 + 1))" "$ilog" | lt_strip_ansi | grep -c 'level changed' || true))"
  sleep 5
  hits_rss_settled_kb=$(rss_kb "$imgedge_pid")
  log "hits: $hits_total requests; RSS $(mibf "$hits_rss_before_kb") -> $(mibf "$hits_rss_after_kb") MiB (5 s later $(mibf "$hits_rss_settled_kb")); tier $hits_tier_before -> $hits_tier_after bytes"
fi

# ---- 7. plot and report ----
evaluate
python3 "$here/flashcrowd_plot.py" --samples "$samples" --crowd-start "$crowd_start_ms" --crowd-end "$crowd_end_ms" \
  --budget-mib 128 --after-target-mib "$(mibf "$after_target_kb")" --hwm-mib "$(mibf "$hwm_kb")" --out "$svg" \
  --title "imgedge flash crowd $stamp: $crowd_conns connections, cold, budget 128 MiB, tier 48 MiB" ||
  log "plot failed"
write_report
finished=1
cat "$report"
log "report: $report"
log "plot: $svg"
for k in idle peak status errors health after; do [[ ${pass[$k]} == 1 ]] || exit 3; done
if ((hits_target > 0)) && [[ ${pass[hits]} != 1 ]]; then exit 3; fi
exit 0
