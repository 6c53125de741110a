#!/usr/bin/env bash
# Side-by-side benchmark of imgedge against nginx proxy_cache and Varnish, on the same machine and
# corpus, with loadtest/peers.sh (starts the origin and the two peers; loadtest/corpus.sh builds the
# corpus when it is missing) and loadtest/lib/load.sh (runs one wrk scenario against one target and
# measures the target's own CPU and RSS).
# Everything listens on and talks to 127.0.0.1 only.
#
# Usage (from anywhere):  bash loadtest/bench.sh [SCENARIO...]
#   SCENARIO  hits-small | hits-mixed | large | supabase
#             (default: hits-small large supabase hits-mixed)
#
# For each scenario the targets run one after another, never concurrently: nginx (:18081),
# varnish (:18082), imgedge (:18083), each measured over all of its processes.
#
# Env:
#   SECONDS_RUN    seconds of load per target per scenario (default 10)       } passed to
#   CONNS          wrk connections (load.sh default: 64, and 16 for `large`)  } load.sh
#   CORPUS         image corpus with MANIFEST.tsv (default /tmp/imgproxy-corpus)
#   EDGE_BIN    imgedge binary to run; unset = `cargo build --release --quiet`, then
#                  ${CARGO_TARGET_DIR:-target}/release/imgedge
#   IMGEDGE_*      any imgedge configuration override (e.g. IMGEDGE_LOG__LEVEL=info); wins over
#                  the bench defaults: SERVER__LISTEN=127.0.0.1:18083,
#                  UPSTREAM__ALLOWED_HOSTS and UPSTREAM__TRUSTED_PRIVATE_HOSTS=["127.0.0.1:18080"], SUPABASE__UPSTREAM=
#                  http://127.0.0.1:18080, CACHE__MEMORY_CAPACITY_BYTES=1073741824, LOG__LEVEL=warn
#   BENCH_TARGETS  targets and their order (default "nginx varnish imgedge")
#   BENCH_LOG_DIR  where imgedge's log and the copy of the binary that runs go (default a new
#                  /tmp/imgedge-bench.XXXXXX; kept, about 55 MB)
#
# After each target's run every path of the scenario is fetched once more and checked (status, size,
# sha256) against the manifest: the report shows it as `verified`, and the exit status is 3 when a
# target served a wrong body.
# Writes loadtest/reports/bench-<UTC date-time>.md and prints it. imgedge (by its PID) and the
# peers (peers.sh stop) are stopped on exit, also on failure or Ctrl-C; a run that fails part way
# still writes its report, marked INCOMPLETE.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
me=bench.sh
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
. "$here/lib/lib.sh"

# ---- the command exactly as given (before any default is applied) ----
cmdline=$(lt_cmdline '^(IMGEDGE_[A-Z0-9_]+|SECONDS_RUN|CONNS|CORPUS|CARGO_TARGET_DIR|BENCH_[A-Z_]+)=' "$@")

# ---- arguments and knobs ----
scenarios=("$@")
((${#scenarios[@]})) || scenarios=(hits-small large supabase hits-mixed)
for s in "${scenarios[@]}"; do
  case $s in hits-small | hits-mixed | large | supabase) ;; *) die "unknown scenario '$s' (hits-small hits-mixed large supabase)" ;; esac
done
read -r -a targets <<<"${BENCH_TARGETS:-nginx varnish imgedge}"
for t in "${targets[@]}"; do
  case $t in nginx | varnish | imgedge) ;; *) die "unknown target '$t' in BENCH_TARGETS (nginx varnish imgedge)" ;; esac
done
[[ -z ${BENCH_TOOLS:-} ]] || log "BENCH_TOOLS is ignored: the tools are loadtest/peers.sh and loadtest/lib/load.sh"
export SECONDS_RUN=${SECONDS_RUN:-10}
export CORPUS=${CORPUS:-/tmp/imgproxy-corpus}
manifest=$CORPUS/MANIFEST.tsv
peers_run=/tmp/imgproxy-peers # fixed in peers.sh

