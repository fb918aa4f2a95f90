//! The listener over TLS (rustls): TLS 1.2 and 1.3 are served, anything older is refused
//! (SPEC A1.1). Checked with rustls clients held to one version each, and with ClientHellos built
//! by hand and sent over a raw socket for the versions rustls cannot speak (no `openssl` binary).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};

use testkit::{FakeFhir, TestProxy};

/// A self-signed certificate for 127.0.0.1 / localhost, written as PEM files; and its DER.
fn certificate(
    dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    CertificateDer<'static>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.der().clone())
}

/// Whether a rustls client offering only `version` completes a handshake, trusting `cert`.
async fn rustls_handshake(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    version: &'static rustls::SupportedProtocolVersion,
) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let Ok(tls) = connector.connect(name, tcp).await else {
        return false;
    };
    tls.get_ref().1.protocol_version() == Some(version.version)
}

/// Record content types (RFC 5246 §6.2.1).
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// A ClientHello record written by hand, as an old client sends it: `version` (0x0301 for
/// TLS 1.0, 0x0302 for 1.1, 0x0303 for 1.2) in the hello, no `supported_versions` extension
/// (so nothing newer is offered), ECDHE-ECDSA suites of that era and of TLS 1.2.
fn client_hello(version: u16) -> Vec<u8> {
    fn with_len16(body: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }
    fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend(with_len16(body));
        out
    }
    let suites: Vec<u8> = [
        0xc02b_u16, // ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 (TLS 1.2)
        0xc02c,     // ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 (TLS 1.2)
        0xc009,     // ECDHE_ECDSA_WITH_AES_128_CBC_SHA (TLS 1.0+)
        0xc00a,     // ECDHE_ECDSA_WITH_AES_256_CBC_SHA (TLS 1.0+)
    ]
    .iter()
    .flat_map(|s| s.to_be_bytes())
    .collect();
    let groups: Vec<u8> = [0x001d_u16, 0x0017] // x25519, secp256r1
        .iter()
        .flat_map(|g| g.to_be_bytes())
        .collect();
    let signature_algorithms: Vec<u8> = [0x0403_u16, 0x0503] // ecdsa_secp256r1/384 with SHA-2
        .iter()
        .flat_map(|a| a.to_be_bytes())
        .collect();
    let mut extensions = extension(0x000a, &with_len16(&groups));
    extensions.extend(extension(0x000b, &[1, 0])); // ec_point_formats: uncompressed
    extensions.extend(extension(0x000d, &with_len16(&signature_algorithms)));

    let mut hello = version.to_be_bytes().to_vec();
    hello.extend([0x5a; 32]); // random
    hello.push(0); // no session id
    hello.extend(with_len16(&suites));
    hello.extend([1, 0]); // compression: null only
    hello.extend(with_len16(&extensions));

    let length = u32::try_from(hello.len()).unwrap().to_be_bytes();
    let mut handshake = vec![1]; // client_hello
    handshake.extend(&length[1..]);
    handshake.extend(hello);

    let mut record = vec![HANDSHAKE, 0x03, 0x01]; // records of a first flight say TLS 1.0
    record.extend(with_len16(&handshake));
    record
}

/// Sends a hand-built ClientHello of `version` over a raw socket and returns the content type of
/// the first record the server answers with, or `None` if it closes without answering.
fn first_record_type(addr: SocketAddr, version: u16) -> Option<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&client_hello(version)).unwrap();
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).ok()?;
    Some(header[0])
}

#[tokio::test]
async fn tls_serves_https_and_refuses_versions_older_than_1_2() {
    let fake = FakeFhir::new().start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path());
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
    assert!(
        rustls_handshake(addr, &der, &rustls::version::TLS12).await,
        "TLS 1.2 is served"
    );
    assert!(
        rustls_handshake(addr, &der, &rustls::version::TLS13).await,
        "TLS 1.3 is served"
    );
    let (v12, v11, v10) = tokio::task::spawn_blocking(move || {
        (
            first_record_type(addr, 0x0303),
            first_record_type(addr, 0x0302),
            first_record_type(addr, 0x0301),
        )
    })
    .await
    .unwrap();
    // The hand-built hello is good enough: as TLS 1.2 it gets a ServerHello.
    assert_eq!(
        v12,
        Some(HANDSHAKE),
        "a TLS 1.2 hello is answered by a handshake"
    );
    // As TLS 1.1 or 1.0 it gets an alert (protocol_version), or a close: never a ServerHello.
    for (name, answer) in [("TLS 1.1", v11), ("TLS 1.0", v10)] {
        assert!(
            matches!(answer, Some(ALERT) | None),
            "{name} is refused, not answered with record type {answer:?}"
        );
    }
}
