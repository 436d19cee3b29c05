# Multi-stage build: compile with the locked dependency set, ship a slim image running as non-root.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
COPY examples ./examples
RUN cargo build --release --locked --bin viewcar

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home viewcar
COPY --from=build /src/target/release/viewcar /usr/local/bin/viewcar
USER 10001
EXPOSE 7070
ENTRYPOINT ["/usr/local/bin/viewcar", "sidecar"]
CMD ["--config", "/etc/viewcar/viewcar.toml"]
