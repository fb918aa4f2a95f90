//! `[metadata]`: the augmented CapabilityStatement; any value is valid.

use serde::{Deserialize, Serialize};

/// The augmented CapabilityStatement served at `{base}/metadata`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataConfig {
    /// How long the upstream's CapabilityStatement is cached, in seconds (0 = not cached). Default 60.
    pub cache_ttl_secs: u64,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self { cache_ttl_secs: 60 }
    }
}
