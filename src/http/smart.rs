//! `GET {base}/.well-known/smart-configuration` (SMART App Launch "Conformance", SPEC A3): public,
//! always `application/json`, every URL absolute under the public base.
//!
//! The proxy only does backend services, but Inferno's STU2 discovery test requires the app-launch
//! fields too (SPEC A3.8, B5): `authorization_endpoint`, `authorization_code` among the grant types,
//! and PKCE `S256`. They are advertised, and `{base}/authorize` answers every request with an OAuth
//! error saying that only `client_credentials` is supported.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::OAuthError;
use crate::auth::assertion::ALGORITHMS;

/// Path of the (refusing) authorization endpoint under the base.
pub const AUTHORIZE_PATH: &str = "/authorize";

pub async fn configuration(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let base = app.public_base(&headers);
    Json(json!({
        "token_endpoint": app.auth.token_url(&base),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ALGORITHMS,
        "grant_types_supported": ["client_credentials", "authorization_code"],
        "scopes_supported": ["system/*.read", "system/*.rs"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        "authorization_endpoint": format!("{base}{AUTHORIZE_PATH}"),
        "code_challenge_methods_supported": ["S256"],
        "response_types_supported": ["code"],
    }))
    .into_response()
}

/// The advertised authorization endpoint: app launch is not offered (RFC 6749 §4.1.2.1). The
/// answer is the OAuth error every token endpoint error gets: 400, never cached.
pub async fn authorize() -> Response {
    ApiError::OAuth(OAuthError::UnsupportedResponseType(
        "this server supports SMART Backend Services only: \
         POST a client_credentials request with a private_key_jwt assertion to the token endpoint"
            .into(),
    ))
    .into_response()
}
