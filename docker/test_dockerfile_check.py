"""Tests of docker/dockerfile_check.py on small checkouts written into temp dirs.

    python3 -m unittest discover -s docker -p 'test_*.py'     (from the repository root)

docker/check.sh runs them before anything else. Standard library only; they need bash and sh
(the builder script and compose.cluster.yaml's HAProxy rewrite run in them), nothing else.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
import unittest.mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dockerfile_check as dc  # noqa: E402

DEFAULT_TOML = """\
[server]
listen = "127.0.0.1:8080"
shutdown_grace = "10s"
drain_delay = "0s"

[cache]
disk_capacity_bytes = 1073741824
"""

CARGO_TOML = """\
[package]
name = "imgedge"
version = "0.1.0"
edition = "2024"

[lib]
path = "src/lib.rs"

[[bin]]
name = "imgedge"
path = "src/main.rs"

[[bench]]
name = "transform"
harness = false
"""

DOCKERIGNORE = """\
*
!Cargo.toml
!Cargo.lock
!config/
!src/
!benches/
**/*~
"""

# The shape of the real Dockerfile, smaller.
DOCKERFILE = """\
# syntax comment
FROM rust:1.95.0-slim-bookworm AS builder
# hadolint ignore=DL3008
RUN apt-get update \\
    && apt-get install -y --no-install-recommends make nasm
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \\
    && echo 'fn main() {}' > src/main.rs \\
    && touch src/lib.rs \\
    && echo 'fn main() {}' > benches/transform.rs \\
    && cargo build --release --locked \\
    && rm -rf src benches
COPY config ./config
COPY src ./src
COPY benches ./benches
RUN touch src/lib.rs src/main.rs \\
    && cargo build --release --locked

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="imgedge"
RUN useradd --system --uid 10001 imgedge
COPY --from=builder /src/target/release/imgedge /usr/local/bin/imgedge
ENV IMGEDGE_SERVER__LISTEN=0.0.0.0:8080 \\
    IMGEDGE_CACHE__DISK_DIR=/var/cache/imgedge \\
    IMGEDGE_LOG__FORMAT=json
VOLUME ["/var/cache/imgedge"]
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \\
    CMD ["/usr/local/bin/imgedge", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/imgedge"]
"""

HAPROXY_CFG = """\
frontend imgedge
    bind 127.0.0.1:8080
    default_backend imgedge_owners
backend imgedge_owners
    server imgedge1 127.0.0.1:8081 id 1
    server imgedge2 127.0.0.1:8082 id 2
frontend stats
    bind 127.0.0.1:8404
"""

HAPROXY_REWRITE = ("sed -e 's/bind 127.0.0.1:8080$$/bind :8080/' -e 's/bind 127.0.0.1:8404$$/bind :8404/'"
                   " -e 's/ 127.0.0.1:8081 / imgedge1:8080 /' -e 's/ 127.0.0.1:8082 / imgedge2:8080 /'"
                   " /usr/local/etc/haproxy/imgedge.cfg >/tmp/haproxy.cfg &&"
                   " exec haproxy -W -db -f /tmp/haproxy.cfg")

IMAGE_ENV = {"IMGEDGE_SERVER__LISTEN": "0.0.0.0:8080", "IMGEDGE_CACHE__DISK_DIR": "/var/cache/imgedge",
             "IMGEDGE_LOG__FORMAT": "json"}


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def make_checkout(root, dockerfile=DOCKERFILE, files=None):
    """A checkout shaped like imgedge's: manifest, lock file, sources, the compiled-in defaults,
    a bench, tests/ (excluded from the context), .dockerignore and the given Dockerfile. files
    adds or replaces (None removes) files."""
    tree = {
        "Cargo.toml": CARGO_TOML,
        "Cargo.lock": "version = 4\n",
        "src/lib.rs": "pub mod config;\n",
        "src/main.rs": "fn main() {}\n",
        "src/config.rs": 'pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");\n',
        "config/default.toml": DEFAULT_TOML,
        "config/haproxy.cfg": HAPROXY_CFG,
        "benches/transform.rs": "fn main() {}\n",
        "tests/proxy.rs": "#[test]\nfn t() {}\n",
        "README.md": "readme\n",
        ".dockerignore": DOCKERIGNORE,
        "Dockerfile": dockerfile,
    }
    tree.update(files or {})
    for rel, text in tree.items():
        if text is not None:
            write(root, rel, text)
    return root


def shell_values(text):
    """The NAME=value and NAME=(...) lines a mode prints, as bash reads them: {NAME: value or
    [items]}."""
    names = [line.partition("=")[0] for line in text.splitlines()]
    dump = "".join(f'printf "%s\\0" {n} "${{#{n}[@]}}" "${{{n}[@]}}"\n' for n in names)
    words = subprocess.run(["bash", "-c", text + "\n" + dump], capture_output=True, text=True,
                           check=True).stdout.split("\0")[:-1]
    out = {}
    while words:
        name, count = words[0], int(words[1])
        items, words = words[2:2 + count], words[2 + count:]
        out[name] = items if f"{name}=(" in text else items[0]
    return out


class Case(unittest.TestCase):
    """A temp dir per test: self.root (the checkout) and self.tmp (check.sh's temp dir)."""

    def setUp(self):
        d = tempfile.TemporaryDirectory(prefix="dockerfile-check-test.")
        self.addCleanup(d.cleanup)
        self.root = os.path.join(d.name, "src")
        self.tmp = os.path.join(d.name, "tmp")
        os.makedirs(self.root)
        os.makedirs(self.tmp)

    def run_mode(self, fn, *args):
        """Calls fn(*args); returns what it printed."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            fn(*args)
        return out.getvalue()

    def assertFails(self, regex, fn, *args):
        with self.assertRaisesRegex(dc.CheckFailed, regex):
            self.run_mode(fn, *args)


# ---- Dockerfile syntax ----------------------------------------------------------------------------------
class Syntax(Case):
    def test_instructions_join_continuations_and_drop_comments(self):
        path = write(self.root, "Dockerfile", "# c\nFROM a AS b\n\nRUN x \\\n  # inside\n    && y\nenv K=V\n")
        self.assertEqual(dc.instructions(path),
                         [(2, "FROM", "a AS b"), (4, "RUN", "x && y"), (7, "ENV", "K=V")])

    def test_escape_directive_refused(self):
        path = write(self.root, "Dockerfile", "# escape=`\nFROM a\n")
        self.assertFails("escape parser directive", dc.instructions, path)

    def test_trailing_continuation_refused(self):
        path = write(self.root, "Dockerfile", "FROM a\nRUN x \\\n")
        self.assertFails("ends inside a line continuation", dc.instructions, path)

    def test_env_key_value_form(self):
        self.assertEqual(dc.env_pairs('A=1 B="two words" C=', 3), [("A", "1"), ("B", "two words"), ("C", "")])

    def test_env_legacy_form(self):
        self.assertEqual(dc.env_pairs("A one two", 3), [("A", "one two")])

    def test_env_substitution_and_bad_items_refused(self):
        self.assertFails(r"Dockerfile:3: ENV A: variable substitution", dc.env_pairs, "A=$HOME", 3)
        self.assertFails(r"cannot read ENV item '=x'", dc.env_pairs, "A=1 =x", 3)
        self.assertFails("empty ENV", dc.env_pairs, "", 3)

    def test_exec_form(self):
        self.assertEqual(dc.exec_form('["/bin/x", "a"]', "ENTRYPOINT"), ["/bin/x", "a"])
        for rest in ("/bin/x a", "[]", '[1]', '{"a": 1}'):
            self.assertFails("must be in exec form", dc.exec_form, rest, "ENTRYPOINT")

    def test_copy_args(self):
        self.assertEqual(dc.copy_args("--from=builder --chmod=755 a b /dst/", 1),
                         ({"from": "builder", "chmod": "755"}, ["a", "b"], "/dst/"))
        self.assertEqual(dc.copy_args('["a b", "/c"]', 1), ({}, ["a b"], "/c"))
        self.assertFails("COPY needs a source and a destination", dc.copy_args, "--link only", 1)

    def test_seconds(self):
        self.assertEqual(dc.seconds("1m30s", "x"), 90)
        self.assertEqual(dc.seconds("250ms", "x"), 0.25)
        self.assertEqual(dc.seconds("2 hours", "x"), 7200)
        self.assertFails("cannot read duration", dc.seconds, "10", "x")
        self.assertFails("unknown unit", dc.seconds, "10y", "x")


# ---- .dockerignore and the context ---------------------------------------------------------------------
class DockerIgnore(Case):
    def test_allowlist_and_patterns(self):
        write(self.root, ".dockerignore", DOCKERIGNORE + "src/secret/\n!src/secret/keep.rs\n")
        rules = dc.ignore_rules(os.path.join(self.root, ".dockerignore"))
        for rel, out in (("Cargo.toml", False), ("README.md", True), ("tests/a.rs", True),
                         ("src/a/b.rs", False), ("src/a/b.rs~", True), ("config/x~", True),
                         ("target/release/imgedge", True), ("src/secret/k.pem", True),
                         ("src/secret/keep.rs", False), ("Cargo.toml.orig", True)):
            self.assertEqual(dc.excluded(rules, rel), out, rel)

    def test_no_dockerignore_keeps_everything(self):
        self.assertEqual(dc.ignore_rules(os.path.join(self.root, ".dockerignore")), [])

    def test_make_context_copies_what_is_let_through(self):
        make_checkout(self.root, files={"src/old.rs~": "x"})
        ctx = os.path.join(self.tmp, "context")
        n = dc.make_context(self.root, ctx)
        got = sorted(os.path.relpath(os.path.join(d, f), ctx) for d, _, fs in os.walk(ctx) for f in fs)
        self.assertEqual(got, ["Cargo.lock", "Cargo.toml", "benches/transform.rs", "config/default.toml",
                               "config/haproxy.cfg", "src/config.rs", "src/lib.rs", "src/main.rs"])
        self.assertEqual(n, len(got))


# ---- the Dockerfile, as check.sh reads it ----------------------------------------------------------------
class Dockerfile(Case):
    def dockerfile(self, text=DOCKERFILE, files=None, mode="dry"):
        make_checkout(self.root, text, files)
        return shell_values(self.run_mode(dc.dockerfile, self.root, self.tmp, mode))

    def refused(self, regex, old, new, files=None):
        self.assertIn(old, DOCKERFILE)
        make_checkout(self.root, DOCKERFILE.replace(old, new), files)
        self.assertFails(regex, dc.dockerfile, self.root, self.tmp, "dry")

    def test_values(self):
        v = self.dockerfile()
        self.assertEqual(v["BUILDER_IMAGE"], "rust:1.95.0-slim-bookworm")
        self.assertEqual(v["RUNTIME_IMAGE"], "debian:bookworm-slim")
        self.assertEqual(v["IMAGE_RUST"], "1.95.0")
        self.assertEqual(v["IMAGE_ENV"], [f"{k}={x}" for k, x in IMAGE_ENV.items()])
        self.assertEqual(v["ENTRY_ARGS"], [])
        self.assertEqual(v["HC_ARGS"], ["healthcheck"])
        self.assertEqual((v["HC_START_PERIOD"], v["HC_TIMEOUT"]), ("10", "5"))
        self.assertEqual((v["STOP_SIGNAL"], v["IMAGE_USER"]), ("TERM", "10001:10001"))
        self.assertEqual((v["DISK_DIR"], v["DISK_CAPACITY"]), ("/var/cache/imgedge", "1073741824"))
        self.assertEqual(v["STOP_WITHIN"], "10")
        self.assertEqual(v["ARTIFACT"], os.path.join(self.tmp, "build/target/release/imgedge"))
        self.assertEqual(v["ARTIFACT_NAME"], "imgedge")
        self.assertEqual(v["CONTEXT_FILES"], "8")

    def test_env_legacy_form_and_settings(self):
        v = self.dockerfile(DOCKERFILE.replace(
            "ENTRYPOINT", "ENV IMGEDGE_SERVER__DRAIN_DELAY 5s\nENV IMGEDGE_CACHE__DISK_CAPACITY_BYTES=42\nENTRYPOINT"))
        self.assertIn("IMGEDGE_SERVER__DRAIN_DELAY=5s", v["IMAGE_ENV"])
        self.assertEqual((v["STOP_WITHIN"], v["DISK_CAPACITY"]), ("15", "42"))

    def test_cmd_follows_entrypoint(self):
        v = self.dockerfile(DOCKERFILE + 'CMD ["--config", "/etc/imgedge.toml"]\n')
        self.assertEqual(v["ENTRY_ARGS"], ["--config", "/etc/imgedge.toml"])

    def test_expose_with_protocol(self):
        self.dockerfile(DOCKERFILE.replace("EXPOSE 8080", "EXPOSE 9000 8080/tcp"))

    def commands(self):
        """build.sh's lines that are not comments."""
        with open(os.path.join(self.tmp, "build.sh")) as f:
            return [line for line in f.read().splitlines() if not line.startswith("#")]

    def test_build_script(self):
        self.dockerfile()
        runs = [c for c in self.commands() if "sh -c" in c]
        self.assertEqual(len(runs), 2)
        self.assertTrue(runs[1].endswith("sh -c 'touch src/lib.rs src/main.rs && cargo build --release --locked')"))
        self.assertFalse([c for c in self.commands() if "apt-get" in c])
        self.assertIn(f"export PATH={os.path.join(self.tmp, 'cargo-shim')}:", "\n".join(self.commands()))
        subprocess.run(["bash", os.path.join(self.tmp, "build.sh")], check=True)
        build = os.path.join(self.tmp, "build")
        for rel in ("Cargo.toml", "Cargo.lock", "src/config.rs", "config/default.toml", "benches/transform.rs"):
            self.assertTrue(os.path.isfile(os.path.join(build, rel)), rel)
        self.assertFalse(os.path.exists(os.path.join(build, "tests")))
        self.assertFalse(os.path.exists(os.path.join(build, "target")), "the dry run built something")

    def test_mode(self):
        make_checkout(self.root)
        self.assertFails("neither dry nor build", dc.dockerfile, self.root, self.tmp, "1")

    # RUN: cargo build must be exactly `cargo build --release --locked`.
    def test_cargo_build_spacing_accepted(self):
        self.dockerfile(DOCKERFILE.replace("&& cargo build --release --locked\n\nFROM",
                                           "&& cargo   build  --release --locked\n\nFROM"))

    def test_cargo_build_without_locked_refused(self):
        self.refused(r"Dockerfile:17: `cargo build --release`: the image must build with exactly",
                     "&& cargo build --release --locked\n\nFROM", "&& cargo build --release\n\nFROM")

    def test_cargo_build_other_flags_refused(self):
        for other in ("cargo build --locked --release", "cargo build --release --locked --features avif",
                      "cargo build --release --locked -j1", "cargo build"):
            with self.subTest(other):
                self.refused("the image must build with exactly", "    && cargo build --release --locked \\\n",
                             f"    && {other} \\\n")

    def test_final_cargo_build_is_the_last_command(self):
        self.refused(r"Dockerfile:17: the builder's last step must be its final `cargo build --release --locked`",
                     "&& cargo build --release --locked\n\nFROM", "&& cargo build --release --locked && strip target/release/imgedge\n\nFROM")
        self.refused(r"Dockerfile:17: the builder's last step must be its final",
                     "&& cargo build --release --locked\n\nFROM", "&& cargo build --release --locked\nRUN strip target/release/imgedge\n\nFROM")

    def test_no_cargo_build_refused(self):
        text = DOCKERFILE.replace("cargo build --release --locked", "true")
        self.refused("never runs `cargo build --release --locked`", DOCKERFILE, text)

    def test_run_forms_refused(self):
        self.refused("only shell-form RUN", "RUN touch src/lib.rs", "RUN --mount=type=cache,target=/x touch src/lib.rs")
        self.refused("only shell-form RUN", "RUN touch src/lib.rs src/main.rs \\\n    && cargo build --release --locked",
                     'RUN ["cargo", "build", "--release", "--locked"]')

    def test_builder_run_with_absolute_path_refused(self):
        self.refused("a builder RUN with an absolute path", "RUN touch src/lib.rs", "RUN touch /src/src/lib.rs")

    def test_builder_instruction_not_understood_refused(self):
        self.refused("ENV in the builder stage is not understood", "WORKDIR /src", "WORKDIR /src\nENV RUSTFLAGS=-Copt-level=1")

    # COPY in the builder: committed and not excluded by .dockerignore.
    def test_copy_excluded_by_dockerignore_refused(self):
        self.refused(r"COPY tests: not in the build context \(not committed, or excluded by .dockerignore\)",
                     "COPY benches ./benches", "COPY benches ./benches\nCOPY tests ./tests")

    def test_copy_of_uncommitted_file_refused(self):
        self.refused("COPY build.rs: not in the build context", "COPY src ./src", "COPY src ./src\nCOPY build.rs ./")

    def test_copy_wildcard_and_from_refused(self):
        self.refused("COPY wildcards", "COPY src ./src", "COPY src/*.rs ./src/")
        self.refused("COPY --from in the builder", "COPY src ./src", "COPY --from=other /x ./src")

    def test_copy_outside_workdir_refused(self):
        self.refused(r"/elsewhere is outside the builder's WORKDIR \(/src\)", "COPY src ./src", "COPY src /elsewhere")

    # The runtime stage.
    def test_healthcheck_shell_form_refused(self):
        self.refused("HEALTHCHECK CMD must be in exec form", 'CMD ["/usr/local/bin/imgedge", "healthcheck"]',
                     "CMD /usr/local/bin/imgedge healthcheck")

    def test_healthcheck_without_cmd_refused(self):
        self.refused("HEALTHCHECK must be `HEALTHCHECK", "HEALTHCHECK --interval", "HEALTHCHECK NONE\n#")

    def test_healthcheck_other_binary_refused(self):
        self.refused("HEALTHCHECK runs /usr/bin/curl, not the binary", '["/usr/local/bin/imgedge", "healthcheck"]',
                     '["/usr/bin/curl", "-f", "http://127.0.0.1:8080/health/live"]')

    def test_entrypoint_shell_form_refused(self):
        self.refused("ENTRYPOINT must be in exec form", 'ENTRYPOINT ["/usr/local/bin/imgedge"]',
                     "ENTRYPOINT /usr/local/bin/imgedge")

    def test_missing_entrypoint_or_healthcheck_refused(self):
        self.refused("no ENTRYPOINT", 'ENTRYPOINT ["/usr/local/bin/imgedge"]\n', "")
        self.refused("no HEALTHCHECK", 'HEALTHCHECK --interval', "#")

    def test_expose_not_the_listen_port_refused(self):
        self.refused(r"EXPOSE 9090 does not include the listen port \(0.0.0.0:8080\)", "EXPOSE 8080", "EXPOSE 9090")

    def test_listen_without_port_refused(self):
        self.refused("must set IMGEDGE_SERVER__LISTEN=<address>:<port>", "IMGEDGE_SERVER__LISTEN=0.0.0.0:8080",
                     "IMGEDGE_SERVER__LISTEN=0.0.0.0")

    def test_user_root_refused(self):
        for user in ("root", "0", "0:0", "root:imgedge"):
            with self.subTest(user):
                self.refused("must set a non-root USER", "USER 10001:10001", f"USER {user}")

    def test_no_user_refused(self):
        self.refused(r"must set a non-root USER \(it has None\)", "USER 10001:10001\n", "")

    def test_stopsignal_refused(self):
        self.refused("STOPSIGNAL must be SIGTERM", "STOPSIGNAL SIGTERM", "STOPSIGNAL SIGINT")

    def test_disk_dir_not_a_volume_refused(self):
        self.refused("the disk dir /var/cache/imgedge is not a VOLUME", 'VOLUME ["/var/cache/imgedge"]', 'VOLUME ["/data"]')

    def test_disk_tier_off_refused(self):
        self.refused("must turn the disk tier on", "    IMGEDGE_CACHE__DISK_DIR=/var/cache/imgedge \\\n", "")

    def test_no_copy_from_builder_refused(self):
        self.refused("copies no binary from the builder", "COPY --from=builder /src/target/release/imgedge /usr/local/bin/imgedge\n", "")

    def test_copy_from_another_stage_refused(self):
        self.refused("the runtime stage copies from 'build', not from the builder stage 'builder'",
                     "COPY --from=builder ", "COPY --from=build ")

    def test_binary_not_from_target_release_refused(self):
        for path in ("/src/target/debug/imgedge", "/src/target/release/other", "/src/target/x86_64-unknown-linux-gnu/release/imgedge"):
            with self.subTest(path):
                self.refused(r"the runtime copies .*, not what `cargo build --release --locked` in the builder's WORKDIR produces \(/src/target/release/imgedge\)",
                             "--from=builder /src/target/release/imgedge", f"--from=builder {path}")

    # The stage list: a builder, then the runtime.
    def test_one_stage_refused(self):
        text = DOCKERFILE[DOCKERFILE.index("FROM debian"):]
        self.refused(r"expected two stages, a builder and then the runtime; it has 1 \(debian:bookworm-slim\)", DOCKERFILE, text)

    def test_three_stages_refused(self):
        self.refused(r"it has 3 \(alpine AS tools, rust:1.95.0-slim-bookworm AS builder, debian:bookworm-slim\)",
                     "FROM rust:", "FROM alpine AS tools\nRUN true\nFROM rust:")

    def test_runtime_first_refused(self):
        builder, runtime = DOCKERFILE.split("\nFROM debian")
        self.refused("the builder stage needs a name", DOCKERFILE, "FROM debian" + runtime + "\n" + builder)

    def test_unnamed_builder_refused(self):
        self.refused("the builder stage needs a name", "slim-bookworm AS builder", "slim-bookworm")


# ---- what `cargo build --release --locked` needs -------------------------------------------------------------
class CargoNeeds(Case):
    def test_derived_from_the_manifest_and_the_includes(self):
        make_checkout(self.root)
        needs = dc.cargo_needs(self.root)
        self.assertEqual(sorted(needs["same"]), ["Cargo.lock", "Cargo.toml", "config/default.toml"])
        self.assertEqual(needs["same"]["config/default.toml"], "src/config.rs:1 includes it")
        self.assertEqual(sorted(needs["trees"]), ["src"])
        self.assertEqual(sorted(needs["exist"]), ["benches/transform.rs"])
        self.assertEqual(needs["bins"], ["imgedge"])

    def test_build_script_path_dependency_and_bytes(self):
        manifest = CARGO_TOML + '\n[dependencies]\nhelper = { path = "crates/helper" }\n'
        make_checkout(self.root, files={
            "Cargo.toml": manifest, "build.rs": "fn main() {}\n", "crates/helper/Cargo.toml": "[package]\n",
            "src/main.rs": 'static LOGO: &[u8] = include_bytes!("../assets/logo.png");\nfn main() {}\n',
            "assets/logo.png": "png"})
        needs = dc.cargo_needs(self.root)
        self.assertIn("build.rs", needs["same"])
        self.assertIn("assets/logo.png", needs["same"])
        self.assertEqual(sorted(needs["trees"]), ["crates/helper", "src"])

    def test_autobins_and_includes_in_comments(self):
        make_checkout(self.root, files={
            "Cargo.toml": '[package]\nname = "edge"\nversion = "0.1.0"\n',
            "src/lib.rs": '//! `include_str!("../nowhere.txt")` in a doc comment is not compiled\n'
                          '// include_str!("../nor/here")\n',
            "src/config.rs": None})
        needs = dc.cargo_needs(self.root)
        self.assertEqual(needs["bins"], ["edge"])
        self.assertEqual(sorted(needs["same"]), ["Cargo.lock", "Cargo.toml"])

    def test_refusals(self):
        for regex, files in (("Cargo.lock is not committed", {"Cargo.lock": None}),
                             (r"src/config.rs:1 includes it: config/default.toml is not committed", {"config/default.toml": None}),
                             ("includes ../../x.toml, outside the checkout", {"src/config.rs": 'include_str!("../../x.toml");\n'}),
                             ("includes the absolute path /etc/x", {"src/config.rs": 'include_str!("/etc/x");\n'}),
                             ("a workspace with members", {"Cargo.toml": CARGO_TOML + '[workspace]\nmembers = ["a"]\n'}),
                             ("the binary imgedge's source src/main.rs is not committed", {"src/main.rs": None}),
                             (r"crates/x \(the path dependency x\) is not committed",
                              {"Cargo.toml": CARGO_TOML + '[dependencies]\nx = { path = "crates/x" }\n'})):
            with self.subTest(regex):
                self.setUp()
                make_checkout(self.root, files=files)
                self.assertFails(regex, dc.cargo_needs, self.root)


# ---- the builder's steps, run with the cargo stand-in -------------------------------------------------------------
class BuilderSteps(Case):
    def builder(self, text=DOCKERFILE, files=None):
        """Writes the checkout (in fresh temp dirs), the builder script (dry), runs it, and
        verifies what cargo saw."""
        self.setUp()
        make_checkout(self.root, text, files)
        self.run_mode(dc.dockerfile, self.root, self.tmp, "dry")
        run = subprocess.run(["bash", os.path.join(self.tmp, "build.sh")], capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        return shell_values(self.run_mode(dc.builder, self.root, self.tmp))

    def refused(self, regex, old, new, files=None):
        self.assertIn(old, DOCKERFILE)
        with self.assertRaisesRegex(dc.CheckFailed, regex):
            self.builder(DOCKERFILE.replace(old, new), files)

    def calls(self):
        with open(os.path.join(self.tmp, "cargo-shim/calls.jsonl")) as f:
            return [json.loads(line) for line in f]

    def test_the_dockerfile_builds_what_the_test_command_builds(self):
        v = self.builder()
        self.assertEqual(v["BUILD_NEEDS"], ["Cargo.lock", "Cargo.toml", "config/default.toml", "src/", "benches/transform.rs"])
        calls = self.calls()
        self.assertEqual([c["argv"] for c in calls], [["build", "--release", "--locked"]] * 2)
        # The stub build sees the manifest and stubs; the final one the committed sources.
        self.assertEqual(sorted(calls[0]["files"]), ["Cargo.lock", "Cargo.toml", "benches/transform.rs", "src/lib.rs", "src/main.rs"])
        self.assertIn("src/config.rs", calls[1]["files"])

    def test_missing_bench_refused(self):
        self.refused(r"final `cargo build --release --locked` has no benches/transform.rs \(Cargo.toml names the bench transform.*\): "
                     r"the Dockerfile does not COPY it", "COPY benches ./benches\n", "")

    def test_missing_include_refused(self):
        self.refused(r"has no config/default.toml \(src/config.rs:1 includes it\): the Dockerfile does not COPY it",
                     "COPY config ./config\n", "")

    def test_include_excluded_by_dockerignore_refused(self):
        self.refused(r"has no config/default.toml \(src/config.rs:1 includes it\): it is excluded by .dockerignore",
                     "COPY config ./config\n", "", files={".dockerignore": DOCKERIGNORE.replace("!config/\n", "")})

    def test_missing_build_script_refused(self):
        self.refused(r"has no build.rs \(the build script's source\)", "COPY benches", "COPY benches",
                     files={"build.rs": "fn main() {}\n"})

    def test_missing_source_refused(self):
        self.refused(r"has no src/config.rs \(the sources of the library and the binary imgedge \(src/\)\)", "COPY src ./src", "COPY src/lib.rs src/main.rs ./src/")

    def test_source_changed_by_a_run_refused(self):
        self.refused(r"sees a src/main.rs that differs from the committed one .*; a RUN step changes it",
                     "RUN touch src/lib.rs src/main.rs", "RUN echo 'fn x() {}' >> src/main.rs")

    def test_extra_source_left_by_a_run_refused(self):
        self.refused(r"sees src/generated.rs in src/ .*which is not committed",
                     "RUN touch src/lib.rs src/main.rs", "RUN touch src/lib.rs src/main.rs src/generated.rs")

    def test_stub_sources_left_refused(self):
        self.refused(r"sees a src/main.rs that differs from the committed one",
                     "COPY src ./src", "COPY src/lib.rs src/config.rs ./src/")

    def test_cargo_environment_set_by_a_run_refused(self):
        self.refused(r"cargo call 2 .*: the RUN step sets RUSTFLAGS for cargo",
                     "&& cargo build --release --locked\n\nFROM", "&& RUSTFLAGS=-Ctarget-cpu=native cargo build --release --locked\n\nFROM")
        self.refused(r"cargo call 1 .*: the RUN step sets CARGO_PROFILE_RELEASE_LTO for cargo",
                     "RUN mkdir src benches", "RUN export CARGO_PROFILE_RELEASE_LTO=true && mkdir src benches")

    def test_other_cargo_commands_refused(self):
        self.refused(r"cargo call 1 \(`cargo fetch --locked`\): the builder may run cargo only as",
                     "RUN mkdir src benches", "RUN cargo fetch --locked && mkdir src benches")

    def test_build_outside_the_workdir_refused(self):
        self.refused(r"cargo call 2 .* ran in .*/build/sub, not in the builder's WORKDIR",
                     "RUN touch src/lib.rs src/main.rs", "RUN mkdir sub && cd sub")


