//! Upstream search paging: builds each unit's search URL (with `_count`, the `_lastUpdated` bounds
//! and the sort), fetches pages under the global concurrency cap, and retries 5xx / 429 / timeouts
//! with capped exponential backoff that honours `Retry-After` (DESIGN "The upstream is protected").
//! `next` links may be absolute or relative; one naming another host (the upstream's own idea of
//! its address) is moved onto the configured upstream origin. Each request carries the
//! upstream credentials of the moment ([`Credentials`]); a 401 renews an OAuth token and the
//! request is sent once more.
//!
//! Whatever a `next` link carries (an offset, `_getpages`, an opaque cursor) is followed as it is.
//!
//! An upstream whose CapabilityStatement lists a type's search parameters without `_lastUpdated`
//! ([`Pager::lacks_last_updated`]) is searched without the `_lastUpdated` bounds and the sort; the
//! unit runner then applies the bounds to `meta.lastUpdated` itself (every resource is fetched:
//! slower with `_since`).

use std::sync::Arc;
use std::time::Duration;

/// Searches of one job counted at kick-off, at most ([`Pager::count_all`]).
pub const MAX_COUNTED: usize = 64;

use bytes::{Bytes, BytesMut};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use tokio::sync::Semaphore;
use url::Url;

use crate::config::Config;
use crate::fhir::capability::Outline;
use crate::job::now_millis;
use crate::store::JobStore;
use crate::upstream_auth::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The paging cursor is gone (410 Gone, or 404 on a `next` link): resume with a new query.
    #[error("the upstream paging cursor expired ({0})")]
    Expired(StatusCode),
    /// A client error that retrying cannot fix (400, 401, 403, ...).
    #[error("the upstream rejected the search with {status}: {body}")]
    Rejected { status: StatusCode, body: String },
    /// Retries exhausted.
    #[error("the upstream failed {attempts} times; last error: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("the upstream page is larger than {0} bytes")]
    TooLarge(usize),
}

pub struct Pager {
    client: reqwest::Client,
    base: Url,
    page_size: u32,
    sort: bool,
    max_attempts: u32,
    retry_base: Duration,
    retry_max: Duration,
    max_page_bytes: usize,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    /// The fleet-wide cap (Redis): `None` when this replica is the whole fleet.
    fleet: Option<Arc<dyn JobStore>>,
    page_timeout: Duration,
    /// What each request presents upstream (`[upstream.auth]`).
    credentials: Arc<Credentials>,
    /// The types the upstream cannot search by `_lastUpdated`, read once from its
    /// CapabilityStatement.
    no_last_updated: tokio::sync::OnceCell<Vec<String>>,
}

/// A fleet-wide upstream slot, given back when dropped: also when the fetch holding it is
/// cancelled (a prefetch dropped by a deleted job, a lost lease, a shutdown). Otherwise the slot
/// would stay taken until it expires, a page timeout later, and a few such cancellations would
/// stall every replica's exports for minutes.
struct FleetSlot {
    fleet: Arc<dyn JobStore>,
    holder: String,
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        let fleet = self.fleet.clone();
        let holder = std::mem::take(&mut self.holder);
        // Drop cannot wait; outside a runtime (a process exiting) the slot expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = fleet.release_slot(&holder).await {
                    tracing::debug!(error = %e, "cannot release an upstream slot; it expires by itself");
                }
            });
        }
    }
}

impl Pager {
    pub fn new(config: &Config, headers: HeaderMap) -> anyhow::Result<Self> {
        let e = &config.export;
        let mut headers = headers;
        headers.insert(ACCEPT, HeaderValue::from_static("application/fhir+json"));
        // An upstream that ignores a search parameter it does not know (hfs, HAPI's default)
        // would silently widen a `_typeFilter` to the whole type; strict handling makes it a
        // 400, which lands in the error file instead.
        headers.insert("prefer", HeaderValue::from_static("handling=strict"));
        let mut tls = crate::upstream_auth::tls::client_config(&config.upstream.tls)?
            .as_ref()
            .clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .default_headers(headers)
            .connect_timeout(config.connect_timeout())
            .timeout(Duration::from_millis(e.page_timeout_ms))
            .pool_max_idle_per_host(e.max_upstream_concurrency.max(4))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(Self {
            client,
            base: config.upstream_url()?,
            page_size: e.page_size,
            sort: e.sort_by_last_updated,
            max_attempts: e.retry_max_attempts,
            retry_base: Duration::from_millis(e.retry_base_ms),
            retry_max: Duration::from_millis(e.retry_max_ms),
            max_page_bytes: e.max_page_bytes,
            permits: Arc::new(Semaphore::new(e.max_upstream_concurrency)),
            max_concurrency: e.max_upstream_concurrency,
            fleet: None,
            page_timeout: Duration::from_millis(e.page_timeout_ms),
            credentials: Arc::new(Credentials::none()),
            no_last_updated: tokio::sync::OnceCell::new(),
        })
    }

