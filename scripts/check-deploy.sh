#!/usr/bin/env bash
# Render every kustomize overlay under deploy/ and validate it: kubernetes-validate (the
# Kubernetes 1.32 schemas, strict) for the built-in kinds, scripts/check_deploy.py for the
# deployment conventions and the InferencePool / endpoint-picker / HTTPRoute resources.
# Needs kubectl (with kustomize); Python tools go to a venv outside the repo.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPINDLE_DEPLOY_VENV:-$HOME/.cache/spindle/deploy-venv}"
REQS="$ROOT/deploy/check-requirements.txt"
log() { echo "check-deploy: $*" >&2; }

command -v kubectl >/dev/null || { log "kubectl is required (it renders the kustomize overlays)"; exit 1; }
. "$ROOT/scripts/lib/test-env.sh"
ensure_venv "$VENV" "$REQS"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for overlay in cpu cuda llm-d; do
    kubectl kustomize "$ROOT/deploy/overlays/$overlay" > "$OUT/$overlay.yaml"
    "$VENV/bin/kubernetes-validate" --kubernetes-version 1.32 --strict --quiet --no-warn "$OUT/$overlay.yaml"
    "$VENV/bin/python" "$ROOT/scripts/check_deploy.py" "$overlay" "$OUT/$overlay.yaml"
done
log "all overlays render and validate"
