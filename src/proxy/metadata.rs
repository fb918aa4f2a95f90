//! The upstream's CapabilityStatement, cached for `metadata.cache_ttl_secs`. Two readers share it:
//! the metadata endpoint (which adds the Bulk Data and SMART entries per request) and export
//! planning (which resource types the upstream serves). It lives beside the upstream client, below
//! both, so the application state does not depend on an endpoint to hold it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use bytes::Bytes;
use serde_json::Value;

use super::{ProxyError, Upstream};
use crate::fhir::{FHIR_JSON, capability};

/// Upper bound on an upstream CapabilityStatement the proxy reads.
const MAX_CAPABILITY_BYTES: usize = 16 * 1024 * 1024;

/// The last CapabilityStatement the upstream returned, and when.
pub struct MetadataCache {
    ttl: Duration,
    entry: Mutex<Option<(Instant, Value)>>,
}

/// What the upstream answered to `GET /metadata`.
pub enum Fetched {
    /// A CapabilityStatement (JSON), possibly from the cache.
    Statement(Value),
    /// Anything else (an error, XML, not JSON), as the upstream sent it.
    Other(axum::http::response::Parts, Bytes),
}

impl MetadataCache {
    pub fn new(ttl_secs: u64) -> Self {
        Self {
            ttl: Duration::from_secs(ttl_secs),
            entry: Mutex::new(None),
        }
    }

    /// The upstream's CapabilityStatement: the cached one while it is fresh, otherwise asked of
    /// `upstream` with `headers` (plus `Accept: application/fhir+json`) and cached when it is one.
    pub async fn fetch(
        &self,
        upstream: &Upstream,
        mut headers: HeaderMap,
    ) -> Result<Fetched, ProxyError> {
        if let Some(cached) = self.get() {
            return Ok(Fetched::Statement(cached));
        }
        headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
        let (parts, body) = upstream
            .get_small("metadata", "/metadata", headers, MAX_CAPABILITY_BYTES)
            .await?;
        let parsed = (parts.status == StatusCode::OK)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
            .filter(capability::is_capability_statement);
        Ok(match parsed {
            Some(statement) => {
                self.put(&statement);
                Fetched::Statement(statement)
            }
            None => Fetched::Other(parts, body),
        })
    }

    fn get(&self) -> Option<Value> {
        let entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        entry
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    fn put(&self, value: &Value) {
        if !self.ttl.is_zero() {
            *self.entry.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), value.clone()));
        }
    }
}
