//! A complete SMART Backend Services client (SMART App Launch "Backend Services"; Bulk Data IG
//! "Export"): discovers the token endpoint, signs a client assertion with its private key, gets an
//! access token, then starts a system-level `$export`, polls it and downloads every file.
//!
//! ```sh
//! cargo run -- keygen --client-id my-client > my-client.txt   # register the printed [[auth.clients]]
//! # save the private JWK (the first JSON object in my-client.txt) as my-client.jwk.json, then:
//! BULK_BASE=http://localhost:8080/fhir BULK_CLIENT_ID=my-client BULK_CLIENT_KEY=my-client.jwk.json \
//!   cargo run --example backend_client
//! ```
//!
//! Environment: `BULK_BASE` (the proxy's FHIR base URL), `BULK_CLIENT_ID`, `BULK_CLIENT_KEY` (a file
//! with the private JWK), optional `BULK_SCOPE` (default `system/*.read`), `BULK_TYPES` (a `_type`
//! list) and `BULK_TOKEN_ONLY=1` (stop after printing the token).

use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use josekit::jwk::Jwk;
use josekit::jws::JwsSigner;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = env("BULK_BASE")?.trim_end_matches('/').to_owned();
    let client_id = env("BULK_CLIENT_ID")?;
    let key_file = env("BULK_CLIENT_KEY")?;
    let scope = std::env::var("BULK_SCOPE").unwrap_or_else(|_| "system/*.read".into());
    let key = Jwk::from_bytes(std::fs::read(&key_file).with_context(|| key_file.clone())?)
        .context("BULK_CLIENT_KEY is not a JWK")?;
    let http = reqwest::Client::new();

    // 1. Discovery: where is the token endpoint?
    let discovery: Value = http
        .get(format!("{base}/.well-known/smart-configuration"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token_url = discovery["token_endpoint"]
        .as_str()
        .context("no token_endpoint in .well-known/smart-configuration")?
        .to_owned();

    // 2. A signed assertion, exchanged for an access token.
    let assertion = sign_assertion(&key, &client_id, &token_url)?;
    let response = http
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("token request refused ({status}): {body}");
    }
    let token = body["access_token"]
        .as_str()
        .context("no access_token")?
        .to_owned();
    println!(
        "token for {client_id}: scope {}, expires in {} s",
        body["scope"].as_str().unwrap_or(""),
        body["expires_in"]
    );
    if std::env::var("BULK_TOKEN_ONLY").is_ok() {
        println!("{token}");
        return Ok(());
    }

    // 3. Kick-off: 202 Accepted + Content-Location (the status URL).
    let mut kickoff = http
        .get(format!("{base}/$export"))
        .bearer_auth(&token)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async");
    if let Ok(types) = std::env::var("BULK_TYPES") {
        kickoff = kickoff.query(&[("_type", types)]);
    }
    let response = kickoff.send().await?;
    if response.status() != 202 {
        let status = response.status();
        bail!("kick-off refused ({status}): {}", response.text().await?);
    }
    let status_url = response
        .headers()
        .get("content-location")
        .context("no Content-Location on the kick-off response")?
        .to_str()?
        .to_owned();
    println!("export started: {status_url}");

    // 4. Poll until the manifest is ready, honouring Retry-After.
    let manifest: Value = loop {
        let response = http
            .get(&status_url)
            .bearer_auth(&token)
            .header("accept", "application/json")
            .send()
            .await?;
        match response.status().as_u16() {
            202 | 429 => {
                let wait = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(2);
                if let Some(progress) = response.headers().get("x-progress") {
                    println!("in progress: {}", progress.to_str().unwrap_or(""));
                }
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 60))).await;
            }
            200 => break response.json().await?,
            other => bail!("export failed ({other}): {}", response.text().await?),
        }
    };

    // 5. Download every file with the same token (requiresAccessToken).
    let outputs = manifest["output"].as_array().cloned().unwrap_or_default();
    for output in &outputs {
        let url = output["url"].as_str().context("an output without url")?;
        let mut request = http.get(url).header("accept", "application/fhir+ndjson");
        if manifest["requiresAccessToken"] == json!(true) {
            request = request.bearer_auth(&token);
        }
        let text = request.send().await?.error_for_status()?.text().await?;
        println!(
            "{}: {} resources from {url}",
            output["type"],
            text.lines().count()
        );
    }
    println!(
        "done: {} files, {} error files",
        outputs.len(),
        manifest["error"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// The client assertion (SMART Backend Services "Authenticating to the token endpoint"): header
/// `alg`/`typ`/`kid`, claims `iss` = `sub` = client id, `aud` = token URL, `exp` within five
/// minutes, a unique `jti`; signed with RS384 or ES384 according to the key.
fn sign_assertion(key: &Jwk, client_id: &str, token_url: &str) -> anyhow::Result<String> {
    let alg = match key.key_type() {
        "EC" => "ES384",
        "RSA" => "RS384",
        other => bail!("unsupported key type {other}: use an EC P-384 or RSA key"),
    };
    let kid = key.key_id().context("the JWK has no kid")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let header = json!({ "alg": alg, "typ": "JWT", "kid": kid });
    let claims = json!({
        "iss": client_id, "sub": client_id, "aud": token_url,
        "exp": now + 240, "iat": now, "jti": uuid::Uuid::new_v4().to_string(),
    });
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = if alg == "ES384" {
        josekit::jws::ES384
            .signer_from_jwk(key)?
            .sign(input.as_bytes())?
    } else {
        josekit::jws::RS384
            .signer_from_jwk(key)?
            .sign(input.as_bytes())?
    };
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("set {name} (see the example's documentation)"))
}
