#!/usr/bin/env bash
# Builds the image corpus that the smoke tests and benchmarks serve: real photographs and artwork
# (JPEG, PNG, WebP; 10 KB to 16 MB) from three Debian wallpaper packages, flattened into one folder,
# with MANIFEST.tsv: one line per image, `name<TAB>bytes<TAB>content_type<TAB>sha256`, in C-locale
# order of the image's path in its package (names: the path under /usr/share, '/' and ' ' turned
# into '_', lower-cased; e.g. wallpapers_altai_contents_images_1080x1920.png).
#
# Usage: bash loadtest/corpus.sh [DIR]
#   DIR  where the corpus goes (default: $CORPUS, else /tmp/imgproxy-corpus)
#
# Source: plasma-workspace-wallpapers, gnome-backgrounds and mate-backgrounds, fetched with
# `apt-get download` (nothing is installed) and unpacked with dpkg-deb into a scratch folder inside
# DIR. On Debian 12 (bookworm) that is a 173 MB download (173,233,104 bytes of .deb: 94.0 + 32.5 +
# 46.6 MB) giving 118 images, 166 MiB; the whole build, download included, took 4-9 s on a 2-core
# machine next to a fast mirror (a slower link sets the time: 173 MB at 10 Mbit/s is 2.5 minutes).
# Peak disk use while building: about twice the corpus. Another Debian release packages other
# versions, hence another corpus: the manifest records whatever was built.
# Root is not needed when apt's package lists are present; when they are not (a fresh container),
# the script runs `apt-get update`, which needs root, and says so otherwise. Needs apt-get,
# apt-cache, dpkg-deb and sha256sum (Debian or a derivative).
#
# Any other folder of images works as a corpus without this script: give it a MANIFEST.tsv in the
# format above and point CORPUS=<folder> at it (every loadtest script reads CORPUS).
#
# Idempotent: when DIR/MANIFEST.tsv exists and every file it lists is there with its sha256, it
# says so and changes nothing. When the manifest no longer verifies, the corpus is rebuilt in place,
# but only if every name it lists is one this script builds (a hand-made corpus is never
# overwritten: remove its MANIFEST.tsv first). The manifest is written last, atomically, so an
# interrupted build leaves no manifest and the next run builds again.
set -euo pipefail
export LC_ALL=C

me=corpus
say() { printf '%s: %s\n' "$me" "$*"; }
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }

