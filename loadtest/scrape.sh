#!/usr/bin/env bash
# How long a /metrics scrape takes, idle and under load (target: p99 under 5 ms under load).
#
#   bash loadtest/scrape.sh
#
# Starts, on 127.0.0.1 only, a static origin (loadtest/origin.py over the PNGs that
# tests/operator/images.py writes) and imgedge in front of it (Supabase route to the origin, a
# disk tier in a temporary folder, so that the scrape reads every tier's gauges), warms one image
# into the memory tier, then scrapes /metrics N times every INTERVAL_MS over one keep-alive
# connection, as Prometheus does: first idle, then while wrk sends memory-tier hits on that image
# with 32 connections. Each scrape is timed from sending the request to the last byte of the
# body, and by imgedge itself (the access line's duration_ms: only /metrics requests are logged).
# Writes loadtest/reports/scrape-<UTC>.md (p50, p99 and max per phase, seen by the scraper and by
# imgedge, the body's size and series, wrk's throughput and latency) and prints it. Every
# process it starts is stopped by PID.
#
# Knobs: N (200 scrapes per phase), INTERVAL_MS (50), CONNECTIONS (32), EDGE_BIN (or IMGEDGE_BIN,
# as tests/operator/run.sh calls it; default target/release/imgedge, under CARGO_TARGET_DIR when
# set, built with `cargo build --release --locked` only when missing), REPORT_DIR (loadtest/reports), SCRAPER_NICE (-10 as root; 0: the
# scraper at the same priority as wrk and imgedge). Needs python3 and curl; wrk is
# installed from Debian when missing (as root).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
n=${N:-200}
interval_ms=${INTERVAL_MS:-50}
conns=${CONNECTIONS:-32}
report_dir=${REPORT_DIR:-$here/reports}
[[ $n =~ ^[0-9]+$ && $n -ge 10 && $n -le 5000 ]] || { echo "scrape.sh: N must be 10-5000" >&2; exit 2; }
[[ $interval_ms =~ ^[0-9]+$ && $interval_ms -ge 1 && $interval_ms -le 1000 ]] || { echo "scrape.sh: INTERVAL_MS must be 1-1000" >&2; exit 2; }
[[ $conns =~ ^[0-9]+$ && $conns -ge 1 && $conns -le 1000 ]] || { echo "scrape.sh: CONNECTIONS must be 1-1000" >&2; exit 2; }
log() { printf 'scrape.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

if ! command -v wrk >/dev/null; then
  ((EUID == 0)) || die "wrk is required: apt-get install wrk (as root)"
  log "installing wrk with apt-get"
  bash "$here/lib/apt-install.sh" wrk || die "apt-get install wrk failed"
fi
bin=${EDGE_BIN:-${IMGEDGE_BIN:-}}
if [[ -z $bin ]]; then
  tdir=${CARGO_TARGET_DIR:-target}
  [[ $tdir == /* ]] || tdir=$repo/$tdir
  bin=$tdir/release/imgedge
  if [[ ! -x $bin ]]; then
    log "building imgedge: cargo build --release --locked"
    (cd "$repo" && timeout 1800 cargo build --release --locked --quiet) || die "cargo build --release failed"
  fi
fi
[[ -x $bin ]] || die "imgedge binary not found or not executable: $bin"
bin_sha=$(sha256sum <"$bin" | cut -c1-12)
bin_version=$(env -u IMGEDGE_BIN "$bin" --version 2>/dev/null | head -n1 || true)

work=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-scrape.XXXXXX")
pids=()
cleanup() {
  local rc=$? p i
  trap - EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if ((rc)); then log "logs kept in $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_http() { # name pid url log
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$2" 2>/dev/null || { log "$1 exited; its log:"; tail -n 40 "$4" >&2; return 1; }
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$3" || true) == 200 ]] && return 0
    sleep 0.1
  done
  log "$1 did not answer 200 on $3 in 15 s"
  return 1
}

read -r oport port < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss:
    s.close()')
base=http://127.0.0.1:$port
python3 "$repo/tests/operator/images.py" "$work/images"
python3 "$here/origin.py" --corpus "$work/images" --port "$oport" >"$work/origin.log" 2>&1 &
pids+=($!)
wait_http origin "$!" "http://127.0.0.1:$oport/__up" "$work/origin.log"
env -u IMGEDGE_BIN IMGEDGE_SERVER__LISTEN="127.0.0.1:$port" \
  IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS="[\"127.0.0.1:$oport\"]" \
  IMGEDGE_SUPABASE__UPSTREAM="http://127.0.0.1:$oport" \
  IMGEDGE_CACHE__DISK_DIR="$work/disk" IMGEDGE_CACHE__DISK_CAPACITY_BYTES=67108864 \
  IMGEDGE_LOG__LEVEL='warn,[request{route=metrics}]=info' "$bin" >"$work/imgedge.log" 2>&1 &
pids+=($!)
edge_pid=$!
wait_http imgedge "$edge_pid" "$base/health/live" "$work/imgedge.log"

image=gradient-64.png
path=/storage/v1/object/public/b/$image
curl -fsS -o /dev/null "$base$path" || die "the first fetch of $path failed"
status=$(curl -fsS -o /dev/null -D - "$base$path" | tr -d '\r' | sed -n 's/^cache-status: //Ip')
[[ $status == *"hit; detail=memory"* ]] || die "the second fetch of $path was not a memory hit: $status"

# N scrapes, one every INTERVAL_MS, over one keep-alive connection; one line of JSON per phase.
# The scraper runs at nice -10 when it may (root): it shares the 2 cores with wrk, and a scraper
# starved of CPU would time its own waiting, which Prometheus on another host does not do.
nice_scraper=()
scraper_nice=${SCRAPER_NICE:--10}
[[ $scraper_nice =~ ^-?[0-9]+$ ]] || die "SCRAPER_NICE must be an integer"
if ((EUID == 0 && scraper_nice != 0)); then nice_scraper=(nice -n "$scraper_nice"); fi
scrape() { # phase
  "${nice_scraper[@]}" python3 - "$port" "$n" "$interval_ms" "$1" <<'PY'
import http.client, json, sys, time
port, n, interval, phase = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) / 1000, sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
ms, size, series, errors = [], 0, 0, 0
start = time.monotonic()
for i in range(n):
    due = start + i * interval
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    t0 = time.perf_counter()
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        body = r.read()
    except (OSError, http.client.HTTPException):
        errors += 1
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        continue
    ms.append((time.perf_counter() - t0) * 1000)
    if r.status != 200:
        errors += 1
    size = len(body)
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
ms.sort()
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))] if ms else float("nan")
print(json.dumps({"phase": phase, "n": len(ms), "errors": errors, "p50": q(0.50), "p90": q(0.90),
                  "p99": q(0.99), "max": ms[-1] if ms else float("nan"), "mean": sum(ms) / len(ms) if ms else float("nan"),
                  "bytes": size, "series": series}))
PY
}

load_before=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?')
log "idle: $n scrapes every $interval_ms ms"
idle=$(scrape idle)
# wrk runs through the whole loaded phase: a second of warm-up, the scrapes, a second after
duration=$(((n * interval_ms + 999) / 1000 + 3))
log "under load: wrk -t2 -c$conns -d${duration}s on $path (memory-tier hits), $n scrapes"
wrk -t2 -c"$conns" -d"${duration}s" --latency "$base$path" >"$work/wrk.txt" 2>&1 &
pids+=($!)
wrk_pid=$!
sleep 1
loaded=$(scrape load)
wait "$wrk_pid" || die "wrk failed: $(cat "$work/wrk.txt")"
hits_after=$(curl -fsS "$base/metrics" | awk '$1 ~ /^imgedge_cache_requests_total\{.*tier="memory".*result="hit"/ {print $2}')

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$report_dir"
report=$report_dir/scrape-$stamp.md
python3 - "$idle" "$loaded" "$work/wrk.txt" "$n" "$interval_ms" "$conns" "$duration" "$bin_version" "$bin_sha" "$stamp" "${hits_after:-?}" "$image" "$work/imgedge.log" "$load_before" "${nice_scraper[*]:-scraper not reniced}" >"$report" <<'PY'
import json, os, re, sys
idle, load = json.loads(sys.argv[1]), json.loads(sys.argv[2])
wrk = open(sys.argv[3]).read()
n, interval, conns, duration, version, sha, stamp, hits, image, edge_log, load_before, nice = sys.argv[4:16]
# imgedge's own durations of the scrapes, in order: the idle phase's, then the loaded phase's
own = [float(m) for m in re.findall(r'route="metrics".*duration_ms=([\d.]+)', open(edge_log).read())]
own_idle, own_load = sorted(own[:idle["n"]]), sorted(own[idle["n"]:idle["n"] + load["n"]])
qs = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
rps = re.search(r"Requests/sec:\s*([\d.]+)", wrk)
lat = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", wrk, re.M))
non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", wrk)
sockerr = re.search(r"Socket errors:(.*)", wrk)
ok = load["p99"] < 5.0 and load["errors"] == 0 and idle["errors"] == 0
load1 = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
print(f"# /metrics scrape latency under load ({stamp})\n")
print(f"Command: `N={n} INTERVAL_MS={interval} CONNECTIONS={conns}{'' if nice.startswith('nice -n -10') else ' SCRAPER_NICE=0' if 'not' in nice else ' SCRAPER_NICE=' + nice.split()[-1]} bash loadtest/scrape.sh`; binary `{version}`, "
      f"sha256 {sha}…; {os.cpu_count()} cores, load average {load_before} before the run and {load1} at the end "
      f"(anything else running on the machine shows there). imgedge with its defaults plus a "
      f"disk tier and the Supabase route to loadtest/origin.py; the load is wrk -t2 -c{conns} -d{duration}s on one "
      f"{image} held in the memory tier; the scraper is one keep-alive connection, one scrape every {interval} ms, "
      f"timed from the request to the body's last byte, as Prometheus reads it ({nice}). imgedge's own time is its "
      f"access line's duration_ms for each scrape.\n")
print("| phase | scrapes | errors | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
print("|---|---|---|---|---|---|---|---|")
for p in (idle, load):
    print(f"| {p['phase']}, seen by the scraper | {p['n']} | {p['errors']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | {p['max']:.2f} | {p['mean']:.2f} |")
for name, v in (("idle", own_idle), ("load", own_load)):
    if v:
        print(f"| {name}, imgedge's own (duration_ms) | {len(v)} | | {qs(v, .5):.2f} | {qs(v, .9):.2f} | {qs(v, .99):.2f} | {v[-1]:.2f} | {sum(v) / len(v):.2f} |")
print()
print(f"Body: {load['bytes']} bytes, {load['series']} samples.")
print(f"wrk: {rps.group(1) if rps else '?'} requests/s, latency p50 {lat.get('50', '?')}, p90 {lat.get('90', '?')}, "
      f"p99 {lat.get('99', '?')}; non-2xx: {non2xx.group(1) if non2xx else 0}"
      + (f"; socket errors:{sockerr.group(1)}" if sockerr else "")
      + f"; memory hits counted by imgedge at the end: {hits}.\n")
print(f"Target, p99 under 5 ms under load, as the scraper sees it: **{'met' if ok else 'missed'}** ({load['p99']:.2f} ms; "
      f"a memory hit's p99 under the same load: {lat.get('99', '?')}).")
PY
cat "$report"
log "report: $report"
