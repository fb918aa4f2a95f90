//! Upstream TLS (`[upstream.tls]`): an HTTPS upstream that requires a client certificate, with a
//! generated CA, on the export and passthrough paths; and each way it must fail: the wrong CA, no
//! client certificate, a hostname the certificate does not name.

use fhir_bulk_proxy::config::{Config, UpstreamTlsConfig};
use testkit::both;
use testkit::process::Store;
use testkit::setup::{Setup, expected, fixture_upstream, ids};
use testkit::tls::{Pki, TlsFront};

/// The fixture upstream behind a TLS front, and the PKI it uses.
async fn https_upstream() -> (testkit::memory_fhir::RunningFhir, TlsFront, Pki) {
    let pki = Pki::generate();
    let fhir = fixture_upstream().await;
    let front = TlsFront::start(&pki, fhir.addr).await;
    (fhir, front, pki)
}

fn upstream(config: &mut Config, url: String, tls: UpstreamTlsConfig) {
    config.upstream.url = url;
    config.upstream.tls = tls;
}

both!(mutual_tls_serves_export_and_passthrough);
async fn mutual_tls_serves_export_and_passthrough(store: Store) {
    let (fhir, front, pki) = https_upstream().await;
    let tls = UpstreamTlsConfig {
        ca_file: Some(pki.ca_file.clone()),
        client_cert: Some(pki.client_cert.clone()),
        client_key: Some(pki.client_key.clone()),
    };
    let s = Setup::with_upstream(store, fhir, |c| {
        upstream(c, front.url("localhost", "/fhir"), tls);
    })
    .await;
    let (manifest, files) = s.export("/$export").await;
    assert_eq!(ids(&files), expected(&s.fhir, None));
    assert!(s.errors(&manifest).await.is_empty());

    let patient = s.fhir.ids("Patient")[0].clone();
    let response = s.get(&s.proxy.url(&format!("/Patient/{patient}"))).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["id"], patient.as_str());
    assert!(front.handshakes() > 0);
    assert_eq!(front.failed_handshakes(), 0);
}

/// Export and passthrough both fail against `url` with `tls`, as a 502 OperationOutcome and as an
/// error line, and the TLS front saw the handshake fail.
async fn refused(
    url: impl FnOnce(&TlsFront) -> String,
    tls: impl FnOnce(&Pki) -> UpstreamTlsConfig,
) -> String {
    let (fhir, front, pki) = https_upstream().await;
    let (url, tls) = (url(&front), tls(&pki));
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        upstream(c, url, tls);
        c.export.retry_max_attempts = 2;
    })
    .await;
    let response = s.get(&s.proxy.url("/Patient")).await;
    let diagnostics = testkit::outcome(response, 502).await;
    let errors = crate::upstream_auth::failed_export(&s, "/$export?_type=Patient").await;
    assert!(errors.contains("Patient"), "{errors}");
    assert!(front.failed_handshakes() > 0);
    assert_eq!(
        s.fhir
            .counters
            .pages
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    diagnostics
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let diagnostics = refused(
        |front| front.url("localhost", "/fhir"),
        |pki| UpstreamTlsConfig {
            ca_file: Some(pki.other_ca_file.clone()),
            client_cert: Some(pki.client_cert.clone()),
            client_key: Some(pki.client_key.clone()),
        },
    )
    .await;
    assert!(
        diagnostics.to_lowercase().contains("certificate"),
        "{diagnostics}"
    );
}

#[tokio::test]
async fn without_a_client_certificate_the_upstream_refuses_the_proxy() {
    refused(
        |front| front.url("localhost", "/fhir"),
        |pki| UpstreamTlsConfig {
            ca_file: Some(pki.ca_file.clone()),
            client_cert: None,
            client_key: None,
        },
    )
    .await;
}

#[tokio::test]
async fn the_hostname_is_verified() {
    // The certificate names `localhost` only.
    let diagnostics = refused(
        |front| front.url("127.0.0.1", "/fhir"),
        |pki| UpstreamTlsConfig {
            ca_file: Some(pki.ca_file.clone()),
            client_cert: Some(pki.client_cert.clone()),
            client_key: Some(pki.client_key.clone()),
        },
    )
    .await;
    assert!(
        diagnostics.to_lowercase().contains("certificate"),
        "{diagnostics}"
    );
}

#[tokio::test]
async fn unusable_tls_files_are_named_at_start() {
    let pki = Pki::generate();
    let mut config = testkit::TestProxy::config("https://localhost:1/fhir");
    config.upstream.tls.ca_file = Some(pki.ca_file.with_file_name("missing.pem"));
    let message = config.validate().unwrap_err().to_string();
    assert!(message.contains("upstream.tls.ca_file"), "{message}");

    config.upstream.tls.ca_file = Some(pki.client_key.clone());
    config.upstream.tls.client_cert = Some(pki.client_cert.clone());
    let message = config.validate().unwrap_err().to_string();
    assert!(message.contains("upstream.tls.client_key"), "{message}");

    // Readable, but a key where certificates belong: check-config says so, naming the key...
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[upstream]\nurl = \"https://localhost:1/fhir\"\n[upstream.tls]\nca_file = {:?}\n",
        pki.client_key.display().to_string()
    );
    std::fs::write(dir.path().join("proxy.toml"), toml).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
        .args(["--config", "proxy.toml", "check-config"])
        .env_remove("BULK_PROXY_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("upstream.tls.ca_file") && stderr.contains("no certificate in"),
        "{stderr}"
    );
    // ... and the proxy does not start, and says why.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.upstream.tls.client_cert = None;
    config.store.path = dir.path().join("jobs.redb");
    config.storage.path = dir.path().join("files");
    let error = fhir_bulk_proxy::server::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("upstream.tls.ca_file") && message.contains("no certificate in"),
        "{message}"
    );
}
