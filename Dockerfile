# Multi-stage build of the walsync binary. librdkafka is compiled from the bundled sources by
# rdkafka-sys, so the builder needs a C toolchain, OpenSSL headers and zlib.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked && strip target/release/walsync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 walsync
COPY --from=build /src/target/release/walsync /usr/local/bin/walsync
USER walsync
EXPOSE 9898
ENTRYPOINT ["walsync"]
CMD ["run", "--config", "/etc/walsync/walsync.toml"]
