//! The private key the proxy signs its client assertions with (`upstream.auth.private_key_file`,
//! scheme `private_key_jwt`), and the assertion itself as SMART Backend Services specifies it:
//! header `alg`, `typ` JWT and `kid`; claims `iss` = `sub` = the client id, `aud` = the token URL,
//! `exp` at most five minutes ahead, a unique `jti`.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p384::ecdsa::signature::{SignatureEncoding as _, Signer as _};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};

fn uint(bytes: &[u8]) -> Result<rsa::pkcs1::UintRef<'_>, String> {
    rsa::pkcs1::UintRef::new(bytes).map_err(|e| e.to_string())
}

/// How long an assertion is valid: SMART allows at most five minutes.
const ASSERTION_LIFETIME_SECS: u64 = 240;

/// An EC P-384 (ES384) or RSA (RS384) private key, read from a JWK or a PEM file.
pub struct AssertionKey {
    signer: Signer,
    kid: Option<String>,
}

enum Signer {
    Es384(p384::ecdsa::SigningKey),
    Rs384(Box<rsa::pkcs1v15::SigningKey<rsa::sha2::Sha384>>),
}

/// The key stays out of logs.
impl std::fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl AssertionKey {
    /// Reads `path`: a private JWK (JSON; an EC P-384 or RSA key, its `kid` kept), or PEM
    /// (PKCS#8, PKCS#1 or SEC1). `alg`, when given, must be the key's (`ES384` for EC P-384,
    /// `RS384` for RSA); `kid` replaces the JWK's. Errors name the key and the file, never the
    /// key material.
    pub fn from_file(path: &Path, alg: Option<&str>, kid: Option<&str>) -> anyhow::Result<Self> {
        let named = |why: String| {
            anyhow::anyhow!("upstream.auth.private_key_file {}: {why}", path.display())
        };
        let bytes = std::fs::read(path).map_err(|e| named(format!("cannot read it: {e}")))?;
        let mut key = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            let jwk: Value =
                serde_json::from_slice(&bytes).map_err(|e| named(format!("not a JWK: {e}")))?;
            Self::from_jwk(&jwk).map_err(named)?
        } else {
            Self::from_pem(&bytes).map_err(named)?
        };
        if let Some(alg) = alg
            && alg != key.alg()
        {
            return Err(named(format!(
                "upstream.auth.alg = {alg:?} does not fit this key, which signs {}",
                key.alg()
            )));
        }
        if let Some(kid) = kid {
            key.kid = Some(kid.to_owned());
        }
        Ok(key)
    }

    fn from_jwk(jwk: &Value) -> Result<Self, String> {
        let member = |name: &str| -> Result<Vec<u8>, String> {
            let text = jwk[name]
                .as_str()
                .ok_or_else(|| format!("the JWK has no {name:?}"))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|e| format!("the JWK's {name:?} is not base64url: {e}"))
        };
        let signer = match jwk["kty"].as_str() {
            Some("EC") if jwk["crv"] == "P-384" => Signer::Es384(
                p384::ecdsa::SigningKey::from_slice(&member("d")?).map_err(|e| e.to_string())?,
            ),
            Some("RSA") => {
                let [n, e, d, p, q] = ["n", "e", "d", "p", "q"].map(member);
                let (n, e, d, p, q) = (n?, e?, d?, p?, q?);
                let one = [1u8];
                // The CRT values are computed again from the primes.
                let key = rsa::PrivateKey::try_from(rsa::pkcs1::RsaPrivateKey {
                    modulus: uint(&n)?,
                    public_exponent: uint(&e)?,
                    private_exponent: uint(&d)?,
                    prime1: uint(&p)?,
                    prime2: uint(&q)?,
                    exponent1: uint(&one)?,
                    exponent2: uint(&one)?,
                    coefficient: uint(&one)?,
                    other_prime_infos: None,
                })
                .map_err(|e| e.to_string())?;
                Signer::Rs384(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
            }
            _ => return Err("not an EC P-384 or RSA private JWK".into()),
        };
        Ok(Self {
            signer,
            kid: jwk["kid"].as_str().map(str::to_owned),
        })
    }

    fn from_pem(pem: &[u8]) -> Result<Self, String> {
        use p384::pkcs8::DecodePrivateKey as _;
        use rsa::pkcs1::DecodeRsaPrivateKey as _;
        let der =
            PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key: {e}"))?;
        let signer = match &der {
            PrivateKeyDer::Pkcs8(der) => {
                let bytes = der.secret_pkcs8_der();
                if let Ok(key) = p384::ecdsa::SigningKey::from_pkcs8_der(bytes) {
                    Signer::Es384(key)
                } else {
                    let key = rsa::PrivateKey::from_pkcs8_der(bytes)
                        .map_err(|_| "a PKCS#8 key that is neither EC P-384 nor RSA".to_owned())?;
                    Signer::Rs384(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
                }
            }
            PrivateKeyDer::Pkcs1(der) => {
                let key = rsa::PrivateKey::from_pkcs1_der(der.secret_pkcs1_der())
                    .map_err(|e| format!("not an RSA key: {e}"))?;
                Signer::Rs384(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
            }
            PrivateKeyDer::Sec1(der) => {
                let key = p384::SecretKey::from_sec1_der(der.secret_sec1_der())
                    .map_err(|_| "not an EC P-384 key".to_owned())?;
                Signer::Es384(key.into())
            }
            _ => return Err("an unsupported private key format".into()),
        };
        Ok(Self { signer, kid: None })
    }

    /// `ES384` or `RS384`.
    pub fn alg(&self) -> &'static str {
        match self.signer {
            Signer::Es384(_) => "ES384",
            Signer::Rs384(_) => "RS384",
        }
    }

    /// A signed client assertion for `client_id` at `token_url`, valid from `now` (Unix seconds)
    /// for four minutes, with a fresh `jti`.
    pub fn assertion(&self, client_id: &str, token_url: &str, now: u64) -> anyhow::Result<String> {
        let mut header = json!({ "alg": self.alg(), "typ": "JWT" });
        if let Some(kid) = &self.kid {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": client_id, "sub": client_id, "aud": token_url,
            "exp": now + ASSERTION_LIFETIME_SECS, "iat": now,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let failed =
            |e: p384::ecdsa::Error| anyhow::anyhow!("cannot sign the client assertion: {e}");
        let signature = match &self.signer {
            Signer::Es384(key) => {
                let signature: p384::ecdsa::Signature =
                    key.try_sign(input.as_bytes()).map_err(failed)?;
                signature.to_bytes().to_vec()
            }
            Signer::Rs384(key) => key.try_sign(input.as_bytes()).map_err(failed)?.to_vec(),
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(dir: &tempfile::TempDir, name: &str, content: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_jwk_key_signs_assertions_its_public_key_verifies() {
        let mut jwk = crate::auth::keygen::ec_p384_jwk().unwrap();
        jwk.insert("kid".into(), json!("k1"));
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir, "key.jwk", &Value::Object(jwk.clone()).to_string());
        let key = AssertionKey::from_file(&path, None, None).unwrap();
        assert_eq!(key.alg(), "ES384");
        let jwt = key.assertion("me", "https://auth/token", 1_000).unwrap();

        let mut public = jwk.clone();
        public.remove("d");
        let public: jsonwebtoken::jwk::Jwk = serde_json::from_value(Value::Object(public)).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES384);
        validation.validate_exp = false;
        validation.set_audience(&["https://auth/token"]);
        let decoded = jsonwebtoken::decode::<Value>(
            &jwt,
            &jsonwebtoken::DecodingKey::from_jwk(&public).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(decoded.header.kid.as_deref(), Some("k1"));
        let claims = decoded.claims;
        assert_eq!(
            (claims["iss"].as_str(), claims["sub"].as_str()),
            (Some("me"), Some("me"))
        );
        assert_eq!(claims["exp"], 1_240);
        let other = key.assertion("me", "https://auth/token", 1_000).unwrap();
        assert_ne!(
            claims["jti"],
            jsonwebtoken::dangerous::insecure_decode::<Value>(&other)
                .unwrap()
                .claims["jti"]
        );
    }

    #[test]
    fn errors_name_the_key_and_never_show_key_material() {
        let jwk = crate::auth::keygen::ec_p384_jwk().unwrap();
        let d = jwk["d"].as_str().unwrap().to_owned();
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir, "key.jwk", &Value::Object(jwk).to_string());
        let error = AssertionKey::from_file(&path, Some("RS384"), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("upstream.auth.alg") && error.contains("ES384"),
            "{error}"
        );
        assert!(!error.contains(&d), "{error}");
        let shown = format!(
            "{:?}",
            AssertionKey::from_file(&path, None, Some("x")).unwrap()
        );
        assert!(!shown.contains(&d) && shown.contains("ES384"), "{shown}");

        let path = written(
            &dir,
            "key.pem",
            "-----BEGIN NOTHING-----\nabc\n-----END NOTHING-----\n",
        );
        let error = AssertionKey::from_file(&path, None, None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("upstream.auth.private_key_file"), "{error}");
    }
}
