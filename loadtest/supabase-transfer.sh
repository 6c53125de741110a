#!/usr/bin/env bash
# Large transfers through imgedge against the real Supabase Storage server: a SIZE_MIB (100) MiB
# object uploaded and downloaded through imgedge and through the gateway alone, over Storage's
# REST API (POST/GET /storage/v1/object/BUCKET/KEY, curl) and its S3 protocol
# (/storage/v1/s3, SigV4, AWS SDK v3: loadtest/lib/supabase-s3.mjs), targets alternating, ROUNDS (3)
# rounds. Measures each transfer's time and imgedge's RSS (VmRSS every 50 ms) against its idle
# RSS, then probes imgedge with its default limits. The environment is tests/supabase's
# (tests/supabase/env.sh: Storage, Postgres, the nginx gateway stand-in, imgedge).
#
# Targets (the issue's): imgedge's peak RSS within 32 MiB of idle; each transfer's median time
# at most 1.1x the gateway alone's.
#
# Usage: [EDGE_BIN=path] [SIZE_MIB=100] [ROUNDS=3] bash loadtest/supabase-transfer.sh
#   EDGE_BIN (or IMGEDGE_BIN, as tests/supabase/run.sh calls it) default target/release/imgedge
#   (`cargo build --release --locked` when missing);
#   SUPABASE_STORAGE_SRC and IMGEDGE_SUPABASE_CACHE as for tests/supabase/run.sh.
# imgedge runs with server.max_request_body_bytes and upstream.max_object_bytes at 1 GiB (both
# default to 50 MiB, below the object; the probe at the end shows what the defaults do).
# Writes loadtest/reports/supabase-transfer-<UTC>.md and prints its key figures.
set -uo pipefail
# shellcheck disable=SC2034 # tests/supabase/env.sh's sb_log prints it
SB_ME=supabase-transfer
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source-path=SCRIPTDIR/.. source=tests/supabase/env.sh
source "$repo/tests/supabase/env.sh"

size_mib=${SIZE_MIB:-100}
rounds=${ROUNDS:-3}
[[ $size_mib =~ ^[0-9]+$ && $size_mib -ge 1 && $size_mib -le 1000 ]] || { echo "SIZE_MIB must be 1-1000" >&2; exit 2; }
[[ $rounds =~ ^[0-9]+$ && $rounds -ge 1 && $rounds -le 10 ]] || { echo "ROUNDS must be 1-10" >&2; exit 2; }
size_bytes=$((size_mib * 1048576))
cmdline="cd $(printf %q "$repo") &&"
for v in EDGE_BIN IMGEDGE_BIN SIZE_MIB ROUNDS SUPABASE_STORAGE_SRC; do
  [[ -n ${!v:-} ]] && cmdline+=" $v=$(printf %q "${!v}")"
done
cmdline+=" bash loadtest/supabase-transfer.sh"
# EDGE_BIN, the name every loadtest script reads, else IMGEDGE_BIN, tests/supabase's (env.sh's
# sb_edge_bin reads IMGEDGE_BIN and keeps it from imgedge's environment)
IMGEDGE_BIN=${EDGE_BIN:-${IMGEDGE_BIN:-}}

sb_find_source
case $? in 0) ;; 1) exit 0 ;; *) exit 1 ;; esac
started=$(sb_now)
sb_init
sb_install_debs || sb_fail "apt-get install failed"
sb_node_setup || sb_fail "no Node 24"
sb_edge_bin || sb_fail "no imgedge binary"
sb_storage_prepare || sb_fail "could not prepare Storage from $SB_SRC"
sb_client_prepare || sb_fail "could not install tests/supabase's packages"
sb_services_start || sb_fail "could not start Postgres and the gateway"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
SB_EDGE_ENV="IMGEDGE_UPSTREAM__MAX_OBJECT_BYTES=1073741824" sb_stack transfer || sb_fail "could not start Storage and imgedge"

bucket=transfer
auth="authorization: Bearer $SB_SERVICE_KEY"
curl -fsS -o /dev/null -X POST "$SB_GW_URL/storage/v1/bucket" -H "$auth" -H 'content-type: application/json' \
  -d "{\"name\":\"$bucket\",\"public\":false}" || sb_fail "could not create the bucket"
file=$SB_WORK/object.bin
head -c "$size_bytes" /dev/urandom >"$file"
sha=$(sb_sha256 "$file")

