#!/usr/bin/env bash
# Instructions the proxy executes per passthrough request (user space), counted by valgrind's
# callgrind: repeatable to a fraction of a percent whatever else the machine is doing, so a change
# to the passthrough path can be judged in one run instead of over rounds of noisy req/s.
#
# Usage: bench/instructions.sh [BIN...]   (default: target/release/fhir-bulk-proxy)
#   Each BIN is measured in turn against the same upstream: give two builds to compare them.
# Environment: REQUESTS (1000), WARMUP (300).
#
# An nginx serves the small FHIR Patient of bench/passthrough.sh on a free 127.0.0.1 port; the proxy
# runs under callgrind in front of it; curl sends WARMUP requests on one keep-alive connection,
# the counters are zeroed, REQUESTS more are sent, and the total is divided by REQUESTS.
# Needs valgrind, nginx and curl (apt-get installs the missing ones when run as root).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUESTS="${REQUESTS:-1000}"
WARMUP="${WARMUP:-300}"
[ $# -gt 0 ] || set -- "$REPO/target/release/fhir-bulk-proxy"

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "need root to apt-get install ${missing[*]}" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

T="$(mktemp -d /tmp/bulk-proxy-instr.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT

free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
  echo "no free port" >&2; exit 1
}
UP_PORT="$(free_port)"

mkdir -p "$T/www/fhir/Patient" "$T/up"
cat > "$T/www/fhir/Patient/example" <<'JSON'
{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"identifier":[{"use":"usual","system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}],"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work"}],"gender":"male","birthDate":"1974-12-25","address":[{"use":"home","line":["534 Erewhon St"],"city":"PleasantVille","state":"Vic","postalCode":"3999"}]}
JSON
cat > "$T/up/nginx.conf" <<EOF
user root; worker_processes 1; daemon off; pid $T/up/nginx.pid; error_log $T/up/error.log warn;
events { worker_connections 1024; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $T/up/cb; proxy_temp_path $T/up/p; fastcgi_temp_path $T/up/f;
  uwsgi_temp_path $T/up/u; scgi_temp_path $T/up/s;
  server { listen 127.0.0.1:$UP_PORT; root $T/www; default_type application/fhir+json; }
}
EOF
"$NGINX" -p "$T/up" -c "$T/up/nginx.conf" -e "$T/up/error.log" & PIDS+=($!)

urls() { # n port
  local i
  for i in $(seq "$1"); do printf 'http://127.0.0.1:%s/fhir/Patient/example ' "$2"; done
}

for bin in "$@"; do
  port="$(free_port)"
  dir="$T/run-$port"
  mkdir -p "$dir"
  (cd "$dir" && exec env BULK_PROXY_UPSTREAM__URL="http://127.0.0.1:$UP_PORT/fhir" \
    BULK_PROXY_SERVER__LISTEN="127.0.0.1:$port" BULK_PROXY_LOG__LEVEL=warn \
    valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$bin" \
    >"$dir/log" 2>&1) &
  pid=$!
  PIDS+=("$pid")
  for _ in $(seq 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/fhir/Patient/example" && break
    sleep 0.2
  done
  # shellcheck disable=SC2046
  curl -sf $(urls "$WARMUP" "$port") >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  # shellcheck disable=SC2046
  curl -sf $(urls "$REQUESTS" "$port") >/dev/null
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  dump="$(ls -t "$dir"/callgrind.out.* 2>/dev/null | head -1)"
  total="$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")"
  printf '%s: %d instructions per request (%d requests, after %d to warm up)\n' \
    "$bin" "$((total / REQUESTS))" "$REQUESTS" "$WARMUP"
done