case ${1:-} in
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) die "unknown option $1 (usage: bash loadtest/corpus.sh [DIR])" ;;
esac
(($# <= 1)) || die "usage: bash loadtest/corpus.sh [DIR]"
dir=${1:-${CORPUS:-/tmp/imgproxy-corpus}}
pkgs=(plasma-workspace-wallpapers gnome-backgrounds mate-backgrounds)
manifest=$dir/MANIFEST.tsv
t0=$SECONDS

summary() { # -> "N images, SIZE"
  printf '%s images, %s' "$(wc -l <"$manifest")" \
    "$(awk -F'\t' '{s += $2} END {printf "%.0f MiB", s / 1048576}' "$manifest")"
}

# ---- 1. an existing corpus ----
# verify: prints the names that are missing, have another size or another sha256; fails on a
# malformed manifest
verify() {
  awk -F'\t' 'NF != 4 || $1 == "" || $1 ~ /\// || $2 !~ /^[0-9]+$/ || length($4) != 64 || $4 ~ /[^0-9a-f]/ {
    if (!bad++) printf "line %d is not name<TAB>bytes<TAB>content_type<TAB>sha256\n", NR }
    END { exit bad > 0 }' "$manifest" >&2 || return 1
  local name bytes
  {
    while IFS=$'\t' read -r name bytes _; do
      if [[ ! -f $dir/$name ]] || [[ $(stat -c %s "$dir/$name") != "$bytes" ]]; then
        echo "$name"
      fi
    done <"$manifest"
    # one sha256sum run over them all
    awk -F'\t' '{print $4 "  " $1}' "$manifest" | (cd "$dir" && sha256sum -c 2>/dev/null || true) |
      sed -n 's/: FAILED.*$//p'
  } | sort -u
}
rebuild_ok=1
if [[ -f $manifest ]]; then
  say "checking $manifest"
  [[ -s $manifest ]] || die "$manifest is empty: remove it to rebuild the corpus"
  bad=$(verify) || die "$manifest is malformed: fix it, or remove it to rebuild the corpus"
  if [[ -z $bad ]]; then
    say "$dir is complete: $(summary), every sha256 verified; nothing to do"
    exit 0
  fi
  say "$(wc -l <<<"$bad") of $(wc -l <"$manifest") listed files are missing or differ (first: $(sed -n 1p <<<"$bad"))"
  # every name this script builds starts so: refuse a hand-made corpus before downloading
  foreign=$(cut -f1 "$manifest" | grep -Ev '^(wallpapers|backgrounds)_' | sed -n 1p) || true
  [[ -z $foreign ]] || die "$manifest lists files this script does not build (first: $foreign); not touching it: remove $manifest to build the Debian corpus in $dir, or use another DIR"
  rebuild_ok=0 # checked name by name once the package contents are known
fi

# ---- 2. tools and package lists ----
for t in apt-get apt-cache dpkg-deb sha256sum; do
  command -v "$t" >/dev/null ||
    die "$t not found: this builder needs Debian's apt and dpkg; or set CORPUS to any folder with a MANIFEST.tsv"
done
sizes=$(apt-cache show --no-all-versions "${pkgs[@]}" 2>/dev/null | awk -v want=${#pkgs[@]} '/^Size:/ {n++; s += $2} END {if (n == want) print s}') || true
if [[ -z $sizes ]]; then
  ((EUID == 0)) || die "apt does not know ${pkgs[*]} (no package lists yet?): run 'apt-get update' as root, then this script again (it needs no root itself); or set CORPUS to any folder with a MANIFEST.tsv"
  say "apt-get update (apt's package lists are missing)"
  # the lock lib/apt-install.sh takes: apt runs one at a time (tests/run.sh runs installers side by side)
  flock -w 900 /tmp/imgedge-apt.lock apt-get update -qq >/dev/null || die "apt-get update failed"
  sizes=$(apt-cache show --no-all-versions "${pkgs[@]}" 2>/dev/null | awk -v want=${#pkgs[@]} '/^Size:/ {n++; s += $2} END {if (n == want) print s}') || true
  [[ -n $sizes ]] || die "apt does not know ${pkgs[*]}, even after apt-get update: is Debian's main archive in the sources?"
fi

# ---- 3. download ----
mkdir -p "$dir" || die "cannot create $dir"
work=$(mktemp -d "$dir/.build.XXXXXX") # inside DIR: the images are then moved, not copied
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir "$work/debs" "$work/root"
# apt-get as root downloads as the user _apt, which must be able to write there
if ((EUID == 0)) && id _apt >/dev/null 2>&1; then chown _apt "$work/debs" && chmod 755 "$work"; fi
versions=$(apt-cache show --no-all-versions "${pkgs[@]}" | awk '/^Package:/ {p = $2} /^Version:/ {printf "%s%s %s", sep, p, $2; sep = ", "}')
say "downloading ${#pkgs[@]} packages, $(awk -v s="$sizes" 'BEGIN {printf "%.0f MB", s / 1e6}'): $versions"
(cd "$work/debs" && apt-get download -qq "${pkgs[@]}" >/dev/null) || die "apt-get download ${pkgs[*]} failed"

# ---- 4. unpack ----
say "unpacking"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
  rm -f "$deb"
done
mapfile -t srcs < <(find "$work/root/usr/share/wallpapers" "$work/root/usr/share/backgrounds" -type f \
  \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) 2>/dev/null | sort)
((${#srcs[@]})) || die "no images in ${pkgs[*]}"
names=()
declare -A seen=()
for src in "${srcs[@]}"; do
  name=$(printf '%s' "${src#"$work/root/usr/share/"}" | tr '/ ' '__' | tr '[:upper:]' '[:lower:]')
  [[ -z ${seen[$name]:-} ]] || die "two images map to the name $name"
  seen[$name]=1
  names+=("$name")
done
if ((!rebuild_ok)); then
  foreign=$(cut -f1 "$manifest" | while read -r n; do [[ -n ${seen[$n]:-} ]] || echo "$n"; done)
  [[ -z $foreign ]] || die "$manifest lists files this script does not build (first: $(sed -n 1p <<<"$foreign")); not touching it: remove $manifest to build the Debian corpus in $dir, or use another DIR"
fi

# ---- 5. images and manifest ----
say "moving ${#names[@]} images into $dir and hashing them"
: >"$work/MANIFEST.tsv"
for i in "${!srcs[@]}"; do
  name=${names[$i]}
  mv -f "${srcs[$i]}" "$dir/$name"
  case ${name##*.} in jpg | jpeg) ct=image/jpeg ;; png) ct=image/png ;; webp) ct=image/webp ;; esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$(stat -c %s "$dir/$name")" "$ct" \
    "$(sha256sum "$dir/$name" | cut -d' ' -f1)" >>"$work/MANIFEST.tsv"
done
mv -f "$work/MANIFEST.tsv" "$manifest"
say "$(summary) in $dir ($((SECONDS - t0)) s)"
