"""The parts of docker/check.sh that read files: the Dockerfile, .dockerignore, Cargo.toml, the
compose files (as `docker compose config --format json` resolves them), config/haproxy.cfg and
imgedge's own output (/health, its log). Python 3.11+, standard library only.

    python3 docker/dockerfile_check.py MODE ARGS...

Each mode is a function below (see `main`). A check that fails raises `CheckFailed`; `main`
prints it as `docker/check.sh: FAIL: <reason>` and exits 1. Modes that hand values to the shell
print shell assignments (`NAME=value`, `NAME=(a b)`), which check.sh sources.

Tests: docker/test_dockerfile_check.py (`python3 -m unittest discover -s docker -p 'test_*.py'`
from the repository root; check.sh runs them first).
"""

import hashlib
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


def stage_list(stages):
    """(builder, runtime): the stage list docker/check.sh expects, a builder stage and then the
    runtime stage, which copies its binary from the builder."""
    if len(stages) != 2:
        described = ", ".join(f"{s['image']}" + (f" AS {s['name']}" if s["name"] else "") for s in stages)
        fail(f"Dockerfile: expected two stages, a builder and then the runtime; it has {len(stages)} ({described})")
    builder, final = stages
    if builder["name"] is None:
        fail(f"Dockerfile:{builder['line']}: the builder stage needs a name (FROM ... AS <name>) for the runtime's COPY --from")
    froms = [copy_args(rest, ln)[0].get("from") for ln, kw, rest in final["ins"] if kw == "COPY"]
    froms = [f for f in froms if f is not None]
    if not froms:
        fail("Dockerfile: the runtime stage copies no binary from the builder (COPY --from=...)")
    for f in froms:
        if f != builder["name"]:
            fail(f"Dockerfile: the runtime stage copies from {f!r}, not from the builder stage {builder['name']!r}")
    return builder, final


# ---- what `cargo build --release --locked` needs ---------------------------------------------------------
INCLUDE_RX = re.compile(r"""\binclude(?:_str|_bytes)?!\s*\(\s*r?#*"([^"]+)"#*\s*\)""")


def rust_includes(path, root):
    """The files a Rust source pulls in with include_str!, include_bytes! or include! of a string
    literal, relative to root. Comment lines (//, ///, //!) are skipped: a doc example's include
    is not compiled."""
    found = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.lstrip().startswith("//"):
                continue
            for m in INCLUDE_RX.finditer(line):
                target = m.group(1)
                if os.path.isabs(target):
                    fail(f"{os.path.relpath(path, root)}:{n}: includes the absolute path {target}, outside any build context")
                rel = posixpath.normpath(posixpath.join(posixpath.dirname(os.path.relpath(path, root)), target))
                if rel.startswith("../"):
                    fail(f"{os.path.relpath(path, root)}:{n}: includes {target}, outside the checkout")
                found.append((rel, f"{os.path.relpath(path, root)}:{n} includes it"))
    return found


