//! `[store]`: where job state lives (the embedded file or Redis).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret, invalid};

/// Where job state lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` (one node, a file on local disk) or `redis` (several replicas). Default `embedded`.
    pub backend: StoreBackend,
    /// Database file of the embedded store. Default `./data/jobs.redb`.
    pub path: PathBuf,
    /// Redis URL for the `redis` backend, e.g. `redis://redis:6379/0`, or `rediss://` for TLS
    /// (the server's certificate and name verified); an ACL user and password may be in it
    /// (`rediss://user:password@host:6380/0`). Default unset.
    pub redis_url: Option<Secret>,
    /// The Redis password, when it is not in `store.redis_url` (e.g. from the environment,
    /// `BULK_PROXY_STORE__REDIS_PASSWORD`); the user, if any, is the URL's. Default unset.
    pub redis_password: Option<Secret>,
    /// PEM file of the CA(s) that sign the Redis server's certificate (a private CA), instead of
    /// the system's roots; `rediss://` only. Default unset.
    pub redis_ca_file: Option<PathBuf>,
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
            redis_password: None,
            redis_ca_file: None,
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend == StoreBackend::Redis {
            let url = self.redis_url.as_ref().map_or("", |url| url.expose());
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(
                    "store.redis_url",
                    "(hidden: it may hold a password)",
                    "required with store.backend = \"redis\": a redis:// or rediss:// URL",
                ));
            }
            let in_url = url::Url::parse(url).is_ok_and(|u| u.password().is_some());
            if in_url && self.redis_password.is_some() {
                return Err(invalid(
                    "store.redis_password",
                    "(hidden)",
                    "store.redis_url has a password already: give it in one place",
                ));
            }
            if let Some(ca) = &self.redis_ca_file {
                if !url.starts_with("rediss://") {
                    return Err(invalid(
                        "store.redis_ca_file",
                        ca.display().to_string(),
                        "needs a rediss:// store.redis_url (TLS)",
                    ));
                }
                if !ca.is_file() {
                    return Err(invalid(
                        "store.redis_ca_file",
                        ca.display().to_string(),
                        "no such file",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::{StoreBackend, StoreConfig};
    use crate::config::tests::assert_each_bad_value_named;

    #[test]
    fn each_bad_store_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_STORE__BACKEND", "redis", "store.redis_url"),
            ("BULK_PROXY_STORE__BACKEND", "sqlite", "backend"),
        ]);
    }

    fn redis(url: &str) -> StoreConfig {
        StoreConfig {
            backend: StoreBackend::Redis,
            redis_url: Some(url.into()),
            ..StoreConfig::default()
        }
    }

    #[test]
    fn a_password_is_given_in_one_place_and_a_ca_file_needs_tls() {
        let mut both = redis("rediss://u:p@r:6380/0");
        both.redis_password = Some("q".into());
        let error = both.validate().unwrap_err().to_string();
        assert!(error.contains("store.redis_password"), "{error}");
        assert!(error.contains("(hidden)"), "{error}");
        let mut env_password = redis("rediss://u@r:6380/0");
        env_password.redis_password = Some("q".into());
        env_password.validate().unwrap();

        let ca = tempfile::NamedTempFile::new().unwrap();
        let mut plain = redis("redis://r:6379/0");
        plain.redis_ca_file = Some(ca.path().into());
        let error = plain.validate().unwrap_err().to_string();
        assert!(
            error.contains("store.redis_ca_file") && error.contains("rediss://"),
            "{error}"
        );
        let mut tls = redis("rediss://r:6380/0");
        tls.redis_ca_file = Some(ca.path().into());
        tls.validate().unwrap();
        tls.redis_ca_file = Some("/nonexistent/ca.pem".into());
        let error = tls.validate().unwrap_err().to_string();
        assert!(error.contains("no such file"), "{error}");
    }
}