    /// Presents `credentials` upstream (by default none).
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Whether the upstream cannot search `resource_type` by `_lastUpdated`: its
    /// CapabilityStatement lists search parameters for the type (or for every type) and
    /// `_lastUpdated` is not among them. A statement that lists none, or that cannot be read,
    /// says nothing: `_lastUpdated` is then assumed (the FHIR search basics).
    pub async fn lacks_last_updated(&self, resource_type: &str) -> bool {
        let types = self
            .no_last_updated
            .get_or_init(|| async {
                let url = format!("{}/metadata", self.base_url());
                match self.fetch(&url, false).await {
                    Ok(body) => Outline::parse(&body)
                        .map(|outline| outline.types_without_last_updated())
                        .unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the upstream's CapabilityStatement; assuming _lastUpdated search");
                        Vec::new()
                    }
                }
            })
            .await;
        types.iter().any(|t| t == resource_type)
    }

    /// The first URL of a search without `_lastUpdated` bounds and sort, for an upstream that
    /// [`Pager::lacks_last_updated`].
    pub fn unbounded_search_url(&self, search: &str) -> String {
        let url = format!("{}/{}", self.base_url(), search);
        let sep = if search.ends_with('?') || search.ends_with('&') {
            ""
        } else if search.contains('?') {
            "&"
        } else {
            "?"
        };
        format!("{url}{sep}_count={}", self.page_size)
    }

    /// Makes `export.max_upstream_concurrency` hold for every replica sharing `store` together.
    pub fn with_fleet_cap(mut self, store: Arc<dyn JobStore>) -> Self {
        self.fleet = Some(store);
        self
    }

    /// The first URL of a search (`Type?query` relative to the upstream base), bounded by
    /// `_lastUpdated` `lower` (exclusive `gt`, or inclusive `ge` when resuming) and `upper` (`le`).
    pub fn search_url(&self, search: &str, lower: Option<(&str, &str)>, upper: &str) -> String {
        let mut url = format!("{}/{}", self.base_url(), search);
        let mut sep = if search.contains('?') { '&' } else { '?' };
        if url.ends_with('?') {
            sep = ' ';
        }
        let mut push = |url: &mut String, param: String| {
            if sep != ' ' {
                url.push(sep);
            }
            url.push_str(&param);
            sep = '&';
        };
        push(&mut url, format!("_count={}", self.page_size));
        if let Some((prefix, instant)) = lower {
            push(
                &mut url,
                format!("_lastUpdated={prefix}{}", encode(instant)),
            );
        }
        push(&mut url, format!("_lastUpdated=le{}", encode(upper)));
        if self.sort {
            push(&mut url, "_sort=_lastUpdated".to_owned());
        }
        url
    }

    /// How many resources `search` would return between the bounds, as the upstream counts them
    /// (`_summary=count`); `None` when it does not say (no `Bundle.total`, an error, no answer).
    /// One attempt: a count only sizes and orders the work.
    pub async fn count(
        &self,
        search: &str,
        lower: Option<(&str, &str)>,
        upper: &str,
    ) -> Option<u64> {
        let url = format!("{}&_summary=count", self.search_url(search, lower, upper));
        bundle_total(&self.try_fetch(&url).await.ok()?)
    }

    /// [`Self::count`] of each search, at most the concurrency cap at a time; none counted when
    /// there are more than [`MAX_COUNTED`] (patient batches of a large population: the counts
    /// would cost more than they save).
    pub async fn count_all(
        &self,
        searches: &[(String, String)],
        lower: Option<(&str, &str)>,
        upper: &str,
    ) -> Vec<Option<u64>> {
        if searches.len() > MAX_COUNTED {
            return vec![None; searches.len()];
        }
        futures_util::future::join_all(
            searches
                .iter()
                .map(|(_, search)| self.count(search, lower, upper)),
        )
        .await
    }

    /// A `next` link made absolute, on the configured upstream origin; `None` when it cannot be
    /// read, or when it names the very page it is on (following it would never end: every
    /// caller pages until there is no next link).
    pub fn resolve_next(&self, current: &str, next: &str) -> Option<String> {
        let base = Url::parse(current).ok()?;
        let mut next = base.join(next).ok()?;
        if next.origin() != self.base.origin() {
            next.set_scheme(self.base.scheme()).ok()?;
            next.set_host(self.base.host_str()).ok()?;
            next.set_port(self.base.port()).ok()?;
        }
        let next: String = next.into();
        (next != current).then_some(next)
    }

    /// The upstream's FHIR base URL, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Fetches one page, retrying what can be retried. `is_next_link` makes 404 mean an expired
    /// cursor rather than a rejected search.
    pub async fn fetch(&self, url: &str, is_next_link: bool) -> Result<Bytes, FetchError> {
        let mut last = String::new();
        for attempt in 0..self.max_attempts {
            let wait = match self.try_fetch(url).await {
                Ok(bytes) => return Ok(bytes),
                Err(Attempt::Fatal(status, body)) => {
                    return Err(
                        if status == StatusCode::GONE
                            || (is_next_link && status == StatusCode::NOT_FOUND)
                        {
                            FetchError::Expired(status)
                        } else {
                            FetchError::Rejected { status, body }
                        },
                    );
                }
                Err(Attempt::TooLarge) => return Err(FetchError::TooLarge(self.max_page_bytes)),
                Err(Attempt::Retry {
                    reason,
                    retry_after,
                }) => {
                    last = reason;
                    retry_after
                        .unwrap_or_else(|| self.backoff(attempt))
                        .min(self.retry_max)
                }
            };
            if attempt + 1 < self.max_attempts {
                tracing::debug!(url, attempt, wait_ms = wait.as_millis() as u64, error = %last, "retrying upstream page");
                tokio::time::sleep(wait).await;
            }
        }
        Err(FetchError::Exhausted {
            attempts: self.max_attempts,
            last,
        })
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.retry_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.retry_max)
    }

    async fn try_fetch(&self, url: &str) -> Result<Bytes, Attempt> {
        let _permit = self.permits.acquire().await.map_err(|_| Attempt::Retry {
            reason: "shutting down".into(),
            retry_after: None,
        })?;
        let Some(fleet) = &self.fleet else {
            return self.request(url).await;
        };
        let holder = uuid::Uuid::new_v4().to_string();
        loop {
            let now = now_millis();
            // A crashed holder's slot frees itself once its request could no longer be running.
            let expires = now + self.page_timeout.as_millis() as u64 + 5_000;
            match fleet
                .acquire_slot(&holder, now, expires, self.max_concurrency)
                .await
            {
                Ok(true) => break,
                Ok(false) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => {
                    return Err(Attempt::Retry {
                        reason: e.to_string(),
                        retry_after: None,
                    });
                }
            }
        }
        let _slot = FleetSlot {
            fleet: fleet.clone(),
            holder,
        };
        self.request(url).await
    }

    /// One upstream GET with the current credentials; after a 401 to an OAuth token, once more
    /// with a new one.
    async fn request(&self, url: &str) -> Result<Bytes, Attempt> {
        let mut renewed = false;
        loop {
            let authorization =
                self.credentials
                    .authorization()
                    .await
                    .map_err(|e| Attempt::Retry {
                        reason: e.to_string(),
                        retry_after: None,
                    })?;
            match self.request_with(url, authorization.as_ref()).await {
                Err(Attempt::Fatal(StatusCode::UNAUTHORIZED, _))
                    if !renewed && self.credentials.rejected(authorization.as_ref()) =>
                {
                    tracing::debug!(url, "the upstream refused its token; renewing it");
                    renewed = true;
                }
                outcome => return outcome,
            }
        }
    }

    /// One upstream GET, its body read up to the page limit.
    async fn request_with(
        &self,
        url: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<Bytes, Attempt> {
        let started = std::time::Instant::now();
        let mut request = self.client.get(url);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value.clone());
        }
        let response = request.send().await;
        // Latency to response headers, as for passthrough requests (route `export_page`).
        let outcome = match &response {
            Ok(_) => "ok",
            Err(e) if e.is_timeout() => "timeout",
            Err(e) if e.is_connect() => "connect_error",
            Err(_) => "protocol_error",
        };
        crate::telemetry::metrics::upstream("export_page", outcome, started.elapsed());
        let response = response.map_err(|e| Attempt::Retry {
            reason: e.to_string(),
            retry_after: None,
        })?;
        let status = response.status();
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(Attempt::Retry {
                reason: format!("upstream answered {status}"),
                retry_after,
            });
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Attempt::Fatal(status, body.chars().take(500).collect()));
        }
        let mut body = BytesMut::new();
        let mut response = response;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.max_page_bytes {
                        return Err(Attempt::TooLarge);
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(e) => {
                    return Err(Attempt::Retry {
                        reason: e.to_string(),
                        retry_after: None,
                    });
                }
            }
        }
    }

    /// Reads one resource (e.g. `Group/1`) from the upstream.
    pub async fn read(&self, path: &str) -> Result<Bytes, FetchError> {
        let url = format!("{}/{}", self.base_url(), path);
        self.fetch(&url, false).await
    }
}

