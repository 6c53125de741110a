#!/usr/bin/env bash
# The operator's files, tested: the Prometheus alerting rules, their unit tests and the Grafana
# dashboard, against a real imgedge scraped by a real Prometheus.
#
#   bash tests/operator/run.sh
#
# 1. `promtool check rules` and `promtool test rules` on config/prometheus/, and every alert of
#    imgedge-rules.yml has a unit test that fires and one that does not (check.py coverage).
# 2. config/grafana/imgedge.json is valid: it parses, every panel has a query, no panel names a
#    datasource other than the `datasource` variable (check.py dashboard).
# 3. On 127.0.0.1 only: a static origin (loadtest/origin.py, paced so that concurrent misses
#    collapse) over a folder of generated PNGs (images.py), a redis-server, three imgedge
#    instances sharing it (A: disk and shared tiers, rate limited per client; B: shared tier
#    only; C: a memory budget below its RSS, so it sheds), and Prometheus scraping their /metrics
#    every second with the rules loaded (temporary config and storage). A ~10 s load
#    (check.py load: misses, hits, collapsed misses, renders, a 404, bad requests, a failed
#    render, a client over its rate, shared-tier hits, shed requests), a few scrapes, then every
#    panel's query through /api/v1/query must return series (a renamed metric fails here, naming
#    the panel), and every rule must evaluate without error (check.py query).
#
# Prints `operator: N rules, M rule tests, P panels checked`; exits non-zero on any failure.
# Every process it starts is stopped by PID on exit; the work folder (logs) is kept on failure or
# with OPERATOR_KEEP=1; OPERATOR_VERBOSE=1 prints how many series each query returned.
#
# Needs python3, curl and, from Debian, prometheus (promtool 2.42 comes with it) and
# redis-server: installed with apt-get when missing (as root), with a policy-rc.d that keeps
# their services from starting. The binary: IMGEDGE_BIN, default target/release/imgedge (under
# CARGO_TARGET_DIR when set), built with `cargo build --release --locked` only when that is
# missing. OPERATOR_LOAD_SECONDS (10).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
rules=$root/config/prometheus/imgedge-rules.yml
rule_tests=$root/config/prometheus/imgedge-rules.test.yml
dashboard=$root/config/grafana/imgedge.json
load_seconds=${OPERATOR_LOAD_SECONDS:-10}

