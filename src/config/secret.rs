//! A configured secret: `auth.signing_secret`, `upstream.auth.token`, `password` and
//! `client_secret`, `storage.s3.secret_access_key`, `store.redis_password`, and `store.redis_url`
//! (which may carry a password). The one
//! place secrets are kept from logs and from `check-config`: `Debug` never prints one, so neither
//! does `Debug` of the config or any struct holding it; the value is read through
//! [`Secret::expose`] only where it is used, and a URL is shown through [`redact_url`], which hides
//! its password.

use serde::{Deserialize, Serialize};

/// A string that `Debug` prints as `<redacted>`. Serialises as the plain string (the
/// configuration's defaults pass through serde when it is loaded).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Secret {
    /// The secret as a URL to show: its password (if any) replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.0)
    }
}

/// `url` with its password (if any) replaced by `***`; an unparsable URL is not shown at all,
/// since it cannot be told where a password would be in it.
pub(super) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "(unparsable URL, not shown)".to_owned(),
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, StorageBackend, StoreBackend, UpstreamAuthScheme};

    const SECRETS: [&str; 8] = [
        "signing-secret",
        "upstream-client-secret",
        "upstream-bearer-token",
        "upstream-password",
        "s3-secret-key",
        "redis-password",
        "url-password",
        "redis-env-password",
    ];

    /// A configuration with every kind of secret set, each spelled so it can be found.
    fn config_with_every_secret() -> Config {
        let mut config = Config::default();
        config.upstream.url = "http://proxy:url-password@fhir.internal/fhir".into();
        config.auth.signing_secret = Some("signing-secret-0123456789abcdefghij".into());
        config.upstream.auth.scheme = UpstreamAuthScheme::Basic;
        config.upstream.auth.token = Some("upstream-bearer-token".into());
        config.upstream.auth.password = Some("upstream-password".into());
        config.upstream.auth.client_secret = Some("upstream-client-secret".into());
        config.storage.backend = StorageBackend::S3;
        config.storage.s3.endpoint = Some("https://minio:url-password@minio:9000".into());
        config.storage.s3.secret_access_key = Some("s3-secret-key".into());
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = Some("redis://user:redis-password@redis:6379/0".into());
        config.store.redis_password = Some("redis-env-password".into());
        config
    }

    #[test]
    fn no_secret_reaches_the_check_config_report() {
        let report = config_with_every_secret().report();
        for secret in SECRETS {
            assert!(!report.contains(secret), "{secret} in {report}");
        }
        assert!(
            report.contains("http://proxy:***@fhir.internal/fhir"),
            "{report}"
        );
        assert!(report.contains("redis://user:***@redis:6379/0"), "{report}");
    }

    #[test]
    fn no_url_password_reaches_the_debug_output_of_the_config() {
        // upstream.url and storage.s3.endpoint are plain strings: `Debug` showed their
        // passwords, while the check-config report hid them.
        let config = config_with_every_secret();
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("url-password"), "{shown}");
        assert!(
            shown.contains("http://proxy:***@fhir.internal/fhir"),
            "{shown}"
        );
        assert!(shown.contains("https://minio:***@minio:9000"), "{shown}");
        assert!(shown.contains("bucket") && shown.contains("connect_timeout_ms"));
    }

    #[test]
    fn no_secret_reaches_the_debug_output_of_the_config() {
        let config = config_with_every_secret();
        let shown = format!("{config:?} {config:#?}");
        for secret in SECRETS {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("<redacted>"));
        assert_eq!(
            config.upstream.auth.password.as_ref().map(|p| p.expose()),
            Some("upstream-password")
        );
    }
}
