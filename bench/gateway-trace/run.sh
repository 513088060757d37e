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
work=$(mktemp -d /var/tmp/kiln-gateway-trace.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$bin/kiln-testenv" registry >"$work/registry.addr" &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$work/registry.addr" ] && break; sleep 0.1; done
addr=$(head -n1 "$work/registry.addr")
"$bin/kiln-testenv" push-base "$addr" base:1 >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }
wport=$(free_port); gport=$(free_port)
"$bin/kiln-worker" --root "$work/w0" --addr "tcp://127.0.0.1:$wport" --insecure-tcp --worker-id w0 --log warn 2>"$work/w0.log" &
pids+=($!)
wait_port "$wport"
"$bin/kiln-gateway" --addr "tcp://127.0.0.1:$gport" --insecure-tcp --workers "w0=tcp://127.0.0.1:$wport" --log warn 2>"$work/gw.log" &
pids+=($!)
wait_port "$gport"
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