log() { printf 'operator: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---- tools ------------------------------------------------------------------------------------

apt_install() { # packages...: Debian packages, their services kept from starting
  log "installing $* with apt-get (services not started)"
  bash "$root/loadtest/lib/apt-install.sh" "$@" || die "apt-get install $* failed"
}

for tool in python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
need=()
{ command -v promtool >/dev/null && command -v prometheus >/dev/null; } || need+=(prometheus)
command -v redis-server >/dev/null || need+=(redis-server)
((${#need[@]} == 0)) || apt_install "${need[@]}"
hash -r

# ---- 1. rules -----------------------------------------------------------------------------------

promtool check rules "$rules" >&2 || die "promtool check rules failed"
promtool test rules "$rule_tests" >&2 || die "promtool test rules failed"
python3 "$here/check.py" coverage "$rules" "$rule_tests" >&2 || die "an alert lacks a unit test"
n_rule_tests=$(grep -c '^ *- eval_time:' "$rule_tests")

# ---- 2. dashboard ---------------------------------------------------------------------------------

python3 "$here/check.py" dashboard "$dashboard" >&2 || die "the dashboard is not valid"

# ---- 3. against a real imgedge and Prometheus -----------------------------------------------------

bin=${IMGEDGE_BIN:-}
if [[ -z $bin ]]; then
  tdir=${CARGO_TARGET_DIR:-target}
  [[ $tdir == /* ]] || tdir=$root/$tdir
  bin=$tdir/release/imgedge
  if [[ ! -x $bin ]]; then
    log "building imgedge: cargo build --release --locked"
    (cd "$root" && cargo build --release --locked --quiet) || die "cargo build --release failed"
  fi
fi
[[ -x $bin ]] || die "imgedge binary not found or not executable: $bin"

work=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-operator.XXXXXX")
pids=()
# shellcheck disable=SC2329 # run by the EXIT trap
cleanup() {
  local rc=$? pid i
  trap - EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $rc -ne 0 || ${OPERATOR_KEEP:-0} == 1 ]]; then
    log "work folder (logs) kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_http() { # name pid url log: up to 15 s for a 200
  local i
  for ((i = 0; i < 150; i++)); do
    kill -0 "$2" 2>/dev/null || { log "$1 exited; its log:"; tail -n 40 "$4" >&2; return 1; }
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$3" || true) == 200 ]] && return 0
    sleep 0.1
  done
  log "$1 did not answer 200 on $3 in 15 s; its log:"
  tail -n 40 "$4" >&2
  return 1
}

read -r oport rport aport bport cport pport < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in ss))
for s in ss:
    s.close()')
origin=http://127.0.0.1:$oport
prom=http://127.0.0.1:$pport

python3 "$here/images.py" "$work/images"
# paced to 300 KB/s per response: the 300 KB noise image takes about a second, so concurrent
# misses of it collapse onto one fetch
python3 "$root/loadtest/origin.py" --corpus "$work/images" --port "$oport" --rate 300000 >"$work/origin.log" 2>&1 &
pids+=($!)
wait_http origin "$!" "$origin/__up" "$work/origin.log"

redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --logfile "$work/redis.log" &
pids+=($!)
redis_pid=$!
for ((i = 0; i < 50; i++)); do
  (exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null && break
  kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited: $(tail -n 20 "$work/redis.log")"
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$rport") 2>/dev/null || die "redis-server does not accept connections on :$rport"

start_edge() { # name port env...: imgedge in front of the origin, its log in $work/NAME.log
  local name=$1 port=$2
  shift 2
  # IMGEDGE_BIN is this script's, not a configuration key: imgedge would refuse it
  env -u IMGEDGE_BIN IMGEDGE_SERVER__LISTEN="127.0.0.1:$port" \
    IMGEDGE_UPSTREAM__ALLOWED_HOSTS="[\"127.0.0.1:$oport\"]" \
    IMGEDGE_UPSTREAM__TRUSTED_PRIVATE_HOSTS="[\"127.0.0.1:$oport\"]" \
    IMGEDGE_SUPABASE__UPSTREAM="$origin" \
    IMGEDGE_LOG__LEVEL=warn \
    "$@" "$bin" >"$work/$name.log" 2>&1 &
  pids+=($!)
  wait_http "imgedge $name" "$!" "http://127.0.0.1:$port/health/live" "$work/$name.log"
}
start_edge a "$aport" IMGEDGE_CACHE__DISK_DIR="$work/disk-a" IMGEDGE_CACHE__DISK_CAPACITY_BYTES=67108864 \
  IMGEDGE_CACHE__SHARED__URL="redis://127.0.0.1:$rport" IMGEDGE_SERVER__TRUSTED_PROXIES='["127.0.0.1"]' \
  IMGEDGE_LIMITS__PER_IP_PER_SECOND=50 IMGEDGE_LIMITS__BURST=50
start_edge b "$bport" IMGEDGE_CACHE__SHARED__URL="redis://127.0.0.1:$rport"
# A budget of 8 MiB, below any RSS imgedge has: emergency pressure from the start, requests shed.
start_edge c "$cport" IMGEDGE_MEMORY__BUDGET_BYTES=8388608 IMGEDGE_CACHE__MEMORY_CAPACITY_BYTES=2097152 \
  IMGEDGE_CACHE__MAX_CACHEABLE_BYTES=1048576

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $rules
scrape_configs:
  - job_name: imgedge
    static_configs:
      - targets: ["127.0.0.1:$aport", "127.0.0.1:$bport", "127.0.0.1:$cport"]
EOF
promtool check config "$work/prometheus.yml" >/dev/null || die "the temporary Prometheus configuration is invalid"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
  --web.listen-address="127.0.0.1:$pport" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_http prometheus "$!" "$prom/-/ready" "$work/prometheus.log"
log "origin $origin, redis :$rport, imgedge A :$aport B :$bport C :$cport, prometheus $prom; work folder $work"

sleep 2 # a couple of scrapes before the load, so that counters have a start
python3 "$here/check.py" load --a "http://127.0.0.1:$aport" --b "http://127.0.0.1:$bport" \
  --c "http://127.0.0.1:$cport" --origin "$origin" --seconds "$load_seconds" >&2 || die "the load failed"
sleep 4 # a few scrapes after it

rc=0
python3 "$here/check.py" query --prometheus "$prom" --dashboard "$dashboard" ${OPERATOR_VERBOSE:+--verbose} | tee "$work/query.txt" >&2 || rc=1
n_rules=$(sed -n 's/.*rule_count=\([0-9]*\).*/\1/p' "$work/query.txt")
n_panels=$(sed -n 's/^panel_count=\([0-9]*\).*/\1/p' "$work/query.txt")
echo "operator: ${n_rules:-0} rules, $n_rule_tests rule tests, ${n_panels:-0} panels checked"
exit "$rc"
