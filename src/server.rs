//! The server: accepts connections (plain or TLS ≥ 1.2 via rustls), serves HTTP/1.1 and HTTP/2 with
//! the router, and shuts down gracefully: when `shutdown` resolves it stops accepting, lets
//! in-flight requests finish within `server.shutdown_grace_secs`, then returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::app::App;
use crate::config::{Config, TlsConfig};
use crate::http;

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
    let tls = config.server.tls.as_ref().map(tls_acceptor).transpose()?;
    let grace = config.shutdown_grace();
    let app = Arc::new(App::new(config).await?);
    // Cancelled at shutdown: export workers release their units, idle fast-path connections close.
    let stop = tokio_util::sync::CancellationToken::new();
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
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // Connections served by the fast path (and the general path, after a hand-over).
    let fast_connections = tokio_util::task::TaskTracker::new();
    let fast = http::fast::applies(&app);
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let entry = entry.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let entry = entry.clone();
            async move { Ok::<_, std::convert::Infallible>(entry.serve(request, peer).await) }
        });
        match &tls {
            None if fast => {
                let (app, builder, stop) = (app.clone(), builder.clone(), stop.clone());
                let watcher = graceful.watcher();
                fast_connections.spawn(async move {
                    if let Some(rest) = http::fast::serve(&app, stream, peer, &stop).await {
                        let connection = builder.serve_connection(TokioIo::new(rest), service);
                        log_connection_end(watcher.watch(connection.into_owned()), peer).await;
                    }
                });
            }
            None => {
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                tokio::spawn(log_connection_end(connection, peer));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let connection =
                                builder.serve_connection(TokioIo::new(stream), service);
                            log_connection_end(watcher.watch(connection.into_owned()), peer).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    }
                });
            }
        }
    }

    drop(listener);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests and export workers"
    );
    // Workers release their units at once, so another replica carries on without waiting; idle
    // fast-path connections close.
    stop.cancel();
    fast_connections.close();
    let drained = async {
        graceful.shutdown().await;
        fast_connections.wait().await;
        for worker in workers {
            let _ = worker.await;
        }
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(()) => tracing::info!("all connections closed, workers stopped"),
        Err(_) => tracing::warn!("grace period over: closing the remaining connections"),
    }
    Ok(())
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
    let certs = {
        let pem = std::fs::read(&tls.cert)
            .with_context(|| format!("server.tls.cert: cannot read {}", tls.cert.display()))?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!(
                    "server.tls.cert: no PEM certificates in {}",
                    tls.cert.display()
                )
            })?
    };
    anyhow::ensure!(
        !certs.is_empty(),
        "server.tls.cert: no certificate in {}",
        tls.cert.display()
    );
    let key = {
        let pem = std::fs::read(&tls.key)
            .with_context(|| format!("server.tls.key: cannot read {}", tls.key.display()))?;
        rustls_pemfile::private_key(&mut pem.as_slice())
            .with_context(|| format!("server.tls.key: unreadable PEM in {}", tls.key.display()))?
            .with_context(|| format!("server.tls.key: no private key in {}", tls.key.display()))?
    };
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
