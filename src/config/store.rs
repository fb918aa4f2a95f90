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
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use crate::config::tests::assert_each_bad_value_named;

    #[test]
    fn each_bad_store_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_STORE__BACKEND", "redis", "store.redis_url"),
            ("BULK_PROXY_STORE__BACKEND", "sqlite", "backend"),
        ]);
    }
}
