//! The passthrough fast path's wire level: a bodiless HTTP/1.1 request, already parsed from the
//! client's connection, is written to a plain-TCP upstream connection as bytes and the answer
//! copied back as bytes, its framing (RFC 9112 §6) followed to know where it ends. What the client
//! gets is what the general path (hyper's client and server) gives it for the same answer:
//! `tests/integration/differential.rs` holds the two to it.
//!
//! The same header rules as [`super::forward`] apply (hop-by-hop removal, RFC 9110 §7.6.1;
//! `X-Forwarded-*`; `Location` rebasing; the request id), on header slices instead of a
//! `HeaderMap`: no per-request allocation beyond the response buffers, and no connection task on
//! either side. Anything this path does not handle (request bodies, `Expect`, `Upgrade`, HTTP/1.0,
//! unusual targets) is left to the general path, which the caller chooses before calling here
//! ([`ClientHead::parse`] returns `None`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

use super::headers::{
    BodyEnd, Name, ResponseFraming, is_visible_text, public_base, put_date, put_header, rebase,
    write_ip,
};
use super::pool::IdleStack;
use super::{Bases, ClientContext, ProxyError};
use crate::config::Config;

/// Headers a request or response may have on this path.
pub const MAX_HEADERS: usize = 100;
/// Largest response head read from the upstream: as hyper's client (its read buffer's default
/// limit, 8 KiB + 400 KiB), so that both paths take the same heads.
const MAX_RESPONSE_HEAD: usize = 8 * 1024 + 400 * 1024;
/// Read buffer kept with each upstream connection; enough for a small response in one read.
const UPSTREAM_BUFFER: usize = 8 * 1024;
/// Buffer for copying larger bodies.
const COPY_BUFFER: usize = 64 * 1024;

/// A client's request head that the fast path can forward: HTTP/1.1, a method without a body, an
/// origin-form target, no body framing, no `Expect` or `Upgrade`, a `Connection` header naming
/// nothing but `close` / `keep-alive`, at most one `Host` and `X-Forwarded-For`.
pub struct ClientHead<'a> {
    pub method: &'a str,
    /// Path and query, as received.
    pub target: &'a str,
    headers: &'a [httparse::Header<'a>],
    host: Option<&'a [u8]>,
    forwarded_for: Option<&'a [u8]>,
    forwarded_proto: Option<&'a [u8]>,
    forwarded_host: Option<&'a [u8]>,
    /// The client's `X-Request-Id`, if it sent one.
    pub request_id: Option<&'a [u8]>,
    /// The client asked to close the connection after this response.
    pub close: bool,
    /// It has a `Content-Length` (of 0).
    has_length: bool,
}

impl<'a> ClientHead<'a> {
    /// The head, if this path can forward it; `None` leaves the request to the general path.
    pub fn parse(request: &'a httparse::Request<'_, 'a>) -> Option<Self> {
        if request.version != Some(1) {
            return None;
        }
        let method = request.method?;
        if !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
            return None;
        }
        let target = request.path?;
        if !target.starts_with('/') || !target.bytes().all(is_target_byte) {
            return None;
        }
        let mut head = Self {
            method,
            target,
            headers: request.headers,
            host: None,
            forwarded_for: None,
            forwarded_proto: None,
            forwarded_host: None,
            request_id: None,
            close: false,
            has_length: false,
        };
        for header in request.headers.iter() {
            let value = header.value;
            match Name::of(header.name) {
                // hyper forwards one of two `Content-Length: 0`: such heads are left to it.
                Name::ContentLength if value != b"0" || head.has_length => return None,
                Name::ContentLength => head.has_length = true,
                Name::TransferEncoding | Name::Expect | Name::Upgrade => return None,
                Name::Connection => {
                    for token in tokens(value) {
                        if token.eq_ignore_ascii_case(b"close") {
                            head.close = true;
                        } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                            return None;
                        }
                    }
                }
                Name::Host if head.host.replace(value).is_some() => return None,
                Name::ForwardedFor if head.forwarded_for.replace(value).is_some() => return None,
                Name::ForwardedProto => {
                    head.forwarded_proto.get_or_insert(value);
                }
                Name::ForwardedHost => {
                    head.forwarded_host.get_or_insert(value);
                }
                Name::RequestId => {
                    head.request_id.get_or_insert(value);
                }
                _ => {}
            }
        }
        Some(head)
    }

    /// The target's path, without the query.
    pub fn path(&self) -> &'a str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The client's `Accept` header (the first), for an error of the proxy's own: looked up only
    /// then.
    pub fn accept(&self) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("accept"))
            .map(|h| h.value)
    }

    fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// Room for the headers of one head, left uninitialised until httparse fills it.
pub type HeaderSlots<'b> = [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS];

