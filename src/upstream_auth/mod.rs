//! What the proxy presents to the upstream FHIR server on its own behalf: the credentials of
//! `[upstream.auth]` (a static bearer token or basic auth, or OAuth 2.0 access tokens it obtains
//! and renews: `token`) and the TLS client configuration of `[upstream.tls]` ([`tls`]). One
//! [`Credentials`] serves every upstream request the proxy builds: export paging
//! (`export::pager`), the metadata fetch and, with passthrough authorization on, passthrough.
//!
//! Tokens and keys are never logged: header values are marked sensitive, errors name the token
//! endpoint and its OAuth error code, never a secret.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::http::HeaderValue;

use crate::config::{ClientAuth, Config, UpstreamAuthScheme};

pub mod key;
pub mod tls;
mod token;

use token::{Grant, TokenSource};

/// Reads what `[upstream.tls]` and `[upstream.auth]` name (CA bundle, client certificate and key,
/// the assertion key) as the proxy does at start: `check-config` reports what would stop it.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let tls = tls::client_config(&config.upstream.tls)?;
    Credentials::new(config, &tls).map(|_| ())
}

/// Why no credentials could be had for an upstream request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The token endpoint failed, refused, or could not be found.
    #[error("cannot obtain an access token for the upstream: {0}")]
    Token(String),
}

/// The credentials for upstream requests.
pub struct Credentials {
    kind: Kind,
}

enum Kind {
    None,
    Static(HeaderValue),
    OAuth(Box<TokenSource>),
}

impl Credentials {
    /// From `[upstream.auth]`; the token endpoint is reached with `tls` (the upstream's TLS
    /// configuration: the endpoint is usually the upstream's own or beside it).
    pub fn new(config: &Config, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let auth = &config.upstream.auth;
        let kind = match auth.scheme {
            UpstreamAuthScheme::None => Kind::None,
            UpstreamAuthScheme::Bearer | UpstreamAuthScheme::Basic => {
                let value = auth.authorization().unwrap_or_default();
                let mut header = HeaderValue::from_str(&value)
                    .context("upstream.auth: the credentials are not a valid header value")?;
                header.set_sensitive(true);
                Kind::Static(header)
            }
            UpstreamAuthScheme::ClientCredentials | UpstreamAuthScheme::PrivateKeyJwt => {
                let client_id = auth.client_id.clone().unwrap_or_default();
                let grant = if auth.scheme == UpstreamAuthScheme::PrivateKeyJwt {
                    let path = auth
                        .private_key_file
                        .as_deref()
                        .context("upstream.auth.private_key_file is required")?;
                    Grant::Assertion {
                        client_id,
                        key: key::AssertionKey::from_file(
                            path,
                            auth.alg.as_deref(),
                            auth.kid.as_deref(),
                        )?,
                    }
                } else {
                    Grant::Secret {
                        client_id,
                        secret: auth.client_secret.clone().unwrap_or_else(|| "".into()),
                        post: auth.client_auth == ClientAuth::Post,
                    }
                };
                let mut tls = tls.as_ref().clone();
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                let http = reqwest::Client::builder()
                    .use_preconfigured_tls(tls)
                    .connect_timeout(config.connect_timeout())
                    .timeout(config.request_timeout())
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .context("the upstream token client")?;
                let base = config.upstream_url()?;
                Kind::OAuth(Box::new(TokenSource {
                    http,
                    grant,
                    token_url: auth.token_url.clone(),
                    smart_configuration: format!(
                        "{}/.well-known/smart-configuration",
                        base.as_str().trim_end_matches('/')
                    ),
                    scope: auth.scope.clone().filter(|s| !s.trim().is_empty()),
                    current: Mutex::new(None),
                    refresh: tokio::sync::Mutex::new(Default::default()),
                }))
            }
        };
        Ok(Self { kind })
    }

    /// No credentials at all.
    pub fn none() -> Self {
        Self { kind: Kind::None }
    }

    /// The `Authorization` value for the next upstream request (`None` with scheme `none`). An
    /// OAuth token is requested when there is none or it is about to expire.
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, CredentialError> {
        match &self.kind {
            Kind::None => Ok(None),
            Kind::Static(header) => Ok(Some(header.clone())),
            Kind::OAuth(source) => source.authorization().await.map(Some),
        }
    }

    /// The upstream answered 401 to a request that carried `sent`. Returns whether sending it
    /// once more with [`Credentials::authorization`] can help: with OAuth the token is dropped
    /// (unless already renewed) and the next call gets a new one; static credentials stay wrong.
    pub fn rejected(&self, sent: Option<&HeaderValue>) -> bool {
        match (&self.kind, sent) {
            (Kind::OAuth(source), Some(sent)) => {
                source.reject(sent);
                true
            }
            _ => false,
        }
    }
}
