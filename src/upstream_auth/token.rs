//! OAuth 2.0 access tokens from the upstream's token endpoint (`client_credentials`, with a client
//! secret or a signed client assertion), cached until shortly before they expire. One refresh at a
//! time: callers arriving while a token is requested wait for it instead of asking again, and a
//! failure is remembered for a moment so that many callers do not each try a token endpoint that
//! is down.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use serde_json::Value;

use super::CredentialError;
use super::key::AssertionKey;
use crate::config::Secret;

/// A token is renewed this long before it expires, at most.
const MAX_MARGIN: Duration = Duration::from_secs(60);
/// Lifetime assumed when the token response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// How long a token is kept at most when its `expires_in` is beyond what an `Instant` can hold.
const MAX_HELD: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a failed token request is answered from memory before the endpoint is tried again.
const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// How the proxy authenticates at the token endpoint.
pub(super) enum Grant {
    /// `client_secret_basic` (`post` = false) or `client_secret_post`.
    Secret {
        client_id: String,
        secret: Secret,
        post: bool,
    },
    /// `private_key_jwt`: a client assertion signed with `key`.
    Assertion {
        client_id: String,
        key: AssertionKey,
    },
}

pub(super) struct TokenSource {
    pub(super) http: reqwest::Client,
    pub(super) grant: Grant,
    /// The configured token endpoint; `None`: discovered from `smart_configuration`.
    pub(super) token_url: Option<String>,
    /// `{upstream}/.well-known/smart-configuration`.
    pub(super) smart_configuration: String,
    pub(super) scope: Option<String>,
    /// The token in use, and when to renew it.
    pub(super) current: Mutex<Option<Cached>>,
    /// Held while a token is requested; remembers the discovered endpoint and the last failure.
    pub(super) refresh: tokio::sync::Mutex<Refresh>,
}

#[derive(Clone)]
pub(super) struct Cached {
    header: HeaderValue,
    renew_at: Instant,
}

#[derive(Default)]
pub(super) struct Refresh {
    discovered: Option<String>,
    failed: Option<(Instant, CredentialError)>,
}

impl TokenSource {
    /// The `Authorization` value of a token that is not about to expire, requesting one if needed.
    pub(super) async fn authorization(&self) -> Result<HeaderValue, CredentialError> {
        if let Some(header) = self.fresh() {
            return Ok(header);
        }
        let mut refresh = self.refresh.lock().await;
        // Another caller may have renewed it while this one waited.
        if let Some(header) = self.fresh() {
            return Ok(header);
        }
        if let Some((at, error)) = &refresh.failed
            && at.elapsed() < FAILURE_HOLD
        {
            return Err(error.clone());
        }
        match self.request(&mut refresh).await {
            Ok(cached) => {
                refresh.failed = None;
                let header = cached.header.clone();
                *self.lock() = Some(cached);
                Ok(header)
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot obtain an upstream access token");
                refresh.failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    /// Forgets the token `sent` (the upstream refused it), unless it was renewed meanwhile.
    pub(super) fn reject(&self, sent: &HeaderValue) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.header == sent) {
            *current = None;
        }
    }

    fn fresh(&self) -> Option<HeaderValue> {
        self.lock()
            .as_ref()
            .filter(|c| Instant::now() < c.renew_at)
            .map(|c| c.header.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn request(&self, refresh: &mut Refresh) -> Result<Cached, CredentialError> {
        let token_url = match (&self.token_url, &refresh.discovered) {
            (Some(url), _) | (None, Some(url)) => url.clone(),
            (None, None) => {
                let url = self.discover().await?;
                refresh.discovered = Some(url.clone());
                url
            }
        };
        let mut form: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope.clone()));
        }
        let mut request = self.http.post(&token_url);
        match &self.grant {
            Grant::Secret {
                client_id,
                secret,
                post: true,
            } => {
                form.push(("client_id", client_id.clone()));
                form.push(("client_secret", secret.expose().to_owned()));
            }
            Grant::Secret {
                client_id, secret, ..
            } => {
                // RFC 6749 §2.3.1: both form-encoded before they are joined.
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(encode(client_id), Some(encode(secret.expose())));
            }
            Grant::Assertion { client_id, key } => {
                let assertion = key
                    .assertion(client_id, &token_url, unix_now())
                    .map_err(|e| CredentialError::Token(e.to_string()))?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", assertion));
            }
        }
        let failed = |why: String| CredentialError::Token(format!("{token_url}: {why}"));
        let asked = Instant::now();
        let response = request
            .header("accept", "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| failed(crate::telemetry::error_chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| failed(crate::telemetry::error_chain(&e)))?;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            // The OAuth error fields only: the rest of a body is not the log's to see.
            let error = json["error"].as_str().unwrap_or("no OAuth error code");
            let description = json["error_description"].as_str().unwrap_or("");
            let described: String = description.chars().take(200).collect();
            return Err(failed(format!(
                "the token endpoint answered {status} ({error}{}{described})",
                if described.is_empty() { "" } else { ": " }
            )));
        }
        let token = json["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| failed("the token response has no access_token".into()))?;
        if let Some(kind) = json["token_type"].as_str()
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(failed(format!("token_type {kind:?} is not Bearer")));
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| failed("the access token is not a valid header value".into()))?;
        header.set_sensitive(true);
        let lifetime = json["expires_in"]
            .as_u64()
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        let margin = (lifetime / 5).min(MAX_MARGIN);
        tracing::debug!(
            expires_in_secs = lifetime.as_secs(),
            "obtained an upstream access token"
        );
        Ok(Cached {
            header,
            // A huge `expires_in` (a token that does not expire) would overflow an `Instant`.
            renew_at: asked
                .checked_add(lifetime - margin)
                .unwrap_or_else(|| asked + MAX_HELD),
        })
    }

