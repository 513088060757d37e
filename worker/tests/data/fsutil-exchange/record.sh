#!/usr/bin/env bash
# Regenerates exchange.txt: a real fsutil sender and receiver (Debian's
# golang-github-tonistiigi-fsutil-dev, the library buildctl and BuildKit use) exchange the
# small tree below over an in-memory stream; every packet is written as `S <hex>` (sender
# to receiver) or `R <hex>` (receiver to sender), in the order sent.
#   apt-get install golang-1.19-go golang-github-tonistiigi-fsutil-dev
#   worker/tests/data/fsutil-exchange/record.sh   (as root: owners are 0:0)
# The tree must match `tree()` in worker/src/session/filesync/recorded.rs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/src
mkdir -p "$src/src"
printf 'FROM scratch\nCOPY . /\n' > "$src/Dockerfile"
printf '#!/bin/sh\necho hi\n' > "$src/src/main.sh"
: > "$src/empty"
ln -s src/main.sh "$src/link"
chmod 0644 "$src/Dockerfile"; chmod 0755 "$src/src/main.sh" "$src/src"; chmod 0600 "$src/empty"
chmod 0755 "$src"
chown -R 0:0 "$src"
# Fixed times (ns precision) so the listing is reproducible.
touch -h -d '2026-01-02T03:04:05.123456789Z' "$src/Dockerfile" "$src/src/main.sh" "$src/empty" "$src/link"
touch -h -d '2026-01-02T03:04:06.5Z' "$src/src"
mkdir -p "$work/gopath/src/kilnrecord"
cp "$here/record.go" "$work/gopath/src/kilnrecord/main.go"
cd "$work/gopath/src/kilnrecord"
GO111MODULE=off GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/cache" \
  /usr/lib/go-1.19/bin/go build -o "$work/record" .
mkdir -p "$work/dest"
"$work/record" "$src" "$work/dest" > "$here/exchange.txt"
echo "recorded $(wc -l < "$here/exchange.txt") packets into $here/exchange.txt"