# ---- the test command's binary, fresh -----------------------------------------------------------------------
class Stale(Case):
    def test_newer_sources(self):
        make_checkout(self.root)
        binary = write(self.root, "target/release/imgedge", "bin")
        for rel in ("Cargo.toml", "Cargo.lock", "src/lib.rs", "src/main.rs", "src/config.rs", "config/default.toml",
                    "benches/transform.rs"):
            os.utime(os.path.join(self.root, rel), (1000, 1000))
        os.utime(binary, (2000, 2000))
        self.assertEqual(dc.stale(binary, self.root), "")
        for rel in ("Cargo.toml", "benches/transform.rs", "README.md"):  # they do not relink the binary
            os.utime(os.path.join(self.root, rel), (3000, 3000))
        self.assertEqual(dc.stale(binary, self.root), "")
        os.utime(os.path.join(self.root, "config/default.toml"), (3000, 3000))
        self.assertEqual(dc.stale(binary, self.root), "config/default.toml")
        os.utime(os.path.join(self.root, "src/main.rs"), (4000, 4000))
        self.assertEqual(dc.stale(binary, self.root), "src/main.rs")


# ---- DOCKER_CHECK_BUILD=1: the stand-in runs cargo ------------------------------------------------------------------
class BuildMode(Case):
    def test_the_stand_in_runs_cargo(self):
        # A "real" cargo that writes the binary where the runtime stage copies it from.
        fake = write(self.tmp, "toolchain/cargo",
                     '#!/bin/sh\necho "$@" >> "$PWD/real-cargo.log"\n'
                     'mkdir -p "$CARGO_TARGET_DIR/release" && echo bin > "$CARGO_TARGET_DIR/release/imgedge"\n')
        os.chmod(fake, 0o755)
        path = os.path.dirname(fake) + os.pathsep + os.environ["PATH"]
        make_checkout(self.root)
        with unittest.mock.patch.dict(os.environ, {"PATH": path}):
            v = shell_values(self.run_mode(dc.dockerfile, self.root, self.tmp, "build"))
        subprocess.run(["bash", os.path.join(self.tmp, "build.sh")], check=True, env={**os.environ, "PATH": path})
        self.run_mode(dc.builder, self.root, self.tmp)
        self.assertTrue(os.path.isfile(v["ARTIFACT"]))
        with open(os.path.join(self.tmp, "build/real-cargo.log")) as f:
            self.assertEqual(f.read(), "build --release --locked\n" * 2)
        # Called by cargo itself (a build script), the stand-in only passes through.
        shim = os.path.join(self.tmp, "cargo-shim/cargo")
        subprocess.run([shim, "metadata"], check=True, cwd=os.path.join(self.tmp, "build"),
                       env={**os.environ, "PATH": path, "CARGO_MANIFEST_DIR": "/x",
                            "CARGO_TARGET_DIR": os.path.join(self.tmp, "build/target")})
        with open(os.path.join(self.tmp, "cargo-shim/calls.jsonl")) as f:
            self.assertEqual(len(f.readlines()), 2)

    def test_no_cargo_refused(self):
        make_checkout(self.root)
        with unittest.mock.patch.dict(os.environ, {"PATH": "/nonexistent"}):
            self.assertFails("DOCKER_CHECK_BUILD=1: no cargo on PATH", dc.dockerfile, self.root, self.tmp, "build")


