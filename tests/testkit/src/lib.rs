//! fhir-bulk-proxy's test tooling, shared by the integration tests, the examples and the
//! benchmarks, and never shipped (`publish = false`; the library does not depend on it):
//!
//! - [`memory_fhir`]: a small in-memory FHIR server (fixtures, fault injection, page counts): the
//!   upstream of the demo, the export tests and the benchmarks;
//! - [`client`]: a small Bulk Data client (SMART Backend Services token, kick-off, polling,
//!   downloads): what the examples and the end-to-end checks drive the proxy with;
//! - [`fake_fhir`], [`scripted`]: fake upstreams that report what they received, or answer
//!   scripted bytes;
//! - [`proxy`]: a real proxy (`server::run`) in this process on `127.0.0.1:0`; [`setup`]: that
//!   proxy in front of a [`memory_fhir`] upstream with a registered client and its token, plus
//!   polling and downloading an export;
//! - [`process`]: the proxy binary as a child process that binds port 0 and reports the port;
//! - [`redis`], [`s3`]: a private Redis and S3 server for one test;
//! - [`smart`]: SMART Backend Services from the client's side (keys, assertions, tokens, a JWKS
//!   URL server);
//! - [`eventually`]: waiting for a condition instead of sleeping a fixed time.

pub mod client;
pub mod eventually;
pub mod fake_fhir;
pub mod memory_fhir;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod s3;
pub mod scripted;
pub mod setup;
pub mod smart;
pub mod tls;
pub mod token_server;

pub use eventually::eventually;
pub use fake_fhir::FakeFhir;
pub use proxy::TestProxy;
pub use redis::{RedisServer, RedisTls, TlsServerKind, tls_server_kind};
pub use setup::Setup;

/// A reqwest client that neither follows redirects nor decompresses.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// GET `url` without a token, from [`plain_client`].
pub async fn get_anonymous(url: impl reqwest::IntoUrl) -> reqwest::Response {
    plain_client()
        .get(url)
        .send()
        .await
        .expect("the proxy answers")
}

/// GET `url` without a token, accepting `accept`.
pub async fn get_accepting(url: impl reqwest::IntoUrl, accept: &str) -> reqwest::Response {
    plain_client()
        .get(url)
        .header("accept", accept)
        .send()
        .await
        .expect("the proxy answers")
}

/// GET `url` with the bearer `token`, from [`plain_client`]: what most tests send.
pub async fn get_with_token(
    url: impl reqwest::IntoUrl,
    token: impl std::fmt::Display,
) -> reqwest::Response {
    plain_client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the proxy answers")
}

/// GET kick-off at `url` with the bearer `token` and the headers the IG asks for.
pub async fn kick_off(
    url: impl reqwest::IntoUrl,
    token: impl std::fmt::Display,
) -> reqwest::Response {
    plain_client()
        .get(url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .bearer_auth(token)
        .send()
        .await
        .expect("the proxy answers")
}

/// [`kick_off`], asserting 202; returns the status URL (`Content-Location`).
pub async fn start_export(url: impl reqwest::IntoUrl, token: impl std::fmt::Display) -> String {
    accepted(kick_off(url, token).await).await
}

/// Asserts that a kick-off was accepted (202) and returns its status URL (`Content-Location`).
pub async fn accepted(response: reqwest::Response) -> String {
    let status = response.status();
    let location = response.headers().get("content-location").cloned();
    assert_eq!(status, 202, "{}", response.text().await.unwrap_or_default());
    location
        .and_then(|v| v.to_str().ok().map(str::to_owned))
        .expect("a Content-Location")
}

/// The seconds a 202 or 429 answer's `Retry-After` asks for.
pub fn retry_after(response: &reqwest::Response) -> u64 {
    let value = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After");
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds")
}

/// The Prometheus scrape of the proxy listening on `addr`.
pub async fn metrics(addr: std::net::SocketAddr) -> String {
    plain_client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .expect("the proxy answers")
        .text()
        .await
        .expect("a metrics body")
}

/// Adds each resource of an NDJSON file to `got` (ids by type), asserting none appears twice.
pub fn add_ids(
    got: &mut std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ndjson: &str,
) {
    for line in ndjson.lines() {
        let resource: serde_json::Value = serde_json::from_str(line).expect("an NDJSON line");
        let t = resource["resourceType"]
            .as_str()
            .expect("a type")
            .to_owned();
        let id = resource["id"].as_str().expect("an id").to_owned();
        assert!(
            got.entry(t.clone()).or_default().insert(id.clone()),
            "{t}/{id} twice"
        );
    }
}

/// Asserts that `response` is a FHIR OperationOutcome (`application/fhir+json`) with `status`, and
/// returns its first issue's diagnostics.
pub async fn outcome(response: reqwest::Response, status: u16) -> String {
    let got = response.status();
    let content_type = response.headers().get("content-type").cloned();
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    assert_eq!(got, status, "{body}");
    assert_eq!(
        content_type.as_ref().and_then(|v| v.to_str().ok()),
        Some("application/fhir+json"),
        "{body}"
    );
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["diagnostics"]
        .as_str()
        .expect("diagnostics")
        .to_owned()
}

/// Sends a raw HTTP/1.1 GET with exactly `headers` (no client defaults such as `Accept: */*`)
/// and returns the status code.
pub async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    raw_request(addr, "GET", path, headers).await
}

/// [`raw_get`] with any method and the target exactly as written (no URL normalisation).
pub async fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}