enum Attempt {
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    Fatal(StatusCode, String),
    TooLarge,
}

/// A searchset Bundle's `total` (what `_summary=count` answers); `None` when it has none.
pub fn bundle_total(body: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Total {
        total: Option<u64>,
    }
    serde_json::from_slice::<Total>(body).ok()?.total
}

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pager() -> Pager {
        let mut config = Config::default();
        config.upstream.url = "http://up:8080/fhir".into();
        Pager::new(&config, HeaderMap::new()).unwrap()
    }

    #[test]
    fn search_urls_carry_count_bounds_and_sort() {
        let p = pager();
        assert_eq!(
            p.search_url(
                "Observation?patient=a,b",
                Some(("gt", "2024-01-01T00:00:00Z")),
                "2025-01-01T00:00:00+01:00"
            ),
            "http://up:8080/fhir/Observation?patient=a,b&_count=1000&_lastUpdated=gt2024-01-01T00%3A00%3A00Z&_lastUpdated=le2025-01-01T00%3A00%3A00%2B01%3A00&_sort=_lastUpdated"
        );
        assert_eq!(
            p.search_url("Patient", None, "2025-01-01T00:00:00Z"),
            "http://up:8080/fhir/Patient?_count=1000&_lastUpdated=le2025-01-01T00%3A00%3A00Z&_sort=_lastUpdated"
        );
    }

    #[test]
    fn next_links_are_resolved_onto_the_upstream_origin() {
        let p = pager();
        let current = "http://up:8080/fhir/Patient?_count=10";
        assert_eq!(
            p.resolve_next(current, "?page=2").unwrap(),
            "http://up:8080/fhir/Patient?page=2"
        );
        assert_eq!(
            p.resolve_next(current, "/fhir/p/2").unwrap(),
            "http://up:8080/fhir/p/2"
        );
        assert_eq!(
            p.resolve_next(current, "http://internal-name:9999/fhir/p/3")
                .unwrap(),
            "http://up:8080/fhir/p/3"
        );
        assert_eq!(
            p.resolve_next(current, current),
            None,
            "a link to this page"
        );
    }

    #[test]
    fn types_whose_search_parameters_leave_out_last_updated_are_found() {
        let without = |statement: serde_json::Value| {
            Outline::parse(statement.to_string().as_bytes())
                .unwrap()
                .types_without_last_updated()
        };
        let statement = serde_json::json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": [
            {"type": "Patient", "searchParam": [{"name": "_id"}, {"name": "_lastUpdated"}]},
            {"type": "Observation", "searchParam": [{"name": "_id"}, {"name": "patient"}]},
            {"type": "Encounter"},
        ]}]});
        assert_eq!(without(statement), ["Observation"]);
        let common = serde_json::json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server",
            "searchParam": [{"name": "_lastUpdated"}],
            "resource": [{"type": "Observation", "searchParam": [{"name": "patient"}]}]}]});
        assert!(without(common).is_empty());
        let p = pager();
        assert_eq!(
            p.unbounded_search_url("Observation?patient=a"),
            "http://up:8080/fhir/Observation?patient=a&_count=1000"
        );
        assert_eq!(
            p.unbounded_search_url("Patient"),
            "http://up:8080/fhir/Patient?_count=1000"
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = pager();
        assert_eq!(p.backoff(0), Duration::from_millis(500));
        assert_eq!(p.backoff(2), Duration::from_millis(2000));
        assert_eq!(p.backoff(30), Duration::from_millis(30_000));
    }
}
