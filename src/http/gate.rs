//! The one gate on the way to the upstream (DESIGN "One gate"): every request the proxy forwards
//! on a client's behalf, from any path (the general path's passthrough, the metadata endpoint's
//! XML and `mode=` requests), goes through [`passthrough()`]. The fast path forwards without it only
//! where the gate has nothing to check ([`is_open`]).
//!
//! With `auth.passthrough = true` the gate wants one of the proxy's access tokens and lets through
//! what [`crate::auth::passthrough::check`] allows; the client's `Authorization` is then replaced by
//! `upstream.auth`'s.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::Response;

use super::error::ApiError;
use crate::app::{App, AppState};
use crate::auth::passthrough::{self, Checked};

/// Largest `POST _search` form body the gate reads to check its parameters.
const MAX_SEARCH_FORM: usize = 64 * 1024;

/// Whether the gate lets every request through unexamined (passthrough authorization is off).
pub fn is_open(app: &App) -> bool {
    !app.auth.protects_passthrough()
}

/// [`passthrough()`] as a handler: the router's fallback (what no route of the proxy's own owns) and
/// the metadata endpoint's way to the upstream.
pub async fn forward(State(app): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    passthrough(&app, request, peer).await
}

/// Checks `request` against the gate, then forwards it and streams the answer back.
pub async fn passthrough(
    app: &App,
    request: Request,
    peer: Option<SocketAddr>,
) -> Result<Response, ApiError> {
    // The router matches its routes as written; the same paths percent-encoded (`%24export`) would
    // otherwise reach the upstream's own endpoints of those names.
    let path = request.uri().path();
    if app.routes.owns_only_encoded(path) {
        return Err(ApiError::BadRequest(format!(
            "{path} names one of the proxy's own endpoints in percent-encoded form: \
             write it without percent-encoding"
        )));
    }
    let context = app.client_context(peer);
    if is_open(app) {
        return Ok(app.upstream.forward(request, &context).await?);
    }
    let request = admit(app, request).await?;
    // The proxy's own credentials went upstream: a 401 to an OAuth token renews it, and a request
    // without a body (one that can be sent again) goes once more with the new one.
    let again = (!has_body(request.headers())).then(|| {
        let mut head = Request::new(Body::empty());
        *head.method_mut() = request.method().clone();
        *head.uri_mut() = request.uri().clone();
        *head.version_mut() = request.version();
        *head.headers_mut() = request.headers().clone();
        head
    });
    let sent = request.headers().get(header::AUTHORIZATION).cloned();
    let response = app.upstream.forward(request, &context).await?;
    match again {
        Some(mut again)
            if response.status() == StatusCode::UNAUTHORIZED
                && app.upstream_credentials.rejected(sent.as_ref()) =>
        {
            if let Some(value) = app
                .upstream_credentials
                .authorization()
                .await
                .map_err(crate::proxy::ProxyError::from)?
            {
                again.headers_mut().insert(header::AUTHORIZATION, value);
            }
            Ok(app.upstream.forward(again, &context).await?)
        }
        _ => Ok(response),
    }
}

/// Headers that ask a server to treat a request as another method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The protected gate: the token, its scopes against the path and the search parameters (of the
/// query, and of the form body of a `POST _search`, which is read here and forwarded as read).
/// Reads of the CapabilityStatement need no token.
async fn admit(app: &App, request: Request) -> Result<Request, ApiError> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path();
    let rest = match path.strip_prefix(app.base_path.as_str()) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => {
            return Err(ApiError::Forbidden(format!(
                "{path} is outside the FHIR base {}/",
                app.base_path
            )));
        }
    };
    let body = if passthrough::is_public(&parts.method, rest) {
        body
    } else {
        let grant = app.auth.authorize(&parts.headers)?;
        if let Some(name) = METHOD_OVERRIDES
            .iter()
            .find(|name| parts.headers.contains_key(**name))
        {
            return Err(
                crate::auth::AuthError::ReadOnly(format!("method overrides ({name})")).into(),
            );
        }
        let query = parts.uri.query().unwrap_or("");
        match passthrough::check(&grant, &parts.method, rest, query)? {
            Checked::Done if parts.method == Method::POST => body,
            // A body on a read would reach the upstream unchecked.
            Checked::Done if has_body(&parts.headers) => {
                return Err(ApiError::BadRequest(format!(
                    "a {} request with a body is not forwarded",
                    parts.method
                )));
            }
            Checked::Done => body,
            Checked::FormToCheck => {
                let form = read_search_form(&parts.headers, body).await?;
                passthrough::check_form(&form)?;
                Body::from(form)
            }
        }
    };
    parts.headers.remove(header::AUTHORIZATION);
    if let Some(value) = app
        .upstream_credentials
        .authorization()
        .await
        .map_err(crate::proxy::ProxyError::from)?
    {
        parts.headers.insert(header::AUTHORIZATION, value);
    }
    Ok(Request::from_parts(parts, body))
}

/// Whether the request head announces a body (RFC 9112 §6.3).
fn has_body(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

/// The body of a `POST _search`: form parameters (FHIR R4 §3.1.1.4.10), at most
/// [`MAX_SEARCH_FORM`] bytes.
async fn read_search_form(
    headers: &axum::http::HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    if let Some(coding) = headers
        .get(header::CONTENT_ENCODING)
        .filter(|coding| !coding.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return Err(ApiError::BadRequest(format!(
            "a POST _search body checked against a token's scopes must not be encoded (Content-Encoding: {})",
            String::from_utf8_lossy(coding.as_bytes())
        )));
    }
    match content_type.as_deref() {
        Some("application/x-www-form-urlencoded") | None => {}
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "a POST _search body must be application/x-www-form-urlencoded, not {other:?}"
            )));
        }
    }
    axum::body::to_bytes(body, MAX_SEARCH_FORM)
        .await
        .map_err(|e| {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::PayloadTooLarge(format!(
                    "a POST _search body checked against a token's scopes is limited to {MAX_SEARCH_FORM} bytes"
                ))
            } else {
                ApiError::BadRequest(format!("the request body could not be read: {e}"))
            }
        })
}
