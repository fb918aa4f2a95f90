//! Real proxy processes (the binary) sharing one Redis and one file directory: replicas killed
//! with SIGKILL mid-export, stopped with SIGTERM, and Redis frozen for 10 s. The export must still
//! complete with every upstream resource exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::{Config, StoreBackend};
use serde_json::Value;
use testkit::add_ids;
use testkit::eventually;
use testkit::get_with_token;
use testkit::kick_off;
use testkit::memory_fhir::{MemoryFhir, RunningFhir};

use testkit::process::ProxyProcess;
use testkit::redis::RedisServer;
use testkit::smart::{SmartClient, token_form};
use testkit::{outcome, plain_client};

const PUBLIC: &str = "http://fhir.example.test/fhir";

/// One proxy process; restarted, it listens on a new port of its own.
struct Replica {
    process: Option<ProxyProcess>,
    config_path: std::path::PathBuf,
}

impl Replica {
    fn spawn(config_path: &std::path::Path) -> Self {
        Self {
            process: Some(ProxyProcess::spawn(config_path, "info", &[])),
            config_path: config_path.to_owned(),
        }
    }

    fn base(&self) -> String {
        self.process.as_ref().expect("a live replica").base()
    }

    fn is_up(&self) -> bool {
        self.process.is_some()
    }

    /// SIGKILL: no checkpoint, no release; its leases must lapse.
    fn kill9(&mut self) {
        self.process = None;
    }

    /// SIGTERM and wait; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.take().expect("a live replica").terminate()
    }

    fn restart(&mut self) {
        self.kill9();
        self.process = Some(ProxyProcess::spawn(&self.config_path, "info", &[]));
    }
}

struct Fleet {
    fhir: RunningFhir,
    redis: RedisServer,
    replicas: Vec<Replica>,
    token: String,
    _dir: tempfile::TempDir,
}

/// `replicas` proxy processes over one Redis, in front of `patients` × (1 + `per_patient`)
/// synthetic resources.
async fn fleet(replicas: usize, patients: usize, per_patient: usize) -> Fleet {
    let fhir = MemoryFhir::new()
        .synthetic(patients, per_patient)
        .start()
        .await
        .unwrap();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.upstream.url = fhir.url();
    config.server.public_url = Some(PUBLIC.into());
    config.server.shutdown_grace_secs = 10;
    config.store.backend = StoreBackend::Redis;
    config.store.redis_url = Some(redis.url().into());
    config.storage.path = dir.path().join("files");
    config.export.page_size = 100;
    config.export.patient_batch_size = 25;
    config.export.lease_secs = 3;
    config.export.poll_retry_after_secs = 1;
    config.export.retry_base_ms = 200;
    config.export.retry_max_attempts = 20;
    config.export.max_active_jobs_per_client = 5;
    let client = SmartClient::register(&mut config);
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let replicas: Vec<Replica> = (0..replicas)
        .map(|_| Replica::spawn(&config_path))
        .collect();

    let assertion = client.key.assertion(&client.id, &format!("{PUBLIC}/token"));
    let response = client_post_token(&replicas[0], &assertion).await;
    let body: Value = response.json().await.unwrap();
    let token = body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned();
    Fleet {
        fhir,
        redis,
        replicas,
        token,
        _dir: dir,
    }
}

async fn client_post_token(replica: &Replica, assertion: &str) -> reqwest::Response {
    plain_client()
        .post(format!("{}/token", replica.base()))
        .form(&token_form(assertion, "system/*.read"))
        .send()
        .await
        .unwrap()
}

