# syntax=docker/dockerfile:1
# osc-agent image: a static musl binary on distroless/static (CA certificates, no shell, no libc),
# running as UID/GID 65532, fine with a read-only root filesystem (the agent writes only to the volumes
# it is given).
#   docker build -t osc-agent:dev .
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
# rustls + ring only (no OpenSSL): a fully static binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/osc-agent /osc-agent

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="osc-agent" \
      org.opencontainers.image.description="Keeps files, ConfigMaps and Secrets in sync with an OpenSecureConf server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /osc-agent /osc-agent
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/osc-agent"]
