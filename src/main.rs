//! The `fhir-bulk-proxy` binary: parses the command line, loads the configuration and runs the server.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fhir_bulk_proxy::{config::Config, server, telemetry};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!("configuration is valid (upstream {})", config.upstream.url);
            Ok(())
        }
        Command::Run => run(config),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log)?;
    let runtime = tokio::runtime::Runtime::new()?;
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
