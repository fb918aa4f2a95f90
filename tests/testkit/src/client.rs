//! A small Bulk Data client, the other side of the proxy: SMART Backend Services authentication
//! (SMART App Launch 2.2 "Backend Services": discovery, a signed client assertion, the
//! `client_credentials` token request) and the Bulk Data IG "Export" flow (kick-off, polling that
//! honours `Retry-After`, downloads). The `backend_client` and `demo` examples, their test and the
//! end-to-end check against a real FHIR server use it; the proxy itself does not.
//!
//! It lives in testkit rather than beside the examples so that the examples, the benchmarks and
//! the integration tests share one implementation, without shipping it in the library.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p384::ecdsa::signature::{SignatureEncoding as _, Signer as _};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `client_assertion_type` of a signed-JWT assertion (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Polls of one export before giving up (with the proxy's usual `Retry-After` of a second or two,
/// well over an hour).
const MAX_POLLS: u32 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The server answered, but not with what the step needs.
    #[error("{step} refused ({status}): {body}")]
    Refused {
        step: &'static str,
        status: StatusCode,
        body: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("client key: {0}")]
    Key(String),
}

/// A client's private key (EC P-384 or RSA), as `keygen` prints it.
#[derive(Clone)]
pub struct ClientKey {
    signer: Signer,
    alg: &'static str,
    kid: String,
}

#[derive(Clone)]
enum Signer {
    /// ES384: ECDSA over P-384 with SHA-384.
    Es384(p384::ecdsa::SigningKey),
    /// RS384: RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384(Box<rsa::pkcs1v15::SigningKey<rsa::sha2::Sha384>>),
}

