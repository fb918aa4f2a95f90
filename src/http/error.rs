//! The one error boundary: every error the proxy answers itself becomes a response here, with the
//! status mapping in one `match`. FHIR endpoints answer an OperationOutcome
//! (`application/fhir+json`); the token endpoint answers RFC 6749 §5.2 error JSON (SPEC A4.26); a
//! missing or invalid bearer token gets `WWW-Authenticate: Bearer` (RFC 6750 §3, SPEC A1.9). Each
//! error is tagged with where it came from ([`ErrorSource`]), which labels logs and metrics.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::app::UpstreamReadError;
use crate::auth::{AuthError, OAuthError};
use crate::fhir::{FHIR_JSON, OperationOutcome, oauth_error};
use crate::proxy::ProxyError;
use crate::storage::StorageError;
use crate::store::StoreError;

/// Who caused an error: decides the status class and labels metrics (pingora's `ErrorSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Upstream,
    Internal,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        }
    }
}

/// An error answered by the proxy itself.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The token is valid but its scopes do not cover the request.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A `Range` a file cannot satisfy (beyond its end, or several ranges): 416 with
    /// `Content-Range: bytes */{size}` when the size is known (RFC 9110 §15.5.17).
    #[error(
        "the Range header asks for bytes the file does not have, or for several ranges: ask for one range within the file"
    )]
    RangeNotSatisfiable { size: Option<u64> },
    /// A method one of the proxy's own routes does not serve (these paths are never forwarded).
    #[error("this endpoint answers {} only", allowed_list(.0))]
    MethodNotAllowed(&'static [Method]),
    /// The client stopped sending its request body: 408.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    Internal(String),
    /// No valid bearer token: 401 + `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(String),
    /// A token endpoint error, answered as OAuth JSON instead of an OperationOutcome.
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    /// The upstream failed a request the proxy made on its own behalf (not passthrough).
    #[error("{0}")]
    UpstreamFailed(String),
    /// Too many exports or polls: 429 with `Retry-After`.
    #[error("{message}")]
    TooManyRequests { retry_after: u64, message: String },
    /// The job store is unreachable: 503 with `Retry-After`, a transient issue.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Forbidden(_) | AuthError::Unchecked(_) | AuthError::ReadOnly(_) => {
                Self::Forbidden(error.to_string())
            }
            AuthError::Missing | AuthError::Invalid(_) | AuthError::Expired => {
                Self::Unauthorized(error.to_string())
            }
        }
    }
}

impl From<UpstreamReadError> for ApiError {
    fn from(error: UpstreamReadError) -> Self {
        match error {
            UpstreamReadError::NotFound(message) => Self::NotFound(message),
            UpstreamReadError::Failed(message) => Self::UpstreamFailed(message),
        }
    }
}

impl ApiError {
    pub fn source(&self) -> ErrorSource {
        match self {
            Self::Proxy(ProxyError::ClientBody(_)) => ErrorSource::Client,
            Self::Proxy(_) | Self::UpstreamFailed(_) => ErrorSource::Upstream,
            Self::BadRequest(_)
            | Self::NotFound(_)
            | Self::PayloadTooLarge(_)
            | Self::MethodNotAllowed(_)
            | Self::RangeNotSatisfiable { .. }
            | Self::RequestTimeout(_)
            | Self::Unauthorized(_)
            | Self::Forbidden(_) => ErrorSource::Client,
            Self::OAuth(OAuthError::Unavailable(_)) => ErrorSource::Internal,
            Self::OAuth(_) => ErrorSource::Client,
            Self::TooManyRequests { .. } => ErrorSource::Client,
            Self::Internal(_) | Self::Store(_) | Self::Storage(_) => ErrorSource::Internal,
        }
    }

    /// Status and OperationOutcome issue code (OAuth errors carry their own code instead).
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Proxy(ProxyError::Timeout(_)) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Proxy(
                ProxyError::Unreachable(_) | ProxyError::Protocol(_) | ProxyError::Credentials(_),
            ) => (StatusCode::BAD_GATEWAY, "transient"),
            Self::Proxy(ProxyError::TooLarge(_)) => (StatusCode::BAD_GATEWAY, "too-costly"),
            Self::Proxy(ProxyError::ClientBody(_)) => (StatusCode::BAD_REQUEST, "invalid"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "not-supported"),
            Self::RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "value"),
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "login"),
            // RFC 6749 §5.2: 400 for every error (invalid_client MAY be 401, and 400 satisfies
            // every test kit); an oversized body is 413; a replay cache outage is retryable.
            Self::OAuth(OAuthError::TooLarge(_)) => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            Self::OAuth(OAuthError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
            Self::OAuth(_) => (StatusCode::BAD_REQUEST, "security"),
            Self::Internal(_) | Self::Storage(_) | Self::Store(StoreError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "exception")
            }
            Self::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
            Self::UpstreamFailed(_) => (StatusCode::BAD_GATEWAY, "transient"),
            Self::Store(StoreError::Unavailable(_) | StoreError::InUse(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let source = self.source();
        if source == ErrorSource::Client {
            tracing::debug!(error = %self, source = source.as_str(), "request rejected");
        } else {
            tracing::warn!(error = %self, source = source.as_str(), "request failed");
        }
        let mut response = match &self {
            Self::OAuth(error) => oauth_response(status, error),
            _ => outcome_response(status, &OperationOutcome::error(code, self.to_string())),
        };
        let challenge = match &self {
            Self::Unauthorized(_) => Some("Bearer"),
            Self::Forbidden(_) => Some("Bearer error=\"insufficient_scope\""),
            _ => None,
        };
        if let Some(challenge) = challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        let retry_after = match &self {
            Self::TooManyRequests { retry_after, .. } => Some(*retry_after),
            Self::Store(StoreError::Unavailable(_) | StoreError::InUse(_)) => Some(5),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Self::RangeNotSatisfiable { size: Some(size) } = &self
            && let Ok(value) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            response.headers_mut().insert(header::CONTENT_RANGE, value);
        }
        if let Self::MethodNotAllowed(allowed) = &self
            && let Ok(value) = HeaderValue::from_str(&allowed_list(allowed))
        {
            response.headers_mut().insert(header::ALLOW, value);
        }
        response.extensions_mut().insert(source);
        response
    }
}

