#!/bin/sh
# Checks the Helm chart, the plain manifests and the Tekton task (see charts/chart_check.py).
#   charts/test.sh               run every check; exits non-zero on any failure
#   charts/test.sh --regenerate  rewrite manifests/base from the chart's default rendering
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

need=""
python3 -c 'import helm_python' 2>/dev/null || need="$need helm-python-sdk"
python3 -c 'import kubernetes_validate' 2>/dev/null || need="$need kubernetes-validate"
python3 -c 'import jsonschema' 2>/dev/null || need="$need jsonschema"
python3 -c 'import yaml' 2>/dev/null || need="$need PyYAML"
command -v yamllint >/dev/null 2>&1 || need="$need yamllint"
if [ -n "$need" ]; then
  echo "charts/test.sh: installing$need"
  # shellcheck disable=SC2086
  python3 -m pip install --quiet $need
fi

if [ "${1:-}" = "--regenerate" ]; then
  exec python3 "$here/chart_check.py" --regenerate
fi

status=0
python3 "$here/chart_check.py" || status=1
echo "yamllint (charts/yamllint.yaml): chart values and manifests/"
if yamllint --strict -c "$here/yamllint.yaml" \
    "$here/kiln/Chart.yaml" "$here/kiln/values.yaml" "$root/manifests"; then
  echo "ok: yamllint"
else
  echo "FAIL: yamllint"
  status=1
fi
sh -n "$root/manifests/tekton/kiln-build.sh" || { echo "FAIL: sh -n kiln-build.sh"; status=1; }

# The Tekton step refuses bad input, naming it, before it runs kiln (the build itself runs in e2e).
tmp=$(mktemp -d)
mkdir -p "$tmp/src" "$tmp/tls"
: > "$tmp/src/Dockerfile"
for f in ca.crt tls.crt tls.key; do : > "$tmp/tls/$f"; done
script="$root/manifests/tekton/kiln-build.sh"
# step [VAR=VALUE…] -- [BUILD_ARGS…]: runs the step with Tekton's environment (later VARs win).
step() {
  vars=""
  while [ "$1" != "--" ]; do vars="$vars $1"; shift; done
  shift
  # shellcheck disable=SC2086
  env -i PATH=/usr/bin:/bin IMAGE=reg.example/x:1 GATEWAY=tcp://127.0.0.1:1 \
    SOURCE_DIR="$tmp/src" TLS_DIR="$tmp/tls" CONTEXT=. \
    RESULT_IMAGE_DIGEST="$tmp/digest" RESULT_IMAGE_URL="$tmp/url" $vars \
    /bin/sh "$script" "$@" 2>&1
}
expect_refused() {
  want=$1; shift
  if out=$(step "$@"); then
    echo "FAIL: kiln-build.sh accepted bad input ($want)"; status=1
  elif ! printf '%s' "$out" | grep -q "$want"; then
    echo "FAIL: kiln-build.sh error does not name $want: $out"; status=1
  fi
}
expect_refused "IMAGE" IMAGE= --
expect_refused "GATEWAY" GATEWAY= --
expect_refused "NOEQUALS" -- A=1 NOEQUALS
expect_refused "CONTEXT" CONTEXT=missing --
expect_refused "DOCKERFILE" DOCKERFILE=nope --
rm "$tmp/tls/tls.key"
expect_refused "tls.key" --
if [ -e "$tmp/digest" ] || [ -e "$tmp/url" ]; then
  echo "FAIL: kiln-build.sh wrote results for a refused build"; status=1
fi
rm -rf "$tmp"
[ $status -eq 0 ] && echo "ok: kiln-build.sh refuses bad input naming it"
exit $status
