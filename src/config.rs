//! Typed configuration: built-in defaults < `proxy.toml` (or `--config PATH`) < environment
//! variables `BULK_PROXY_...` (nesting with `__`, e.g. `BULK_PROXY_UPSTREAM__URL`).
//!
//! Loading never starts anything; [`Config::validate`] checks every value and names the key, the value
//! and the reason on failure, so `fhir-bulk-proxy check-config` and start-up report the same errors.
//! [`Config::warnings`] is the one list of what is allowed but probably wrong: `run` logs it at
//! start, `check-config` prints it. `proxy.toml` at the repository root documents every key, its
//! default and its environment name.
//!
//! Relative paths (see [`paths`]) resolve against the configuration file's directory when they come
//! from the file, or are defaults and a file was read; against the working directory when they come
//! from the environment or no file was read.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use url::Url;

mod auth;
mod check;
pub mod paths;
mod secret;
pub use auth::{AuthConfig, ClientConfig, UpstreamAuthConfig, UpstreamAuthScheme};
pub use paths::Loaded;
pub use secret::Secret;

/// Environment variable prefix; nested keys are joined with `__`.
pub const ENV_PREFIX: &str = "BULK_PROXY_";

/// The whole configuration tree.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub metadata: MetadataConfig,
    pub auth: AuthConfig,
    pub export: ExportConfig,
    pub store: StoreConfig,
    pub storage: StorageConfig,
    /// Where this configuration came from (not a key): set by [`Config::load`].
    #[serde(skip)]
    pub loaded: Loaded,
}

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

/// The FHIR server behind the proxy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The upstream's FHIR base URL, e.g. `http://fhir:8080/fhir`. Required.
    pub url: String,
    /// TCP connect timeout, in milliseconds. Default 5000.
    pub connect_timeout_ms: u64,
    /// Time to wait for the upstream's response headers, in milliseconds; exceeding it answers 504.
    /// Default 60000.
    pub request_timeout_ms: u64,
    /// Idle pooled connections are closed after this many seconds. Default 90.
    pub pool_idle_timeout_secs: u64,
    /// Idle connections kept per upstream host, by each fast-path lane and by the general path.
    /// Default 64.
    pub pool_max_idle_per_host: usize,
    /// Credentials the proxy presents upstream on its own requests (`[upstream.auth]`).
    /// Default: none.
    pub auth: UpstreamAuthConfig,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object a line) or `text` (human). Default `text`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `fhir_bulk_proxy=debug,info`. Default `info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// The augmented CapabilityStatement served at `{base}/metadata`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataConfig {
    /// How long the upstream's CapabilityStatement is cached, in seconds (0 = not cached). Default 60.
    pub cache_ttl_secs: u64,
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

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout_ms: 5_000,
            request_timeout_ms: 60_000,
            pool_idle_timeout_secs: 90,
            pool_max_idle_per_host: 64,
            auth: UpstreamAuthConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self { cache_ttl_secs: 60 }
    }
}

/// How exports are built.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// `_count` asked of the upstream for each search page. Default 1000.
    pub page_size: u32,
    /// Units (searches) one replica works on at once. Default 4.
    pub workers: usize,
    /// Cap on concurrent upstream search requests: from all replicas together with the Redis
    /// store, from this replica with the embedded one. Default 8.
    pub max_upstream_concurrency: usize,
    /// Patients per search at Patient and Group level (`patient=a,b,c`). Default 100.
    pub patient_batch_size: usize,
    /// Longest search URL the proxy sends; patient batches are cut to stay below it. Default 4096.
    pub max_search_url_bytes: usize,
    /// A new output file is started past this many bytes. Default 256 MiB.
    pub max_file_bytes: u64,
    /// A new output file is started past this many resources. Default 100000.
    pub max_file_resources: u64,
    /// Attempts per upstream page (5xx, 429, timeouts) before the unit fails. Default 5.
    pub retry_max_attempts: u32,
    /// First retry delay in milliseconds, doubled each attempt up to `retry_max_ms`; also the first
    /// delay before a failed finalisation is tried again. Default 500.
    pub retry_base_ms: u64,
    /// Longest retry delay (also caps a `Retry-After`), milliseconds. Default 30000.
    pub retry_max_ms: u64,
    /// Time allowed for one upstream search page, milliseconds. Default 120000.
    pub page_timeout_ms: u64,
    /// Largest search page the proxy reads, bytes. Default 64 MiB.
    pub max_page_bytes: usize,
    /// Sort searches by `_lastUpdated`, so that a unit whose paging cursor expired can resume from
    /// its last `meta.lastUpdated` instead of from scratch. Default true.
    pub sort_by_last_updated: bool,
    /// Seconds a completed job and its files are kept (the manifest's `Expires`). Default 3600.
    pub job_ttl_secs: u64,
    /// Running exports one client may have at once; more answer 429. Default 2.
    pub max_active_jobs_per_client: usize,
    /// `Retry-After` told to status pollers, seconds; polling more than twice as fast answers 429.
    /// Default 2.
    pub poll_retry_after_secs: u64,
    /// Seconds a worker's claim on a unit lasts without a heartbeat. Default 30.
    pub lease_secs: u64,
    /// Seconds between sweeps that delete expired jobs and their files, and finalise jobs whose
    /// units are all done but whose finaliser died. Default 60.
    pub sweep_interval_secs: u64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            page_size: 1000,
            workers: 4,
            max_upstream_concurrency: 8,
            patient_batch_size: 100,
            max_search_url_bytes: 4096,
            max_file_bytes: 256 * 1024 * 1024,
            max_file_resources: 100_000,
            retry_max_attempts: 5,
            retry_base_ms: 500,
            retry_max_ms: 30_000,
            page_timeout_ms: 120_000,
            max_page_bytes: 64 * 1024 * 1024,
            sort_by_last_updated: true,
            job_ttl_secs: 3600,
            max_active_jobs_per_client: 2,
            poll_retry_after_secs: 2,
            lease_secs: 30,
            sweep_interval_secs: 60,
        }
    }
}

/// Where job state lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` (one node, a file on local disk) or `redis` (several replicas). Default `embedded`.
    pub backend: StoreBackend,
    /// Database file of the embedded store. Default `./data/jobs.redb`.
    pub path: PathBuf,
    /// Redis URL for the `redis` backend, e.g. `redis://redis:6379/0`. Default unset.
    pub redis_url: Option<Secret>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Embedded,
    Redis,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Embedded,
            path: PathBuf::from("data/jobs.redb"),
            redis_url: None,
        }
    }
}

