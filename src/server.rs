//! The server: accepts connections (plain or TLS ≥ 1.2 via rustls), serves HTTP/1.1 and HTTP/2 with
//! the router, and shuts down gracefully: when `shutdown` resolves it stops accepting, lets
//! in-flight requests finish within `server.shutdown_grace_secs`, then returns. Where the fast path
//! applies, connections are served on `Lanes` (a thread and runtime per core), the rest on the
//! main runtime.
//!
//! Nobody holds a connection for free: every read from a client has a deadline (`limits` on the
//! general path, `http::fast` on the fast path), and at most `server.max_connections` client
//! connections are open at once, all lanes and the general path together. Beyond the cap the
//! proxy stops accepting, so that new connections wait in the kernel's listen backlog (nginx does
//! the same when its `worker_connections` run out): accepting them only to close them would turn a
//! burst into resets for well-behaved clients and cost an accept and a close per attempt.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{ClientTimeouts, Config, TlsConfig};
use crate::http;

mod limits;

use limits::{ClientIo, Tracked, Watch};

/// The binary's entry point: builds the runtime (`server.worker_threads`), binds `server.listen`
/// and serves until SIGTERM or SIGINT.
pub fn run_until_signal(config: Config) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    runtime.enable_all().build()?.block_on(async {
        let listen = config.listen_addr()?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("server.listen: cannot bind {listen}"))?;
        run(config, listener, shutdown_signal()).await
    })
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the proxy");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}

/// Serves `config` on `listener` until `shutdown` resolves, then drains within the grace period.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // The same list `check-config` prints, logged as the configuration's.
    for warning in config.warnings() {
        tracing::warn!(target: "fhir_bulk_proxy::config", "{warning}");
    }
    let tls = config.server.tls.as_ref().map(tls_acceptor).transpose()?;
    let grace = config.shutdown_grace();
    let app = Arc::new(App::new(config).await?);
    // Cancelled at shutdown: export workers release their units, idle fast-path connections close.
    let stop = CancellationToken::new();
    let mut workers = app.exporter.spawn(stop.clone());
    workers.push(crate::telemetry::metrics::spawn_upkeep(
        app.metrics.clone(),
        stop.clone(),
    ));
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        upstream = %app.upstream.base_url(),
        base_path = %app.base_path,
        "fhir-bulk-proxy listening"
    );
    let entry = http::Entry::new(app.clone());
    // hyper's header_read_timeout stays off (it has no timer): `limits::ClientIo` keeps the head
    // and keep-alive deadlines, which hyper's one timer cannot tell apart.
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let timeouts = app.config.client_timeouts();
    let open = Arc::new(Semaphore::new(app.config.server.max_connections));
    tokio::pin!(shutdown);

    let lanes = match &tls {
        None if http::fast::applies(&app) => {
            let listener = listener.into_std()?;
            let lanes = Lanes::start(
                lane_count(&app),
                &listener,
                &Shared {
                    app: app.clone(),
                    entry: entry.clone(),
                    builder: builder.clone(),
                    stop: stop.clone(),
                    open: open.clone(),
                },
            )?;
            drop(listener);
            shutdown.await;
            Some(lanes)
        }
        _ => {
            accept_until(&listener, &open, &mut shutdown, |stream, peer, permit| {
                let watch = Watch::new(timeouts);
                let service = service(entry.clone(), peer, watch.clone());
                let stream = ClientIo::new(stream, watch, head_deadline(timeouts));
                match &tls {
                    None => {
                        let connection = builder.serve_connection(TokioIo::new(stream), service);
                        let connection = graceful.watch(connection.into_owned());
                        tokio::spawn(async move {
                            log_connection_end(connection, peer).await;
                            drop(permit);
                        });
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let _permit = permit;
                            // The handshake reads under the first head's deadline (`ClientIo`).
                            match acceptor.accept(stream).await {
                                Ok(stream) => {
                                    let connection =
                                        builder.serve_connection(TokioIo::new(stream), service);
                                    log_connection_end(
                                        watcher.watch(connection.into_owned()),
                                        peer,
                                    )
                                    .await;
                                }
                                Err(e) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                            }
                        });
                    }
                }
            })
            .await;
            drop(listener);
            None
        }
    };

    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests and export workers"
    );
    // Workers release their units at once, so another replica carries on without waiting; the
    // lanes stop accepting and their idle connections close.
    stop.cancel();
    let drained = async {
        if let Some(lanes) = &lanes {
            lanes.connections.close();
            lanes.connections.wait().await;
        }
        graceful.shutdown().await;
        for worker in workers {
            let _ = worker.await;
        }
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(()) => tracing::info!("all connections closed, workers stopped"),
        Err(_) => tracing::warn!("grace period over: closing the remaining connections"),
    }
    if let Some(lanes) = lanes {
        lanes.stop().await;
    }
    Ok(())
}

