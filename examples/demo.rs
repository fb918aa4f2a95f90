//! The one-command demo: `cargo run --release --example demo`.
//!
//! Everything runs in this process, nothing needs installing: an in-memory FHIR server loaded with
//! the 10-patient Synthea fixture (`tests/fixtures/bds-r4-10`), the proxy in front of it (embedded
//! job store and files in a temporary directory), and a SMART backend-services client with a fresh
//! ES384 key. The client gets a token, exports `Group/synthea-10`, polls, downloads every file and
//! checks that the exported Patients are exactly the Group's members.
//!
//! The integration test `demo` runs [`run`] too, so CI proves this command works.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use fhir_bulk_proxy::auth::keygen::{self, KeyAlgorithm};
use fhir_bulk_proxy::config::{Config, LogConfig};
use serde_json::Value;
use testkit::client::{BulkClient, ClientKey};
use testkit::memory_fhir::MemoryFhir;

/// The Group the demo exports (its fixture file is `Group.ndjson`).
pub const GROUP: &str = "synthea-10";
/// The demo client's id.
const CLIENT_ID: &str = "demo-client";

/// What the demo saw, for its test.
#[derive(Debug)]
pub struct Outcome {
    pub status_url: String,
    pub manifest: Value,
    /// Resources downloaded, by type.
    pub counts: BTreeMap<String, u64>,
    /// Ids of the exported Patients.
    pub patients: BTreeSet<String>,
    /// Ids of the Group's members, as read through the proxy.
    pub members: BTreeSet<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Only warnings and errors from the proxy: the demo's own story goes to stdout.
    fhir_bulk_proxy::telemetry::init(&LogConfig {
        level: "warn".into(),
        ..LogConfig::default()
    })?;
    run(&mut std::io::stdout()).await?;
    Ok(())
}

/// The fixture the in-memory upstream is loaded with.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bds-r4-10")
}

/// Runs the whole demo, telling the story on `out`; fails when any step does or when the
/// exported Patients are not the Group's members.
pub async fn run(out: &mut dyn Write) -> anyhow::Result<Outcome> {
    writeln!(out, "fhir-bulk-proxy demo: a Group export, end to end\n")?;

    // The upstream: an ordinary FHIR server that knows nothing about $export.
    let fixtures = fixture_dir();
    let fhir = MemoryFhir::new()
        .load_dir(&fixtures)
        .with_context(|| format!("loading {}", fixtures.display()))?
        .start()
        .await?;
    let held: usize = fhir.types().iter().map(|t| fhir.ids(t).len()).sum();
    writeln!(
        out,
        "upstream  {} (in memory: {held} resources of {} types from tests/fixtures/bds-r4-10)",
        fhir.url(),
        fhir.types().len()
    )?;

    // A client key pair, as `fhir-bulk-proxy keygen` makes one, registered with the proxy.
    let key = keygen::generate(KeyAlgorithm::Es384)?;
    let scopes = vec!["system/*.read".to_owned()];

    // The proxy, in this process, with its job store and files in a temporary directory.
    let data = tempfile::tempdir()?;
    let mut config = Config::default();
    config.upstream.url = fhir.url();
    config.server.listen = "127.0.0.1:0".into();
    config.server.shutdown_grace_secs = 5;
    config.store.path = data.path().join("jobs.redb");
    config.storage.path = data.path().join("files");
    config.export.poll_retry_after_secs = 1;
    config.auth.signing_secret = Some(
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
        .into(),
    );
    config
        .auth
        .clients
        .push(keygen::client_config(CLIENT_ID, &scopes, &key));
    config.validate()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}{}", config.base_path());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(fhir_bulk_proxy::server::run(config, listener, async move {
        let _ = stopped.await;
    }));
    wait_until_serving(&format!("http://{addr}/healthz")).await?;
    writeln!(
        out,
        "proxy     {base} (job store and files in {})",
        data.path().display()
    )?;
    writeln!(
        out,
        "client    {CLIENT_ID}, registered with an {} key (kid {})\n",
        key.algorithm.name(),
        key.kid
    )?;

    let result = export(out, &base, &key).await;
    let _ = stop.send(());
    match tokio::time::timeout(Duration::from_secs(10), proxy).await {
        Ok(Ok(Err(e))) => writeln!(out, "the proxy stopped with an error: {e:#}")?,
        Ok(Err(e)) => writeln!(out, "the proxy task failed: {e}")?,
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    result
}

