//! The passthrough fast path's connection loop, for plain-HTTP listeners in front of a plain-HTTP
//! upstream: request heads are read and parsed here (httparse, as hyper does), and the ones
//! [`ClientHead::parse`] accepts and `super::is_passthrough` sends upstream are forwarded by
//! [`crate::proxy::H1Upstream::exchange`], byte for byte.
//!
//! The first request it does not take (a body, `Expect`, HTTP/1.0 or /2, one of the proxy's own
//! endpoints, a malformed head) hands the connection, with every byte read and not yet answered,
//! to the general path ([`Rewind`] replays them to hyper), which serves the rest of it. Both paths
//! observe requests the same way (`super::Observation`).
//!
//! Every read from the client has a deadline, as on the general path (`server::limits`): the first
//! request head is due `server.request_head_timeout_secs` after the connection's start; after an
//! answer the connection may stay idle for `server.keep_alive_timeout_secs`, and once part of a
//! head has arrived the rest is due a head timeout later. Past it the connection is closed without
//! an answer, as nginx does. The deadline is a value set at most twice per request (an
//! `Instant::now()` after each answer, one more only for a head that arrives in pieces); the one
//! timer of the connection is only moved to it when it fires early.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Observation, RequestId, error::ApiError, is_passthrough};
use crate::app::App;
use crate::config::ClientTimeouts;
use crate::proxy::headers::{put_date, put_header};
use crate::proxy::{
    Asked, ClientContext, ClientHead, H1Upstream, Scratch, header_slots, put_status_line,
};

/// Largest request head this path reads before leaving the request to hyper (which answers 431
/// beyond its own limit).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Read buffer of a client connection.
const CLIENT_BUFFER: usize = 4 * 1024;

/// Whether connections to `app` start on the fast path.
pub fn applies(app: &App) -> bool {
    app.upstream.h1().is_some() && super::gate::is_open(app)
}

