#!/usr/bin/env bash
# End-to-end smoke test: every corpus image through both imgedge routes, twice each, checked
# byte-exact against the manifest, with the expected Cache-Status and origin hit counts.
# Usage (from the repo root): bash loadtest/smoke.sh
# Env: CORPUS (default /tmp/imgproxy-corpus), EDGE_BIN (default: cargo build, target/debug/imgedge),
# SMOKE_DEADLINE (seconds for all fetches, default 1200; each request is capped at 60 s).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$here/lib/lib.sh"

LIMIT=5242880 # bodies above this are streamed through, never stored
BUCKET=wallpapers
CS_MISS='imgedge; fwd=uri-miss; stored'
CS_HIT='imgedge; hit; detail=memory'
CS_LARGE='imgedge; fwd=uri-miss; detail=too-large'

lt_ensure_corpus
lt_ensure_bin
lt_start

hdrs=$LT_TMP/headers
body=$LT_TMP/body
cerr=$LT_TMP/curl.err

# Percent-encodes everything but RFC 3986 unreserved characters.
urlencode() {
  local LC_ALL=C s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [a-zA-Z0-9._~-]) out+=$c ;;
      *) printf -v c '%%%02X' "'$c"; out+=$c ;;
    esac
  done
  printf '%s' "$out"
}

# Value of the first header NAME (case-insensitive) in the headers file, CR stripped.
hdr() { # name file
  local want
  want=$(printf '%s' "$1" | tr '[:upper:]' '[:lower:]')
  tr -d '\r' <"$2" | awk -v want="$want" '
    { i = index($0, ":") }
    i > 0 && tolower(substr($0, 1, i - 1)) == want {
      v = substr($0, i + 1); sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v); print v; exit
    }'
}

# Status code of the last response in the headers file.
status_of() { tr -d '\r' <"$1" | awk '/^HTTP\//{ s = $2 } END { print s }'; }

