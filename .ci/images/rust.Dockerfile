# CI stand-in for docker.io/library/rust:*-slim-bookworm (no Docker Hub here): Debian with
# gcc and libc6-dev, plus the machine's own Rust toolchain copied in as toolchain/, and the
# machine's CA bundle: its egress to crates.io goes through a TLS proxy with its own CA, which
# cargo inside the build must trust as the host does.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain/ /usr/local/
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN cargo --version && rustc --version
