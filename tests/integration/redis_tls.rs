//! A managed Redis (issue 16 item 5): `rediss://` with the server's certificate and name verified
//! against `store.redis_ca_file`, and a password (here from `store.redis_password`, the
//! `BULK_PROXY_STORE__REDIS_PASSWORD` of a deployment). An export runs to completion through it; a
//! wrong password and a CA that did not sign the server's certificate stop the proxy at start with
//! a message that names the cause and never the password.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::StoreBackend;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use testkit::process::Store;
use testkit::setup::{Setup, assert_same, expected, fixture_upstream, ids};
use testkit::{RedisServer, RedisTls};

const PASSWORD: &str = "s3cret-redis-pass";

/// A CA (its PEM at `ca.pem`) and a certificate it signed for `localhost` (`redis.crt`,
/// `redis.key`); and another CA (`other-ca.pem`) that signed nothing here.
fn certificates(dir: &Path) -> RedisTls {
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let ours = ca("test redis CA");
    let other = ca("another CA");
    std::fs::write(dir.join("ca.pem"), ours.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ours)
        .unwrap();
    std::fs::write(dir.join("redis.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("redis.key"), key.serialize_pem()).unwrap();
    RedisTls {
        cert: dir.join("redis.crt"),
        key: dir.join("redis.key"),
        password: PASSWORD.to_owned(),
    }
}

#[tokio::test]
async fn an_export_runs_against_redis_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certificates(dir.path());
    let redis = RedisServer::start_tls(&tls);
    let ca = dir.path().join("ca.pem");
    let url = redis.tls_url();
    let s = Setup::with_upstream(Store::Embedded, fixture_upstream().await, |config| {
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = Some(url.clone().into());
        config.store.redis_password = Some(PASSWORD.into());
        config.store.redis_ca_file = Some(ca);
    })
    .await;
    let (manifest, files) = s.export("/$export").await;
    assert_same(&ids(&files), &expected(&s.fhir, None));
    assert_eq!(manifest["error"], serde_json::json!([]));

    // The job is in that Redis: the URL with the password in it (the user `default`) reads it.
    let with_password = url.replace("rediss://", &format!("rediss://default:{PASSWORD}@"));
    let mut config = fhir_bulk_proxy::config::StoreConfig {
        backend: StoreBackend::Redis,
        redis_url: Some(with_password.into()),
        ..Default::default()
    };
    config.redis_ca_file = Some(dir.path().join("ca.pem"));
    let store = fhir_bulk_proxy::store::redis::RedisStore::connect_configured(&config)
        .await
        .unwrap();
    let jobs = fhir_bulk_proxy::store::JobStore::job_ids(&store)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 1, "the export's job is in the TLS Redis");
}

/// Runs the proxy against the TLS Redis with `env` on top and returns its stderr; it must exit
/// with a failure.
fn failed_start(url: &str, ca: &Path, env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"));
    command
        .env_remove("BULK_PROXY_CONFIG")
        .current_dir(ca.parent().unwrap())
        .env("BULK_PROXY_UPSTREAM__URL", "http://127.0.0.1:9/fhir")
        .env("BULK_PROXY_SERVER__LISTEN", "127.0.0.1:0")
        .env("BULK_PROXY_STORE__BACKEND", "redis")
        .env("BULK_PROXY_STORE__REDIS_URL", url)
        .env("BULK_PROXY_STORE__REDIS_CA_FILE", ca);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the proxy did not stop within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "the proxy started: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("store.redis_url"), "{stderr}");
    stderr
}

#[test]
fn a_wrong_password_or_an_untrusted_ca_stops_the_proxy_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certificates(dir.path());
    let redis = RedisServer::start_tls(&tls);
    let url = redis.tls_url();
    let ca: PathBuf = dir.path().join("ca.pem");

    let wrong = failed_start(&url, &ca, &[("BULK_PROXY_STORE__REDIS_PASSWORD", "not-it")]);
    assert!(wrong.contains("Password authentication failed"), "{wrong}");
    assert!(!wrong.contains("not-it"), "the password is shown: {wrong}");

    let in_url = url.replace("rediss://", "rediss://default:not-it@");
    let wrong = failed_start(&in_url, &ca, &[]);
    assert!(wrong.contains("Password authentication failed"), "{wrong}");
    assert!(!wrong.contains("not-it"), "the password is shown: {wrong}");

    let other = dir.path().join("other-ca.pem");
    let untrusted = failed_start(
        &url,
        &other,
        &[("BULK_PROXY_STORE__REDIS_PASSWORD", PASSWORD)],
    );
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");
    assert!(!untrusted.contains(PASSWORD), "{untrusted}");

    // Without a password at all: Redis asks for one.
    let none = failed_start(&url, &ca, &[]);
    assert!(
        none.contains("NOAUTH") || none.contains("uthentication"),
        "{none}"
    );
}
