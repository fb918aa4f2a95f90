//! SMART Backend Services authorization (SMART App Launch 2.2 "Backend Services"; Bulk Data IG
//! "Authorization"; SPEC A1, A4, A9.1): the proxy is the authorization server for its bulk
//! endpoints.
//!
//! - [`clients`]: the registry of `[[auth.clients]]`.
//! - [`jwks`]: fetching and caching clients' JWKS URLs (timeouts, size cap, `Cache-Control`,
//!   rotation, rate limit).
//! - [`assertion`]: checks on client assertions (header, key choice, claims).
//! - [`jti`]: single use of assertions, behind a trait so replicas can share it.
//! - [`crate::fhir::scopes`]: SMART v1/v2 scope grammar, the grant decision and read checks.
//! - [`access_token`]: the proxy's own short-lived tokens, verifiable by any replica.
//! - [`token`]: the token request flow.
//! - [`keygen`]: key pairs and configuration snippets for new clients.
//! - [`passthrough`]: what a token allows on passthrough when `auth.passthrough` is on.
//!
//! Handlers use [`Auth::authorize`] to turn an `Authorization` header into a [`Grant`], and
//! [`Grant::require_read`] for scope checks; [`AuthError`] and [`OAuthError`] become responses in
//! `http::error`.

pub mod access_token;
pub mod assertion;
pub mod clients;
pub mod jti;
pub mod jwks;
pub mod keygen;
pub mod passthrough;
pub mod token;

use std::sync::Arc;

use axum::http::{HeaderMap, header};

use crate::config::{AuthConfig, Config};
pub use crate::fhir::scopes::Scopes;
use access_token::TokenSigner;
pub use jti::{JtiError, JtiStore, MemoryJtiStore};
pub use token::{TokenRequest, TokenResponse};

/// What a valid access token allows: who the client is and which scopes it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub client_id: String,
    pub scopes: Scopes,
}

/// The client id of every request when `auth.enabled = false`.
pub const ANONYMOUS: &str = "anonymous";

impl Grant {
    /// Succeeds when the scopes allow reading every one of `resource_types`; otherwise names the
    /// ones they do not cover (SPEC A4.19, A9.1).
    pub fn require_read<'a>(
        &self,
        resource_types: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AuthError> {
        let missing: Vec<&str> = resource_types
            .into_iter()
            .filter(|t| !self.scopes.can_read(t))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(AuthError::Forbidden(missing.join(", ")))
        }
    }
}

/// Why a request to a protected endpoint is refused (RFC 6750 §3.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "this endpoint requires `Authorization: Bearer <access token>`; get a token from the token endpoint"
    )]
    Missing,
    #[error("the access token is invalid: {0}")]
    Invalid(String),
    #[error("the access token has expired: request a new one")]
    Expired,
    #[error("the access token's scopes do not allow reading {0}")]
    Forbidden(String),
    /// Passthrough with the proxy's tokens is read-only.
    #[error("the proxy grants read access only: {0} are refused")]
    ReadOnly(String),
    /// The request's results cannot be checked against a type-limited token's scopes.
    #[error(
        "the proxy cannot check {0} against the access token's scopes: only a token for every resource type (e.g. system/*.read) may make this request"
    )]
    Unchecked(String),
}

/// Token endpoint errors, answered as RFC 6749 §5.2 JSON (SPEC A4.26–27).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    InvalidClient(String),
    #[error("{0}")]
    UnsupportedGrantType(String),
    #[error("{0}")]
    InvalidScope(String),
    /// The authorization endpoint's answer to every request (app launch is not offered).
    #[error("{0}")]
    UnsupportedResponseType(String),
    /// The server could not decide (e.g. the replay cache is down); the client may retry.
    #[error("{0}")]
    Unavailable(String),
}

impl OAuthError {
    /// The RFC 6749 `error` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::TooLarge(_) => "invalid_request",
            Self::InvalidClient(_) => "invalid_client",
            Self::UnsupportedGrantType(_) => "unsupported_grant_type",
            Self::InvalidScope(_) => "invalid_scope",
            Self::UnsupportedResponseType(_) => "unsupported_response_type",
            Self::Unavailable(_) => "temporarily_unavailable",
        }
    }
}

/// The authorization server and resource-server checks, built once per process.
pub struct Auth {
    enabled: bool,
    passthrough: bool,
    token_path: String,
    skew_secs: u64,
    registry: clients::Registry,
    jwks: jwks::JwksCache,
    signer: TokenSigner,
    jti: Arc<dyn JtiStore>,
}