/// An empty `HeaderSlots`.
pub fn header_slots<'b>() -> HeaderSlots<'b> {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Bytes the fast path forwards in a request target: RFC 3986 unreserved, sub-delims, `:@/?%`.
/// Anything else (including what hyper's URI parser would reject) goes the general way.
fn is_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
                | b'?'
                | b'%'
        )
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A request as the fast path forwards it.
pub struct Asked<'a> {
    pub head: &'a ClientHead<'a>,
    /// The client's `X-Request-Id` or the one made for it.
    pub request_id: &'a [u8],
    pub context: &'a ClientContext<'a>,
}

/// Buffers one client connection reuses for every request: the upstream request, the client's
/// response head (and the start of its body).
#[derive(Default)]
pub struct Scratch {
    request: Vec<u8>,
    response: Vec<u8>,
}

/// How the client's request was answered.
pub struct Answered {
    pub status: u16,
    /// The client's connection can carry another request.
    pub keep_alive: bool,
}

/// A plain-TCP connection to the upstream and what was read from it but not yet used.
struct Connection {
    stream: TcpStream,
    buffer: BytesMut,
}

/// The upstream as the fast path sees it: where it is and how to talk to it. Each lane serves it
/// with an [`H1Upstream`] of its own ([`Self::lane`]).
pub struct H1Target {
    /// `host:port` to connect to.
    address: String,
    /// The `Host` header sent upstream.
    host: String,
    bases: Bases,
    pool_max_idle: usize,
    pool_idle_timeout: Duration,
    /// Which large bodies go through a pipe ([`super::splice`]).
    #[cfg(target_os = "linux")]
    splice: crate::config::Splice,
    connect_timeout: Duration,
    timeout: Duration,
}

impl H1Target {
    /// The fast path to `url` (the upstream URL), or `None` when the upstream needs TLS.
    pub(super) fn new(url: &Url, bases: Bases, config: &Config) -> Option<Self> {
        if url.scheme() != "http" {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Some(Self {
            // IPv6 literals keep their brackets: `[::1]:8080` parses as a socket address.
            address: format!("{host}:{port}"),
            host: authority,
            bases,
            pool_max_idle: config.upstream.pool_max_idle_per_host,
            pool_idle_timeout: Duration::from_secs(config.upstream.pool_idle_timeout_secs),
            #[cfg(target_os = "linux")]
            splice: config.server.splice,
            connect_timeout: config.connect_timeout(),
            timeout: config.request_timeout(),
        })
    }

    /// An [`H1Upstream`] for one of the server's lanes (`server::Lanes`), with a pool and buffers
    /// of its own: a connection is only ever used on the thread, and by the runtime, that made it.
    pub fn lane(self: &Arc<Self>) -> H1Upstream {
        H1Upstream {
            target: self.clone(),
            idle: IdleStack::new(self.pool_max_idle, self.pool_idle_timeout),
            buffers: Buffers::default(),
            #[cfg(target_os = "linux")]
            splice: super::splice::Policy::new(self.splice),
        }
    }
}

/// One lane's side of the upstream ([`H1Target::lane`]): its pool of raw connections, its copy
/// buffers and its count of large bodies.
pub struct H1Upstream {
    target: Arc<H1Target>,
    idle: Arc<IdleStack<Connection>>,
    buffers: Buffers,
    #[cfg(target_os = "linux")]
    splice: super::splice::Policy,
}

impl H1Upstream {
    /// Forwards `head` and copies the answer to `client`. An error means nothing was written to
    /// the client (it gets a 502 or 504 from the caller); once the answer has started, failures
    /// end with the client's connection closed, as the general path does.
    pub async fn exchange(
        &self,
        asked: &Asked<'_>,
        client: &mut TcpStream,
        scratch: &mut Scratch,
        started: Instant,
    ) -> Result<Answered, ProxyError> {
        scratch.request.clear();
        self.write_request(asked, &mut scratch.request);
        let sent = self
            .send(&scratch.request, asked, &mut scratch.response)
            .await;
        super::record_upstream("passthrough", &sent, started);
        let (connection, answer) = sent?;
        let out = &mut scratch.response;
        let (connection, copied) = self
            .copy_body(connection, answer.framing, client, out)
            .await;
        let keep_alive = match copied {
            Ok(()) => {
                if let Some(connection) =
                    connection.filter(|c| answer.upstream_keep_alive && c.buffer.is_empty())
                {
                    self.idle.push(connection);
                }
                !answer.close_after
            }
            Err(error) => {
                tracing::debug!(error = %error, "passthrough response cut short");
                false
            }
        };
        Ok(Answered {
            status: answer.status,
            keep_alive,
        })
    }

