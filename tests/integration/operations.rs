//! Metadata augmentation, health, readiness, metrics, shutdown and the command line.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use testkit::eventually;
use testkit::get_accepting;
use testkit::get_anonymous;
use testkit::metrics;
use testkit::{FakeFhir, TestProxy, plain_client};

#[tokio::test]
async fn metadata_gains_bulk_and_smart_entries_and_is_cached() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    let response = get_anonymous(proxy.url("/metadata")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/fhir+json");
    let cs: Value = response.json().await.unwrap();
    assert_eq!(cs["fhirVersion"], "4.0.1", "upstream content kept");
    assert_eq!(
        cs["instantiates"][0],
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    );
    let rest = &cs["rest"][0];
    assert_eq!(rest["operation"][0]["name"], "export");
    let patient = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap();
    let names: Vec<_> = patient["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["export", "patient-export"]);
    let group = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Group")
        .unwrap();
    assert_eq!(group["operation"][1]["name"], "group-export");
    assert_eq!(
        rest["security"]["extension"][0]["extension"][0]["valueUri"],
        proxy.url("/token").as_str()
    );

    get_anonymous(proxy.url("/metadata")).await;
    let fetches = fake
        .received()
        .iter()
        .filter(|r| r.uri.ends_with("/metadata"))
        .count();
    assert_eq!(fetches, 1, "the second request is served from the cache");
}

#[tokio::test]
async fn xml_metadata_passes_through_untouched() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    let response = get_accepting(proxy.url("/metadata"), "application/fhir+xml").await;
    assert_eq!(response.headers()["content-type"], "application/fhir+xml");
    assert_eq!(
        response.text().await.unwrap(),
        "<CapabilityStatement xmlns=\"http://hl7.org/fhir\"><status value=\"active\"/></CapabilityStatement>"
    );
}

