//! A complete SMART Backend Services client (SMART App Launch "Backend Services"; Bulk Data IG
//! "Export"): discovers the token endpoint, signs a client assertion with its private key, gets an
//! access token, then starts an `$export`, polls it and downloads every file. The protocol steps are
//! [`testkit::client`]; this file is the command line around them.
//!
//! ```sh
//! cargo run -- keygen --client-id my-client > my-client.txt   # register the printed [[auth.clients]]
//! # save the private JWK (the first JSON object in my-client.txt) as my-client.jwk.json, then:
//! BULK_BASE=http://localhost:8080/fhir BULK_CLIENT_ID=my-client BULK_CLIENT_KEY=my-client.jwk.json \
//!   cargo run --example backend_client
//! ```
//!
//! Environment: `BULK_BASE` (the proxy's FHIR base URL), `BULK_CLIENT_ID`, `BULK_CLIENT_KEY` (a file
//! with the private JWK); optional: `BULK_SCOPE` (default `system/*.read`), `BULK_EXPORT` (the
//! kick-off path under the base: `$export` (default), `Patient/$export`, `Group/ID/$export`),
//! `BULK_TYPES` (a `_type` list), `BULK_OUT` (a directory to save the manifest and the files in,
//! as `manifest.json`, `TYPE.N.ndjson` and `error.N.ndjson`), `BULK_TOKEN_ONLY=1` (stop after printing the token).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use serde_json::Value;
use testkit::client::{BulkClient, ClientKey};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = env("BULK_BASE")?;
    let client_id = env("BULK_CLIENT_ID")?;
    let key = ClientKey::from_file(&PathBuf::from(env("BULK_CLIENT_KEY")?))?;
    let scope = std::env::var("BULK_SCOPE").unwrap_or_else(|_| "system/*.read".into());
    let out = std::env::var_os("BULK_OUT").map(PathBuf::from);

    // 1–2. Discovery, a signed assertion, an access token.
    let client = BulkClient::connect(&base, &client_id, &key, &scope).await?;
    let token = client.token();
    println!(
        "token for {client_id} from {}: scope {:?}, expires in {} s",
        token.token_url, token.scope, token.expires_in
    );
    if std::env::var_os("BULK_TOKEN_ONLY").is_some() {
        println!("{}", token.access_token);
        return Ok(());
    }

    // 3. Kick-off: 202 Accepted + Content-Location (the status URL).
    let mut kickoff = std::env::var("BULK_EXPORT").unwrap_or_else(|_| "$export".into());
    if let Ok(types) = std::env::var("BULK_TYPES") {
        kickoff.push_str(if kickoff.contains('?') { "&" } else { "?" });
        kickoff.push_str("_type=");
        kickoff.push_str(&types);
    }
    let status_url = client.kick_off(&kickoff).await?;
    println!("export started: {status_url}");

    // 4. Poll until the manifest is ready, honouring Retry-After.
    let manifest = client
        .wait(&status_url, |poll| {
            println!(
                "{}: {} (next poll in {} s)",
                poll.status.as_u16(),
                poll.progress.as_deref().unwrap_or("in progress"),
                poll.wait.as_secs()
            );
        })
        .await?;
    println!(
        "manifest: transactionTime {}, {} files, {} error files",
        manifest["transactionTime"],
        files(&manifest, "output").len(),
        files(&manifest, "error").len()
    );

    // 5. Download every file with the same token (the manifest says requiresAccessToken).
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let path = dir.join("manifest.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)
            .with_context(|| path.display().to_string())?;
    }
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut numbers: BTreeMap<String, u32> = BTreeMap::new();
    for (kind, file) in files(&manifest, "output")
        .iter()
        .map(|f| ("output", f))
        .chain(files(&manifest, "error").iter().map(|f| ("error", f)))
    {
        let url = file["url"]
            .as_str()
            .context("a manifest file without url")?;
        let resource_type = file["type"].as_str().unwrap_or("unknown");
        let name = if kind == "error" {
            "error"
        } else {
            resource_type
        };
        let number = numbers.entry(name.to_owned()).or_default();
        *number += 1;
        let mut sink = match &out {
            Some(dir) => {
                let path = dir.join(format!("{name}.{number}.ndjson"));
                let file =
                    std::fs::File::create(&path).with_context(|| path.display().to_string())?;
                Some(std::io::BufWriter::new(file))
            }
            None => None,
        };
        let count = client
            .download(url, |line| {
                if let Some(sink) = sink.as_mut() {
                    writeln!(sink, "{line}")
                        .map_err(|e| testkit::client::ClientError::Protocol(e.to_string()))?;
                }
                Ok(())
            })
            .await?;
        if let Some(mut sink) = sink {
            sink.flush()?;
        }
        *totals.entry(name.to_owned()).or_default() += count;
        println!("{name}: {count} lines from {url}");
    }
    let resources: u64 = totals
        .iter()
        .filter(|(name, _)| *name != "error")
        .map(|(_, n)| n)
        .sum();
    println!(
        "done: {resources} resources of {} types{}",
        totals.keys().filter(|name| *name != "error").count(),
        out.as_ref()
            .map(|dir| format!(", saved in {}", dir.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// The manifest's `output` or `error` list.
fn files<'a>(manifest: &'a Value, list: &str) -> &'a [Value] {
    manifest[list].as_array().map_or(&[], Vec::as_slice)
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("set {name} (see the example's documentation)"))
}
