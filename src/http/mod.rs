//! HTTP endpoints: one file per endpoint, the router, and the error boundary ([`error::ApiError`]).
//!
//! The proxy answers `{base}/metadata` and the operational endpoints (`/healthz`, `/readyz`,
//! `/metrics`) itself; everything else is passthrough ([`passthrough`]). Every request gets an
//! `X-Request-Id` (the client's, or a new UUID), forwarded upstream and echoed in the response, a
//! tracing span, and a line in the request metrics.

pub mod error;
mod export;
mod files;
pub mod metadata;
mod ops;
mod smart;
mod status;
mod token;

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tracing::Instrument;

use crate::app::AppState;
use crate::telemetry::metrics;
use error::ApiError;

/// Builds the router for one proxy instance.
pub fn router(state: AppState) -> Router {
    let base = state.base_path.clone();
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route(
            &format!("{base}/metadata"),
            get(metadata::get).fallback(passthrough),
        )
        .route(
            &format!("{base}/$export"),
            get(export::system)
                .post(export::system)
                .fallback(passthrough),
        )
        .route(
            &format!("{base}/Patient/$export"),
            get(export::patient)
                .post(export::patient)
                .fallback(passthrough),
        )
        .route(
            &format!("{base}/Group/{{id}}/$export"),
            get(export::group).post(export::group).fallback(passthrough),
        )
        .route(
            &format!("{base}/$export-status/{{id}}"),
            get(status::get).delete(status::delete),
        )
        .route(
            &format!("{base}/$export-file/{{id}}/{{name}}"),
            get(files::get),
        )
        .merge(auth_routes(&state))
        .fallback(protected_passthrough)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(NextRequestId::default()))
        .with_state(state)
}

/// The token endpoint and SMART discovery, when the proxy is the authorization server.
fn auth_routes(state: &AppState) -> Router<AppState> {
    if !state.auth.enabled() {
        return Router::new();
    }
    let base = &state.base_path;
    Router::new()
        .route(
            &format!("{base}{}", state.auth.token_path()),
            post(token::post).fallback(passthrough),
        )
        .route(
            &format!("{base}/.well-known/smart-configuration"),
            get(smart::configuration).fallback(passthrough),
        )
        .route(
            &format!("{base}{}", smart::AUTHORIZE_PATH),
            get(smart::authorize).post(smart::authorize),
        )
}

/// Passthrough behind the proxy's own tokens when `auth.passthrough` is on (reads only, scoped by
/// the resource type in the path; the client's `Authorization` is replaced by `upstream.auth`),
/// plain passthrough otherwise.
async fn protected_passthrough(
    State(app): State<AppState>,
    mut request: Request<Body>,
) -> Result<Response, ApiError> {
    if app.auth.protects_passthrough() {
        let grant = app.auth.authorize(request.headers())?;
        let path = request.uri().path();
        let rest = path.strip_prefix(app.base_path.as_str()).unwrap_or(path);
        crate::auth::passthrough::check(&grant, request.method(), rest)?;
        let headers = request.headers_mut();
        headers.remove(axum::http::header::AUTHORIZATION);
        if let Some(value) = app.config.upstream.auth.authorization() {
            let value = axum::http::HeaderValue::from_str(&value)
                .map_err(|_| ApiError::Internal("upstream.auth is not a valid header".into()))?;
            headers.insert(axum::http::header::AUTHORIZATION, value);
        }
    }
    passthrough(State(app), request).await
}

/// Forwards the request to the upstream and streams the answer back.
pub async fn passthrough(
    State(app): State<AppState>,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let context = app.client_context(request.headers(), peer);
    Ok(app.upstream.forward(request, &context).await?)
}

/// The route class of a matched route, for metrics and logs.
fn route_class(matched: Option<&str>, token_path: &str) -> &'static str {
    match matched {
        None => "passthrough",
        Some(path) if path.ends_with("/.well-known/smart-configuration") => "smart",
        Some(path) if path.ends_with("/authorize") => "smart",
        Some(path) if path.ends_with(token_path) => "token",
        Some("/healthz" | "/readyz" | "/metrics") => "ops",
        Some(path) if path.ends_with("/metadata") => "metadata",
        Some(path) if path.ends_with("/$export") => "export",
        Some(path) if path.contains("/$export-status/") => "status",
        Some(path) if path.contains("/$export-file/") => "file",
        Some(_) => "other",
    }
}

/// Request span, access log line and request metrics.
async fn observe(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_class(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
        app.auth.token_path(),
    );
    // The span's fields are only formatted when info logging is on.
    let span = tracing::info_span!(
        "request",
        id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        method = %request.method(),
        path = %request.uri().path(),
        route,
    );
    let in_flight = metrics::InFlight::start();
    let response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);
    let status = response.status();
    let elapsed = started.elapsed();
    metrics::request(route, status.as_u16(), elapsed);
    span.in_scope(|| {
        tracing::info!(
            status = status.as_u16(),
            latency_ms = elapsed.as_secs_f64() * 1000.0,
            "response"
        );
    });
    response
}

/// Request ids for requests that come without one: a random per-process prefix and a counter,
/// unique across replicas without a random-number system call per request (as a UUID v4 costs).
#[derive(Clone)]
struct NextRequestId {
    prefix: std::sync::Arc<str>,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for NextRequestId {
    fn default() -> Self {
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self {
            prefix: random[..16].into(),
            counter: Default::default(),
        }
    }
}

impl MakeRequestId for NextRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        axum::http::HeaderValue::from_str(&format!("{}-{n:08x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}
