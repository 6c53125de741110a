#!/usr/bin/env bash
# Collapsed forwarding under load: CLIENTS simultaneous clients on one cold ~3.9 MB image served by
# a rate-limited origin (4 MB/s per response), through imgedge, then through nginx proxy_cache
# (proxy_cache_lock on) and Varnish (streaming) in front of the same origin, each started fresh.
# Reports origin requests per target and first-byte / total times (loadtest/collapse.py), and
# writes loadtest/reports/collapse-<UTC timestamp>.md.
#
# Usage: bash loadtest/collapse.sh [CLIENTS=200]
#
# Env (none of these is IMGEDGE_*: those are imgedge configuration keys):
#   CORPUS                  image folder with MANIFEST.tsv (default /tmp/imgproxy-corpus)
#   EDGE_BIN                imgedge binary (default /tmp/imgedge-collapse-bin, else
#                           target/release/imgedge; this script never builds)
#   COLLAPSE_RATE           origin body rate, bytes/s per response (default 4000000)
#   COLLAPSE_TARGET_BYTES   pick the image closest to this size, <= 5242880 (default 3900000)
#   COLLAPSE_TIMEOUT        overall limit of each collapse.py run, seconds (default 120)
#   COLLAPSE_PEERS          0 skips nginx and Varnish (default 1)
#   COLLAPSE_VARNISH_POOL_MIN  Varnish thread_pool_min (per pool, 2 pools; default
#                           max(50, CLIENTS/2 + 25): every client holds a worker thread while it
#                           streams, and a cold varnishd with too few threads makes the surplus
#                           clients, and the backend fetch itself, wait for new threads)
#   COLLAPSE_KEEP           1 keeps the temp folder (logs, per-client JSON) even on success
#   LT_WAIT_TRIES           start-up waits, in 0.1 s steps (default 100; from lib.sh)
#
# Exit: 0 all runs byte-exact and imgedge met the target (1 origin request, follower median first
# byte < 20 ms); 1 an error, mismatch or start-up failure; 3 runs clean but the target missed.
# Everything started here is stopped on exit, by PID, also on failure or Ctrl-C.
set -euo pipefail

# shellcheck source=loadtest/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

CLIENTS=${1:-200}
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || lt_die "usage: bash loadtest/collapse.sh [CLIENTS=200]"
RATE=${COLLAPSE_RATE:-4000000}
TARGET_BYTES=${COLLAPSE_TARGET_BYTES:-3900000}
RUN_TIMEOUT=${COLLAPSE_TIMEOUT:-120}
PEERS=${COLLAPSE_PEERS:-1}
VARNISH_POOL_MIN=${COLLAPSE_VARNISH_POOL_MIN:-$(((CLIENTS + 1) / 2 + 25))}
((VARNISH_POOL_MIN >= 50)) || VARNISH_POOL_MIN=50
MAX_CACHEABLE=5242880
FOLLOWER_TARGET_MS=20

command -v python3 >/dev/null || lt_die "python3 is required"
command -v curl >/dev/null || lt_die "curl is required"
lt_ensure_corpus
if [[ -z ${EDGE_BIN:-} ]]; then
  if [[ -x /tmp/imgedge-collapse-bin ]]; then
    EDGE_BIN=/tmp/imgedge-collapse-bin
  else
    EDGE_BIN=$LT_ROOT/target/release/imgedge
  fi
fi
[[ -x $EDGE_BIN ]] || lt_die "no imgedge binary at $EDGE_BIN (cargo build --release, or set EDGE_BIN)"
if ((CLIENTS + 64 > $(ulimit -n))); then
  ulimit -n $((CLIENTS + 256)) 2>/dev/null || lt_die "ulimit -n $(ulimit -n) is too low for $CLIENTS clients"
fi

