//! `POST {base}{auth.token_path}`: the SMART Backend Services token endpoint (SPEC A4.7, A4.22–27;
//! RFC 6749 §4.4, §5). Only `application/x-www-form-urlencoded` bodies up to
//! `server.max_body_bytes` are read; every failure is RFC 6749 error JSON, never an
//! OperationOutcome, and every answer carries `Cache-Control: no-store` and `Pragma: no-cache`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, no_store};
use crate::app::AppState;
use crate::auth::{OAuthError, TokenRequest};

pub async fn post(
    State(app): State<AppState>,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::InvalidRequest(format!(
            "the token request must be application/x-www-form-urlencoded, not {content_type:?}"
        ))
        .into());
    }
    let token_url = app.auth.token_url(&app.public_base(request.headers()));
    let limit = app.config.server.max_body_bytes;
    let body = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| OAuthError::TooLarge(limit))?;
    let form = TokenRequest::from_form(&body)?;
    let issued = app.auth.token(&form, &token_url).await?;
    let mut response = axum::Json(issued).into_response();
    no_store(response.headers_mut());
    Ok(response)
}