    /// The token endpoint named by the upstream's `.well-known/smart-configuration`.
    async fn discover(&self) -> Result<String, CredentialError> {
        let url = &self.smart_configuration;
        let failed = |why: String| {
            CredentialError::Token(format!(
                "upstream.auth.token_url is unset and {url} does not name a token endpoint: {why}"
            ))
        };
        let response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| failed(crate::telemetry::error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("it answered {status}")));
        }
        let json: Value = response
            .json()
            .await
            .map_err(|e| failed(format!("not JSON: {e}")))?;
        let endpoint = json["token_endpoint"]
            .as_str()
            .ok_or_else(|| failed("no token_endpoint".into()))?;
        let parsed = url::Url::parse(endpoint)
            .map_err(|e| failed(format!("token_endpoint {endpoint:?}: {e}")))?;
        check_discovered(url, &parsed).map_err(failed)?;
        Ok(endpoint.to_owned())
    }
}

/// A discovered token endpoint must be http(s), and https when the smart-configuration was: the
/// client assertion and the token it buys are not sent in clear because a document said so.
fn check_discovered(smart_configuration: &str, endpoint: &url::Url) -> Result<(), String> {
    match endpoint.scheme() {
        "https" => Ok(()),
        "http" if !smart_configuration.starts_with("https:") => Ok(()),
        "http" => Err(format!(
            "token_endpoint {endpoint} is plain http, and {smart_configuration} is https"
        )),
        _ => Err(format!("token_endpoint {endpoint} is not http(s)")),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_discovered_endpoint_is_no_less_secure_than_its_document() {
        let url = |u: &str| url::Url::parse(u).unwrap();
        let https_doc = "https://fhir.example/.well-known/smart-configuration";
        let http_doc = "http://127.0.0.1:8080/.well-known/smart-configuration";
        assert!(super::check_discovered(https_doc, &url("https://auth.example/token")).is_ok());
        assert!(super::check_discovered(https_doc, &url("http://auth.example/token")).is_err());
        assert!(super::check_discovered(http_doc, &url("http://127.0.0.1:8080/token")).is_ok());
        assert!(super::check_discovered(http_doc, &url("ftp://127.0.0.1/token")).is_err());
    }
}
