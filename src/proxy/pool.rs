//! The upstream connection pool: HTTP/1.1 connections (plain or rustls) made with hyper's
//! connection API and kept in a LIFO stack of idle senders.
//!
//! A connection goes back to the stack when its response body has been read to the end (so the
//! next request on it never waits behind a body still streaming), and is dropped when the body is
//! abandoned, when the upstream closes it, or when it sat idle past `upstream.pool_idle_timeout_secs`.
//! Compared with hyper-util's general-purpose client this does no per-request pool-key hashing and
//! spawns no task per request to watch for the connection becoming idle: on the passthrough
//! benchmark that was a third of the proxy's own CPU time per small request.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, Uri, header};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

/// How long a pooled connection may take to become ready before another is used.
const READY_WAIT: Duration = Duration::from_millis(50);

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, DNS, TLS handshake, connect timeout).
    Connect(String),
    /// The connection failed while the request was sent or the response head read.
    Request(hyper::Error),
}

/// A pool of HTTP/1.1 connections to one upstream origin.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream, what every connection is made to.
    origin: Uri,
    /// The `Host` header sent upstream.
    host: axum::http::HeaderValue,
    idle: Arc<IdleStack<SendRequest<Body>>>,
}

/// Idle connections, most recently used on top: LIFO keeps the few busy connections warm and lets
/// the rest age out. Shared by the hyper pool here and the fast path's raw connections.
pub(super) struct IdleStack<T> {
    idle: Mutex<Vec<Idle<T>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Starts the task that closes expired connections, with the first one returned.
    reaper: std::sync::Once,
}

struct Idle<T> {
    connection: T,
    since: Instant,
}

impl<T: Send + 'static> IdleStack<T> {
    /// A stack of at most `max_idle` connections, each closed after `idle_timeout` unused; a task
    /// closes expired ones even when no request comes to notice. That task starts with the first
    /// connection returned, on the runtime that returns it (a stack never used costs nothing).
    pub(super) fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            reaper: std::sync::Once::new(),
        })
    }

    fn start_reaper(self: &Arc<Self>) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(self);
            let every = (self.idle_timeout / 2).max(Duration::from_secs(1));
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(stack) = weak.upgrade() else { return };
                    stack.drop_expired(&mut stack.lock());
                }
            });
        }
    }

    /// The most recently returned connection that has not expired.
    pub(super) fn pop(&self) -> Option<T> {
        let mut idle = self.lock();
        while let Some(top) = idle.pop() {
            if !top.expired(self.idle_timeout) {
                return Some(top.connection);
            }
        }
        None
    }

    pub(super) fn push(self: &Arc<Self>, connection: T) {
        self.reaper.call_once(|| self.start_reaper());
        let mut idle = self.lock();
        self.drop_expired(&mut idle);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                connection,
                since: Instant::now(),
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle<T>>> {
        // The stack stays consistent even if a holder panicked: every operation is one push/pop.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Closes the connections idle for longer than the timeout (at the bottom of the stack).
    fn drop_expired(&self, idle: &mut Vec<Idle<T>>) {
        let expired = idle
            .iter()
            .take_while(|i| i.expired(self.idle_timeout))
            .count();
        idle.drain(..expired);
    }
}

impl<T> Idle<T> {
    fn expired(&self, idle_timeout: Duration) -> bool {
        self.since.elapsed() > idle_timeout
    }
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let authority = origin
            .authority()
            .ok_or_else(|| anyhow::anyhow!("the upstream URL {origin} has no host"))?;
        let host = authority.as_str().parse()?;
        let inner = Arc::new(Inner {
            connector,
            origin,
            host,
            idle: IdleStack::new(max_idle, idle_timeout),
        });
        Ok(Self { inner })
    }

    /// Sends `request` (its URI in origin form: path and query) on a pooled or new connection.
    /// The response body hands the connection back to the pool when it has been read to the end.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Body>, SendError> {
        request
            .headers_mut()
            .insert(header::HOST, self.inner.host.clone());
        let (mut sender, pooled) = match self.checkout().await {
            Some(sender) => (sender, true),
            // Boxed: connecting (DNS, TCP, TLS) is a large future, rarely needed; inline, every
            // request's future would carry (and move) its size.
            None => (Box::pin(self.connect()).await?, false),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // The upstream closed an idle connection as it was taken (its keep-alive timeout):
                // the request was not sent, so it goes once more, on a new connection.
                Some(request) if pooled => {
                    sender = Box::pin(self.connect()).await?;
                    sender
                        .send_request(request)
                        .await
                        .map_err(SendError::Request)?
                }
                _ => return Err(SendError::Request(failed.into_error())),
            },
        };
        // An HTTP/1.0 upstream's connection is not reused (hyper would send it the next
        // requests in HTTP/1.0), as the fast path does not reuse it.
        let sender = (response.version() != axum::http::Version::HTTP_10).then_some(sender);
        Ok(response.map(|body| Body::new(PooledBody::new(body, sender, self.inner.clone()))))
    }

    /// The most recently used idle connection that is still open and ready.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let mut sender = self.inner.idle.pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // A connection returned at the end of its response body may not have been marked
            // ready by its connection task yet: that takes a moment, or fails if the upstream
            // closed it. One still sending a request body (the upstream answered before the upload
            // ended) is left to finish on its own rather than waited for.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let mut connector = self.inner.connector.clone();
        let io = connector
            .call(self.inner.origin.clone())
            .await
            .map_err(|e| SendError::Connect(crate::telemetry::error_chain(e.as_ref())))?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(crate::telemetry::error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection closed with an error");
            }
        });
        Ok(sender)
    }
}

impl Inner {
    fn checkin(&self, sender: SendRequest<Body>) {
        if !sender.is_closed() {
            self.idle.push(sender);
        }
    }
}

/// A response body that returns its connection to the pool once read to the end. Dropped before
/// the end, it drops the connection instead (hyper then closes it).
struct PooledBody {
    inner: Incoming,
    sender: Option<SendRequest<Body>>,
    pool: Arc<Inner>,
}

impl PooledBody {
    fn new(inner: Incoming, sender: Option<SendRequest<Body>>, pool: Arc<Inner>) -> Self {
        let mut body = Self {
            inner,
            sender,
            pool,
        };
        // HEAD, 204 and 304 answers have no body, and nobody may ever poll it.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
