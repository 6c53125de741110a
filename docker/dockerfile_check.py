"""The parts of docker/check.sh that read files: the Dockerfile, .dockerignore, Cargo.toml, the
compose files (as `docker compose config --format json` resolves them), config/haproxy.cfg and
imgedge's own output (/health, its log). Python 3.11+, standard library only.

    python3 docker/dockerfile_check.py MODE ARGS...

Each mode is a function below (see `main`). A check that fails raises `CheckFailed`; `main`
prints it as `docker/check.sh: FAIL: <reason>` and exits 1. Modes that hand values to the shell
print shell assignments (`NAME=value`, `NAME=(a b)`), which check.sh sources.

Tests: docker/test_dockerfile_check.py (`python3 -m unittest` in docker/; check.sh runs them
first).
"""

import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib

ME = "docker/check.sh"


class CheckFailed(Exception):
    """A check failed; the message says what and where."""


def fail(msg):
    raise CheckFailed(msg)


# ---- output for the shell --------------------------------------------------------------------------
def q(v):
    """One shell word."""
    return shlex.quote(str(v))


def arr(name, items):
    """A bash array assignment."""
    return f"{name}=({' '.join(q(i) for i in items)})"


# ---- durations and settings -------------------------------------------------------------------------
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
    """imgedge's built-in defaults: the checkout's config/default.toml."""
    with open(os.path.join(root, "config/default.toml"), "rb") as f:
        return tomllib.load(f)


def effective(env, section, key, root):
    """A setting as imgedge would see it: the IMGEDGE_ variable, else the built-in default."""
    var = f"IMGEDGE_{section.upper()}__{key.upper()}"
    return env[var] if var in env else defaults(root)[section][key]


def shutdown_seconds(env, root, what):
    """server.shutdown_grace + server.drain_delay: how long imgedge may take to stop."""
    return (seconds(effective(env, "server", "shutdown_grace", root), what)
            + seconds(effective(env, "server", "drain_delay", root), what))


# ---- Dockerfile syntax ---------------------------------------------------------------------------------
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
    """The argv of an exec-form (JSON array) ENTRYPOINT, CMD or HEALTHCHECK CMD."""
    try:
        argv = json.loads(rest)
    except ValueError:
        argv = None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        fail(f"Dockerfile: {what} must be in exec form (a JSON array): {rest}")
    return argv


def env_pairs(rest, ln):
    """The (name, value) pairs of `ENV K=V ...` or the legacy `ENV K V`."""
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
    """COPY's (flags, sources, destination), shell or JSON form."""
    toks = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = {}
    while toks and toks[0].startswith("--"):
        k, _, v = toks.pop(0)[2:].partition("=")
        flags[k] = v
    if len(toks) < 2:
        fail(f"Dockerfile:{ln}: COPY needs a source and a destination")
    return flags, toks[:-1], toks[-1]


def stages_of(ins):
    """The stages, in order: {"image", "name", "ins", "line"}."""
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
    return stages


# ---- .dockerignore and the build context ---------------------------------------------------------------
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


def excluded(rules, rel):
    """Whether .dockerignore's rules keep the file rel (relative to the context) out: the last
    rule that matches decides."""
    out = False
    for neg, rx in rules:
        if rx.match(rel):
            out = not neg
    return out


def make_context(checkout, ctx):
    """Copies the checkout's files that .dockerignore lets through into ctx; returns how many."""
    rules = ignore_rules(os.path.join(checkout, ".dockerignore"))
    files = 0
    for dirpath, dirnames, filenames in os.walk(checkout):
        rel_dir = os.path.relpath(dirpath, checkout)
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if excluded(rules, rel):
                continue
            dst = os.path.join(ctx, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(checkout, rel), dst, follow_symlinks=False)
            files += 1
    return files


