//! The upstream client: one connection pool (HTTP/1.1, plain or rustls with `[upstream.tls]`'s
//! client configuration; [`super::pool`]) shared by passthrough and by the proxy's own upstream
//! calls (metadata, readiness).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, Response, Uri, Version, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::Notify;
use url::Url;

use super::h1::H1Target;
use super::headers::{
    ResponseFraming, add_forwarded, public_base, rewrite_locations, strip_hop_by_hop,
};
use super::pool::{Pool, SendError};
use super::{Bases, ClientContext, ProxyError};
use crate::config::Config;
use crate::telemetry::error_chain;

/// The upstream FHIR server.
pub struct Upstream {
    pool: Pool,
    bases: Bases,
    timeout: Duration,
    /// The HTTP/1.1 fast path's side of the upstream: plain-HTTP upstreams, when enabled.
    h1: Option<Arc<H1Target>>,
}

impl Upstream {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let base: Url = config.upstream_url()?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout()));
        http.set_nodelay(true);
        let tls = crate::upstream_auth::tls::client_config(&config.upstream.tls)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.as_ref().clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let upstream_path = base.path().trim_end_matches('/').to_owned();
        let origin = base.origin().ascii_serialization();
        let pool = Pool::new(
            https,
            origin.parse()?,
            config.upstream.pool_max_idle_per_host,
            Duration::from_secs(config.upstream.pool_idle_timeout_secs),
        )?;
        let bases = Bases {
            url: format!("{origin}{upstream_path}"),
            upstream_path,
            proxy_path: config.base_path(),
        };
        let h1 = config
            .server
            .http1_fast_path
            .then(|| H1Target::new(&base, bases.clone(), config))
            .flatten()
            .map(Arc::new);
        Ok(Self {
            h1,
            pool,
            bases,
            timeout: config.request_timeout(),
        })
    }

    /// The fast path for bodiless HTTP/1.1 passthrough requests (`super::h1`), if it applies.
    pub fn h1(&self) -> Option<&Arc<H1Target>> {
        self.h1.as_ref()
    }

    /// The upstream's FHIR base URL (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.bases.url
    }

    /// Maps a path-and-query received by the proxy onto the upstream's (origin form, as sent on the
    /// request line): the proxy's base path is replaced by the upstream's; anything outside it goes
    /// to the same path on the upstream. The rest of the path and the query are kept byte for byte.
    pub fn map_path_and_query(&self, path_and_query: &str) -> String {
        self.bases.map_path_and_query(path_and_query)
    }

    /// Forwards a client's request and streams the response back.
    pub async fn forward(
        &self,
        mut request: Request<Body>,
        context: &ClientContext<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let uri = match request.uri().path_and_query() {
            // The usual deployment serves the upstream's own base path: the request line is
            // forwarded as it came, without building and re-parsing it.
            Some(pq) if self.bases.same_paths() => Uri::from(pq.clone()),
            pq => self.uri(pq.map_or("/", |pq| pq.as_str()))?,
        };
        let authority = request.uri().authority().cloned();
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let headers = request.headers_mut();
        strip_hop_by_hop(headers);
        // The pool sets Host to the upstream's, as a plain reverse proxy does; the client's goes
        // on as X-Forwarded-Host. HTTP/2 clients send the authority in the URI instead.
        let host = headers
            .remove(header::HOST)
            .or_else(|| authority.and_then(|a| a.as_str().parse().ok()));
        let (proto, host) = add_forwarded(headers, context.addr, context.scheme, host);

        let head = request.method() == Method::HEAD;
        let response = self.send("passthrough", request).await?;
        let (mut parts, body) = response.into_parts();
        // The fast path frames answers by the same rules (`h1::write_response_head`).
        ResponseFraming::settle(
            parts.status.as_u16(),
            head,
            parts.version,
            &mut parts.headers,
        )
        .map_err(|why| ProxyError::Protocol(format!("invalid response head: {why}")))?;
        // The proxy's own version goes to the client (RFC 9110 §6.2), not the upstream's
        // (hyper's server writes the response's; it answers an HTTP/1.0 client in HTTP/1.0).
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        rewrite_locations(&mut parts.headers, &self.bases.url, || {
            public_base(
                context.configured_public_base,
                proto.to_str().ok(),
                host.as_ref().and_then(|h| h.to_str().ok()),
                context.scheme,
                context.base_path,
            )
        });
        Ok(Response::from_parts(parts, body))
    }

    /// GETs `path_and_query` (relative to the upstream base, e.g. `/metadata`) and reads the whole
    /// body, up to `limit` bytes. For the proxy's own small requests, never for passthrough.
    pub async fn get_small(
        &self,
        route: &'static str,
        path: &str,
        headers: HeaderMap,
        limit: usize,
    ) -> Result<(axum::http::response::Parts, Bytes), ProxyError> {
        let uri = self.uri_of(&format!("{}{path}", self.bases.upstream_path))?;
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(Body::empty())
            .map_err(|e| ProxyError::Protocol(e.to_string()))?;
        *request.headers_mut() = headers;
        let response = self.send(route, request).await?;
        let (parts, body) = response.into_parts();
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::TooLarge(limit)
                } else {
                    ProxyError::Protocol(e.to_string())
                }
            })?
            .to_bytes();
        Ok((parts, bytes))
    }

    /// Sends one request. The timeout covers the wait for response headers once the request body
    /// has been sent: a long upload is not cut short, a silent upstream is.
    pub async fn send(
        &self,
        route: &'static str,
        request: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let started = Instant::now();
        let timeout = self.timeout;
        let timed_out = || ProxyError::Timeout(timeout.as_millis() as u64);
        let outcome = if request.body().is_end_stream() {
            // Nothing to upload (GET, HEAD, DELETE): the wait for the answer starts now.
            match tokio::time::timeout(timeout, self.pool.send(request)).await {
                Ok(result) => result.map_err(ProxyError::from),
                Err(_) => Err(timed_out()),
            }
        } else {
            let (parts, body) = request.into_parts();
            let sent = Arc::new(Notify::new());
            let body = Body::new(SignalEnd {
                inner: body,
                signal: EndSignal(sent.clone()),
            });
            let deadline = async {
                sent.notified().await;
                tokio::time::sleep(timeout).await;
            };
            // Boxed, as the rarer case: the future of the common one stays small.
            Box::pin(async {
                tokio::select! {
                    result = self.pool.send(Request::from_parts(parts, body)) => result.map_err(ProxyError::from),
                    () = deadline => Err(timed_out()),
                }
            })
            .await
        };
        super::record_upstream(route, &outcome, started);
        outcome
    }

    fn uri(&self, path_and_query: &str) -> Result<Uri, ProxyError> {
        self.uri_of(&self.map_path_and_query(path_and_query))
    }

    fn uri_of(&self, url: &str) -> Result<Uri, ProxyError> {
        url.parse().map_err(|e| {
            ProxyError::Protocol(format!("cannot build the upstream URL {url:?}: {e}"))
        })
    }
}

