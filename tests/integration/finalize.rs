//! Every job ends (DESIGN): real proxy processes, on the embedded store and on Redis, with a
//! fault injected into finalisation (`FBP_TEST_FAULT`, honoured by debug builds only). A process
//! killed with SIGKILL mid-finalisation leaves a job that a restarted process completes with
//! every resource exactly once; a finalisation that keeps failing is retried, then the job is
//! Failed with an OperationOutcome on its status URL and the client may start another export.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fhir_bulk_proxy::config::Config;
use fhir_bulk_proxy::export::finalize::FINALIZE_ATTEMPTS;
use serde_json::Value;
use testkit::add_ids;
use testkit::eventually;
use testkit::get_with_token;
use testkit::memory_fhir::MemoryFhir;

use testkit::process::{Processes, ProxyProcess, Store};

use testkit::{outcome, plain_client};

const EXPORT: &str = "/Patient/$export?_type=Patient,Observation";

/// The processes' shared upstream, store and files ([`Processes`]).
struct Setup(Processes);

impl std::ops::Deref for Setup {
    type Target = Processes;
    fn deref(&self) -> &Processes {
        &self.0
    }
}

impl Setup {
    /// 40 patients with 10 Observations each; patient batches of 10, so four searches feed
    /// Observation and finalisation has files to merge.
    async fn new(store: Store) -> Self {
        Self::with(store, |_| {}).await
    }

    /// As [`Setup::new`], with `tweak` applied to the configuration.
    async fn with(store: Store, tweak: impl FnOnce(&mut Config)) -> Self {
        let fhir = MemoryFhir::new().synthetic(40, 10).start().await.unwrap();
        Self(Processes::new(store, fhir, |config| {
            config.export.page_size = 50;
            config.export.patient_batch_size = 10;
            config.export.retry_base_ms = 50;
            config.export.max_active_jobs_per_client = 1;
            tweak(config);
        }))
    }

    fn spawn(&self, fault: Option<&str>) -> ProxyProcess {
        let env: Vec<(&str, &str)> = fault.map(|f| ("FBP_TEST_FAULT", f)).into_iter().collect();
        self.0.spawn(&env)
    }

    /// Ids per type in the manifest's files, asserting none twice and none missing or extra.
    async fn assert_exact(&self, proxy: &ProxyProcess, token: &str, manifest: &Value) {
        let mut got: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for item in manifest["output"].as_array().unwrap() {
            let text = get_with_token(on(proxy, item["url"].as_str().unwrap()), token)
                .await
                .text()
                .await
                .unwrap();
            add_ids(&mut got, &text);
        }
        for t in ["Patient", "Observation"] {
            let want: BTreeSet<String> = self.fhir.ids(t).into_iter().collect();
            assert_eq!(got.get(t), Some(&want), "{t}");
        }
        assert_eq!(got["Observation"].len(), 400);
    }
}

/// `url` (under [`Processes::PUBLIC`]) on the running process.
fn on(proxy: &ProxyProcess, url: &str) -> String {
    Processes::on(proxy, url)
}

/// This file's export, kicked off on `proxy`.
async fn kick_off(proxy: &ProxyProcess, token: &str) -> reqwest::Response {
    testkit::kick_off(format!("{}{EXPORT}", proxy.base()), token).await
}

async fn started(proxy: &ProxyProcess, token: &str) -> String {
    testkit::start_export(format!("{}{EXPORT}", proxy.base()), token).await
}

/// Polls until the status is no longer 202, honouring `Retry-After`.
async fn poll_until_done(proxy: &ProxyProcess, token: &str, status_url: &str) -> reqwest::Response {
    eventually("the export to end", Duration::from_secs(60), || async {
        let response = get_with_token(on(proxy, status_url), token).await;
        (!matches!(response.status().as_u16(), 202 | 429)).then_some(response)
    })
    .await
}

fn debug_build() -> bool {
    // Fault injection is compiled into debug builds only (the test and the binary share the
    // profile).
    if !cfg!(debug_assertions) {
        eprintln!("skipped: FBP_TEST_FAULT needs a debug build");
    }
    cfg!(debug_assertions)
}

async fn killed_during_finalisation_completes_after_a_restart(store: Store) {
    if !debug_build() {
        return;
    }
    let setup = Setup::new(store).await;
    setup.fhir.faults.latency_ms.store(5, Ordering::SeqCst);
    let mut proxy = setup.spawn(Some("finalize-hang"));
    let token = setup.token(&proxy).await;
    let status_url = started(&proxy, &token).await;
    proxy
        .wait_for_log(
            "finalisation stops before its commit",
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("no finalisation:\n{}", proxy.logs().join("\n")));
    // Every unit is done and the merged files are written; nothing is committed.
    let response = get_with_token(on(&proxy, &status_url), &token).await;
    assert_eq!(response.status(), 202);
    let pages = setup.fhir.counters.pages.load(Ordering::SeqCst);
    proxy.kill9();

    // Nobody is left who holds the job: the restarted process's sweeper takes the claim over
    // once its lease lapses, and finalises from the part files.
    let proxy = setup.spawn(None);
    let response = poll_until_done(&proxy, &token, &status_url).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let manifest: Value = response.json().await.unwrap();
    setup.assert_exact(&proxy, &token, &manifest).await;
    assert_eq!(
        setup.fhir.counters.pages.load(Ordering::SeqCst),
        pages,
        "the restart searched nothing again"
    );
    let finished = proxy
        .wait_for_log("export finished", Duration::from_secs(1))
        .expect("the restarted process finalised the job");
    assert!(finished.contains("\"attempt\":2"), "{finished}");
    // The client's slot is free again.
    assert_eq!(kick_off(&proxy, &token).await.status(), 202);
}

