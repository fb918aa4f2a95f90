#!/usr/bin/env bash
# Passthrough benchmark (issue 2): throughput and latency of a small FHIR GET and of a 10 MB
# response, direct to an upstream vs through nginx (plain reverse proxy) vs through fhir-bulk-proxy,
# interleaved in the same run; then peak RSS of the proxy while streaming 1 GB down and 1 GB up.
#
# Usage: bench/passthrough.sh [--quick] [--no-build] [--no-results]
#   --quick       2 rounds of short runs (a smoke test; numbers not meaningful)
#   --no-build    use the existing target/release/fhir-bulk-proxy
#   --no-results  do not write bench/RESULTS.md (print only)
# Environment: ROUNDS (5), DURATION (8 s, throughput runs), LAT_DURATION (5 s, latency runs),
#   CONNS (32), WRK_THREADS (1), NICE_BUILD (10), BENCH_NICE (-10: priority of the benchmark's own
#   processes, 0 to leave it), BIN (path of the proxy binary), BENCH_CC (a TCP congestion control,
#   e.g. cubic: run in a network namespace of its own that uses it, leaving the host's alone; the
#   report then goes to bench/RESULTS-$BENCH_CC.md).
#
# Everything listens on 127.0.0.1 only, on free ports chosen at start; everything started here is
# stopped on exit (trap). Needs root for apt-get only when nginx, wrk or curl are missing.
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$BENCH_DIR/.." && pwd)"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-8}"
LAT_DURATION="${LAT_DURATION:-5}"
CONNS="${CONNS:-32}"
WRK_THREADS="${WRK_THREADS:-1}"
NICE_BUILD="${NICE_BUILD:-10}"
BUILD=1
WRITE_RESULTS=1
COMMAND_LINE="${BENCH_COMMAND_LINE:-${BENCH_CC:+BENCH_CC=$BENCH_CC }bench/passthrough.sh $*}"
for arg in "$@"; do
  case "$arg" in
    --quick) ROUNDS=2; DURATION=2; LAT_DURATION=2 ;;
    --no-build) BUILD=0 ;;
    --no-results) WRITE_RESULTS=0 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
BIN="${BIN:-$REPO/target/release/fhir-bulk-proxy}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- 1. tools ------------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  [ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
  timeout 300 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# --- 2. build ------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  log "cargo build --release (nice $NICE_BUILD; waits for other builds holding the target dir)"
  (cd "$REPO" && timeout 1800 nice -n "$NICE_BUILD" cargo build --release --quiet --bin fhir-bulk-proxy)
fi
[ -x "$BIN" ] || die "no proxy binary at $BIN"

# --- BENCH_CC: the rest runs again inside a network namespace with that congestion control -------
# Everything here talks over 127.0.0.1, so a namespace with its own loopback holds all of it. Its
# socket buffer limits are copied from the host's, so that only the congestion control differs.
if [ -n "${BENCH_CC:-}" ] && [ -z "${BENCH_IN_NETNS:-}" ]; then
  command -v ip >/dev/null || die "BENCH_CC needs ip (iproute2)"
  NS="fbp-bench-$$"
  ip netns add "$NS" || die "cannot create network namespace $NS (root needed)"
  trap 'ip netns delete "$NS" 2>/dev/null || true' EXIT
  ip -n "$NS" link set lo up
  for key in net.ipv4.tcp_rmem net.ipv4.tcp_wmem net.core.rmem_max net.core.wmem_max; do
    ip netns exec "$NS" sysctl -qw "$key=$(sysctl -n "$key" | tr '\t' ' ')" 2>/dev/null || true
  done
  # The namespace's default, or where the kernel refuses that (some sandboxes do), the same
  # through the loopback routes' congctl attribute, which every connection over them takes.
  if ! ip netns exec "$NS" sysctl -qw net.ipv4.tcp_congestion_control="$BENCH_CC" 2>/dev/null; then
    for route in 127.0.0.1 127.0.0.0/8; do
      ip -n "$NS" route replace local "$route" dev lo proto kernel scope host src 127.0.0.1 \
        table local congctl "$BENCH_CC" ||
        die "congestion control $BENCH_CC is not available (net.ipv4.tcp_available_congestion_control)"
    done
    BENCH_CC_ROUTE=1
  fi
  set +e
  BENCH_IN_NETNS=1 BENCH_CC_ROUTE="${BENCH_CC_ROUTE:-}" BENCH_COMMAND_LINE="$COMMAND_LINE" BENCH_HOST_CC="$(sysctl -n net.ipv4.tcp_congestion_control)" ip netns exec "$NS" "$0" "$@" --no-build
  exit $?