impl From<SendError> for ProxyError {
    fn from(error: SendError) -> Self {
        match error {
            SendError::Connect(reason) => ProxyError::Unreachable(reason),
            // The client's request body failed (a bad chunk, an early close): hyper's client
            // reports it as an error of the body it was given.
            SendError::Request(e) if e.is_user() => ProxyError::ClientBody(error_chain(&e)),
            SendError::Request(e) => ProxyError::Protocol(error_chain(&e)),
        }
    }
}

/// Notifies when the request body has been sent (or dropped).
struct EndSignal(Arc<Notify>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

pin_project_lite::pin_project! {
    /// A request body that notifies once it has been sent completely.
    struct SignalEnd {
        #[pin]
        inner: Body,
        signal: EndSignal,
    }
}

impl HttpBody for SignalEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.signal.0.notify_one();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let ended = self.inner.is_end_stream();
        if ended {
            // hyper stops polling a body that says it has ended.
            self.signal.0.notify_one();
        }
        ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    fn upstream(url: &str, base_path: Option<&str>) -> Upstream {
        let mut result = None;
        Jail::expect_with(|jail| {
            jail.set_env("BULK_PROXY_UPSTREAM__URL", url);
            if let Some(base) = base_path {
                jail.set_env("BULK_PROXY_SERVER__BASE_PATH", base);
            }
            let config = Config::load(None).map_err(|e| e.to_string())?;
            result = Some(Upstream::new(&config).map_err(|e| e.to_string())?);
            Ok(())
        });
        result.unwrap()
    }

    #[test]
    fn same_base_path_maps_to_itself() {
        let up = upstream("http://fhir:8080/fhir", None);
        assert_eq!(
            up.map_path_and_query("/fhir/Patient/1/_history?_count=2&_count=3"),
            "/fhir/Patient/1/_history?_count=2&_count=3"
        );
        assert_eq!(up.map_path_and_query("/fhir"), "/fhir");
        assert_eq!(up.map_path_and_query("/fhirx/a?b"), "/fhirx/a?b");
    }

    #[test]
    fn different_base_paths_are_translated() {
        let up = upstream("http://fhir:8080/api/r4/", Some("/"));
        assert_eq!(
            up.map_path_and_query("/Patient?name=a%20b"),
            "/api/r4/Patient?name=a%20b"
        );
        let up = upstream("http://fhir:8080", Some("/fhir"));
        assert_eq!(up.map_path_and_query("/fhir/Patient"), "/Patient");
        assert_eq!(up.map_path_and_query("/fhir"), "/");
        assert_eq!(
            up.map_path_and_query("/fhir?_format=json"),
            "/?_format=json"
        );
    }
}