/// Serves requests from `stream` until the client closes it, `stop` is cancelled between
/// requests, or a request needs the general path: then the connection is returned with the bytes
/// read from it and not yet answered.
pub async fn serve(
    app: &App,
    upstream: &H1Upstream,
    mut stream: TcpStream,
    peer: SocketAddr,
    stop: &CancellationToken,
) -> Option<Rewind> {
    let context = app.client_context(Some(peer));
    let timeouts = app.config.client_timeouts();
    let mut buffer = BytesMut::with_capacity(CLIENT_BUFFER);
    let mut scratch = Scratch::default();
    let mut stopped = pin!(stop.cancelled());
    let mut due = Due::Head(Instant::now() + timeouts.head);
    let mut timer = pin!(tokio::time::sleep_until(due.at()));
    loop {
        // The next request's head, parsed once it has all arrived (pipelined requests may already
        // be in the buffer).
        let served = if buffer.is_empty() {
            None
        } else {
            let mut slots = header_slots();
            let mut request = httparse::Request::new(&mut []);
            match request.parse_with_uninit_headers(&buffer, &mut slots) {
                Ok(httparse::Status::Complete(length)) => {
                    let head =
                        ClientHead::parse(&request).filter(|head| is_passthrough(app, head.path()));
                    match head {
                        Some(head) => {
                            let keep_alive =
                                serve_one(upstream, &head, &context, &mut stream, &mut scratch)
                                    .await;
                            Some((length, keep_alive))
                        }
                        None => return Some(Rewind::new(stream, buffer, due.head(timeouts))),
                    }
                }
                Ok(httparse::Status::Partial) if buffer.len() < MAX_REQUEST_HEAD => {
                    due = Due::Head(due.head(timeouts));
                    None
                }
                // Too large for this path, or malformed: hyper answers what it makes of it
                // (a 431 or 400, or it serves it).
                _ => return Some(Rewind::new(stream, buffer, due.head(timeouts))),
            }
        };
        if let Some((length, keep_alive)) = served {
            if !keep_alive {
                return None;
            }
            buffer.advance(length);
            due = Due::Idle(Instant::now() + timeouts.idle);
            continue;
        }
        if buffer.capacity() - buffer.len() < CLIENT_BUFFER / 4 {
            buffer.reserve(CLIENT_BUFFER);
        }
        let read = tokio::select! {
            biased;
            () = &mut stopped, if buffer.is_empty() => return None,
            read = stream.read_buf(&mut buffer) => read,
            () = &mut timer => {
                if Instant::now() >= due.at() {
                    tracing::debug!(%peer, waited_for = due.what(), "client too slow: connection closed");
                    return None;
                }
                // Set for an earlier deadline: move it to this one.
                timer.as_mut().reset(due.at());
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// What the connection is waiting for, and until when.
#[derive(Clone, Copy)]
enum Due {
    /// The rest of a request head (or the first request's).
    Head(Instant),
    /// The next request on a keep-alive connection.
    Idle(Instant),
}

impl Due {
    fn at(self) -> Instant {
        match self {
            Due::Head(at) | Due::Idle(at) => at,
        }
    }

    /// When the head that is arriving is due: its first bytes are here.
    fn head(self, timeouts: ClientTimeouts) -> Instant {
        match self {
            Due::Head(at) => at,
            Due::Idle(_) => Instant::now() + timeouts.head,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Due::Head(_) => "request head",
            Due::Idle(_) => "next request",
        }
    }
}

/// Forwards one request and answers the client, observed like any other; returns whether the
/// connection can carry another request.
async fn serve_one(
    upstream: &H1Upstream,
    head: &ClientHead<'_>,
    context: &ClientContext<'_>,
    stream: &mut TcpStream,
    scratch: &mut Scratch,
) -> bool {
    let id = match head.request_id {
        Some(id) => RequestId::from(id),
        None => RequestId::new(),
    };
    let observation = Observation::start("passthrough", id.as_str(), head.method, head.path());
    let asked = Asked {
        head,
        request_id: id.as_bytes(),
        context,
    };
    let exchange = upstream.exchange(&asked, stream, scratch, observation.started());
    let (status, keep_alive) = match exchange.instrument(observation.span()).await {
        Ok(answered) => (answered.status, answered.keep_alive),
        Err(error) => {
            // In the request's span: turning the error into a response logs it.
            let mut response = observation
                .span()
                .in_scope(|| ApiError::from(error).into_response());
            let accept = head.accept().and_then(|v| HeaderValue::from_bytes(v).ok());
            super::error::honour_accept(accept.as_ref(), &mut response);
            let status = response.status().as_u16();
            let mut out = Vec::new();
            write_response(response, id.as_bytes(), head.close, &mut out).await;
            let written = stream.write_all(&out).await.is_ok();
            (status, written && !head.close)
        }
    };
    observation.finish(status);
    keep_alive
}

/// Serialises one of the proxy's own (small, complete) responses: a 502 or 504 here.
async fn write_response(response: Response, request_id: &[u8], close: bool, out: &mut Vec<u8>) {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    put_status_line(out, parts.status.as_u16(), None);
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "x-request-id" | "date"
        ) {
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    put_header(out, b"x-request-id", request_id);
    put_header(out, b"content-length", body.len().to_string().as_bytes());
    put_date(out);
    if close {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
}

/// A client connection handed to the general path: the bytes already read from it come first.
pub struct Rewind {
    read: Bytes,
    stream: TcpStream,
    head_deadline: Instant,
}

impl Rewind {
    fn new(stream: TcpStream, read: BytesMut, head_deadline: Instant) -> Self {
        Self {
            read: read.freeze(),
            stream,
            head_deadline,
        }
    }

    /// When the request head whose bytes were read is due (by then it has usually all arrived).
    pub fn head_deadline(&self) -> Instant {
        self.head_deadline
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
