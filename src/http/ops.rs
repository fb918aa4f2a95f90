//! Operational endpoints, outside the FHIR base: `/healthz` (the process is alive), `/readyz` (the
//! upstream answers and the stores are ready) and `/metrics` (Prometheus text).

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::AppState;

/// How long `/readyz` waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn healthz() -> Response {
    axum::Json(json!({ "status": "alive" })).into_response()
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    // Any HTTP answer below 500 means the upstream is up (it may want credentials for /metadata).
    let upstream = async {
        match tokio::time::timeout(
            READY_TIMEOUT,
            app.upstream
                .get_small("ready", "/metadata", HeaderMap::new(), 64 * 1024 * 1024),
        )
        .await
        {
            Ok(Ok((parts, _))) if parts.status.as_u16() < 500 => Ok(()),
            Ok(Ok((parts, _))) => Err(format!("upstream answered {}", parts.status)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("upstream did not answer within {READY_TIMEOUT:?}")),
        }
    };
    // The job store (embedded file or Redis): kick-off, status and the workers need it.
    let store = async {
        match tokio::time::timeout(READY_TIMEOUT, app.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("job store did not answer within {READY_TIMEOUT:?}")),
        }
    };
    let (upstream, store) = tokio::join!(upstream, store);
    let ready = upstream.is_ok() && store.is_ok();
    let shown = |check: Result<(), String>| check.err().unwrap_or_else(|| "ok".into());
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "upstream": shown(upstream),
        "store": shown(store),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.metrics.render(),
    )
        .into_response()
}