    /// The upstream request: request line with the mapped target, the client's end-to-end
    /// headers, the upstream's `Host`, `X-Forwarded-*` and the request id.
    fn write_request(&self, asked: &Asked<'_>, out: &mut Vec<u8>) {
        let Asked {
            head,
            request_id,
            context,
        } = asked;
        out.extend_from_slice(head.method.as_bytes());
        out.push(b' ');
        if self.target.bases.same_paths() {
            out.extend_from_slice(head.target.as_bytes());
        } else {
            out.extend_from_slice(self.target.bases.map_path_and_query(head.target).as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.target.host.as_bytes());
        out.extend_from_slice(b"\r\n");
        // `Connection` names no other headers here ([`ClientHead::parse`]).
        for header in head.headers {
            let name = Name::of(header.name);
            if !(name.is_hop_by_hop() || name == Name::Host || name == Name::ForwardedFor) {
                put_header(out, header.name.as_bytes(), header.value);
            }
        }
        match (context.addr, head.forwarded_for) {
            (Some(ip), chain) => {
                out.extend_from_slice(b"x-forwarded-for: ");
                // An ingress's chain is extended; one that is empty or not text is replaced.
                if let Some(chain) =
                    chain.filter(|c| is_visible_text(c) && !c.trim_ascii().is_empty())
                {
                    out.extend_from_slice(chain);
                    out.extend_from_slice(b", ");
                }
                write_ip(out, ip);
                out.extend_from_slice(b"\r\n");
            }
            (None, Some(chain)) => put_header(out, b"x-forwarded-for", chain),
            (None, None) => {}
        }
        if head.forwarded_proto.is_none() {
            put_header(out, b"x-forwarded-proto", context.scheme.as_bytes());
        }
        if let (None, Some(host)) = (head.forwarded_host, head.host) {
            put_header(out, b"x-forwarded-host", host);
        }
        if head.request_id.is_none() {
            put_header(out, b"x-request-id", request_id);
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Writes the request on a pooled connection (or a new one) and reads the response head. A
    /// pooled connection that the upstream closed before answering is replaced once: the methods
    /// on this path are idempotent (RFC 9110 §9.2.2), so sending again is allowed.
    async fn send(
        &self,
        request: &[u8],
        asked: &Asked<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(Connection, ResponseHead), ProxyError> {
        debug_assert!(matches!(
            asked.head.method,
            "GET" | "HEAD" | "DELETE" | "OPTIONS"
        ));
        if let Some(mut connection) = self.checkout() {
            match self.round_trip(&mut connection, request, asked, out).await {
                Ok(answer) => return Ok((connection, answer)),
                Err(Failure::Closed) => {}
                Err(Failure::Error(error)) => return Err(error),
            }
        }
        let mut connection = self.connect().await?;
        match self.round_trip(&mut connection, request, asked, out).await {
            Ok(answer) => Ok((connection, answer)),
            Err(Failure::Closed) => Err(ProxyError::Protocol(
                "the upstream closed the connection without answering".into(),
            )),
            Err(Failure::Error(error)) => Err(error),
        }
    }

    /// An idle connection the upstream has not closed, as far as the socket can tell (a close it
    /// has not reported yet is caught by [`Self::send`]'s retry). Readable while idle means closed,
    /// or bytes nobody asked for, unless the readiness is stale: one non-blocking read tells.
    fn checkout(&self) -> Option<Connection> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while let Some(connection) = self.idle.pop() {
            if connection.stream.poll_read_ready(&mut cx).is_pending() {
                return Some(connection);
            }
            if let Err(e) = connection.stream.try_read(&mut [0u8; 1])
                && e.kind() == std::io::ErrorKind::WouldBlock
            {
                return Some(connection);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Connection, ProxyError> {
        let connecting = TcpStream::connect(self.target.address.as_str());
        let stream = match tokio::time::timeout(self.target.connect_timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(ProxyError::Unreachable(format!(
                    "{}: {e}",
                    self.target.address
                )));
            }
            Err(_) => {
                return Err(ProxyError::Unreachable(format!(
                    "{}: connect timed out after {} ms",
                    self.target.address,
                    self.target.connect_timeout.as_millis()
                )));
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            buffer: BytesMut::with_capacity(UPSTREAM_BUFFER),
        })
    }

    /// Sends the request and reads the answer's head; the client's head is then in `out` and the
    /// connection's buffer holds what followed it.
    async fn round_trip(
        &self,
        connection: &mut Connection,
        request: &[u8],
        asked: &Asked<'_>,
        out: &mut Vec<u8>,
    ) -> Result<ResponseHead, Failure> {
        if let Err(e) = connection.stream.write_all(request).await {
            return Err(if is_reset(&e) {
                Failure::Closed
            } else {
                Failure::Error(ProxyError::Protocol(e.to_string()))
            });
        }
        out.clear();
        let timeout = self.target.timeout;
        match tokio::time::timeout(timeout, self.read_head(connection, asked, out)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Error(ProxyError::Timeout(
                timeout.as_millis() as u64
            ))),
        }
    }

    /// Reads until a final (non-1xx) response head has arrived, parses it once and writes the
    /// client's ([`write_response_head`]); 1xx heads are dropped, as hyper's client does.
    async fn read_head(
        &self,
        connection: &mut Connection,
        asked: &Asked<'_>,
        out: &mut Vec<u8>,
    ) -> Result<ResponseHead, Failure> {
        enum Parsed {
            Partial,
            Interim(usize),
            Final(usize, ResponseHead),
        }
        let mut answered = false;
        loop {
            let parsed = if connection.buffer.is_empty() {
                Parsed::Partial
            } else {
                let mut slots = header_slots();
                let mut response = httparse::Response::new(&mut []);
                let invalid = |why: String| {
                    Failure::Error(ProxyError::Protocol(format!(
                        "invalid response head: {why}"
                    )))
                };
                match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                    &mut response,
                    &connection.buffer,
                    &mut slots,
                ) {
                    Ok(httparse::Status::Complete(length)) => match response.code {
                        // Not asked for: no request on this path carries `Upgrade`.
                        Some(101) => return Err(invalid("an unasked protocol switch".into())),
                        Some(100..=199) => Parsed::Interim(length),
                        _ => Parsed::Final(
                            length,
                            write_response_head(&response, asked, self, out)
                                .map_err(Failure::Error)?,
                        ),
                    },
                    Ok(httparse::Status::Partial)
                        if connection.buffer.len() < MAX_RESPONSE_HEAD =>
                    {
                        Parsed::Partial
                    }
                    Ok(httparse::Status::Partial) => return Err(invalid("too large".into())),
                    Err(e) => return Err(invalid(e.to_string())),
                }
            };
            match parsed {
                Parsed::Final(length, head) => {
                    connection.buffer.advance(length);
                    return Ok(head);
                }
                Parsed::Interim(length) => {
                    connection.buffer.advance(length);
                    answered = true;
                    continue;
                }
                Parsed::Partial => {}
            }
            connection.buffer.reserve(UPSTREAM_BUFFER / 2);
            match connection.stream.read_buf(&mut connection.buffer).await {
                Ok(0) if !answered && connection.buffer.is_empty() => return Err(Failure::Closed),
                Ok(0) => {
                    return Err(Failure::Error(ProxyError::Protocol(
                        "the upstream closed the connection in the response head".into(),
                    )));
                }
                Ok(_) => answered = true,
                Err(e) if !answered && connection.buffer.is_empty() && is_reset(&e) => {
                    return Err(Failure::Closed);
                }
                Err(e) => return Err(Failure::Error(ProxyError::Protocol(e.to_string()))),
            }
        }
    }
}

/// Why a round trip failed: the connection was closed before any answer (worth one retry on a
/// new connection), or something else.
enum Failure {
    Closed,
    Error(ProxyError),
}

fn is_reset(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
    )
}

struct ResponseHead {
    status: u16,
    framing: BodyEnd,
    upstream_keep_alive: bool,
    /// The client's connection closes after this response.
    close_after: bool,
}

/// Parses the upstream's response head and writes the client's, as the general path's hyper
/// server would write it for the same answer (the differential test holds them to it):
/// end-to-end headers kept, hop-by-hop ones dropped (and those the upstream's `Connection` names),
/// `Location` and `Content-Location` rebased, the request id echoed, `Date` added if missing, the
/// framing decided by [`ResponseFraming`] and written anew (`Content-Length` as a number; a body
/// delimited by the upstream's close is chunked for the client).
fn write_response_head(
    response: &httparse::Response<'_, '_>,
    asked: &Asked<'_>,
    upstream: &H1Upstream,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, ProxyError> {
    let invalid = |why: &str| ProxyError::Protocol(format!("invalid response head: {why}"));
    let Asked {
        head: request,
        request_id,
        context,
    } = asked;
    let status = response.code.unwrap_or(0);
    let http10 = response.version != Some(1);
    let mut framing = ResponseFraming::default();
    let mut upstream_close = http10;
    let mut named: Vec<&[u8]> = Vec::new();
    let mut has_date = false;
    for header in response.headers.iter() {
        let name = Name::of(header.name);
        match name {
            Name::TransferEncoding | Name::ContentLength => framing.add(name, header.value),
            Name::Connection => {
                for token in tokens(header.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        upstream_close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        named.push(token);
                    }
                }
            }
            Name::Date => has_date = true,
            _ => {}
        }
    }
    let (framing, length) = framing
        .decide(status, request.is_head(), http10)
        .map_err(invalid)?;
    let close_after = request.close;

    // The reason phrase as hyper's client keeps it: httparse's (empty when it is not UTF-8).
    put_status_line(out, status, Some(response.reason.unwrap_or_default()));
    let mut public: Option<String> = None;
    for header in response.headers.iter() {
        let name = header.name;
        let kind = Name::of(name);
        if kind.is_hop_by_hop()
            || kind == Name::RequestId
            || kind == Name::ContentLength
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        if kind == Name::Location
            && let Some(rebased) = std::str::from_utf8(header.value)
                .ok()
                .filter(|v| is_visible_text(v.as_bytes()))
                .and_then(|value| {
                    let public = public.get_or_insert_with(|| request.public_base(context));
                    rebase(value, &upstream.target.bases.url, public)
                })
                .filter(|v| is_visible_text(v.as_bytes()))
        {
            put_header(out, name.as_bytes(), rebased.as_bytes());
            continue;
        }
        put_header(out, name.as_bytes(), header.value);
    }
    put_header(out, b"x-request-id", request_id);
    if !has_date {
        put_date(out);
    }
    if matches!(framing, BodyEnd::Chunked | BodyEnd::Close) {
        put_header(out, b"transfer-encoding", b"chunked");
    } else if let Some(length) = length {
        // `Length(0)` included: hyper's server says an empty body's length too.
        let mut digits = itoa_buffer();
        put_header(out, b"content-length", format_u64(&mut digits, length));
    }
    if close_after {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ResponseHead {
        status,
        framing,
        upstream_keep_alive: !upstream_close && framing != BodyEnd::Close,
        close_after,
    })
}

/// Room for a `u64` in decimal.
fn itoa_buffer() -> [u8; 20] {
    [0; 20]
}

/// `n` in decimal, written at the end of `buffer`.
fn format_u64(buffer: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buffer[at..];
        }
    }
}

impl ClientHead<'_> {
    /// The proxy's public base as this client sees it ([`public_base`]).
    fn public_base(&self, context: &ClientContext<'_>) -> String {
        fn text(value: &[u8]) -> Option<&str> {
            std::str::from_utf8(value)
                .ok()
                .filter(|v| is_visible_text(v.as_bytes()))
        }
        public_base(
            context.configured_public_base,
            self.forwarded_proto.and_then(text),
            self.forwarded_host.or(self.host).and_then(text),
            context.scheme,
            context.base_path,
        )
    }
}

