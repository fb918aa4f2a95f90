#!/usr/bin/env bash
# End to end against a real FHIR server: Helios hfs (../shared/tools/real-upstream) loaded with the
# 10-patient Synthea fixture (E2E_FIXTURE=../shared/fixtures/synthea/bds-r4-100 for the 100-patient
# one), the proxy binary in front of it with a client registered by `keygen`,
# then `backend_client` exports at system level (with and without _type), Patient level and Group
# level, and .ci/e2e-hfs-compare.py checks every export (Patient and Group level: the compartment and
# exactly the supporting resources it references), passthrough and metadata against what hfs
# itself holds; smart-fetch (a third-party client from PyPI) exports too, checked by
# .ci/e2e-smart-fetch.py against backend_client's exports. Exits non-zero on any difference; skips (exit 0) when the tool is not there.
#
#   .ci/e2e-hfs.sh            (CI calls it after the tests; about a minute once built)
#
# Environment: REAL_UPSTREAM (default ../shared/tools/real-upstream), E2E_FIXTURE (default
# ../shared/fixtures/synthea/bds-r4-10), E2E_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
tool=${REAL_UPSTREAM:-$repo/../shared/tools/real-upstream}
fixture=${E2E_FIXTURE:-$repo/../shared/fixtures/synthea/bds-r4-10}
# The fixture's Group (synthea-10 for bds-r4-10, synthea-100 for bds-r4-100).
group=${E2E_GROUP:-$(head -n 1 "$fixture/Group.ndjson" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' 2>/dev/null || echo synthea-10)}
smart_fetch_version=1.0.3

if [[ ! -x $tool || ! -d $fixture ]]; then
  echo "e2e-hfs: skipped ($tool or $fixture is missing)"
  exit 0
fi
# `install` unpacks a cached build in seconds; without the cache it would build hfs from crates.io
# for about an hour, which is no job for CI.
hfs_bin=${HFS_ROOT:-$HOME/.cache/real-upstream}/bin/hfs
if [[ ! -x $hfs_bin ]] && ! compgen -G "$(dirname "$tool")/cache/hfs-*" >/dev/null; then
  echo "e2e-hfs: skipped (no cached hfs build; run '$tool install' once, it takes about an hour)"
  exit 0
fi
timeout 300 "$tool" install

work=$(mktemp -d -t e2e-hfs.XXXXXX)
proxy_pid=
cleanup() {
  if [[ -n $proxy_pid ]]; then
    kill "$proxy_pid" 2>/dev/null || true
    wait "$proxy_pid" 2>/dev/null || true
  fi
  "$tool" stop "$work/hfs" || true
  if [[ ${E2E_KEEP:-} == 1 ]]; then echo "e2e-hfs: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT
fail() {
  echo "e2e-hfs: FAILED: $*" >&2
  for log in "$work/proxy.log" "$work/hfs/hfs.log"; do
    [[ -f $log ]] && { echo "--- tail of $log" >&2; tail -n 20 "$log" >&2; }
  done
  exit 1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== build the proxy and the example client"
cargo build --locked --quiet --bin fhir-bulk-proxy --example backend_client
target=${CARGO_TARGET_DIR:-$repo/target}/debug
proxy_bin=$target/fhir-bulk-proxy
client_bin=$target/examples/backend_client

echo "== start hfs with $fixture"
hfs_port=$(free_port)
timeout 300 "$tool" start "$hfs_port" "$work/hfs" "$fixture" | tail -n 2
hfs=http://127.0.0.1:$hfs_port

# The proxy's table of Patient-compartment reference expressions must be the R4 definitions hfs ships.
timeout 120 python3 .ci/gen-compartment.py "$hfs" --check || fail "src/export/compartment.rs differs from hfs's SearchParameters"

echo "== register a client and start the proxy in front of hfs"
"$proxy_bin" keygen --client-id e2e --out "$work/keys"
cp "$work/keys/e2e.client.toml" "$work/proxy.toml"
proxy_port=$(free_port)
proxy=http://127.0.0.1:$proxy_port
BULK_PROXY_UPSTREAM__URL=$hfs \
  BULK_PROXY_SERVER__LISTEN=127.0.0.1:$proxy_port \
  BULK_PROXY_STORE__PATH=$work/jobs.redb \
  BULK_PROXY_STORAGE__PATH=$work/files \
  BULK_PROXY_EXPORT__POLL_RETRY_AFTER_SECS=1 \
  BULK_PROXY_AUTH__SIGNING_SECRET=e2e-signing-secret-of-at-least-32-bytes \
  BULK_PROXY_LOG__LEVEL=warn \
  "$proxy_bin" --config "$work/proxy.toml" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$proxy_port/healthz" >/dev/null 2>&1 && break
  kill -0 "$proxy_pid" 2>/dev/null || fail "the proxy exited"
  sleep 0.1
done
curl -fs "http://127.0.0.1:$proxy_port/healthz" >/dev/null || fail "the proxy did not start"

# Each export: backend_client saves the files under $work/out/NAME; bounded in time.
export_to() {
  local name=$1 kickoff=$2 types=${3:-}
  echo "== export $name: $kickoff${types:+ _type=$types}"
  env BULK_BASE="$proxy" BULK_CLIENT_ID=e2e BULK_CLIENT_KEY="$work/keys/e2e.private.jwk.json" \
    BULK_EXPORT="$kickoff" BULK_OUT="$work/out/$name" ${types:+BULK_TYPES="$types"} \
    timeout 300 "$client_bin" >"$work/$name.log" 2>&1 || { cat "$work/$name.log" >&2; fail "export $name"; }
  tail -n 1 "$work/$name.log"
}
mkdir -p "$work/out"
# _type: the fixture's own types (leaving out the server's SearchParameter definitions).
types=$(find "$fixture" -name '*.ndjson' -printf '%f\n' | sed 's/\.ndjson$//' | sort | paste -sd, -)
printf %s "$types" >"$work/out/system-types.types"
export_to system-types '$export' "$types"
export_to system-all '$export'
export_to patient 'Patient/$export'
export_to group "Group/$group/\$export"

# A third-party client: smart-fetch (PyPI, pinned), which makes its own choices (keygen's `.jwks` key
# file, 15 default types, an Observation `_typeFilter`, gzip downloads). Its output must be
# exactly the matching part of backend_client's exports, which the comparison below checks against
# hfs. Installed once into ~/.cache. Before the _since step, which changes a Patient in hfs.
echo "== smart-fetch $smart_fetch_version (a third-party Bulk Data client)"
smart_fetch_venv=$HOME/.cache/fhir-bulk-proxy/smart-fetch-$smart_fetch_version
if [[ ! -x $smart_fetch_venv/bin/smart-fetch ]]; then
  rm -rf "$smart_fetch_venv"
  python3 -m venv "$smart_fetch_venv"
  timeout 600 "$smart_fetch_venv/bin/pip" install --quiet "smart-fetch==$smart_fetch_version" \
    || { rm -rf "$smart_fetch_venv"; fail "pip install smart-fetch==$smart_fetch_version"; }
fi
# smart-fetch reads private keys only from a `.jwks` or `.pem` file: the key exactly as keygen
# wrote it, as a JWK Set.
smart_fetch() {
  local name=$1 reference=$2; shift 2
  timeout 300 "$smart_fetch_venv/bin/smart-fetch" bulk --fhir-url "$proxy" --smart-client-id e2e \
    --smart-key "$work/keys/e2e.private.jwks" "$@" "$work/smart-fetch/$name" >"$work/smart-fetch-$name.log" 2>&1 \
    || { tail -n 20 "$work/smart-fetch-$name.log" >&2; fail "smart-fetch $name"; }
  python3 .ci/e2e-smart-fetch.py "$work/smart-fetch/$name" "$work/out/$reference" || fail "smart-fetch $name: output differs"
}
smart_fetch group group --group "$group" # its default types and Observation filter
smart_fetch system system-types --type all --no-default-filters # every type it knows (the compartment types), unfiltered

# _since: change one Patient in hfs after the first export; an export since that export's
# transactionTime holds exactly that Patient (the snapshot boundary has neither gap nor overlap).
since=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["transactionTime"])' "$work/out/system-types/manifest.json")
changed=$(python3 - "$hfs" <<'PY'
import json, sys, urllib.request
hfs = sys.argv[1]
bundle = json.load(urllib.request.urlopen(f"{hfs}/Patient?_count=1", timeout=60))
patient = bundle["entry"][0]["resource"]
patient["active"] = not patient.get("active", False)
request = urllib.request.Request(f"{hfs}/Patient/{patient['id']}", data=json.dumps(patient).encode(),
                                 method="PUT", headers={"Content-Type": "application/fhir+json"})
urllib.request.urlopen(request, timeout=60).read()
print(patient["id"])
PY
)
export_to since "\$export?_since=$since" Patient,Observation
got=$(cat "$work/out/since/"*.ndjson 2>/dev/null | python3 -c 'import json,sys; print(" ".join(sorted(json.loads(l)["resourceType"] + "/" + json.loads(l)["id"] for l in sys.stdin if l.strip())))')
[[ $got == "Patient/$changed" ]] || fail "_since=$since: expected Patient/$changed only, got: ${got:0:300}"
echo "_since: exactly the one Patient changed after the first export's transactionTime"

echo "== compare with what hfs holds"
timeout 300 python3 .ci/e2e-hfs-compare.py "$hfs" "$proxy" "$group" "$work/out" || fail "exports differ from hfs"
grep -E 'ERROR|WARN' "$work/proxy.log" | head -n 5 || true
echo "e2e-hfs: ok"
