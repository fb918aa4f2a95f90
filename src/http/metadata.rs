//! `GET {base}/metadata`: the upstream's CapabilityStatement with the Bulk Data and SMART entries
//! added ([`crate::fhir::capability`], SPEC A2). The upstream document is cached for
//! `metadata.cache_ttl_secs` ([`crate::proxy::MetadataCache`]); the entries are added per request because the token URL depends on
//! the public base. XML requests, `mode=` queries, non-JSON and error answers pass through unchanged.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use crate::app::AppState;
use crate::fhir::{FHIR_JSON, capability};
use crate::proxy::Fetched;
use crate::proxy::headers::strip_hop_by_hop;

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
    match app.upstream_metadata(Some(request.headers())).await? {
        Fetched::Statement(statement) => {
            let mut statement = statement.document();
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

fn fhir_json(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        value.to_string(),
    )
        .into_response()
}
