//! `[server]`: the listener and how the proxy presents itself (address, public URL and base path,
//! TLS, body and connection limits, client timeouts, the HTTP/1.1 fast path and splice).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid, parse_base_url};

/// The listener and how the proxy presents itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address. Default `0.0.0.0:8080`.
    pub listen: String,
    /// Public base URL of the proxy's FHIR endpoint, used for absolute URLs in responses
    /// (Content-Location, manifests, rewritten Location headers). Default: unset, derived per request
    /// from `X-Forwarded-Proto` / `X-Forwarded-Host` / `Host` and the base path.
    pub public_url: Option<String>,
    /// Path under which the proxy serves FHIR. Default: unset, the path of `upstream.url`
    /// (or of `public_url` when that is set).
    pub base_path: Option<String>,
    /// TLS for the listener (rustls; TLS 1.2 and 1.3 only). Default: unset, plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Grace period on SIGTERM / SIGINT for in-flight requests, in seconds. Default 30.
    pub shutdown_grace_secs: u64,
    /// Largest request body the proxy reads itself (kick-off, token), in bytes. Passthrough bodies are
    /// streamed and not limited. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Worker threads; 0 = one per CPU. The main runtime has this many, and when the fast path
    /// applies as many lanes (`server::Lanes`) serve the plain-HTTP connections. A sidecar with a
    /// CPU limit of 1 does best with 1. Default 0.
    pub worker_threads: usize,
    /// Serve bodiless HTTP/1.1 passthrough requests on plain-HTTP listeners and upstreams by
    /// copying bytes between the two connections (`proxy::h1`) instead of through the general
    /// HTTP stack. Default true.
    pub http1_fast_path: bool,
    /// On the fast path (Linux), when response bodies over 512 KiB move from the upstream's socket
    /// to the client's through a kernel pipe (splice(2)) instead of being copied through the
    /// proxy's memory. Default `auto`.
    pub splice: Splice,
    /// Time a client has to send a whole request head, in seconds: from the connection's start
    /// for its first request (TLS handshake included), from the first byte for later ones. A
    /// connection that takes longer is closed (nginx `client_header_timeout`). Default 30.
    pub request_head_timeout_secs: u64,
    /// An idle keep-alive connection (no request in flight, no byte of the next head yet) is
    /// closed after this many seconds (nginx `keepalive_timeout`). Default 75.
    pub keep_alive_timeout_secs: u64,
    /// Longest wait, in seconds, for the next part of a request body the proxy reads or forwards;
    /// a body that stalls longer is answered 408 and its connection closed (nginx
    /// `client_body_timeout`). Default 60.
    pub request_body_timeout_secs: u64,
    /// Client connections open at once; beyond it new connections wait in the listen backlog
    /// until one closes (nginx `worker_connections`). Default 10000.
    pub max_connections: usize,
}

/// Longest client timeout `validate` accepts, seconds.
const MAX_CLIENT_TIMEOUT_SECS: u64 = 3600;
/// Largest `server.max_connections`: far beyond what one process's file descriptors allow.
const MAX_CONNECTIONS: usize = 1_000_000;

/// How long a client may take, from `[server]`: see [`ServerConfig`]'s fields of the same names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// `request_head_timeout_secs`.
    pub head: Duration,
    /// `keep_alive_timeout_secs`.
    pub idle: Duration,
    /// `request_body_timeout_secs`.
    pub body: Duration,
}

/// `server.splice`: `auto`, `always` or `never`; `true` and `false` are read as `always` and
/// `never`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Splice {
    /// Splice a large body while the lane already streams another one; copy a body alone. Copying
    /// lets a lone download finish sooner (a client's receive window grows with copied data and
    /// stays small with spliced pages, measured on loopback), and costs its CPU only when the lane
    /// has no other large body to serve; splicing uses about a fifth of the CPU when they compete.
    Auto,
    Always,
    Never,
}

impl Splice {
    /// Whether a large body is spliced while `others` are in flight on its lane.
    pub fn applies(self, others: usize) -> bool {
        match self {
            Splice::Auto => others > 0,
            Splice::Always => true,
            Splice::Never => false,
        }
    }
}

impl<'de> Deserialize<'de> for Splice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Named;
        impl serde::de::Visitor<'_> for Named {
            type Value = Splice;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, always or never (or true / false)")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Splice, E> {
                Ok(if value { Splice::Always } else { Splice::Never })
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Splice, E> {
                match value {
                    "auto" => Ok(Splice::Auto),
                    "always" | "true" => Ok(Splice::Always),
                    "never" | "false" => Ok(Splice::Never),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(value), &self)),
                }
            }
        }
        deserializer.deserialize_any(Named)
    }
}

