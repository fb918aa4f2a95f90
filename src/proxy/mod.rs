//! Passthrough: every request the proxy does not answer itself is forwarded to the upstream FHIR
//! server and the response streamed back. Bodies are never buffered (hyper bodies are passed
//! through frame by frame), paths and queries are forwarded byte for byte, hop-by-hop headers are
//! dropped, `X-Forwarded-*` added, and `Location` headers rebased on the proxy's public URL.
//!
//! What its files share (the client's context, the base paths, and [`ProxyError`])
//! lives here, so `forward` (the general path), `h1` (the fast path) and `pool` depend on this
//! root and not on each other. [`metadata`] caches the upstream's CapabilityStatement for the
//! metadata endpoint and for export planning.

use std::net::IpAddr;

mod forward;
mod h1;
pub mod headers;
pub mod metadata;
mod pool;
#[cfg(target_os = "linux")]
mod splice;

pub use forward::Upstream;
pub use h1::{
    Answered, Asked, ClientHead, H1Target, H1Upstream, Scratch, header_slots, put_status_line,
};
pub use metadata::{Fetched, MetadataCache};

/// Who sent a request and how the proxy is seen from outside; needed to forward it.
#[derive(Debug, Clone)]
pub struct ClientContext<'a> {
    pub addr: Option<IpAddr>,
    /// `http` or `https`: the scheme of the connection to the proxy.
    pub scheme: &'static str,
    /// The public base `server.public_url` names; without one it is derived from the request.
    pub configured_public_base: Option<&'a str>,
    /// Path under which the proxy serves FHIR (`""` for the root).
    pub base_path: &'a str,
}

/// The upstream's FHIR base and how the proxy's paths map onto it; shared with the fast path.
#[derive(Debug, Clone)]
struct Bases {
    /// The configured base URL without a trailing slash, e.g. `http://fhir:8080/fhir`.
    pub url: String,
    /// Path of the upstream base (`""` for the root).
    pub upstream_path: String,
    /// Path under which the proxy serves FHIR (`""` for the root).
    pub proxy_path: String,
}

impl Bases {
    /// The proxy serves the upstream's own base path (the usual deployment): request targets are
    /// forwarded as they came.
    pub fn same_paths(&self) -> bool {
        self.proxy_path == self.upstream_path
    }

    /// See [`Upstream::map_path_and_query`].
    pub fn map_path_and_query(&self, path_and_query: &str) -> String {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => path_and_query.split_at(i),
            None => (path_and_query, ""),
        };
        let rest = path
            .strip_prefix(self.proxy_path.as_str())
            .filter(|rest| rest.is_empty() || rest.starts_with('/'));
        match rest {
            Some(rest) if rest.is_empty() && self.upstream_path.is_empty() => format!("/{query}"),
            Some(rest) => format!("{}{rest}{query}", self.upstream_path),
            None => path_and_query.to_owned(),
        }
    }
}

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
    /// The proxy's own credentials for the upstream could not be had (its token endpoint failed).
    #[error(transparent)]
    Credentials(#[from] crate::upstream_auth::CredentialError),
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
        Err(ProxyError::Credentials(_)) => "credentials_error",
        Err(_) => "protocol_error",
    };
    crate::telemetry::metrics::upstream(route, outcome, started.elapsed());
}