# One transfer; appends "round protocol op target ok status seconds bytes start_ms end_ms note"
# to transfers.tsv. KEY is written by puts; gets read the object the gateway stored first.
results=$SB_WORK/transfers.tsv
now_ms() { date +%s%3N; }
transfer() { # ROUND PROTOCOL OP TARGET(imgedge|gateway) KEY
  local round=$1 proto=$2 op=$3 target=$4 key=$5 base t0 t1 out ok status secs bytes note=""
  if [[ $target == imgedge ]]; then base=$SB_EDGE_URL; else base=$SB_GW_URL; fi
  t0=$(now_ms)
  if [[ $proto == rest ]]; then
    local url=$base/storage/v1/object/$bucket/$key
    if [[ $op == put ]]; then
      out=$(curl -sS -o "$SB_WORK/last-body" -w '%{http_code} %{time_total} %{size_upload}' --max-time 300 \
        -X POST -T "$file" -H "$auth" -H 'content-type: application/octet-stream' -H 'x-upsert: true' \
        -H 'Expect:' "$url" 2>&1)
    else
      out=$(curl -sS -o "$SB_WORK/last-download" -w '%{http_code} %{time_total} %{size_download}' --max-time 300 \
        -H "$auth" "$url" 2>&1)
    fi
    read -r status secs bytes <<<"$out"
    ok=false
    if [[ $op == put && $status == 200 ]]; then ok=true; fi
    if [[ $op == get && $status == 200 ]] && [[ $(sb_sha256 "$SB_WORK/last-download") == "$sha" ]]; then ok=true; fi
    [[ $ok == true ]] || note=$(head -c 200 "$SB_WORK/last-body" 2>/dev/null | tr '\n\t' '  ')
    [[ $op == get && $status == 200 && $ok == false ]] && note="body differs from the object uploaded"
    rm -f "$SB_WORK/last-download"
  else
    local endpoint=$base/storage/v1/s3 json
    json=$(S3_ACCESS_KEY_ID=$SB_S3_ACCESS_KEY_ID S3_SECRET_ACCESS_KEY=$SB_S3_SECRET SB_TIMEOUT=300 \
      sb_node_script "$here/lib/supabase-s3.mjs" "$op" "$endpoint" "$bucket" "$key" "$file" 2>&1 | tail -n 1)
    read -r ok status secs bytes note < <("$SB_NODE" -e '
      let r; try { r = JSON.parse(process.argv[1]); } catch { r = { ok: false, status: 0, ms: 0, bytes: 0, error: process.argv[1] }; }
      console.log([r.ok, r.status, (r.ms / 1000).toFixed(3), r.bytes, (r.error || "").replace(/\s+/g, " ")].join(" "));' "$json")
  fi
  t1=$(now_ms)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$proto" "$op" "$target" "$ok" "$status" \
    "$secs" "$bytes" "$t0" "$t1" "$note" >>"$results"
  sb_log "round $round $proto $op $target: $([[ $ok == true ]] && echo ok || echo "FAILED ($status)") ${secs}s${note:+ $note}"
}

# The object downloads read, stored through the gateway alone.
transfer 0 rest put gateway source.bin
[[ $(tail -n 1 "$results" | cut -f5) == true ]] || sb_fail "the first upload through the gateway failed"
: >"$results"

# imgedge's RSS every 50 ms until it exits or this script stops the sampler (at most an hour).
rss=$SB_WORK/rss.tsv
python3 - "$SB_EDGE_PID" "$rss" <<'PY' &
import sys, time
pid, out = sys.argv[1], open(sys.argv[2], "w", buffering=1)
deadline = time.time() + 3600
while time.time() < deadline:
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        break
    out.write(f"{int(time.time() * 1000)}\t{kb}\n")
    time.sleep(0.05)
PY
SB_PIDS+=($!)
# A warm-up request through imgedge, then two idle seconds: the idle RSS.
curl -fsS -o /dev/null -H "$auth" "$SB_EDGE_URL/storage/v1/bucket" || sb_fail "imgedge does not answer"
sleep 2
idle_end_ms=$(now_ms)

for ((r = 1; r <= rounds; r++)); do
  if ((r % 2)); then order=(imgedge gateway); else order=(gateway imgedge); fi
  for proto in rest s3; do
    for op in put get; do
      for target in "${order[@]}"; do
        if [[ $op == put ]]; then key=$proto-$target-$r.bin; else key=source.bin; fi
        transfer "$r" "$proto" "$op" "$target" "$key"
      done
    done
  done
done
rounds_end_ms=$(now_ms)

# imgedge as configured by default (50 MiB body and object limits): what a 100 MiB transfer does.
sb_stop_pid "$SB_EDGE_PID"
SB_EDGE_ENV='' SB_EDGE_MAX_BODY='' sb_edge_start defaults || sb_fail "imgedge with defaults did not start"
# What the client sees of each: curl's status (000: no response read), its error, the body's start.
probe() { # NAME CURL_ARG...
  local name=$1 code err body
  shift
  code=$(curl -sS -o "$SB_WORK/probe-$name.body" -w '%{http_code}' --max-time 300 "$@" 2>"$SB_WORK/probe-$name.err")
  err=$(tr '\n' ' ' <"$SB_WORK/probe-$name.err")
  body=""
  if [[ -f $SB_WORK/probe-$name.body && $(stat -c %s "$SB_WORK/probe-$name.body") -lt 1000 ]]; then
    body=$(head -c 300 "$SB_WORK/probe-$name.body" | tr '\n' ' ')
  fi
  printf '%s%s%s' "$code" "${err:+, curl said \"${err% }\"}" "${body:+, body \`$body\`}"
}
probe_put=$(probe put -X POST -T "$file" -H "$auth" -H 'content-type: application/octet-stream' \
  -H 'x-upsert: true' -H 'Expect:' "$SB_EDGE_URL/storage/v1/object/$bucket/probe.bin")
probe_get=$(probe get -H "$auth" "$SB_EDGE_URL/storage/v1/object/$bucket/source.bin")
probe_get+=", $(stat -c %s "$SB_WORK/probe-get.body" 2>/dev/null || echo 0) bytes received"
rm -f "$SB_WORK"/probe-*.body
sb_log "imgedge with its default limits: REST upload $probe_put; REST download $probe_get"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
report_dir=${REPORT_DIR:-$here/reports}
report=$report_dir/supabase-transfer-$stamp.md
mkdir -p "$report_dir"
nginx_version=$( (command -v nginx >/dev/null && nginx -v 2>&1) || /usr/sbin/nginx -v 2>&1)
R_RESULTS=$results R_RSS=$rss R_IDLE_END=$idle_end_ms R_ROUNDS_END=$rounds_end_ms R_REPORT=$report \
  R_SIZE=$size_bytes R_ROUNDS=$rounds R_CMD=$cmdline R_DATE=$(date -u '+%Y-%m-%d %H:%M') \
  R_STORAGE=$SB_STORAGE_COMMIT R_NODE=$("$SB_NODE" --version) R_NGINX=$nginx_version R_CORES=$(nproc) \
  R_EDGE="$(basename "$IMGEDGE_BIN") ($("$IMGEDGE_BIN" --version 2>/dev/null | head -n 1)), sha256 $(sb_sha256 "$IMGEDGE_BIN" | cut -c 1-12)" \
  R_PROBE_PUT=$probe_put R_PROBE_GET=$probe_get R_LOAD="$load_before, after: $(cut -d' ' -f1-3 /proc/loadavg)" \
  python3 - <<'PY'
import os, statistics
e = os.environ
idle_end, rounds_end, size, nrounds = int(e["R_IDLE_END"]), int(e["R_ROUNDS_END"]), int(e["R_SIZE"]), int(e["R_ROUNDS"])
rows = [l.rstrip("\n").split("\t") for l in open(e["R_RESULTS"]) if l.strip()]
rss = [tuple(map(int, l.split("\t"))) for l in open(e["R_RSS"]) if l.strip()]
MiB = 1024
idle = [kb for t, kb in rss if idle_end - 2000 <= t <= idle_end]
idle_kb = max(idle) if idle else (rss[0][1] if rss else 0)
def peak(t0, t1):
    window = [kb for t, kb in rss if t0 <= t <= t1 + 50]
    return max(window) if window else 0
peak_kb = max([kb for t, kb in rss if t <= rounds_end] or [0])
label = lambda proto, op: f"{'REST' if proto == 'rest' else 'S3'} {'upload' if op == 'put' else 'download'}"
lines = []
w = lines.append
w(f"# Supabase transfers through imgedge, {e['R_DATE']} UTC")
w("")
w(f"Command: `{e['R_CMD']}`")
w("")
w(f"A {size // 1048576} MiB object of random bytes (sha256 checked on every REST download) uploaded and "
  f"downloaded through imgedge and through the gateway alone (nginx, tests/supabase's stand-in for the hosted "
  f"gateway), in front of the real Supabase Storage server (commit {e['R_STORAGE']}, file backend, "
  f"Node {e['R_NODE']}); {nrounds} rounds, targets alternating (imgedge first in odd rounds). "
  f"REST: curl, `POST`/`GET /storage/v1/object/BUCKET/KEY` with the service key. S3: the AWS SDK v3 "
  f"(@aws-sdk/client-s3, path style, SigV4 with the acceptance suite's credentials), PutObject streamed "
  f"with its length, GetObject streamed (byte count checked). Times are one transfer each, request to last "
  f"byte, in s. imgedge: {e['R_EDGE']}, with server.max_request_body_bytes and upstream.max_object_bytes at "
  f"1 GiB; {e['R_NGINX']}; loopback, {e['R_CORES']} cores, load average before: {e['R_LOAD']} "
  f"(what else ran on the machine weighs on every figure; the alternation spreads it over both targets).")
w("")
w("| transfer | target | " + " | ".join(f"round {r}" for r in range(1, nrounds + 1)) + " | median | MB/s | imgedge peak RSS − idle |")
w("|---|---|" + "---|" * nrounds + "---|---|---|")
summary = {}
for proto in ("rest", "s3"):
    for op in ("put", "get"):
        for target in ("imgedge", "gateway"):
            sel = [r for r in rows if r[1] == proto and r[2] == op and r[3] == target]
            cells, ok_times = [], []
            for r in sel:
                if r[4] == "true":
                    cells.append(f"{float(r[6]):.2f}")
                    ok_times.append(float(r[6]))
                else:
                    cells.append(f"failed ({r[5]})")
            med = statistics.median(ok_times) if sel and len(ok_times) == len(sel) else None
            summary[(proto, op, target)] = med
            rss_cell = ""
            if target == "imgedge" and sel:
                rss_cell = f"{(max(peak(int(r[8]), int(r[9])) for r in sel) - idle_kb) / MiB:.1f} MiB"
            w(f"| {label(proto, op)} | {target} | " + " | ".join(cells)
              + f" | {'%.2f' % med if med is not None else '—'} | {'%.0f' % (size / 1e6 / med) if med else '—'} | {rss_cell} |")
w("")
w(f"imgedge's RSS: idle {idle_kb / MiB:.1f} MiB (the highest sample of the 2 s before the first transfer, "
  f"after one request), peak {peak_kb / MiB:.1f} MiB during the rounds: **{(peak_kb - idle_kb) / MiB:.1f} MiB** "
  f"above idle (target: at most 32 MiB).")
w("")
w("| transfer | imgedge / gateway (median time) | target ≤ 1.10 |")
w("|---|---|---|")
for proto in ("rest", "s3"):
    for op in ("put", "get"):
        a, b = summary[(proto, op, "imgedge")], summary[(proto, op, "gateway")]
        if a is None or b is None:
            w(f"| {label(proto, op)} | — (failed) | not met |")
        else:
            w(f"| {label(proto, op)} | {a / b:.2f} | {'met' if a / b <= 1.10 else 'not met'} |")
w("")
fails = [r for r in rows if r[4] != "true"]
if fails:
    w("Failed transfers:")
    w("")
    groups = {}
    for r in fails:
        groups.setdefault((r[1], r[2], r[3], r[5], r[10]), []).append(r)
    for (proto, op, target, status, note), rs in groups.items():
        w(f"- {label(proto, op)} through {target} ({len(rs)} of {nrounds}): status {status}: {note or '(no body)'}")
    w("")
probe = (f"With imgedge's default limits (server.max_request_body_bytes and upstream.max_object_bytes, both 50 MiB) "
         f"the same object through imgedge: REST upload: {e['R_PROBE_PUT']}; REST download: {e['R_PROBE_GET']}")
w(probe + ".")
open(e["R_REPORT"], "w").write("\n".join(lines) + "\n")
PY
[[ -s $report ]] || sb_fail "no report written"
echo
grep -E '^\| |^imgedge|^With|^- ' "$report"
echo
echo "supabase-transfer: report written to ${report#"$repo"/} ($(sb_since "$started") s)"