# ---- compose.yaml, as `docker compose config --format json` resolves it ---------------------------------------
class Compose(Case):
    def service(self, **over):
        svc = {"build": {"context": self.root, "dockerfile": "Dockerfile"}, "image": "imgedge:local",
               "ports": [{"mode": "ingress", "target": 8080, "published": "8080", "protocol": "tcp"}],
               "volumes": [{"type": "volume", "source": "imgedge-cache", "target": "/var/cache/imgedge"}],
               "deploy": {"resources": {"limits": {"memory": "536870912"}}},
               "stop_signal": "SIGTERM", "stop_grace_period": "15s"}
        svc.update(over)
        return svc

    def compose(self, services):
        make_checkout(self.root)
        path = write(self.tmp, "compose.json", json.dumps({"name": "imgedge", "services": services}))
        return dc.compose, path, self.root, json.dumps(list(IMAGE_ENV.items()))

    def test_values(self):
        out = shell_values(self.run_mode(*self.compose({"imgedge": self.service()})))
        self.assertEqual(out["COMPOSE_ENV"], [f"{k}={v}" for k, v in IMAGE_ENV.items()]
                         + ["IMGEDGE_MEMORY__BUDGET_BYTES=536870912"])
        self.assertEqual((out["COMPOSE_MEMORY"], out["COMPOSE_STOP_GRACE"], out["COMPOSE_SERVICE"]),
                         ("536870912", "15", "imgedge"))

    def test_environment_over_the_image(self):
        env = {"IMGEDGE_LOG__FORMAT": "text", "IMGEDGE_MEMORY__BUDGET_BYTES": "1000", "UNSET": None}
        out = shell_values(self.run_mode(*self.compose({"imgedge": self.service(environment=env, mem_limit="2000",
                                                                                  deploy=None)})))
        self.assertIn("IMGEDGE_LOG__FORMAT=text", out["COMPOSE_ENV"])
        self.assertIn("IMGEDGE_MEMORY__BUDGET_BYTES=1000", out["COMPOSE_ENV"])
        self.assertNotIn("UNSET=None", out["COMPOSE_ENV"])
        self.assertEqual(out["COMPOSE_MEMORY"], "2000")

    def test_grace_period_refused(self):
        self.assertFails(r"stop_grace_period \(10s\) must exceed .* \(10s\)",
                         *self.compose({"imgedge": self.service(stop_grace_period="10s")}))
        self.assertFails(r"stop_grace_period \(15s\) must exceed .* \(15s\)",
                         *self.compose({"imgedge": self.service(environment={"IMGEDGE_SERVER__DRAIN_DELAY": "5s"})}))

    def test_refusals(self):
        for regex, over in (("publishes no port to 8080", {"ports": [{"target": 9000}]}),
                            ("mounts no named volume on the disk dir", {"volumes": [{"type": "bind", "source": "/x", "target": "/var/cache/imgedge"}]}),
                            ("has no memory limit", {"deploy": None}),
                            ("disables the image's healthcheck", {"healthcheck": {"disable": True}}),
                            ("disables the image's healthcheck", {"healthcheck": {"test": ["NONE"]}}),
                            ("stop_signal SIGKILL", {"stop_signal": "SIGKILL"})):
            with self.subTest(regex):
                self.assertFails(regex, *self.compose({"imgedge": self.service(**over)}))

    def test_one_service_built_here(self):
        self.assertFails("expected one service built from ./Dockerfile",
                         *self.compose({"a": self.service(), "b": self.service()}))
        self.assertFails("expected one service built from ./Dockerfile",
                         *self.compose({"a": self.service(build={"context": "/elsewhere"})}))