/// The key itself stays out of logs and panics.
impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl ClientKey {
    /// A private JWK (JSON object with `kid`): EC (`crv` P-384, `d`) or RSA (`n`, `e`, `d`, `p`,
    /// `q`).
    pub fn from_json(value: &Value) -> Result<Self, ClientError> {
        let jwk = value
            .as_object()
            .ok_or_else(|| ClientError::Key("a JWK is a JSON object".into()))?;
        let member = |name: &str| -> Result<Vec<u8>, ClientError> {
            let text = jwk
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| ClientError::Key(format!("the JWK has no {name:?}")))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|e| ClientError::Key(format!("the JWK's {name:?} is not base64url: {e}")))
        };
        let key_error = |e: &dyn std::fmt::Display| ClientError::Key(e.to_string());
        let (signer, alg) = match jwk.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let curve = jwk.get("crv").and_then(Value::as_str);
                if curve != Some("P-384") {
                    return Err(ClientError::Key(format!(
                        "unsupported curve {curve:?}: use an EC P-384 or RSA key"
                    )));
                }
                let key = p384::ecdsa::SigningKey::from_slice(&member("d")?)
                    .map_err(|e| key_error(&e))?;
                (Signer::Es384(key), "ES384")
            }
            Some("RSA") => {
                let [n, e, d, p, q] = ["n", "e", "d", "p", "q"].map(member);
                let (n, e, d, p, q) = (n?, e?, d?, p?, q?);
                // dp, dq and qi are derived again from the primes.
                let key = rsa::PrivateKey::try_from(rsa::pkcs1::RsaPrivateKey {
                    modulus: uint(&n)?,
                    public_exponent: uint(&e)?,
                    private_exponent: uint(&d)?,
                    prime1: uint(&p)?,
                    prime2: uint(&q)?,
                    exponent1: uint(&[1])?,
                    exponent2: uint(&[1])?,
                    coefficient: uint(&[1])?,
                    other_prime_infos: None,
                })
                .map_err(|e| key_error(&e))?;
                (
                    Signer::Rs384(Box::new(rsa::pkcs1v15::SigningKey::new(key))),
                    "RS384",
                )
            }
            other => {
                return Err(ClientError::Key(format!(
                    "unsupported key type {}: use an EC P-384 or RSA key",
                    other.unwrap_or("(none)")
                )));
            }
        };
        let kid = jwk
            .get("kid")
            .and_then(Value::as_str)
            .ok_or_else(|| ClientError::Key("the JWK has no kid".into()))?
            .to_owned();
        Ok(Self { signer, alg, kid })
    }

    /// A file holding a private JWK.
    pub fn from_file(path: &Path) -> Result<Self, ClientError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ClientError::Key(format!("{}: {e}", path.display())))?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Key(format!("{}: not a JWK: {e}", path.display())))?;
        Self::from_json(&value)
    }

    /// `ES384` or `RS384`.
    pub fn alg(&self) -> &'static str {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWS signature of `input` (RFC 7518 §3): for ES384 the 96 bytes of `r` and `s`, for
    /// RS384 the PKCS#1 v1.5 signature.
    pub fn sign(&self, input: &[u8]) -> Result<Vec<u8>, ClientError> {
        let failed = |e: p384::ecdsa::Error| ClientError::Key(format!("signing failed: {e}"));
        Ok(match &self.signer {
            Signer::Es384(key) => {
                let signature: p384::ecdsa::Signature = key.try_sign(input).map_err(failed)?;
                signature.to_bytes().to_vec()
            }
            Signer::Rs384(key) => key.try_sign(input).map_err(failed)?.to_vec(),
        })
    }

    /// The client assertion (SMART Backend Services "Authenticating to the token endpoint"):
    /// header `alg`/`typ`/`kid`; claims `iss` = `sub` = client id, `aud` = token URL, `exp` four
    /// minutes ahead (at most five are allowed), a unique `jti`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, ClientError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| ClientError::Key(format!("clock: {e}")))?
            .as_secs();
        let header = json!({ "alg": self.alg, "typ": "JWT", "kid": self.kid });
        let claims = json!({
            "iss": client_id, "sub": client_id, "aud": token_url,
            "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// The token endpoint's answer.
#[derive(Debug, Clone)]
pub struct Token {
    pub access_token: String,
    /// The scopes granted (may be fewer than asked).
    pub scope: String,
    pub expires_in: u64,
    /// Where the token came from (discovered in `.well-known/smart-configuration`).
    pub token_url: String,
}

/// One answer to a status poll that is not the manifest yet.
#[derive(Debug, Clone)]
pub struct Progress {
    /// 202 (in progress) or 429 (polled too fast).
    pub status: StatusCode,
    /// `X-Progress`, when the server sent one.
    pub progress: Option<String>,
    /// How long the client waits before the next poll.
    pub wait: Duration,
}

/// An authenticated client of one FHIR base.
#[derive(Debug, Clone)]
pub struct BulkClient {
    http: reqwest::Client,
    base: String,
    token: Token,
}

impl BulkClient {
    /// Discovers the token endpoint of `base` and gets an access token for `scope`.
    pub async fn connect(
        base: &str,
        client_id: &str,
        key: &ClientKey,
        scope: &str,
    ) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let http = reqwest::Client::new();
        let response = http
            .get(format!("{base}/.well-known/smart-configuration"))
            .header("accept", "application/json")
            .send()
            .await?;
        let discovery: Value = ok_json(response, "discovery").await?;
        let token_url = discovery["token_endpoint"]
            .as_str()
            .ok_or_else(|| {
                ClientError::Protocol("no token_endpoint in .well-known/smart-configuration".into())
            })?
            .to_owned();
        let assertion = key.assertion(client_id, &token_url)?;
        let response = http
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", scope),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion.as_str()),
            ])
            .send()
            .await?;
        let body: Value = ok_json(response, "token request").await?;
        let access_token = body["access_token"]
            .as_str()
            .ok_or_else(|| ClientError::Protocol(format!("no access_token in {body}")))?
            .to_owned();
        let token = Token {
            access_token,
            scope: body["scope"].as_str().unwrap_or_default().to_owned(),
            expires_in: body["expires_in"].as_u64().unwrap_or_default(),
            token_url,
        };
        Ok(Self { http, base, token })
    }

    pub fn token(&self) -> &Token {
        &self.token
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Starts an export: `path_and_query` under the base, e.g. `/$export?_type=Patient`,
    /// `/Patient/$export` or `/Group/g1/$export`. Returns the status URL (`Content-Location` of
    /// the 202).
    pub async fn kick_off(&self, path_and_query: &str) -> Result<String, ClientError> {
        let path = path_and_query.trim_start_matches('/');
        let response = self
            .http
            .get(format!("{}/{path}", self.base))
            .bearer_auth(&self.token.access_token)
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .send()
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(refused(response, "kick-off").await);
        }
        let location = response
            .headers()
            .get("content-location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ClientError::Protocol("no Content-Location on the kick-off response".into())
            })?;
        Ok(location.to_owned())
    }

    /// Polls `status_url` until the manifest is ready, waiting as `Retry-After` says (1–60 s;
    /// 2 s when it is missing), and tells `on_progress` about every poll that is not done yet.
    pub async fn wait(
        &self,
        status_url: &str,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Value, ClientError> {
        for _ in 0..MAX_POLLS {
            let response = self
                .http
                .get(status_url)
                .bearer_auth(&self.token.access_token)
                .header("accept", "application/json")
                .send()
                .await?;
            let status = response.status();
            match status {
                StatusCode::OK => return Ok(response.json().await?),
                StatusCode::ACCEPTED | StatusCode::TOO_MANY_REQUESTS => {
                    let header = |name: &str| {
                        response
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let seconds = header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(2);
                    let progress = Progress {
                        status,
                        progress: header("x-progress"),
                        wait: Duration::from_secs(seconds.clamp(1, 60)),
                    };
                    on_progress(&progress);
                    tokio::time::sleep(progress.wait).await;
                }
                _ => return Err(refused(response, "status").await),
            }
        }
        Err(ClientError::Protocol(format!(
            "the export at {status_url} did not finish after {MAX_POLLS} polls"
        )))
    }

    /// Downloads one file of a manifest (with the token: the proxy's manifests say
    /// `requiresAccessToken`), streaming: `each_line` sees every non-empty NDJSON line.
    /// Returns how many lines there were.
    pub async fn download(
        &self,
        url: &str,
        mut each_line: impl FnMut(&str) -> Result<(), ClientError>,
    ) -> Result<u64, ClientError> {
        use futures_util::StreamExt as _;
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.token.access_token)
            .header("accept", "application/fhir+ndjson")
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(refused(response, "download").await);
        }
        let mut lines = 0;
        let mut pending: Vec<u8> = Vec::new();
        let mut emit = |line: &[u8]| -> Result<(), ClientError> {
            let line = std::str::from_utf8(line)
                .map_err(|e| ClientError::Protocol(format!("{url}: not UTF-8: {e}")))?
                .trim();
            if !line.is_empty() {
                lines += 1;
                each_line(line)?;
            }
            Ok(())
        };
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            pending.extend_from_slice(&chunk?);
            let mut start = 0;
            while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
                emit(&pending[start..start + end])?;
                start += end + 1;
            }
            pending.drain(..start);
        }
        emit(&pending)?;
        Ok(lines)
    }

    /// Deletes a job (the client is done with it, or cancels it).
    pub async fn delete(&self, status_url: &str) -> Result<(), ClientError> {
        let response = self
            .http
            .delete(status_url)
            .bearer_auth(&self.token.access_token)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(refused(response, "delete").await);
        }
        Ok(())
    }
}

/// The JSON body of a 2xx answer, or [`ClientError::Refused`].
async fn ok_json(response: reqwest::Response, step: &'static str) -> Result<Value, ClientError> {
    if !response.status().is_success() {
        return Err(refused(response, step).await);
    }
    Ok(response.json().await?)
}

/// A JWK member as a DER integer.
fn uint(bytes: &[u8]) -> Result<rsa::pkcs1::UintRef<'_>, ClientError> {
    rsa::pkcs1::UintRef::new(bytes).map_err(|e| ClientError::Key(e.to_string()))
}

async fn refused(response: reqwest::Response, step: &'static str) -> ClientError {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    ClientError::Refused { step, status, body }
}