def files_under(root, rel_dir):
    """The files under root/rel_dir, as paths relative to root (.git skipped)."""
    out = []
    base = os.path.join(root, rel_dir)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def cargo_needs(checkout):
    """What `cargo build --release --locked` reads of the checkout, from its Cargo.toml and the
    includes in the sources it compiles. A dict:
      same:   {file: why}  must be in the build, identical to the committed file
      trees:  {dir: why}   compiled sources: the build's copy of the directory must hold exactly
                           the committed files (none missing, none changed, none added)
      exist:  {file: why}  the manifest names them (benches, tests, examples) so cargo must find
                           them to read it, but `cargo build` does not compile them
      bins:   [name]       the binaries it produces
    """
    manifest = os.path.join(checkout, "Cargo.toml")
    if not os.path.isfile(manifest):
        fail("Cargo.toml is not committed")
    with open(manifest, "rb") as f:
        cargo = tomllib.load(f)
    pkg = cargo.get("package")
    if not isinstance(pkg, dict) or "name" not in pkg:
        fail("Cargo.toml: docker/check.sh understands a single package (a [package] with a name)")
    same = {"Cargo.toml": "the manifest"}
    if not os.path.isfile(os.path.join(checkout, "Cargo.lock")):
        fail("Cargo.lock is not committed, and the image builds with --locked")
    same["Cargo.lock"] = "--locked builds the lock file's versions"
    for cfg in (".cargo/config.toml", ".cargo/config"):
        if os.path.isfile(os.path.join(checkout, cfg)):
            same[cfg] = "cargo's configuration for this checkout"
    trees, exist = {}, {}

    def exists(rel):
        return os.path.isfile(os.path.join(checkout, rel))

    roots = []  # (source file, what): the roots of what cargo compiles
    build = pkg.get("build")
    if build is None and exists("build.rs"):
        build = "build.rs"
    if isinstance(build, str):
        roots.append((posixpath.normpath(build), "the build script"))
    lib = cargo.get("lib", {})
    lib_path = lib.get("path") or ("src/lib.rs" if exists("src/lib.rs") else None)
    if lib_path:
        roots.append((posixpath.normpath(lib_path), "the library"))
    bins = []
    for b in cargo.get("bin", []):
        name = b.get("name") or fail("Cargo.toml: a [[bin]] without a name")
        path = b.get("path") or next((p for p in (f"src/bin/{name}.rs", f"src/bin/{name}/main.rs", "src/main.rs")
                                      if exists(p)), f"src/bin/{name}.rs")
        roots.append((posixpath.normpath(path), f"the binary {name}"))
        bins.append(name)
    if pkg.get("autobins", True) and not bins and exists("src/main.rs"):
        roots.append(("src/main.rs", f"the binary {pkg['name']}"))
        bins.append(pkg["name"])
    if pkg.get("autobins", True) and os.path.isdir(os.path.join(checkout, "src/bin")):
        trees["src/bin"] = "binaries cargo finds by itself (src/bin)"
    if not bins:
        fail("Cargo.toml: the package builds no binary")
    compiled_by = {}  # directory: what cargo compiles from it
    for path, what in roots:
        if not exists(path):
            fail(f"Cargo.toml: {what}'s source {path} is not committed")
        tree = posixpath.dirname(path)
        if tree in ("", "."):
            same[path] = f"{what}'s source"
        else:
            compiled_by.setdefault(tree, []).append(what)
    for tree, whats in compiled_by.items():
        trees[tree] = f"the sources of {' and '.join(whats)} ({tree}/)"
    for kind, folder in (("bench", "benches"), ("test", "tests"), ("example", "examples")):
        for t in cargo.get(kind, []):
            name = t.get("name") or fail(f"Cargo.toml: a [[{kind}]] without a name")
            path = t.get("path") or next((p for p in (f"{folder}/{name}.rs", f"{folder}/{name}/main.rs")
                                          if exists(p)), f"{folder}/{name}.rs")
            exist[posixpath.normpath(path)] = f"Cargo.toml names the {kind} {name}: cargo reads the manifest only if the file exists, though it does not compile it"
    # Path dependencies (and patches) are built from their directories.
    tables = [cargo.get(k, {}) for k in ("dependencies", "dev-dependencies", "build-dependencies")]
    for target in cargo.get("target", {}).values():
        tables += [target.get(k, {}) for k in ("dependencies", "dev-dependencies", "build-dependencies")]
    tables += list(cargo.get("patch", {}).values())
    for table in tables:
        for dep, spec in table.items():
            if isinstance(spec, dict) and "path" in spec:
                trees[posixpath.normpath(spec["path"])] = f"the path dependency {dep}"
    if "workspace" in cargo and cargo["workspace"].get("members"):
        fail("Cargo.toml: a workspace with members is not understood by docker/check.sh")
    for rel in list(trees):
        if rel.startswith("../") or os.path.isabs(rel):
            fail(f"Cargo.toml: {rel} ({trees[rel]}) is outside the checkout, so outside any build context")
        if not os.path.isdir(os.path.join(checkout, rel)):
            fail(f"Cargo.toml: {rel} ({trees[rel]}) is not committed")
    # What the compiled sources include.
    compiled = [p for t in trees for p in files_under(checkout, t) if p.endswith(".rs")]
    compiled += [p for p in same if p.endswith(".rs")]
    for src in compiled:
        for rel, why in rust_includes(os.path.join(checkout, src), checkout):
            if not exists(rel):
                fail(f"{why}: {rel} is not committed")
            if not any(rel.startswith(t + "/") for t in trees):
                same.setdefault(rel, why)
    return {"same": same, "trees": trees, "exist": exist, "bins": bins}


