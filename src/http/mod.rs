//! HTTP endpoints: one file per endpoint, the router, and the error boundary ([`error::ApiError`]).
//!
//! The proxy answers `{base}/metadata` and the operational endpoints (`/healthz`, `/readyz`,
//! `/metrics`) itself; everything else is passthrough ([`passthrough`]). Every request gets an
//! `X-Request-Id` (the client's, or a new UUID), forwarded upstream and echoed in the response, a
//! tracing span, and a line in the request metrics.

pub mod error;
pub mod metadata;
mod ops;

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
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
        .fallback(passthrough)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
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
fn route_class(matched: Option<&str>) -> &'static str {
    match matched {
        None => "passthrough",
        Some("/healthz" | "/readyz" | "/metrics") => "ops",
        Some(path) if path.ends_with("/metadata") => "metadata",
        Some(_) => "other",
    }
}

/// Request span, access log line and request metrics.
async fn observe(State(_app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_class(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
    );
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let span = tracing::info_span!(
        "request",
        id = %request_id,
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
