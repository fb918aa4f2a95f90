#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes, offline:
#  1. every manifest against the Kubernetes schemas (kubernetes-validate --strict: unknown fields
#     are errors), for the oldest version the examples need (1.30: the preStop sleep action) and
#     kubernetes-validate's newest;
#  2. each kustomization, rendered with `kubectl kustomize` when kubectl is on the machine;
#  3. deploy/check_manifests.py: the proxy.toml in each ConfigMap passes `fhir-bulk-proxy
#     check-config` with the environment the manifests set, its paths are on writable mounts,
#     probes, grace periods and resources agree with it.
# kubernetes-validate (and its schemas) are pip-installed into a venv kept under ~/.cache on first
# use. Exits non-zero on any invalid manifest. FHIR_BULK_PROXY_BIN names a prebuilt binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/tools.sh
K8S_VERSIONS=(1.30.0 1.37.0)

venv=$(deploy_venv)
deploy_pip_ensure "$venv" "$DEPLOY_VALIDATE_REQ"
# tomllib is in Python 3.11+; tomli stands in before that.
"$venv/bin/python" -c 'import tomllib' 2>/dev/null || deploy_pip_ensure "$venv" tomli
validate() {
  local v
  for v in "${K8S_VERSIONS[@]}"; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$@" || return 1
  done
}

mapfile -t dirs < <(find deploy/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
[ ${#manifests[@]} -gt 0 ] || { echo "validate.sh: no manifests under deploy/kubernetes" >&2; exit 1; }

echo "== schemas (kubernetes-validate $("$venv/bin/kubernetes-validate" --version), Kubernetes ${K8S_VERSIONS[*]}, strict)"
validate "${manifests[@]}"
echo "  ok: ${#manifests[@]} files: ${manifests[*]}"

echo "== kustomizations"
if command -v kubectl >/dev/null; then
  rendered=$(mktemp -d)
  trap 'rm -rf "$rendered"' EXIT
  for dir in "${dirs[@]}"; do
    out="$rendered/$(basename "$dir").yaml"
    kubectl kustomize "$dir" >"$out"
    validate "$out"
    echo "  ok: $dir renders ($(grep -c '^kind:' "$out") objects) and validates"
  done
else
  echo "  skipped rendering: no kubectl here (check_manifests.py still checks what they list)"
fi

echo "== configuration and cross-checks"
bin=$(deploy_proxy_bin)
"$venv/bin/python" deploy/check_manifests.py "$bin" "${dirs[@]}"
echo "deploy/validate.sh: all manifests valid"