#[tokio::test]
async fn metadata_errors_pass_through_unchanged() {
    let fake = FakeFhir::new().capability(None).start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    let response = get_anonymous(proxy.url("/metadata")).await;
    assert_eq!(response.status(), 500);
    assert_eq!(response.text().await.unwrap(), "metadata broke");
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    for path in ["/healthz", "/readyz"] {
        let response = get_anonymous(proxy.root(path)).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    get_anonymous(proxy.url("/Patient")).await;
    let metrics = metrics(proxy.addr).await;
    for series in [
        "bulk_proxy_requests_total{route=\"passthrough\",status=\"200\"}",
        "bulk_proxy_upstream_duration_seconds_bucket",
        "bulk_proxy_requests_in_flight",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = TestProxy::start(TestProxy::config(&format!("http://127.0.0.1:{port}"))).await;
    let response = get_anonymous(down.root("/readyz")).await;
    assert_eq!(response.status(), 503);
    assert_eq!(get_anonymous(down.root("/healthz")).await.status(), 200);
}

#[tokio::test]
async fn shutdown_lets_a_slow_request_finish_then_stops_accepting() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(
        plain_client()
            .get(proxy.url("/Patient"))
            .header("x-fake-delay-ms", "1000")
            .send(),
    );
    // Shut down only once the request is in flight (the upstream has it), however loaded the
    // machine is.
    eventually(
        "the slow request to reach the upstream",
        Duration::from_secs(5),
        || async { (!fake.received().is_empty()).then_some(()) },
    )
    .await;
    let stopped = tokio::spawn(proxy.shutdown());
    let response = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("server::run returns after draining")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[test]
fn check_config_names_the_bad_key_and_exits_non_zero() {
    let bin = env!("CARGO_BIN_EXE_fhir-bulk-proxy");
    let output = std::process::Command::new(bin)
        .arg("check-config")
        .env("BULK_PROXY_UPSTREAM__URL", "ftp://nowhere")
        .env_remove("BULK_PROXY_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstream.url") && stderr.contains("ftp://nowhere"),
        "{stderr}"
    );

    let output = std::process::Command::new(bin)
        .arg("check-config")
        .env("BULK_PROXY_UPSTREAM__URL", "http://fhir:8080/fhir")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    testkit::process::assert_succeeded(&output);
}

#[tokio::test]
async fn readiness_follows_the_job_store() {
    let mut redis = testkit::RedisServer::start();
    let fake = FakeFhir::new().start().await;
    let mut config = TestProxy::config(&fake.url());
    config.store.backend = fhir_bulk_proxy::config::StoreBackend::Redis;
    config.store.redis_url = Some(redis.url().into());
    let proxy = TestProxy::start(config).await;
    let ready = || async {
        let response = get_anonymous(proxy.root("/readyz")).await;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        (status, body)
    };
    let (status, body) = ready().await;
    assert_eq!((status, &body["store"]), (200, &Value::from("ok")));

    redis.stop();
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["upstream"], "ok", "{body}");
    assert_ne!(body["store"], "ok", "{body}");

    redis.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = ready().await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `check-config [--strict]` with `--config config`, run in `cwd` with `env`: (success, stdout,
/// stderr).
fn check_config_in(
    cwd: &Path,
    config: Option<&str>,
    strict: bool,
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"));
    if let Some(config) = config {
        command.args(["--config", config]);
    }
    command.arg("check-config");
    if strict {
        command.arg("--strict");
    }
    command.env_remove("BULK_PROXY_CONFIG").current_dir(cwd);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn relative_paths_in_the_config_file_follow_the_file_whatever_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("conf")).unwrap();
    std::fs::create_dir_all(root.join("elsewhere/deeper")).unwrap();
    std::fs::write(
        root.join("conf/proxy.toml"),
        "[upstream]\nurl = \"http://fhir.internal:8080/fhir\"\n\
         [store]\npath = \"state/jobs.redb\"\n\
         [auth]\nsigning_secret = \"0123456789abcdef0123456789abcdef\"\n\
         [[auth.clients]]\nclient_id = \"c\"\nscopes = [\"system/*.read\"]\n\
         jwks_url = \"https://c.example/jwks.json\"\n",
    )
    .unwrap();
    let store = root.join("conf/state/jobs.redb");
    let files = root.join("conf/data/files");
    for (cwd, config) in [
        (root.clone(), "conf/proxy.toml"),
        (root.join("elsewhere/deeper"), "../../conf/proxy.toml"),
    ] {
        let (ok, out, err) = check_config_in(&cwd, Some(config), true, &[]);
        assert!(ok, "{out}{err}");
        assert!(
            out.contains(&format!("store      embedded, {}\n", store.display())),
            "from {}: {out}",
            cwd.display()
        );
        assert!(
            out.contains(&format!("storage    local directory {}\n", files.display())),
            "the default follows the file: {out}"
        );
        assert!(out.contains("FHIR base  http://<host>/fhir"), "{out}");
        assert!(out.contains("token URL  http://<host>/fhir/token (1 enabled client)"));
        assert!(out.ends_with("0 warnings\n"), "{out}");
    }

    // A relative path from the environment follows the working directory, with a warning that
    // --strict refuses.
    let cwd = root.join("elsewhere");
    let env = [("BULK_PROXY_STORAGE__PATH", "exports")];
    let (ok, out, err) = check_config_in(&cwd, Some("../conf/proxy.toml"), false, &env);
    assert!(ok, "{out}{err}");
    let resolved = cwd.join("exports");
    assert!(
        out.contains(&format!(
            "storage    local directory {}\n",
            resolved.display()
        )),
        "{out}"
    );
    assert!(
        out.contains("warning: storage.path = \"exports\" (from the environment) is relative"),
        "{out}"
    );
    let (ok, out, err) = check_config_in(&cwd, Some("../conf/proxy.toml"), true, &env);
    assert!(!ok && out.contains("1 warning\n"), "{out}");
    assert!(err.contains("--strict: 1 warning"), "{err}");

    // The proxy itself opens the store where check-config said, started from another directory.
    let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
        .args(["--config", "../../conf/proxy.toml"])
        .env_remove("BULK_PROXY_CONFIG")
        .env("BULK_PROXY_SERVER__LISTEN", "127.0.0.1:0")
        .current_dir(root.join("elsewhere/deeper"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !store.is_file() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(store.is_file(), "the store is {}", store.display());
    assert!(!root.join("elsewhere/deeper/data").exists());
}

#[test]
fn without_an_upstream_the_proxy_says_what_upstream_url_is() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = check_config_in(dir.path(), None, false, &[]);
    assert!(!ok);
    assert!(
        err.contains("upstream.url is required: the FHIR base URL of the server"),
        "{err}"
    );
}
