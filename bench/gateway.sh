#!/usr/bin/env bash
# Gateway overhead benchmark (issue 5): the same requests straight to a kiln-worker and
# through a kiln-gateway in front of it, in the same run, over loopback TCP (plaintext, so
# the figures are the proxy's and not TLS's):
#   noop     an unchanged (fully cached) Dockerfile build with `kiln build --addr`
#            (FROM and RUN: the build context is not read)
#   noopcopy the same with a COPY from the context (its listing crosses the session)
#   workers  `kiln workers` (ListWorkers), a whole client process per call
#   latency  per-call latency of ListWorkers and Status on one kept connection per path
#            (gateway/benches/latency.rs, LAT_N calls each, default 2000)
# Prints medians and p99 of N runs and the ratios (targets: no-op build through the gateway
# <= 1.1x direct; p99 added per-call latency <= 1 ms). Client process start-up is part of
# the noop and workers figures, on both sides. Every process runs at nice $NICE (default
# -10; root) so that other work on the machine disturbs the tails less.
# With OTHER_GATEWAY="/path/to/kiln-gateway ..." (for example a build of the base commit;
# several paths, space-separated), the noop builds also go through one more gateway per
# path, interleaved build by build, for an A/B comparison in one run ("noop other1", ...).
# Usage: bench/gateway.sh [N]   (root; release binaries unless KILN_BIN=dir is given)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
LAT_N=${LAT_N:-2000}
NICE=${NICE:--10}
cargo bench --no-run -q -p kiln-gateway --bench latency
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --release -q -p kiln-cli -p kiln-worker -p kiln-gateway -p kiln-e2e
  KILN_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
bin=$KILN_BIN
renice -n "$NICE" $$ >/dev/null
# shellcheck source=bench/lib.sh
. bench/lib.sh
scratch kiln-gateway-bench
start_registry
start_worker_and_gateway
gpids=("${pids[-1]}")
read -r -a others <<<"${OTHER_GATEWAY:-}"
oports=()
for o in "${others[@]}"; do
  oport=$(free_port)
  "$o" --addr "tcp://127.0.0.1:$oport" --insecure-tcp --workers "w0=tcp://127.0.0.1:$wport" --log warn 2>"$work/gwo$oport.log" &
  pids+=($!)
  gpids+=($!)
  wait_port "$oport"
  oports+=("$oport")
done

mkdir -p "$work/proj" "$work/projcopy"
printf 'ARG BASE\nFROM ${BASE}\nRUN echo hi > /x\n' >"$work/proj/Dockerfile"
printf 'ARG BASE\nFROM ${BASE}\nCOPY app.txt /app.txt\nRUN cat /app.txt > /x\n' >"$work/projcopy/Dockerfile"
echo app >"$work/projcopy/app.txt"
now() { date +%s.%N; }
timed() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); echo "$t1 - $t0" | bc; }
build() { "$bin/kiln" build --addr "tcp://127.0.0.1:$1" --progress quiet --opt kiln.route-key=bench \
  --build-arg "BASE=$addr/base:1" "${2:-$work/proj}"; }
# Warm both paths (the first build fills the worker's cache).
build "$wport" >/dev/null; build "$gport" >/dev/null
build "$wport" "$work/projcopy" >/dev/null; build "$gport" "$work/projcopy" >/dev/null
for oport in "${oports[@]}"; do build "$oport" >/dev/null; done

# CPU time (user + system, clock ticks) of gateway process $1 while a no-op build runs
# through it, added up in $work/cpu.$1.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cpu_build() {
  local c0 c1
  c0=$(ticks "$1")
  timed build "$2"
  c1=$(ticks "$1")
  echo $((c1 - c0)) >>"$work/cpu.$1"
}
for i in $(seq 1 "$N"); do
  timed build "$wport" >>"$work/noop.direct"
  cpu_build "${gpids[0]}" "$gport" >>"$work/noop.gateway"
  for j in "${!oports[@]}"; do cpu_build "${gpids[$((j + 1))]}" "${oports[$j]}" >>"$work/noop.other$((j + 1))"; done
  timed build "$wport" "$work/projcopy" >>"$work/noopcopy.direct"
  timed build "$gport" "$work/projcopy" >>"$work/noopcopy.gateway"
  timed "$bin/kiln" workers --addr "tcp://127.0.0.1:$wport" >>"$work/workers.direct"
  timed "$bin/kiln" workers --addr "tcp://127.0.0.1:$gport" >>"$work/workers.gateway"
done

stat() { sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; i=int(NR*0.99); if (i<1) i=1; printf "%.4f %.4f\n", m, a[i]}'; }
printf '%-8s %-8s %10s %10s\n' what path median p99
for w in noop noopcopy workers; do
  for p in direct gateway; do
    read -r m q < <(stat <"$work/$w.$p")
    printf '%-8s %-8s %10s %10s\n' "$w" "$p" "$m" "$q"
    eval "${w}_${p}=$m"
  done
done
# How far the ratio of medians moves with the sample: 95 % bootstrap interval.
for w in noop noopcopy; do
  echo "$w gateway/direct = $(echo "scale=3; $(eval echo "\$${w}_gateway") / $(eval echo "\$${w}_direct")" | bc)  (target <= 1.1)"
  python3 - "$work/$w.direct" "$work/$w.gateway" "$w" <<'PY'
import random, statistics, sys
d, g = ([float(x) for x in open(p)] for p in sys.argv[1:3])
random.seed(1)
r = sorted(statistics.median(random.choices(g, k=len(g))) / statistics.median(random.choices(d, k=len(d)))
           for _ in range(2000))
print(f"{sys.argv[3]} gateway/direct 95% bootstrap interval: {r[50]:.3f} .. {r[1949]:.3f}")
PY
done
for j in "${!others[@]}"; do
  read -r m q < <(stat <"$work/noop.other$((j + 1))")
  printf '%-8s %-8s %10s %10s\n' noop "other$((j + 1))" "$m" "$q"
  echo "noop other$((j + 1))/direct = $(echo "scale=3; $m / $noop_direct" | bc)  (${others[$j]})"
done
hz=$(getconf CLK_TCK)
for j in "${!gpids[@]}"; do
  name=gateway; [ "$j" -gt 0 ] && name="other$j"
  total=$(paste -sd+ "$work/cpu.${gpids[$j]}" | bc)
  echo "$name CPU per no-op build: $(echo "scale=2; $total * 1000 / $hz / $N" | bc) ms (user + system)"
done
echo "workers added median = $(echo "scale=4; ($workers_gateway - $workers_direct) * 1000" | bc) ms"
echo "(median of $N; $(nproc) cores, $(uname -r); each figure includes a kiln process start)"
echo
echo "per-call latency, one connection per path, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo bench -q -p kiln-gateway --bench latency -- -n "$LAT_N" --direct "127.0.0.1:$wport" --gateway "127.0.0.1:$gport"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
