//! The proxy's own access tokens (SPEC A4.22–24): JWTs (`typ` `at+jwt`, RFC 9068 style) signed with
//! HS256 under `auth.signing_secret`, carrying the client id and the granted scopes. Any replica that
//! shares the secret verifies them without a store lookup; they are short-lived (default 300 s)
//! and never refreshed, so revocation is by expiry (or by rotating the secret).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, Grant};
use crate::fhir::scopes::Scopes;

/// The `iss` of every token the proxy issues.
pub const ISSUER: &str = "fhir-bulk-proxy";
/// The `typ` header of access tokens: it keeps a client assertion or another JWT from passing as one.
pub const TOKEN_TYPE: &str = "at+jwt";
/// Longest bearer token looked at; the proxy's own are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    client_id: String,
    scope: String,
    iat: u64,
    exp: u64,
    jti: String,
}

pub struct TokenSigner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime_secs: u64,
    skew_secs: u64,
}

/// An issued token and how long it lives.
#[derive(Debug, Clone)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: u64,
}

impl TokenSigner {
    /// Built once at start-up; fails only on an empty secret (configuration requires 32 bytes).
    pub fn new(secret: &[u8], lifetime_secs: u64, skew_secs: u64) -> anyhow::Result<Self> {
        Ok(Self {
            encoding: EncodingKey::from_secret(secret)?,
            decoding: DecodingKey::from_secret(secret)?,
            lifetime_secs,
            skew_secs,
        })
    }

    /// Signs a token for `client_id` with `scopes`, valid from `now` for the configured lifetime.
    pub fn issue(&self, client_id: &str, scopes: &Scopes, now: u64) -> Result<Issued, String> {
        let claims = Claims {
            iss: ISSUER.into(),
            sub: client_id.into(),
            client_id: client_id.into(),
            scope: scopes.to_string(),
            iat: now,
            exp: now + self.lifetime_secs,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(TOKEN_TYPE.into());
        let access_token =
            jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| e.to_string())?;
        Ok(Issued {
            access_token,
            expires_in: self.lifetime_secs,
        })
    }

    /// Verifies a bearer token issued by this proxy (or a replica sharing its secret).
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("the token is too long".into()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        // Time is checked below against the caller's clock, with the configured skew.
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.set_issuer(&[ISSUER]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        if data.header.typ.as_deref() != Some(TOKEN_TYPE) {
            return Err(AuthError::Invalid(
                "not an access token of this server".into(),
            ));
        }
        let claims = data.claims;
        if claims.exp.saturating_add(self.skew_secs) < now {
            return Err(AuthError::Expired);
        }
        let scopes = Scopes::parse(&claims.scope)
            .map_err(|e| AuthError::Invalid(format!("the token's scope is invalid: {e}")))?;
        Ok(Grant {
            client_id: claims.client_id,
            scopes,
        })
    }
}

/// A short reason for a failed verification, without echoing the token.
fn describe(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => {
            "the signature does not match (not issued by this server)".into()
        }
        ErrorKind::InvalidAlgorithm => "the token is not signed the way this server signs".into(),
        ErrorKind::InvalidIssuer => "the token was not issued by this server".into(),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "the token is malformed".into(),
        _ => "the token cannot be verified".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn signer(secret: &[u8]) -> TokenSigner {
        TokenSigner::new(secret, 300, 60).unwrap()
    }

    #[test]
    fn a_token_carries_the_client_and_its_scopes() {
        let signer = signer(&[7; 32]);
        let scopes = Scopes::parse("system/Patient.read system/Observation.rs").unwrap();
        let issued = signer.issue("client-1", &scopes, NOW).unwrap();
        assert_eq!(issued.expires_in, 300);
        let grant = signer.verify(&issued.access_token, NOW + 10).unwrap();
        assert_eq!(grant.client_id, "client-1");
        assert_eq!(grant.scopes, scopes);
    }

    #[test]
    fn tokens_expire_after_their_lifetime_plus_the_skew() {
        let signer = signer(&[7; 32]);
        let token = signer
            .issue("c", &Scopes::all_read(), NOW)
            .unwrap()
            .access_token;
        assert!(signer.verify(&token, NOW + 300 + 60).is_ok());
        assert!(matches!(
            signer.verify(&token, NOW + 300 + 61),
            Err(AuthError::Expired)
        ));
    }

    #[test]
    fn another_secret_or_a_mangled_token_is_refused() {
        let token = signer(&[7; 32])
            .issue("c", &Scopes::all_read(), NOW)
            .unwrap()
            .access_token;
        let other = signer(&[8; 32]);
        assert!(
            matches!(other.verify(&token, NOW), Err(AuthError::Invalid(m)) if m.contains("signature"))
        );
        let this = signer(&[7; 32]);
        for bad in [
            "",
            "invalidToken",
            "a.b.c",
            &token[..token.len() - 2],
            &"x".repeat(9000),
        ] {
            assert!(
                matches!(this.verify(bad, NOW), Err(AuthError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_jwt_of_another_type_is_not_an_access_token() {
        let secret = [7; 32];
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some("JWT".into());
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "c".into(),
            client_id: "c".into(),
            scope: "system/*.read".into(),
            iat: NOW,
            exp: NOW + 60,
            jti: "j".into(),
        };
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(&secret).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            signer(&secret).verify(&token, NOW),
            Err(AuthError::Invalid(_))
        ));
    }
}
