#!/usr/bin/env bash
# HTTP caching conformance: runs the suite behind cache-tests.fyi (npm `http-cache-tests`) through
# a cache in front of the suite's own origin server, all on 127.0.0.1, and prints the score of
# its required tests (loadtest/lib/conformance-score.mjs explains the scoring).
#
#   bash loadtest/conformance.sh                   # imgedge, [[routes]] prefix "/" -> suite server
#   TARGET=nginx bash loadtest/conformance.sh      # nginx with a default proxy_cache (reference)
#   TARGET=varnish bash loadtest/conformance.sh    # varnishd with a default VCL (reference)
#   TARGET=none bash loadtest/conformance.sh       # the suite server straight, no cache
#
# Knobs:
#   TARGET              imgedge (default), nginx, varnish, none
#   EDGE_BIN            imgedge binary; default ${CARGO_TARGET_DIR:-target}/release/imgedge,
#                       the test command's one release build (`cargo build --release --locked`,
#                       run here first; a no-op when it is up to date)
#   CONFORMANCE_DIR     where the suite is installed with npm (default /tmp/http-cache-tests);
#                       the latest results are kept there as results-$TARGET.json
#   CONFORMANCE_MIN     exit 1 when fewer required tests than this pass (for CI)
#   CONFORMANCE_TIMEOUT seconds the suite's client may run (default 300; a run takes ~20 s)
#   CONFORMANCE_KEEP=1  keep the temporary folder (configs, logs) even on success
#   CONFORMANCE_ID=ID   run the single test ID with the client's verbose dump instead of scoring
#   VARNISHD_ARGS       extra varnishd arguments for TARGET=varnish, e.g. "-t 0" (no default TTL)
#
# Exit status: 0 when the suite ran and was scored (whatever the score), 1 when it could not run
# (or the score is below CONFORMANCE_MIN), 2 for a bad knob.
set -euo pipefail

SUITE_VERSION=0.4.5
ME=conformance.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
TARGET=${TARGET:-imgedge}
CONFORMANCE_DIR=${CONFORMANCE_DIR:-/tmp/http-cache-tests}
CONFORMANCE_TIMEOUT=${CONFORMANCE_TIMEOUT:-300}
PKG=$CONFORMANCE_DIR/node_modules/http-cache-tests

log() { printf '%s: %s\n' "$ME" "$*" >&2; }
die() { log "$*"; exit 1; }

case $TARGET in
  imgedge | nginx | varnish | none) ;;
  *) log "TARGET must be imgedge, nginx, varnish or none, not '$TARGET'"; exit 2 ;;
esac
if [[ -n ${CONFORMANCE_MIN:-} && ! $CONFORMANCE_MIN =~ ^[0-9]+$ ]]; then
  log "CONFORMANCE_MIN must be a whole number, not '$CONFORMANCE_MIN'"; exit 2
fi
[[ $CONFORMANCE_TIMEOUT =~ ^[0-9]+$ ]] || { log "CONFORMANCE_TIMEOUT must be seconds"; exit 2; }
command -v node >/dev/null || die "node is required (and npm, to install the suite)"
command -v curl >/dev/null || die "curl is required"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/conformance.XXXXXX")
PIDS=() # processes this script started, stopped in reverse order on exit

# lt_stop: stops a process only while it is still our own child (never a reused PID).
# shellcheck source-path=SCRIPTDIR source=lib/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/lib.sh"

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do lt_stop "${PIDS[i]}"; done
  if [[ $rc -ne 0 || ${CONFORMANCE_KEEP:-0} == 1 ]]; then
    log "temporary folder (configs, logs) kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the suite --------------------------------------------------------------------------------
installed_version() {
  node -e 'try { console.log(require(process.argv[1]).version) } catch { console.log("") }' \
    "$PKG/package.json"
}
if [[ $(installed_version) != "$SUITE_VERSION" ]]; then
  command -v npm >/dev/null || die "npm is required to install http-cache-tests"
  log "installing http-cache-tests@$SUITE_VERSION into $CONFORMANCE_DIR"
  mkdir -p "$CONFORMANCE_DIR"
  timeout 300 npm install --prefix "$CONFORMANCE_DIR" --no-audit --no-fund --loglevel=error \
    "http-cache-tests@$SUITE_VERSION" >"$WORK/npm.log" 2>&1 ||
    { cat "$WORK/npm.log" >&2; die "npm install http-cache-tests@$SUITE_VERSION failed"; }
  [[ $(installed_version) == "$SUITE_VERSION" ]] ||
    die "http-cache-tests@$SUITE_VERSION is not in $PKG after npm install"
fi

