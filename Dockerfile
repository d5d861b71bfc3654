# syntax=docker/dockerfile:1
#
# Switchboard container image: a Rust builder stage and a small Debian runtime, running as a
# non-root user. Build and run (docs/OPERATIONS.md, "Deployment"):
#
#   docker build -t switchboard:local .
#   docker run --rm -p 8081:8081 --ulimit nofile=1048576:1048576 switchboard:local
#
# The one port (8081, the `port` default) serves WebSocket, /health, /live, /ready and
# /metrics. Every setting comes from SWITCHBOARD_* variables or a file named by
# SWITCHBOARD_CONFIG (docs/CONFIG.md). No HEALTHCHECK: the runtime image carries no HTTP client;
# orchestrators probe /ready and /live themselves (deploy/k8s/, deploy/compose/).

# The toolchain the benchmarks were measured with (docs/BENCHMARKS.md, "Machine"); the
# crate's minimum is rust-version in Cargo.toml. bookworm, so that the binary's glibc is the
# runtime stage's.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build
# librdkafka is built from its bundled sources (rdkafka-sys: ./configure and make, no cmake);
# the rust image already has gcc, make and perl. ring (rustls) needs only cc.
COPY . .
# Cache mounts keep the registry and the target dir between builds (BuildKit); the binary is
# copied out of the cached target dir, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p switchboard --bin switchboard \
    && install -D -m 0755 target/release/switchboard /out/switchboard \
    && strip --strip-debug /out/switchboard

FROM debian:bookworm-slim AS runtime
# ca-certificates: the system trust store for rediss:// (redis_tls_ca_file unset reads it).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin switchboard
COPY --from=builder /out/switchboard /usr/local/bin/switchboard
# In a container, listen on every interface (the default, said explicitly), and do not pin
# shards to cores: under a CPU quota the cores this process may use are shared with other
# containers, and pinning shard i to core i would stack every node's shard 0 on core 0. Pin
# only with a dedicated cpuset (docker --cpuset-cpus, Kubernetes' static CPU manager).
ENV SWITCHBOARD_HOST=0.0.0.0 \
    SWITCHBOARD_PIN_CORES=false
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8081
# SIGTERM starts the drain (shutdown_timeout, 30 s by default): give the container longer
# than that to stop (docker stop -t 45, compose stop_grace_period, Kubernetes
# terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchboard"]
