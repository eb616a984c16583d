# syntax=docker/dockerfile:1
#
# membersync container image: one binary, every role (`run`, `cdc`, `ingest`, `merge`,
# `migrate`, `check`, `dlq`), chosen by the command. Build:
#
#   docker build -t membersync:dev --build-arg MEMBERSYNC_GIT_COMMIT="$(git rev-parse --short=12 HEAD)" .
#
# Configuration: MEMBERSYNC_CONFIG (a TOML file) plus MEMBERSYNC__SECTION__KEY overrides; secrets
# only through the environment or `*_file` keys pointing at mounted files (docs/configuration.md,
# docs/operations.md).

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# --- chef: cargo-chef, pinned -----------------------------------------------------------------
# The dependency layer: `cargo chef prepare` reduces the workspace to a recipe (manifests, lock
# file, target list) and `cargo chef cook` builds only the dependencies from it. The recipe, and
# so the cooked layer, changes only when Cargo.toml or Cargo.lock do: a source change rebuilds
# membersync alone, not its ~400 dependencies (https://github.com/LukeMathWalker/cargo-chef).
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef

ARG CARGO_CHEF_VERSION=0.1.78
# The build dependencies of .ci/run: rdkafka (feature "ssl") builds the bundled librdkafka with
# ./configure + make (build-essential), pkg-config, OpenSSL headers (openssl-sys) and zlib
# headers (libz-sys).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && cargo install cargo-chef --locked --version ${CARGO_CHEF_VERSION}
WORKDIR /src

# --- planner: the recipe ------------------------------------------------------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- builder ------------------------------------------------------------------------------------
FROM chef AS builder

# Dependencies first, from the recipe only: this layer is reused as long as the manifests and
# the lock file are unchanged.
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin membersync --recipe-path recipe.json

# Then the sources: only membersync itself is compiled here.
COPY . .

# .git is not in the build context (.dockerignore): pass the commit for membersync_build_info.
ARG MEMBERSYNC_GIT_COMMIT=unknown
ENV MEMBERSYNC_GIT_COMMIT=${MEMBERSYNC_GIT_COMMIT}

RUN cargo build --release --locked --bin membersync \
    && install -D -m 0755 target/release/membersync /out/membersync

# --- runtime ---------------------------------------------------------------------------------
# Same Debian release as the builder: the binary links the system's libssl3 (and zlib, libgcc_s,
# glibc, which the base image has).
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/membersync /usr/local/bin/membersync
COPY membersync.example.toml /etc/membersync/membersync.example.toml

# A fixed numeric user so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001

# In a container the servers must listen on every interface (the file's defaults are loopback).
# Environment wins over the config file: change these two here, not in the TOML.
ENV MEMBERSYNC__TELEMETRY__METRICS_ADDR=0.0.0.0:9464 \
    MEMBERSYNC__INGEST__LISTEN_ADDR=0.0.0.0:8080

# 8080: webhooks (ingest); 9464: ops server (/metrics, /healthz, /readyz).
EXPOSE 8080 9464

# Liveness of the ops server without adding curl to the image: bash's /dev/tcp speaks enough
# HTTP/1.0 to read the status line of /healthz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["/usr/local/bin/membersync"]
CMD ["run"]
