//! The `fhir-bulk-proxy` binary: parses the command line, loads the configuration and runs the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fhir_bulk_proxy::auth::keygen;
use fhir_bulk_proxy::{config::Config, server, telemetry};

/// mimalloc instead of glibc malloc: the per-request allocations of the proxy path cost about a
/// fifth less CPU (bench/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    version,
    about = "FHIR Bulk Data export and SMART Backend Services in front of any FHIR R4 server"
)]
struct Cli {
    /// Configuration file (default: ./proxy.toml when it exists).
    #[arg(long, global = true, env = "BULK_PROXY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and exit.
    CheckConfig,
    /// Generate a key pair for a backend-services client and print its `[[auth.clients]]` entry.
    Keygen {
        #[arg(long)]
        client_id: String,
        /// ES384 or RS384.
        #[arg(long, default_value = "ES384")]
        alg: fhir_bulk_proxy::auth::keygen::KeyAlgorithm,
        /// Scopes to register (repeatable).
        #[arg(long = "scope", default_value = "system/*.read")]
        scopes: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Keygen {
        client_id,
        alg,
        scopes,
    } = &command
    {
        let key = keygen::generate(*alg)?;
        print!(
            "{}",
            keygen::Report {
                client_id,
                scopes,
                key: &key
            }
        );
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    match command {
        Command::Keygen { .. } => Ok(()),
        Command::CheckConfig => {
            println!("configuration is valid (upstream {})", config.upstream.url);
            Ok(())
        }
        Command::Run => run(config),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        let listen = config.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("server.listen: cannot bind {listen}"))?;
        server::run(config, listener, shutdown_signal()).await
    })
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}
