//! `fhir-bulk-proxy jobs list | show | cancel`: the real binary, on the embedded store and on
//! Redis, against jobs in every state (completed, failed, running) that a real proxy process
//! made. Cancelling does what the client's DELETE does: the status URL answers 404 and the files
//! are gone. The embedded store is one process's file: while a proxy runs on it the command says
//! so and fails; once the proxy stops it works (Redis works alongside a running proxy).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fhir_bulk_proxy::config::Config;
use fhir_bulk_proxy::ops::jobs::{self, JobsCommand, JobsError};
use serde_json::Value;
use testkit::get_with_token;
use testkit::kick_off;
use testkit::memory_fhir::MemoryFhir;

use testkit::process::{Processes, ProxyProcess, Store};
use testkit::smart::TEST_CLIENT;

/// Clients and status URLs name this base; requests go to whichever process runs now.
const PUBLIC: &str = Processes::PUBLIC;

pub(crate) struct Setup {
    processes: Processes,
    files: PathBuf,
}

impl std::ops::Deref for Setup {
    type Target = Processes;
    fn deref(&self) -> &Processes {
        &self.processes
    }
}

/// The three jobs a test inspects, by state, with their status URLs.
struct Jobs {
    completed: String,
    failed: String,
    running: String,
    urls: BTreeMap<String, String>,
}

impl Setup {
    pub(crate) async fn new(store: Store) -> Self {
        let fhir = MemoryFhir::new().synthetic(10, 3).start().await.unwrap();
        let processes = Processes::new(store, fhir, |config| {
            config.export.retry_base_ms = 20;
            config.export.retry_max_attempts = 1;
            config.export.max_active_jobs_per_client = 5;
        });
        let files = processes.config.storage.path.clone();
        Self { processes, files }
    }

    pub(crate) fn spawn(&self) -> ProxyProcess {
        self.processes.spawn(&[])
    }

    /// A completed Patient-level export, a failed system-level one (its only type's searches
    /// always fail) and a running one (the upstream answers its searches after a minute).
    async fn jobs(&self, proxy: &ProxyProcess, token: &str) -> Jobs {
        let mut urls = BTreeMap::new();
        let completed = start(proxy, token, "/Patient/$export?_type=Patient,Observation").await;
        assert_eq!(status(proxy, token, &completed).await, 200);
        *self.fhir.faults.broken_type.lock().unwrap() = Some("Observation".into());
        let failed = start(proxy, token, "/$export?_type=Observation").await;
        assert_eq!(status(proxy, token, &failed).await, 500);
        *self.fhir.faults.broken_type.lock().unwrap() = None;
        self.fhir.faults.latency_ms.store(60_000, Ordering::SeqCst);
        let running = start(proxy, token, "/$export?_type=Patient").await;
        let mut ids = Vec::new();
        for url in [completed, failed, running] {
            let id = url.rsplit('/').next().unwrap().to_owned();
            urls.insert(id.clone(), url);
            ids.push(id);
        }
        let [completed, failed, running] = ids.try_into().unwrap();
        Jobs {
            completed,
            failed,
            running,
            urls,
        }
    }

    /// Runs the binary's `jobs` command with this setup's configuration file.
    fn cli(&self, args: &[&str]) -> Output {
        tokio::task::block_in_place(|| {
            Command::new(env!("CARGO_BIN_EXE_fhir-bulk-proxy"))
                .arg("--config")
                .arg(&self.config_path)
                .arg("jobs")
                .args(args)
                .env_remove("RUST_BACKTRACE")
                .env_remove("BULK_PROXY_CONFIG")
                .output()
                .expect("run the binary")
        })
    }

    /// `args`' stdout, asserting success.
    fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "jobs {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.files.join(id)
    }
}

pub(crate) async fn start(proxy: &ProxyProcess, token: &str, path: &str) -> String {
    let response = kick_off(format!("{}{path}", proxy.base()), token).await;
    assert_eq!(response.status(), 202, "{path}");
    response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned()
}

