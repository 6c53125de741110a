#!/usr/bin/env bash
# Supabase compatibility: the real Storage server's own acceptance suite (storage/acceptance,
# profile full), run against the gateway stand-in alone and then through imgedge, each on a fresh
# database and file-storage folder; then tests/supabase/client.mjs (supabase-js through imgedge)
# on a third. Prints
#   supabase acceptance: gateway N passed, F failed, S skipped / imgedge N passed, F failed, S skipped
# lists every test whose outcome differs, counts the TUS PATCH requests imgedge saw, and exits 1
# when a test that passes against the gateway fails through imgedge, when no TUS PATCH went
# through imgedge (the upload URLs Storage hands out led around it), or a client.mjs check fails.
#
# Usage: [IMGEDGE_BIN=path] [SUPABASE_STORAGE_SRC=tarball-or-checkout] bash tests/supabase/run.sh
#   IMGEDGE_BIN           default target/release/imgedge (`cargo build --release --locked` if missing)
#   SUPABASE_STORAGE_SRC  default ../shared/supabase/storage-4fa61fba.tar.gz beside the repository;
#                         none found: prints "supabase acceptance: skipped: ..." and exits 0
#   IMGEDGE_SUPABASE_CACHE  Node 24, Storage's `npm ci`, supabase-js (default ~/.cache/imgedge-supabase)
#   SB_KEEP=1             keep the log folder (it is always kept on failure)
# Needs python3, curl, npm (once, to fetch Node 24) and, when missing, installs postgresql,
# nginx-light, make and g++ with apt-get (as root; their services are not started).
set -uo pipefail
SB_ME=supabase
# shellcheck source=tests/supabase/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

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

# Runs the suite against BASE (…/storage/v1), JSON report to OUT.json, log to OUT.log.
run_suite() { # NAME BASE
  local name=$1 base=$2 t0 rc
  t0=$(sb_now)
  sb_log "running the acceptance suite (profile full) against $name: $base"
  timeout 900 env -C "$SB_STORAGE" \
    ACCEPTANCE_TARGET=local ACCEPTANCE_PROFILE=full \
    ACCEPTANCE_BASE_URL="$base" ACCEPTANCE_S3_ENDPOINT="$base/s3" \
    ACCEPTANCE_TUS_ENDPOINT="$base/upload/resumable" ACCEPTANCE_REGION=us-east-1 \
    ACCEPTANCE_RESOURCE_PREFIX="acc-$name" ACCEPTANCE_RUN_ID="$name" \
    ACCEPTANCE_SERVICE_KEY="$SB_SERVICE_KEY" ACCEPTANCE_ANON_KEY="$SB_ANON_KEY" \
    ACCEPTANCE_AUTHENTICATED_KEY="$SB_AUTH_KEY" \
    ACCEPTANCE_S3_ACCESS_KEY_ID="$SB_S3_ACCESS_KEY_ID" ACCEPTANCE_S3_SECRET_ACCESS_KEY="$SB_S3_SECRET" \
    ACCEPTANCE_S3_FORCE_PATH_STYLE=true STORAGE_BACKEND=file \
    ACCEPTANCE_ENABLE_ADMIN=false ACCEPTANCE_ENABLE_CDN=true ACCEPTANCE_ENABLE_RENDER=true \
    ACCEPTANCE_ENABLE_RLS_SETUP=true ACCEPTANCE_ENABLE_VECTOR=false ACCEPTANCE_ENABLE_ICEBERG=false \
    ACCEPTANCE_ENABLE_WIRE=true ACCEPTANCE_ENABLE_TUS=true CI= NO_COLOR=1 FORCE_COLOR=0 \
    "$SB_NODE" node_modules/vitest/vitest.mjs run --config acceptance/acceptance.vitest.config.ts \
    --reporter=verbose --reporter=json --outputFile.json="$SB_WORK/suite-$name.json" \
    >"$SB_WORK/suite-$name.log" 2>&1
  rc=$?
  [[ -s $SB_WORK/suite-$name.json ]] || sb_fail "the suite against $name left no report (exit $rc)"
  sb_log "suite against $name done in $(sb_since "$t0") s"
}

patches_at_gateway() { grep -c '"PATCH ' "$SB_WORK/nginx/access.log" 2>/dev/null || true; }

sb_stack gw || sb_fail "could not start Storage for the gateway run"
run_suite gateway "$SB_GW_URL/storage/v1"

sb_stack edge || sb_fail "could not start Storage and imgedge for the imgedge run"
gw_patches_before=$(patches_at_gateway)
run_suite imgedge "$SB_EDGE_URL/storage/v1"
edge_log=$SB_EDGE_LOG
edge_patches=$(sb_edge_count "$edge_log" PATCH)
gw_patches=$(($(patches_at_gateway) - gw_patches_before))

sb_stack client || sb_fail "could not start Storage and imgedge for the supabase-js run"
sb_log "running client.mjs (supabase-js $(sed -n 's/.*"@supabase\/supabase-js": "\(.*\)".*/\1/p' "$SB_HERE/package.json")) through imgedge, then against the gateway alone"
SB_TIMEOUT=300 sb_node_script "$SB_HERE/client.mjs" "$SB_EDGE_URL" "$SB_HERE/fixtures" imgedge \
  >"$SB_WORK/client-imgedge.log" 2>&1
client_rc=$?
# The same calls without imgedge, for reference (not gating): what the environment itself serves.
SB_TIMEOUT=300 sb_node_script "$SB_HERE/client.mjs" "$SB_GW_URL" "$SB_HERE/fixtures" gateway \
  >"$SB_WORK/client-gateway.log" 2>&1

echo
"$SB_NODE" "$SB_HERE/compare.mjs" "$SB_WORK/suite-gateway.json" "$SB_WORK/suite-imgedge.json"
compare_rc=$?
# imgedge's PATCHes reach the gateway too: what is left went to the gateway around imgedge.
echo "supabase acceptance: imgedge saw $edge_patches TUS PATCH requests (the gateway saw $((gw_patches - edge_patches)) PATCH requests directly, not through imgedge, during the imgedge run)"
echo
cat "$SB_WORK/client-imgedge.log"
echo "supabase client: for reference, the same calls against the gateway alone (not gating):"
grep -E 'FAIL|passed,' "$SB_WORK/client-gateway.log"
echo "supabase acceptance: $(sb_since "$started") s in all"
if ((compare_rc != 0 || client_rc != 0 || edge_patches == 0)); then
  ((compare_rc != 0)) && sb_log "tests that pass against the gateway fail through imgedge"
  ((edge_patches == 0)) && sb_log "no TUS PATCH went through imgedge: its upload URLs lead around it"
  ((client_rc != 0)) && sb_log "client.mjs failed (exit $client_rc)"
  sb_fail
fi