# ---- the builder stage -----------------------------------------------------------------------------------
def mapped_path(workdir, build_root, p, ln):
    """Where the builder's path p (under its WORKDIR) is in build_root, this machine's stand-in."""
    if workdir is None or not (p == workdir or p.startswith(workdir + "/")):
        fail(f"Dockerfile:{ln}: {p} is outside the builder's WORKDIR ({workdir}), which is all docker/check.sh maps")
    return build_root + p[len(workdir):]


CARGO_BUILD_RX = re.compile(r"cargo\s+build\b[^&|;]*")
CARGO_BUILD = "cargo build --release --locked"


def builder_script(builder, ctx, build_root, mode, shim_dir):
    """The builder stage as a bash script (lines) run on this machine: each COPY as cp from the
    context, each RUN as `sh -c` in the WORKDIR (mapped to build_root), with `cargo` on PATH the
    stand-in in shim_dir. Checks the steps on the way: every `cargo build` is exactly
    `cargo build --release --locked`, the last one is the builder's last command, every COPY
    source is in the context (committed and not excluded by .dockerignore). Returns
    (lines, workdir): workdir is the builder's WORKDIR in the image."""
    workdir = None

    def mapped(p, ln):
        return mapped_path(workdir, build_root, p, ln)

    script = ["#!/usr/bin/env bash",
              f"# The builder stage of Dockerfile (FROM {builder['image']}, line {builder['line']}),",
              "# transcribed by docker/check.sh: COPY as cp from the build context (a clean checkout",
              f"# filtered by .dockerignore, {ctx}), RUN as sh -c in the WORKDIR ({build_root}).",
              "# cargo is docker/check.sh's stand-in, which records each call and the WORKDIR's files"
              + (", then runs cargo." if mode == "build" else " and builds nothing."),
              "set -euo pipefail",
              f"export CARGO_TARGET_DIR={q(build_root + '/target')}",
              "unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_BUILD_TARGET CARGO_PROFILE_RELEASE_DEBUG",
              f"export PATH={q(shim_dir)}:\"$PATH\"",
              f"{q(sys.executable)} {q(os.path.abspath(__file__))} env-snapshot {q(os.path.join(shim_dir, 'env.json'))}"]
    builds, last_build, last_run = 0, None, None
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
            last_run = ln
            for m in CARGO_BUILD_RX.finditer(rest):
                c = " ".join(m.group(0).split())
                if c != CARGO_BUILD:
                    fail(f"Dockerfile:{ln}: `{c}`: the image must build with exactly `{CARGO_BUILD}`")
                builds += 1
                last_build = (ln, rest[m.end():].strip())
            if re.match(r"apt-get\b", rest):
                script.append("# skipped: installs system packages, which this machine has")
                continue
            if re.search(r"""(^|[\s'"=;&|(])/""", rest):
                fail(f"Dockerfile:{ln}: a builder RUN with an absolute path: docker/check.sh runs it on this machine, mapping only the WORKDIR; use paths relative to it")
            if workdir is None:
                fail(f"Dockerfile:{ln}: RUN before WORKDIR")
            script.append(f"(cd {q(mapped(workdir, ln))} && sh -c {q(rest)})")
        elif kw in ("LABEL",):
            continue
        else:
            fail(f"Dockerfile:{ln}: {kw} in the builder stage is not understood by docker/check.sh")
    if not builds:
        fail(f"Dockerfile: the builder never runs `{CARGO_BUILD}`")
    ln, after = last_build
    if after or last_run != ln:
        fail(f"Dockerfile:{ln}: the builder's last step must be its final `{CARGO_BUILD}` (what runs after it would change the binary the test command built)")
    return script, workdir


