#!/bin/sh
# kiln-build step: builds CONTEXT with the Kiln pool behind GATEWAY, pushes IMAGE and writes
# the Tekton results IMAGE_DIGEST and IMAGE_URL. Embedded verbatim in kiln-build.yaml.
# Environment: IMAGE, CONTEXT, DOCKERFILE, TARGET, GATEWAY, SOURCE_DIR (the source workspace),
# TLS_DIR (ca.crt, tls.crt, tls.key), RESULT_IMAGE_DIGEST, RESULT_IMAGE_URL.
# Arguments: build arguments, each K=V.
set -eu

: "${IMAGE:?IMAGE (the image name to push) is required}"
: "${GATEWAY:?GATEWAY (the Kiln gateway, tcp://HOST:PORT) is required}"
: "${SOURCE_DIR:?SOURCE_DIR (the source workspace path) is required}"
: "${TLS_DIR:?TLS_DIR (directory with ca.crt, tls.crt, tls.key) is required}"
: "${RESULT_IMAGE_DIGEST:?RESULT_IMAGE_DIGEST (result file path) is required}"
: "${RESULT_IMAGE_URL:?RESULT_IMAGE_URL (result file path) is required}"
CONTEXT="${CONTEXT:-.}"
DOCKERFILE="${DOCKERFILE:-Dockerfile}"
TARGET="${TARGET:-}"

case "$CONTEXT" in
  /*) context_dir="$CONTEXT" ;;
  *) context_dir="$SOURCE_DIR/$CONTEXT" ;;
esac
case "$DOCKERFILE" in
  /*) dockerfile="$DOCKERFILE" ;;
  *) dockerfile="$context_dir/$DOCKERFILE" ;;
esac
[ -d "$context_dir" ] || { echo "kiln-build: CONTEXT $context_dir is not a directory" >&2; exit 2; }
[ -f "$dockerfile" ] || { echo "kiln-build: DOCKERFILE $dockerfile does not exist" >&2; exit 2; }
for f in ca.crt tls.crt tls.key; do
  [ -r "$TLS_DIR/$f" ] || { echo "kiln-build: TLS_DIR $TLS_DIR has no readable $f" >&2; exit 2; }
done

metadata="${TMPDIR:-/tmp}/kiln-build-metadata.json"
rm -f "$metadata"

# Build arguments become --build-arg flags, in order, after the fixed flags.
for arg in "$@"; do
  case "$arg" in
    *=*) ;;
    *) echo "kiln-build: BUILD_ARGS entry '$arg' is not K=V" >&2; exit 2 ;;
  esac
  set -- "$@" --build-arg "$arg"
  shift
done
if [ -n "$TARGET" ]; then
  set -- --target "$TARGET" "$@"
fi

kiln build \
  --addr "$GATEWAY" \
  --tlscacert "$TLS_DIR/ca.crt" \
  --tlscert "$TLS_DIR/tls.crt" \
  --tlskey "$TLS_DIR/tls.key" \
  --progress plain \
  -f "$dockerfile" \
  -t "$IMAGE" \
  --push \
  --metadata-file "$metadata" \
  "$@" \
  "$context_dir"

digest=$(sed -n 's/.*"containerimage\.digest"[[:space:]]*:[[:space:]]*"\(sha256:[0-9a-f]\{64\}\)".*/\1/p' "$metadata" | head -n 1)
if [ -z "$digest" ]; then
  echo "kiln-build: no containerimage.digest in $metadata" >&2
  exit 1
fi
printf '%s' "$digest" > "$RESULT_IMAGE_DIGEST"
printf '%s' "$IMAGE" > "$RESULT_IMAGE_URL"
echo "kiln-build: $IMAGE@$digest"
