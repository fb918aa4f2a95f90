//! Fetching and caching clients' JWKS URLs (SPEC A4.1, A4.4, A4.5, A4.13).
//!
//! - A fetch is bounded: `auth.jwks_fetch_timeout_ms` for the whole exchange, `auth.jwks_max_bytes`
//!   for the body, no redirects, and the body must be a JWK Set.
//! - A fetched set is cached no longer than its `Cache-Control` allows (`no-store`, `no-cache` and
//!   a missing header mean not at all; `max-age` is capped by [`MAX_CACHE`]).
//! - A caller that met an unknown `kid` asks for a fresh copy (key rotation).
//! - Whatever clients send, each URL is fetched at most once per `auth.jwks_min_refetch_secs`: callers
//!   queue on the URL's slot, a caller that arrives while a fetch is under way reuses its result,
//!   and a fetch needed sooner waits for the interval instead of failing. Failed fetches count too,
//!   so a hanging or broken URL is not retried in a loop.
//!
//! Only URLs registered in the configuration are ever fetched (a `jku` must equal the registered
//! URL), so the cache has one slot per registered URL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, header};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::time::Instant;

use crate::config::AuthConfig;

/// Longest a JWKS is cached whatever its `Cache-Control` says.
pub const MAX_CACHE: Duration = Duration::from_secs(3600);

/// Why a JWKS URL gave no keys.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JwksError {
    #[error("fetching the JWKS URL failed: {0}")]
    Fetch(String),
    #[error("the JWKS URL did not answer within {0} ms")]
    Timeout(u64),
    #[error("the JWKS URL answered HTTP {0}")]
    Status(u16),
    #[error("the JWKS document is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the JWKS URL did not return a JWK Set: {0}")]
    Invalid(String),
}

/// The keys of one JWK Set, each a JSON object.
pub type Keys = Arc<Vec<Value>>;

pub struct JwksCache {
    http: reqwest::Client,
    timeout: Duration,
    max_bytes: usize,
    min_interval: Duration,
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

#[derive(Default)]
struct Slot {
    /// The last fetch's outcome and when it finished.
    last: Option<(Instant, Result<Keys, JwksError>)>,
    /// Until when the last successful result may be used without a fetch.
    fresh_until: Option<Instant>,
    /// When the last fetch started (the rate limit counts from here).
    started: Option<Instant>,
}

impl JwksCache {
    pub fn new(config: &AuthConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_millis(config.jwks_fetch_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fhir-bulk-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            timeout,
            max_bytes: config.jwks_max_bytes,
            min_interval: Duration::from_secs(config.jwks_min_refetch_secs),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The keys published at `url`: from the cache while it is fresh, unless `refresh` asks for a
    /// copy fetched after this call began (an unknown `kid`).
    pub async fn keys(&self, url: &str, refresh: bool) -> Result<Keys, JwksError> {
        let called = Instant::now();
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(url.to_owned()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some((finished, result)) = &slot.last {
            // Someone else fetched while this caller queued: that copy is as new as ours would be.
            if *finished >= called {
                return result.clone();
            }
            let fresh = slot.fresh_until.is_some_and(|until| Instant::now() < until);
            if !refresh
                && fresh
                && let Ok(keys) = result
            {
                return Ok(keys.clone());
            }
        }
        if let Some(started) = slot.started {
            tokio::time::sleep_until(started + self.min_interval).await;
        }
        let started = Instant::now();
        slot.started = Some(started);
        let result = self.fetch(url).await;
        slot.fresh_until = match &result {
            Ok((_, ttl)) => Some(started + *ttl),
            Err(_) => None,
        };
        let result = result.map(|(keys, _)| keys);
        slot.last = Some((Instant::now(), result.clone()));
        if let Err(e) = &result {
            tracing::info!(url, error = %e, "client JWKS fetch failed");
        }
        result
    }

    async fn fetch(&self, url: &str) -> Result<(Keys, Duration), JwksError> {
        let exchange = async {
            let response = self
                .http
                .get(url)
                .header(header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        JwksError::Timeout(self.timeout.as_millis() as u64)
                    } else {
                        JwksError::Fetch(crate::telemetry::error_chain(&e))
                    }
                })?;
            if !response.status().is_success() {
                return Err(JwksError::Status(response.status().as_u16()));
            }
            if response
                .content_length()
                .is_some_and(|n| n > self.max_bytes as u64)
            {
                return Err(JwksError::TooLarge(self.max_bytes));
            }
            let ttl = cache_lifetime(response.headers());
            let mut body = Vec::new();
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    if e.is_timeout() {
                        JwksError::Timeout(self.timeout.as_millis() as u64)
                    } else {
                        JwksError::Fetch(crate::telemetry::error_chain(&e))
                    }
                })?;
                if body.len() + chunk.len() > self.max_bytes {
                    return Err(JwksError::TooLarge(self.max_bytes));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((parse_jwks(&body)?, ttl))
        };
        // reqwest's timeout covers the body too; this outer one is a backstop for a slow trickle.
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| JwksError::Timeout(self.timeout.as_millis() as u64))?
    }
}

