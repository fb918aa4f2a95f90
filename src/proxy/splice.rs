//! Zero-copy forwarding of large response bodies (Linux): the fast path moves them from the
//! upstream's socket into a pipe and from the pipe into the client's socket with splice(2), so
//! the bytes are never copied into the proxy's memory; the kernel passes references to its pages.
//!
//! On the passthrough benchmark's 10 MiB response it costs a fraction of the CPU of copying
//! through user space, under both cubic and BBR (figures in bench/RESULTS.md and
//! bench/RESULTS-cubic.md). A lone spliced body arrives later than a copied one (the client's
//! receive window stays small), so by default
//! ([`Policy`], `server.splice = "auto"`) only bodies that compete for a lane are spliced.

use std::io::{self, ErrorKind};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::pipe::{
    PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice,
};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::Splice;

/// Which large bodies a lane splices (`server.splice`): with `auto`, those that start while it
/// streams another one.
pub(super) struct Policy {
    mode: Splice,
    streaming: AtomicUsize,
}

impl Policy {
    pub(super) fn new(mode: Splice) -> Self {
        Self {
            mode,
            streaming: AtomicUsize::new(0),
        }
    }

    /// Counts a large body for as long as the guard lives; the flag says whether to splice it.
    pub(super) fn start(&self) -> (Streaming<'_>, bool) {
        let others = self.streaming.fetch_add(1, Ordering::Relaxed);
        (Streaming(&self.streaming), self.mode.applies(others))
    }
}

/// A large body being streamed ([`Policy::start`]).
pub(super) struct Streaming<'a>(&'a AtomicUsize);

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Capacity asked for each pipe. Larger pipes cost less CPU per body than the default 64 KiB,
/// with little gained past 256 KiB; 256 KiB lets an unprivileged process hold 256 such pipes within
/// the default `fs.pipe-user-pages-soft` (64 MiB). Past it, a pipe keeps its default size.
const PIPE_SIZE: usize = 256 * 1024;

/// A pipe for one body.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = match fcntl_setpipe_size(&write, PIPE_SIZE) {
            Ok(capacity) => capacity,
            Err(_) => fcntl_getpipe_size(&write)?,
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Moves `length` bytes (or, with `None`, everything until the upstream closes) from
    /// `upstream` to `client`. It never reads past `length`, so the upstream connection can carry
    /// another request afterwards.
    ///
    /// Each round fills the pipe once and drains it to the client: with the pipe empty, a
    /// would-block from the upstream's side can only mean that its socket has nothing to read, so
    /// waiting for it to become readable is right (a pipe that is full in its page slots, not in
    /// bytes, would otherwise look the same and wait forever).
    pub(super) async fn forward(
        &self,
        upstream: &TcpStream,
        length: Option<u64>,
        client: &TcpStream,
    ) -> io::Result<()> {
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        let mut remaining = length.unwrap_or(u64::MAX);
        while remaining > 0 {
            let wanted = remaining.min(self.capacity as u64) as usize;
            let filled = upstream.try_io(Interest::READABLE, || {
                Ok(splice(upstream, None, &self.write, None, wanted, flags)?)
            });
            let mut in_pipe = match filled {
                Ok(0) if length.is_none() => return Ok(()),
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    upstream.readable().await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            remaining -= in_pipe as u64;
            crate::telemetry::metrics::spliced(in_pipe as u64);
            while in_pipe > 0 {
                let drained = client.try_io(Interest::WRITABLE, || {
                    Ok(splice(&self.read, None, client, None, in_pipe, flags)?)
                });
                match drained {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(n) => in_pipe -= n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => client.writable().await?,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splices_a_body_only_while_another_streams() {
        let policy = Policy::new(Splice::Auto);
        let (first, spliced) = policy.start();
        assert!(!spliced, "a body alone is copied");
        let (second, spliced) = policy.start();
        assert!(spliced);
        drop(second);
        let (_, spliced) = policy.start();
        assert!(spliced, "the first still streams");
        drop(first);
        let (_, spliced) = policy.start();
        assert!(!spliced, "each guard counted down when dropped");
        assert!(Policy::new(Splice::Always).start().1);
        assert!(!Policy::new(Splice::Never).start().1);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected sockets: (the side written to, the side read from).
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connecting = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connecting);
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn body(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i % 251) as u8).collect()
    }

    /// Runs `forward` from a socket fed with `sent` (closed afterwards when `close`) and returns
    /// its result, what the client received, and what was left to read upstream.
    async fn forward(
        length: Option<u64>,
        sent: Vec<u8>,
        close: bool,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        let (mut upstream_writer, upstream) = socket_pair().await;
        let (client, mut client_reader) = socket_pair().await;
        let writing = tokio::spawn(async move {
            upstream_writer.write_all(&sent).await.unwrap();
            if close {
                drop(upstream_writer);
                None
            } else {
                Some(upstream_writer)
            }
        });
        let reading = tokio::spawn(async move {
            let mut received = Vec::new();
            client_reader.read_to_end(&mut received).await.unwrap();
            received
        });
        let pipe = Pipe::new().unwrap();
        assert!(pipe.capacity >= 64 * 1024);
        let result = pipe.forward(&upstream, length, &client).await;
        drop(client);
        let received = reading.await.unwrap();
        let writer = writing.await.unwrap();
        drop(writer);
        let mut upstream = upstream;
        let mut left = Vec::new();
        upstream.read_to_end(&mut left).await.unwrap();
        (result, received, left)
    }

    #[tokio::test]
    async fn moves_exactly_the_length_and_leaves_what_follows() {
        let length = 3 * 1024 * 1024 + 17;
        let mut sent = body(length);
        sent.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let (result, received, left) = forward(Some(length as u64), sent, false).await;
        result.unwrap();
        assert!(received == body(length), "the body differs");
        assert_eq!(left, b"HTTP/1.1 200 OK\r\n");
    }

    #[tokio::test]
    async fn without_a_length_moves_everything_until_the_upstream_closes() {
        let (result, received, left) = forward(None, body(1024 * 1024 + 1), true).await;
        result.unwrap();
        assert!(received == body(1024 * 1024 + 1), "the body differs");
        assert!(left.is_empty());
    }

    #[tokio::test]
    async fn an_upstream_closing_early_is_an_error_after_what_it_sent() {
        let (result, received, _) = forward(Some(2 * 1024 * 1024), body(700_000), true).await;
        assert_eq!(result.unwrap_err().kind(), ErrorKind::UnexpectedEof);
        assert!(received == body(700_000), "what was sent arrives");
    }
}
