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
use crate::fhir::FHIR_JSON;
use crate::fhir::capability::Outline;

/// Upper bound on an upstream CapabilityStatement the proxy reads.
const MAX_CAPABILITY_BYTES: usize = 16 * 1024 * 1024;

/// The last CapabilityStatement the upstream returned, and when.
pub struct MetadataCache {
    ttl: Duration,
    entry: Mutex<Option<Entry>>,
}

/// A cached CapabilityStatement: its bytes, as the upstream sent them (parsed again for each
/// metadata request, which are rare), and the resource types it lists (for each kick-off). Not the
/// parsed document: a server with every SearchParameter in its statement (hfs: 2.5 MB) parses into
/// tens of MB, which a sidecar should not hold, nor copy per request.
#[derive(Clone)]
struct Entry {
    at: Instant,
    statement: Statement,
}

/// An upstream CapabilityStatement as cached.
#[derive(Clone)]
pub struct Statement {
    raw: Bytes,
    /// The resource types its `rest` (mode `server`) lists; `None` when none.
    pub types: Option<Vec<String>>,
}

impl Statement {
    /// The document, parsed anew (the cache keeps bytes, not the parsed document).
    pub fn document(&self) -> Value {
        // Parsed and checked when it was cached.
        serde_json::from_slice(&self.raw).unwrap_or_default()
    }
}

/// What the upstream answered to `GET /metadata`.
pub enum Fetched {
    /// A CapabilityStatement, possibly from the cache.
    Statement(Statement),
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
        headers: HeaderMap,
    ) -> Result<Fetched, ProxyError> {
        Ok(match self.fresh() {
            Some(entry) => Fetched::Statement(entry.statement),
            None => match self.refresh(upstream, headers).await? {
                Ok(entry) => Fetched::Statement(entry.statement),
                Err(other) => other,
            },
        })
    }

    /// Asks the upstream; caches what is a CapabilityStatement, returns anything else as it came.
    async fn refresh(
        &self,
        upstream: &Upstream,
        mut headers: HeaderMap,
    ) -> Result<Result<Entry, Fetched>, ProxyError> {
        headers.insert(header::ACCEPT, HeaderValue::from_static(FHIR_JSON));
        let (parts, body) = upstream
            .get_small("metadata", "/metadata", headers, MAX_CAPABILITY_BYTES)
            .await?;
        // Only what is kept is built (the outline), not the document.
        let Some(statement) = (parts.status == StatusCode::OK)
            .then(|| Outline::parse(&body))
            .flatten()
        else {
            return Ok(Err(Fetched::Other(parts, body)));
        };
        let types = statement.types();
        let entry = Entry {
            at: Instant::now(),
            statement: Statement {
                raw: body,
                types: (!types.is_empty()).then_some(types),
            },
        };
        if !self.ttl.is_zero() {
            *self.entry.lock().unwrap_or_else(|e| e.into_inner()) = Some(entry.clone());
        }
        Ok(Ok(entry))
    }

    fn fresh(&self) -> Option<Entry> {
        let entry = self.entry.lock().unwrap_or_else(|e| e.into_inner());
        entry
            .as_ref()
            .filter(|e| e.at.elapsed() < self.ttl)
            .cloned()
    }
}