impl H1Upstream {
    /// Copies the body that follows the response head (`out` holds the head) to the client. `Ok`
    /// means the whole body was copied; anything left in the connection's buffer is not part of it.
    /// The connection comes back unless a copying task failed.
    async fn copy_body(
        &self,
        mut connection: Connection,
        framing: BodyEnd,
        client: &mut TcpStream,
        out: &mut Vec<u8>,
    ) -> (Option<Connection>, std::io::Result<()>) {
        let length = match framing {
            BodyEnd::Empty => return (Some(connection), client.write_all(out).await),
            BodyEnd::Chunked => {
                let copied = copy_chunked(&mut connection, client, out).await;
                return (Some(connection), copied);
            }
            BodyEnd::Close => {
                let copied = copy_until_close(&mut connection, client, out).await;
                return (Some(connection), copied);
            }
            BodyEnd::Length(length) => {
                let buffered = (connection.buffer.len() as u64).min(length) as usize;
                out.extend_from_slice(&connection.buffer[..buffered]);
                connection.buffer.advance(buffered);
                Some(length - buffered as u64)
            }
        };
        if let Err(e) = client.write_all(out).await {
            return (Some(connection), Err(e));
        }
        match length {
            Some(0) => (Some(connection), Ok(())),
            Some(length) if length <= PIPELINE_ABOVE => {
                let copied = copy_raw(&mut connection, length, client).await;
                (Some(connection), copied)
            }
            _ => {
                #[cfg(target_os = "linux")]
                let (_streaming, splice) = self.splice.start();
                #[cfg(target_os = "linux")]
                if splice {
                    match super::splice::Pipe::new() {
                        Ok(pipe) => {
                            let moved = pipe.forward(&connection.stream, length, client).await;
                            return (Some(connection), moved);
                        }
                        // Out of file descriptors, say: copied instead.
                        Err(e) => tracing::debug!(error = %e, "no pipe for splice(2): copying"),
                    }
                }
                copy_pipelined(connection, length, client, &self.buffers).await
            }
        }
    }
}

