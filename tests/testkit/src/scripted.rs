//! A raw-TCP upstream that answers with scripted bytes (framings, and mistakes, that a hyper-based
//! fake cannot produce) and records every request exactly as it arrived.
//!
//! A script maps each request to the [`Part`]s of its answer: bytes, a pause until a
//! [`tokio::sync::Notify`] fires, or the connection closed. Requests are read by their own framing
//! (`Content-Length` or chunked), so a body is never mistaken for the next request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The head, CRLF CRLF included, byte for byte.
    pub head: Vec<u8>,
    /// The body as it came (still chunked, if it was).
    pub body: Vec<u8>,
}

impl Received {
    /// The request target.
    pub fn path(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        head.split(' ').nth(1).unwrap_or_default().to_owned()
    }
}

/// A piece of a scripted answer.
#[derive(Clone)]
pub enum Part {
    Bytes(Vec<u8>),
    /// Waits until the notify fires.
    Wait(Arc<tokio::sync::Notify>),
    /// Closes the connection (nothing after it is sent).
    Close,
}

impl Part {
    pub fn text(text: &str) -> Self {
        Part::Bytes(text.as_bytes().to_vec())
    }
}

type Script = dyn Fn(&Received) -> Vec<Part> + Send + Sync;

/// The upstream; stops accepting when dropped.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    /// Connections holding part of a request (a head or body not read to its end).
    partial: AtomicUsize,
}

impl ScriptedUpstream {
    /// Answers each request with `script(request)`.
    pub async fn start(script: impl Fn(&Received) -> Vec<Part> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let script: Arc<Script> = Arc::new(script);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, script.clone(), shared.clone()));
            }
        });
        Self {
            addr,
            connections,
            state,
            accept,
        }
    }

    /// `http://ADDR/fhir`.
    pub fn url(&self) -> String {
        format!("http://{}/fhir", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Takes the requests received so far, once no connection is in the middle of one (each
    /// connection either waits for its next request or has closed); waits at most `within`.
    pub async fn take_received(&self, within: std::time::Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + within;
        while self.state.partial.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        std::mem::take(&mut *self.state.received.lock().unwrap())
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Marks a connection as holding a partial request while alive.
struct Partial<'a>(&'a AtomicUsize);

impl<'a> Partial<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(mut stream: TcpStream, script: Arc<Script>, state: Arc<State>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer, &state.partial).await else {
            return;
        };
        state.received.lock().unwrap().push(request.clone());
        for part in script(&request) {
            match part {
                Part::Bytes(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                Part::Wait(notify) => notify.notified().await,
                Part::Close => return,
            }
        }
    }
}

/// The next request on the connection, or `None` once it has closed (or sent something that
/// cannot be a request).
async fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    partial: &AtomicUsize,
) -> Option<Received> {
    let mut _partial = None;
    let mut read = async |buffer: &mut Vec<u8>| {
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    let head_end = loop {
        if let Some(i) = find(buffer, b"\r\n\r\n") {
            break i + 4;
        }
        if !buffer.is_empty() {
            _partial.get_or_insert_with(|| Partial::new(partial));
        }
        if !read(buffer).await {
            return None;
        }
        _partial.get_or_insert_with(|| Partial::new(partial));
    };
    let head: Vec<u8> = buffer.drain(..head_end).collect();
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let header = |name: &str| {
        text.split("\r\n")
            .filter_map(|line| line.split_once(':'))
            .find(|(n, _)| n.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let end = if header("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        // The proxy writes chunks canonically: the last chunk, then no trailers.
        Body::Chunked
    } else {
        Body::Length(
            header("content-length")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0),
        )
    };
    loop {
        let done = match end {
            Body::Length(n) => (buffer.len() >= n).then_some(n),
            Body::Chunked => chunked_end(buffer),
        };
        if let Some(n) = done {
            return Some(Received {
                head,
                body: buffer.drain(..n).collect(),
            });
        }
        if !read(buffer).await {
            return None;
        }
    }
}

enum Body {
    Length(usize),
    Chunked,
}

/// Where a chunked body ends in `buffer`, if it has arrived whole.
fn chunked_end(buffer: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line = find(&buffer[at..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&buffer[at..at + line]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at += line + 2;
        if size == 0 {
            // Trailer fields, then the empty line.
            loop {
                let line = find(&buffer[at..], b"\r\n")?;
                at += line + 2;
                if line == 0 {
                    return Some(at);
                }
            }
        }
        if buffer.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `Content-Length` of a parsed head (raw responses read off a socket by hand).
pub fn content_length(headers: &[httparse::Header<'_>]) -> usize {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .expect("a Content-Length")
}
