#!/usr/bin/env bash
# Pool cache benchmark (issue 4): the same project built by
#   cold   a fresh kiln-worker, no pool cache               (every RUN executes)
#   pool   a fresh kiln-worker whose --cache-registry was filled by another worker
#   warm   the first worker again, unchanged project          (local cache)
# on a project whose RUN steps take >= 10 s in total. Builds go through
# `kiln build --addr unix://…` to real `kiln-worker` daemons; a docker-registry on
# 127.0.0.1 holds the base image and the pool cache. Prints seconds and the ratios
# (targets: pool <= 2x warm, cold >= 5x pool).
# pool and warm are the median of N runs (pool: a fresh worker each time); cold is one run.
# Usage: bench/cache.sh [N]   (root; builds debug binaries unless KILN_BIN=dir is given)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3}
if [ -z "${KILN_BIN:-}" ]; then
  cargo build -q -p kiln-cli -p kiln-worker -p kiln-e2e
  KILN_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug
fi
bin=$KILN_BIN
# shellcheck source=bench/lib.sh
. bench/lib.sh
scratch kiln-cache-bench
start_registry

mkdir -p "$work/proj"
cat >"$work/proj/Dockerfile" <<'EOF'
ARG BASE
FROM ${BASE} AS a
RUN sleep 5 && echo a > /a
FROM ${BASE} AS b
RUN sleep 5 && echo b > /b
FROM ${BASE}
COPY --from=a /a /a
COPY --from=b /b /b
RUN sleep 5 && cat /a /b > /ab
EOF

# worker NAME [flags…]: starts a kiln-worker on its own root and socket.
worker() {
  local name=$1; shift
  "$bin/kiln-worker" --root "$work/$name" --addr "unix://$work/$name.sock" --log "${BENCH_LOG:-warn}" "$@" \
    >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 100); do [ -S "$work/$name.sock" ] && return; sleep 0.1; done
  echo "worker $name did not start" >&2; cat "$work/$name.log" >&2; exit 1
}
now() { date +%s.%N; }
# build NAME: one build on worker NAME, prints its wall-clock seconds.
build() {
  local t0 t1
  t0=$(now)
  "$bin/kiln" build --addr "unix://$work/$1.sock" --progress quiet \
    --build-arg "BASE=$addr/base:1" "$work/proj" >/dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc
}
# Waits until the pool repository's tag list stops growing (background export done).
settle() {
  local last=-1 n
  for _ in $(seq 1 100); do
    n=$(curl -fsS "http://$addr/v2/pool/tags/list" 2>/dev/null | grep -o 'kiln-' | wc -l || true)
    if [ "$n" -gt 0 ] && [ "$n" = "$last" ]; then return; fi
    last=$n; sleep 0.5
  done
}

worker cold
cold=$(build cold)

median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }

worker filler --cache-registry "$addr/pool"
build filler >/dev/null
settle
for i in $(seq 1 "$N"); do
  worker "pool$i" --cache-registry "$addr/pool"
  build "pool$i" >>"$work/pool.times"
done
pool=$(median <"$work/pool.times")
for i in $(seq 1 "$N"); do build cold >>"$work/warm.times"; done
warm=$(median <"$work/warm.times")

printf '%-6s %8s   (pool, warm: median of %s)\n' build seconds "$N"
printf '%-6s %8.3f\n' cold "$cold" pool "$pool" warm "$warm"
echo "pool/warm = $(echo "scale=2; $pool / $warm" | bc)  (target <= 2)"
echo "cold/pool = $(echo "scale=2; $cold / $pool" | bc)  (target >= 5)"
echo "($(nproc) cores, $(uname -r); RUN steps sleep 15 s in total, 10 s on the critical path)"