# ---- the runtime stage -------------------------------------------------------------------------------
def runtime_stage(stage):
    """What the runtime stage says, checked for agreement: ENV, ENTRYPOINT (+ CMD), HEALTHCHECK,
    STOPSIGNAL, EXPOSE, VOLUME, USER and the COPY --from that brings the binary."""
    env, entry, cmd, hc, hc_opts = {}, None, [], None, {}
    signal = volumes = user = artifact_copy = None
    exposed = []
    for ln, kw, rest in stage["ins"]:
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
    art_ln, _, art_srcs, art_dst = artifact_copy
    if len(art_srcs) != 1:
        fail(f"Dockerfile:{art_ln}: expected one file copied from the builder")
    for what, argv in (("ENTRYPOINT", entry), ("HEALTHCHECK", hc)):
        if argv[0] != art_dst:
            fail(f"Dockerfile: {what} runs {argv[0]}, not the binary copied to {art_dst}")
    return {"env": env, "entry": entry, "cmd": cmd, "hc": hc, "hc_opts": hc_opts,
            "signal": signal, "user": user, "disk_dir": disk_dir, "artifact_copy": artifact_copy}


# ---- the builder stage -----------------------------------------------------------------------------------
def mapped_path(workdir, build_root, p, ln):
    """Where the builder's path p (under its WORKDIR) is in build_root, this machine's stand-in."""
    if workdir is None or not (p == workdir or p.startswith(workdir + "/")):
        fail(f"Dockerfile:{ln}: {p} is outside the builder's WORKDIR ({workdir}), which is all docker/check.sh maps")
    return build_root + p[len(workdir):]


CARGO_BUILD_RX = re.compile(r"cargo\s+build\b[^&|;]*")
CARGO_BUILD = "cargo build --release --locked"


def builder_script(builder, ctx, build_root, skip_build):
    """The builder stage as a bash script (lines) run on this machine: each COPY as cp from the
    context, each RUN as `sh -c` in the WORKDIR (mapped to build_root), or skipped with
    skip_build. Checks the steps on the way: every `cargo build` is exactly
    `cargo build --release --locked`, every COPY source is in the context (committed and not
    excluded by .dockerignore). Returns (lines, workdir): workdir is the builder's WORKDIR in
    the image."""
    workdir = None

    def mapped(p, ln):
        return mapped_path(workdir, build_root, p, ln)

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
            for m in CARGO_BUILD_RX.finditer(rest):
                c = " ".join(m.group(0).split())
                if c != CARGO_BUILD:
                    fail(f"Dockerfile:{ln}: `{c}`: the image must build with exactly `{CARGO_BUILD}`")
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
        fail(f"Dockerfile: the builder never runs `{CARGO_BUILD}`")
    return script, workdir


# ---- the Dockerfile, as a whole ------------------------------------------------------------------------
def dockerfile(checkout, tmp, skip_build):
    """Reads checkout/Dockerfile, checks it, writes tmp/build.sh (the builder's steps; its RUNs
    skipped with skip_build) and prints the runtime's settings as shell assignments for
    check.sh."""
    stages = stages_of(instructions(os.path.join(checkout, "Dockerfile")))
    if len(stages) < 2:
        fail("Dockerfile: expected a builder stage and a runtime stage")
    final = stages[-1]
    rt = runtime_stage(final)
    art_ln, src_stage, art_srcs, _ = rt["artifact_copy"]

    # The builder stage: the one the binary is copied from.
    builder = next((s for s in stages if s["name"] == src_stage), None)
    if builder is None:
        fail(f"Dockerfile: no stage named {src_stage!r}")

    build_root = os.path.join(tmp, "build")
    ctx = os.path.join(tmp, "context")
    files = make_context(checkout, ctx)
    script, workdir = builder_script(builder, ctx, build_root, skip_build)
    with open(os.path.join(tmp, "build.sh"), "w") as f:
        f.write("\n".join(script) + "\n")

    artifact = mapped_path(workdir, build_root, posixpath.normpath(art_srcs[0]), art_ln)
    if not art_srcs[0].startswith(workdir + "/target/release/"):
        fail(f"Dockerfile:{art_ln}: the binary should come from {workdir}/target/release/ (CARGO_TARGET_DIR is not set in the builder)")

    env = rt["env"]
    capacity = int(effective(env, "cache", "disk_capacity_bytes", checkout))
    m = re.match(r"rust:(\d+\.\d+(?:\.\d+)?)", builder["image"])
    signal = rt["signal"]
    hc_opts = rt["hc_opts"]
    print(f"BUILDER_IMAGE={q(builder['image'])}")
    print(f"RUNTIME_IMAGE={q(final['image'])}")
    print(f"IMAGE_RUST={q(m.group(1) if m else '')}")
    print(f"CONTEXT_FILES={files}")
    print(f"ARTIFACT={q(artifact)}")
    print(arr("IMAGE_ENV", [f"{k}={v}" for k, v in env.items()]))
    print(arr("ENTRY_ARGS", rt["entry"][1:] + rt["cmd"]))
    print(arr("HC_ARGS", rt["hc"][1:]))
    print(f"HC_START_PERIOD={seconds(hc_opts.get('start-period', '0s'), 'HEALTHCHECK --start-period'):g}")
    print(f"HC_TIMEOUT={seconds(hc_opts.get('timeout', '30s'), 'HEALTHCHECK --timeout'):g}")
    print(f"STOP_SIGNAL={q(signal.removeprefix('SIG') if not signal.isdigit() else 'TERM')}")
    print(f"IMAGE_USER={q(rt['user'])}")
    print(f"DISK_DIR={q(rt['disk_dir'])}")
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
    """compose.yaml's one imgedge service: its port, volume, memory limit, healthcheck, stop
    signal and grace period. Prints the environment the run as compose uses (COMPOSE_*)."""
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