# ---- compose.cluster.yaml and config/haproxy.cfg ---------------------------------------------------------
class Cluster(Case):
    def services(self, edge_env=None, grace="18s", rewrite=HAPROXY_REWRITE):
        env = {"IMGEDGE_CACHE__SHARED__URL": "redis://redis:6379", "IMGEDGE_SERVER__DRAIN_DELAY": "3s"}
        env.update(edge_env or {})
        edge = {"build": {"context": self.root, "dockerfile": "Dockerfile"}, "environment": env,
                "stop_grace_period": grace}
        return {"imgedge1": dict(edge), "imgedge2": dict(edge),
                "haproxy": {"image": "haproxy:2.6", "entrypoint": ["/bin/sh", "-c", rewrite],
                            "volumes": [{"type": "bind", "source": os.path.join(self.root, "config/haproxy.cfg"),
                                         "target": "/usr/local/etc/haproxy/imgedge.cfg", "read_only": True}]},
                "redis": {"image": "redis:7.0"}}

    def cluster(self, services, haproxy=HAPROXY_CFG):
        make_checkout(self.root, files={"config/haproxy.cfg": haproxy})
        path = write(self.tmp, "cluster.json", json.dumps({"services": services}))
        self.out = os.path.join(self.tmp, "haproxy.cfg")
        return dc.compose_cluster, path, self.root, json.dumps(list(IMAGE_ENV.items())), self.out

    def test_rewrite_serves_the_instances(self):
        self.run_mode(*self.cluster(self.services()))
        with open(self.out) as f:
            cfg = f.read()
        self.assertIn("bind :8080\n", cfg)
        self.assertIn("bind :8404\n", cfg)
        self.assertIn("server imgedge1 imgedge1:8080 id 1", cfg)
        self.assertIn("server imgedge2 imgedge2:8080 id 2", cfg)

    def test_changed_haproxy_cfg_that_the_rewrite_misses_refused(self):
        self.assertFails(r"servers are \['127.0.0.1', 'imgedge1'\], its instances \['imgedge1', 'imgedge2'\]",
                         *self.cluster(self.services(), HAPROXY_CFG.replace("127.0.0.1:8082", "127.0.0.1:8092")))

    def test_loopback_bind_left_refused(self):
        self.assertFails("still binds loopback",
                         *self.cluster(self.services(), HAPROXY_CFG.replace("bind 127.0.0.1:8404", "bind 127.0.0.1:8405")))

    def test_servers_on_another_port_refused(self):
        self.assertFails("not on the image's listen port 8080",
                         *self.cluster(self.services(rewrite=HAPROXY_REWRITE.replace("imgedge2:8080", "imgedge2:9000"))))

    def test_shared_url_names_no_service_refused(self):
        self.assertFails(r"imgedge1's IMGEDGE_CACHE__SHARED__URL \('redis://cache:6379'\) names no service",
                         *self.cluster(self.services({"IMGEDGE_CACHE__SHARED__URL": "redis://cache:6379"})))

    def test_grace_period_refused(self):
        self.assertFails(r"imgedge1's stop_grace_period \(13s\) must exceed shutdown_grace \+ drain_delay \(13s\)",
                         *self.cluster(self.services(grace="13s")))

    def test_one_instance_refused(self):
        services = self.services()
        del services["imgedge2"]
        self.assertFails("expected several services built from ./Dockerfile", *self.cluster(services))

    def test_entrypoint_not_sh_c_refused(self):
        services = self.services()
        services["haproxy"]["entrypoint"] = ["haproxy", "-f", "/x"]
        self.assertFails(r"haproxy's entrypoint is not \[/bin/sh, -c, script\]", *self.cluster(services))


