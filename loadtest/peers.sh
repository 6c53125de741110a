#!/usr/bin/env bash
# The peers that loadtest/bench.sh measures imgedge against, and the origin they all share, on
# loopback only, so imgedge is compared side by side with two well-known caching proxies on the same
# machine and corpus:
#   origin        127.0.0.1:18080  nginx serving the corpus at /NAME and at
#                                  /storage/v1/object/public/BUCKET/NAME (Supabase Storage's public route)
#   nginx cache   127.0.0.1:18081  nginx proxy_cache (disk cache, proxy_cache_lock on)
#   varnish       127.0.0.1:18082  Varnish, malloc storage 1 GB, streaming on, objects over 5 MB uncached
# Both caches answer /image-proxy?url=http://127.0.0.1:18080/NAME and /storage/v1/object/public/...
# Their configurations are loadtest/peers/nginx.conf.in and loadtest/peers/varnish.vcl.in.
#
# Usage: bash loadtest/peers.sh start|stop|status [CORPUS_DIR]
#   start   (re)starts all three (stopping running ones first) and waits until each answers /__up
#           and the origin serves the corpus; builds the corpus with loadtest/corpus.sh when its
#           MANIFEST.tsv is missing. CORPUS_DIR: default $CORPUS, else /tmp/imgproxy-corpus.
#   stop    stops them (by the PIDs in /tmp/imgproxy-peers) and waits until they are gone
#   status  prints which answer; exit 0 all three, 1 some, 3 none
# Run files, logs and nginx's disk cache: /tmp/imgproxy-peers (fixed: bench.sh reads the PIDs there).
# PEERS_UPSTREAM=127.0.0.1:PORT points both caches at another origin on loopback instead of the
# static one (loadtest/run.sh points them at its counting origin.py); the static origin still runs.
#
# Needs nginx and varnishd: when either is missing it installs Debian's nginx-light and varnish with
# apt-get (root needed; their services are kept from starting), else it says what to install. Run
# it as root, as the benchmarks are: nginx's workers then run as nobody, so the corpus folder and
# its parents must be readable by everyone (start checks that the origin serves the first image).
set -euo pipefail

me=peers.sh
die() { printf '%s: %s\n' "$me" "$*" >&2; exit 1; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run=/tmp/imgproxy-peers
ports=(18080 18081 18082)
names=(origin "nginx cache" varnish)

cmd=${1:-}
case $cmd in start | stop | status) ;; *) die "usage: bash loadtest/peers.sh start|stop|status [CORPUS_DIR]" ;; esac
corpus=${2:-${CORPUS:-/tmp/imgproxy-corpus}}
upstream=${PEERS_UPSTREAM:-127.0.0.1:18080}
if ! [[ $upstream =~ ^127\.0\.0\.1:([0-9]{1,5})$ ]] || ((BASH_REMATCH[1] < 1 || BASH_REMATCH[1] > 65535)); then
  die "PEERS_UPSTREAM=$upstream: want 127.0.0.1:PORT"