/// Parses a JWK Set document into its keys.
pub fn parse_jwks(body: &[u8]) -> Result<Keys, JwksError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| JwksError::Invalid(e.to_string()))?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::Invalid("no `keys` array".into()))?;
    Ok(Arc::new(
        keys.iter().filter(|k| k.is_object()).cloned().collect(),
    ))
}

/// How long a response may be cached per its `Cache-Control` (RFC 9111 §5.2.2): zero without the
/// header or with `no-store` / `no-cache`, else `max-age` (or `s-maxage`), at most [`MAX_CACHE`].
pub fn cache_lifetime(headers: &HeaderMap) -> Duration {
    let mut max_age = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            return Duration::ZERO;
        };
        for directive in value.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            if directive == "no-store" || directive == "no-cache" {
                return Duration::ZERO;
            }
            if let Some(seconds) = directive
                .strip_prefix("max-age=")
                .or_else(|| directive.strip_prefix("s-maxage="))
            {
                let Ok(seconds) = seconds.trim_matches('"').parse::<u64>() else {
                    return Duration::ZERO;
                };
                // Two max-ages: the stricter one holds.
                max_age = Some(max_age.map_or(seconds, |m: u64| m.min(seconds)));
            }
        }
    }
    max_age.map_or(Duration::ZERO, |s| Duration::from_secs(s).min(MAX_CACHE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn lifetime(values: &[&str]) -> Duration {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        cache_lifetime(&headers)
    }

    #[test]
    fn cache_control_decides_how_long_a_jwks_is_kept() {
        assert_eq!(lifetime(&[]), Duration::ZERO, "no header: not cached");
        assert_eq!(lifetime(&["max-age=120"]), Duration::from_secs(120));
        assert_eq!(lifetime(&["public, max-age=60"]), Duration::from_secs(60));
        assert_eq!(lifetime(&["max-age=60, no-store"]), Duration::ZERO);
        assert_eq!(lifetime(&["no-cache"]), Duration::ZERO);
        assert_eq!(
            lifetime(&["max-age=600", "max-age=30"]),
            Duration::from_secs(30)
        );
        assert_eq!(lifetime(&["max-age=99999999"]), MAX_CACHE);
        assert_eq!(lifetime(&["max-age=soon"]), Duration::ZERO);
    }

    #[test]
    fn a_jwks_must_be_an_object_with_keys() {
        assert_eq!(
            parse_jwks(br#"{"keys":[{"kty":"EC"}, 3]}"#).unwrap().len(),
            1
        );
        assert!(parse_jwks(b"not json").is_err());
        assert!(parse_jwks(br#"{"key":[]}"#).is_err());
        assert!(parse_jwks(br#"[1,2]"#).is_err());
    }
}
