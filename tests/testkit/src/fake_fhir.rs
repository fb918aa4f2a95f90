//! A fake FHIR upstream on a real socket. By default it answers every request with a JSON report of
//! what it received (method, raw path and query, headers, body length and text). Request headers
//! steer it:
//!
//! - `x-fake-status: 201` answers that status;
//! - `x-fake-delay-ms: 500` waits before answering;
//! - `x-fake-response-header: Name: value` (repeatable) adds response headers;
//! - `x-fake-mirror: 1` answers with the request body instead of the report;
//! - `x-fake-body-bytes: N` answers N bytes, streamed in 64 KiB chunks.
//!
//! `{base}/metadata` answers the configured CapabilityStatement (JSON, or XML when asked for);
//! `{base}/probe-upload` and `{base}/probe-download` prove that bodies are streamed (see the tests).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The connection it came on (the proxy's side of it).
    pub peer: SocketAddr,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    capability: Mutex<Option<Value>>,
    upload_first_chunk: Notify,
    download_release: Notify,
}

pub struct FakeFhir {
    base: String,
    capability: Option<Value>,
}

pub struct RunningFake {
    pub addr: SocketAddr,
    pub base: String,
    shared: Arc<Shared>,
}

impl Default for FakeFhir {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeFhir {
    pub fn new() -> Self {
        Self {
            base: "/fhir".into(),
            capability: Some(json!({
                "resourceType": "CapabilityStatement",
                "status": "active",
                "fhirVersion": "4.0.1",
                "rest": [{ "mode": "server", "resource": [{ "type": "Patient" }, { "type": "Observation" }] }]
            })),
        }
    }

    /// The FHIR base path (default `/fhir`).
    pub fn base(mut self, base: &str) -> Self {
        self.base = base.trim_end_matches('/').into();
        self
    }

    /// What `{base}/metadata` answers (`None`: a 500 error).
    pub fn capability(mut self, capability: Option<Value>) -> Self {
        self.capability = capability;
        self
    }

    pub async fn start(self) -> RunningFake {
        let shared = Arc::new(Shared::default());
        *shared.capability.lock().unwrap() = self.capability;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await });
        RunningFake {
            addr,
            base: self.base,
            shared,
        }
    }
}

impl RunningFake {
    /// The upstream FHIR base URL.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.base)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Resolves once `probe-upload` has read the first chunk of its body.
    pub async fn upload_first_chunk_seen(&self) {
        self.shared.upload_first_chunk.notified().await;
    }

    /// Lets `probe-download` send the rest of its body.
    pub fn release_download(&self) {
        self.shared.download_release.notify_one();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };

    if path.ends_with("/probe-upload") {
        let mut body = body.into_data_stream();
        let mut total = 0;
        if let Some(Ok(first)) = body.next().await {
            total += first.len();
            shared.upload_first_chunk.notify_one();
        }
        while let Some(Ok(chunk)) = body.next().await {
            total += chunk.len();
        }
        return json!({ "received_bytes": total })
            .to_string()
            .into_response();
    }
    if path.ends_with("/probe-download") {
        let shared = shared.clone();
        let stream = futures_util::stream::unfold(0, move |step| {
            let shared = shared.clone();
            async move {
                match step {
                    0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"first;")), 1)),
                    1 => {
                        shared.download_release.notified().await;
                        Some((Ok(Bytes::from_static(b"second")), 2))
                    }
                    _ => None,
                }
            }
        });
        return Body::from_stream(stream).into_response();
    }

    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    shared.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        uri: uri.clone(),
        headers: headers.clone(),
        body: body.clone(),
        peer,
    });

    if let Some(ms) = get("x-fake-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    if path.ends_with("/metadata") {
        let accept = get("accept").unwrap_or_default();
        if accept.contains("xml") {
            return (
                [(header::CONTENT_TYPE, "application/fhir+xml")],
                "<CapabilityStatement xmlns=\"http://hl7.org/fhir\"><status value=\"active\"/></CapabilityStatement>",
            )
                .into_response();
        }
        return match shared.capability.lock().unwrap().clone() {
            Some(cs) => (
                [(header::CONTENT_TYPE, "application/fhir+json")],
                cs.to_string(),
            )
                .into_response(),
            None => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain")],
                "metadata broke",
            )
                .into_response(),
        };
    }

    let mut response = if get("x-fake-mirror").is_some() {
        Response::new(Body::from(body.clone()))
    } else if let Some(n) = get("x-fake-body-bytes").and_then(|v| v.parse::<usize>().ok()) {
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        let stream = futures_util::stream::unfold(n, move |left| {
            let chunk = chunk.clone();
            async move {
                (left > 0).then(|| {
                    let take = left.min(chunk.len());
                    (Ok::<_, std::io::Error>(chunk.slice(..take)), left - take)
                })
            }
        });
        Response::new(Body::from_stream(stream))
    } else {
        let report = json!({
            "method": parts.method.as_str(),
            "uri": uri,
            "headers": headers,
            "body_len": body.len(),
            "body": String::from_utf8_lossy(&body),
        });
        (
            [(header::CONTENT_TYPE, "application/json")],
            report.to_string(),
        )
            .into_response()
    };
    if let Some(status) = get("x-fake-status").and_then(|v| v.parse::<u16>().ok()) {
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
    }
    for (_, value) in headers
        .iter()
        .filter(|(k, _)| k == "x-fake-response-header")
    {
        let (n, v) = value.split_once(':').unwrap();
        response.headers_mut().append(
            HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
            HeaderValue::from_str(v.trim()).unwrap(),
        );
    }
    response
}
