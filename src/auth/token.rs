//! The token request (SMART Backend Services, SPEC A4.7–27; RFC 6749 §4.4 `client_credentials` with
//! an RFC 7523 `private_key_jwt` client assertion): form parsing, client authentication, the scope
//! grant and the response body.

use std::collections::HashMap;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Serialize;
use serde_json::Value;

use super::assertion::{self, Expected, KeyChoice};
use super::clients::{Client, KeySource};
use super::jti::JtiError;
use super::{Auth, OAuthError, now_unix};
use crate::fhir::scopes::Scopes;

/// The only `client_assertion_type` (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A token request with every required parameter present exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub grant_type: String,
    pub scope: String,
    pub client_assertion_type: String,
    pub client_assertion: String,
    /// Optional (RFC 7521 §4.2); when sent it must match the assertion's `iss`.
    pub client_id: Option<String>,
}

impl TokenRequest {
    /// Parses an `application/x-www-form-urlencoded` body. A missing or repeated parameter is an
    /// `invalid_request` (RFC 6749 §3.2, §5.2); unknown parameters are ignored (§3.2).
    pub fn from_form(body: &[u8]) -> Result<Self, OAuthError> {
        let mut params: HashMap<String, String> = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(body) {
            let known = matches!(
                name.as_ref(),
                "grant_type" | "scope" | "client_assertion_type" | "client_assertion" | "client_id"
            );
            if known
                && params
                    .insert(name.to_string(), value.into_owned())
                    .is_some()
            {
                return Err(OAuthError::InvalidRequest(format!(
                    "the parameter `{name}` is repeated"
                )));
            }
        }
        let mut take = |name: &str| {
            params.remove(name).ok_or_else(|| {
                OAuthError::InvalidRequest(format!("the parameter `{name}` is missing"))
            })
        };
        Ok(Self {
            grant_type: take("grant_type")?,
            scope: take("scope")?,
            client_assertion_type: take("client_assertion_type")?,
            client_assertion: take("client_assertion")?,
            client_id: take("client_id").ok(),
        })
    }
}

/// The successful token response (RFC 6749 §5.1, SPEC A4.22).
#[derive(Debug, Clone, Serialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
}

impl Auth {
    /// Authenticates the client and issues a token. `token_url` is the absolute URL of this
    /// endpoint as the client sees it: the assertion's `aud` must equal it.
    pub async fn token(
        &self,
        request: &TokenRequest,
        token_url: &str,
    ) -> Result<TokenResponse, OAuthError> {
        // The assertion is verified (and its jti spent) before the request's other faults are
        // reported: an assertion refused for any reason is never usable again, whatever the
        // next request around it says (another grant_type, another scope).
        let authenticated = if request.client_assertion_type == JWT_BEARER {
            Some(self.authenticate(request, token_url).await)
        } else {
            None
        };
        if request.grant_type != "client_credentials" {
            return Err(OAuthError::UnsupportedGrantType(format!(
                "grant_type must be client_credentials, not {:?}",
                request.grant_type
            )));
        }
        let Some(authenticated) = authenticated else {
            return Err(OAuthError::InvalidClient(format!(
                "client_assertion_type must be {JWT_BEARER}"
            )));
        };
        let client = authenticated?;
        let granted = Scopes::grant(&request.scope, &client.scopes)
            .map_err(|e| OAuthError::InvalidScope(e.to_string()))?;
        let issued = self
            .signer
            .issue(&client.id, &granted, now_unix())
            .map_err(OAuthError::Unavailable)?;
        tracing::info!(client_id = %client.id, scope = %granted, "access token issued");
        Ok(TokenResponse {
            access_token: issued.access_token,
            token_type: "bearer",
            expires_in: issued.expires_in,
            scope: granted.to_string(),
        })
    }