/// Where export files live.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `local` (a directory) or `s3` (an S3-compatible bucket, `[storage.s3]`). Default `local`.
    pub backend: StorageBackend,
    /// Directory for NDJSON files with the `local` backend (shared by all replicas when there are
    /// several). Default `./data/files`.
    pub path: PathBuf,
    /// With `s3`: put presigned object URLs in manifests (`requiresAccessToken: false`), valid for
    /// at most `auth.token_lifetime_secs`; re-requesting the manifest signs them anew. Otherwise
    /// files are downloaded through the proxy with a bearer token. Default false.
    pub presigned_urls: bool,
    /// The bucket for the `s3` backend.
    pub s3: S3Config,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Local,
    S3,
}

/// An S3-compatible bucket. Credentials left unset come from the environment the AWS way
/// (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, web identity, instance metadata).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name. Required with `storage.backend = "s3"`.
    pub bucket: String,
    /// Endpoint URL for S3-compatible servers (MinIO, Garage, Ceph...), e.g. `http://minio:9000`;
    /// requests are path-style. Default: unset, AWS S3 for `region`.
    pub endpoint: Option<String>,
    /// Region. Default `us-east-1`.
    pub region: String,
    /// Access key id. Default: unset (from the environment).
    pub access_key_id: Option<String>,
    /// Secret access key. Default: unset (from the environment).
    pub secret_access_key: Option<Secret>,
    /// Key prefix for export files (`{prefix}/{job}/{file}`). Default: unset, the bucket root.
    pub prefix: String,
    /// Allow a plain-HTTP endpoint. Default false.
    pub allow_http: bool,
    /// Bytes buffered per file before they are uploaded as one part (a unit's progress is
    /// checkpointed at each part upload, so this is also what a crashed worker re-fetches at
    /// most). At least 5 MiB, S3's minimum part size. Default 8 MiB.
    pub part_size_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Local,
            path: PathBuf::from("data/files"),
            presigned_urls: false,
            s3: S3Config::default(),
        }
    }
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: String::new(),
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: None,
            secret_access_key: None,
            prefix: String::new(),
            allow_http: false,
            part_size_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("{key} is required: {reason}")]
    Missing { key: &'static str, reason: String },
    #[error("invalid `{key}` = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

fn invalid(key: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// The configuration file read: `path` (the `--config` argument, which must exist), else
    /// `proxy.toml` in the working directory when it exists (not in its parents).
    pub fn file(path: Option<&Path>) -> Option<PathBuf> {
        match path {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from("proxy.toml")).filter(|p| p.is_file()),
        }
    }

    /// The figment of defaults < file < environment, the file as [`Config::file`] finds it.
    pub fn figment(path: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = Self::file(path) {
            // `file_exact`: an explicit file must exist (a typo must not silently fall back to
            // defaults), and a missing ./proxy.toml is not looked for in parent directories.
            figment = figment.merge(Toml::file_exact(file));
        }
        // BULK_PROXY_CONFIG names the file (the CLI's --config), it is not a key.
        figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["CONFIG"]))
    }

    /// Loads and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_figment(Self::figment(path))
    }

    /// Extracts, resolves relative paths (see [`paths`]) and validates.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.resolve_paths(&figment);
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that can be wrong; the error names the key, the value and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("server.listen", &self.server.listen, e.to_string()))?;
        self.upstream_url()?;
        if let Some(public) = &self.server.public_url {
            parse_base_url("server.public_url", public)?;
        }
        if let Some(base) = &self.server.base_path {
            if !base.starts_with('/') || base.contains(['?', '#']) {
                return Err(invalid(
                    "server.base_path",
                    base,
                    "must be an absolute path such as `/fhir`, without query or fragment",
                ));
            }
        }
        if let Some(tls) = &self.server.tls {
            for (key, path) in [("server.tls.cert", &tls.cert), ("server.tls.key", &tls.key)] {
                if !path.is_file() {
                    return Err(invalid(key, path.display().to_string(), "no such file"));
                }
            }
        }
        if self.server.max_body_bytes < 1024 {
            return Err(invalid(
                "server.max_body_bytes",
                self.server.max_body_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        self.validate_client_limits()?;
        for (key, value) in [
            (
                "upstream.connect_timeout_ms",
                self.upstream.connect_timeout_ms,
            ),
            (
                "upstream.request_timeout_ms",
                self.upstream.request_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "0", "must be greater than 0"));
            }
        }
        self.upstream.auth.validate()?;
        self.auth.validate()?;
        self.validate_export()?;
        if self.store.backend == StoreBackend::Redis {
            let url = self.store.redis_url.as_ref().map_or("", |url| url.expose());
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "store.redis_url",
                    "(hidden: it may hold a password)",
                    "required with store.backend = \"redis\": a redis:// or rediss:// URL",
                ));
            }
        }
        self.validate_storage()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", &self.log.level, e.to_string()))?;
        Ok(())
    }

    /// The client timeouts and the connection cap: 0 would disable nothing and refuse everything,
    /// and past an hour a timeout no longer protects anyone.
    fn validate_client_limits(&self) -> Result<(), ConfigError> {
        let s = &self.server;
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

    fn validate_export(&self) -> Result<(), ConfigError> {
        let e = &self.export;
        let positive = [
            ("export.page_size", e.page_size as u64),
            ("export.workers", e.workers as u64),
            (
                "export.max_upstream_concurrency",
                e.max_upstream_concurrency as u64,
            ),
            ("export.patient_batch_size", e.patient_batch_size as u64),
            ("export.max_file_resources", e.max_file_resources),
            ("export.retry_max_attempts", u64::from(e.retry_max_attempts)),
            ("export.page_timeout_ms", e.page_timeout_ms),
            (
                "export.max_active_jobs_per_client",
                e.max_active_jobs_per_client as u64,
            ),
            ("export.poll_retry_after_secs", e.poll_retry_after_secs),
            ("export.lease_secs", e.lease_secs),
            ("export.sweep_interval_secs", e.sweep_interval_secs),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "0", "must be greater than 0"));
            }
        }
        if e.max_search_url_bytes < 256 {
            return Err(invalid(
                "export.max_search_url_bytes",
                e.max_search_url_bytes.to_string(),
                "must be at least 256",
            ));
        }
        if e.max_file_bytes < 1024 {
            return Err(invalid(
                "export.max_file_bytes",
                e.max_file_bytes.to_string(),
                "must be at least 1024",
            ));
        }
        if e.retry_base_ms > e.retry_max_ms {
            return Err(invalid(
                "export.retry_base_ms",
                e.retry_base_ms.to_string(),
                "must not exceed export.retry_max_ms",
            ));
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<(), ConfigError> {
        let storage = &self.storage;
        if storage.backend != StorageBackend::S3 {
            if storage.presigned_urls {
                return Err(invalid(
                    "storage.presigned_urls",
                    "true",
                    "needs storage.backend = \"s3\"",
                ));
            }
            return Ok(());
        }
        let s3 = &storage.s3;
        let bucket_ok = (3..=63).contains(&s3.bucket.len())
            && s3
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-'));
        if !bucket_ok {
            return Err(invalid(
                "storage.s3.bucket",
                &s3.bucket,
                "required with storage.backend = \"s3\": 3 to 63 lowercase letters, digits, dots and hyphens",
            ));
        }
        if let Some(endpoint) = &s3.endpoint {
            let url = Url::parse(endpoint)
                .map_err(|e| invalid("storage.s3.endpoint", endpoint, e.to_string()))?;
            match url.scheme() {
                "https" => {}
                "http" if s3.allow_http => {}
                "http" => {
                    return Err(invalid(
                        "storage.s3.endpoint",
                        endpoint,
                        "plain http needs storage.s3.allow_http = true",
                    ));
                }
                _ => {
                    return Err(invalid(
                        "storage.s3.endpoint",
                        endpoint,
                        "scheme must be http or https",
                    ));
                }
            }
        }
        if s3.region.is_empty() {
            return Err(invalid("storage.s3.region", "", "must not be empty"));
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            return Err(invalid(
                "storage.s3.access_key_id",
                s3.access_key_id.as_deref().unwrap_or(""),
                "set both storage.s3.access_key_id and storage.s3.secret_access_key, or neither",
            ));
        }
        let prefix_ok = s3
            .prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .all(|segment| {
                !segment.starts_with('.')
                    && segment
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            });
        if !prefix_ok {
            return Err(invalid(
                "storage.s3.prefix",
                &s3.prefix,
                "segments of letters, digits, `.`, `_` and `-`, separated by `/`",
            ));
        }
        const MIN_PART: u64 = 5 * 1024 * 1024;
        const MAX_PART: u64 = 5 * 1024 * 1024 * 1024;
        if !(MIN_PART..=MAX_PART).contains(&s3.part_size_bytes) {
            return Err(invalid(
                "storage.s3.part_size_bytes",
                s3.part_size_bytes.to_string(),
                "must be between 5 MiB and 5 GiB (S3's part size limits)",
            ));
        }
        // S3 allows 10,000 parts per upload.
        if self.export.max_file_bytes / s3.part_size_bytes >= 10_000 {
            return Err(invalid(
                "storage.s3.part_size_bytes",
                s3.part_size_bytes.to_string(),
                "export.max_file_bytes would need more than 10000 parts: raise the part size",
            ));
        }
        Ok(())
    }

    /// The listen address (validated).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server
            .listen
            .parse()
            .map_err(|e: std::net::AddrParseError| {
                invalid("server.listen", &self.server.listen, e.to_string())
            })
    }

    /// The upstream base URL, without a trailing slash on its path.
    pub fn upstream_url(&self) -> Result<Url, ConfigError> {
        if self.upstream.url.is_empty() {
            return Err(ConfigError::Missing {
                key: "upstream.url",
                reason: "the FHIR base URL of the server to put the proxy in front of, e.g. \
                         url = \"http://fhir.internal:8080/fhir\" under [upstream] in proxy.toml, \
                         or BULK_PROXY_UPSTREAM__URL=http://fhir.internal:8080/fhir"
                    .into(),
            });
        }
        parse_base_url("upstream.url", &self.upstream.url)
    }

    /// The path the proxy serves FHIR under: `server.base_path`, else the public URL's path, else
    /// the upstream URL's path. Never ends with `/` (the root is the empty string).
    pub fn base_path(&self) -> String {
        let raw = match (&self.server.base_path, &self.server.public_url) {
            (Some(base), _) => base.clone(),
            (None, Some(public)) => Url::parse(public)
                .map(|u| u.path().to_owned())
                .unwrap_or_default(),
            (None, None) => Url::parse(&self.upstream.url)
                .map(|u| u.path().to_owned())
                .unwrap_or_default(),
        };
        raw.trim_end_matches('/').to_owned()
    }

    /// The proxy's public FHIR base when `server.public_url` names it: the public URL itself when
    /// it has a path, else its origin and the base path. `None` when unset: then it is derived
    /// per request from `X-Forwarded-Proto` / `X-Forwarded-Host` / `Host`.
    pub fn public_base(&self) -> Option<String> {
        self.server.public_url.as_deref().map(|public| {
            let origin = public.trim_end_matches('/');
            match Url::parse(origin) {
                Ok(url) if url.path() != "/" => origin.to_owned(),
                _ => format!("{origin}{}", self.base_path()),
            }
        })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_grace_secs)
    }

    /// The client timeouts (validated).
    pub fn client_timeouts(&self) -> ClientTimeouts {
        ClientTimeouts {
            head: Duration::from_secs(self.server.request_head_timeout_secs),
            idle: Duration::from_secs(self.server.keep_alive_timeout_secs),
            body: Duration::from_secs(self.server.request_body_timeout_secs),
        }
    }
}

