//! The one error boundary: every error the proxy answers itself becomes a response here, with the
//! status mapping in one `match`. FHIR endpoints answer an OperationOutcome
//! (`application/fhir+json`); each error is tagged with where it came from ([`ErrorSource`]), which
//! labels logs and metrics.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::fhir::{FHIR_JSON, OperationOutcome};
use crate::proxy::ProxyError;

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
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn source(&self) -> ErrorSource {
        match self {
            Self::Proxy(_) => ErrorSource::Upstream,
            Self::BadRequest(_) | Self::NotFound(_) | Self::PayloadTooLarge(_) => {
                ErrorSource::Client
            }
            Self::Internal(_) => ErrorSource::Internal,
        }
    }

    /// Status and OperationOutcome issue code.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Proxy(ProxyError::Timeout(_)) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Self::Proxy(ProxyError::Unreachable(_) | ProxyError::Protocol(_)) => {
                (StatusCode::BAD_GATEWAY, "transient")
            }
            Self::Proxy(ProxyError::TooLarge(_)) => (StatusCode::BAD_GATEWAY, "too-costly"),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-long"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "exception"),
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
        let mut response =
            outcome_response(status, &OperationOutcome::error(code, self.to_string()));
        response.extensions_mut().insert(source);
        response
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
