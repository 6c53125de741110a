# imgedge container image.
#
#   docker build -t imgedge .
#   docker run --rm -p 8080:8080 -v imgedge-cache:/var/cache/imgedge --memory 512m \
#     --stop-timeout 15 imgedge
#
# docker/check.sh (CI) lints this file with hadolint and, as there is no container engine in CI,
# runs this file's builder steps in a shell on a clean checkout (with a cargo that records what
# each build would see; DOCKER_CHECK_BUILD=1 builds) and the release binary with the runtime
# stage's ENV, ENTRYPOINT, HEALTHCHECK and STOPSIGNAL. It parses them from here, so keep them in
# the forms it reads: two stages (a named builder, then the runtime), builder RUN commands use
# paths relative to WORKDIR, every build is exactly `cargo build --release --locked` and the
# last is the builder's last command, ENTRYPOINT and HEALTHCHECK are exec form (JSON arrays).

# ---- builder ---------------------------------------------------------------------------------
# The toolchain CI builds and tests with (Cargo.toml: rust-version = "1.95").
FROM rust:1.95.0-slim-bookworm AS builder

# tikv-jemalloc-sys (the release allocator) builds jemalloc with make, mozjpeg-sys (MozJPEG,
# JPEG for transforms) its SIMD code with nasm; the slim image has gcc and libc6-dev (enough for
# libwebp-sys) but neither of these. Not version-pinned (DL3008): bookworm is a stable release that only
# takes fixes, and an exact pin breaks the build once an update replaces that version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make nasm \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependencies in a layer of their own: built against stub sources from the manifest and lock
# file alone, so it is rebuilt only when Cargo.toml or Cargo.lock change, not on every source
# edit. (Only the library and the binary are built: tests and benches never are, but the manifest
# names benches/transform.rs, which must exist for it to be read.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/transform.rs \
    && cargo build --release --locked \
    && rm -rf src benches

# The real sources. config/default.toml is compiled in (include_str! in src/config.rs). Their
# modification times may be older than the stub build's outputs, hence the touch, so that cargo
# rebuilds the crate itself (and only it).
COPY config ./config
COPY src ./src
COPY benches ./benches
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked

# ---- runtime ---------------------------------------------------------------------------------
# Same Debian release as the builder (the binary links glibc dynamically). ca-certificates:
# TLS to origins uses rustls with the system's roots (rustls-native-certs reads
# /etc/ssl/certs/ca-certificates.crt).
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="imgedge" \
      org.opencontainers.image.description="A streaming image proxy and CDN-style edge cache" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# ca-certificates is not version-pinned (DL3008): the image should get the archive's current
# roots, and an exact pin breaks the build once a security update replaces that version.
# A non-root user with a fixed UID/GID (10001, numeric so that runAsNonRoot can verify it), and
# the disk tier's directory owned by it, 0700 as imgedge would create it (entries may hold
# private images). It is made before VOLUME, so a new named volume starts with this owner.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 imgedge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin imgedge \
    && install -d -m 0700 -o 10001 -g 10001 /var/cache/imgedge

COPY --from=builder /src/target/release/imgedge /usr/local/bin/imgedge

# Configuration is IMGEDGE_<SECTION>__<KEY> variables over the built-in defaults
# (config/default.toml); `docker run -e` or compose's `environment:` override these.
# - Listen on every interface (the default is 127.0.0.1, unreachable from outside a container).
# - The disk tier is on, in the volume below; its capacity (1 GiB, the default) is stated so it
#   is seen to be tuned to the volume's size. The files are sparse: space is used as entries
#   are written.
# - Logs are JSON, one object per line on stdout: what container log collectors (Docker's
#   json-file/journald drivers, Kubernetes with Loki, Fluent Bit, Datadog...) parse into fields,
#   and nobody reads a container's log on a terminal. Set IMGEDGE_LOG__FORMAT=text to read them
#   with `docker logs`.
# The memory budget is not set: imgedge reads the container's cgroup memory limit
# (`docker run --memory`, compose's memory limit) and sizes its pressure levels from it;
# cache.memory_capacity_bytes (256 MiB) must stay within 60% of that limit.
ENV IMGEDGE_SERVER__LISTEN=0.0.0.0:8080 \
    IMGEDGE_CACHE__DISK_DIR=/var/cache/imgedge \
    IMGEDGE_CACHE__DISK_CAPACITY_BYTES=1073741824 \
    IMGEDGE_LOG__FORMAT=json

VOLUME ["/var/cache/imgedge"]
USER 10001:10001
EXPOSE 8080

# imgedge stops on SIGTERM: with server.drain_delay (0s) it keeps serving while /health/ready
# says "draining", then stops accepting and gives open connections server.shutdown_grace (10s).
# Give `docker stop` more than their sum (--stop-timeout 15, compose's stop_grace_period: 15s),
# or it sends SIGKILL at 10 s. imgedge handles SIGTERM and SIGINT itself and starts no child
# processes, so it runs as PID 1 without an init.
STOPSIGNAL SIGTERM

# The image has no curl: `imgedge healthcheck` GETs /health/live on server.listen (0.0.0.0 asked
# on 127.0.0.1) and exits 0 on 200 within 3 s, else 1. It reads the same environment, so it
# follows a changed IMGEDGE_SERVER__LISTEN.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/imgedge", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/imgedge"]
