# syntax=docker/dockerfile:1
#
# The one tallyman image: the `tallyman` binary (operator, worker, gateway,
# dev, validate, crdgen, audit) on a distroless base, as a non-root user.
#
#   docker build -t tallyman:dev .
#
# The e2e suite also builds the simulated ERP from the same file:
#
#   docker build --target sim-erp -t tallyman-sim-erp:dev .
#
# Both are dynamically linked against glibc (mimalloc and ring compile C), so
# the runtime is distroless "cc" (glibc, libgcc, CA certificates, nothing
# else: no shell, no package manager).

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
# The registry and target caches stay between builds (BuildKit); the
# binary is copied out of the cache mount into the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tallyman --bin tallyman \
 && install -D -m 0755 target/release/tallyman /out/tallyman

FROM build AS build-sim-erp
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tallyman-testing --bin sim-erp \
 && install -D -m 0755 target/release/sim-erp /out/sim-erp

# Test-only: the simulated ERP of operator/testing, for e2e/cluster.
FROM gcr.io/distroless/cc-debian12:nonroot AS sim-erp
COPY --from=build-sim-erp /out/sim-erp /usr/local/bin/sim-erp
USER 65532:65532
EXPOSE 8090
ENTRYPOINT ["/usr/local/bin/sim-erp"]
CMD ["--listen", "0.0.0.0:8090"]

# The product image (the default target: last in the file).
FROM gcr.io/distroless/cc-debian12:nonroot AS tallyman
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="tallyman" \
      org.opencontainers.image.description="Warehouse events and financial records in step: operator, worker and webhook gateway" \
      org.opencontainers.image.source="https://github.com/tallyman-dev/tallyman" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/tallyman /usr/local/bin/tallyman
# nonroot of distroless, numerically, so runAsNonRoot can verify it.
USER 65532:65532
# 8080 webhooks (gateway); 9090 /healthz, /readyz, /metrics (every process).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/tallyman"]
CMD ["--help"]
