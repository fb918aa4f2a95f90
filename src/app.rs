//! The application state every handler shares: configuration, the upstream client, caches, the
//! authorization server and the metrics handle. Built once per server; cloned as `AppState` (an `Arc`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::{HeaderMap, HeaderName, header};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{Auth, JtiError, JtiStore};
use crate::config::{Config, StorageBackend, StoreBackend};
use crate::export::Exporter;
use crate::export::group::{MemberRules, Members};
use crate::export::pager::Pager;
use crate::job::now_unix;
use crate::proxy::headers::{X_FORWARDED_HOST, X_FORWARDED_PROTO, first_forwarded};
use crate::proxy::{ClientContext, Fetched, MetadataCache, ProxyError, Upstream};
use crate::routes::RouteTable;
use crate::storage::Storage;
use crate::store::JobStore;
use crate::telemetry::metrics;
use crate::upstream_auth::Credentials;

pub type AppState = Arc<App>;

pub struct App {
    pub config: Config,
    pub upstream: Upstream,
    /// What the proxy presents upstream on its own requests and, with passthrough authorization
    /// on, on passthrough (`[upstream.auth]`).
    pub upstream_credentials: Arc<Credentials>,
    pub metadata: MetadataCache,
    /// Token endpoint and bearer-token checks (SMART Backend Services).
    pub auth: Auth,
    pub metrics: PrometheusHandle,
    pub store: Arc<dyn JobStore>,
    pub storage: Storage,
    pub exporter: Arc<Exporter>,
    /// Path under which the proxy serves FHIR (`""` for the root).
    pub base_path: String,
    /// What the proxy answers itself; everything else is passthrough.
    pub routes: RouteTable,
    /// Whether the listener speaks TLS.
    pub tls: bool,
    /// The public base URL `server.public_url` names, if set (see [`App::public_base`]).
    configured_public_base: Option<String>,
}

