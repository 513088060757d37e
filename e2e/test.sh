#!/usr/bin/env bash
# Runs every test of the workspace. Needs root, runc, busybox-static, docker-registry and
# skopeo (see .ci/run for the packages). Registries are started by the tests themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
for bin in runc crun busybox docker-registry skopeo openssl; do
  command -v "$bin" >/dev/null || { echo "missing $bin: apt-get install -y runc crun busybox-static docker-registry skopeo openssl" >&2; exit 1; }
done
command -v kubernetes-validate >/dev/null || { echo "missing kubernetes-validate: python3 -m pip install kubernetes-validate" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the worker tests run containers: run as root" >&2; exit 1; }
exec cargo test --workspace --locked "$@"
