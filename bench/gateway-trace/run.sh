#!/usr/bin/env bash
# Wire-level breakdown of the gateway's overhead on a no-op build (issue 5): one worker and
# one gateway on loopback (plaintext), N no-op builds direct and N through the gateway,
# interleaved, recorded by sniff.py (HTTP/2 frames with kernel timestamps) and split into
# phases by phases.py. The recorder takes CPU too, so phases are slower than in
# bench/gateway.sh; compare the two paths, not the absolute figures.
# Usage: bench/gateway-trace/run.sh [N]   (root; release binaries unless KILN_BIN=dir)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
N=${1:-30}
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-cli -p kiln-worker -p kiln-gateway -p kiln-e2e
  KILN_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
bin=$KILN_BIN
# shellcheck source=bench/lib.sh
. bench/lib.sh
scratch kiln-gateway-trace
start_registry
start_worker_and_gateway
mkdir -p "$work/proj"
printf 'ARG BASE\nFROM ${BASE}\nRUN echo hi > /x\n' >"$work/proj/Dockerfile"
build() { "$bin/kiln" build --addr "tcp://127.0.0.1:$1" --progress quiet --opt kiln.route-key=bench \
  --build-arg "BASE=$addr/base:1" "$work/proj" >/dev/null; }
for _ in 1 2; do build "$wport"; build "$gport"; done
python3 "$here/sniff.py" "$wport,$gport" "$work/wire" &
sniffer=$!
sleep 0.5
for _ in $(seq 1 "$N"); do build "$wport"; sleep 0.2; build "$gport"; sleep 0.2; done
kill "$sniffer"; wait "$sniffer" 2>/dev/null || true
[ -z "${KEEP:-}" ] || cp "$work/wire" "$KEEP"
python3 "$here/phases.py" "$work/wire" "$wport" "$gport"