# One fetch and its checks; appends to the global `why` on failure.
# Args: tag url expected-cache-status want-age ct bytes sha
fetch_check() {
  local tag=$1 url=$2 want_cs=$3 want_age=$4 ct=$5 bytes=$6 sha=$7 st got_ct got_cs got_sha got_size nos
  local -a bad=()
  : >"$hdrs"
  rm -f "$body"
  if ! curl -sS -g --connect-timeout 5 --max-time 60 -D "$hdrs" -o "$body" "$url" 2>"$cerr"; then
    why+="${why:+; }$tag: $(tr -d '\r\n' <"$cerr")"
    return 0
  fi
  [[ -f $body ]] || : >"$body"
  st=$(status_of "$hdrs")
  if [[ $st != 200 ]]; then
    local snippet
    snippet=$(head -c 200 "$body" | tr -c '[:print:]' ' ')
    why+="${why:+; }$tag: status ${st:-none}, cache-status '$(hdr cache-status "$hdrs")', body '$snippet'"
    return 0
  fi
  got_ct=$(hdr content-type "$hdrs")
  [[ $got_ct == "$ct" ]] || bad+=("content-type '$got_ct'")
  got_size=$(stat -c %s "$body")
  [[ $got_size == "$bytes" ]] || bad+=("size $got_size")
  got_sha=$(sha256sum "$body" | cut -d' ' -f1)
  [[ $got_sha == "$sha" ]] || bad+=("sha256 mismatch")
  nos=$(hdr x-content-type-options "$hdrs")
  [[ $nos == nosniff ]] || bad+=("x-content-type-options '$nos'")
  got_cs=$(hdr cache-status "$hdrs")
  [[ $got_cs == "$want_cs" ]] || bad+=("cache-status '$got_cs'")
  if [[ $want_age == 1 && -z $(hdr age "$hdrs") ]]; then bad+=("no Age header"); fi
  if ((${#bad[@]})); then
    local msg
    msg=$(printf ', %s' "${bad[@]}")
    why+="${why:+; }$tag: ${msg:2}"
  fi
  return 0
}

names=() sizes=() types=() shas=()
while IFS=$'\t' read -r n b t s _ || [[ -n ${n:-} ]]; do
  [[ -n $n && -n ${s:-} ]] || continue
  names+=("$n") sizes+=("$b") types+=("$t") shas+=("$s")
done <"$MANIFEST"
total=${#names[@]}
((total > 0)) || lt_die "no images in $MANIFEST"

declare -A fail=() # "index route" -> reason
start=$SECONDS
deadline=${SMOKE_DEADLINE:-1200} # seconds for the whole fetch loop; the rest counts as failed
dead=0 skip=''
for ((i = 0; i < total; i++)); do
  n=${names[i]} b=${sizes[i]} t=${types[i]} s=${shas[i]}
  if [[ -z $skip ]]; then
    if ! lt_imgedge_alive; then
      dead=1 skip='imgedge is not running'
    elif ((SECONDS - start > deadline)); then
      skip="over the ${deadline} s deadline (SMOKE_DEADLINE)"
    fi
  fi
  if [[ -n $skip ]]; then
    # No point fetching from a server that is gone or stuck: count the rest as failed.
    fail["$i A"]="not fetched: $skip" fail["$i B"]="not fetched: $skip"
    echo "[$((i + 1))/$total] $n $b FAIL: not fetched, $skip"
    continue
  fi
  upstream=$ORIGIN/$n
  if ((i % 2)); then
    url_a="$BASE/image-proxy?url=$upstream" # raw, unencoded
  else
    url_a="$BASE/image-proxy?url=$(urlencode "$upstream")"
  fi
  url_b=$BASE/storage/v1/object/public/$BUCKET/$n
  line="[$((i + 1))/$total] $n $b"
  for route in A B; do
    [[ $route == A ]] && url=$url_a || url=$url_b
    why=''
    if ((b <= LIMIT)); then
      fetch_check "$route#1" "$url" "$CS_MISS" 0 "$t" "$b" "$s"
      fetch_check "$route#2" "$url" "$CS_HIT" 1 "$t" "$b" "$s"
    else
      fetch_check "$route#1" "$url" "$CS_LARGE" 0 "$t" "$b" "$s"
      fetch_check "$route#2" "$url" "$CS_LARGE" 0 "$t" "$b" "$s"
    fi
    [[ -z $why ]] || fail["$i $route"]=$why
  done
  if [[ -n ${fail["$i A"]:-} || -n ${fail["$i B"]:-} ]]; then
    msg=''
    for route in A B; do
      [[ -z ${fail["$i $route"]:-} ]] || msg+="${msg:+; }${fail["$i $route"]}"
    done
    echo "$line FAIL: $msg"
  else
    echo "$line ok"
  fi
done

# Origin hit counts: exactly one fetch per stored object and route, two for too-large ones.
((dead)) || lt_imgedge_alive || true
hits_ok=1
hitsf=$LT_TMP/hits.tsv
if ! curl -sS --max-time 10 -o "$LT_TMP/hits.json" "$ORIGIN/__hits" 2>"$cerr"; then
  hits_ok=0
  echo "hits: could not read $ORIGIN/__hits: $(tr -d '\r\n' <"$cerr")"
elif ! python3 - "$LT_TMP/hits.json" "$BUCKET" "${names[@]}" >"$hitsf" <<'EOF'
import json, sys
hits = json.load(open(sys.argv[1]))
bucket = sys.argv[2]
for i, name in enumerate(sys.argv[3:]):
    a = hits.get("/" + name, 0)
    b = hits.get(f"/storage/v1/object/public/{bucket}/{name}", 0)
    print(i, a, b, sep="\t")
EOF
then
  hits_ok=0
  echo "hits: could not parse $ORIGIN/__hits"
else
  while IFS=$'\t' read -r i got_a got_b; do
    want=1
    ((sizes[i] <= LIMIT)) || want=2
    for route in A B; do
      [[ $route == A ]] && got=$got_a || got=$got_b
      if [[ $got != "$want" ]]; then
        k="$i $route"
        fail[$k]="${fail[$k]:-}${fail[$k]:+; }origin hits $got, want $want"
        echo "hits: ${names[i]} route $route: origin saw $got requests, want $want"
      fi
    done
  done <"$hitsf"
fi

failed=0
for ((i = 0; i < total; i++)); do
  for route in A B; do
    if [[ $hits_ok == 0 ]]; then
      fail["$i $route"]="${fail["$i $route"]:-}${fail["$i $route"]:+; }origin hits unknown"
    fi
    [[ -z ${fail["$i $route"]:-} ]] || failed=$((failed + 1))
  done
done
passed=$((2 * total - failed))
# A panic in imgedge (a task dying mid-response) fails the run even when every fetch happened to pass.
panics=$(grep -c 'panicked' "$LT_TMP/imgedge.log" || true)
if ((panics > 0)); then
  echo "imgedge panicked $panics time(s):"
  grep -m3 'panicked' "$LT_TMP/imgedge.log"
  failed=$((failed + 1))
fi

if ((failed)); then
  echo "failures:"
  for ((i = 0; i < total; i++)); do
    for route in A B; do
      [[ -z ${fail["$i $route"]:-} ]] || echo "  ${names[i]} route $route: ${fail["$i $route"]}"
    done
  done
fi
echo "($total images x 2 routes, $((SECONDS - start)) s; route A = /image-proxy?url=, route B = /storage/v1/object/public/$BUCKET/)"
echo "smoke: $passed passed, $failed failed"
((failed == 0))