fi
upstream_port=${upstream#*:}

up() { curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$1/__up" 2>/dev/null; }
listeners() { # what listens on the peers' ports, one "address process" per line
  ss -Hltnp 2>/dev/null | awk '$4 ~ /^127\.0\.0\.1:1808[012]$/ {print $4, $6}'
}

# Stops the processes named in the run folder's PID files (only if they still are nginx or
# varnishd: never a reused PID), then waits up to 10 s for them to exit.
stop() {
  local f pid comm waited=() i
  for f in "$run/nginx.pid" "$run/varnish.pid"; do
    [[ -f $f ]] || continue
    pid=$(cat "$f" 2>/dev/null) || pid=
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || comm=
    if [[ $pid =~ ^[0-9]+$ && ($comm == nginx || $comm == varnishd) ]]; then
      kill "$pid" 2>/dev/null && waited+=("$pid")
    fi
    rm -f "$f"
  done
  for pid in "${waited[@]}"; do
    for ((i = 0; i < 100; i++)); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
    [[ -e /proc/$pid ]] && printf '%s: pid %s still there 10 s after SIGTERM\n' "$me" "$pid" >&2
  done
  return 0
}

case $cmd in
  stop)
    stop
    echo "peers stopped"
    exit 0
    ;;
  status)
    n=0
    for i in "${!ports[@]}"; do
      if up "${ports[$i]}"; then echo "${names[$i]} :${ports[$i]} up"; n=$((n + 1)); else echo "${names[$i]} :${ports[$i]} down"; fi
    done
    ((n == ${#ports[@]})) && exit 0
    ((n == 0)) && exit 3
    exit 1
    ;;
esac

# ---- start ----
for f in nginx.conf.in varnish.vcl.in; do [[ -f $here/peers/$f ]] || die "missing $here/peers/$f"; done
command -v curl >/dev/null || die "curl is required"
if [[ ! -f $corpus/MANIFEST.tsv ]]; then
  bash "$here/corpus.sh" "$corpus" || die "no corpus in $corpus and loadtest/corpus.sh could not build it"
fi
corpus=$(cd "$corpus" && pwd)
[[ -s $corpus/MANIFEST.tsv ]] || die "empty manifest: $corpus/MANIFEST.tsv"

if ! command -v nginx >/dev/null || ! command -v varnishd >/dev/null; then
  ((EUID == 0)) || die "nginx and varnishd are needed: install Debian's nginx-light and varnish as root (apt-get install nginx-light varnish), or run this script as root and it will"
  command -v apt-get >/dev/null || die "nginx and varnishd are needed, and there is no apt-get to install them with"
  echo "$me: installing nginx-light and varnish (their services, nginx on :80 and varnish on :6081, not started)" >&2
  bash "$here/lib/apt-install.sh" nginx-light varnish || die "apt-get install nginx-light varnish failed"
fi

stop
for ((i = 0; i < 100; i++)); do [[ -z $(listeners) ]] && break; sleep 0.1; done
[[ -z $(listeners) ]] || die "ports 18080-18082 are in use by something else: $(listeners | tr '\n' ' ')"

rm -rf "$run"
mkdir -p "$run/nginx-cache" "$run/varnish"
tpl=$(<"$here/peers/nginx.conf.in")
tpl=${tpl//@RUN@/"$run"}
tpl=${tpl//@UPSTREAM@/"$upstream"}
printf '%s\n' "${tpl//@CORPUS@/"$corpus"}" >"$run/nginx.conf"
tpl=$(<"$here/peers/varnish.vcl.in")
tpl=${tpl//@RUN@/"$run"}
tpl=${tpl//@UPSTREAM_PORT@/"$upstream_port"}
printf '%s\n' "${tpl//@UPSTREAM_RE@/"127\\.0\\.0\\.1:$upstream_port"}" >"$run/varnish.vcl"

fail() { # message: the logs, the peers stopped, exit 1
  local f
  for f in "$run/nginx-error.log" "$run/varnish.log"; do
    [[ -s $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
  done
  stop
  die "$*"
}
nginx -c "$run/nginx.conf" -p "$run" 2>>"$run/nginx-error.log" || fail "nginx did not start" # daemonizes; writes $run/nginx.pid
varnishd -a 127.0.0.1:18082 -f "$run/varnish.vcl" -s malloc,1G -n "$run/varnish" -P "$run/varnish.pid" \
  -p thread_pool_min=50 >"$run/varnish.log" 2>&1 || fail "varnishd did not start"
for i in "${!ports[@]}"; do
  for ((t = 0; t < 50; t++)); do up "${ports[$i]}" && break; sleep 0.1; done
  up "${ports[$i]}" || fail "${names[$i]} does not answer http://127.0.0.1:${ports[$i]}/__up after 5 s"
done
first=$(sed -n 1p "$corpus/MANIFEST.tsv" | cut -f1)
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:18080/$first" 2>/dev/null) || code=000
[[ $code == 200 ]] || fail "the origin answers $code for /$first of $corpus (nginx's workers run as nobody when started as root: the folder and its parents must be world-readable)"
echo "peers up: origin :18080, nginx cache :18081, varnish :18082 (both in front of $upstream), corpus $corpus (stop: bash loadtest/peers.sh stop)"
