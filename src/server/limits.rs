//! Client deadlines on the general path (hyper), in nginx's terms: a connection's first request
//! head must arrive within `server.request_head_timeout_secs` of its start (TLS handshake and
//! hyper's protocol detection included), a later one within that time of its first byte; an idle
//! keep-alive connection closes after `server.keep_alive_timeout_secs`; a request body that sends
//! nothing for `server.request_body_timeout_secs` is answered 408. The fast path keeps the same
//! deadlines itself (`http::fast`) and hands the one it is counting down over to [`ClientIo`].
//!
//! Why not hyper's own `header_read_timeout`: its timer starts when hyper begins to wait for the
//! next head, that is as soon as the previous response is written, so it bounds the idle wait and
//! the head together (a 75 s keep-alive and a 30 s head timeout cannot both hold), and it covers
//! neither the TLS handshake, nor the protocol detection of `auto::Builder`, nor HTTP/2.
//!
//! Here the connection's reader ([`ClientIo`]) keeps the deadline, and the service tells it when
//! requests are in flight ([`InFlight`], held until the response body is done): while one is, no
//! deadline applies to the connection (its request body has [`BodyDeadline`]); once none is, the
//! keep-alive deadline does; the first byte read then switches to the head deadline. An HTTP/2
//! connection counts as idle whenever no stream is open, and any frame then starts the head
//! deadline: at worst it closes after the keep-alive and the head timeout together.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::config::ClientTimeouts;

/// What one connection's reader and its requests share.
pub struct Watch {
    timeouts: ClientTimeouts,
    opened: Instant,
    /// Requests whose response is not done yet.
    in_flight: AtomicUsize,
    /// When the last request in flight ended: nanoseconds since `opened` plus one; 0 once the
    /// reader has taken it.
    went_idle: AtomicU64,
    /// The reader, when it waits without a deadline for requests in flight: woken when the last
    /// ends, so that the keep-alive deadline starts.
    reader: AtomicWaker,
}

impl Watch {
    pub fn new(timeouts: ClientTimeouts) -> Arc<Self> {
        Arc::new(Self {
            timeouts,
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            went_idle: AtomicU64::new(0),
            reader: AtomicWaker::new(),
        })
    }

    pub fn timeouts(&self) -> ClientTimeouts {
        self.timeouts
    }

    /// A request has arrived; it is in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// `body` with the request body deadline, and the flag it raises when it fires.
    pub fn body<B>(&self, body: B) -> (BodyDeadline<B>, Stalled) {
        let stalled = Stalled::default();
        let body = BodyDeadline {
            inner: body,
            timeout: self.timeouts.body,
            sleep: None,
            waiting: false,
            stalled: stalled.clone(),
        };
        (body, stalled)
    }
}

/// A request in flight: see [`Watch::request`].
pub struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let watch = &self.0;
        // Before the count falls, so that a reader that sees none in flight finds the time.
        let since = watch.opened.elapsed().as_nanos() as u64;
        watch
            .went_idle
            .store(since.saturating_add(1), Ordering::SeqCst);
        if watch.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            watch.reader.wake();
        }
    }
}

/// What a connection's reader is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// A request head, which must be complete by then.
    Head(Instant),
    /// The first byte of the next request, by then.
    Idle(Instant),
}

/// A client connection's byte stream with the head and keep-alive deadlines: a read that would
/// wait past the deadline fails with `TimedOut`, and hyper closes the connection.
pub struct ClientIo<S> {
    inner: S,
    watch: Arc<Watch>,
    waiting: Waiting,
    /// Made at the first wait, then reset: one timer per connection.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S> ClientIo<S> {
    /// `inner`, whose next request head is due by `head_deadline`.
    pub fn new(inner: S, watch: Arc<Watch>, head_deadline: Instant) -> Self {
        Self {
            inner,
            watch,
            waiting: Waiting::Head(head_deadline),
            sleep: None,
        }
    }

    /// Whether a request is in flight; if none is, takes note of when the last one ended.
    fn busy(&mut self) -> bool {
        if self.watch.in_flight.load(Ordering::SeqCst) > 0 {
            return true;
        }
        let went_idle = self.watch.went_idle.swap(0, Ordering::SeqCst);
        if went_idle > 0 {
            let at = self.watch.opened + std::time::Duration::from_nanos(went_idle - 1);
            self.waiting = Waiting::Idle(at + self.watch.timeouts.idle);
        }
        false
    }

    /// Bytes arrived: the first byte of a head starts the head deadline.
    fn on_bytes(&mut self) {
        if !self.busy()
            && let Waiting::Idle(_) = self.waiting
        {
            self.waiting = Waiting::Head(Instant::now() + self.watch.timeouts.head);
        }
    }

    /// The read would wait: fails once the deadline has passed, else arms the timer.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.busy() {
            self.watch.reader.register(cx.waker());
            // The last request may have ended in between.
            if self.busy() {
                return Poll::Pending;
            }
        }
        let (deadline, what) = match self.waiting {
            Waiting::Head(at) => (at, "request head"),
            Waiting::Idle(at) => (at, "next request on an idle connection"),
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client sent no {what} in time"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.on_bytes();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raised when a request body's deadline fired.
#[derive(Clone, Default)]
pub struct Stalled(Arc<AtomicBool>);

impl Stalled {
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A request body that fails when the client sends nothing more for the body timeout; the wait
/// counts only while the body is being read, so a slow upstream is not the client's fault.
pub struct BodyDeadline<B> {
    inner: B,
    timeout: std::time::Duration,
    /// Made at the first wait only: a body that arrives with its head costs no timer.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the current wait.
    waiting: bool,
    stalled: Stalled,
}

#[derive(Debug, thiserror::Error)]
#[error("the client sent no part of the request body for {0} s")]
pub struct BodyTimedOut(u64);

impl<B> Body for BodyDeadline<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + this.timeout;
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        slot => *slot = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                if let Some(sleep) = &mut this.sleep
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    this.stalled.0.store(true, Ordering::SeqCst);
                    let error = BodyTimedOut(this.timeout.as_secs());
                    return Poll::Ready(Some(Err(error.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds its request's [`InFlight`] until it is done (or dropped).
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