# ---- compose.cluster.yaml and config/haproxy.cfg ------------------------------------------------------
def compose_cluster(config_json, checkout, image_env_json, out_cfg):
    """compose.cluster.yaml: several instances built from ./Dockerfile, each naming a Redis service
    of the file and stopping within its grace period, and one HAProxy service whose entrypoint
    rewrite of config/haproxy.cfg (run here, into out_cfg) binds all interfaces and serves
    exactly those instances on the image's listen port."""
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
    if subprocess.run(["/bin/sh", "-c", script]).returncode != 0:
        fail(f"compose.cluster.yaml: {name}'s config rewrite failed: {script}")
    with open(out_cfg) as f:
        cfg = f.read()
    binds = re.findall(r"^\s*bind\s+(\S+)", cfg, re.M)
    if not binds or any(b.startswith("127.") for b in binds):
        fail(f"compose.cluster.yaml: the rewritten HAProxy config still binds loopback: {binds}")
    servers = re.findall(r"^\s*server\s+(\S+)\s+(\S+)", cfg, re.M)
    targets = sorted(addr.rsplit(":", 1)[0] for _, addr in servers)
    if targets != edges:
        fail(f"compose.cluster.yaml: the rewritten HAProxy config's servers are {targets}, its instances {edges}")
    port = image_env["IMGEDGE_SERVER__LISTEN"].rsplit(":", 1)[1]
    if any(addr.rsplit(":", 1)[1] != port for _, addr in servers):
        fail(f"compose.cluster.yaml: the HAProxy servers are not on the image's listen port {port}: {servers}")


# ---- imgedge's output ---------------------------------------------------------------------------
def health(path, capacity, budget):
    """A /health answer: ok, the disk tier on at capacity, and the memory budget (if budget)."""
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
    """imgedge's log: JSON lines only, with the disk tier's and the listener's start."""
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


def free_port():
    """A port free on all interfaces (as the image listens), now."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- command line ------------------------------------------------------------------------------
def main(argv):
    """MODE ARGS...; returns the exit status."""
    mode, args = argv[0], argv[1:]
    try:
        if mode == "dockerfile":          # CHECKOUT TMP SKIP_BUILD(0|1)
            dockerfile(args[0], args[1], args[2] == "1")
        elif mode == "compose":           # CONFIG_JSON CHECKOUT IMAGE_ENV_JSON
            compose(*args)
        elif mode == "compose-cluster":   # CONFIG_JSON CHECKOUT IMAGE_ENV_JSON OUT_CFG
            compose_cluster(*args)
        elif mode == "health":            # HEALTH_JSON CAPACITY BUDGET
            health(*args)
        elif mode == "logs":              # LOG
            logs(*args)
        elif mode == "env-json":          # K=V...
            print(json.dumps([a.split("=", 1) for a in args]))
        elif mode == "free-port":
            print(free_port())
        else:
            fail(f"dockerfile_check.py: unknown mode {mode!r}")
    except CheckFailed as e:
        print(f"{ME}: FAIL: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
