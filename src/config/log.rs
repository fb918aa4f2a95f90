//! `[log]`: log output (JSON or text) and the tracing filter.

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

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

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| invalid("log.level", &self.level, e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use crate::config::tests::assert_each_bad_value_named;

    #[test]
    fn each_bad_log_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            ("BULK_PROXY_LOG__LEVEL", "[[[", "log.level"),
            ("BULK_PROXY_LOG__FORMAT", "xml", "format"),
        ]);
    }
}
