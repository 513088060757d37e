#!/usr/bin/env bash
# Whole-build benchmarks of `kiln build` (daemonless), median of N runs, printed with the
# ratio to the BuildKit v0.24.0 reference figures measured on this machine class (issue
# "Engine core"; BuildKit itself cannot run here). Workloads from ../shared/bench:
#   ctx10k  first build of 100 dirs x 100 files (FROM scratch; COPY . /app), fresh state
#   noop10k the same, rebuilt unchanged
#   cold    the multi-stage RUN build of shared/bench/run/Dockerfile, fresh state, base
#           pulled from a registry on 127.0.0.1
#   cached  the same, rebuilt unchanged
# Usage: bench/run.sh [N]   (root; builds release binaries first)
# Build state lives on a fresh ext4 filesystem (a loop-mounted image) so every run starts
# from the same disk state, as a worker's own volume would; BENCH_FS=host keeps it in
# /var/tmp instead (a shared, churned filesystem measures the filesystem, not Kiln: ext4's
# inode allocator slows down after many recent deletions).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5}
shared=${SHARED:-../shared/bench}
cargo build --release -q -p kiln-cli -p kiln-e2e
kiln=$PWD/target/release/kiln
work=$(mktemp -d /var/tmp/kiln-bench.XXXXXX)
log=$work/registry.addr
target/release/kiln-testenv registry >"$log" &
reg=$!
cleanup() { kill $reg 2>/dev/null; umount "$work/fs" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
if [ "${BENCH_FS:-ext4}" = ext4 ]; then
  truncate -s 8G "$work/fs.img"
  mkfs.ext4 -q -F "$work/fs.img"
  mkdir -p "$work/fs" && mount -o loop "$work/fs.img" "$work/fs"
  state=$work/fs
else
  state=$work
fi
for _ in $(seq 1 100); do [ -s "$log" ] && break; sleep 0.1; done
addr=$(head -n1 "$log")
target/release/kiln-testenv push-base "$addr" base:1 >/dev/null

sh "$shared/ctx10k/make-context.sh" "$work/ctx10k" >/dev/null
mkdir -p "$work/run" && cp "$shared/run/Dockerfile" "$work/run/"

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }
# build ROOT DIR [extra flags…]
build() { local root=$1 dir=$2; shift 2; "$kiln" build --root "$root" --progress quiet "$@" "$dir" >/dev/null; }

measure_fresh() { # name dir flags… : each run on a fresh root
  local name=$1 dir=$2; shift 2
  for i in $(seq 1 "$N"); do
    local root=$state/root-$name-$i
    local t0; t0=$(now); build "$root" "$dir" "$@"; local t1; t1=$(now)
    echo "$t1 - $t0" | bc
  done | median
}
measure_again() { # name dir flags… : one warm-up build, then N rebuilds on the same root
  local name=$1 dir=$2; shift 2
  local root=$state/root-$name-warm
  build "$root" "$dir" "$@"
  for i in $(seq 1 "$N"); do
    local t0; t0=$(now); build "$root" "$dir" "$@"; local t1; t1=$(now)
    echo "$t1 - $t0" | bc
  done | median
}

runargs=(--build-arg "BASE=$addr/base:1")
ctx_first=$(measure_fresh ctx10k "$work/ctx10k")
ctx_noop=$(measure_again noop10k "$work/ctx10k")
cold=$(measure_fresh cold "$work/run" "${runargs[@]}")
cached=$(measure_again cached "$work/run" "${runargs[@]}")

printf '%-8s %10s %14s %10s %12s\n' workload "kiln (s)" "buildkit (s)" target "buildkit/kiln"
row() { printf '%-8s %10s %14s %10s %12s\n' "$1" "$2" "$3" "$4" "$(echo "scale=2; $5 / $2" | bc)"; }
row ctx10k "$ctx_first" "12-20" "<= 2" 12
row noop10k "$ctx_noop" "0.70" "<= 0.25" 0.70
row cold "$cold" "0.73" "<= 0.6" 0.73
row cached "$cached" "0.08" "<= 0.06" 0.08
echo "(median of $N; state on ${BENCH_FS:-ext4}; buildkit/kiln uses the low end of BuildKit's range; $(nproc) cores, $(uname -r))"
