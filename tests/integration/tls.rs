//! The listener over TLS (rustls): TLS 1.2 and 1.3 are served, anything older is refused
//! (SPEC A1.1).

use std::process::Command;

use crate::support::{FakeFhir, TestProxy};

/// A self-signed certificate for 127.0.0.1 / localhost, written as PEM files.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// Whether `openssl s_client` completes a handshake with `version` (e.g. `-tls1_1`).
fn handshake(addr: std::net::SocketAddr, version: &str) -> bool {
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), version, "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    text.contains("CONNECTION ESTABLISHED")
}

#[tokio::test]
async fn tls_serves_https_and_refuses_versions_older_than_1_2() {
    let fake = FakeFhir::new().start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let mut config = TestProxy::config(&fake.url());
    config.server.tls = Some(fhir_bulk_proxy::config::TlsConfig { cert, key });
    let proxy = TestProxy::start(config).await;

    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let response = client
        .get(format!("https://{}/fhir/Patient", proxy.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        report["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "x-forwarded-proto")
            .unwrap()[1],
        "https"
    );

    let addr = proxy.addr;
    let (v12, v13, v11, v10) = tokio::task::spawn_blocking(move || {
        (
            handshake(addr, "-tls1_2"),
            handshake(addr, "-tls1_3"),
            handshake(addr, "-tls1_1"),
            handshake(addr, "-tls1"),
        )
    })
    .await
    .unwrap();
    assert!(v12 && v13, "TLS 1.2 and 1.3 are served");
    assert!(!v11 && !v10, "TLS 1.1 and 1.0 are refused");
}
