# Multi-stage build: compile with the locked dependency set, ship a slim image running as non-root.
# build.rs compiles proto/ with protox (no protoc); ring (rustls) needs the C compiler that
# rust:slim ships. Cargo.toml declares the benches, so benches/ must be in the context too.
# libpq (Postgres sources of `viewcar origin`): headers to build, the library to run.
FROM rust:1-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpq-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin viewcar

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpq5 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home viewcar
COPY --from=build /src/target/release/viewcar /usr/local/bin/viewcar
USER 10001
# 7070: the Cache gRPC API; 7071: WebSocket /ws and the admin endpoints (/metrics, /healthz,
# /readyz, /status, the status page). Both bind 127.0.0.1 unless configured otherwise: see
# examples/k8s/ for probes on the pod IP. `viewcar origin` serves Feed on 7000.
EXPOSE 7070 7071 7000
ENTRYPOINT ["/usr/local/bin/viewcar", "sidecar"]
CMD ["--config", "/etc/viewcar/viewcar.toml"]