/// `GET, HEAD, POST`: the `Allow` header's form (RFC 9110 §10.2.1).
fn allowed_list(methods: &[Method]) -> String {
    let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    names.join(", ")
}

/// The media type an error OperationOutcome is sent as: `application/json` when the request's
/// `Accept` prefers it to `application/fhir+json` (or accepts only it), otherwise
/// `application/fhir+json`. Each type's weight comes from the most specific range that covers it
/// (`application/json` before `application/*` before `*/*`; RFC 9110 §12.5.1); a tie is FHIR's.
pub fn error_media_type(accept: Option<&HeaderValue>) -> &'static str {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return FHIR_JSON;
    };
    // (specificity, q) of the most specific range covering each type; specificity 0 = none.
    let mut json = (0u8, 0.0f32);
    let mut fhir = (0u8, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let (for_json, for_fhir) = match media.as_str() {
            "application/json" => (3, 0),
            "application/fhir+json" => (0, 3),
            "application/*" => (2, 2),
            "*/*" => (1, 1),
            _ => (0, 0),
        };
        for (specificity, best) in [(for_json, &mut json), (for_fhir, &mut fhir)] {
            if specificity > best.0 {
                *best = (specificity, q);
            }
        }
    }
    if json.1 > fhir.1 { JSON } else { FHIR_JSON }
}

const JSON: &str = "application/json";

/// Sends an OperationOutcome error of the proxy's own (a response [`ApiError`] made) as the
/// request's `Accept` prefers ([`error_media_type`]); any other response is left alone.
pub fn honour_accept(accept: Option<&HeaderValue>, response: &mut Response) {
    let is_outcome_error = response.extensions().get::<ErrorSource>().is_some()
        && response.headers().get(header::CONTENT_TYPE)
            == Some(&HeaderValue::from_static(FHIR_JSON));
    if is_outcome_error {
        let media = error_media_type(accept);
        if media != FHIR_JSON {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(media));
        }
    }
}

/// A response whose body is `outcome`, as `application/fhir+json`.
pub fn outcome_response(status: StatusCode, outcome: &OperationOutcome) -> Response {
    let mut response = (status, outcome.to_json().to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// RFC 6749 §5.2 error JSON, never cached (§5.1's headers apply to errors as well: SPEC A4.25).
fn oauth_response(status: StatusCode, error: &OAuthError) -> Response {
    let body = oauth_error(error.code(), &error.to_string());
    let mut response = (status, axum::Json(body)).into_response();
    no_store(response.headers_mut());
    response
}

/// `Cache-Control: no-store` and `Pragma: no-cache` (RFC 6749 §5.1).
pub fn no_store(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
mod accept_tests {
    use super::*;

    fn media(accept: &str) -> &'static str {
        error_media_type(Some(&HeaderValue::from_str(accept).unwrap()))
    }

    #[test]
    fn errors_are_plain_json_only_when_accept_prefers_it() {
        assert_eq!(error_media_type(None), FHIR_JSON);
        for fhir in [
            "application/fhir+json",
            "*/*",
            "application/*",
            "application/json, */*",
            "application/json, application/fhir+json",
            "application/json;q=0.5, application/fhir+json",
            "application/json;q=0.5, */*",
            "text/html",
            "application/json;q=0, */*",
        ] {
            assert_eq!(media(fhir), FHIR_JSON, "{fhir}");
        }
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/json, text/html",
            "application/fhir+json;q=0.5, application/json",
            "application/json, */*;q=0.1",
            "application/json, application/*;q=0.9",
        ] {
            assert_eq!(media(json), JSON, "{json}");
        }
    }

    #[test]
    fn only_outcome_errors_change_type() {
        let accept = HeaderValue::from_static("application/json");
        let mut error = ApiError::NotFound("no such export".into()).into_response();
        honour_accept(Some(&accept), &mut error);
        assert_eq!(error.headers()[header::CONTENT_TYPE], JSON);
        let mut ok = outcome_response(
            StatusCode::ACCEPTED,
            &OperationOutcome::error("informational", "fine"),
        );
        honour_accept(Some(&accept), &mut ok);
        assert_eq!(ok.headers()[header::CONTENT_TYPE], FHIR_JSON);
    }
}