/// Copies a chunked body ([`Chunks`]); `out` holds the response head, not yet sent.
async fn copy_chunked<W: AsyncWrite + Unpin>(
    connection: &mut Connection,
    client: &mut W,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut chunks = Chunks::default();
    let mut unsent_head = out.len();
    loop {
        match chunks.scan(&connection.buffer, out) {
            Ok((used, done)) => {
                connection.buffer.advance(used);
                if done {
                    return client.write_all(out).await;
                }
            }
            Err(e) => return Err(give_up(e, client, out, unsent_head).await),
        }
        match read_more(connection, client, out, &mut unsent_head).await {
            Ok(true) => {}
            Ok(false) => {
                let eof = std::io::ErrorKind::UnexpectedEof.into();
                return Err(give_up(eof, client, out, unsent_head).await);
            }
            Err(e) => return Err(give_up(e, client, out, unsent_head).await),
        }
    }
}

/// Copies a body that ends when the upstream closes the connection, in chunks for the client (as
/// hyper's server sends a body of unknown length), so that the client's connection can go on.
async fn copy_until_close<W: AsyncWrite + Unpin>(
    connection: &mut Connection,
    client: &mut W,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let mut unsent_head = out.len();
    loop {
        if !connection.buffer.is_empty() {
            let mut digits = [0u8; 16];
            out.extend_from_slice(hex(&mut digits, connection.buffer.len() as u64));
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&connection.buffer);
            out.extend_from_slice(b"\r\n");
            connection.buffer.clear();
        }
        match read_more(connection, client, out, &mut unsent_head).await {
            Ok(true) => {}
            Ok(false) => {
                out.extend_from_slice(b"0\r\n\r\n");
                return client.write_all(out).await;
            }
            Err(e) => return Err(give_up(e, client, out, unsent_head).await),
        }
    }
}

