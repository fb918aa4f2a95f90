"""Cross-checks of deploy/kubernetes that a schema cannot make (run by deploy/validate.sh).

For each example directory, for each proxy container (the image fhir-bulk-proxy):
  - the ConfigMap it mounts at /etc/fhir-bulk-proxy holds proxy.toml, which passes
    `fhir-bulk-proxy check-config --strict` (no warnings either) with the environment the container sets (secretKeyRef values
    from the directory's secret.example.yaml): it must FAIL with the example's placeholder signing
    secret (so the example never runs with a known secret) and PASS with a random one;
  - store.path (embedded store) and storage.path (local storage) lie on writable volume mounts
    (the root filesystem is read-only), runAsNonRoot and readOnlyRootFilesystem are set;
  - the probes hit /readyz and /healthz on the port server.listen uses;
  - terminationGracePeriodSeconds exceeds the preStop sleep + server.shutdown_grace_secs;
  - resources have requests and limits; every Secret and ConfigMap referenced exists;
  - kustomization.yaml lists every manifest of its directory but the *.example.yaml ones.
Usage: check_manifests.py PROXY_BINARY DIR...   Exits 1 on any failure.
"""

import base64
import os
import pathlib
import secrets
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

CONFIG_DIR = "/etc/fhir-bulk-proxy"
failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")
    print(f"  FAIL {where}: {message}")


def ok(where, message):
    print(f"  ok {where}: {message}")


def load_dir(directory):
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path, doc))
    return docs


def check_kustomization(directory):
    kustomization = directory / "kustomization.yaml"
    if not kustomization.exists():
        return
    listed = set(yaml.safe_load(kustomization.read_text()).get("resources", []))
    present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    expected = {n for n in present if not n.endswith(".example.yaml")}
    for name in sorted(listed - present):
        fail(kustomization, f"lists {name}, which does not exist")
    for name in sorted(expected - listed):
        fail(kustomization, f"does not list {name}")
    if listed == expected:
        ok(kustomization, f"lists every manifest ({len(listed)})")


def under(path, mounts):
    path = os.path.normpath(path)
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def run_check_config(binary, config_text, env):
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp, "proxy.toml")
        config.write_text(config_text)
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp}
        clean.update(env)
        return subprocess.run(
            [binary, "--config", str(config), "check-config", "--strict"],
            cwd=tmp, env=clean, capture_output=True, text=True, timeout=60,
        )