# -- the image ----------------------------------------------------------------------------------
read -r NAME BYTES SHA < <(awk -F'\t' -v t="$TARGET_BYTES" -v max="$MAX_CACHEABLE" '
  $2 ~ /^[0-9]+$/ && $2 + 0 <= max && $4 != "" {
    d = $2 - t; if (d < 0) d = -d
    if (best == "" || d < bd) { best = $1 "\t" $2 "\t" $4; bd = d }
  }
  END { if (best != "") print best }' "$MANIFEST") || true
[[ -n ${NAME:-} && -f $CORPUS/$NAME ]] || lt_die "no image <= $MAX_CACHEABLE bytes in $MANIFEST"
[[ $NAME =~ ^[A-Za-z0-9._-]+$ ]] || lt_die "image name needs URL-encoding, not supported: $NAME"

# -- processes and cleanup ----------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-collapse.XXXXXX")
chmod 755 "$TMP" # nginx workers and the Varnish child drop privileges and must reach their dirs
ORIGIN_PID='' EDGE_PID='' NGINX_PID='' VARNISH_PID='' PROBE_PID=''

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT
  lt_stop "$PROBE_PID"
  lt_stop "$EDGE_PID"
  lt_stop "$NGINX_PID"
  lt_stop "$VARNISH_PID"
  lt_stop "$ORIGIN_PID"
  if [[ $rc -ne 0 && $rc -ne 3 || ${COLLAPSE_KEEP:-0} == 1 ]]; then
    lt_log "logs kept in $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r OPORT EPORT NPORT VPORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss:
    s.close()') || true
[[ -n ${VPORT:-} ]] || lt_die "could not pick free ports"
ORIGIN=http://127.0.0.1:$OPORT
UPSTREAM_URL=$ORIGIN/$NAME

python3 "$LT_DIR/origin.py" --corpus "$CORPUS" --port "$OPORT" --rate "$RATE" >"$TMP/origin.log" 2>&1 &
ORIGIN_PID=$!
lt_wait_http origin "$ORIGIN_PID" "$ORIGIN/__up" "$TMP/origin.log" || exit 1
lt_log "image $NAME ($BYTES bytes), origin $ORIGIN at $RATE B/s per response, $CLIENTS clients, logs in $TMP"

origin_reset() { curl -fsS -o /dev/null --max-time 5 "$ORIGIN/__reset" || lt_die "origin /__reset failed"; }
origin_hits() { # prints the origin's request count for /NAME
  curl -fsS --max-time 5 "$ORIGIN/__hits" |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], 0))' "/$NAME"
}

FAILED=0
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
# run_probe LABEL URL: runs collapse.py, leaves $TMP/LABEL.json (summary) and LABEL.hits.
run_probe() {
  local label=$1 url=$2 rc=0
  origin_reset
  printf '%s\n' "python3 loadtest/collapse.py --url '$url' --clients $CLIENTS --sha256 $SHA --bytes $BYTES --timeout $RUN_TIMEOUT" >"$TMP/$label.cmd"
  # In the background and waited for, so that a TERM/INT reaches the trap at once.
  timeout -k 5 $((${RUN_TIMEOUT%.*} + 30)) python3 "$LT_DIR/collapse.py" --url "$url" --clients "$CLIENTS" \
    --sha256 "$SHA" --bytes "$BYTES" --timeout "$RUN_TIMEOUT" --details "$TMP/$label.clients.jsonl" \
    >"$TMP/$label.json" 2>"$TMP/$label.err" &
  PROBE_PID=$!
  wait "$PROBE_PID" || rc=$?
  PROBE_PID=''
  sleep 0.2 # let any straggling origin request register
  origin_hits >"$TMP/$label.hits" || echo "?" >"$TMP/$label.hits"
  if ((rc != 0)); then
    FAILED=1
    lt_log "$label: collapse.py exited $rc"
    [[ -s $TMP/$label.err ]] && tail -n 20 "$TMP/$label.err" >&2
  fi
  [[ -s $TMP/$label.json ]] || echo '{}' >"$TMP/$label.json"
  lt_log "$label: origin requests $(cat "$TMP/$label.hits"); $(head -c 600 "$TMP/$label.json")"
}

# -- imgedge ------------------------------------------------------------------------------------
IMGEDGE_SERVER__LISTEN=127.0.0.1:$EPORT \
  IMGEDGE_UPSTREAM__ALLOWED_HOSTS=127.0.0.1:$OPORT \
  IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS=127.0.0.1:$OPORT \
  IMGEDGE_LOG__LEVEL=warn \
  "$EDGE_BIN" >"$TMP/imgedge.log" 2>&1 &
