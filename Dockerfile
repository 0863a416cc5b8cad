# ti-scheduler as a container image: built from source in the Rust image, run from a
# small Debian image as a non-root user, the database in the volume /var/lib/ti-scheduler.
# Needs Docker 23 or newer (BuildKit, for the cache mounts). README, "Running in a
# container"; checked by scripts/check-packaging.sh.
#
#   docker build -t ti-scheduler .
#   docker run -d --name ti-scheduler -p 8102:8102 -v ti-scheduler-data:/var/lib/ti-scheduler \
#       -e TI_SCHEDULER__SERVER__PUBLIC_URL=http://<the name TIs reach this host by>:8102 ti-scheduler

# The toolchain the crate asks for (Cargo.toml, rust-version).
ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# sqlx's query metadata is committed in sqlx-data/, and .cargo/config.toml sets
# SQLX_OFFLINE=true: the build needs no database. The cache mounts keep the crates and
# the build directory between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ti-scheduler \
    && cp target/release/ti-scheduler /usr/local/bin/ti-scheduler

FROM debian:bookworm-slim AS runtime
# A system user of its own; only the database directory is writable by it.
RUN groupadd --system --gid 10001 ti-scheduler \
    && useradd --system --uid 10001 --gid ti-scheduler --home-dir /var/lib/ti-scheduler \
       --no-create-home --shell /usr/sbin/nologin ti-scheduler \
    && install -d -o ti-scheduler -g ti-scheduler -m 0750 /var/lib/ti-scheduler
COPY --from=builder /usr/local/bin/ti-scheduler /usr/local/bin/ti-scheduler
COPY config/default.toml /etc/ti-scheduler/config.toml
# Listen on every interface of the container; the database in the volume. TIs on other
# hosts need TI_SCHEDULER__SERVER__PUBLIC_URL (the callback address), and a reachable
# service needs TI_SCHEDULER__SERVER__ADMIN_TOKEN. TI_SCHEDULER_URL is where the client
# commands (and the health check) find the service.
ENV TI_SCHEDULER__SERVER__BIND=0.0.0.0:8102 \
    TI_SCHEDULER__DATABASE__PATH=/var/lib/ti-scheduler/ti-scheduler.db \
    TI_SCHEDULER_URL=http://127.0.0.1:8102
# Numeric, so that a runtime can check it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /var/lib/ti-scheduler
VOLUME ["/var/lib/ti-scheduler"]
EXPOSE 8102
# The image has no curl: the binary probes itself (GET /ready, exit status 0 or 1). The
# start period covers PRAGMA quick_check on a large database (about 2 s per million tasks).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["ti-scheduler", "probe", "--timeout", "4"]
# SIGTERM: stop accepting, finish the commits under way, close the database, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["ti-scheduler"]
CMD ["serve", "--config", "/etc/ti-scheduler/config.toml"]
