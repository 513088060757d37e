# syntax=docker/dockerfile:1
# Kiln's own images, one target per component, built from this workspace in one Rust stage:
#
#   kiln build --target worker     --output type=oci,dest=kiln-worker.tar .
#   kiln build --target gateway    --output type=oci,dest=kiln-gateway.tar .
#   kiln build --target controller --output type=oci,dest=kiln-controller.tar .
#   kiln build --target kiln       --output type=oci,dest=kiln.tar .
#
# (buildctl and docker buildx take the same file.) The base images are build arguments so a
# machine that cannot reach Docker Hub or gcr.io can give its own; CI does (.ci/images.sh).
#
#   worker      Debian slim + runc. Runs as root: it mounts overlayfs and starts containers
#               (the controller renders it privileged).
#   gateway     distroless cc, non-root (65532).
#   controller  distroless cc, non-root (65532).
#   kiln        Debian slim with a shell, non-root (65532): the Tekton task's step runs a
#               script with it.

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# === build: every binary, once ===
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The registry and target caches stay on the builder between builds; the binaries leave the
# cache mount by copy, since a cache mount is never part of a layer.
RUN --mount=type=cache,id=kiln-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=kiln-cargo-target,target=/src/target \
    cargo build --release --locked \
      --bin kiln-worker --bin kiln-gateway --bin kiln-controller --bin kiln \
 && mkdir -p /out \
 && cp target/release/kiln-worker target/release/kiln-gateway \
       target/release/kiln-controller target/release/kiln /out/

# === worker ===
FROM ${DEBIAN_IMAGE} AS worker
RUN apt-get update \
 && apt-get install -y --no-install-recommends runc ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/kiln /run/kiln
COPY --from=build /out/kiln-worker /usr/local/bin/kiln-worker
VOLUME /var/lib/kiln
EXPOSE 1234 9090
ENTRYPOINT ["/usr/local/bin/kiln-worker"]

# === gateway ===
FROM ${RUNTIME_IMAGE} AS gateway
COPY --from=build /out/kiln-gateway /usr/local/bin/kiln-gateway
USER 65532:65532
EXPOSE 1234 9090
ENTRYPOINT ["/usr/local/bin/kiln-gateway"]

# === controller ===
FROM ${RUNTIME_IMAGE} AS controller
COPY --from=build /out/kiln-controller /usr/local/bin/kiln-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kiln-controller"]

# === kiln (the CLI) ===
FROM ${DEBIAN_IMAGE} AS kiln
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kiln \
 && useradd --uid 65532 --gid 65532 --home-dir /home/kiln --create-home --shell /bin/sh kiln
COPY --from=build /out/kiln /usr/local/bin/kiln
USER 65532:65532
WORKDIR /home/kiln
ENTRYPOINT ["/usr/local/bin/kiln"]