EDGE_PID=$!
lt_wait_http imgedge "$EDGE_PID" "http://127.0.0.1:$EPORT/health" "$TMP/imgedge.log" || exit 1
run_probe imgedge "http://127.0.0.1:$EPORT/image-proxy?url=$UPSTREAM_URL"
curl -fsS --max-time 5 "http://127.0.0.1:$EPORT/metrics" >"$TMP/imgedge.metrics" 2>/dev/null || true
if ! kill -0 "$EDGE_PID" 2>/dev/null; then
  lt_log "imgedge exited during the run; last lines of its log:"
  lt_show_log "$TMP/imgedge.log" 50
  FAILED=1
fi
lt_stop "$EDGE_PID"
EDGE_PID=''

# -- nginx proxy_cache + proxy_cache_lock (as loadtest/peers/nginx.conf.in) -----------------------
PEER_NOTE=''
if [[ $PEERS == 1 ]] && command -v nginx >/dev/null; then
  mkdir -p "$TMP/nginx"
  cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path $TMP/nginx/client_body;
  proxy_temp_path $TMP/nginx/proxy_temp;
  proxy_cache_path $TMP/nginx/cache levels=1:2 keys_zone=collapse:16m max_size=1g inactive=60m use_temp_path=off;
  server {
    listen 127.0.0.1:$NPORT;
    proxy_cache collapse;
    proxy_cache_valid 200 1h;
    proxy_cache_lock on;
    proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    add_header X-Cache \$upstream_cache_status;
    location = /__up { return 200 "up\n"; }
    location = /image-proxy { proxy_cache_key \$arg_url; proxy_pass \$arg_url; }
  }
}
EOF
  nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" >"$TMP/nginx/stdout.log" 2>&1 &
  NGINX_PID=$!
  if lt_wait_http nginx "$NGINX_PID" "http://127.0.0.1:$NPORT/__up" "$TMP/nginx/stdout.log"; then
    run_probe nginx "http://127.0.0.1:$NPORT/image-proxy?url=$UPSTREAM_URL"
  else
    FAILED=1
    lt_show_log "$TMP/nginx/error.log" 20
  fi
  lt_stop "$NGINX_PID"
  NGINX_PID=''
elif [[ $PEERS == 1 ]]; then
  PEER_NOTE+="nginx not installed (loadtest/peers.sh start installs it). "
fi

# -- Varnish, streaming (as loadtest/peers/varnish.vcl.in) ---------------------------------------
if [[ $PEERS == 1 ]] && command -v varnishd >/dev/null; then
  mkdir -p "$TMP/varnish"
  cat >"$TMP/varnish/collapse.vcl" <<EOF
vcl 4.1;
import std;
backend origin { .host = "127.0.0.1"; .port = "$OPORT"; }
sub vcl_recv {
  if (req.url == "/__up") { return (synth(200, "up")); }
  if (req.url ~ "^/image-proxy\?url=http://127\.0\.0\.1:$OPORT/") {
    set req.url = regsub(req.url, "^/image-proxy\?url=http://127\.0\.0\.1:$OPORT", "");
  }
  return (hash);
}
sub vcl_backend_response {
  set beresp.do_stream = true;
  if (std.integer(beresp.http.Content-Length, 0) > 5242880) {
    set beresp.uncacheable = true;
    set beresp.ttl = 120s;
  }
}
sub vcl_deliver {
  if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
}
EOF
  varnishd -F -a "127.0.0.1:$VPORT" -T none -f "$TMP/varnish/collapse.vcl" -s malloc,256M \
    -n "$TMP/varnish/work" -p thread_pool_min="$VARNISH_POOL_MIN" >"$TMP/varnish/varnishd.log" 2>&1 &
  VARNISH_PID=$!
  if lt_wait_http varnish "$VARNISH_PID" "http://127.0.0.1:$VPORT/__up" "$TMP/varnish/varnishd.log"; then
    run_probe varnish "http://127.0.0.1:$VPORT/image-proxy?url=$UPSTREAM_URL"
  else
    FAILED=1
  fi
  lt_stop "$VARNISH_PID"
  VARNISH_PID=''
elif [[ $PEERS == 1 ]]; then
  PEER_NOTE+="varnishd not installed (loadtest/peers.sh start installs it). "
fi

