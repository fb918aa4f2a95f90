//! Logs and metrics. Logs are `tracing` events on stderr, printed as JSON lines or human text
//! (`log.format`); text has ANSI colours only when stderr is a terminal, never in a file or a
//! pipe, and not with `NO_COLOR` set (no-color.org). Every request runs in a span carrying its
//! request id (`request{request_id=...}`), every job's work in one carrying the job id
//! (`job=...`). Metrics are Prometheus text served at `/metrics` (see [`metrics`]).

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// The error and its causes on one line (`outer: cause: root cause`), for logs and for the
/// messages of errors that wrap it: top-level messages alone (hyper's, reqwest's) say little.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Installs the global subscriber. Call once, from `main`; tests leave logging off.
pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours());
    match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}

/// Colour codes only for a person at a terminal: never in a file or a pipe, nor with `NO_COLOR`.
fn colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