# ---- imgedge's output ----------------------------------------------------------------------------------------
class Output(Case):
    HEALTH = {"status": "ok", "cache": {"disk": {"enabled": True, "capacity_bytes": 100}},
              "memory": {"budget_bytes": 512}}

    def health(self, h, capacity="100", budget="0"):
        return dc.health, write(self.tmp, "health.json", json.dumps(h)), capacity, budget

    def test_health(self):
        self.run_mode(*self.health(self.HEALTH))
        self.run_mode(*self.health(self.HEALTH, budget="512"))
        self.assertFails("the disk tier is off", *self.health({**self.HEALTH, "cache": {"disk": {"enabled": False}}}))
        self.assertFails("capacity_bytes is 100, expected 200", *self.health(self.HEALTH, capacity="200"))
        self.assertFails("budget_bytes is 512, expected 1024", *self.health(self.HEALTH, budget="1024"))
        self.assertFails("status 'degraded'", *self.health({**self.HEALTH, "status": "degraded"}))

    def test_logs(self):
        lines = [{"fields": {"message": "disk tier open"}}, {"fields": {"message": "listening"}}]
        self.run_mode(dc.logs, write(self.tmp, "ok.log", "\n".join(map(json.dumps, lines)) + "\n\n"))
        self.assertFails("not a JSON log line", dc.logs, write(self.tmp, "text.log", "INFO listening\n"))
        self.assertFails("no 'listening' log line", dc.logs, write(self.tmp, "short.log", json.dumps(lines[0]) + "\n"))

    def test_main_prints_the_failure(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = dc.main(["logs", write(self.tmp, "text.log", "plain\n")])
        self.assertEqual(status, 1)
        self.assertRegex(err.getvalue(), r"^docker/check.sh: FAIL: .*text.log:1: not a JSON log line")

    def test_env_json_and_free_port(self):
        self.assertEqual(json.loads(self.run_mode(dc.main, ["env-json", "A=1", "B=x=y"])), [["A", "1"], ["B", "x=y"]])
        self.assertTrue(0 < int(self.run_mode(dc.main, ["free-port"])) < 65536)


if __name__ == "__main__":
    unittest.main()