fn parse_base_url(key: &'static str, value: &str) -> Result<Url, ConfigError> {
    let mut url = Url::parse(value).map_err(|e| invalid(key, value, e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(key, value, "scheme must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(invalid(key, value, "must name a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, value, "must not have a query or fragment"));
    }
    let trimmed = url.path().trim_end_matches('/').to_owned();
    url.set_path(&trimmed);
    Ok(url)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    fn with_upstream(jail: &mut Jail) {
        jail.set_env(
            "BULK_PROXY_UPSTREAM__URL",
            "http://fhir.internal:8080/fhir/",
        );
    }

    #[test]
    fn defaults_then_file_then_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "proxy.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\nshutdown_grace_secs = 5\n[upstream]\nurl = \"http://file/fhir\"\n",
            )?;
            jail.set_env("BULK_PROXY_SERVER__SHUTDOWN_GRACE_SECS", "7");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.server.listen, "127.0.0.1:9000", "file beats default");
            assert_eq!(config.server.shutdown_grace_secs, 7, "env beats file");
            assert_eq!(config.upstream.url, "http://file/fhir");
            assert_eq!(config.upstream.request_timeout_ms, 60_000, "default kept");
            Ok(())
        });
    }

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
    fn explicit_config_path_must_exist() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            let err = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(err.to_string().contains("missing.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn base_path_follows_upstream_unless_set() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.base_path(), "/fhir");
            assert_eq!(
                config.upstream_url().unwrap().as_str(),
                "http://fhir.internal:8080/fhir"
            );
            jail.set_env("BULK_PROXY_SERVER__BASE_PATH", "/");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.base_path(), "");
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

    fn error_for(key: &str, value: &str) -> String {
        let mut message = String::new();
        Jail::expect_with(|jail| {
            with_upstream(jail);
            jail.set_env(key, value);
            if key.contains("__TLS__") {
                jail.set_env("BULK_PROXY_SERVER__TLS__KEY", value);
            }
            message = Config::load(None).unwrap_err().to_string();
            Ok(())
        });
        message
    }

    #[test]
    fn each_bad_value_names_key_value_and_reason() {
        let cases = [
            ("BULK_PROXY_SERVER__LISTEN", "nonsense", "server.listen"),
            (
                "BULK_PROXY_UPSTREAM__URL",
                "ftp://x/fhir",
                "scheme must be http",
            ),
            ("BULK_PROXY_UPSTREAM__URL", "not a url", "upstream.url"),
            ("BULK_PROXY_UPSTREAM__URL", "http://x/fhir?a=b", "query"),
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
            (
                "BULK_PROXY_UPSTREAM__REQUEST_TIMEOUT_MS",
                "0",
                "upstream.request_timeout_ms",
            ),
            ("BULK_PROXY_LOG__LEVEL", "[[[", "log.level"),
            ("BULK_PROXY_LOG__FORMAT", "xml", "format"),
            ("BULK_PROXY_SERVER__SPLICE", "sometimes", "splice"),
            ("BULK_PROXY_EXPORT__WORKERS", "0", "export.workers"),
            (
                "BULK_PROXY_EXPORT__RETRY_BASE_MS",
                "999999",
                "export.retry_base_ms",
            ),
            ("BULK_PROXY_STORE__BACKEND", "redis", "store.redis_url"),
            ("BULK_PROXY_STORE__BACKEND", "sqlite", "backend"),
            ("BULK_PROXY_STORAGE__BACKEND", "s3", "storage.s3.bucket"),
            ("BULK_PROXY_STORAGE__BACKEND", "gcs", "backend"),
            (
                "BULK_PROXY_STORAGE__PRESIGNED_URLS",
                "true",
                "storage.presigned_urls",
            ),
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
        ];
        for (key, value, expected) in cases {
            let message = error_for(key, value);
            let lower = message.to_lowercase();
            assert!(
                lower.contains(expected) && message.contains(value),
                "{key}={value}: {message}"
            );
        }
    }

    #[test]
    fn s3_storage_settings_are_checked() {
        let check = |vars: &[(&str, &str)], expected: &str| {
            Jail::expect_with(|jail| {
                with_upstream(jail);
                jail.set_env("BULK_PROXY_STORAGE__BACKEND", "s3");
                jail.set_env("BULK_PROXY_STORAGE__S3__BUCKET", "exports");
                for (key, value) in vars {
                    jail.set_env(key, value);
                }
                let result = Config::load(None);
                match (expected, result) {
                    ("", Ok(_)) => {}
                    ("", Err(e)) => panic!("{vars:?}: {e}"),
                    (_, Ok(_)) => panic!("{vars:?} accepted"),
                    (_, Err(e)) => assert!(e.to_string().contains(expected), "{vars:?}: {e}"),
                }
                Ok(())
            });
        };
        check(&[], "");
        check(
            &[("BULK_PROXY_STORAGE__S3__BUCKET", "Bad_Bucket")],
            "storage.s3.bucket",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__ENDPOINT", "http://minio:9000")],
            "allow_http",
        );
        check(
            &[
                ("BULK_PROXY_STORAGE__S3__ENDPOINT", "http://minio:9000"),
                ("BULK_PROXY_STORAGE__S3__ALLOW_HTTP", "true"),
                ("BULK_PROXY_STORAGE__PRESIGNED_URLS", "true"),
            ],
            "",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__ACCESS_KEY_ID", "AKIA")],
            "secret_access_key",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__PART_SIZE_BYTES", "1024")],
            "storage.s3.part_size_bytes",
        );
        check(
            &[("BULK_PROXY_STORAGE__S3__PREFIX", "a/../b")],
            "storage.s3.prefix",
        );
    }

    #[test]
    fn the_config_file_variable_is_not_a_key() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            jail.set_env("BULK_PROXY_CONFIG", "/etc/fhir-bulk-proxy/proxy.toml");
            Config::load(None).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn missing_upstream_is_an_error() {
        Jail::expect_with(|_jail| {
            let err = Config::load(None).unwrap_err().to_string();
            assert!(
                err.contains("upstream.url") && err.contains("required"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            jail.create_file("proxy.toml", "[server]\nlisten_addr = \"x\"\n")?;
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("listen_addr"), "{err}");
            Ok(())
        });
    }
}
