//! The application state every handler shares: configuration, the upstream client, caches, the
//! authorization server and the metrics handle. Built once per server; cloned as `AppState` (an `Arc`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Auth;
use crate::config::Config;
use crate::http::metadata::MetadataCache;
use crate::proxy::headers::{X_FORWARDED_HOST, X_FORWARDED_PROTO, first_forwarded};
use crate::proxy::{ClientContext, Upstream};
use crate::telemetry::metrics;

pub type AppState = Arc<App>;

pub struct App {
    pub config: Config,
    pub upstream: Upstream,
    pub metadata: MetadataCache,
    /// Token endpoint and bearer-token checks (SMART Backend Services).
    pub auth: Auth,
    pub metrics: PrometheusHandle,
    /// Path under which the proxy serves FHIR (`""` for the root).
    pub base_path: String,
    /// Whether the listener speaks TLS.
    pub tls: bool,
}

impl App {
    pub fn new(config: Config) -> anyhow::Result<Self> {
        Ok(Self {
            upstream: Upstream::new(&config)?,
            metadata: MetadataCache::new(config.metadata.cache_ttl_secs),
            auth: Auth::new(&config)?,
            metrics: metrics::handle(),
            base_path: config.base_path(),
            tls: config.server.tls.is_some(),
            config,
        })
    }

    /// The scheme clients use to reach the proxy.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The proxy's public FHIR base URL (no trailing slash): `server.public_url` when set, otherwise
    /// derived from `X-Forwarded-Proto` / `X-Forwarded-Host` (an ingress in front) or `Host`.
    pub fn public_base(&self, headers: &HeaderMap) -> String {
        if let Some(public) = &self.config.server.public_url {
            let origin = public.trim_end_matches('/');
            return match url::Url::parse(origin) {
                // A public URL with a path already names the base; a bare origin gets the base path.
                Ok(url) if url.path() != "/" => origin.to_owned(),
                _ => format!("{origin}{}", self.base_path),
            };
        }
        let scheme = first_forwarded(headers, &X_FORWARDED_PROTO)
            .filter(|p| matches!(*p, "http" | "https"))
            .unwrap_or(self.scheme());
        let host = first_forwarded(headers, &X_FORWARDED_HOST)
            .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .filter(|h| is_host(h))
            .unwrap_or("localhost");
        format!("{scheme}://{host}{}", self.base_path)
    }

    pub fn client_context(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> ClientContext {
        ClientContext {
            addr: peer.map(|p| p.ip()),
            scheme: self.scheme(),
            public_base: self.public_base(headers),
        }
    }
}

/// A Host header value that is safe to put into URLs: host[:port], no path or user info.
fn is_host(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 255
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::is_host;

    #[test]
    fn host_values_with_url_syntax_are_refused() {
        assert!(is_host("proxy.example.org:8443"));
        assert!(is_host("[::1]:8080"));
        assert!(!is_host("evil.example/path"));
        assert!(!is_host("user@host"));
        assert!(!is_host(""));
    }
}