/// The client's side: token, kick-off, polling, downloads, the membership check.
async fn export(
    out: &mut dyn Write,
    base: &str,
    key: &keygen::GeneratedKey,
) -> anyhow::Result<Outcome> {
    let client_key = ClientKey::from_json(&key.private_jwk)?;
    let client = BulkClient::connect(base, CLIENT_ID, &client_key, "system/*.read").await?;
    let token = client.token();
    writeln!(
        out,
        "1. token     POST {} with an assertion signed {}\n              → scope {:?}, valid {} s",
        token.token_url,
        client_key.alg(),
        token.scope,
        token.expires_in
    )?;

    let kickoff = format!("Group/{GROUP}/$export");
    let status_url = client.kick_off(&kickoff).await?;
    writeln!(out, "2. kick-off  GET {base}/{kickoff}  → 202 Accepted")?;
    writeln!(out, "   status    {status_url}")?;

    let mut polls = 0;
    let manifest = client
        .wait(&status_url, |poll| {
            polls += 1;
            let _ = writeln!(
                out,
                "3. poll {polls}    {} {}, Retry-After {} s",
                poll.status.as_u16(),
                poll.progress.as_deref().unwrap_or("in progress"),
                poll.wait.as_secs()
            );
        })
        .await?;
    writeln!(
        out,
        "3. poll {}    200 OK: the manifest\n\n{}\n",
        polls + 1,
        serde_json::to_string_pretty(&manifest)?
    )?;

    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut files: BTreeMap<String, u64> = BTreeMap::new();
    let mut patients = BTreeSet::new();
    for file in manifest["output"].as_array().map_or(&[][..], Vec::as_slice) {
        let url = file["url"].as_str().context("an output without url")?;
        let declared = file["type"].as_str().unwrap_or_default().to_owned();
        let lines = client
            .download(url, |line| {
                let resource: Value = serde_json::from_str(line)
                    .map_err(|e| testkit::client::ClientError::Protocol(format!("{url}: {e}")))?;
                if declared == "Patient"
                    && let Some(id) = resource["id"].as_str()
                {
                    patients.insert(id.to_owned());
                }
                Ok(())
            })
            .await?;
        *counts.entry(declared.clone()).or_default() += lines;
        *files.entry(declared).or_default() += 1;
    }
    let errors = manifest["error"].as_array().map_or(0, Vec::len);

    writeln!(out, "4. downloads (NDJSON, one resource a line)\n")?;
    writeln!(
        out,
        "   {:<22} {:>5} {:>9}",
        "resource type", "files", "resources"
    )?;
    for (resource_type, count) in &counts {
        writeln!(
            out,
            "   {resource_type:<22} {:>5} {count:>9}",
            files[resource_type]
        )?;
    }
    writeln!(
        out,
        "   {:<22} {:>5} {:>9}",
        "total",
        files.values().sum::<u64>(),
        counts.values().sum::<u64>()
    )?;
    writeln!(out, "   error files: {errors}\n")?;

    // The Group itself, read through the proxy: passthrough to the upstream.
    let group = reqwest::get(format!("{base}/Group/{GROUP}"))
        .await?
        .error_for_status()?
        .json::<Value>()
        .await?;
    let members: BTreeSet<String> = group["member"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|m| m["entity"]["reference"].as_str())
        .filter_map(|r| r.strip_prefix("Patient/"))
        .map(str::to_owned)
        .collect();
    if patients == members {
        writeln!(
            out,
            "5. check     the {} exported Patients are exactly the {} members of Group/{GROUP} ✓",
            patients.len(),
            members.len()
        )?;
    } else {
        writeln!(
            out,
            "5. check     FAILED: exported Patients ≠ Group members"
        )?;
        writeln!(out, "   only exported: {:?}", patients.difference(&members))?;
        writeln!(out, "   only members:  {:?}", members.difference(&patients))?;
    }
    ensure!(errors == 0, "the export reported {errors} error files");
    ensure!(!members.is_empty(), "Group/{GROUP} has no members");
    if patients != members {
        bail!("the exported Patients are not the Group's members");
    }
    writeln!(
        out,
        "\nNext: run the proxy in front of your own server (README, \"Quick start\")."
    )?;
    Ok(Outcome {
        status_url,
        manifest,
        counts,
        patients,
        members,
    })
}

/// Start-up (store, keys, clients) happens inside `server::run`: wait until it answers.
async fn wait_until_serving(healthz: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if let Ok(response) = reqwest::get(healthz).await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the proxy did not answer {healthz} within 5 s")
}