/// Reads more of a body into the connection's buffer; `false` when the upstream has closed.
/// `out` (owed to the client) is written first when the read would wait, or has grown large:
/// as hyper's server flushes when the body makes it wait, so a client sees the same bytes on
/// both paths when the body fails before anything of it could be sent.
async fn read_more<W: AsyncWrite + Unpin>(
    connection: &mut Connection,
    client: &mut W,
    out: &mut Vec<u8>,
    unsent_head: &mut usize,
) -> std::io::Result<bool> {
    connection.buffer.reserve(UPSTREAM_BUFFER);
    if out.len() < COPY_BUFFER {
        match connection.stream.try_read_buf(&mut connection.buffer) {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if !out.is_empty() {
        client.write_all(out).await?;
        out.clear();
        *unsent_head = 0;
    }
    Ok(connection.stream.read_buf(&mut connection.buffer).await? > 0)
}

/// Ends a body that failed: what was decoded of it is sent (the response head with it, if it
/// was not yet), a head alone is not, as from hyper's server; then the connection closes.
async fn give_up<W: AsyncWrite + Unpin>(
    error: std::io::Error,
    client: &mut W,
    out: &[u8],
    unsent_head: usize,
) -> std::io::Error {
    if out.len() > unsent_head {
        let _ = client.write_all(out).await;
    }
    error
}

/// Bodies with a length longer than this are spliced on Linux
/// when `server.splice` says so ([`super::splice`]); otherwise they are copied by two tasks,
/// one reading from the upstream while the other writes to the client. Both run on the
/// connection's lane, so they take turns on its thread: the reader keeps taking from the upstream
/// while the writer waits for the client (what a lone 10 MiB body adds: README and
/// bench/RESULTS-cubic.md).
const PIPELINE_ABOVE: u64 = 512 * 1024;
/// Size of each buffer the two tasks pass between them. Two of them take turns, so the bytes
/// written to the client are still in the CPU cache from being read; a fresh buffer per read
/// (which the allocator maps and unmaps each time) cost markedly more CPU on the 10 MiB
/// passthrough benchmark, and 128 or 512 KiB buffers were slower than 256 KiB.
const PIPELINE_CHUNK: usize = 256 * 1024;
/// Buffers in turn between the two tasks.
const PIPELINE_DEPTH: usize = 2;
/// Pipeline buffers kept for later bodies (2 MiB), so that a large body does not start by
/// faulting in fresh pages.
const PIPELINE_KEEP: usize = 8;

/// Buffers for [`copy_pipelined`], reused from one body to the next.
#[derive(Default)]
struct Buffers(Mutex<Vec<Box<[u8]>>>);

impl Buffers {
    fn take(&self) -> Box<[u8]> {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
        kept.unwrap_or_else(|| vec![0; PIPELINE_CHUNK].into_boxed_slice())
    }

    fn give(&self, buffer: Box<[u8]>) {
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() < PIPELINE_KEEP {
            kept.push(buffer);
        }
    }
}

/// [`copy_raw`] with the reading in a task of its own. The buffers go round: the reader fills an
/// empty one and passes it on, the writer empties it and passes it back.
async fn copy_pipelined<W: AsyncWrite + Unpin>(
    mut connection: Connection,
    length: Option<u64>,
    client: &mut W,
    buffers: &Buffers,
) -> (Option<Connection>, std::io::Result<()>) {
    let (full, mut filled) = tokio::sync::mpsc::channel::<(Box<[u8]>, usize)>(PIPELINE_DEPTH);
    let (empty, mut emptied) = tokio::sync::mpsc::channel::<Box<[u8]>>(PIPELINE_DEPTH);
    for _ in 0..PIPELINE_DEPTH {
        let _ = empty.try_send(buffers.take());
    }
    let reader = tokio::spawn(async move {
        let mut remaining = length.unwrap_or(u64::MAX);
        let read = async {
            while remaining > 0 {
                let Some(mut buffer) = emptied.recv().await else {
                    return Err(std::io::Error::other("the client went away"));
                };
                let wanted = remaining.min(buffer.len() as u64) as usize;
                // Never past the end of the body: the connection can be reused.
                let n = connection.stream.read(&mut buffer[..wanted]).await?;
                if n == 0 {
                    return match length {
                        None => Ok(()),
                        Some(_) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                    };
                }
                remaining -= n as u64;
                if full.send((buffer, n)).await.is_err() {
                    return Err(std::io::Error::other("the client went away"));
                }
            }
            Ok(())
        }
        .await;
        (connection, read, emptied)
    });
    let mut written = Ok(());
    while let Some((buffer, n)) = filled.recv().await {
        if let Err(e) = client.write_all(&buffer[..n]).await {
            written = Err(e);
            break;
        }
        let _ = empty.send(buffer).await;
    }
    // A reader still sending learns that nobody will take its buffers.
    drop(filled);
    drop(empty);
    match reader.await {
        Ok((connection, read, mut emptied)) => {
            while let Ok(buffer) = emptied.try_recv() {
                buffers.give(buffer);
            }
            (Some(connection), written.and(read))
        }
        Err(e) => (None, Err(std::io::Error::other(e))),
    }
}

/// Copies `length` bytes from the upstream to the client, through the connection's buffer; bytes
/// read past the end stay in it.
async fn copy_raw<W: AsyncWrite + Unpin>(
    connection: &mut Connection,
    length: u64,
    client: &mut W,
) -> std::io::Result<()> {
    let mut remaining = length;
    while remaining > 0 {
        connection.buffer.clear();
        connection
            .buffer
            .reserve(remaining.min(COPY_BUFFER as u64) as usize);
        let n = connection.stream.read_buf(&mut connection.buffer).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let body = (n as u64).min(remaining) as usize;
        client.write_all(&connection.buffer[..body]).await?;
        connection.buffer.advance(body);
        remaining -= body as u64;
    }
    Ok(())
}

/// A chunked body being read (RFC 9112 §7.1), byte for byte as hyper's client decodes one (its
/// `ChunkedState`, with the same limits: 16 KiB of chunk extensions in all, 16 KiB and 100 fields
/// of trailers), so that both paths accept and refuse the same bodies. The client gets the data
/// in chunks of the proxy's own making, without extensions or trailer fields, as from hyper's
/// server.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
    /// Size of the chunk being read, then what is left of it.
    size: u64,
    /// Chunk-extension bytes so far.
    extensions: u64,
    /// The trailer section, when there is one.
    trailers: Option<Vec<u8>>,
    trailer_count: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Body,
    BodyCr,
    BodyLf,
    Trailer,
    TrailerLf,
    EndCr,
    EndLf,
}

/// hyper's limits on a chunked body ([`Chunks`]).
const CHUNK_EXTENSIONS_LIMIT: u64 = 16 * 1024;
const TRAILERS_LIMIT: usize = 16 * 1024;
const TRAILERS_MAX: usize = 100;

impl Chunks {
    /// Consumes what it can of `input`, appending what the client gets to `out`; returns the
    /// bytes used and whether the body has ended. After an error, `out` holds what was decoded
    /// before it.
    fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<(usize, bool)> {
        use ChunkState::*;
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
        let mut at = 0;
        while at < input.len() {
            if self.state == Body {
                let take = (input.len() - at).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                let mut digits = [0u8; 16];
                out.extend_from_slice(hex(&mut digits, take as u64));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&input[at..at + take]);
                out.extend_from_slice(b"\r\n");
                at += take;
                self.size -= take as u64;
                if self.size == 0 {
                    self.state = BodyCr;
                }
                continue;
            }
            let byte = input[at];
            at += 1;
            self.state = match (self.state, byte) {
                (Start | Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (byte as char).to_digit(16).unwrap_or(0);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|n| n.checked_add(u64::from(digit)))
                        .ok_or_else(|| bad("invalid chunk size: overflow"))?;
                    Size
                }
                (Start, _) => return Err(bad("invalid chunk size line: missing size digit")),
                (Size | SizeLws, b'\t' | b' ') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Size, _) => return Err(bad("invalid chunk size line")),
                (SizeLws, _) => return Err(bad("invalid chunk size linear white space")),
                (Extension, b'\n') => return Err(bad("chunk extension contains a newline")),
                (Extension, _) => {
                    self.extensions += 1;
                    if self.extensions >= CHUNK_EXTENSIONS_LIMIT {
                        return Err(bad("chunk extensions over limit"));
                    }
                    Extension
                }
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Body,
                (SizeLf, _) => return Err(bad("invalid chunk size LF")),
                (BodyCr, b'\r') => BodyLf,
                (BodyCr, _) => return Err(bad("invalid chunk body CR")),
                (BodyLf, b'\n') => Start,
                (BodyLf, _) => return Err(bad("invalid chunk body LF")),
                (Trailer, _) => {
                    self.push_trailer(byte)?;
                    if byte == b'\r' { TrailerLf } else { Trailer }
                }
                (TrailerLf, b'\n') => {
                    if self.trailer_count >= TRAILERS_MAX {
                        return Err(bad("too many trailer fields"));
                    }
                    self.trailer_count += 1;
                    self.push_trailer(byte)?;
                    EndCr
                }
                (TrailerLf, _) => return Err(bad("invalid trailer end LF")),
                (EndCr, b'\r') => {
                    if self.trailers.is_some() {
                        self.push_trailer(byte)?;
                    }
                    EndLf
                }
                (EndCr, _) => {
                    match &mut self.trailers {
                        None => self.trailers = Some(vec![byte]),
                        Some(_) => self.push_trailer(byte)?,
                    }
                    Trailer
                }
                (EndLf, b'\n') => {
                    if self.trailers.is_some() {
                        self.push_trailer(byte)?;
                    }
                    if let Some(trailers) = self.trailers.take() {
                        check_trailers(&trailers, self.trailer_count)?;
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                    return Ok((at, true));
                }
                (EndLf, _) => return Err(bad("invalid chunk end LF")),
                (Body, _) => unreachable!("handled above"),
            };
        }
        Ok((at, false))
    }

    fn push_trailer(&mut self, byte: u8) -> std::io::Result<()> {
        let trailers = self.trailers.get_or_insert_with(Vec::new);
        trailers.push(byte);
        if trailers.len() >= TRAILERS_LIMIT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "chunk trailers over limit",
            ));
        }
        Ok(())
    }
}

