#!/usr/bin/env bash
# loadtest/transform-load.sh: the render route under concurrency (issue 11's benchmark, with
# loadtest/transform.sh for single thumbnails against vipsthumbnail):
#
#   bash loadtest/transform-load.sh
#
# 1. Peak RSS added per concurrent transform, at 1, 2 and 8 at once. For each N: a fresh imgedge
#    with transform.max_concurrent=N, the original warmed through the object route (untimed),
#    then N distinct cold renditions at once (widths 800, 801, ...: no two share a transform) of
#    the corpus's largest JPEG, then of its largest PNG. Added = imgedge's peak RSS (VmHWM) after
#    minus its RSS before; per transform = added / N.
# 2. Transforms per second for a warm mix: 10 widths over 20 images (the corpus's 20 largest
#    JPEGs and PNGs of at most 5 MiB: their originals are memory hits once warmed), 200 cold
#    renditions requested by 32 clients at once (xargs -P 32 curl), on a fresh imgedge with the
#    default transform.max_concurrent (the cores) and queue_timeout 60s (so the queue, not a
#    timeout, is what the clients see). Every response must be 200 with the asked width; then
#    imgedge_transforms_total{outcome="ok"} must be 200, and a second pass over the same URLs
#    (all stored renditions) is timed too.
#
# Starts loadtest/origin.py and imgedge (release; EDGE_BIN to skip the build) with lib/lib.sh's
# lt_start; writes loadtest/reports/transform-load-<UTC>.md and prints its path. Env: CORPUS,
# EDGE_BIN, LT_KEEP=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$here/lib/lib.sh"

command -v vipsheader >/dev/null || lt_die "vipsheader is needed to check widths: apt-get install libvips-tools"
LT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-transform-load.XXXXXX")
work=$LT_TMP
trap lt_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lt_ensure_corpus
lt_release_bin "$work"
EDGE_BIN=$run_bin
largest() { # media-type count [max-bytes]
  awk -F'\t' -v t="$1" -v max="${3:-0}" '$3 == t && (max == 0 || $2 <= max) {print $2 "\t" $1}' "$MANIFEST" |
    sort -rn | head -n "$2" | cut -f2
}
big_jpeg=$(largest image/jpeg 1)
big_png=$(largest image/png 1)
mapfile -t mix < <({ largest image/jpeg 100 5242880; largest image/png 100 5242880; } |
  while read -r n; do printf '%s\t%s\n' "$(stat -c %s "$CORPUS/$n")" "$n"; done | sort -rn | head -n 20 | cut -f2)