impl Fleet {
    async fn kick_off(&self, path: &str) -> String {
        let response = kick_off(format!("{}{path}", self.replicas[0].base()), &self.token).await;
        assert_eq!(response.status(), 202);
        response.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// The URL on a live replica, chosen round-robin.
    fn on(&self, url: &str, turn: usize) -> String {
        let live: Vec<&Replica> = self.replicas.iter().filter(|r| r.is_up()).collect();
        url.replace(PUBLIC, &live[turn % live.len()].base())
    }

    /// Polls round-robin across the live replicas until the manifest arrives.
    async fn manifest(&self, status_url: &str) -> Value {
        for turn in 0..400 {
            let response = plain_client()
                .get(self.on(status_url, turn))
                .bearer_auth(&self.token)
                .send()
                .await;
            match response.map(|r| (r.status().as_u16(), r)) {
                Ok((200, response)) => return response.json().await.unwrap(),
                Ok((202 | 429 | 503, _)) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Ok((status, response)) => {
                    panic!("status {status}: {}", response.text().await.unwrap())
                }
            }
        }
        panic!("the export did not finish");
    }

    /// Ids per type from the manifest's files, asserting none twice.
    async fn ids(&self, manifest: &Value) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (turn, item) in manifest["output"].as_array().unwrap().iter().enumerate() {
            let text = get_with_token(self.on(item["url"].as_str().unwrap(), turn), &self.token)
                .await
                .text()
                .await
                .unwrap();
            add_ids(&mut out, &text);
        }
        out
    }

