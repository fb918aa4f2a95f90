//! HTTP endpoints: one file per endpoint, the router, and the error boundary ([`error::ApiError`]).
//!
//! The proxy answers `{base}/metadata` and the operational endpoints (`/healthz`, `/readyz`,
//! `/metrics`) itself; everything else is passthrough ([`passthrough`]; bodiless HTTP/1.1 requests
//! through [`fast`]). Every request gets an `X-Request-Id` (the client's, or a new one: see
//! `RequestId`), forwarded upstream and echoed in the response, a tracing span, and a line in the
//! request metrics.

pub mod error;
mod export;
pub mod fast;
mod files;
pub mod metadata;
mod ops;
mod smart;
mod status;
mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceExt;
use tracing::Instrument;

use crate::app::AppState;
use crate::telemetry::metrics;
use error::ApiError;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every connection serves: passthrough requests go straight to the upstream; the proxy's
/// own endpoints go through the router. Both are observed the same way ([`observe`]).
#[derive(Clone)]
pub struct Entry {
    app: AppState,
    router: Router,
}

impl Entry {
    pub fn new(app: AppState) -> Self {
        Self {
            router: router(app.clone()),
            app,
        }
    }

    /// Answers one request from `peer`.
    pub async fn serve<B>(&self, request: axum::http::Request<B>, peer: SocketAddr) -> Response
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let mut request = request.map(Body::new);
        if let Err(why) = crate::proxy::headers::check_request_head(request.headers()) {
            return ApiError::BadRequest(why.into()).into_response();
        }
        if is_passthrough(&self.app, request.uri().path()) {
            let app = &self.app;
            return observe("passthrough", request, |request| async move {
                protected_passthrough(app, request, Some(peer))
                    .await
                    .into_response()
            })
            .await;
        }
        request.extensions_mut().insert(ConnectInfo(peer));
        match self.router.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// Whether the router would send `path` to its passthrough fallback: no route of the proxy's own
/// can match it. Errs towards the router (which passes through what it does not answer).
pub(crate) fn is_passthrough(app: &crate::app::App, path: &str) -> bool {
    let own = matches!(path, "/healthz" | "/readyz" | "/metrics")
        || path.ends_with("/metadata")
        || (path.contains('$') && path.contains("$export"))
        || (app.auth.enabled()
            && (path.ends_with(app.auth.token_path())
                // The one-byte search first: most paths have no '.', and it is much cheaper.
                || (path.contains('.') && path.contains("/.well-known/"))
                || path.ends_with(smart::AUTHORIZE_PATH)));
    !own
}

/// Builds the router for the proxy's own endpoints (anything else it passes through).
fn router(state: AppState) -> Router {
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
        .fallback(fallback_passthrough)
        .layer(middleware::from_fn_with_state(state.clone(), observe_route))
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

/// The router's fallback: what [`Entry::serve`] did not already recognise as passthrough.
async fn fallback_passthrough(State(app): State<AppState>, request: Request<Body>) -> Response {
    let peer = peer_of(&request);
    protected_passthrough(&app, request, peer)
        .await
        .into_response()
}

/// Passthrough behind the proxy's own tokens when `auth.passthrough` is on (reads only, scoped by
/// the resource type in the path; the client's `Authorization` is replaced by `upstream.auth`),
/// plain passthrough otherwise.
async fn protected_passthrough(
    app: &crate::app::App,
    mut request: Request<Body>,
    peer: Option<SocketAddr>,
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
    forward(app, request, peer).await
}

/// Forwards the request to the upstream and streams the answer back (the handler of methods the
/// proxy's own routes do not answer, e.g. `PUT {base}/metadata`).
pub async fn passthrough(
    State(app): State<AppState>,
    request: Request<Body>,
) -> Result<Response, ApiError> {
    let peer = peer_of(&request);
    forward(&app, request, peer).await
}

async fn forward(
    app: &crate::app::App,
    request: Request<Body>,
    peer: Option<SocketAddr>,
) -> Result<Response, ApiError> {
    let context = app.client_context(peer);
    Ok(app.upstream.forward(request, &context).await?)
}

fn peer_of(request: &Request<Body>) -> Option<SocketAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
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

/// The router's middleware: [`observe`] with the route class of the matched route.
async fn observe_route(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_class(
        request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str),
        app.auth.token_path(),
    );
    observe(route, request, |request| next.run(request)).await
}

/// Request id, span, access log line and request metrics around `handler`. The request keeps the
/// client's `X-Request-Id` or gets a new one (forwarded upstream); the response echoes it.
async fn observe<F, Fut>(route: &'static str, mut request: Request, handler: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let id = match request.headers().get(&X_REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
            let id = RequestId::new().to_header();
            request.headers_mut().insert(X_REQUEST_ID, id.clone());
            id
        }
    };
    let observation = Observation::start(
        route,
        id.to_str().unwrap_or(""),
        request.method().as_str(),
        request.uri().path(),
    );
    let mut response = handler(request).instrument(observation.span()).await;
    response.headers_mut().insert(X_REQUEST_ID, id);
    observation.finish(response.status().as_u16());
    response
}