async fn a_failing_finalisation_is_retried_then_fails_the_job(store: Store) {
    if !debug_build() {
        return;
    }
    let setup = Setup::new(store).await;
    setup.fhir.faults.latency_ms.store(20, Ordering::SeqCst);
    let proxy = setup.spawn(Some("finalize-fail"));
    let token = setup.token(&proxy).await;
    let status_url = started(&proxy, &token).await;
    let busy = kick_off(&proxy, &token).await;
    assert_eq!(busy.status(), 429, "one export per client while it runs");

    let response = poll_until_done(&proxy, &token, &status_url).await;
    let diagnostics = outcome(response, 500).await;
    assert!(
        diagnostics.contains("could not be assembled")
            && diagnostics.contains("injected finalisation failure"),
        "{diagnostics}"
    );
    assert_eq!(
        proxy.count_logs("finalisation fails before its commit"),
        FINALIZE_ATTEMPTS as usize,
        "every attempt was made, and no more"
    );
    assert_eq!(
        proxy.count_logs("finalisation failed; retrying"),
        FINALIZE_ATTEMPTS as usize - 1
    );
    // Failed stays failed: a second poll says so again (after the 1 s between polls, or it is
    // a 429: part of the scenario).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = get_with_token(on(&proxy, &status_url), &token).await;
    outcome(again, 500).await;
    // The failed job no longer holds the client's only slot.
    assert_eq!(kick_off(&proxy, &token).await.status(), 202);
}

/// Storage that refuses every write (here the file directory replaced by a plain file; wrong S3
/// credentials or a full disk alike) fails the export after `export.retry_max_attempts` tries per
/// unit, with the reason on the status URL, instead of retrying it for ever.
async fn unwritable_storage_fails_the_job(store: Store) {
    let setup = Setup::with(store, |c| {
        c.export.retry_max_attempts = 3;
        c.export.retry_base_ms = 20;
    })
    .await;
    let proxy = setup.spawn(None);
    let token = setup.token(&proxy).await;
    let files = setup.config_path.with_file_name("files");
    std::fs::remove_dir_all(&files).unwrap();
    std::fs::write(&files, b"not a directory").unwrap();

    let status_url = started(&proxy, &token).await;
    let response = poll_until_done(&proxy, &token, &status_url).await;
    let diagnostics = outcome(response, 500).await;
    assert!(
        diagnostics.contains("could not be"),
        "the reason is the storage's: {diagnostics}"
    );
    assert!(
        proxy.count_logs("cannot write export files; the unit fails") > 0,
        "units failed after their retries"
    );
    assert_eq!(
        proxy.count_logs("cannot write export files; retrying the unit"),
        2 * proxy.count_logs("cannot write export files; the unit fails"),
        "each unit was tried retry_max_attempts times, and no more"
    );
    // The failed job no longer holds the client's only slot.
    assert_eq!(kick_off(&proxy, &token).await.status(), 202);
}

/// DELETE while workers write: every DELETE answers 202, the races between a cancelled unit and
/// the removal of its files are logged at debug (no WARN or ERROR line), and no file is left.
async fn deleting_running_exports_is_quiet_and_leaves_no_files(store: Store) {
    let setup = Setup::with(store, |c| {
        // Many small searches and pages: workers are always about to write when a DELETE comes.
        c.export.page_size = 5;
        c.export.patient_batch_size = 2;
        c.export.max_active_jobs_per_client = 10;
    })
    .await;
    setup.fhir.faults.latency_ms.store(10, Ordering::SeqCst);
    let proxy = setup.spawn(None);
    let token = setup.token(&proxy).await;
    for round in 0..8 {
        let status_url = started(&proxy, &token).await;
        // Part of the scenario: each round deletes at another stage of the export.
        tokio::time::sleep(Duration::from_millis(100 + 60 * round)).await;
        let deleted = plain_client()
            .delete(on(&proxy, &status_url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), 202, "round {round}");
    }
    let files = setup.config_path.with_file_name("files");
    eventually("no files left behind", Duration::from_secs(10), || async {
        let left: Vec<_> = std::fs::read_dir(&files)
            .map(|dir| dir.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        if left.is_empty() { Ok(()) } else { Err(left) }
    })
    .await;
    let loud: Vec<String> = proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        // The configuration's own warnings at start (the test's http public URL) are not races.
        .filter(|l| !l.contains("\"target\":\"fhir_bulk_proxy::config\""))
        .collect();
    assert!(loud.is_empty(), "{}", loud.join("\n"));
}

mod embedded {
    use super::Store;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_during_finalisation_completes_after_a_restart() {
        super::killed_during_finalisation_completes_after_a_restart(Store::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_finalisation_is_retried_then_fails_the_job() {
        super::a_failing_finalisation_is_retried_then_fails_the_job(Store::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_running_exports_is_quiet_and_leaves_no_files() {
        super::deleting_running_exports_is_quiet_and_leaves_no_files(Store::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unwritable_storage_fails_the_job() {
        super::unwritable_storage_fails_the_job(Store::Embedded).await;
    }
}

mod redis {
    use super::Store;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_during_finalisation_completes_after_a_restart() {
        super::killed_during_finalisation_completes_after_a_restart(Store::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_finalisation_is_retried_then_fails_the_job() {
        super::a_failing_finalisation_is_retried_then_fails_the_job(Store::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_running_exports_is_quiet_and_leaves_no_files() {
        super::deleting_running_exports_is_quiet_and_leaves_no_files(Store::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unwritable_storage_fails_the_job() {
        super::unwritable_storage_fails_the_job(Store::Redis).await;
    }
}