# Two free ports on 127.0.0.1 (the suite server, the target).
read -r SPORT PORT < <(node -e '
  const net = require("net"); const ports = []
  const grab = () => { const s = net.createServer(); s.listen(0, "127.0.0.1", () => {
    ports.push(s.address().port); s.close(() => ports.length < 2 ? grab() : console.log(ports.join(" "))) }) }
  grab()')
[[ -n ${SPORT:-} && -n ${PORT:-} && $SPORT != "$PORT" ]] || die "could not pick two free ports"
ORIGIN=http://127.0.0.1:$SPORT

# The suite server calls server.listen(port), i.e. every interface: this preload pins it to
# 127.0.0.1 without touching the package.
cat >"$WORK/loopback.cjs" <<'EOF'
const http = require('http')
const listen = http.Server.prototype.listen
http.Server.prototype.listen = function (port, ...rest) {
  if (rest.length === 0 && /^\d+$/.test(String(port))) return listen.call(this, Number(port), '127.0.0.1')
  return listen.call(this, port, ...rest)
}
EOF

# status URL [curl args...]: the HTTP status (000 when nothing answered), body in $WORK/probe.body
status() {
  local url=$1
  shift
  curl -sS -o "$WORK/probe.body" -w '%{http_code}' --max-time 5 "$@" "$url" 2>/dev/null || true
}

wait_http() { # name pid url: until something answers at url, at most 15 s; fails if pid dies
  local name=$1 pid=$2 url=$3 i code
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    code=$(status "$url")
    [[ $code != 000 ]] && return 0
    sleep 0.1
  done
  log "$name did not answer at $url within 15 s"
  return 1
}

(cd "$PKG" && exec env npm_config_protocol=http npm_config_port="$SPORT" \
  npm_config_pidfile="$WORK/suite-server.pid" \
  node --require "$WORK/loopback.cjs" server/server.mjs) >"$WORK/suite-server.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_http "suite server" "$SERVER_PID" "$ORIGIN/state/conformance-up" ||
  { cat "$WORK/suite-server.log" >&2; die "the suite server did not start"; }

# --- the target -------------------------------------------------------------------------------
start_imgedge() {
  EDGE_BIN=${EDGE_BIN:-}
  if [[ -z $EDGE_BIN ]]; then
    command -v cargo >/dev/null || die "no EDGE_BIN and no cargo to build imgedge"
    (cd "$ROOT" && timeout 1800 cargo build --release --locked --quiet) ||
      die "cargo build --release --locked failed"
    local tdir=${CARGO_TARGET_DIR:-target}
    [[ $tdir == /* ]] || tdir=$ROOT/$tdir
    EDGE_BIN=$tdir/release/imgedge
  fi
  [[ -x $EDGE_BIN ]] || die "imgedge binary not found or not executable: $EDGE_BIN"
  cat >"$WORK/imgedge.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"

[[routes]]
prefix = "/"
upstream = "$ORIGIN"
# RFC 9111 lets a shared cache store Set-Cookie, and the suite checks it does; imgedge's
# default (off) is the safer choice for a public edge.
store_set_cookie = true
# Request headers are an allow-list (docs/routes.md, "Forwarded request headers"): the suite's own
# protocol (Req-Num numbers each request of a test, Surrogate-Capability is echoed back) and the
# headers its Vary tests select by reach its origin as any route's listed headers would.
forward_request_headers = ["req-num", "surrogate-capability", "foo", "bar", "baz", "a", "b", "c", "abc", "other"]

[log]
level = "warn"
EOF
  local out
  if ! out=$(timeout 30 "$EDGE_BIN" --config "$WORK/imgedge.toml" --check-config 2>&1); then
    printf '%s\n' "$out" >&2
    if grep -q 'routes' <<<"$out"; then
      die "this imgedge ($EDGE_BIN) rejects the [[routes]] section the suite needs (a generic route with prefix \"/\" in front of the suite server); config: $WORK/imgedge.toml"
    fi
    die "imgedge rejected the configuration $WORK/imgedge.toml"
  fi
  "$EDGE_BIN" --config "$WORK/imgedge.toml" >"$WORK/target.log" 2>&1 &
  TARGET_PID=$!
  PIDS+=("$TARGET_PID")
}

start_nginx() {
  command -v nginx >/dev/null || die "nginx is not installed"
  local d=$WORK/nginx user=
  mkdir -p "$d/cache" "$d/tmp"
  # Workers run as nobody when started by root, and the temporary folder is private to us.
  [[ $(id -u) == 0 ]] && user="user root;"
  cat >"$d/nginx.conf" <<EOF
$user
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 512; }
http {
  access_log $d/access.log;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  proxy_cache_path $d/cache keys_zone=conformance:10m;
  server {
    listen 127.0.0.1:$PORT;
    location / {
      proxy_pass $ORIGIN;
      proxy_cache conformance;
      proxy_http_version 1.1;
    }
  }
}
EOF
  nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" -t >"$d/check.log" 2>&1 ||
    { cat "$d/check.log" >&2; die "nginx rejected $d/nginx.conf"; }
  nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf" >"$WORK/target.log" 2>&1 &
  TARGET_PID=$!
  PIDS+=("$TARGET_PID")
}

start_varnish() {
  command -v varnishd >/dev/null || die "varnishd is not installed"
  local d=$WORK/varnish
  mkdir -p "$d"
  cat >"$d/default.vcl" <<EOF
vcl 4.1;
backend default {
  .host = "127.0.0.1";
  .port = "$SPORT";
}
EOF
  # -j none: no privilege separation, so the jail user needs no access to our private folder.
  # -T none: no management port.
  local extra=()
  read -ra extra <<<"${VARNISHD_ARGS:-}"
  varnishd -F -j none -n "$d/work" -a "127.0.0.1:$PORT" -T none -f "$d/default.vcl" \
    -s malloc,64m "${extra[@]}" >"$WORK/target.log" 2>&1 &
  TARGET_PID=$!
  PIDS+=("$TARGET_PID")
}

case $TARGET in
  imgedge) start_imgedge ;;
  nginx) start_nginx ;;
  varnish) start_varnish ;;
  none) PORT=$SPORT ;;
esac
BASE=http://127.0.0.1:$PORT
if [[ $TARGET != none ]]; then
  wait_http "$TARGET" "$TARGET_PID" "$BASE/state/conformance-up" ||
    { cat "$WORK/target.log" >&2; die "$TARGET did not start"; }
fi

# --- preflight: the client synchronises with the server through the cache --------------------
# PUT /config/UUID (JSON body, expects 201) and GET /state/UUID (404 "State not found" before any
# test request) must reach the suite server unchanged; otherwise every test is a setup failure.
pre=conformance-preflight-$$-$RANDOM
code=$(status "$BASE/config/$pre" -X PUT -H 'content-type: application/json' --data-binary '[{}]')
[[ $code == 201 ]] || {
  log "PUT $BASE/config/$pre answered $code, not 201: $(head -c 300 "$WORK/probe.body")"
  die "$TARGET does not forward PUT (with its body) to the suite server; the suite cannot run through it"
}
code=$(status "$BASE/state/$pre")
if [[ $code != 404 ]] || ! grep -q "State not found for $pre" "$WORK/probe.body"; then
  log "GET $BASE/state/$pre answered $code: $(head -c 300 "$WORK/probe.body")"
  die "$TARGET does not pass GET /state/... through to the suite server; the suite cannot run through it"
fi

# --- the run ----------------------------------------------------------------------------------
RESULTS=$CONFORMANCE_DIR/results-$TARGET.json
# cli.mjs: base URL from npm_config_base (no trailing slash: it appends /test/UUID etc.), every
# test when the id is empty, else that one test with a dump of its exchanges; JSON results on
# stdout. Run in the background and waited for, so that a signal stops it at once (via the trap).
run_cli() { # id stdout stderr
  (cd "$PKG" && exec timeout "$CONFORMANCE_TIMEOUT" env -u npm_config_id \
    npm_config_base="$BASE" npm_package_config_id="$1" node --no-warnings cli.mjs) >"$2" 2>"$3" &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid"
}
if [[ -n ${CONFORMANCE_ID:-} ]]; then
  log "running test $CONFORMANCE_ID against $TARGET at $BASE"
  run_cli "$CONFORMANCE_ID" /dev/stdout /dev/stderr || die "the suite's client failed or timed out"
  echo "==== the suite server's view (what reached the origin, what it answered)"
  cat "$WORK/suite-server.log"
  exit 0
fi
log "running http-cache-tests@$SUITE_VERSION against $TARGET at $BASE (suite server $ORIGIN)"
started=$(date +%s)
if ! run_cli "" "$WORK/results.json" "$WORK/cli.log"; then
  cat "$WORK/cli.log" >&2
  die "the suite's client failed or did not finish within ${CONFORMANCE_TIMEOUT} s"
fi
elapsed=$(($(date +%s) - started))
if [[ -s $WORK/cli.log ]]; then
  log "the suite's client wrote to stderr:"
  cat "$WORK/cli.log" >&2
fi
node -e 'const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  if (typeof r !== "object" || !Object.keys(r).length) process.exit(1)' "$WORK/results.json" 2>/dev/null ||
  { head -c 2000 "$WORK/results.json" >&2; die "the suite's client printed no JSON results"; }
cp "$WORK/results.json" "$RESULTS"
if [[ $TARGET != none ]] && ! kill -0 "$TARGET_PID" 2>/dev/null; then
  log "warning: $TARGET exited during the run (log below)"
  cat "$WORK/target.log" >&2
fi
log "suite finished in ${elapsed} s; results in $RESULTS"

min_args=()
[[ -n ${CONFORMANCE_MIN:-} ]] && min_args=(--min "$CONFORMANCE_MIN")
rc=0
node "$HERE/lib/conformance-score.mjs" --suite "$PKG" "${min_args[@]}" "$WORK/results.json" || rc=$?
case $rc in
  0) ;;
  3) die "below CONFORMANCE_MIN=$CONFORMANCE_MIN" ;;
  *) die "scoring failed" ;;
esac
