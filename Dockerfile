# syntax=docker/dockerfile:1
# verigate: multi-stage build, small non-root final image.
# Build:  docker build -t verigate .
# Run:    docker run -p 8026:8026 -p 8025:8025 -v verigate-data:/var/lib/verigate verigate

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The patched storage engine ([patch.crates-io] in Cargo.toml, vendor/README.md).
COPY vendor ./vendor
COPY benches ./benches
COPY static ./static
COPY openapi ./openapi
COPY config.example.toml ./
# Exactly the command CI uses for the release binary (.ci/static.sh checks this line).
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311+deb12u1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 verigate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/verigate --shell /usr/sbin/nologin verigate \
    && mkdir -p /var/lib/verigate /etc/verigate \
    && chown verigate:verigate /var/lib/verigate
COPY --from=build /src/target/release/verigate /usr/local/bin/verigate
USER 10001:10001
# MIMALLOC_ALLOW_THP=0: no transparent huge pages for the allocator (idle RSS 16.5 -> 13 MB).
ENV MIMALLOC_ALLOW_THP=0 \
    VERIGATE_DATA_DIR=/var/lib/verigate \
    VERIGATE_LISTEN__API=0.0.0.0:8026 \
    VERIGATE_LISTEN__PUBLIC=0.0.0.0:8025
VOLUME ["/var/lib/verigate"]
EXPOSE 8025 8026
# No curl in the image: the binary probes its own /readyz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/verigate", "probe"]
ENTRYPOINT ["/usr/local/bin/verigate"]
CMD ["serve"]