def cargo_shim(shim_dir, calls, mode):
    """Writes shim_dir/cargo, the builder's cargo: records the call (argv, directory, CARGO*/RUST*
    environment and the files there) in calls, then builds nothing ("dry") or runs the real
    cargo ("build"). Called by cargo itself (a build script's CARGO_MANIFEST_DIR is set), it
    only passes through."""
    os.makedirs(shim_dir, exist_ok=True)
    real = shutil.which("cargo") if mode == "build" else None
    if mode == "build" and not real:
        fail("DOCKER_CHECK_BUILD=1: no cargo on PATH")
    after = f"exec {q(real)} \"$@\"" if real else "exit 0"
    record = f"{q(sys.executable)} {q(os.path.abspath(__file__))} cargo-record {q(calls)} \"$@\" || exit 1"
    body = ["#!/bin/sh",
            "# docker/check.sh's cargo for the builder's RUN steps (written by docker/dockerfile_check.py).",
            f"if [ -n \"${{CARGO_MANIFEST_DIR:-}}\" ]; then {after}; fi" if real else "",
            record, after]
    path = os.path.join(shim_dir, "cargo")
    with open(path, "w") as f:
        f.write("\n".join(b for b in body if b) + "\n")
    os.chmod(path, 0o755)


def sha256(path):
    """A file's sha256 (a symlink's: of its target's name)."""
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_hashes(root, skip=()):
    """{relative path: sha256} of the files under root, the directories in skip left out."""
    out = {}
    skip = {os.path.realpath(s) for s in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in skip]
        for name in filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = sha256(p)
    return out


def cargo_record(calls, argv):
    """The cargo stand-in's record: one JSON line per call."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("CARGO", "RUST"))}
    cwd = os.getcwd()
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(cwd, "target"))
    with open(calls, "a") as f:
        f.write(json.dumps({"argv": argv, "cwd": cwd, "env": env,
                            "files": tree_hashes(cwd, skip=[target])}) + "\n")


def env_snapshot(path):
    """The builder script's environment before its first step (what the RUNs start from)."""
    with open(path, "w") as f:
        json.dump({k: v for k, v in os.environ.items() if k.startswith(("CARGO", "RUST"))}, f)


def verify_builder(checkout, tmp):
    """After the builder script ran: the builder's cargo calls were all `cargo build --release
    --locked`, in the WORKDIR, with no CARGO*/RUST* variable the RUN steps added or changed, and
    the last of them, the one whose binary the runtime copies, saw exactly the committed files
    that `cargo build --release --locked` needs (cargo_needs). Returns (needs, what the last
    build saw)."""
    shim_dir = os.path.join(tmp, "cargo-shim")
    calls_path = os.path.join(shim_dir, "calls.jsonl")
    build_root = os.path.join(tmp, "build")
    calls = []
    if os.path.exists(calls_path):
        with open(calls_path) as f:
            calls = [json.loads(line) for line in f if line.strip()]
    if not calls:
        fail("the builder's steps never ran cargo")
    with open(os.path.join(shim_dir, "env.json")) as f:
        base_env = json.load(f)
    for n, call in enumerate(calls, 1):
        what = f"the builder's cargo call {n} (`cargo {' '.join(call['argv'])}`)"
        if "cargo " + " ".join(call["argv"]) != CARGO_BUILD:
            fail(f"{what}: the builder may run cargo only as `{CARGO_BUILD}`")
        if os.path.realpath(call["cwd"]) != os.path.realpath(build_root):
            fail(f"{what} ran in {call['cwd']}, not in the builder's WORKDIR")
        changed = sorted(k for k in set(base_env) | set(call["env"]) if base_env.get(k) != call["env"].get(k))
        if changed:
            fail(f"{what}: the RUN step sets {', '.join(changed)} for cargo; the test command's build has no such setting")
    seen = calls[-1]["files"]
    needs = cargo_needs(checkout)
    rules = ignore_rules(os.path.join(checkout, ".dockerignore"))

    def missing(rel, why):
        reason = ("it is excluded by .dockerignore" if excluded(rules, rel)
                  else "the Dockerfile does not COPY it before the final build, or a RUN removes it")
        fail(f"the builder's final `{CARGO_BUILD}` has no {rel} ({why}): {reason}")

    def compare(rel, why):
        if rel not in seen:
            missing(rel, why)
        if seen[rel] != sha256(os.path.join(checkout, rel)):
            fail(f"the builder's final `{CARGO_BUILD}` sees a {rel} that differs from the committed one ({why}); a RUN step changes it")

    for rel, why in needs["same"].items():
        compare(rel, why)
    for tree, why in needs["trees"].items():
        committed = files_under(checkout, tree)
        for rel in committed:
            compare(rel, why)
        extra = sorted(set(r for r in seen if r.startswith(tree + "/")) - set(committed))
        if extra:
            fail(f"the builder's final `{CARGO_BUILD}` sees {', '.join(extra)} in {tree}/ ({why}), which is not committed; a RUN step leaves it there")
    for rel, why in needs["exist"].items():
        if rel not in seen:
            missing(rel, why)
    return needs, seen


