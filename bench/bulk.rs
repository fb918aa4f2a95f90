//! A Bulk Data client's two steps the benchmarks time: kick-off and polling for the manifest.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Kicks off the export at `url` and returns its status URL.
pub async fn kick_off(http: &reqwest::Client, url: &str, token: &str) -> Result<String> {
    let response = http
        .get(url)
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .bearer_auth(token)
        .send()
        .await?;
    ensure!(
        response.status() == 202,
        "kick-off {url}: {} {}",
        response.status(),
        response.text().await?
    );
    Ok(response
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .context("no Content-Location")?
        .to_owned())
}

/// Polls `status_url` until the manifest arrives.
pub async fn manifest(http: &reqwest::Client, status_url: &str, token: &str) -> Result<Value> {
    loop {
        let response = http.get(status_url).bearer_auth(token).send().await?;
        match response.status().as_u16() {
            200 => return Ok(response.json::<Value>().await?),
            202 | 429 => tokio::time::sleep(Duration::from_millis(600)).await,
            other => bail!("status {other}: {}", response.text().await?),
        }
    }
}
