//! `GET {base}/metadata`: the upstream's CapabilityStatement with the Bulk Data and SMART entries
//! added ([`crate::fhir::capability`], SPEC A2). The upstream document is cached for
//! `metadata.cache_ttl_secs`; the entries are added per request because the token URL depends on
//! the public base. XML requests, `mode=` queries, non-JSON and error answers pass through unchanged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::passthrough;
use crate::app::AppState;
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
        return passthrough(State(app), request).await;
    }
    let token_url = app.auth.token_url(&app.public_base(request.headers()));
    if let Some(mut cached) = app.metadata.get() {
        capability::augment(&mut cached, &token_url);
        return Ok(fhir_json(&cached));
    }

    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
    for name in [
        header::AUTHORIZATION,
        "x-request-id".parse().expect("valid"),
    ] {
        if let Some(value) = request.headers().get(&name) {
            headers.insert(name, value.clone());
        }
    }
    let (mut parts, body) = app
        .upstream
        .get_small("metadata", "/metadata", headers, MAX_CAPABILITY_BYTES)
        .await?;
    let parsed = (parts.status == StatusCode::OK)
        .then(|| serde_json::from_slice::<Value>(&body).ok())
        .flatten()
        .filter(capability::is_capability_statement);
    match parsed {
        Some(mut statement) => {
            app.metadata.put(&statement);
            capability::augment(&mut statement, &token_url);
            Ok(fhir_json(&statement))
        }
        None => {
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Body::from(body)))
        }
    }
}

fn fhir_json(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        value.to_string(),
    )
        .into_response()
}