def check_proxy(binary, where, pod, container, config_maps, secrets_by_name):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    config_mount = mounts.get(CONFIG_DIR)
    if not config_mount:
        return fail(where, f"nothing mounted at {CONFIG_DIR} (the image's --config directory)")
    cm_name = volumes[config_mount["name"]].get("configMap", {}).get("name")
    config_text = config_maps.get(cm_name, {}).get("proxy.toml")
    if config_text is None:
        return fail(where, f"ConfigMap {cm_name} (mounted at {CONFIG_DIR}) has no proxy.toml")
    config = tomllib.loads(config_text)

    # The environment the container gets.
    env, secret_keys = {}, {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            data = secrets_by_name.get(ref["name"])
            if data is None or ref["key"] not in data:
                fail(where, f"{var['name']}: Secret {ref['name']} key {ref['key']} is not in the example")
                continue
            env[var["name"]] = data[ref["key"]]
            secret_keys[var["name"]] = ref["key"]

    # The example's placeholder secret is refused; a real one passes.
    secret_var = "BULK_PROXY_AUTH__SIGNING_SECRET"
    if secret_var not in env:
        fail(where, f"{secret_var} is not set: replicas would each sign tokens with their own random secret")
    else:
        placeholder = run_check_config(binary, config_text, env)
        if placeholder.returncode == 0:
            fail(where, "check-config accepts the example's placeholder signing secret")
        elif "auth.signing_secret" not in placeholder.stderr:
            first = (placeholder.stderr.strip().splitlines() or [""])[0]
            fail(where, f"with the example's Secret, check-config fails on something else: {first}")
        else:
            ok(where, "check-config refuses the placeholder signing secret (auth.signing_secret)")
        env[secret_var] = base64.b64encode(secrets.token_bytes(32)).decode()
    result = run_check_config(binary, config_text, env)
    if result.returncode != 0:
        warnings = [l for l in result.stdout.splitlines() if l.startswith("warning: ")]
        first = (warnings or result.stderr.strip().splitlines() or [""])[0]
        fail(where, f"check-config --strict fails with the manifests' environment: {first}")
    else:
        report = "; ".join(l.strip() for l in result.stdout.strip().splitlines()[1:])
        ok(where, f"check-config --strict: {report} (env: {', '.join(sorted(env))})")

    # Writable paths under a read-only root filesystem.
    sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if not sc.get("runAsNonRoot") or not sc.get("readOnlyRootFilesystem"):
        fail(where, "runAsNonRoot and readOnlyRootFilesystem must be set")
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    paths = []
    if config.get("storage", {}).get("backend", "local") == "local":
        paths.append(("storage.path", config.get("storage", {}).get("path", "data/files")))
    if config.get("store", {}).get("backend", "embedded") == "embedded":
        paths.append(("store.path", config.get("store", {}).get("path", "data/jobs.redb")))
    for key, path in paths:
        if not os.path.isabs(path) or not under(path, writable):
            fail(where, f"{key} = {path} is not on a writable volume mount ({', '.join(writable)})")
        else:
            ok(where, f"{key} = {path} is on a writable volume")

    # Probes on the listen port.
    port = int(config.get("server", {}).get("listen", "0.0.0.0:8080").rsplit(":", 1)[1])
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        probe_port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") != path or probe_port != port:
            fail(where, f"{probe} must GET {path} on port {port}, not {get.get('path')} on {probe_port}")
        else:
            ok(where, f"{probe}: GET {path} on {port}")

    # Shutdown: preStop + the proxy's grace period fit in the pod's.
    grace = config.get("server", {}).get("shutdown_grace_secs", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep = int(command[1]) if command[:1] == ["sleep"] else pre_stop.get("sleep", {}).get("seconds", 0)
    pod_grace = pod.get("terminationGracePeriodSeconds", 30)
    if pod_grace <= sleep + grace:
        fail(where, f"terminationGracePeriodSeconds {pod_grace} <= preStop {sleep} + shutdown_grace_secs {grace}")
    else:
        ok(where, f"terminationGracePeriodSeconds {pod_grace} > preStop {sleep} + shutdown_grace_secs {grace}")

    res = container.get("resources", {})
    if not all(k in res.get("requests", {}) for k in ("cpu", "memory")) or "memory" not in res.get("limits", {}):
        fail(where, "resources need cpu and memory requests and a memory limit")


def main():
    binary, dirs = sys.argv[1], [pathlib.Path(d) for d in sys.argv[2:]]
    for directory in dirs:
        print(f"-- {directory}")
        check_kustomization(directory)
        docs = load_dir(directory)
        config_maps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
        secrets_by_name = {}
        for _, d in docs:
            if d["kind"] == "Secret":
                data = dict(d.get("stringData", {}))
                data.update({k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()})
                secrets_by_name[d["metadata"]["name"]] = data
        proxies = 0
        for path, doc in docs:
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                where = f"{path.name} {doc['metadata']['name']}/{container['name']}"
                for vol in pod.get("volumes", []):
                    name = vol.get("configMap", {}).get("name")
                    if name and name not in config_maps:
                        fail(where, f"ConfigMap {name} is not defined in {directory}")
                image = container["image"].rsplit("/", 1)[-1].split(":")[0]
                if image == "fhir-bulk-proxy":
                    proxies += 1
                    check_proxy(binary, where, pod, container, config_maps, secrets_by_name)
        if proxies == 0:
            fail(str(directory), "no fhir-bulk-proxy container")
    if failures:
        print(f"check_manifests.py: {len(failures)} failure(s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