impl Auth {
    /// Builds from the configuration with a process-local replay cache.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Self::with_jti_store(config, Arc::new(MemoryJtiStore::new()))
    }

    /// Builds with a shared replay cache (the job store, so replicas see each other's `jti`s).
    pub fn with_jti_store(config: &Config, jti: Arc<dyn JtiStore>) -> anyhow::Result<Self> {
        let auth: &AuthConfig = &config.auth;
        let secret = match &auth.signing_secret {
            Some(secret) => secret.expose().as_bytes().to_vec(),
            None => {
                // `Config::warnings` says so at start.
                let mut secret = vec![0u8; 32];
                getrandom::fill(&mut secret)
                    .map_err(|e| anyhow::anyhow!("cannot generate a signing secret: {e}"))?;
                secret
            }
        };
        let registry = clients::Registry::from_config(auth)?;
        Ok(Self {
            enabled: auth.enabled,
            passthrough: auth.enabled && auth.passthrough,
            token_path: auth.token_path.clone(),
            skew_secs: auth.clock_skew_secs,
            registry,
            jwks: jwks::JwksCache::new(auth)?,
            signer: TokenSigner::new(&secret, auth.token_lifetime_secs, auth.clock_skew_secs)?,
            jti,
        })
    }

    /// Whether the bulk endpoints require the proxy's tokens (the manifest's `requiresAccessToken`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether passthrough requests require the proxy's tokens too (`auth.passthrough`).
    pub fn protects_passthrough(&self) -> bool {
        self.passthrough
    }

    /// Whether `client_id` may export `Group/{group_id}` (`[[auth.clients]] groups`): always
    /// with `auth.enabled = false`, and for a client registered without a list; never for a
    /// client this process does not know (a still valid token of a client since removed), whose
    /// list cannot be checked.
    pub fn may_export_group(&self, client_id: &str, group_id: &str) -> bool {
        !self.enabled
            || self.registry.get(client_id).is_some_and(|client| {
                client
                    .groups
                    .as_ref()
                    .is_none_or(|groups| groups.iter().any(|g| g == group_id))
            })
    }

    /// The token endpoint's path under the FHIR base, e.g. `/token`.
    pub fn token_path(&self) -> &str {
        &self.token_path
    }

    /// The absolute token endpoint URL for a public base URL.
    pub fn token_url(&self, public_base: &str) -> String {
        format!("{public_base}{}", self.token_path)
    }

    /// Verifies the request's bearer token (one issued by this proxy or a replica sharing its
    /// secret) and returns what it grants. With `auth.enabled = false` every request is
    /// [`ANONYMOUS`] with `system/*.read`.
    pub fn authorize(&self, headers: &HeaderMap) -> Result<Grant, AuthError> {
        if !self.enabled {
            return Ok(Grant {
                client_id: ANONYMOUS.into(),
                scopes: Scopes::all_read(),
            });
        }
        let token = bearer_token(headers)?;
        self.signer.verify(token, now_unix())
    }
}

/// The token of the one `Authorization: Bearer ...` header.
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::Missing)?;
    if values.next().is_some() {
        return Err(AuthError::Invalid("several Authorization headers".into()));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the Authorization header is not ASCII".into()))?;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Invalid("use the Bearer scheme".into()));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Invalid("the bearer token is empty".into()));
    }
    Ok(token)
}

pub(crate) use crate::job::now_unix;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn the_bearer_token_is_taken_from_one_authorization_header() {
        assert_eq!(bearer_token(&headers(&["Bearer abc"])), Ok("abc"));
        assert_eq!(bearer_token(&headers(&["bearer  abc "])), Ok("abc"));
        assert_eq!(bearer_token(&headers(&[])), Err(AuthError::Missing));
        assert!(matches!(
            bearer_token(&headers(&["Basic abc"])),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer"])),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer a", "Bearer b"])),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn require_read_names_the_types_not_covered() {
        let grant = Grant {
            client_id: "c".into(),
            scopes: Scopes::parse("system/Observation.read").unwrap(),
        };
        assert_eq!(grant.require_read(["Observation"]), Ok(()));
        assert_eq!(
            grant.require_read(["Patient", "Observation", "Condition"]),
            Err(AuthError::Forbidden("Patient, Condition".into()))
        );
    }

    #[test]
    fn only_a_registered_client_without_a_list_may_export_any_group() {
        let mut config = Config::default();
        config.upstream.url = "http://fhir/fhir".into();
        for (id, groups) in [("listed", Some(vec!["g".to_owned()])), ("any", None)] {
            config.auth.clients.push(crate::config::ClientConfig {
                client_id: id.into(),
                jwks: None,
                jwks_url: Some(format!("https://{id}/jwks.json")),
                scopes: vec!["system/*.read".into()],
                enabled: true,
                groups,
            });
        }
        let auth = Auth::new(&config).unwrap();
        assert!(auth.may_export_group("listed", "g"));
        assert!(!auth.may_export_group("listed", "h"));
        assert!(auth.may_export_group("any", "h"));
        // A valid token of a client no longer registered (removed from the configuration, or
        // signed by a replica that knows it): its Group list cannot be known, so nothing.
        assert!(!auth.may_export_group("removed", "g"));
    }

    #[test]
    fn disabled_auth_lets_everyone_read() {
        let mut config = Config::default();
        config.upstream.url = "http://fhir/fhir".into();
        config.auth.enabled = false;
        let auth = Auth::new(&config).unwrap();
        let grant = auth.authorize(&HeaderMap::new()).unwrap();
        assert_eq!(grant.client_id, ANONYMOUS);
        assert!(grant.scopes.can_read("Patient"));
    }
}