((${#mix[@]} == 20)) || lt_die "fewer than 20 JPEG and PNG images of at most 5 MiB in $MANIFEST"
widths=(160 240 320 480 640 800 960 1080 1280 1600)

kib() { awk -v f="$1:" '$1 == f {print $2}' "/proc/$LT_IMGEDGE_PID/status"; } # VmRSS|VmHWM
object() { echo "$BASE/storage/v1/object/public/wallpapers/$1"; }
render() { echo "$BASE/storage/v1/render/image/public/wallpapers/$1?width=$2&quality=80"; }
transforms_ok() {
  curl -fsS "$BASE/metrics" | awk '/^imgedge_transforms_total\{outcome="ok"\}/ {print $2}'
}
# Fetches URL, fails unless 200 and WIDTH pixels wide; prints seconds.
fetch_checked() { # url width out
  local t code
  t=$(curl -sS -o "$3" -w '%{http_code} %{time_total}' "$1") || lt_die "curl $1 failed"
  code=${t%% *}
  [[ $code == 200 ]] || lt_die "$1: status $code: $(head -c 300 "$3")"
  [[ $(vipsheader -f width "$3") == "$2" ]] || lt_die "$1: $(vipsheader -f width "$3") wide, want $2"
  echo "${t#* }"
}

rss_rows=()
started=0
for n in 1 2 8; do
  for name in "$big_jpeg" "$big_png"; do
    if ((started)); then lt_stop "$LT_IMGEDGE_PID"; fi
    export IMGEDGE_TRANSFORM__MAX_CONCURRENT=$n
    if ((started)); then lt_start_edge; else lt_start; started=1; fi
    curl -fsS -o /dev/null "$(object "$name")" || lt_die "cannot fetch $name"
    before=$(kib VmRSS)
    pids=()
    for ((i = 0; i < n; i++)); do
      fetch_checked "$(render "$name" $((800 + i)))" $((800 + i)) "$work/rss-$i" >/dev/null &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || lt_die "a render at N=$n failed"; done
    peak=$(kib VmHWM)
    added=$(((peak - before) / 1024))
    rss_rows+=("| $n | $name | $((before / 1024)) | $((peak / 1024)) | $added | $(awk -v a="$added" -v n="$n" 'BEGIN {printf "%.1f", a / n}') |")
    lt_log "N=$n $name: RSS ${before} KiB before, peak ${peak} KiB"
  done
done
unset IMGEDGE_TRANSFORM__MAX_CONCURRENT

lt_stop "$LT_IMGEDGE_PID"
export IMGEDGE_TRANSFORM__QUEUE_TIMEOUT=60s
lt_start_edge
for name in "${mix[@]}"; do
  curl -fsS -o /dev/null "$(object "$name")" || lt_die "cannot fetch $name"
done
urls=$work/mix-urls
for name in "${mix[@]}"; do
  for w in "${widths[@]}"; do printf '%s %s\n' "$(render "$name" "$w")" "$w"; done
done | shuf --random-source=<(yes) >"$urls"
# One request of a pass: its output kept for checking afterwards, so that the pass times the
# requests and not the checks. Prints "status seconds width file".
fetch_timed() { # url width out
  local t
  t=$(curl -sS -o "$3" -w '%{http_code} %{time_total}' "$1") || t="000 0"
  echo "$t $2 $3"
}
export -f fetch_timed
export work
pass() { # label -> prints "seconds p50 p99 max"
  local t0 t1 code secs width out
  t0=$(date +%s.%N)
  # shellcheck disable=SC2016 # expanded by the inner shell
  xargs -P 32 -L 1 bash -c 'fetch_timed "$0" "$1" "$work/mix-$1-$(basename "${0%%\?*}")"' <"$urls" >"$work/results-$1" ||
    lt_die "the $1 pass failed"
  t1=$(date +%s.%N)
  while read -r code secs width out; do
    [[ $code == 200 ]] || lt_die "$1 pass: status $code: $(head -c 300 "$out")"
    [[ $(vipsheader -f width "$out") == "$width" ]] || lt_die "$1 pass: $out is $(vipsheader -f width "$out") wide, want $width"
    echo "$secs"
  done <"$work/results-$1" >"$work/times-$1"
  sort -n "$work/times-$1" | awk -v s="$(echo "$t1 - $t0" | bc)" '{a[NR] = $1} END {
    printf "%.2f %.3f %.3f %.3f\n", s, a[int(NR * 0.5 + 0.5)], a[int(NR * 0.99 + 0.5)], a[NR] }'
}
lt_log "warm mix: ${#mix[@]} images x ${#widths[@]} widths, 32 clients"
read -r cold_s cold_p50 cold_p99 cold_max < <(pass cold)
ok=$(transforms_ok)
[[ $ok == "$(wc -l <"$urls")" ]] || lt_die "imgedge_transforms_total{ok} is $ok, want $(wc -l <"$urls")"
read -r hit_s hit_p50 hit_p99 hit_max < <(pass stored)
[[ $(transforms_ok) == "$ok" ]] || lt_die "the second pass transformed again"
total=$(wc -l <"$urls")

report_dir=${REPORT_DIR:-$here/reports}
mkdir -p "$report_dir"
report=$report_dir/transform-load-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# Render route under concurrency: memory per transform, transforms per second"
  echo
  echo '```sh'
  echo "bash loadtest/transform-load.sh"
  echo '```'
  echo
  echo "imgedge: $bin_version, $bin_source, sha256 ${bin_sha:0:12}; $(nproc) cores."
  echo
  echo "## Peak RSS added per concurrent transform"
  echo
  echo "A fresh imgedge per row with \`transform.max_concurrent\` = N; the original warmed; N renditions of it at once (widths 800 to 800+N-1, quality 80, the source's format). Added = peak RSS (VmHWM) after minus RSS before."
  echo
  echo "| N | source | RSS before MiB | peak MiB | added MiB | added per transform MiB |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rss_rows[@]}"
  echo
  echo "## Transforms per second, warm mix"
  echo
  echo "${#mix[@]} images (the largest JPEGs and PNGs of at most 5 MiB: $(printf '%s ' "${mix[@]}" | head -c 400)...) x ${#widths[@]} widths (${widths[*]}) = $total renditions, requested in a shuffled order by 32 clients at once (curl through xargs -P 32: wall time includes starting a shell and curl per request, a few ms each), originals already in memory; \`transform.max_concurrent\` = cores ($(nproc)), \`queue_timeout\` 60s. Latency is curl's \`time_total\`. Every response checked after its pass: 200 and the asked width."
  echo
  echo "| pass | wall s | per second | p50 s | p99 s | max s |"
  echo "|---|---|---|---|---|---|"
  printf '| cold (every request a transform) | %s | %.1f | %s | %s | %s |\n' "$cold_s" "$(echo "$total / $cold_s" | bc -l)" "$cold_p50" "$cold_p99" "$cold_max"
  printf '| again (every request a stored rendition) | %s | %.1f | %s | %s | %s |\n' "$hit_s" "$(echo "$total / $hit_s" | bc -l)" "$hit_p50" "$hit_p99" "$hit_max"
} >"$report"
cat "$report"
echo "$report"