impl App {
    /// Builds the state: opens the job store and the file storage, connects nothing else yet.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let store = crate::store::open(&config.store).await.with_context(|| {
            match config.store.backend {
                StoreBackend::Embedded => format!(
                    "cannot open the embedded job store {} (store.path): one process at a time \
                     can; is another fhir-bulk-proxy running with it? Several replicas need \
                     store.backend = \"redis\"",
                    config.store.path.display()
                ),
                StoreBackend::Redis => {
                    "cannot connect to the Redis job store (store.redis_url)".into()
                }
            }
        })?;
        let storage = Storage::from_config(&config.storage)?;
        metrics::init_series(
            match config.store.backend {
                StoreBackend::Embedded => "embedded",
                StoreBackend::Redis => "redis",
            },
            match config.storage.backend {
                StorageBackend::Local => "local",
                StorageBackend::S3 => "s3",
            },
        );
        let tls = crate::upstream_auth::tls::client_config(&config.upstream.tls)?;
        let upstream_credentials = Arc::new(Credentials::new(&config, &tls)?);
        let mut pager =
            Pager::new(&config, HeaderMap::new())?.with_credentials(upstream_credentials.clone());
        if config.store.backend == StoreBackend::Redis {
            pager = pager.with_fleet_cap(store.clone());
        }
        let exporter = Arc::new(Exporter::new(
            store.clone(),
            storage.clone(),
            pager,
            config.export.clone(),
        ));
        Ok(Self {
            upstream: Upstream::new(&config)?,
            upstream_credentials,
            metadata: MetadataCache::new(config.metadata.cache_ttl_secs),
            auth: Auth::with_jti_store(&config, Arc::new(StoreJti(store.clone())))?,
            metrics: metrics::handle(),
            store,
            storage,
            exporter,
            base_path: config.base_path(),
            routes: RouteTable::new(
                &config.base_path(),
                config.auth.enabled,
                &config.auth.token_path,
            ),
            tls: config.server.tls.is_some(),
            configured_public_base: config.public_base(),
            config,
        })
    }

    /// The upstream's CapabilityStatement (cached), or what it answered instead. Forwards the
    /// client's `X-Request-Id`, and its `Authorization` only where passthrough forwards it anyway:
    /// behind the gate it is the proxy's token, which is not the upstream's to see. The proxy's own
    /// upstream credentials stand in when the client sent none (planning an export needs them);
    /// a 401 to an OAuth token renews it and asks once more.
    pub async fn upstream_metadata(
        &self,
        client_headers: Option<&HeaderMap>,
    ) -> Result<Fetched, ProxyError> {
        let mut headers = HeaderMap::new();
        let mut forwarded = vec![HeaderName::from_static("x-request-id")];
        if !self.auth.protects_passthrough() {
            forwarded.push(header::AUTHORIZATION);
        }
        for name in forwarded {
            if let Some(value) = client_headers.and_then(|h| h.get(&name)) {
                headers.insert(name, value.clone());
            }
        }
        if headers.contains_key(header::AUTHORIZATION) {
            return self.metadata.fetch(&self.upstream, headers).await;
        }
        let mut renewed = false;
        loop {
            let ours = self.upstream_credentials.authorization().await?;
            let mut headers = headers.clone();
            if let Some(value) = &ours {
                headers.insert(header::AUTHORIZATION, value.clone());
            }
            let fetched = self.metadata.fetch(&self.upstream, headers).await?;
            match &fetched {
                Fetched::Other(parts, _)
                    if parts.status == axum::http::StatusCode::UNAUTHORIZED
                        && !renewed
                        && self.upstream_credentials.rejected(ours.as_ref()) =>
                {
                    renewed = true;
                }
                _ => return Ok(fetched),
            }
        }
    }

    /// Resource types the upstream's CapabilityStatement lists (`None` when it cannot tell).
    pub async fn upstream_types(&self) -> Option<Vec<String>> {
        match self.upstream_metadata(None).await.ok()? {
            Fetched::Statement(statement) => statement.types,
            Fetched::Other(..) => None,
        }
    }

    /// The Patients of `Group/{id}` on the upstream at `now`, after the membership rules
    /// (`export.group_active_members_only`, nested Groups to `export.group_max_depth`:
    /// [`crate::export::group`]), and what those rules left out.
    pub async fn group_members(
        &self,
        id: &str,
        now: crate::fhir::Instant,
    ) -> Result<Members, UpstreamReadError> {
        let rules = MemberRules {
            active_only: self.config.export.group_active_members_only,
            max_depth: self.config.export.group_max_depth,
        };
        crate::export::group::resolve(id, now, &rules, |group| self.read_group(group))
            .await?
            .ok_or_else(|| {
                UpstreamReadError::NotFound(format!(
                    "Group/{id} does not exist on the upstream server"
                ))
            })
    }

    /// `Group/{id}` from the upstream; `None` when it has none.
    async fn read_group(&self, id: String) -> Result<Option<serde_json::Value>, UpstreamReadError> {
        let body = match self.exporter.pager.read(&format!("Group/{id}")).await {
            Ok(body) => body,
            Err(crate::export::pager::FetchError::Rejected { status, .. })
                if status.as_u16() == 404 || status.as_u16() == 410 =>
            {
                return Ok(None);
            }
            Err(other) => {
                return Err(UpstreamReadError::Failed(format!(
                    "cannot read Group/{id}: {other}"
                )));
            }
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| UpstreamReadError::Failed(format!("Group/{id} is not valid JSON: {e}")))
    }

    /// Every Patient id on the upstream (Patient-level export).
    pub async fn exporter_patients(&self) -> Result<Vec<String>, UpstreamReadError> {
        let pager = &self.exporter.pager;
        let search = "Patient?_elements=id";
        let mut url = if pager.lacks_last_updated("Patient").await {
            pager.unbounded_search_url(search)
        } else {
            pager.search_url(search, None, &crate::fhir::Instant::now().to_string())
        };
        let mut ids = Vec::new();
        loop {
            let body = pager
                .fetch(&url, !ids.is_empty())
                .await
                .map_err(|e| UpstreamReadError::Failed(format!("cannot list patients: {e}")))?;
            let page = crate::export::ndjson::read_page(&body, "Patient", &[])
                .map_err(|e| UpstreamReadError::Failed(format!("cannot list patients: {e}")))?;
            ids.extend(page.lines.into_iter().filter_map(|l| l.id));
            // A `next` link to this very page (an upstream bug) would be followed forever.
            match page.next.and_then(|n| pager.resolve_next(&url, &n)) {
                Some(next) => url = next,
                None => return Ok(ids),
            }
        }
    }

    /// How many Patients the upstream holds (`Patient?_summary=count`); `None` when it does not
    /// say (no `Bundle.total`) or cannot be asked. Planning only: a failure keeps patient batches.
    pub async fn patient_count(&self) -> Option<u64> {
        let pager = &self.exporter.pager;
        match pager.read("Patient?_summary=count").await {
            Ok(body) => crate::export::pager::bundle_total(&body),
            Err(e) => {
                tracing::info!(error = %e, "cannot count the upstream's Patients; patient batches are used");
                None
            }
        }
    }

    /// The scheme clients use to reach the proxy.
    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// The proxy's public FHIR base URL (no trailing slash): `server.public_url` when set, otherwise
    /// derived from `X-Forwarded-Proto` / `X-Forwarded-Host` (an ingress in front) or `Host`.
    pub fn public_base(&self, headers: &HeaderMap) -> String {
        let host = first_forwarded(headers, &X_FORWARDED_HOST)
            .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()));
        let proto = first_forwarded(headers, &X_FORWARDED_PROTO);
        crate::proxy::headers::public_base(
            self.configured_public_base.as_deref(),
            proto,
            host,
            self.scheme(),
            &self.base_path,
        )
    }

    /// What passthrough needs to know of the client and of the proxy's public URL.
    pub fn client_context(&self, peer: Option<SocketAddr>) -> ClientContext<'_> {
        ClientContext {
            addr: peer.map(|p| p.ip()),
            scheme: self.scheme(),
            configured_public_base: self.configured_public_base.as_deref(),
            base_path: &self.base_path,
        }
    }
}

/// Why an export's patients could not be listed from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamReadError {
    /// The group does not exist on the upstream.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

/// The job store as the token endpoint's replay cache, so replicas share `jti`s.
struct StoreJti(Arc<dyn JobStore>);

#[async_trait::async_trait]
impl JtiStore for StoreJti {
    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        expires_at_unix: u64,
    ) -> Result<bool, JtiError> {
        self.0
            .first_use(issuer, jti, now_unix(), expires_at_unix)
            .await
            .map_err(|e| JtiError::Unavailable(e.to_string()))
    }
}