/// One request as logs and metrics see it, from its head to its response head: a span, the
/// in-flight gauge, then the request metrics and the access log line.
struct Observation {
    route: &'static str,
    started: Instant,
    span: tracing::Span,
    _in_flight: metrics::InFlight,
}

impl Observation {
    fn start(route: &'static str, id: &str, method: &str, path: &str) -> Self {
        // The span's fields are only formatted when info logging is on.
        let span = tracing::info_span!("request", id, method, path, route);
        Self {
            route,
            started: Instant::now(),
            span,
            _in_flight: metrics::InFlight::start(),
        }
    }

    fn started(&self) -> Instant {
        self.started
    }

    fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    fn finish(self, status: u16) {
        let elapsed = self.started.elapsed();
        metrics::request(self.route, status, elapsed);
        self.span.in_scope(|| {
            tracing::info!(
                status,
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                "response"
            );
        });
    }
}

/// A request id: the client's `X-Request-Id`, or for a request that came without one a random
/// per-process prefix and a counter, unique across replicas without a random-number system call
/// per request (as a UUID v4 costs).
enum RequestId<'a> {
    Client(&'a [u8]),
    Made { text: [u8; 33], len: usize },
}

impl<'a> From<&'a [u8]> for RequestId<'a> {
    fn from(client: &'a [u8]) -> Self {
        RequestId::Client(client)
    }
}

impl RequestId<'static> {
    fn new() -> Self {
        static PREFIX: LazyLock<String> =
            LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // `{prefix}-{n:08x}`, written by hand: this runs for most requests.
        let mut text = [0u8; 33];
        text[..16].copy_from_slice(&PREFIX.as_bytes()[..16]);
        text[16] = b'-';
        let digits = (16 - n.leading_zeros() as usize / 4).max(8);
        for (i, slot) in text[17..17 + digits].iter_mut().enumerate() {
            let nibble = (n >> (4 * (digits - 1 - i))) & 0xf;
            *slot = b"0123456789abcdef"[nibble as usize];
        }
        RequestId::Made {
            text,
            len: 17 + digits,
        }
    }

    fn to_header(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).expect("hex digits are a valid header")
    }
}

impl RequestId<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::Client(id) => id,
            RequestId::Made { text, len } => &text[..*len],
        }
    }

    /// As text for logs; empty when the client's is not visible ASCII.
    fn as_str(&self) -> &str {
        Some(self.as_bytes())
            .filter(|id| crate::proxy::headers::is_visible_text(id))
            .and_then(|id| std::str::from_utf8(id).ok())
            .unwrap_or("")
    }
}

#[cfg(test)]
mod request_id_tests {
    #[test]
    fn request_ids_are_a_prefix_and_at_least_eight_hex_digits() {
        let a = super::RequestId::new().to_header();
        let b = super::RequestId::new().to_header();
        let (prefix, n) = a.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(prefix.len(), 16);
        assert!(
            n.len() >= 8 && n.bytes().all(|c| c.is_ascii_hexdigit()),
            "{a:?}"
        );
        assert_ne!(a, b);
        let next = u64::from_str_radix(b.to_str().unwrap().split_once('-').unwrap().1, 16);
        assert!(next.unwrap() > u64::from_str_radix(n, 16).unwrap());
    }
}
