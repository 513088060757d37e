#!/usr/bin/env bash
# Builds Kiln's four images (root Dockerfile: worker, gateway, controller, kiln) with Kiln
# itself, daemonless, into OCI tarballs, then runs each image's entrypoint with --version under
# runc. Issue 7's check; .ci/run calls it after the tests.
#
# There is no Docker Hub or gcr.io here, so the base images the Dockerfile names are replaced
# by stand-ins made on this machine and pushed to a throwaway local registry:
#   debian:bookworm-slim   mmdebstrap (minbase + ca-certificates) from Debian's mirror
#   rust:slim-bookworm     .ci/images/rust.Dockerfile: Debian + gcc + this machine's toolchain
#                          and CA bundle
#   distroless/cc:nonroot  .ci/images/distroless-cc.Dockerfile: glibc, CA certificates, 65532
# The stand-ins are built by Kiln too. The Rust stage compiles the whole workspace in release
# mode in a runc container, fetching crates from crates.io.
#
# Usage: .ci/images.sh [OUT_DIR]   (root; default OUT_DIR=target/images)
# KILN_BIN=DIR picks the kiln/kiln-testenv binaries (default: cargo build, debug).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=$(realpath -m "${1:-target/images}")
mkdir -p "$out"

if [ -z "${KILN_BIN:-}" ]; then
  cargo build --locked -q -p kiln-cli -p kiln-e2e --bins
  KILN_BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
fi
kiln=$KILN_BIN/kiln
testenv=$KILN_BIN/kiln-testenv
for tool in mmdebstrap runc python3 "$kiln" "$testenv"; do
  command -v "$tool" >/dev/null || { echo "images.sh: missing $tool (apt-get install -y mmdebstrap runc)" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/kiln-images.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== images: %s (%ss)\n' "$1" "$SECONDS"; }

step "registry"
"$testenv" registry >"$work/registry.addr" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/registry.addr" ] && break; sleep 0.1; done
reg=$(head -n1 "$work/registry.addr")
[ -n "$reg" ] || { echo "images.sh: the registry did not start" >&2; exit 1; }

step "debian base (mmdebstrap)"
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mmdebstrap --quiet --variant=minbase --include=ca-certificates --skip=output/dev \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  bookworm "$work/debian.tar" "$mirror"
"$testenv" push-rootfs "$reg" stand-in/debian:bookworm-slim "$work/debian.tar" \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["bash"]}'
debian=$reg/stand-in/debian:bookworm-slim

kbuild() {
  "$kiln" build --root "$work/root" --progress plain --build-arg "DEBIAN_IMAGE=$debian" "$@"
}

step "rust builder stand-in"
sysroot=$(rustc --print sysroot)
mkdir -p "$work/rustctx/toolchain/bin"
cp -al "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$work/rustctx/toolchain/bin/" 2>/dev/null \
  || cp -a "$sysroot/bin/cargo" "$sysroot/bin/rustc" "$work/rustctx/toolchain/bin/"
cp -al "$sysroot/lib" "$work/rustctx/toolchain/" 2>/dev/null || cp -a "$sysroot/lib" "$work/rustctx/toolchain/"
cp .ci/images/rust.Dockerfile "$work/rustctx/Dockerfile"
cp /etc/ssl/certs/ca-certificates.crt "$work/rustctx/ca-certificates.crt"
kbuild --output "type=image,name=$reg/stand-in/rust:slim-bookworm,push=true,compression=zstd" \
  "$work/rustctx"

step "distroless stand-in"
kbuild -f .ci/images/distroless-cc.Dockerfile \
  --output "type=image,name=$reg/stand-in/distroless-cc:nonroot,push=true" .ci/images

# The OCI tarballs carry their names (containerd's `ctr images import`, `kind load` use them).
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
for target in worker gateway controller kiln; do
  name=kiln-$target
  [ "$target" = kiln ] && name=kiln
  step "image $name"
  kbuild --target "$target" \
    --build-arg "RUST_IMAGE=$reg/stand-in/rust:slim-bookworm" \
    --build-arg "RUNTIME_IMAGE=$reg/stand-in/distroless-cc:nonroot" \
    --output "type=oci,dest=$out/$name.tar,name=${IMAGE_REPO:-ghcr.io/kiln-build}/$name:$version" \
    --metadata-file "$out/$name.json" \
    "$repo"
done

step "run each image's --version under runc"
for name in kiln-worker kiln-gateway kiln-controller kiln; do
  got=$(python3 .ci/images/run-image.py "$out/$name.tar" "$work/run-$name" --version)
  echo "$name.tar: $got ($(du -h "$out/$name.tar" | cut -f1))"
  case "$got" in
    "$name "[0-9]*) ;;
    *) echo "images.sh: $name.tar printed '$got', not '$name <version>'" >&2; exit 1 ;;
  esac
done
step "done: $out"
