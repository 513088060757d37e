#!/usr/bin/env bash
# Kiln on a real Kubernetes cluster (KUBECONFIG): installs the chart (CRDs, controller, a
# default BuildWorkerPool) with Kiln's own images, then runs
#   1. the chart's `helm test` build (the test hook objects, applied and awaited as helm does),
#   2. a BuildJob with a ConfigMap context, checking .status.imageDigest against the registry,
#   3. the Tekton task (Tekton Pipelines installed first when absent), checking IMAGE_DIGEST.
# The namespace it creates is deleted at the end (KEEP=1 keeps it for debugging).
#
# No cluster exists on the development machines: this script has not been run there. It is
# what `cargo test -p kiln-e2e --test cluster` runs when KUBECONFIG is set.
#
# Environment:
#   KILN_E2E_REGISTRY             a registry this machine can push to over plain HTTP
#                                 (kind: `localhost:5001` from kind's local-registry recipe)
#   KILN_E2E_REGISTRY_IN_CLUSTER  the same registry as pods reach it (default: the same)
#   KIND_CLUSTER                  load the images with `kind load image-archive` into this kind
#                                 cluster; otherwise they must already be pullable as
#                                 $IMAGE_REPO/<name>:<version>
#   IMAGE_REPO                    image repository prefix (default ghcr.io/kiln-build)
#   TEKTON_RELEASE                Tekton Pipelines release YAML (default: the latest release)
#   KILN_BIN                      where kiln-testenv is (default: cargo build)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${KUBECONFIG:?KUBECONFIG (a real cluster) is required}"
: "${KILN_E2E_REGISTRY:?KILN_E2E_REGISTRY (a registry reachable from here and from the cluster) is required}"
reg=$KILN_E2E_REGISTRY
reg_in=${KILN_E2E_REGISTRY_IN_CLUSTER:-$reg}
repo=${IMAGE_REPO:-ghcr.io/kiln-build}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tekton=${TEKTON_RELEASE:-https://storage.googleapis.com/tekton-releases/pipeline/latest/release.yaml}
ns=kiln-e2e-$(date +%s)
release=kiln
pool=kiln
for tool in kubectl python3 curl; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: missing $tool" >&2; exit 1; }
done
python3 -c 'import helm_python, yaml' 2>/dev/null || python3 -m pip install --quiet helm-python-sdk PyYAML
if [ -z "${KILN_BIN:-}" ]; then
  cargo build --locked -q -p kiln-e2e --bins
  KILN_BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
fi
work=$(mktemp -d)
cleanup() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "== cluster.sh failed; state of $ns:" >&2
    kubectl -n "$ns" get all,buildworkerpools,buildjobs -o wide >&2 || true
    kubectl -n "$ns" logs deploy/$release-controller --tail=50 >&2 || true
  fi
  [ -n "${KEEP:-}" ] || kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== cluster: %s (%ss)\n' "$1" "$SECONDS"; }

# registry_digest NAME:TAG -> the manifest digest the registry serves for the tag
registry_digest() {
  local name=${1%:*} tag=${1##*:}
  curl -fsSI -H 'Accept: application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
    "http://$reg/v2/$name/manifests/$tag" | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p'
}

step "images"
if [ -n "${KIND_CLUSTER:-}" ]; then
  [ -f target/images/kiln-worker.tar ] || ./.ci/images.sh target/images
  command -v kind >/dev/null || { echo "cluster.sh: KIND_CLUSTER is set but kind is missing" >&2; exit 1; }
  for n in kiln-worker kiln-gateway kiln-controller kiln; do
    kind load image-archive --name "$KIND_CLUSTER" "target/images/$n.tar"
  done
fi
"$KILN_BIN/kiln-testenv" push-base "$reg" e2e/busybox:1

step "install the chart into $ns"
kubectl create namespace "$ns"
kubectl apply --server-side -f charts/kiln/crds/
python3 - "$ns" "$release" "$repo" "$version" "$reg_in" "$work" <<'PY'
import sys, yaml, helm_python
ns, release, repo, version, reg, work = sys.argv[1:]
img = lambda n: {"repository": f"{repo}/{n}", "tag": version}
values = {
    "controller": {"image": {**img("kiln-controller"), "pullPolicy": "IfNotPresent"}},
    "defaultPool": {
        "replicas": 2,
        "image": img("kiln-worker"),
        "imagePullPolicy": "IfNotPresent",
        "storage": {"size": "5Gi"},
        "gateway": {"replicas": 1, "image": img("kiln-gateway")},
    },
    "test": {"image": img("kiln"), "baseImage": f"{reg}/e2e/busybox:1"},
}
out = helm_python.Chart.load("charts/kiln").render(values, name=release, namespace=ns, is_install=True)
main, tests = [], []
for path in sorted(out):
    if path.endswith("NOTES.txt"):
        continue
    for doc in yaml.safe_load_all(out[path]):
        if doc:
            (tests if "/templates/tests/" in path else main).append(doc)
yaml.safe_dump_all(main, open(f"{work}/install.yaml", "w"))
yaml.safe_dump_all(tests, open(f"{work}/helm-test.yaml", "w"))
PY
kubectl -n "$ns" apply --server-side -f "$work/install.yaml"
kubectl -n "$ns" rollout status deploy/$release-controller --timeout=5m
kubectl -n "$ns" wait "buildworkerpool/$pool" --for=condition=Ready --timeout=10m
kubectl -n "$ns" get buildworkerpool "$pool" -o wide

step "helm test: a build through the gateway with the client certificate"
kubectl -n "$ns" apply -f "$work/helm-test.yaml"
kubectl -n "$ns" wait pod/$release-test-build --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m
kubectl -n "$ns" logs pod/$release-test-build | tail -n 5

step "BuildJob with a ConfigMap context"
kubectl -n "$ns" create configmap e2e-context \
  --from-literal=Dockerfile="$(printf 'FROM %s/e2e/busybox:1\nRUN echo built-by-buildjob > /out\n' "$reg_in")"
kubectl -n "$ns" apply -f - <<YAML
apiVersion: kiln.dev/v1alpha1
kind: BuildJob
metadata:
  name: e2e
spec:
  poolRef: {name: $pool}
  source: {configMap: {name: e2e-context}}
  outputs: [{name: "$reg_in/e2e/buildjob:1", push: true}]
  timeout: 10m
YAML
kubectl -n "$ns" wait buildjob/e2e --for=jsonpath='{.status.phase}'=Succeeded --timeout=10m
got=$(kubectl -n "$ns" get buildjob e2e -o jsonpath='{.status.imageDigest}')
want=$(registry_digest e2e/buildjob:1)
echo "BuildJob digest $got, registry $want"
[ -n "$got" ] && [ "$got" = "$want" ] || { echo "cluster.sh: BuildJob digest $got != registry $want" >&2; exit 1; }

step "Tekton task"
if ! kubectl get crd tasks.tekton.dev >/dev/null 2>&1; then
  kubectl apply -f "$tekton"
  kubectl -n tekton-pipelines rollout status deploy/tekton-pipelines-controller --timeout=5m
  kubectl -n tekton-pipelines rollout status deploy/tekton-pipelines-webhook --timeout=5m
fi
kubectl -n "$ns" apply -f manifests/tekton/kiln-build.yaml
gateway="tcp://$pool-gateway.$ns.svc:1234"
client_secret=$pool-client-tls
kubectl -n "$ns" apply -f - <<YAML
apiVersion: tekton.dev/v1
kind: TaskRun
metadata:
  name: e2e-kiln-build
spec:
  taskRef: {name: kiln-build}
  params:
    - {name: IMAGE, value: "$reg_in/e2e/tekton:1"}
    - {name: GATEWAY, value: "$gateway"}
    - {name: TLS_SECRET, value: "$client_secret"}
    - {name: KILN_IMAGE, value: "$repo/kiln:$version"}
  workspaces:
    - name: source
      configMap: {name: e2e-context}
YAML
kubectl -n "$ns" wait taskrun/e2e-kiln-build --for=condition=Succeeded --timeout=10m
got=$(kubectl -n "$ns" get taskrun e2e-kiln-build -o jsonpath='{.status.results[?(@.name=="IMAGE_DIGEST")].value}')
want=$(registry_digest e2e/tekton:1)
echo "Tekton IMAGE_DIGEST $got, registry $want"
[ -n "$got" ] && [ "$got" = "$want" ] || { echo "cluster.sh: Tekton digest $got != registry $want" >&2; exit 1; }
step "ok"