/// Certificate and key for the listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            public_url: None,
            base_path: None,
            tls: None,
            shutdown_grace_secs: 30,
            max_body_bytes: 1024 * 1024,
            worker_threads: 0,
            http1_fast_path: true,
            splice: Splice::Auto,
            request_head_timeout_secs: 30,
            keep_alive_timeout_secs: 75,
            request_body_timeout_secs: 60,
            max_connections: 10_000,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if let Some(public) = &self.public_url {
            parse_base_url("server.public_url", public)?;
        }
        if let Some(base) = &self.base_path
            && (!base.starts_with('/') || base.contains(['?', '#']))
        {
            return Err(invalid(
                "server.base_path",
                base,
                "must be an absolute path such as `/fhir`, without query or fragment",
            ));
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("server.tls.cert", &tls.cert), ("server.tls.key", &tls.key)] {
                if !path.is_file() {
                    return Err(invalid(key, path.display().to_string(), "no such file"));
                }
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid(
                "server.max_body_bytes",
                self.max_body_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        self.validate_client_limits()
    }

    /// The client timeouts and the connection cap: 0 would disable nothing and refuse everything,
    /// and past an hour a timeout no longer protects anyone.
    fn validate_client_limits(&self) -> Result<(), ConfigError> {
        let s = self;
        for (key, value) in [
            (
                "server.request_head_timeout_secs",
                s.request_head_timeout_secs,
            ),
            ("server.keep_alive_timeout_secs", s.keep_alive_timeout_secs),
            (
                "server.request_body_timeout_secs",
                s.request_body_timeout_secs,
            ),
        ] {
            if !(1..=MAX_CLIENT_TIMEOUT_SECS).contains(&value) {
                return Err(invalid(
                    key,
                    value.to_string(),
                    format!("must be between 1 and {MAX_CLIENT_TIMEOUT_SECS} seconds"),
                ));
            }
        }
        if !(1..=MAX_CONNECTIONS).contains(&s.max_connections) {
            return Err(invalid(
                "server.max_connections",
                s.max_connections.to_string(),
                format!("must be between 1 and {MAX_CONNECTIONS}"),
            ));
        }
        Ok(())
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e: std::net::AddrParseError| {
            invalid("server.listen", &self.listen, e.to_string())
        })
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use std::time::Duration;

    use figment::Jail;

    use super::*;
    use crate::config::Config;
    use crate::config::tests::{assert_each_bad_value_named, with_upstream};

    #[test]
    fn client_limits_default_to_nginx_like_values_and_follow_the_environment() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config.client_timeouts(),
                ClientTimeouts {
                    head: Duration::from_secs(30),
                    idle: Duration::from_secs(75),
                    body: Duration::from_secs(60),
                }
            );
            assert_eq!(config.server.max_connections, 10_000);
            jail.set_env("BULK_PROXY_SERVER__REQUEST_HEAD_TIMEOUT_SECS", "5");
            jail.set_env("BULK_PROXY_SERVER__KEEP_ALIVE_TIMEOUT_SECS", "6");
            jail.set_env("BULK_PROXY_SERVER__REQUEST_BODY_TIMEOUT_SECS", "7");
            jail.set_env("BULK_PROXY_SERVER__MAX_CONNECTIONS", "8");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let timeouts = config.client_timeouts();
            assert_eq!(timeouts.head, Duration::from_secs(5));
            assert_eq!(timeouts.idle, Duration::from_secs(6));
            assert_eq!(timeouts.body, Duration::from_secs(7));
            assert_eq!(config.server.max_connections, 8);
            Ok(())
        });
    }

    #[test]
    fn splice_takes_a_name_or_a_boolean() {
        let cases = [
            ("auto", Splice::Auto),
            ("always", Splice::Always),
            ("never", Splice::Never),
            ("true", Splice::Always),
            ("false", Splice::Never),
        ];
        for (value, expected) in cases {
            Jail::expect_with(|jail| {
                with_upstream(jail);
                jail.set_env("BULK_PROXY_SERVER__SPLICE", value);
                assert_eq!(
                    Config::load(None).unwrap().server.splice,
                    expected,
                    "{value}"
                );
                Ok(())
            });
        }
        let from_toml: ServerConfig = toml::from_str("splice = false").unwrap();
        assert_eq!(from_toml.splice, Splice::Never);
        assert_eq!(ServerConfig::default().splice, Splice::Auto);
        assert!(Splice::Auto.applies(1) && !Splice::Auto.applies(0));
        assert!(Splice::Always.applies(0) && !Splice::Never.applies(3));
    }

    #[test]
    fn each_bad_server_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_SERVER__LISTEN", "nonsense", "server.listen"),
            (
                "BULK_PROXY_SERVER__PUBLIC_URL",
                "relative/path",
                "server.public_url",
            ),
            ("BULK_PROXY_SERVER__BASE_PATH", "fhir", "server.base_path"),
            (
                "BULK_PROXY_SERVER__TLS__CERT",
                "/nope.pem",
                "server.tls.cert",
            ),
            (
                "BULK_PROXY_SERVER__MAX_BODY_BYTES",
                "10",
                "server.max_body_bytes",
            ),
            ("BULK_PROXY_SERVER__SPLICE", "sometimes", "splice"),
            (
                "BULK_PROXY_SERVER__SHUTDOWN_GRACE_SECS",
                "-1",
                "shutdown_grace_secs",
            ),
            (
                "BULK_PROXY_SERVER__REQUEST_HEAD_TIMEOUT_SECS",
                "0",
                "server.request_head_timeout_secs",
            ),
            (
                "BULK_PROXY_SERVER__KEEP_ALIVE_TIMEOUT_SECS",
                "86400",
                "server.keep_alive_timeout_secs",
            ),
            (
                "BULK_PROXY_SERVER__REQUEST_BODY_TIMEOUT_SECS",
                "0",
                "server.request_body_timeout_secs",
            ),
            (
                "BULK_PROXY_SERVER__MAX_CONNECTIONS",
                "0",
                "server.max_connections",
            ),
            (
                "BULK_PROXY_SERVER__MAX_CONNECTIONS",
                "100000000",
                "server.max_connections",
            ),
        ]);
    }
}
