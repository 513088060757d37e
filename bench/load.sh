#!/usr/bin/env bash
# Load harness (issue 8 item 1): a real docker-registry, 3 kiln-workers and one
# kiln-gateway (--max-builds-per-worker, default 8) on loopback; projects on the busybox
# base are warmed, a fully cached build is timed unloaded (median of 10), then 50 clients
# run `kiln build --addr tcp://gateway` loops for 60 s with a mix of fully cached (80%),
# partly cached (15%: one changed file, its COPY and one RUN re-run) and cold (5%) builds.
# Prints builds/s, p50/p95/p99 per kind, errors (must be 0), cache misses of the cached
# builds, per-worker in-flight and queue depth sampled from the gateway's /metrics, and
# p99(cached under load) / unloaded (target <= 3x).
# Usage: bench/load.sh [kiln-load flags: --clients N --duration S --max-builds-per-worker N
#        --cached-pct P --partial-pct P ...]   (root; release binaries unless KILN_BIN=dir)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-cli -p kiln-worker -p kiln-gateway -p kiln-e2e
  KILN_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores, $(uname -r)"
exec "$KILN_BIN/kiln-load" --bin-dir "$KILN_BIN" "$@"
