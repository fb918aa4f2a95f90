//! `[upstream]`: the FHIR server behind the proxy (its URL, timeouts and connection pool),
//! `[upstream.auth]`, the credentials the proxy itself presents to it (static, or OAuth 2.0 tokens
//! it obtains: `client_credentials` with a secret, `private_key_jwt` as SMART Backend Services),
//! and `[upstream.tls]`, the CA bundle and client certificate of its TLS connections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use url::Url;

use super::{ConfigError, Secret, invalid, parse_base_url};

/// The FHIR server behind the proxy.
#[derive(Clone, Serialize, Deserialize)]
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
    /// TLS towards an `https` upstream and its token endpoint (`[upstream.tls]`). Default: the
    /// system's CA certificates, no client certificate.
    pub tls: UpstreamTlsConfig,
}

/// `[upstream.tls]`: whom the proxy trusts and who it is, on TLS connections to the upstream and to
/// its token endpoint. The server's hostname is always verified against its certificate.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of the CA certificates to trust instead of the system's. Default unset.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to the upstream (mutual TLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// `url` as check-config shows it: a password in it is not the log's to see.
impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &super::secret::redact_url(&self.url))
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("pool_idle_timeout_secs", &self.pool_idle_timeout_secs)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .finish()
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
            tls: UpstreamTlsConfig::default(),
        }
    }
}