    /// Verifies the client assertion (SPEC A4.10–15); every failure is `invalid_client`.
    async fn authenticate(
        &self,
        request: &TokenRequest,
        token_url: &str,
    ) -> Result<&Client, OAuthError> {
        let invalid = OAuthError::InvalidClient;
        let unverified = assertion::parse(&request.client_assertion).map_err(invalid)?;
        let client_id = unverified
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("the assertion has no iss (the client_id)".into()))?;
        if request
            .client_id
            .as_deref()
            .is_some_and(|id| id != client_id)
        {
            return Err(invalid(
                "client_id does not match the assertion's iss".into(),
            ));
        }
        let client = self
            .registry
            .get(client_id)
            .ok_or_else(|| invalid("unknown client".into()))?;
        if !client.enabled {
            return Err(invalid("the client is disabled".into()));
        }
        let header = &unverified.header;
        let key = self.resolve_key(client, header).await?;
        let jwk: Jwk = serde_json::from_value(key).map_err(|e| {
            invalid(format!(
                "the registered key {:?} is unusable: {e}",
                header.kid
            ))
        })?;
        let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| {
            invalid(format!(
                "the registered key {:?} is unusable: {e}",
                header.kid
            ))
        })?;
        let mut validation = Validation::new(header.alg);
        // Claims are checked by `check_claims` against an explicit clock and skew.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let verified =
            jsonwebtoken::decode::<Value>(&request.client_assertion, &decoding, &validation)
                .map_err(|e| invalid(format!("the assertion's signature does not verify: {e}")))?;
        let checked = assertion::check_claims(
            &verified.claims,
            &Expected {
                client_id,
                token_url,
                now: now_unix(),
                skew: self.skew_secs,
            },
        )
        .map_err(invalid)?;
        // Checked last, after the signature, so nobody can burn another client's jti values.
        let keep_until = checked.exp.saturating_add(self.skew_secs);
        match self
            .jti
            .first_use(client_id, &checked.jti, keep_until)
            .await
        {
            Ok(true) => Ok(client),
            Ok(false) => Err(invalid("the assertion's jti was already used".into())),
            Err(e @ (JtiError::Unavailable(_) | JtiError::Full(_))) => {
                Err(OAuthError::Unavailable(e.to_string()))
            }
        }
    }

    /// SPEC A4.13: the `jku` must be the registered URL; exactly one key must match `kid` and `alg`;
    /// an unknown `kid` at a JWKS URL triggers one fresh fetch (key rotation).
    async fn resolve_key(
        &self,
        client: &Client,
        header: &assertion::AssertionHeader,
    ) -> Result<Value, OAuthError> {
        let invalid = OAuthError::InvalidClient;
        let choose = |keys: &[Value]| assertion::select_key(keys, &header.kid, header.alg).cloned();
        let explain = |choice: KeyChoice| match choice {
            KeyChoice::None => invalid(format!(
                "no registered key has kid {:?} and fits {:?}",
                header.kid, header.alg
            )),
            KeyChoice::Several(n) => invalid(format!(
                "{n} registered keys have kid {:?}: a kid must pick one key",
                header.kid
            )),
        };
        match (&client.keys, &header.jku) {
            (KeySource::Inline(_), Some(_)) => Err(invalid(
                "jku is not accepted: this client registered its keys inline".into(),
            )),
            (KeySource::Url(url), Some(jku)) if jku != url => Err(invalid(
                "jku is not the JWKS URL registered for this client".into(),
            )),
            (KeySource::Inline(keys), None) => choose(keys).map_err(explain),
            (KeySource::Url(url), _) => {
                let keys = self
                    .jwks
                    .keys(url, false)
                    .await
                    .map_err(|e| invalid(e.to_string()))?;
                match choose(&keys) {
                    Err(KeyChoice::None) => {
                        let keys = self
                            .jwks
                            .keys(url, true)
                            .await
                            .map_err(|e| invalid(e.to_string()))?;
                        choose(&keys).map_err(explain)
                    }
                    other => other.map_err(explain),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<TokenRequest, OAuthError> {
        TokenRequest::from_form(body.as_bytes())
    }

    const FULL: &str = "grant_type=client_credentials&scope=system%2F*.read\
        &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
        &client_assertion=a.b.c";

    #[test]
    fn a_complete_form_parses() {
        let request = form(FULL).unwrap();
        assert_eq!(request.scope, "system/*.read");
        assert_eq!(request.client_assertion_type, JWT_BEARER);
        assert_eq!(request.client_id, None);
        let with_id = form(&format!("{FULL}&client_id=c1&extra=ignored")).unwrap();
        assert_eq!(with_id.client_id.as_deref(), Some("c1"));
    }

    #[test]
    fn each_missing_parameter_is_named() {
        for name in [
            "grant_type",
            "scope",
            "client_assertion_type",
            "client_assertion",
        ] {
            let body: String = FULL
                .split('&')
                .filter(|p| !p.starts_with(&format!("{name}=")))
                .collect::<Vec<_>>()
                .join("&");
            match form(&body) {
                Err(OAuthError::InvalidRequest(m)) => assert!(m.contains(name), "{m}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_repeated_parameter_is_refused() {
        for repeat in [
            "grant_type=client_credentials",
            "scope=x",
            "client_assertion=x",
            "client_id=a&client_id=b",
        ] {
            match form(&format!("{FULL}&{repeat}")) {
                Err(OAuthError::InvalidRequest(m)) => assert!(m.contains("repeated"), "{m}"),
                other => panic!("{repeat}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_empty_scope_is_present_but_empty() {
        let request = form(&FULL.replace("scope=system%2F*.read", "scope=")).unwrap();
        assert_eq!(request.scope, "");
    }
}