/// When a new connection's first request head is due.
fn head_deadline(timeouts: ClientTimeouts) -> tokio::time::Instant {
    tokio::time::Instant::now() + timeouts.head
}

/// Accepts connections on `listener` and hands each to `serve`, with its place among the `open`
/// ones, until `shutdown` resolves. No place free: no accept, the connection waits in the backlog.
async fn accept_until(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    mut serve: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed; if it were, there would be nothing to serve with.
                Err(_) => return,
            },
            () = &mut *shutdown => return,
        };
        let (stream, peer) = loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => break accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                () = &mut *shutdown => return,
            }
        };
        let _ = stream.set_nodelay(true);
        serve(stream, peer, permit);
    }
}

/// What the general path answers: a response whose body tells the connection's [`Watch`] when
/// the request is done.
type Answer = axum::http::Response<Tracked<axum::body::Body>>;

/// The general path's service for one connection from `peer`, watched by `watch`.
fn service(
    entry: http::Entry,
    peer: SocketAddr,
    watch: Arc<Watch>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Answer,
    Error = Infallible,
    Future = impl Future<Output = Result<Answer, Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |request: Request<Incoming>| {
        let entry = entry.clone();
        let timeouts = watch.timeouts();
        let in_flight = watch.request();
        let (parts, body) = request.into_parts();
        let (body, stalled) = watch.body(body);
        let request = Request::from_parts(parts, body);
        async move {
            let accept = request.headers().get(hyper::header::ACCEPT).cloned();
            let mut response = entry.serve(request, peer).await;
            if stalled.is_raised() {
                response = request_timeout(&response, timeouts.body);
                http::error::honour_accept(accept.as_ref(), &mut response);
            }
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    })
}

/// What replaces the answer to a request whose body stalled (a 502 from the upstream connection
/// the body was cut on, a 400 from an endpoint that read it): 408, and the connection closes, since
/// the rest of the body would otherwise be read as the next request.
fn request_timeout(
    answered: &axum::response::Response,
    after: std::time::Duration,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let timeout = http::error::ApiError::RequestTimeout(format!(
        "the request body stalled: nothing of it arrived for {} s \
         (server.request_body_timeout_secs)",
        after.as_secs()
    ));
    let mut response = timeout.into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    if let Some(id) = answered.headers().get("x-request-id") {
        headers.insert("x-request-id", id.clone());
    }
    response
}