/// The credentials the proxy sends upstream on its own requests (export searches, metadata) and,
/// with `auth.passthrough = true`, on passthrough requests instead of the client's.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamAuthConfig {
    /// `none`, `bearer` (sends `token`), `basic` (sends `username` and `password`),
    /// `client_credentials` (OAuth 2.0 with `client_id` and `client_secret`) or `private_key_jwt`
    /// (SMART Backend Services with `client_id` and `private_key_file`). Default `none`.
    pub scheme: UpstreamAuthScheme,
    /// Bearer token for `scheme = "bearer"`. Default unset.
    pub token: Option<Secret>,
    /// User name for `scheme = "basic"`. Default unset.
    pub username: Option<String>,
    /// Password for `scheme = "basic"`. Default unset (empty).
    pub password: Option<Secret>,
    /// The upstream's OAuth token endpoint. Required with `client_credentials`; with
    /// `private_key_jwt` discovered from `{upstream.url}/.well-known/smart-configuration` when unset.
    pub token_url: Option<String>,
    /// The proxy's client id at the upstream's authorization server (the OAuth schemes).
    pub client_id: Option<String>,
    /// The client secret for `client_credentials`.
    pub client_secret: Option<Secret>,
    /// How `client_credentials` presents its secret: `basic` (HTTP Basic, RFC 6749
    /// `client_secret_basic`) or `post` (form fields, `client_secret_post`). Default `basic`.
    pub client_auth: ClientAuth,
    /// The scopes to ask for (space-separated); unset asks for none and takes the server's default.
    pub scope: Option<String>,
    /// `private_key_jwt`: the private key signing the client assertions, a JWK (JSON) or PEM file.
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt`: `RS384` or `ES384`. Default: the key's (RSA → RS384, EC P-384 → ES384).
    pub alg: Option<String>,
    /// `private_key_jwt`: the `kid` header of the assertions. Default: the JWK's `kid`, else none.
    pub kid: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamAuthScheme {
    #[default]
    None,
    Bearer,
    Basic,
    ClientCredentials,
    PrivateKeyJwt,
}

/// How a `client_credentials` client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Basic,
    Post,
}

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url()?;
        if !url.username().is_empty() || url.password().is_some() {
            // They would be ignored (requests go to the URL's origin) yet logged with it.
            return Err(invalid(
                "upstream.url",
                super::secret::redact_url(&self.url),
                "must not carry credentials: set [upstream.auth] (scheme = \"basic\" or \"bearer\")",
            ));
        }
        for (key, value) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms),
            ("upstream.request_timeout_ms", self.request_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "0", "must be greater than 0"));
            }
        }
        self.auth.validate()?;
        self.tls.validate()
    }

    /// The upstream base URL, without a trailing slash on its path.
    pub fn url(&self) -> Result<Url, ConfigError> {
        if self.url.is_empty() {
            return Err(ConfigError::Missing {
                key: "upstream.url",
                reason: "the FHIR base URL of the server to put the proxy in front of, e.g. \
                         url = \"http://fhir.internal:8080/fhir\" under [upstream] in proxy.toml, \
                         or BULK_PROXY_UPSTREAM__URL=http://fhir.internal:8080/fhir"
                    .into(),
            });
        }
        parse_base_url("upstream.url", &self.url)
    }
}

impl UpstreamTlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("upstream.tls.ca_file", &self.ca_file),
            ("upstream.tls.client_cert", &self.client_cert),
            ("upstream.tls.client_key", &self.client_key),
        ] {
            if let Some(path) = path {
                readable(key, path)?;
            }
        }
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => Err(ConfigError::Missing {
                key: "upstream.tls.client_key",
                reason: "the private key of upstream.tls.client_cert (PEM)".into(),
            }),
            (None, Some(_)) => Err(ConfigError::Missing {
                key: "upstream.tls.client_cert",
                reason: "the certificate (PEM) of upstream.tls.client_key".into(),
            }),
            _ => Ok(()),
        }
    }
}

/// `path` can be opened for reading, or an error naming `key`.
fn readable(key: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::File::open(path) {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => Ok(()),
        Ok(_) => Err(invalid(key, path.display().to_string(), "not a file")),
        Err(e) => Err(invalid(
            key,
            path.display().to_string(),
            format!("cannot be read: {e}"),
        )),
    }
}

impl UpstreamAuthConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.scheme {
            UpstreamAuthScheme::None => Ok(()),
            UpstreamAuthScheme::ClientCredentials | UpstreamAuthScheme::PrivateKeyJwt => {
                self.validate_oauth()
            }
            UpstreamAuthScheme::Bearer => match &self.token {
                Some(token) if is_header_safe(token.expose()) && !token.expose().is_empty() => {
                    Ok(())
                }
                _ => Err(invalid(
                    "upstream.auth.token",
                    "(hidden)",
                    "required with scheme = \"bearer\": a token without control characters",
                )),
            },
            UpstreamAuthScheme::Basic => match &self.username {
                Some(user) if !user.is_empty() && !user.contains(':') && is_header_safe(user) => {
                    Ok(())
                }
                _ => Err(invalid(
                    "upstream.auth.username",
                    self.username.as_deref().unwrap_or(""),
                    "required with scheme = \"basic\": a name without `:` or control characters",
                )),
            },
        }
    }

    /// The OAuth schemes' keys: what each needs, and values that can be used as they are.
    fn validate_oauth(&self) -> Result<(), ConfigError> {
        let jwt = self.scheme == UpstreamAuthScheme::PrivateKeyJwt;
        let name = if jwt {
            "private_key_jwt"
        } else {
            "client_credentials"
        };
        match &self.token_url {
            Some(url) => {
                let parsed = url::Url::parse(url).map_err(|e| {
                    invalid("upstream.auth.token_url", url, format!("not a URL: {e}"))
                })?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(invalid(
                        "upstream.auth.token_url",
                        url,
                        "scheme must be http or https",
                    ));
                }
            }
            None if !jwt => {
                return Err(ConfigError::Missing {
                    key: "upstream.auth.token_url",
                    reason:
                        "the upstream's OAuth token endpoint, with scheme = \"client_credentials\""
                            .into(),
                });
            }
            None => {}
        }
        match &self.client_id {
            Some(id) if !id.is_empty() && is_header_safe(id) => {}
            _ => {
                return Err(ConfigError::Missing {
                    key: "upstream.auth.client_id",
                    reason: format!(
                        "the proxy's client id at the upstream, with scheme = \"{name}\""
                    ),
                });
            }
        }
        if let Some(scope) = &self.scope
            && !is_header_safe(scope)
        {
            return Err(invalid(
                "upstream.auth.scope",
                scope,
                "must not contain control characters",
            ));
        }
        if jwt {
            let Some(path) = &self.private_key_file else {
                return Err(ConfigError::Missing {
                    key: "upstream.auth.private_key_file",
                    reason: "the private key (JWK or PEM) signing the client assertions, with \
                             scheme = \"private_key_jwt\""
                        .into(),
                });
            };
            readable("upstream.auth.private_key_file", path)?;
            if let Some(alg) = &self.alg
                && !matches!(alg.as_str(), "RS384" | "ES384")
            {
                return Err(invalid("upstream.auth.alg", alg, "must be RS384 or ES384"));
            }
        } else if self
            .client_secret
            .as_ref()
            .is_none_or(|s| s.expose().is_empty())
        {
            return Err(ConfigError::Missing {
                key: "upstream.auth.client_secret",
                reason: "the client secret, with scheme = \"client_credentials\"".into(),
            });
        }
        Ok(())
    }

    /// Whether the proxy obtains its upstream tokens from an OAuth token endpoint.
    pub fn is_oauth(&self) -> bool {
        matches!(
            self.scheme,
            UpstreamAuthScheme::ClientCredentials | UpstreamAuthScheme::PrivateKeyJwt
        )
    }

    /// The `Authorization` header value to send upstream for the static schemes, if any (the OAuth
    /// schemes' tokens come from `upstream_auth::Credentials`).
    pub fn authorization(&self) -> Option<String> {
        use base64::Engine as _;
        match self.scheme {
            UpstreamAuthScheme::None
            | UpstreamAuthScheme::ClientCredentials
            | UpstreamAuthScheme::PrivateKeyJwt => None,
            UpstreamAuthScheme::Bearer => self
                .token
                .as_ref()
                .map(|t| format!("Bearer {}", t.expose())),
            UpstreamAuthScheme::Basic => {
                let user = self.username.as_deref().unwrap_or("");
                let password = self.password.as_ref().map_or("", |p| p.expose());
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(format!("Basic {encoded}"))
            }
        }
    }
}

fn is_header_safe(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use figment::Jail;

    use super::*;
    use crate::config::Config;
    use crate::config::tests::{assert_each_bad_value_named, load_toml};

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
    fn each_bad_upstream_value_names_key_value_and_reason() {
        assert_each_bad_value_named(&[
            (
                "BULK_PROXY_UPSTREAM__URL",
                "ftp://x/fhir",
                "scheme must be http",
            ),
            ("BULK_PROXY_UPSTREAM__URL", "not a url", "upstream.url"),
            ("BULK_PROXY_UPSTREAM__URL", "http://x/fhir?a=b", "query"),
            (
                "BULK_PROXY_UPSTREAM__URL",
                "http://user@x/fhir",
                "credentials",
            ),
            (
                "BULK_PROXY_UPSTREAM__REQUEST_TIMEOUT_MS",
                "0",
                "upstream.request_timeout_ms",
            ),
        ]);
        let cases = [
            (
                "[upstream.auth]\nscheme = \"bearer\"\n",
                "upstream.auth.token",
            ),
            (
                "[upstream.auth]\nscheme = \"basic\"\n",
                "upstream.auth.username",
            ),
            ("[upstream.auth]\nscheme = \"digest\"\n", "digest"),
            (
                "[upstream.auth]\nscheme = \"client_credentials\"\nclient_id = \"p\"\nclient_secret = \"s\"\n",
                "upstream.auth.token_url",
            ),
            (
                "[upstream.auth]\nscheme = \"client_credentials\"\ntoken_url = \"http://t/token\"\nclient_secret = \"s\"\n",
                "upstream.auth.client_id",
            ),
            (
                "[upstream.auth]\nscheme = \"client_credentials\"\ntoken_url = \"http://t/token\"\nclient_id = \"p\"\n",
                "upstream.auth.client_secret",
            ),
            (
                "[upstream.auth]\nscheme = \"client_credentials\"\ntoken_url = \"ftp://t/token\"\nclient_id = \"p\"\nclient_secret = \"s\"\n",
                "upstream.auth.token_url",
            ),
            (
                "[upstream.auth]\nscheme = \"client_credentials\"\nclient_auth = \"jwt\"\n",
                "jwt",
            ),
            (
                "[upstream.auth]\nscheme = \"private_key_jwt\"\nclient_id = \"p\"\n",
                "upstream.auth.private_key_file",
            ),
            (
                "[upstream.auth]\nscheme = \"private_key_jwt\"\nclient_id = \"p\"\nprivate_key_file = \"/nonexistent/key.pem\"\n",
                "upstream.auth.private_key_file",
            ),
            (
                "[upstream.tls]\nca_file = \"/nonexistent/ca.pem\"\n",
                "upstream.tls.ca_file",
            ),
        ];
        for (toml, expected) in cases {
            let message = load_toml(toml).expect_err(toml);
            assert!(message.contains(expected), "{toml}: {message}");
        }
        // Refused, and the password is not repeated in the message.
        let mut message = String::new();
        Jail::expect_with(|jail| {
            jail.set_env("BULK_PROXY_UPSTREAM__URL", "http://u:hunter2@x/fhir");
            message = Config::load(None).unwrap_err().to_string();
            Ok(())
        });
        assert!(message.contains("credentials"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn oauth_schemes_validate_with_their_keys_and_a_readable_key_file() {
        let config = load_toml(
            "[upstream.auth]\nscheme = \"client_credentials\"\ntoken_url = \"https://t/token\"\nclient_id = \"p\"\nclient_secret = \"s\"\nclient_auth = \"post\"\n",
        )
        .unwrap();
        assert_eq!(config.upstream.auth.client_auth, ClientAuth::Post);
        assert!(config.upstream.auth.is_oauth());
        // Not a static header: the token comes from the token endpoint.
        assert_eq!(config.upstream.auth.authorization(), None);

        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not checked here").unwrap();
        let toml = format!(
            "[upstream.auth]\nscheme = \"private_key_jwt\"\nclient_id = \"p\"\nprivate_key_file = {:?}\nalg = \"PS256\"\n",
            key.display().to_string()
        );
        let message = load_toml(&toml).unwrap_err();
        assert!(message.contains("upstream.auth.alg"), "{message}");
        let config = load_toml(&toml.replace("PS256", "ES384")).unwrap();
        assert_eq!(
            config.upstream.auth.token_url, None,
            "discovered at run time"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "").unwrap();
        let toml = format!(
            "[upstream.tls]\nclient_cert = {:?}\n",
            cert.display().to_string()
        );
        let message = load_toml(&toml).unwrap_err();
        assert!(message.contains("upstream.tls.client_key"), "{message}");
    }

    #[test]
    fn no_upstream_credentials_by_default() {
        let config = load_toml("").unwrap();
        assert_eq!(config.upstream.auth.scheme, UpstreamAuthScheme::None);
        assert_eq!(config.upstream.auth.authorization(), None);
    }

    #[test]
    fn upstream_credentials_become_an_authorization_header() {
        let bearer = load_toml("[upstream.auth]\nscheme = \"bearer\"\ntoken = \"abc\"\n").unwrap();
        assert_eq!(
            bearer.upstream.auth.authorization().as_deref(),
            Some("Bearer abc")
        );
        let basic = load_toml(
            "[upstream.auth]\nscheme = \"basic\"\nusername = \"proxy\"\npassword = \"pw\"\n",
        )
        .unwrap();
        assert_eq!(
            basic.upstream.auth.authorization().as_deref(),
            Some("Basic cHJveHk6cHc=")
        );
    }
}
