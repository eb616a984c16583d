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

# --- builder ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder

# The build dependencies of .ci/run: rdkafka (feature "ssl") builds the bundled librdkafka with
# ./configure + make (build-essential), pkg-config, OpenSSL headers (openssl-sys) and zlib
# headers (libz-sys).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# .git is not in the build context (.dockerignore): pass the commit for membersync_build_info.
ARG MEMBERSYNC_GIT_COMMIT=unknown
ENV MEMBERSYNC_GIT_COMMIT=${MEMBERSYNC_GIT_COMMIT}

# Cache mounts keep the registry and the target directory between builds (BuildKit); the binary
# is copied out of the cached target directory, which is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin membersync \
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