fi
TCP_CC="$(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo unknown)"
[ -n "${BENCH_CC_ROUTE:-}" ] && TCP_CC="$BENCH_CC (loopback routes' congctl; the namespace default stays $TCP_CC)"

# Run the benchmark itself (nginx, proxy, wrk, curl inherit it) at a higher priority than whatever
# else is running (e.g. builds), when allowed: BENCH_NICE=0 to disable.
BENCH_NICE="${BENCH_NICE:--10}"
if [ "$BENCH_NICE" != 0 ] && renice -n "$BENCH_NICE" -p $$ >/dev/null 2>&1; then
  log "benchmark processes run at nice $BENCH_NICE"
else
  BENCH_NICE=0
fi

# --- scratch dir, cleanup ------------------------------------------------------------------------
T="$(mktemp -d /tmp/bulk-proxy-bench.XXXXXX)"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

used_ports=" "
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 40000))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! ss -Htln "sport = :$p" | grep -q .; then used_ports+="$p "; echo "$p"; return; fi
  done
  die "no free port"
}
UP_PORT="$(free_port)"; NGX_PORT="$(free_port)"; PX_PORT="$(free_port)"; PX2_PORT="$(free_port)"

wait_http() { # url: wait up to 15 s for a 200
  for _ in $(seq 150); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  tail -n 20 "$T"/proxy-*.log >&2 2>/dev/null || true
  die "$1 did not answer 200 in 15 s"
}

