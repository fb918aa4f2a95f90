//! Typed configuration: built-in defaults < `proxy.toml` (or `--config PATH`) < environment
//! variables `BULK_PROXY_...` (nesting with `__`, e.g. `BULK_PROXY_UPSTREAM__URL`).
//!
//! Loading never starts anything; [`Config::validate`] checks every value and names the key, the value
//! and the reason on failure, so `fhir-bulk-proxy check-config` and start-up report the same errors.
//! [`Config::warnings`] is the one list of what is allowed but probably wrong: `run` logs it at
//! start, `check-config` prints it. `proxy.toml` at the repository root documents every key, its
//! default and its environment name.
//!
//! Each section is one file holding its structs, their defaults and their validation: `server`,
//! `upstream` (with `[upstream.auth]`), `log`, `metadata`, `auth`, `export`, `store` and `storage`;
//! [`Secret`] (`secret.rs`) is the one place secrets are kept out of `Debug` and `check-config`.
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
mod export;
mod log;
mod metadata;
pub mod paths;
pub mod pem;
mod secret;
mod server;
mod storage;
mod store;
mod upstream;
pub use auth::{AuthConfig, ClientConfig};
pub use export::ExportConfig;
pub use log::{LogConfig, LogFormat};
pub use metadata::MetadataConfig;
pub use paths::Loaded;
pub use secret::Secret;
pub use server::{ClientTimeouts, ServerConfig, Splice, TlsConfig};
pub use storage::{S3Config, StorageBackend, StorageConfig};
pub use store::{StoreBackend, StoreConfig};
pub use upstream::{
    ClientAuth, UpstreamAuthConfig, UpstreamAuthScheme, UpstreamConfig, UpstreamTlsConfig,
};

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

    /// Checks every value that can be wrong, section by section; the error names the key, the
    /// value and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.auth.validate()?;
        self.export.validate()?;
        self.store.validate()?;
        self.storage.validate(self.export.max_file_bytes)?;
        self.log.validate()
    }

    /// The listen address (validated).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen_addr()
    }

    /// The upstream base URL, without a trailing slash on its path.
    pub fn upstream_url(&self) -> Result<Url, ConfigError> {
        self.upstream.url()
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

    pub(super) fn with_upstream(jail: &mut Jail) {
        jail.set_env(
            "BULK_PROXY_UPSTREAM__URL",
            "http://fhir.internal:8080/fhir/",
        );
    }

    /// Loads `toml` (after an `[upstream]` with a URL) as `proxy.toml`.
    pub(super) fn load_toml(toml: &str) -> Result<Config, String> {
        let mut result = Err(String::new());
        Jail::expect_with(|jail| {
            jail.create_file(
                "proxy.toml",
                &format!("[upstream]\nurl = \"http://fhir/fhir\"\n{toml}"),
            )?;
            result = Config::load(None).map_err(|e| e.to_string());
            Ok(())
        });
        result
    }

    /// For each `(variable, value, expected)`: loading with the variable set fails, and the message
    /// names `expected` (the key or the reason) and the value.
    pub(super) fn assert_each_bad_value_named(cases: &[(&str, &str, &str)]) {
        for (key, value, expected) in cases {
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
            assert!(
                message.to_lowercase().contains(expected) && message.contains(value),
                "{key}={value}: {message}"
            );
        }
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
    fn the_config_file_variable_is_not_a_key() {
        Jail::expect_with(|jail| {
            with_upstream(jail);
            jail.set_env("BULK_PROXY_CONFIG", "/etc/fhir-bulk-proxy/proxy.toml");
            Config::load(None).map_err(|e| e.to_string())?;
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