/// The status URL's answer once it is no longer 202 (or 429).
pub(crate) async fn status(proxy: &ProxyProcess, token: &str, url: &str) -> u16 {
    for _ in 0..120 {
        let status = get_with_token(url.replace(PUBLIC, &proxy.base()), token)
            .await
            .status()
            .as_u16();
        if !matches!(status, 202 | 429) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    panic!("{url} still running after a minute");
}

/// `jobs list --json`, `show` and `cancel` on the three jobs (the proxy may or may not be
/// running: that is the caller's business).
async fn inspect_and_cancel(setup: &Setup, jobs: &Jobs) {
    let listed: Vec<Value> = serde_json::from_str(&setup.cli_ok(&["list", "--json"])).unwrap();
    let by_id: BTreeMap<&str, &Value> = listed
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j))
        .collect();
    assert_eq!(by_id.len(), 3, "{listed:?}");
    for job in &listed {
        for field in [
            "id",
            "client",
            "level",
            "state",
            "units_done",
            "units_total",
            "resources_written",
            "created_at",
            "age_secs",
            "expires_at",
        ] {
            assert!(job.get(field).is_some(), "{field} missing from {job}");
        }
        assert_eq!(job["client"], TEST_CLIENT);
    }
    let completed = by_id[jobs.completed.as_str()];
    assert_eq!(completed["state"], "completed");
    assert_eq!(completed["level"], "Patient");
    assert_eq!(completed["units_done"], completed["units_total"]);
    // 10 patients and their 30 Observations.
    assert_eq!(completed["resources_written"], 40, "{completed}");
    assert!(completed["expires_at"].as_u64().is_some(), "{completed}");
    let failed = by_id[jobs.failed.as_str()];
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["level"], "system");
    assert_eq!(failed["resources_written"], 0);
    let running = by_id[jobs.running.as_str()];
    assert_eq!(running["state"], "running");
    assert_eq!(running["units_done"], 0);
    assert_eq!(running["expires_at"], Value::Null);

    // The table has a header and one line per job.
    let table = setup.cli_ok(&["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("PROGRESS"),
        "{table}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&jobs.failed) && l.contains("failed")),
        "{table}"
    );

    // show: units, files, errors.
    let shown: Value =
        serde_json::from_str(&setup.cli_ok(&["show", &jobs.completed, "--json"])).unwrap();
    assert_eq!(shown["id"], jobs.completed.as_str());
    let units = shown["units"].as_array().unwrap();
    assert!(!units.is_empty());
    assert!(units.iter().all(|u| u["state"] == "done"), "{shown}");
    assert!(
        units
            .iter()
            .any(|u| u["type"] == "Observation" && u["pages"].as_u64() > Some(0))
    );
    let output: BTreeMap<&str, u64> = shown["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["type"].as_str().unwrap(), f["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        output,
        BTreeMap::from([("Observation", 30), ("Patient", 10)])
    );
    let failed: Value =
        serde_json::from_str(&setup.cli_ok(&["show", &jobs.failed, "--json"])).unwrap();
    assert!(
        failed["units"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["state"] == "failed" && u["error"].as_str().is_some()),
        "{failed}"
    );
    assert!(failed["error"].as_str().is_some(), "{failed}");
    let text = setup.cli_ok(&["show", &jobs.running]);
    assert!(text.contains("state      running"), "{text}");
    let unit = text.split("\nunits\n").nth(1).unwrap_or_default();
    assert!(
        unit.contains("0 pages") && unit.contains("Patient"),
        "{text}"
    );

    // An unknown id: non-zero exit and a clear message.
    for args in [["show", "no-such-job"], ["cancel", "no-such-job"]] {
        let output = setup.cli(&args);
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("no export job no-such-job"), "{stderr}");
    }

    // cancel: record and files go.
    assert!(setup.job_dir(&jobs.completed).is_dir());
    let said = setup.cli_ok(&["cancel", &jobs.completed]);
    assert!(said.contains(&jobs.completed), "{said}");
    assert!(!setup.job_dir(&jobs.completed).exists(), "files left");
    setup.cli_ok(&["cancel", &jobs.running]);
    let listed: Vec<Value> = serde_json::from_str(&setup.cli_ok(&["list", "--json"])).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], jobs.failed.as_str());
}

/// The cancelled jobs' status URLs answer 404 (as after the client's DELETE); the failed one
/// still answers.
async fn status_urls_after_cancel(proxy: &ProxyProcess, token: &str, jobs: &Jobs) {
    for (id, want) in [
        (&jobs.completed, 404),
        (&jobs.running, 404),
        (&jobs.failed, 500),
    ] {
        let url = jobs.urls[id].replace(PUBLIC, &proxy.base());
        let got = get_with_token(&url, token).await.status();
        assert_eq!(got.as_u16(), want, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_jobs_while_the_proxy_runs_are_refused_then_listed_shown_and_cancelled() {
    let setup = Setup::new(Store::Embedded).await;
    let mut proxy = setup.spawn();
    let token = setup.token(&proxy).await;
    let jobs = setup.jobs(&proxy, &token).await;

    // The proxy holds the file: a clear refusal, not a hang or a redb error.
    let output = setup.cli(&["list"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by a running proxy")
            && stderr.contains("Stop the proxy")
            && stderr.contains("store.backend = \"redis\""),
        "{stderr}"
    );
    // The library says the same to a caller.
    let error = jobs::run(&setup.config, &JobsCommand::List { json: true })
        .await
        .unwrap_err();
    assert!(matches!(error, JobsError::InUse(_)), "{error}");

    // A stopped proxy (here: killed, so the running job stays Running in the file).
    proxy.kill9();
    inspect_and_cancel(&setup, &jobs).await;

    // The next proxy on the file knows nothing of the cancelled jobs.
    setup.fhir.faults.latency_ms.store(0, Ordering::SeqCst);
    let proxy = setup.spawn();
    status_urls_after_cancel(&proxy, &token, &jobs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_jobs_are_listed_shown_and_cancelled_beside_a_running_proxy() {
    let setup = Setup::new(Store::Redis).await;
    let proxy = setup.spawn();
    let token = setup.token(&proxy).await;
    let jobs = setup.jobs(&proxy, &token).await;
    inspect_and_cancel(&setup, &jobs).await;
    // 1 s between polls of one job (poll_retry_after_secs / 2 and the first poll's 202 aside).
    tokio::time::sleep(Duration::from_millis(600)).await;
    status_urls_after_cancel(&proxy, &token, &jobs).await;
}

#[tokio::test]
async fn a_missing_embedded_store_is_named_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.path = dir.path().join("nowhere.redb");
    let error = jobs::run(&config, &JobsCommand::List { json: false })
        .await
        .unwrap_err();
    assert!(matches!(error, JobsError::NoStore(_)), "{error}");
    assert!(error.to_string().contains("nowhere.redb"), "{error}");
    assert!(!Path::new(&config.store.path).exists());
}