/// One lane per worker thread (`server.worker_threads`; 0 = one per CPU).
fn lane_count(app: &App) -> usize {
    match app.config.server.worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// What every lane shares with the rest of the server.
#[derive(Clone)]
struct Shared {
    app: Arc<App>,
    entry: http::Entry,
    builder: auto::Builder<TokioExecutor>,
    /// Cancelled at shutdown: lanes stop accepting, idle connections close.
    stop: CancellationToken,
    /// Places for open client connections (`server.max_connections`), shared with the general
    /// path.
    open: Arc<Semaphore>,
}

/// Where plain-HTTP connections are served when the fast path applies, in nginx's model: one OS
/// thread per worker, each with a current-thread runtime that accepts from the shared listening
/// socket and serves its connections start to finish, with an upstream pool of its own, so that a
/// request never changes thread. Connections the fast path hands to the general path stay on
/// their lane; the export workers and the rest run on the main runtime.
///
/// Chosen by the passthrough benchmark (small GET, 32 connections): more requests per second and
/// less CPU per request than with the connections on the main (work-stealing) runtime; the
/// figures are in bench/RESULTS.md, re-measured there rather than quoted here.
struct Lanes {
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Every lane's connections.
    connections: TaskTracker,
    /// Drops the lanes' runtimes, and with them the connections still open after the grace period.
    abort: CancellationToken,
}

impl Lanes {
    fn start(
        count: usize,
        listener: &std::net::TcpListener,
        shared: &Shared,
    ) -> anyhow::Result<Self> {
        let connections = TaskTracker::new();
        let abort = CancellationToken::new();
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let listener = listener
                .try_clone()
                .context("cannot share the listening socket with a lane")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build a lane's runtime")?;
            let (shared, connections, abort) = (shared.clone(), connections.clone(), abort.clone());
            let thread = std::thread::Builder::new()
                .name(format!("lane-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        tokio::select! {
                            () = Lane::run(shared, connections, listener) => {}
                            () = abort.cancelled() => {}
                        }
                    });
                })
                .context("cannot start a lane's thread")?;
            threads.push(thread);
        }
        Ok(Self {
            threads,
            connections,
            abort,
        })
    }

    /// Ends the lanes (closing whatever is still open) and waits for their threads.
    async fn stop(self) {
        self.abort.cancel();
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// One lane's state: its upstream pool and what it shares.
struct Lane {
    upstream: crate::proxy::H1Upstream,
    shared: Shared,
}

impl Lane {
    /// Accepts until shutdown, then serves the connections it has until they end.
    async fn run(shared: Shared, connections: TaskTracker, listener: std::net::TcpListener) {
        // Made here, so that the pool's upkeep runs on this lane's runtime.
        let Some(upstream) = shared.app.upstream.h1().map(|u| u.lane()) else {
            return;
        };
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "a lane cannot use the listening socket");
                return;
            }
        };
        let lane = Arc::new(Lane { upstream, shared });
        let mut stopped = std::pin::pin!(lane.shared.stop.cancelled());
        accept_until(
            &listener,
            &lane.shared.open,
            &mut stopped,
            |stream, peer, permit| {
                let lane = lane.clone();
                connections.spawn(async move {
                    lane.serve(stream, peer).await;
                    drop(permit);
                });
            },
        )
        .await;
        drop(listener);
        connections.wait().await;
    }

    /// One connection: the fast path, then the general path from the first request it hands over.
    async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        let Shared {
            app,
            entry,
            builder,
            stop,
            open: _,
        } = &self.shared;
        if let Some(rest) = http::fast::serve(app, &self.upstream, stream, peer, stop).await {
            // The head the fast path was waiting for stays due when it was.
            let head_deadline = rest.head_deadline();
            let watch = Watch::new(app.config.client_timeouts());
            let service = service(entry.clone(), peer, watch.clone());
            let rest = ClientIo::new(rest, watch, head_deadline);
            let connection = builder.serve_connection(TokioIo::new(rest), service);
            log_connection_end(until_stopped(connection.into_owned(), stop), peer).await;
        }
    }
}

/// Serves `connection` to its end, shutting it down gracefully (the request in flight is answered,
/// no other is read) once `stop` is cancelled.
async fn until_stopped<C: GracefulConnection>(
    connection: C,
    stop: &CancellationToken,
) -> C::Output {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        output = connection.as_mut() => return output,
        () = stop.cancelled() => {}
    }
    connection.as_mut().graceful_shutdown();
    connection.await
}

async fn log_connection_end<E: std::fmt::Display>(
    connection: impl Future<Output = Result<(), E>>,
    peer: SocketAddr,
) {
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A rustls acceptor offering TLS 1.3 and 1.2 only (rustls implements nothing older).
fn tls_acceptor(tls: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs = crate::config::pem::certificates("server.tls.cert", &tls.cert)?;
    let key = crate::config::pem::private_key("server.tls.key", &tls.key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("server.tls: the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acceptor for `cert` and `key` files with these contents.
    fn acceptor(cert: &str, key: &str) -> anyhow::Result<TlsAcceptor> {
        let dir = tempfile::tempdir().unwrap();
        let tls = TlsConfig {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(&tls.cert, cert).unwrap();
        std::fs::write(&tls.key, key).unwrap();
        tls_acceptor(&tls)
    }

    fn error(cert: &str, key: &str) -> String {
        format!("{:#}", acceptor(cert, key).err().unwrap())
    }

    #[test]
    fn unusable_certificate_and_key_files_are_named_in_the_error() {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = generated.cert.pem();
        let key = generated.signing_key.serialize_pem();
        assert!(acceptor(&cert, &key).is_ok());
        let no_cert = error("no PEM here", &key);
        assert!(
            no_cert.contains("server.tls.cert: no certificate in"),
            "{no_cert}"
        );
        let bad_cert = error("-----BEGIN CERTIFICATE-----\n!!!\n", &key);
        assert!(
            bad_cert.contains("server.tls.cert: no PEM certificates in"),
            "{bad_cert}"
        );
        let no_key = error(&cert, &cert);
        assert!(
            no_key.contains("server.tls.key: no private key in"),
            "{no_key}"
        );
        let bad_key = error(&cert, "-----BEGIN PRIVATE KEY-----\n!!!\n");
        assert!(
            bad_key.contains("server.tls.key: unreadable PEM in"),
            "{bad_key}"
        );
    }
}