# --- 3. upstream: nginx serving static files -----------------------------------------------------
mkdir -p "$T/www/fhir/Patient" "$T/www/fhir/Binary" "$T/up" "$T/ngx"
cat > "$T/www/fhir/Patient/example" <<'JSON'
{"resourceType":"Patient","id":"example","meta":{"versionId":"1","lastUpdated":"2024-01-01T00:00:00Z"},"identifier":[{"use":"usual","system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}],"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work"}],"gender":"male","birthDate":"1974-12-25","address":[{"use":"home","line":["534 Erewhon St"],"city":"PleasantVille","state":"Vic","postalCode":"3999"}]}
JSON
SMALL_BYTES="$(stat -c %s "$T/www/fhir/Patient/example")"
head -c $((10 * 1024 * 1024)) /dev/urandom > "$T/www/fhir/Binary/big10m"
truncate -s 1G "$T/www/fhir/Binary/big1g"       # sparse: no disk used, served from page cache
truncate -s 1G "$T/upload1g"
cat "$T/www/fhir/Binary/big1g" > /dev/null     # fault the sparse file into the page cache once

nginx_common() { # prefix dir
  cat <<EOF
user root;
worker_processes auto;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $1/client_body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
EOF
}
{
  nginx_common "$T/up"
  cat <<EOF
  server {
    listen 127.0.0.1:$UP_PORT;
    access_log off;
    root $T/www;
    location /fhir/Patient/ { default_type application/fhir+json; }
    # Accepts and discards an upload of any size.
    location = /fhir/Binary/upload { client_max_body_size 0; return 201; }
  }
}
EOF
} > "$T/up/nginx.conf"
{
  nginx_common "$T/ngx"
  cat <<EOF
  upstream fhir { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX_PORT;
    access_log off;
    client_max_body_size 0;
    location / {
      proxy_pass http://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
EOF
} > "$T/ngx/nginx.conf"

"$NGINX" -t -q -p "$T/up" -c "$T/up/nginx.conf" -e "$T/up/error.log" || die "upstream nginx config"
"$NGINX" -t -q -p "$T/ngx" -c "$T/ngx/nginx.conf" -e "$T/ngx/error.log" || die "proxy nginx config"
"$NGINX" -p "$T/up" -c "$T/up/nginx.conf" -e "$T/up/error.log" & PIDS+=($!)
"$NGINX" -p "$T/ngx" -c "$T/ngx/nginx.conf" -e "$T/ngx/error.log" & PIDS+=($!)

# --- 4. the proxy ---------------------------------------------------------------------------------
start_proxy() { # port -> echoes pid; each instance runs in its own empty dir: no ./proxy.toml is
  # picked up, and relative paths (the job store under data/) are not shared between instances.
  mkdir -p "$T/px-$1"
  (cd "$T/px-$1" && exec env BULK_PROXY_UPSTREAM__URL="http://127.0.0.1:$UP_PORT/fhir" \
    BULK_PROXY_SERVER__LISTEN="127.0.0.1:$1" BULK_PROXY_LOG__LEVEL=warn \
    "$BIN" >>"$T/proxy-$1.log" 2>&1) &
  echo $!
}
PX_PID="$(start_proxy "$PX_PORT")"; PIDS+=("$PX_PID")

wait_http "http://127.0.0.1:$UP_PORT/fhir/Patient/example"
wait_http "http://127.0.0.1:$NGX_PORT/fhir/Patient/example"
wait_http "http://127.0.0.1:$PX_PORT/healthz"
wait_http "http://127.0.0.1:$PX_PORT/fhir/Patient/example"

# CPU accounting, in clock ticks (USER_HZ): a process group's own time, the machine's busy time,
# and this shell's reaped children (wrk runs as one).
HZ="$(getconf CLK_TCK)"
pid_group() { local m; for m in "$@"; do echo "$m"; pgrep -P "$m" || true; done; }
UP_PIDS="$(pid_group "${PIDS[0]}" | tr '\n' ' ')"
NGX_PIDS="$(pid_group "${PIDS[1]}" | tr '\n' ' ')"
ticks() { # pids... -> utime+stime of all their threads
  local p t s=0
  for p in "$@"; do
    for t in /proc/"$p"/task/*/stat; do
      [ -r "$t" ] && s=$((s + $(sed 's/.*) //' "$t" | awk '{print $12 + $13}')))
    done
  done
  echo "$s"
}
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4; exit}' /proc/stat; }  # user nice system (not irq/steal)
reaped_ticks() { sed 's/.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }
declare -A INTER_PIDS=([direct]="" [nginx]="$NGX_PIDS" [proxy]="$PX_PID")

declare -A BASE=(
  [direct]="http://127.0.0.1:$UP_PORT"
  [nginx]="http://127.0.0.1:$NGX_PORT"
  [proxy]="http://127.0.0.1:$PX_PORT"
)
declare -A PATHS=([small]="/fhir/Patient/example" [10mb]="/fhir/Binary/big10m")
for tg in direct nginx proxy; do
  for sz in small 10mb; do
    got="$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "${BASE[$tg]}${PATHS[$sz]}")"
    want="200 $([ "$sz" = small ] && echo "$SMALL_BYTES" || echo $((10 * 1024 * 1024)))"
    [ "$got" = "$want" ] || die "$tg $sz: got '$got', want '$want'"
  done
done
log "upstream :$UP_PORT, nginx :$NGX_PORT, proxy :$PX_PORT (pid $PX_PID); all answer correctly"

# --- 5. load: wrk, interleaved rounds -------------------------------------------------------------
RAW="$T/raw.tsv"   # mode size target round rps p50_us p90_us p99_us mbps inter_cpu_us_per_req foreign_pct
: > "$RAW"
run_wrk() { # mode size target round
  local mode="$1" sz="$2" tg="$3" round="$4" c t d out
  if [ "$mode" = load ]; then c="$CONNS"; t="$WRK_THREADS"; d="$DURATION"; else c=1; t=1; d="$LAT_DURATION"; fi
  # shellcheck disable=SC2086
  local i0 u0 b0 r0 t0 i1 u1 b1 r1 t1
  i0="$(ticks ${INTER_PIDS[$tg]})"; u0="$(ticks $UP_PIDS $NGX_PIDS $PX_PID)"; b0="$(busy_ticks)"; r0="$(reaped_ticks)"; t0="$(date +%s.%N)"
  out="$(timeout $((d + 30)) wrk -t"$t" -c"$c" -d"${d}s" --timeout 10s -s "$BENCH_DIR/wrk-report.lua" \
    "${BASE[$tg]}${PATHS[$sz]}" 2>&1)" || die "wrk failed: $out"
  # shellcheck disable=SC2086
  i1="$(ticks ${INTER_PIDS[$tg]})"; u1="$(ticks $UP_PIDS $NGX_PIDS $PX_PID)"; b1="$(busy_ticks)"; r1="$(reaped_ticks)"; t1="$(date +%s.%N)"
  local line; line="$(grep '^WRKRESULT' <<<"$out")" || die "no wrk result: $out"
  # shellcheck disable=SC2086
  local requests duration_us bytes sock_errors non2xx timeouts p50_us p90_us p99_us max_us mean_us
  eval "$(sed 's/^WRKRESULT //; s/ /;/g' <<<"$line")"
  if [ "$sock_errors" != 0 ] || [ "$non2xx" != 0 ] || [ "$timeouts" != 0 ]; then
    die "$mode $sz $tg: errors (socket $sock_errors, non-2xx $non2xx, timeouts $timeouts)"
  fi
  awk -v m="$mode" -v s="$sz" -v t="$tg" -v r="$round" -v n="$requests" -v us="$duration_us" \
      -v b="$bytes" -v p50="$p50_us" -v p90="$p90_us" -v p99="$p99_us" -v hz="$HZ" \
      -v di="$((i1 - i0))" -v dours="$((u1 - u0 + r1 - r0))" -v dbusy="$((b1 - b0))" -v el="$t0 $t1" 'BEGIN {
    split(el, e, " "); secs = e[2] - e[1]
    inter = (t == "direct") ? 0 : di / hz / n * 1e6        # CPU µs per request in nginx / the proxy
    foreign = (dbusy - dours) / hz / secs * 100            # other processes, % of one core
    if (foreign < 0) foreign = 0
    printf "%s\t%s\t%s\t%s\t%.1f\t%d\t%d\t%d\t%.1f\t%.1f\t%.0f\n", m, s, t, r, n / (us / 1e6), p50, p90, p99,
      b / (us / 1e6) / 1e6, inter, foreign }' >> "$RAW"
  log "$(tail -1 "$RAW" | awk -F'\t' '{printf "%-4s %-5s %-6s round %s: %9.1f req/s  p50 %6d us  p99 %6d us  cpu/req %6.1f us  others %3d%%", $1, $2, $3, $4, $5, $6, $8, $10, $11}')"
}

TARGETS=(direct nginx proxy)
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warm-up"
for tg in "${TARGETS[@]}"; do
  for sz in small 10mb; do
    timeout 20 wrk -t1 -c"$CONNS" -d2s "${BASE[$tg]}${PATHS[$sz]}" >/dev/null 2>&1 || die "warm-up $tg $sz"
  done
done
STARTED_LOAD=$(date +%s)
for round in $(seq "$ROUNDS"); do
  # Rotate the order each round so no target always runs first or right after another.
  k=$(( (round - 1) % 3 ))
  order=("${TARGETS[@]:$k}" "${TARGETS[@]:0:$k}")
  for mode in load lat; do
    for sz in small 10mb; do
      for tg in "${order[@]}"; do run_wrk "$mode" "$sz" "$tg" "$round"; done
    done
  done
done
LOAD_SECS=$(( $(date +%s) - STARTED_LOAD ))
PX_HWM_LOAD_KB="$(awk '/VmHWM/ {print $2}' "/proc/$PX_PID/status")"

# --- 6. medians -----------------------------------------------------------------------------------
median_of_lines() { # numbers, one per line on stdin -> their median ("nan" for none)
  sort -g | awk '{v[NR]=$1} END { if (NR == 0) { print "nan"; exit }
    if (NR % 2) print v[(NR+1)/2]; else printf "%.1f\n", (v[NR/2] + v[NR/2+1]) / 2 }'
}
median() { # mode size target column(5=rps 6=p50 7=p90 8=p99 9=MB/s 10=cpu µs/req 11=others %)
  awk -F'\t' -v m="$1" -v s="$2" -v t="$3" -v c="$4" '$1==m && $2==s && $3==t {print $c}' "$RAW" |
    median_of_lines
}
declare -A MED
for mode in load lat; do for sz in small 10mb; do for tg in "${TARGETS[@]}"; do
  for col in 5 6 7 8 9 10 11; do MED[$mode,$sz,$tg,$col]="$(median "$mode" "$sz" "$tg" "$col")"; done
done; done; done
calc() { awk "BEGIN { printf \"$1\n\", $2 }"; }
paired() { # size target -> median over rounds of (target p50 - direct p50) in the same round, µs
  awk -F'\t' -v s="$1" -v t="$2" '$1=="lat" && $2==s && $3=="direct" {d[$4]=$6}
    $1=="lat" && $2==s && $3==t {x[$4]=$6}
    END { for (r in x) if (r in d) print x[r] - d[r] }' "$RAW" |
    median_of_lines
}

# --- 7. streaming 1 GB through a fresh proxy: peak RSS -------------------------------------------
PX2_PID="$(start_proxy "$PX2_PORT")"; PIDS+=("$PX2_PID")
wait_http "http://127.0.0.1:$PX2_PORT/healthz"
hwm() { awk '/VmHWM/ {print $2}' "/proc/$PX2_PID/status"; }
HWM_IDLE="$(hwm)"
GB=$((1024 * 1024 * 1024))
stream() { # label curl-args... -> "code bytes seconds"
  local label="$1"; shift
  local r; r="$(timeout 300 curl -sS -o /dev/null -w '%{http_code} %{size_download} %{size_upload} %{time_total}' "$@")" ||
    die "$label: curl failed"
  echo "$r"
}
read -r c dl _ t_direct <<<"$(stream "1 GB direct" "http://127.0.0.1:$UP_PORT/fhir/Binary/big1g")"
[ "$c $dl" = "200 $GB" ] || die "1 GB direct: $c $dl"
read -r c dl _ t_down <<<"$(stream "1 GB down" "http://127.0.0.1:$PX2_PORT/fhir/Binary/big1g")"
[ "$c $dl" = "200 $GB" ] || die "1 GB through the proxy: $c $dl"
HWM_DOWN="$(hwm)"
read -r c _ ul t_up <<<"$(stream "1 GB up" -X POST -H 'Expect:' -H 'Content-Type: application/octet-stream' \
  -T "$T/upload1g" "http://127.0.0.1:$PX2_PORT/fhir/Binary/upload")"
[ "$c $ul" = "201 $GB" ] || die "1 GB upload through the proxy: $c $ul"
HWM_UP="$(hwm)"
# A slow reader (curl limited to 200 MB/s, 5 s): the proxy must apply backpressure, not buffer.
read -r c dl _ t_slow <<<"$(curl -sS -o /dev/null -w '%{http_code} %{size_download} %{size_upload} %{time_total}' \
  --limit-rate 200M --max-time 5 "http://127.0.0.1:$PX2_PORT/fhir/Binary/big1g" 2>/dev/null || true)"
[ "$c" = 200 ] || die "slow reader: HTTP $c"
HWM_SLOW="$(hwm)"
HWM_ALL="$HWM_SLOW"
[ -n "$HWM_ALL" ] || die "could not read the proxy's VmHWM"

# --- 8. report ------------------------------------------------------------------------------------
R="$T/RESULTS.md"
rps_s_ratio="$(calc '%.3f' "${MED[load,small,proxy,5]} / ${MED[load,small,nginx,5]}")"
rps_b_ratio="$(calc '%.3f' "${MED[load,10mb,proxy,5]} / ${MED[load,10mb,nginx,5]}")"
add_s="$(calc '%.3f' "(${MED[lat,small,proxy,6]} - ${MED[lat,small,direct,6]}) / 1000")"
add_b="$(calc '%.3f' "(${MED[lat,10mb,proxy,6]} - ${MED[lat,10mb,direct,6]}) / 1000")"
verdict() { awk "BEGIN { print ($1) ? \"**met**\" : \"**not met**\" }"; }
v_rps_s="$(verdict "$rps_s_ratio >= 1")"
v_rps_b="$(verdict "$rps_b_ratio >= 1")"
v_lat_s="$(verdict "$add_s <= 0.2")"
v_lat_b="$(verdict "$add_b <= 0.2")"
v_rss="$(verdict "$HWM_ALL < 50 * 1024")"
cpu="$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
dirty="$(git -C "$REPO" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | grep -q . && echo ' (with uncommitted changes in src/)' || true)"
{
  echo "# Passthrough benchmark results"
  echo
  echo "Written by \`bench/passthrough.sh\` (see bench/README.md). Re-run to refresh."
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Machine: $(nproc) cores ($cpu), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr)"
  echo "- Proxy: commit $commit$dirty, release build of $(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC'), log level warn"
  echo "- TCP congestion control: $TCP_CC$([ -n "${BENCH_IN_NETNS:-}" ] && echo " (BENCH_CC: in a network namespace of its own; the host's is ${BENCH_HOST_CC:-unknown})" || echo " (the host's)")"
  echo "- nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
  echo "- Command: \`$COMMAND_LINE\` (ROUNDS=$ROUNDS DURATION=$DURATION LAT_DURATION=$LAT_DURATION CONNS=$CONNS WRK_THREADS=$WRK_THREADS BENCH_NICE=$BENCH_NICE); load phase took ${LOAD_SECS} s"
  echo
  echo "Setup: the upstream is nginx serving static files (a ${SMALL_BYTES}-byte FHIR Patient at"
  echo "\`/fhir/Patient/example\`, a 10 MiB file); \"nginx\" is a second nginx as a plain reverse proxy to it"
  echo "(HTTP/1.1 keepalive pool of 64, default buffering); \"proxy\" is fhir-bulk-proxy to the same upstream."
  echo "All on 127.0.0.1, access logs off everywhere. Each round runs every (mode, size, target) once,"
  echo "targets interleaved and their order rotated per round; the tables give medians over $ROUNDS rounds."
  echo
  echo "- **Throughput**: \`wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s\` (closed loop, $CONNS keep-alive connections)."
  echo "- **Latency**: \`wrk -t1 -c1 -d${LAT_DURATION}s\` (one connection, one request at a time: latency without"
  echo "  queueing). p50/p99 as measured by wrk, microsecond resolution."
  echo
  echo "## Throughput ($CONNS connections)"
  echo
  echo "| response | direct req/s | nginx req/s | proxy req/s | proxy / nginx | proxy / direct | p50 direct / nginx / proxy (ms) | CPU µs per request, nginx / proxy |"
  echo "|---|---:|---:|---:|---:|---:|---|---|"
  for sz in small 10mb; do
    label="$([ "$sz" = small ] && echo "small GET (${SMALL_BYTES} B)" || echo "10 MiB")"
    printf '| %s | %s | %s | %s | %s | %s | %s / %s / %s | %s / %s |\n' "$label" \
      "${MED[load,$sz,direct,5]}" "${MED[load,$sz,nginx,5]}" "${MED[load,$sz,proxy,5]}" \
      "$(calc '%.3f' "${MED[load,$sz,proxy,5]} / ${MED[load,$sz,nginx,5]}")" \
      "$(calc '%.3f' "${MED[load,$sz,proxy,5]} / ${MED[load,$sz,direct,5]}")" \
      "$(calc '%.3f' "${MED[load,$sz,direct,6]} / 1000")" "$(calc '%.3f' "${MED[load,$sz,nginx,6]} / 1000")" \
      "$(calc '%.3f' "${MED[load,$sz,proxy,6]} / 1000")" "${MED[load,$sz,nginx,10]}" "${MED[load,$sz,proxy,10]}"
  done
  echo
  echo "CPU µs per request: CPU time (user + system, all threads) that the nginx proxy's processes, or"
  echo "fhir-bulk-proxy, used during the run divided by the requests served; the cost of the intermediary"
  echo "itself, less sensitive than req/s to how the 2 cores are shared."
  echo
  echo "10 MiB in MB/s (medians): direct ${MED[load,10mb,direct,9]}, nginx ${MED[load,10mb,nginx,9]}, proxy ${MED[load,10mb,proxy,9]}."
  echo
  echo "## Latency (1 connection)"
  echo
  echo "| response | p50 direct (ms) | p50 nginx (ms) | p50 proxy (ms) | proxy − direct p50 (ms) | nginx − direct p50 (ms) | paired: proxy / nginx − direct (ms) | p99 direct / nginx / proxy (ms) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---|"
  for sz in small 10mb; do
    label="$([ "$sz" = small ] && echo "small GET" || echo "10 MiB")"
    printf '| %s | %s | %s | %s | %s | %s | %s / %s | %s / %s / %s |\n' "$label" \
      "$(calc '%.3f' "${MED[lat,$sz,direct,6]} / 1000")" "$(calc '%.3f' "${MED[lat,$sz,nginx,6]} / 1000")" \
      "$(calc '%.3f' "${MED[lat,$sz,proxy,6]} / 1000")" \
      "$(calc '%+.3f' "(${MED[lat,$sz,proxy,6]} - ${MED[lat,$sz,direct,6]}) / 1000")" \
      "$(calc '%+.3f' "(${MED[lat,$sz,nginx,6]} - ${MED[lat,$sz,direct,6]}) / 1000")" \
      "$(calc '%+.3f' "$(paired "$sz" proxy) / 1000")" "$(calc '%+.3f' "$(paired "$sz" nginx) / 1000")" \
      "$(calc '%.3f' "${MED[lat,$sz,direct,8]} / 1000")" "$(calc '%.3f' "${MED[lat,$sz,nginx,8]} / 1000")" \
      "$(calc '%.3f' "${MED[lat,$sz,proxy,8]} / 1000")"
  done
  echo
  echo "\"Paired\": the median over rounds of (p50 through the intermediary − p50 direct) within each round,"
  echo "which cancels the drift between rounds that the difference of the two medians keeps; the targets"
  echo "below use the difference of medians."
  echo
  echo "Other processes on the machine (not the benchmark's) used a median of $(awk -F'\t' '{print $11}' "$RAW" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')% of one core during"
  echo "the runs (max $(awk -F'\t' '{print $11}' "$RAW" | sort -g | tail -1)%; per run in the raw table). Load average at start: $LOADAVG_START."
  echo
  echo "## Streaming 1 GiB through a fresh proxy process"
  echo
  echo "Peak RSS is the proxy's \`VmHWM\` from \`/proc/PID/status\` (cumulative since the process started)."
  echo
  echo "| step | time (s) | proxy VmHWM after (MiB) |"
  echo "|---|---:|---:|"
  echo "| idle, after start | | $(calc '%.1f' "$HWM_IDLE / 1024") |"
  echo "| 1 GiB download, direct (reference, no proxy) | $(calc '%.2f' "$t_direct") | |"
  echo "| 1 GiB download through the proxy (curl > /dev/null) | $(calc '%.2f' "$t_down") | $(calc '%.1f' "$HWM_DOWN / 1024") |"
  echo "| 1 GiB upload through the proxy (curl -T, POST) | $(calc '%.2f' "$t_up") | $(calc '%.1f' "$HWM_UP / 1024") |"
  echo "| slow reader: 1 GiB download at 200 MB/s, cut after 5 s | $(calc '%.2f' "${t_slow:-0}") | $(calc '%.1f' "$HWM_SLOW / 1024") |"
  echo
  echo "For comparison, the load-test proxy (32 connections of 10 MiB responses) peaked at $(calc '%.1f' "$PX_HWM_LOAD_KB / 1024") MiB."
  echo
  echo "## Targets"
  echo
  echo "| target | measured | verdict |"
  echo "|---|---|---|"
  echo "| proxied throughput ≥ nginx's, small GET | proxy / nginx = $rps_s_ratio | $v_rps_s |"
  echo "| proxied throughput ≥ nginx's, 10 MiB | proxy / nginx = $rps_b_ratio | $v_rps_b |"
  echo "| added p50 latency ≤ 0.2 ms over direct, small GET | $(calc '%+.3f' "$add_s") ms | $v_lat_s |"
  echo "| added p50 latency ≤ 0.2 ms over direct, 10 MiB | $(calc '%+.3f' "$add_b") ms | $v_lat_b |"
  echo "| 1 GiB streamed (down and up): peak RSS < 50 MB | $(calc '%.1f' "$HWM_ALL / 1024") MiB | $v_rss |"
  echo
  echo "## Reading"
  echo
  echo "- The load generator (wrk), the upstream (nginx) and the intermediary share the same $(nproc) cores, so"
  echo "  req/s measures the whole chain under CPU contention: an intermediary that needs more CPU per request"
  echo "  takes it from wrk and the upstream. The CPU µs per request column is the intermediary's own cost."
  echo "- Other processes' CPU use during the runs is reported above; when it is high the absolute numbers are"
  echo "  low and noisy, while the interleaved, rotated runs keep the comparison between targets fair."
  echo "- \"nginx\" uses nginx's defaults for a reverse proxy (proxy_buffering on: a large response that the"
  echo "  client reads slower than the upstream sends is spooled to a temp file), which shows in the 10 MiB numbers."
  echo
  echo "## Raw runs"
  echo
  echo "mode, response, target, round, req/s, p50 µs, p90 µs, p99 µs, MB/s, CPU µs/request of the intermediary, other processes' CPU (% of a core)"
  echo
  echo '```'
  cat "$RAW"
  echo '```'
} > "$R"

cat "$R"
if [ "$WRITE_RESULTS" = 1 ]; then
  # The passthrough part is everything before the first section another benchmark owns
  # (bench/export.rs writes "## Export" and "## Fleet scaling"): replace it, keep theirs.
  OUT="$BENCH_DIR/RESULTS.md"
  [ -z "${BENCH_CC:-}" ] || OUT="$BENCH_DIR/RESULTS-$BENCH_CC.md"
  if [ -f "$OUT" ] && grep -q '^## \(Export\|Fleet scaling\)' "$OUT"; then
    { cat "$R"; echo; sed -n '/^## \(Export\|Fleet scaling\)/,$p' "$OUT"; } > "$T/merged.md"
    cp "$T/merged.md" "$OUT"
  else
    cp "$R" "$OUT"
  fi
  log "wrote $OUT"
fi