    fn assert_exact(&self, got: &BTreeMap<String, BTreeSet<String>>) {
        for t in ["Patient", "Observation"] {
            let want: BTreeSet<String> = self.fhir.ids(t).into_iter().collect();
            let missing = want.difference(&got[t]).count();
            let extra = got[t].difference(&want).count();
            assert!(
                missing == 0 && extra == 0,
                "{t}: {} exported, {} upstream, {missing} missing, {extra} extra",
                got[t].len(),
                want.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_mid_export_lose_and_duplicate_nothing() {
    let mut fleet = fleet(3, 200, 100).await;
    fleet.fhir.faults.latency_ms.store(15, Ordering::SeqCst);
    let status_url = fleet
        .kick_off("/Patient/$export?_type=Patient,Observation")
        .await;
    // Kill a replica mid-export, several times over, bringing each back.
    let mut pages_at_last_kill = 0;
    for round in 0..3 {
        let counters = fleet.fhir.counters.clone();
        let progressed = pages_at_last_kill + 20;
        eventually("the fleet to page on", Duration::from_secs(30), || async {
            (counters.pages.load(Ordering::SeqCst) >= progressed).then_some(())
        })
        .await;
        let victim = round % fleet.replicas.len();
        pages_at_last_kill = fleet.fhir.counters.pages.load(Ordering::SeqCst);
        fleet.replicas[victim].kill9();
        // Part of the scenario: the replica stays down a while, its leases still held.
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet.replicas[victim].restart();
    }
    let manifest = fleet.manifest(&status_url).await;
    let pages = fleet.fhir.counters.pages.load(Ordering::SeqCst);
    assert!(
        pages > pages_at_last_kill,
        "the kills happened mid-export ({pages_at_last_kill} of {pages} pages)"
    );
    let got = fleet.ids(&manifest).await;
    assert_eq!(got["Observation"].len(), 20_000);
    fleet.assert_exact(&got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_hands_its_work_over_and_exits_zero() {
    let mut fleet = fleet(2, 100, 100).await;
    fleet.fhir.faults.latency_ms.store(20, Ordering::SeqCst);
    let status_url = fleet.kick_off("/$export?_type=Patient,Observation").await;
    let counters = fleet.fhir.counters.clone();
    eventually("the fleet to page", Duration::from_secs(30), || async {
        (counters.pages.load(Ordering::SeqCst) >= 20).then_some(())
    })
    .await;
    let started = Instant::now();
    let status = fleet.replicas[0].terminate();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "stopped within the grace period"
    );
    let manifest = fleet.manifest(&status_url).await;
    let got = fleet.ids(&manifest).await;
    fleet.assert_exact(&got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_for_ten_seconds_answers_503_then_the_export_completes() {
    let fleet = fleet(2, 100, 50).await;
    fleet.fhir.faults.latency_ms.store(20, Ordering::SeqCst);
    let status_url = fleet.kick_off("/$export?_type=Patient,Observation").await;
    let counters = fleet.fhir.counters.clone();
    eventually("the fleet to page", Duration::from_secs(30), || async {
        (counters.pages.load(Ordering::SeqCst) >= 10).then_some(())
    })
    .await;
    fleet.redis.pause();
    let started = Instant::now();
    let response = plain_client()
        .get(fleet.on(&status_url, 0))
        .bearer_auth(&fleet.token)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("retry-after"));
    outcome(response, 503).await;
    let kick_off = plain_client()
        .get(format!(
            "{}/$export?_type=Patient",
            fleet.replicas[1].base()
        ))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .bearer_auth(&fleet.token)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert_eq!(
        kick_off.status(),
        503,
        "kick-off while Redis is unreachable"
    );
    let elapsed = started.elapsed();
    if elapsed < Duration::from_secs(10) {
        // Part of the scenario: Redis stays frozen for ten seconds in all.
        tokio::time::sleep(Duration::from_secs(10) - elapsed).await;
    }
    fleet.redis.resume();
    let manifest = fleet.manifest(&status_url).await;
    let got = fleet.ids(&manifest).await;
    fleet.assert_exact(&got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_lost_with_an_emptied_redis_answer_404() {
    let mut fleet = fleet(1, 20, 5).await;
    let status_url = fleet.kick_off("/$export?_type=Patient").await;
    let _ = fleet.manifest(&status_url).await;
    fleet.redis.restart();
    // The replica reconnects; the job is gone, and says so.
    let gone = eventually("the job to be gone", Duration::from_secs(10), || async {
        let response = plain_client()
            .get(fleet.on(&status_url, 0))
            .bearer_auth(&fleet.token)
            .send()
            .await
            .ok()?;
        (response.status() == 404).then_some(response)
    })
    .await;
    assert!(outcome(gone, 404).await.contains("no export job"));
}

/// A fetch cancelled while it holds a fleet-wide upstream slot (a prefetch dropped because its
/// job was deleted, a lost lease, a shutdown) gives the slot back at once. It used to keep it
/// until it expired, a page timeout later: a few DELETEs stalled every replica's exports (and
/// Patient-level kick-offs) for two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_fetch_gives_its_fleet_slot_back() {
    use fhir_bulk_proxy::export::pager::Pager;
    use fhir_bulk_proxy::store::JobStore;
    use fhir_bulk_proxy::store::redis::RedisStore;

    let fhir = MemoryFhir::new().synthetic(2, 1).start().await.unwrap();
    let redis = RedisServer::start();
    let mut config = Config::default();
    config.upstream.url = fhir.url();
    config.export.max_upstream_concurrency = 1;
    config.export.page_timeout_ms = 60_000;
    let store: std::sync::Arc<dyn JobStore> =
        std::sync::Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let pager = std::sync::Arc::new(
        Pager::new(&config, Default::default())
            .unwrap()
            .with_fleet_cap(store),
    );
    let url = format!("{}/Patient", fhir.url());

    // A slow page, cancelled while its request is in flight (holding the only slot).
    fhir.faults.latency_ms.store(5_000, Ordering::SeqCst);
    let slow = {
        let (pager, url) = (pager.clone(), url.clone());
        tokio::spawn(async move { pager.fetch(&url, false).await })
    };
    eventually(
        "the slow page to be asked for",
        Duration::from_secs(10),
        || async { (fhir.counters.in_flight.load(Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
    slow.abort();
    fhir.faults.latency_ms.store(0, Ordering::SeqCst);

    // The next page gets the slot within moments, not after the 60 s page timeout.
    let started = Instant::now();
    let page = tokio::time::timeout(Duration::from_secs(10), pager.fetch(&url, false))
        .await
        .expect("the cancelled fetch's slot was not given back");
    assert!(page.is_ok(), "{page:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
