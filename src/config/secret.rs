//! A configured secret: `auth.signing_secret`, `upstream.auth.token` and `password`,
//! `storage.s3.secret_access_key`, and `store.redis_url` (which may carry a password). The one
//! place secrets are kept from logs: `Debug` never prints one, so neither does `Debug` of the
//! config or any struct holding it; the value is read through [`Secret::expose`] only where it is
//! used.

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
    use super::super::{Config, UpstreamAuthScheme};

    #[test]
    fn no_secret_reaches_the_debug_output_of_the_config() {
        let mut config = Config::default();
        config.auth.signing_secret = Some("signing-secret-0123456789abcdefghij".into());
        config.upstream.auth.scheme = UpstreamAuthScheme::Basic;
        config.upstream.auth.token = Some("upstream-bearer-token".into());
        config.upstream.auth.password = Some("upstream-password".into());
        config.storage.s3.secret_access_key = Some("s3-secret-key".into());
        config.store.redis_url = Some("redis://user:redis-password@redis:6379/0".into());
        let shown = format!("{config:?} {config:#?}");
        for secret in [
            "signing-secret",
            "upstream-bearer-token",
            "upstream-password",
            "s3-secret-key",
            "redis-password",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("<redacted>"));
        assert_eq!(
            config.upstream.auth.password.as_ref().map(|p| p.expose()),
            Some("upstream-password")
        );
    }
}
