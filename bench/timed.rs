//! The proxy as a benchmark's child whose exports are timed: the line "export finished" is stamped
//! as it arrives on stderr (so the status polling interval does not blur a result), and the
//! settings it resolves are read back. Shared by the export benchmarks.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Instant;

use anyhow::Result;
use fhir_bulk_proxy::config::Config;

use crate::child::ChildProxy;
use crate::procfs::proc_status;

pub struct Proxy {
    pub process: ChildProxy,
    pub finished: mpsc::Receiver<Instant>,
    /// The settings both sides share.
    pub config: Config,
}

impl Proxy {
    pub fn start(upstream_url: &str) -> Result<Self> {
        Self::start_with(upstream_url, &[])
    }

    /// Like [`Proxy::start`], with more `BULK_PROXY_*` settings (a shared store and storage).
    pub fn start_with(upstream_url: &str, extra_env: &[(&str, String)]) -> Result<Self> {
        let (tx, finished) = mpsc::channel();
        // Warnings, plus the worker's "export finished" line the driver times.
        let process = ChildProxy::start(
            upstream_url,
            "",
            "warn,fhir_bulk_proxy::export=info",
            extra_env,
            move |line| {
                if line.contains("export finished") {
                    let _ = tx.send(Instant::now());
                } else if !line.contains(" INFO ") {
                    eprintln!("[proxy] {line}");
                }
            },
        )?;
        // The settings the proxy resolves: defaults < the file < the environment, as the binary.
        let config = Config::from_figment(Config::figment(Some(&process.config_path)).merge(
            figment::providers::Serialized::default("upstream.url", upstream_url),
        ))?;
        Ok(Self {
            process,
            finished,
            config,
        })
    }

    pub async fn token(&self, http: &reqwest::Client) -> Result<String> {
        self.process.token(http).await
    }

    pub fn status_field(&self, field: &str) -> Result<u64> {
        proc_status(self.process.pid(), field)
    }
}