# -- report -------------------------------------------------------------------------------------
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$LT_DIR/reports"
REPORT=$LT_DIR/reports/collapse-$STAMP.md
COMMIT=$(cd "$LT_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$LT_ROOT" && git status --porcelain -- src Cargo.toml Cargo.lock config 2>/dev/null) ]]; then
  COMMIT+=" (src/Cargo/config modified)"
fi
BIN_ID="sha256 $(sha256sum "$EDGE_BIN" | cut -c1-12), mtime $(date -u -r "$EDGE_BIN" +%Y-%m-%dT%H:%M:%SZ)"
CMDLINE="bash loadtest/collapse.sh $CLIENTS"
for v in CORPUS EDGE_BIN COLLAPSE_RATE COLLAPSE_TARGET_BYTES COLLAPSE_TIMEOUT COLLAPSE_PEERS COLLAPSE_VARNISH_POOL_MIN; do
  [[ -n ${!v:-} ]] && CMDLINE="$v=${!v} $CMDLINE"
done
LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')
IMG_WARN=$(grep -cEi 'WARN|ERROR|panic' "$TMP/imgedge.log" || true)

verdict=0
python3 - "$TMP" "$REPORT" "$FOLLOWER_TARGET_MS" <<EOF || verdict=$?
import json, os, re, sys
tmp, report, target_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])

def load(label):
    p = os.path.join(tmp, label + ".json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        s = json.load(f)
    with open(os.path.join(tmp, label + ".hits")) as f:
        s["_hits"] = f.read().strip()
    with open(os.path.join(tmp, label + ".cmd")) as f:
        s["_cmd"] = f.read().strip()
    return s

def fmt(x):
    return "–" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")

def g(s, grp, key, stat):
    d = ((s.get(grp) or {}).get(key)) or {}
    return d.get(stat)

def labels(s):
    parts = []
    for k, name in (("cache_status", "Cache-Status"), ("x_cache", "X-Cache")):
        c = {v: n for v, n in (s.get(k) or {}).items() if v != "(none)"}
        if c:
            parts.append(name + ": " + ", ".join(f"\`{v}\` ×{n}" for v, n in c.items()))
    return "; ".join(parts) or "–"

edge, nginx, varnish = load("imgedge"), load("nginx"), load("varnish")
rows, exit_code = [], 0
if edge and edge.get("clients"):
    fm = g(edge, "followers", "first_byte_ms", "median")
    ok = edge["_hits"] == "1" and fm is not None and fm < target_ms
    met = "**met**" if ok else "**missed**"
    rows.append((f"imgedge followers (n={edge['followers']['n']})", f"1 request, median < {target_ms:.0f} ms: {met}", edge, "followers"))
    rows.append((f"imgedge others (n={edge['others']['n']})", "", edge, "others"))
    if not ok:
        exit_code = 3
else:
    exit_code = 1
if nginx and nginx.get("clients"):
    rows.append(("nginx proxy_cache_lock (all)", "", nginx, "all"))
if varnish and varnish.get("clients"):
    rows.append(("Varnish streaming (all)", "", varnish, "all"))
for s in (edge, nginx, varnish):
    if s is not None and (s.get("errors", 1) or s.get("mismatches", 1)):
        exit_code = 1

out = []
out.append("# Collapsed forwarding: $CLIENTS clients, one cold image at $RATE B/s")
out.append("")
out.append("- When: $STAMP; binary \`$EDGE_BIN\` ($BIN_ID; repo HEAD now $COMMIT, which need not be what the binary was built from); $(nproc) cores, load average $LOADAVG_START at the start and $LOADAVG_END at the end (the probe, origin and target share these cores: other work on the machine moves the numbers).")
out.append("- Image: \`$NAME\`, $BYTES bytes (closest to $TARGET_BYTES that is ≤ $MAX_CACHEABLE), sha256 \`$SHA\`.")
out.append("- Origin: \`loadtest/origin.py --rate $RATE\` (each response body paced to $RATE B/s, so the body takes about %.2f s)." % ($BYTES / $RATE))
out.append("- Each target started fresh (cold) and measured alone; the origin's \`/__hits\` reset before each run and read after it.")
out.append("- nginx: \`proxy_cache\` + \`proxy_cache_lock on\` (lock timeout left at its 5 s default), 2 workers, disk cache in a temp folder. Varnish: malloc 256 MB, \`do_stream\`, \`thread_pool_min=$VARNISH_POOL_MIN\` × 2 pools (loadtest/peers.sh uses 50: too few for $CLIENTS streaming clients on a cold varnishd, see loadtest/collapse.sh).")
out.append("- Client: \`loadtest/collapse.py\`: $CLIENTS connections opened first, then every request written in one tight loop; times are from each client's request being written.")
out.append("")
out.append("Command:")
out.append("")
out.append("\`\`\`sh")
out.append("$CMDLINE")
out.append("\`\`\`")
out.append("")
out.append("| target | goal | origin requests | labels | first byte median ms | p90 | max | total median ms | errors / mismatches |")
out.append("|---|---|--:|---|--:|--:|--:|--:|--:|")
for name, goal, s, grp in rows:
    out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        name, goal, s["_hits"], labels(s) if grp != "others" else "",
        fmt(g(s, grp, "first_byte_ms", "median")), fmt(g(s, grp, "first_byte_ms", "p90")),
        fmt(g(s, grp, "first_byte_ms", "max")), fmt(g(s, grp, "total_ms", "median")),
        "%d / %d" % (s["errors"], s["mismatches"]) if grp != "others" else ""))
