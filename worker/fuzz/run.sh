#!/usr/bin/env bash
# Builds the cargo-fuzz targets once, then runs each for SECS seconds (default 30) from its
# committed seeds (seeds/<target>) plus the local corpus (corpus/<target>, not committed).
# Prints each target's executions and corpus size; fails on the first crash, leak, timeout
# or out-of-memory, leaving the input in artifacts/<target>/.
#
#   worker/fuzz/run.sh 30        # CI
#   worker/fuzz/run.sh 600       # the 10-minute runs of bench/RESULTS.md
#   FUZZ_TARGETS="llb_decode" worker/fuzz/run.sh 60
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain is used with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags. Runs as root (unpacking sets owners).
set -euo pipefail

secs="${1:-30}"
case "$secs" in
'' | *[!0-9]*)
	echo "usage: $0 [SECONDS]" >&2
	exit 2
	;;
esac
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
targets=(${FUZZ_TARGETS:-dockerfile_parse dockerignore llb_decode fsutil_packet layer_unpack})

start=$(date +%s)
cargo fuzz build
echo "fuzz build: $(($(date +%s) - start)) s"

status=0
for t in "${targets[@]}"; do
	mkdir -p "corpus/$t" "artifacts/$t"
	log="$(mktemp)"
	t0=$(date +%s)
	set +e
	cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
		-max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
		>"$log" 2>&1
	rc=$?
	set -e
	execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
	corpus=$(find "corpus/$t" -type f | wc -l)
	if [ "$rc" -ne 0 ]; then
		echo "FAIL $t: exit $rc after $(($(date +%s) - t0)) s, ${execs:-?} execs; log:" >&2
		tail -n 60 "$log" >&2
		status=1
	else
		echo "ok   $t: ${execs:-?} execs in $(($(date +%s) - t0)) s, corpus $corpus files, 0 crashes"
	fi
	rm -f "$log"
	[ "$status" -eq 0 ] || break
done
exit "$status"
