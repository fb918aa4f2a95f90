//! HTTP endpoints: one file per endpoint, the router, and the error boundary ([`error::ApiError`]).
//!
//! The proxy answers the routes of [`crate::routes`] itself (the router is built from that table);
//! everything else is passthrough, through the one [`gate`] (bodiless HTTP/1.1 requests through
//! [`fast`] where the gate has nothing to check). Every request gets an `X-Request-Id` (the client's, or a new one: see
//! `RequestId`), forwarded upstream and echoed in the response, a tracing span, and a line in the
//! request metrics.

pub mod error;
mod export;
mod extract;
pub mod fast;
mod files;
pub mod gate;
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
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use tower::ServiceExt;
use tracing::Instrument;

use crate::app::AppState;
use crate::routes::Endpoint;
use crate::telemetry::metrics;
use error::ApiError;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every connection serves: passthrough requests go straight through the gate to the
/// upstream; the proxy's own endpoints ([`crate::routes`]) go through the router. Both are observed
/// the same way (`observe`).
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
        let request = request.map(Body::new);
        // Errors of the proxy's own are sent as the request's Accept prefers: the one place.
        let accept = request.headers().get(axum::http::header::ACCEPT).cloned();
        let mut response = self.answer(request, peer).await;
        error::honour_accept(accept.as_ref(), &mut response);
        response
    }

    async fn answer(&self, mut request: Request, peer: SocketAddr) -> Response {
        if let Err(why) = crate::proxy::headers::check_request_head(request.headers()) {
            return ApiError::BadRequest(why.into()).into_response();
        }
        if is_passthrough(&self.app, request.uri().path()) {
            let app = &self.app;
            return observe("passthrough", request, |request| async move {
                gate::passthrough(app, request, Some(peer))
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

/// Whether `path` is passthrough: no route of the proxy's own owns it ([`crate::routes`]).
pub(crate) fn is_passthrough(app: &crate::app::App, path: &str) -> bool {
    !app.routes.owns(path)
}

/// Builds the router from the route table: each mounted route gets the handlers of its methods
/// and 405 for any other method; paths no route owns go through the gate.
fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for mounted in state.routes.iter() {
        let mut methods = MethodRouter::new();
        for method in mounted.route.methods {
            if let Some(handler) = handler(mounted.route.endpoint, method) {
                methods = methods.merge(handler);
            }
        }
        let allowed = mounted.route.methods;
        router = router.route(
            &mounted.path,
            methods.fallback(move || async move { ApiError::MethodNotAllowed(allowed) }),
        );
    }
    router
        .fallback(gate::forward)
        .layer(middleware::from_fn_with_state(state.clone(), observe_route))
        .with_state(state)
}

/// The handler of `endpoint` for `method` (the `GET` handler serves `HEAD` too).
fn handler(endpoint: Endpoint, method: &Method) -> Option<MethodRouter<AppState>> {
    use Endpoint as E;
    let handler = match (endpoint, method.as_str()) {
        (E::Healthz, "GET") => get(ops::healthz),
        (E::Readyz, "GET") => get(ops::readyz),
        (E::Metrics, "GET") => get(ops::metrics),
        (E::Metadata, "GET") => get(metadata::get),
        (E::SystemExport, "GET") => get(export::system),
        (E::SystemExport, "POST") => post(export::system),
        (E::PatientExport, "GET") => get(export::patient),
        (E::PatientExport, "POST") => post(export::patient),
        (E::GroupExport, "GET") => get(export::group),
        (E::GroupExport, "POST") => post(export::group),
        (E::Status, "GET") => get(status::get),
        (E::Status, "DELETE") => delete(status::delete),
        (E::File, "GET") => get(files::get),
        (E::Token, "POST") => post(token::post),
        (E::SmartConfiguration, "GET") => get(smart::configuration),
        (E::Authorize, "GET") => get(smart::authorize),
        (E::Authorize, "POST") => post(smart::authorize),
        _ => return None,
    };
    Some(handler)
}

#[cfg(test)]
mod route_table_tests {
    use super::*;
    use crate::routes::ROUTES;

    #[test]
    fn every_method_of_every_route_has_a_handler() {
        for route in ROUTES {
            for method in route.methods {
                assert!(
                    *method == Method::HEAD || handler(route.endpoint, method).is_some(),
                    "{:?} {method}",
                    route.endpoint
                );
            }
        }
    }
}

/// The router's middleware: [`observe`] with the route class of the matched route.
async fn observe_route(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let route = app
        .routes
        .find(request.uri().path())
        .map_or("passthrough", |mounted| mounted.route.class);
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
        let span = tracing::info_span!("request", request_id = %id, method = %method, path = %path, route = %route);
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