/// Whether a trailer section (dropped, but read) is one hyper's client accepts.
fn check_trailers(trailers: &[u8], count: usize) -> std::io::Result<()> {
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "invalid trailers");
    let mut fields = vec![httparse::EMPTY_HEADER; count];
    match httparse::parse_headers(trailers, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for field in fields {
                axum::http::HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| invalid())?;
                axum::http::HeaderValue::from_bytes(field.value).map_err(|_| invalid())?;
            }
            Ok(())
        }
        _ => Err(invalid()),
    }
}

/// `n` in hexadecimal (upper case, as hyper writes chunk sizes), at the end of `buffer`.
fn hex(buffer: &mut [u8; 16], mut n: u64) -> &[u8] {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b"0123456789ABCDEF"[(n % 16) as usize];
        n /= 16;
        if n == 0 {
            return &buffer[at..];
        }
    }
}

/// Appends `HTTP/1.1 {status} {reason}` and its line end: the given reason phrase (even an empty
/// one, as hyper's server writes it), or the status's canonical one when none is given.
pub fn put_status_line(out: &mut Vec<u8>, status: u16, reason: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    // Three digits: httparse and `StatusCode` accept no others.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    let reason = match reason {
        Some(reason) => reason,
        None => axum::http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or(""),
    };
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` fed in two pieces split at `split`: what the client gets, what is left after
    /// the body, and whether it ended.
    fn scan_split(body: &[u8], split: usize) -> std::io::Result<(Vec<u8>, Vec<u8>, bool)> {
        let mut chunks = Chunks::default();
        let mut out = Vec::new();
        let mut buffer = Vec::new();
        let mut pieces = [&body[..split], &body[split..]].into_iter();
        for piece in pieces.by_ref() {
            buffer.extend_from_slice(piece);
            let (used, ended) = chunks.scan(&buffer, &mut out)?;
            buffer.drain(..used);
            if ended {
                buffer.extend(pieces.flatten());
                return Ok((out, buffer, true));
            }
        }
        Ok((out, buffer, false))
    }

    /// The data of canonical chunks.
    fn data(mut chunked: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        while let Some(end) = chunked.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&chunked[..end]).unwrap(), 16);
            let size = size.unwrap();
            data.extend_from_slice(&chunked[end + 2..end + 2 + size]);
            chunked = &chunked[end + 4 + size..];
        }
        data
    }

    #[test]
    fn chunked_bodies_end_at_the_last_chunk_however_they_are_split() {
        let body: &[u8] = b"5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\nNEXT";
        for split in 1..body.len() {
            let (out, rest, ended) = scan_split(body, split).unwrap();
            assert!(ended, "split at {split}");
            // Extensions and trailer fields are not forwarded; the data is, in chunks of its own.
            assert!(out.ends_with(b"\r\n0\r\n\r\n"), "split at {split}");
            assert_eq!(data(&out), b"hello0123456789", "split at {split}");
            assert_eq!(rest, b"NEXT", "split at {split}");
        }
    }

    #[test]
    fn malformed_chunks_are_refused_as_hyper_refuses_them() {
        let long_extension = format!("1;{}\r\na\r\n0\r\n\r\n", "x".repeat(16 * 1024));
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "x".repeat(16 * 1024));
        for body in [
            &b"zz\r\n"[..],
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5;a\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\n\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nX-A: 1\nX-B: 2\r\n\r\n",
            long_extension.as_bytes(),
            long_trailer.as_bytes(),
        ] {
            let result = Chunks::default().scan(body, &mut Vec::new());
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(body));
        }
        // What hyper accepts: white space after the size, extensions, valid trailers.
        for body in [
            &b"5 \r\nhello\r\n0\r\n\r\n"[..],
            b"5;a=\"b c\"\r\nhello\r\n0;z\r\n\r\n",
            b"0\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
        ] {
            let result = Chunks::default().scan(body, &mut Vec::new());
            assert!(
                matches!(result, Ok((_, true))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
