//! The `fhir-bulk-proxy` binary: parses the command line, loads the configuration and runs the server.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fhir_bulk_proxy::auth::keygen;
use fhir_bulk_proxy::ops::jobs::{self, JobsCommand};
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
    /// Validate the configuration, print the effective endpoints, stores and warnings, and exit.
    CheckConfig {
        /// Exit non-zero when there are warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// List, show or cancel export jobs in the configured job store.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
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
        /// Write the private key (mode 0600), the public JWK Set and the `[[auth.clients]]`
        /// entry as files in this directory instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Keygen {
        client_id,
        alg,
        scopes,
        out,
    } = &command
    {
        // Needs no configuration: it runs before the proxy is set up.
        print!("{}", keygen::run(client_id, *alg, scopes, out.as_deref())?);
        return Ok(());
    }
    let config = Config::load(cli.config.as_deref())?;
    if let Command::CheckConfig { strict } = command {
        // The files [upstream.tls] and [upstream.auth] name are read as the proxy will read them.
        fhir_bulk_proxy::upstream_auth::check(&config)?;
        print!("{}", config.report());
        let warnings = config.warnings().len();
        if strict && warnings > 0 {
            anyhow::bail!("check-config --strict: {warnings} warning(s)");
        }
        return Ok(());
    }
    if let Command::Jobs { command } = &command {
        print!("{}", jobs::execute(&config, command)?);
        return Ok(());
    }
    telemetry::init(&config.log)?;
    server::run_until_signal(config)
}
