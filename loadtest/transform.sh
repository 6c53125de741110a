#!/usr/bin/env bash
# loadtest/transform.sh: cold 800-pixel-wide thumbnails of the corpus's eight largest JPEG and PNG
# photos through imgedge's render route, against `vipsthumbnail FILE -s 800x` (libvips) on the
# same files, in the same run.
#
#   bash loadtest/transform.sh [ROUNDS=3]
#
# Starts loadtest/origin.py and imgedge (release; EDGE_BIN to skip the build) with the Supabase
# route in front of the origin (lib/lib.sh's lt_start), then ROUNDS times, for each image: imgedge
# restarted (renditions are stored, so a fresh process keeps every render cold), the original
# fetched once through the object route, untimed (one of <= 5 MiB is then a memory hit; a larger
# one is never stored and is fetched again by the render, over loopback); then, alternating which
# goes first: the image
# through /storage/v1/render/image/public/wallpapers/NAME?width=800&quality=80 with curl (one
# request at a time; each one decodes, resizes and encodes), and each image
# through vipsthumbnail (output in the source's format, JPEG at Q=80, as imgedge's). Checks every
# output is 800 pixels wide (vipsheader). Also the RSS each render adds to imgedge at its peak
# (VmHWM reset through /proc/PID/clear_refs before it, against VmRSS then; needs root, else left
# out), and the largest baseline (sequential) JPEG too when it is not among the eight: the
# decoders read row by row, and this is what shows it. Prints per-image and total wall times and
# writes loadtest/reports/transform-<UTC>.md.
# Needs vipsthumbnail and vipsheader (Debian: apt-get install libvips-tools; installed when
# missing and run as root). Env: CORPUS, EDGE_BIN, LT_KEEP=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$here/lib/lib.sh"

rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]?$ ]] || lt_die "ROUNDS=$rounds: want 1-99"
if ! command -v vipsthumbnail >/dev/null || ! command -v vipsheader >/dev/null; then
  ((EUID == 0)) || lt_die "vipsthumbnail is needed: apt-get install libvips-tools"
  lt_log "installing libvips-tools"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libvips-tools; } >/dev/null ||
    lt_die "apt-get install libvips-tools failed"
fi

