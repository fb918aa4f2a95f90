//! The plain pager the export benchmarks measure the proxy against: searches paged through,
//! following `next` links, bodies discarded. Shared by the benchmark harnesses.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use serde::Deserialize;
use serde::de::IgnoredAny;

#[derive(Deserialize)]
struct PageLinks {
    #[serde(default)]
    link: Vec<Link>,
    #[serde(default)]
    entry: Vec<IgnoredAny>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

#[derive(Default)]
pub struct Tally {
    pub resources: AtomicU64,
    pub pages: AtomicU64,
    pub bytes: AtomicU64,
}

/// Pages through every one of `urls` (first pages) following `next` links, `concurrency` searches
/// at a time, and discards the bodies: what the upstream can serve, with no exporter in the way.
pub async fn plain_pager(urls: &[String], concurrency: usize) -> Result<(Duration, Tally)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(4))
        .build()?;
    let queue = Arc::new(Mutex::new(urls.iter().cloned().collect::<VecDeque<_>>()));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, queue, tally) = (http.clone(), queue.clone(), tally.clone());
            tokio::spawn(async move {
                loop {
                    let next = queue.lock().map_err(|_| anyhow!("poisoned"))?.pop_front();
                    let Some(mut url) = next else { return Ok(()) };
                    loop {
                        let response = http
                            .get(&url)
                            .header("accept", "application/fhir+json")
                            .send()
                            .await?;
                        ensure!(
                            response.status().is_success(),
                            "{url}: {}",
                            response.status()
                        );
                        let body = response.bytes().await?;
                        let page: PageLinks = serde_json::from_slice(&body)?;
                        tally.pages.fetch_add(1, Ordering::Relaxed);
                        tally.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        tally
                            .resources
                            .fetch_add(page.entry.len() as u64, Ordering::Relaxed);
                        match page.link.into_iter().find(|l| l.relation == "next") {
                            Some(next) => url = url::Url::parse(&url)?.join(&next.url)?.into(),
                            None => break,
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let tally = Arc::try_unwrap(tally).map_err(|_| anyhow!("tally still shared"))?;
    Ok((elapsed, tally))
}