def_allowed='["127.0.0.1:18080"]'
export IMGEDGE_SERVER__LISTEN=${IMGEDGE_SERVER__LISTEN:-127.0.0.1:18083}
export IMGEDGE_UPSTREAM__ALLOWED_HOSTS=${IMGEDGE_UPSTREAM__ALLOWED_HOSTS:-$def_allowed}
export IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS=${IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS:-$def_allowed}
export IMGEDGE_SUPABASE__UPSTREAM=${IMGEDGE_SUPABASE__UPSTREAM:-http://127.0.0.1:18080}
export IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=${IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES:-1073741824}
export IMGEDGE_LOG__LEVEL=${IMGEDGE_LOG__LEVEL:-warn}
listen=$IMGEDGE_SERVER__LISTEN
[[ $listen == 0.0.0.0:* ]] && listen=127.0.0.1:${listen#0.0.0.0:}
declare -A base=([nginx]=http://127.0.0.1:18081 [varnish]=http://127.0.0.1:18082 [imgedge]=http://$listen)

stamp=$(date -u +%Y%m%dT%H%M%SZ)
started_at=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
reports=${REPORT_DIR:-$here/reports}
report=$reports/bench-$stamp.md
mkdir -p "$reports"
logdir=${BENCH_LOG_DIR:-$(mktemp -d /tmp/imgedge-bench.XXXXXX)}
mkdir -p "$logdir"
ilog=$logdir/imgedge.log
load1_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- results ----
declare -A line note cache load1 detail
imgedge_pid='' peers_started=0 finished=0 idle_rss_kb='' health_version='' bin_version=''
bin_source='' bin_sha='' run_bin=''
declare -A verified
log_warn_total=0

# ---- cleanup: imgedge by PID, then the peers; always ----
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $imgedge_pid ]]; then
    lt_stop "$imgedge_pid"
    imgedge_pid=
  fi
  if ((peers_started)); then
    bash "$here/peers.sh" stop >&2 || true
    lt_wait_peer_ports_free || log "ports 18080-18082 still busy 10 s after peers.sh stop"
  fi
  if ((!finished && peers_started)); then
    write_report "INCOMPLETE: the run stopped early (exit status $rc)" || true
    log "incomplete report written to $report"
  fi
  log "imgedge log: $ilog"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers ----
ratio() { # a b -> a/b with 2 decimals, or n/a
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'
}
target_pids() { # target -> all of its PIDs, space-separated
  local m
  case $1 in
    imgedge) echo "$imgedge_pid" ;;
    nginx | varnish)
      m=$(cat "$peers_run/$1.pid" 2>/dev/null) || return 1
      kill -0 "$m" 2>/dev/null || return 1
      # shellcheck disable=SC2046
      echo "$m" $(pgrep -P "$m")
      ;;
  esac
}
scenario_rows() { # scenario -> "path<TAB>bytes<TAB>sha256" lines, the same selection as load.sh
  case $1 in
    hits-small) awk -F'\t' -v o="http://127.0.0.1:18080" '$2 <= 1048576 {print "/image-proxy?url=" o "/" $1 "\t" $2 "\t" $4}' "$manifest" ;;
    hits-mixed) awk -F'\t' -v o="http://127.0.0.1:18080" '$2 <= 5242880 {print "/image-proxy?url=" o "/" $1 "\t" $2 "\t" $4}' "$manifest" ;;
    large) awk -F'\t' -v o="http://127.0.0.1:18080" '$2 > 5242880 {print "/image-proxy?url=" o "/" $1 "\t" $2 "\t" $4}' "$manifest" ;;
    supabase) awk -F'\t' '$2 <= 5242880 {print "/storage/v1/object/public/wallpapers/" $1 "\t" $2 "\t" $4}' "$manifest" ;;
  esac
}
samples() { # scenario -> first, middle and last row of the scenario's paths
  local rows n
  rows=$(scenario_rows "$1")
  n=$(wc -l <<<"$rows")
  awk -v n="$n" 'NR == 1 || NR == int((n + 1) / 2) || NR == n' <<<"$rows"
}
precheck() { # target scenario -> "" when the sample paths come back 200 and byte-exact, else why not
  local t=$1 s=$2 p size sha got code bytes out bad=""
  out=$(mktemp)
  while IFS=$'\t' read -r p size sha; do
    got=$(curl -sS --max-time 60 -o "$out" -w '%{http_code} %{size_download}' "${base[$t]}$p" 2>&1) || got="curl-failed($got)"
    read -r code bytes <<<"$got"
    if [[ $code != 200 ]]; then
      bad+="${bad:+; }$p -> HTTP ${code:-?}"
    elif [[ $bytes != "$size" ]] || [[ $(sha256sum <"$out" | cut -d' ' -f1) != "$sha" ]]; then
      bad+="${bad:+; }$p -> 200 but $bytes bytes / wrong sha256 (want $size)"
    fi
  done < <(samples "$s")
  rm -f "$out"
  printf '%s' "$bad"
}
cache_header() { # target path -> the target's cache header for one more request of path
  local h
  h=$(curl -sS --max-time 60 -o /dev/null -D - "$1$2" 2>/dev/null | tr -d '\r') || true
  case $3 in
    imgedge) h=$(grep -i '^cache-status:' <<<"$h" | sed 's/^[^:]*: *//; s/^imgedge; //') ;;
    *) h=$(grep -i '^x-cache:' <<<"$h" | sed 's/^[^:]*: *//') ;;
  esac
  printf '%s' "${h:-(none)}"
}
verify_all() { # target scenario -> "ok/total" after fetching every path of the scenario once more
  # (hits by now) and comparing status, size and sha256 with the manifest, then up to 3 failures
  local t=$1 s=$2 p size sha got code bytes out ok=0 n=0 bad=""
  out=$(mktemp)
  while IFS=$'\t' read -r p size sha; do
    n=$((n + 1))
    got=$(curl -sS --max-time 60 -o "$out" -w '%{http_code} %{size_download}' "${base[$t]}$p" 2>/dev/null) || got="curl-failed 0"
    read -r code bytes <<<"$got"
    if [[ $code == 200 && $bytes == "$size" && $(sha256sum <"$out" | cut -d' ' -f1) == "$sha" ]]; then
      ok=$((ok + 1))
    elif ((n - ok <= 3)); then
      bad+="; ${p##*/} -> HTTP $code, $bytes of $size bytes"
    fi
  done < <(scenario_rows "$s")
  rm -f "$out"
  printf '%s/%s%s' "$ok" "$n" "$bad"
}
metrics_sum() { lt_metrics_sum "${base[imgedge]}" "$@"; }
write_report() { # [status line]
  local status=${1:-} s t l r tmp nginx_v varnish_v wrk_v rev dirty
  # (sed -n 1p, not head -1, reads to the end: no SIGPIPE under pipefail)
  nginx_v=$( (nginx -v 2>&1 || true) | sed -n 1p)
  varnish_v=$( (varnishd -V 2>&1 || true) | sed -n 1p)
  wrk_v=$( (wrk -v 2>&1 || true) | sed -n 1p)
  rev=$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$root" status --porcelain -- src tests Cargo.toml Cargo.lock config build.rs 2>/dev/null | awk '{print $2}' | tr '\n' ' ')
  tmp=$(mktemp)
  {
    echo "# imgedge vs nginx proxy_cache vs Varnish: $stamp"
    echo
    [[ -n $status ]] && { echo "**$status**"; echo; }
    for k in "${!verified[@]}"; do
      [[ ${verified[$k]%/*} == "${verified[$k]#*/}" ]] && continue
      echo "**WARNING: a target served wrong bodies after the load (see \`verified\` and the notes);" \
        "its figures do not measure a working cache.**"
      echo
      break
    done
    echo "Command: \`$cmdline\`"
    echo
    echo "Started $started_at, finished $(date -u '+%Y-%m-%d %H:%M:%S UTC')."
    echo
    echo "## Machine"
    echo
    echo "- CPUs: $(nproc) ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo))"
    echo "- memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -sr)"
    echo "- load average at start: $load1_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)" \
      "(the load generator, the origin and every target share these CPUs)"
    echo
    echo "## Versions"
    echo
    echo "- imgedge: ${bin_source:-?}; binary \`$EDGE_BIN\`, sha256 ${bin_sha:-?}" \
      "(${bin_version:-?}, /health version ${health_version:-?}, modified $(date -u -r "$EDGE_BIN" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || echo '?'))"
    echo "- repository at report time: git $rev${dirty:+, uncommitted changes in: $dirty}"
    echo "- nginx: $nginx_v"
    echo "- varnish: $varnish_v"
    echo "- wrk: $wrk_v"
    echo
    echo "## Knobs"
    echo
    echo "- SECONDS_RUN=$SECONDS_RUN (per target per scenario)"
    echo "- CONNS=${CONNS:-unset (load.sh: 64, and 16 for large)}"
    echo "- CORPUS=$CORPUS ($(wc -l <"$manifest") images, $(awk -F'\t' '{s += $2} END {printf "%.0f MiB", s / 1048576}' "$manifest"))"
    # shellcheck disable=SC2016 # literal backticks
    echo "- imgedge env: $(env | grep '^IMGEDGE_' | sort | sed 's/^/`/; s/$/`/' | tr '\n' ' ')"
    echo "- imgedge idle RSS right after start: $(awk -v k="$idle_rss_kb" 'BEGIN { if (k == "") print "?"; else printf "%.1f MB", k / 1024 }')"
    echo "- imgedge log: \`$ilog\` (WARN/ERROR lines: $log_warn_total)"
    echo
    echo "## Results"
    echo
    echo "One line of \`load.sh\` per target; CPU µs/req and RSS are the target's own processes" \
      "(nginx: master + workers + cache manager/loader, which also serve the origin on :18080;" \
      "varnish: manager + child; imgedge: its one process). \`cache\` is the target's cache header" \
      "on one more request of the scenario's first path after the load; \`verified\` counts the" \
      "scenario's paths that, fetched once more after the load, came back 200 with the manifest's" \
      "size and sha256 (hits by then, so a cache that stores a wrong body shows here; wrk checks" \
      "neither). \`load1\` is the 1-minute" \
      "load average just before the target's run."
    for s in "${scenarios[@]}"; do
      echo
      echo "### $s"
      echo
      echo "| target | rps | MB/s | p50 ms | p99 ms | errors | CPU µs/req | peak RSS MB | start RSS MB | cache | verified | load1 | note |"
      echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|---|"
      for t in "${targets[@]}"; do
        l=${line[$s,$t]:-}
        if [[ -z $l ]]; then
          echo "| $t | | | | | | | | | ${cache[$s,$t]:-} | ${verified[$s,$t]:-} | ${load1[$s,$t]:-} | ${note[$s,$t]:-not run} |"
          continue
        fi
        echo "| $t | $(lt_kv rps "$l") | $(lt_kv MBps "$l") | $(lt_kv p50_ms "$l") | $(lt_kv p99_ms "$l") | $(lt_kv errors "$l")" \
          "| $(lt_kv cpu_us_per_req "$l") | $(lt_kv peak_rss_mb "$l") | $(lt_kv start_rss_mb "$l") | ${cache[$s,$t]:-}" \
          "| ${verified[$s,$t]:-} | ${load1[$s,$t]:-} | ${note[$s,$t]:-} |"
      done
      [[ -n ${detail[$s]:-} ]] && { echo; echo "imgedge, from its /metrics and log over the whole load.sh run (warm pass + load): ${detail[$s]}"; }
    done
    echo
    echo "## Ratios"
    echo
    echo "| scenario | imgedge / varnish CPU µs/req | imgedge / varnish rps | imgedge / nginx CPU µs/req | imgedge / nginx rps |"
    echo "|---|--:|--:|--:|--:|"
    for s in "${scenarios[@]}"; do
      r="| $s"
      r+=" | $(ratio "$(lt_kv cpu_us_per_req "${line[$s,imgedge]:-}")" "$(lt_kv cpu_us_per_req "${line[$s,varnish]:-}")")"
      r+=" | $(ratio "$(lt_kv rps "${line[$s,imgedge]:-}")" "$(lt_kv rps "${line[$s,varnish]:-}")")"
      r+=" | $(ratio "$(lt_kv cpu_us_per_req "${line[$s,imgedge]:-}")" "$(lt_kv cpu_us_per_req "${line[$s,nginx]:-}")")"
      r+=" | $(ratio "$(lt_kv rps "${line[$s,imgedge]:-}")" "$(lt_kv rps "${line[$s,nginx]:-}")") |"
      echo "$r"
    done
    echo
    if [[ -n ${line[large,imgedge]:-} ]]; then
      echo "imgedge peak RSS on \`large\`: **$(lt_kv peak_rss_mb "${line[large,imgedge]}") MB**" \
        "(start of the load $(lt_kv start_rss_mb "${line[large,imgedge]}") MB;" \
        "varnish $(lt_kv peak_rss_mb "${line[large,varnish]:-}") MB, nginx $(lt_kv peak_rss_mb "${line[large,nginx]:-}") MB)."
    else
      echo "imgedge peak RSS on \`large\`: not measured in this run."
    fi
    echo
    echo "Below 1 is better for imgedge in the CPU columns, above 1 in the rps columns. Caveats: on" \
      "\`large\` (objects over 5 MiB) imgedge and Varnish do not store and fetch every request from" \
      "the origin, whose CPU is not counted for them, while nginx stores everything on disk and" \
      "serves hits; on every scenario wrk shares the machine, so rps follows the CPU left over."
    echo
    echo "## Raw load.sh lines"
    echo
    echo '```'
    for s in "${scenarios[@]}"; do
      for t in "${targets[@]}"; do [[ -n ${line[$s,$t]:-} ]] && echo "${line[$s,$t]}"; done
    done
    echo '```'
    if [[ -s $ilog ]]; then
      echo
      echo "## imgedge WARN/ERROR log lines (first 30)"
      echo
      echo '```'
      lt_strip_ansi <"$ilog" | grep -E '(^| )(WARN|ERROR) ' | sed -n 1,30p || true
      echo '```'
    fi
  } >"$tmp"
  mv "$tmp" "$report"
}

# ---- 1. build ----
[[ -s $manifest ]] || log "no $manifest yet: peers.sh will build the corpus"
lt_release_bin "$logdir"

# ---- 2. peers ----
peers_started=1
lt_peers_start "$CORPUS"
[[ -s $manifest ]] || die "no corpus manifest at $manifest"
for t in nginx varnish; do target_pids "$t" >/dev/null || die "$t is not running after peers.sh start"; done

# ---- 3. imgedge ----
if curl -s -o /dev/null --max-time 2 "${base[imgedge]}/health"; then
  die "something already answers on ${base[imgedge]}: stop it first (this script measures only the imgedge it starts)"
fi
log "starting $EDGE_BIN on $IMGEDGE_SERVER__LISTEN (log: $ilog)"
"$run_bin" >"$ilog" 2>&1 &
imgedge_pid=$!
for ((i = 0; i < 200; i++)); do
  curl -fsS -o "$logdir/health.json" --max-time 2 "${base[imgedge]}/health" 2>/dev/null && break
  kill -0 "$imgedge_pid" 2>/dev/null || { imgedge_pid=; tail -20 "$ilog" >&2; die "imgedge exited during start-up"; }
  sleep 0.1
done
((i < 200)) || { tail -20 "$ilog" >&2; die "imgedge did not answer /health within 20 s"; }
idle_rss_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$imgedge_pid/status")
health_version=$(grep -o '"version":"[^"]*"' "$logdir/health.json" | cut -d'"' -f4) || true
log "imgedge up, pid $imgedge_pid, idle RSS $((idle_rss_kb / 1024)) MB"

# ---- 4. scenarios ----
for s in "${scenarios[@]}"; do
  first_path=$(scenario_rows "$s" | sed -n 1p | cut -f1)
  for t in "${targets[@]}"; do
    pids=$(target_pids "$t") || { note[$s,$t]="**not running**"; log "$s $t: not running, skipped"; continue; }
    bad=$(precheck "$t" "$s")
    [[ -n $bad ]] && note[$s,$t]="**does not serve this scenario correctly:** $bad"
    if [[ $t == imgedge ]]; then
      m_req0=$(metrics_sum imgedge_requests_total) m_hit0=$(metrics_sum imgedge_cache_requests_total 'result="hit"')
      m_miss0=$(metrics_sum imgedge_cache_requests_total 'result="miss"') m_up0=$(metrics_sum imgedge_upstream_requests_total)
      loglines0=$(wc -l <"$ilog")
    fi
    declare -A pname=()
    for p in $pids; do pname[$p]=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || true; done
    load1[$s,$t]=$(cut -d' ' -f1 /proc/loadavg)
    log "$s -> $t (pids: $pids)"
    # shellcheck disable=SC2086
    if out=$(bash "$here/lib/load.sh" "${base[$t]}" "$s" $pids 2>"$logdir/load-$s-$t.err"); then
      line[$s,$t]=$out
      log "$out"
      e=$(lt_kv errors "$out")
      [[ ${e:-0} == 0 ]] || note[$s,$t]+="${note[$s,$t]:+; }**$e wrk errors**"
    else
      note[$s,$t]+="${note[$s,$t]:+; }**load.sh failed:** $(tr '\n' ' ' <"$logdir/load-$s-$t.err" | cut -c1-300)"
      log "$s $t: load.sh failed: $(cat "$logdir/load-$s-$t.err")"
    fi
    now=$(target_pids "$t") || now=
    changed=
    for p in $pids; do # gone: only nginx's cache loader may leave (it exits a minute after start)
      [[ " $now " == *" $p "* || ${pname[$p]:-} == *"cache loader"* ]] || changed+=" -$p"
    done
    for p in $now; do [[ " $pids " == *" $p "* ]] || changed+=" +$p"; done
    [[ -z $changed ]] || note[$s,$t]+="${note[$s,$t]:+; }**processes changed during the run:**$changed (before: $pids)"
    if [[ $t == imgedge ]]; then
      if kill -0 "$imgedge_pid" 2>/dev/null; then
        newlog=$(tail -n +"$((loglines0 + 1))" "$ilog" | lt_strip_ansi)
        nlines=$(printf '%s' "$newlog" | grep -c '' || true)
        nwarn=$(printf '%s' "$newlog" | grep -cE '(^| )(WARN|ERROR) ' || true)
        log_warn_total=$((log_warn_total + nwarn))
        detail[$s]="requests $(($(metrics_sum imgedge_requests_total) - m_req0)),"
        detail[$s]+=" cache hits $(($(metrics_sum imgedge_cache_requests_total 'result="hit"') - m_hit0)),"
        detail[$s]+=" cache misses $(($(metrics_sum imgedge_cache_requests_total 'result="miss"') - m_miss0)),"
        detail[$s]+=" upstream fetches $(($(metrics_sum imgedge_upstream_requests_total) - m_up0))"
        detail[$s]+=" ($(scenario_rows "$s" | wc -l) distinct paths); log lines written $nlines, of which WARN/ERROR $nwarn."
        ((nwarn == 0)) || note[$s,$t]+="${note[$s,$t]:+; }**$nwarn WARN/ERROR log lines**"
      else
        note[$s,$t]+="${note[$s,$t]:+; }**imgedge exited**"
        log "imgedge exited; last log lines:"; tail -20 "$ilog" >&2
        imgedge_pid=
        write_report "INCOMPLETE: imgedge exited during $s"
        finished=1
        exit 1
      fi
    fi
    cache[$s,$t]=$(cache_header "${base[$t]}" "$first_path" "$t")
    v=$(verify_all "$t" "$s")
    verified[$s,$t]=${v%%;*}
    if [[ $v == *";"* ]]; then
      note[$s,$t]+="${note[$s,$t]:+; }**wrong bodies after the load:** ${v#*; }"
      log "$s $t: wrong bodies after the load: ${v#*; }"
    fi
    if [[ $s == large && $t == nginx && ${cache[$s,$t]} == HIT ]]; then
      note[$s,$t]+="${note[$s,$t]:+; }stores objects over 5 MiB and serves them as hits (imgedge and varnish stream them from the origin)"
    fi
  done
done

# ---- 5. report ----
write_report
finished=1
cat "$report"
log "report: $report"
for k in "${!verified[@]}"; do
  [[ ${verified[$k]%/*} == "${verified[$k]#*/}" ]] || { log "wrong bodies: ${k/,/ } ${verified[$k]}"; exit 3; }
done