# the work folder is lt_start's: lt_cleanup stops origin.py and imgedge and removes it (kept on
# failure or with LT_KEEP=1)
LT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-transform.XXXXXX")
work=$LT_TMP
trap lt_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lt_ensure_corpus
lt_release_bin "$work"
mapfile -t images < <(awk -F'\t' '$3 == "image/jpeg" || $3 == "image/png" {print $2 "\t" $1}' "$MANIFEST" | sort -rn | head -n 8 | cut -f2)
((${#images[@]} == 8)) || lt_die "fewer than 8 JPEG and PNG images in $MANIFEST"
# the largest baseline JPEG (SOF0/SOF1 before any SOF2): the row-by-row decode's case
baseline=$(python3 - "$CORPUS" "$MANIFEST" <<'PY'
import sys
corpus, manifest = sys.argv[1], sys.argv[2]
best = (0, "")
for line in open(manifest):
    name, size, ctype = line.split("\t")[:3]
    if ctype != "image/jpeg":
        continue
    b = open(f"{corpus}/{name}", "rb").read(1 << 20)
    i = 2
    while i + 4 < len(b) and b[i] == 0xFF:
        m, n = b[i + 1], int.from_bytes(b[i + 2:i + 4], "big")
        if m in (0xC0, 0xC1):
            best = max(best, (int(size), name))
            break
        if m == 0xC2 or m == 0xDA:
            break
        i += 2 + n
print(best[1])
PY
)
# shellcheck disable=SC2076 # a literal match: is the name among the images?
[[ -n $baseline && ! " ${images[*]} " =~ " $baseline " ]] && images+=("$baseline")
EDGE_BIN=$run_bin lt_start
lt_log "imgedge $bin_version ($bin_source), $(vipsthumbnail --vips-version 2>/dev/null | head -n1)"

warm() {
  curl -fsS -o /dev/null "$BASE/storage/v1/object/public/wallpapers/$1" || lt_die "cannot fetch $1"
}

now() { date +%s.%N; }
declare -A t_edge t_vips
width_of() { vipsheader -f width "$1"; }
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$LT_IMGEDGE_PID/status"; }
run_edge() { # name -> seconds; the RSS the render added at its peak (KiB) into $work/rss-NAME
  local name=$1 out=$work/edge-$1 t0 t1 before=
  if echo 5 >"/proc/$LT_IMGEDGE_PID/clear_refs" 2>/dev/null; then before=$(kib VmRSS); fi
  t0=$(now)
  curl -fsS -o "$out" "$BASE/storage/v1/render/image/public/wallpapers/$name?width=800&quality=80" ||
    lt_die "render of $name failed: $(cat "$out" 2>/dev/null | head -c 300)"
  t1=$(now)
  [[ -z $before ]] || echo "$(($(kib VmHWM) - before))" >>"$work/rss-$name"
  [[ $(width_of "$out") == 800 ]] || lt_die "imgedge's $name is $(width_of "$out") wide"
  echo "$t1 - $t0" | bc
}
run_vips() {
  local name=$1 ext t0 t1 out
  case $name in *.png) ext=png ;; *) ext='jpg[Q=80]' ;; esac
  out=$work/vips-${name%.*}.${ext%%[*} # what -o vips-%s.EXT names it
  t0=$(now)
  vipsthumbnail "$CORPUS/$name" -s 800x -o "$work/vips-%s.$ext" || lt_die "vipsthumbnail $name failed"
  t1=$(now)
  [[ $(width_of "$out") == 800 ]] || lt_die "vipsthumbnail's $name is $(width_of "$out") wide"
  echo "$t1 - $t0" | bc
}

for ((r = 1; r <= rounds; r++)); do
  for name in "${images[@]}"; do
    # a fresh process per image: every render is cold, and the RSS it adds is its own, not
    # pages an earlier render left with the allocator
    lt_stop "$LT_IMGEDGE_PID"
    lt_start_edge
    warm "$name"
    if ((r % 2)); then
      e=$(run_edge "$name"); v=$(run_vips "$name")
    else
      v=$(run_vips "$name"); e=$(run_edge "$name")
    fi
    t_edge[$name]+="$e "
    t_vips[$name]+="$v "
  done
  lt_log "round $r of $rounds done"
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
report_dir=${REPORT_DIR:-$here/reports}
mkdir -p "$report_dir"
report=$report_dir/transform-$(date -u +%Y%m%dT%H%M%SZ).md
{
  echo "# Render route vs vipsthumbnail: 800-pixel-wide thumbnails"
  echo
  echo '```sh'
  echo "bash loadtest/transform.sh $rounds"
  echo '```'
  echo
  echo "imgedge: $bin_version, $bin_source, sha256 ${bin_sha:0:12}; $(vipsthumbnail --vips-version 2>/dev/null | head -n1); $(nproc) cores. The eight largest JPEG and PNG images of the corpus, and its largest baseline JPEG; each render is one request at a time on a fresh imgedge process per round (curl, wall time from request to last byte; a fresh process per image, the original fetched once before, one over 5 MiB fetched again by the render over loopback); vipsthumbnail reads the file from disk (page cache) and writes in the source's format (JPEG Q=80). Median of $rounds rounds, alternating which runs first. vipsthumbnail's times include starting its process (libvips initialisation); imgedge's include an HTTP request over loopback. PNG output is compressed by each with its own default settings (compare the sizes)."
  echo
  echo "RSS added: imgedge's peak RSS during the render (VmHWM, reset before it) less its RSS when it started, on a fresh process that had fetched only that original, the largest of the rounds, in MiB (an original of up to 5 MiB is in the memory tier before, and not counted)."
  echo
  echo "| image | bytes | imgedge s | vipsthumbnail s | ratio | output bytes imgedge / vips | RSS added MiB |"
  echo "|---|---|---|---|---|---|---|"
  te=0 tv=0
  for name in "${images[@]}"; do
    e=$(median <<<"${t_edge[$name]}") v=$(median <<<"${t_vips[$name]}")
    te=$(echo "$te + $e" | bc) tv=$(echo "$tv + $v" | bc)
    case $name in *.png) ext=png ;; *) ext=jpg ;; esac
    added=n/a
    [[ -s $work/rss-$name ]] && added=$(sort -n "$work/rss-$name" | tail -n1 | awk '{printf "%.1f", $1 / 1024}')
    printf '| %s | %s | %.3f | %.3f | %.2f | %s / %s | %s |\n' "$name" "$(stat -c %s "$CORPUS/$name")" "$e" "$v" "$(echo "$e / $v" | bc -l)" \
      "$(stat -c %s "$work/edge-$name")" "$(stat -c %s "$work/vips-${name%.*}.$ext")" "$added"
  done
  printf '| **total** | | **%.3f** | **%.3f** | **%.2f** | | |\n' "$te" "$tv" "$(echo "$te / $tv" | bc -l)"
} >"$report"
cat "$report"
echo "$report"
