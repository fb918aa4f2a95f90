//! Passthrough: every request the proxy does not answer itself is forwarded to the upstream FHIR
//! server and the response streamed back. Bodies are never buffered (hyper bodies are passed
//! through frame by frame), paths and queries are forwarded byte for byte, hop-by-hop headers are
//! dropped, `X-Forwarded-*` added, and `Location` headers rebased on the proxy's public URL.

mod forward;
mod h1;
pub mod headers;
mod pool;
#[cfg(target_os = "linux")]
mod splice;

pub use forward::{ClientContext, Upstream};
pub use h1::{
    Answered, Asked, ClientHead, H1Target, H1Upstream, Scratch, header_slots, put_status_line,
};

/// Why the upstream could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the upstream FHIR server is unreachable: {0}")]
    Unreachable(String),
    #[error("the upstream FHIR server did not answer within {0} ms")]
    Timeout(u64),
    #[error("the upstream FHIR server sent an invalid response: {0}")]
    Protocol(String),
    #[error("the upstream response is larger than {0} bytes")]
    TooLarge(usize),
    /// The client's request body could not be read (bad chunked framing, an early close): the
    /// client's error (400), not the upstream's.
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
}

/// Records an upstream call's outcome and latency (since `started`) in the metrics.
fn record_upstream<T>(
    route: &'static str,
    result: &Result<T, ProxyError>,
    started: std::time::Instant,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(ProxyError::Timeout(_)) => "timeout",
        Err(ProxyError::Unreachable(_)) => "connect_error",
        Err(ProxyError::ClientBody(_)) => "client_error",
        Err(_) => "protocol_error",
    };
    crate::telemetry::metrics::upstream(route, outcome, started.elapsed());
}
