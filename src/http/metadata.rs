//! `GET {base}/metadata`: the upstream's CapabilityStatement with the Bulk Data and SMART entries
//! added ([`crate::fhir::capability`], SPEC A2). The upstream document is cached for
//! `metadata.cache_ttl_secs`; the entries are added per request because the token URL depends on
//! the public base. XML requests, `mode=` queries, non-JSON and error answers pass through unchanged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use crate::app::{App, AppState};
use crate::fhir::{FHIR_JSON, capability};
use crate::proxy::headers::strip_hop_by_hop;

/// Upper bound on an upstream CapabilityStatement the proxy reads.
const MAX_CAPABILITY_BYTES: usize = 16 * 1024 * 1024;

/// The last CapabilityStatement the upstream returned, and when.
pub struct MetadataCache {
    ttl: Duration,
    entry: Mutex<Option<(Instant, Value)>>,
}

impl MetadataCache {
    pub fn new(ttl_secs: u64) -> Self {
        Self {
            ttl: Duration::from_secs(ttl_secs),
            entry: Mutex::new(None),
        }
    }

    fn get(&self) -> Option<Value> {
        let entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        entry
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    fn put(&self, value: &Value) {
        if !self.ttl.is_zero() {
            *self.entry.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), value.clone()));
        }
    }
}

/// Whether the client asked for something other than the JSON CapabilityStatement.
fn wants_passthrough(request: &Request) -> bool {
    let query = request.uri().query().unwrap_or("");
    let xml_format = url::form_urlencoded::parse(query.as_bytes())
        .any(|(k, v)| (k == "_format" && v.contains("xml")) || k == "mode");
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    xml_format || (accept.contains("xml") && !accept.contains("json"))
}

pub async fn get(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    if wants_passthrough(&request) {
        return super::gate::forward(State(app), request).await;
    }
    let token_url = format!(
        "{}{}",
        app.public_base(request.headers()),
        app.config.auth.token_path
    );
    match fetch(&app, Some(request.headers())).await? {
        Fetched::Statement(mut statement) => {
            // No token endpoint is served with auth disabled: none is advertised.
            let token_url = app.auth.enabled().then_some(token_url.as_str());
            capability::augment(&mut statement, token_url);
            Ok(fhir_json(&statement))
        }
        Fetched::Other(mut parts, body) => {
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Body::from(body)))
        }
    }
}

/// The upstream's CapabilityStatement as it sent it (cached), or `None` when it answered something
/// else.
pub async fn capability_statement(
    app: &App,
    headers: Option<&HeaderMap>,
) -> Result<Option<Value>, ApiError> {
    Ok(match fetch(app, headers).await? {
        Fetched::Statement(statement) => Some(statement),
        Fetched::Other(..) => None,
    })
}

enum Fetched {
    Statement(Value),
    Other(axum::http::response::Parts, bytes::Bytes),
}

async fn fetch(app: &App, client_headers: Option<&HeaderMap>) -> Result<Fetched, ApiError> {
    if let Some(cached) = app.metadata.get() {
        return Ok(Fetched::Statement(cached));
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
    // The client's own credentials only where passthrough forwards them anyway: behind the gate
    // they are the proxy's token, which is not the upstream's to see.
    let mut forwarded = vec![HeaderName::from_static("x-request-id")];
    if super::gate::is_open(app) {
        forwarded.push(header::AUTHORIZATION);
    }
    for name in forwarded {
        if let Some(value) = client_headers.and_then(|h| h.get(&name)) {
            headers.insert(name, value.clone());
        }
    }
    // The proxy's own credentials when the client sent none (planning an export needs it).
    if !headers.contains_key(header::AUTHORIZATION) {
        if let Some(value) = app.config.upstream.auth.authorization() {
            if let Ok(value) = value.parse() {
                headers.insert(header::AUTHORIZATION, value);
            }
        }
    }
    let (parts, body) = app
        .upstream
        .get_small("metadata", "/metadata", headers, MAX_CAPABILITY_BYTES)
        .await?;
    let parsed = (parts.status == StatusCode::OK)
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .filter(capability::is_capability_statement);
    Ok(match parsed {
        Some(statement) => {
            app.metadata.put(&statement);
            Fetched::Statement(statement)
        }
        None => Fetched::Other(parts, body),
    })
}

fn fhir_json(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        value.to_string(),
    )
        .into_response()
}