def built_sources(root, needs):
    """The files of `root` (a working tree) whose change makes cargo rebuild the binary: the
    compiled source trees and what they include (not the manifest nor benches, whose edits
    need not relink it)."""
    out = [p for t in needs["trees"] for p in files_under(root, t)]
    out += [p for p in needs["same"] if p not in ("Cargo.toml", "Cargo.lock") and os.path.exists(os.path.join(root, p))]
    return out


def stale(binary, root):
    """The newest of the working tree's built sources that is newer than binary, or ''."""
    needs = cargo_needs(root)
    built = os.stat(binary).st_mtime
    newer = sorted((os.stat(os.path.join(root, p)).st_mtime, p) for p in built_sources(root, needs)
                   if os.stat(os.path.join(root, p)).st_mtime > built)
    return newer[-1][1] if newer else ""


# ---- the Dockerfile, as a whole ------------------------------------------------------------------------
def dockerfile(checkout, tmp, mode):
    """Reads checkout/Dockerfile, checks it, writes tmp/build.sh (the builder's steps) and the
    cargo stand-in, and prints the runtime's settings as shell assignments for check.sh."""
    if mode not in ("dry", "build"):
        fail(f"dockerfile: mode {mode!r} is neither dry nor build")
    stages = stages_of(instructions(os.path.join(checkout, "Dockerfile")))
    builder, final = stage_list(stages)
    rt = runtime_stage(final)
    art_ln, _, art_srcs, _ = rt["artifact_copy"]

    build_root = os.path.join(tmp, "build")
    ctx = os.path.join(tmp, "context")
    files = make_context(checkout, ctx)
    shim_dir = os.path.join(tmp, "cargo-shim")
    script, workdir = builder_script(builder, ctx, build_root, mode, shim_dir)
    cargo_shim(shim_dir, os.path.join(shim_dir, "calls.jsonl"), mode)
    with open(os.path.join(tmp, "build.sh"), "w") as f:
        f.write("\n".join(script) + "\n")

    bins = cargo_needs(checkout)["bins"]
    art = posixpath.normpath(art_srcs[0])
    wanted = [f"{workdir}/target/release/{b}" for b in bins]
    if art not in wanted:
        fail(f"Dockerfile:{art_ln}: the runtime copies {art_srcs[0]}, not what `{CARGO_BUILD}` in the builder's WORKDIR produces ({', '.join(wanted)})")
    artifact = mapped_path(workdir, build_root, art, art_ln)

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
    print(f"ARTIFACT_NAME={q(posixpath.basename(art))}")
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


def builder(checkout, tmp):
    """verify_builder, its summary printed as shell assignments."""
    needs, _ = verify_builder(checkout, tmp)
    paths = sorted(needs["same"]) + [t + "/" for t in sorted(needs["trees"])] + sorted(needs["exist"])
    print(arr("BUILD_NEEDS", paths))


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
        if mode == "dockerfile":          # CHECKOUT TMP dry|build
            dockerfile(*args)
        elif mode == "builder":           # CHECKOUT TMP, after TMP/build.sh ran
            builder(*args)
        elif mode == "stale":             # BINARY WORKTREE: prints the newest newer source
            print(stale(*args))
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
        elif mode == "cargo-record":      # CALLS ARGV... (the builder's cargo)
            cargo_record(args[0], args[1:])
        elif mode == "env-snapshot":      # OUT
            env_snapshot(*args)
        else:
            fail(f"dockerfile_check.py: unknown mode {mode!r}")
    except CheckFailed as e:
        print(f"{ME}: FAIL: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