out.append("")
out.append("\"followers\" are imgedge responses whose Cache-Status contains \`collapsed\`; \"others\" the rest (the leader, \`stored\`, and any hits). nginx and Varnish send no Cache-Status, so their row is over all clients; they label responses with X-Cache (nginx: \`\$upstream_cache_status\`, where requests that waited on proxy_cache_lock show as HIT; Varnish: HIT when \`obj.hits > 0\`, which includes requests that streamed a busy object).")
out.append("")
out.append("Per run, over all clients (ms): response head; send spread (first to last request written); client lag (how long after its arrival the probe's coroutine got to the first body byte: the probe's own backlog, which the times above exclude, since they are taken when the event loop read the bytes from the socket).")
out.append("")
out.append("| run | head median | head p90 | send spread | client lag median | client lag max |")
out.append("|---|--:|--:|--:|--:|--:|")
for label, s in (("imgedge", edge), ("nginx", nginx), ("varnish", varnish)):
    if s and s.get("clients"):
        out.append("| %s | %s | %s | %s | %s | %s |" % (label, fmt(g(s, "all", "head_ms", "median")), fmt(g(s, "all", "head_ms", "p90")), fmt(s.get("send_spread_ms")), fmt(g(s, "all", "client_lag_ms", "median")), fmt(g(s, "all", "client_lag_ms", "max"))))
out.append("")
metrics = os.path.join(tmp, "imgedge.metrics")
if os.path.exists(metrics):
    keep = [l for l in open(metrics) if re.match(r"imgedge_(collapsed_total|upstream_requests_total)", l)]
    if keep:
        out.append("imgedge metrics after its run:")
        out.append("")
        out.append("\`\`\`")
        out.extend(l.rstrip("\n") for l in keep)
        out.append("\`\`\`")
        out.append("")
out.append("imgedge log (level warn): $IMG_WARN warning/error/panic lines.")
notes = "$PEER_NOTE".strip()
if notes:
    out.append("")
    out.append("Note: " + notes)
errs = [(l, s) for l, s in (("imgedge", edge), ("nginx", nginx), ("varnish", varnish)) if s and s.get("error_samples")]
if errs:
    out.append("")
    out.append("Errors:")
    out.append("")
    for l, s in errs:
        for e in s["error_samples"]:
            out.append(f"- {l}: {e}")
out.append("")
out.append("Per-run probe commands:")
out.append("")
out.append("\`\`\`sh")
for s in (edge, nginx, varnish):
    if s:
        out.append(s["_cmd"])
out.append("\`\`\`")
with open(report, "w") as f:
    f.write("\n".join(out) + "\n")
print("\n".join(out))
sys.exit(exit_code)
EOF
lt_log "report: ${REPORT#"$LT_ROOT"/}"
if ((IMG_WARN > 0)); then
  lt_log "imgedge log has $IMG_WARN warning/error/panic lines:"
  grep -Ei 'WARN|ERROR|panic' "$TMP/imgedge.log" | head -n 20 >&2
fi
((FAILED == 0)) || exit 1
exit "$verdict"
