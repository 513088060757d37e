#!/usr/bin/env bash
# A real build end to end, daemonless: starts a registry on 127.0.0.1, pushes a base image
# made from busybox-static, builds e2e/examples/multistage with `kiln build` (RUN steps in
# runc, overlayfs layers), pushes the result and prints its digest. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v runc >/dev/null || ! command -v docker-registry >/dev/null || ! command -v skopeo >/dev/null || ! [ -x /bin/busybox ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runc busybox-static docker-registry skopeo >/dev/null
fi
cargo build --release -q -p kiln-cli -p kiln-e2e
log=$(mktemp)
target/release/kiln-testenv registry >"$log" &
reg=$!
trap 'kill $reg 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 100); do [ -s "$log" ] && break; sleep 0.1; done
addr=$(head -n1 "$log")
target/release/kiln-testenv push-base "$addr" kiln/base:1 >/dev/null
target/release/kiln build --root "${KILN_ROOT:-/var/lib/kiln}" --progress "${PROGRESS:-plain}" \
  --build-arg BASE="$addr/kiln/base:1" -t "$addr/kiln/demo:latest" --push \
  --metadata-file "${METADATA:-/tmp/kiln-demo-metadata.json}" \
  e2e/examples/multistage
