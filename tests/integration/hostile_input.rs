//! Property tests through the real HTTP endpoints (issue 14): generated kick-off query strings and
//! `Parameters` bodies, `/token` forms and client assertions, status and file paths, and
//! passthrough requests, each sent as raw bytes on a new connection to a real proxy in front of the
//! in-memory FHIR server. The requests and the properties of their answers are in [`corpus`]
//! (shared with the 100,000-request run, `bench/hostile.rs`): never a 5xx of the proxy's own, never
//! a dropped connection or an incomplete answer, a 4xx is an OperationOutcome (OAuth error JSON at
//! `/token`), a file download is the export's file and nothing else. And never a panic: a panic
//! hook counts those on the proxy's threads (this runtime's and the fast path's lanes).
//!
//! One runtime serves every test here, one proxy serves every case of a test; case counts keep the
//! file well under a minute.

mod corpus;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fhir_bulk_proxy::config::Config;
use proptest::strategy::BoxedStrategy;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::get_anonymous;
use testkit::get_with_token;
use testkit::memory_fhir::{MemoryFhir, RunningFhir};
use testkit::start_export;

use corpus::{Hostile, Target, Verdict};
use testkit::smart::{SmartClient, TEST_CLIENT, token_url};
use testkit::{TestProxy, outcome, plain_client};

/// Worker threads of the runtime the proxies run on; panics there are counted.
const THREAD: &str = "hostile-input";
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if name == THREAD || name.starts_with("lane-") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREAD)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A proxy in front of a small in-memory FHIR server (3 patients, a Group, searches of
/// [`corpus::BROKEN_TYPE`] failing), the test client, and one finished export to aim at.
struct Harness {
    proxy: TestProxy,
    _fhir: RunningFhir,
    target: Target,
}

impl Harness {
    fn start(configure: impl FnOnce(&mut Config)) -> Self {
        runtime().block_on(Self::start_async(configure))
    }

    async fn start_async(configure: impl FnOnce(&mut Config)) -> Self {
        let fhir = upstream().await;
        let mut config = TestProxy::config(&fhir.url());
        config.export.poll_retry_after_secs = 1;
        config.export.max_active_jobs_per_client = 20;
        let client = SmartClient::register(&mut config);
        configure(&mut config);
        let proxy = TestProxy::start(config).await;
        let bearer = client.token(&proxy).await;
        let (job_id, file_name, file_body) = finished_export(&proxy, &bearer).await;
        let key = client.key.clone();
        let aud = token_url(&proxy);
        let target = Target {
            host: proxy.addr.to_string(),
            base: proxy.config.base_path().to_owned(),
            token_path: proxy.config.auth.token_path.clone(),
            client_id: TEST_CLIENT.to_owned(),
            bearer,
            group_id: "g1".to_owned(),
            job_id,
            file_name,
            file_body,
            assertion: Arc::new(move || key.assertion(TEST_CLIENT, &aud)),
        };
        Self {
            proxy,
            _fhir: fhir,
            target,
        }
    }

    /// Runs `cases` generated requests; each must pass [`corpus::judge`] with no panic. Known
    /// failures ([`corpus::known_failure`]) are printed with an example, not failed.
    /// `PROPTEST_CASES` overrides `cases` for a deeper run.
    fn check(&self, strategy: impl Fn(&Target) -> BoxedStrategy<Hostile>, cases: u32) {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(cases);
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            max_shrink_iters: 200,
            ..ProptestConfig::default()
        });
        let addr = self.proxy.addr;
        let known = Mutex::new(BTreeMap::<&str, (usize, String)>::new());
        let statuses = Mutex::new(BTreeMap::<u16, usize>::new());
        let result = runner.run(&strategy(&self.target), |request| {
            let answer = runtime()
                .block_on(corpus::exchange(addr, &request, Duration::from_secs(10)))
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            *statuses.lock().unwrap().entry(answer.status).or_default() += 1;
            let panics = PANICS.load(Ordering::SeqCst);
            if panics > 0 {
                return Err(TestCaseError::fail(format!(
                    "{panics} panic(s) on the proxy's threads (message above)"
                )));
            }
            match corpus::judge(&self.target, &request, &answer) {
                Ok(Verdict::Known(what)) => {
                    let mut known = known.lock().unwrap();
                    let entry = known.entry(what).or_insert((0, format!("{request:?}")));
                    entry.0 += 1;
                    Ok(())
                }
                Ok(Verdict::Fine | Verdict::UpstreamFailure) => Ok(()),
                Err(violation) => Err(TestCaseError::fail(format!(
                    "{violation}\nanswer: {} {:?}\n{}",
                    answer.status,
                    answer.headers,
                    String::from_utf8_lossy(&answer.body)
                ))),
            }
        });
        eprintln!("statuses: {:?}", statuses.into_inner().unwrap());
        for (what, (count, example)) in known.into_inner().unwrap() {
            eprintln!("known failure, {count} time(s): {what}; e.g. {example}");
        }
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// The proxy still answers, and stops cleanly.
    fn finish(self) {
        let Harness { proxy, _fhir, .. } = self;
        runtime().block_on(async {
            let health = get_anonymous(proxy.root("/healthz")).await;
            assert_eq!(health.status(), 200);
            proxy.shutdown().await.unwrap();
        });
        assert_eq!(PANICS.load(Ordering::SeqCst), 0);
    }
}

async fn upstream() -> RunningFhir {
    let mut fhir = MemoryFhir::new().synthetic(3, 2);
    fhir.insert(json!({
        "resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{ "entity": { "reference": "Patient/pat-0" } }, { "entity": { "reference": "Patient/pat-1" } }]
    }));
    let fhir = fhir.start().await.unwrap();
    *fhir.faults.broken_type.lock().unwrap() = Some(corpus::BROKEN_TYPE.to_owned());
    fhir
}

/// Runs a system export to completion: its id, its first file's name and bytes.
async fn finished_export(proxy: &TestProxy, bearer: &str) -> (String, String, Vec<u8>) {
    let status_url = start_export(proxy.url("/$export?_type=Patient"), bearer).await;
    let job_id = status_url.rsplit('/').next().unwrap().to_owned();
    let manifest: Value = eventually("the export to finish", Duration::from_secs(60), || async {
        let status = get_with_token(&status_url, bearer).await;
        match status.status().as_u16() {
            200 => Some(status.json().await.unwrap()),
            202 | 429 => None,
            other => panic!("status {other}"),
        }
    })
    .await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let file_name = url.rsplit('/').next().unwrap().to_owned();
    let body = get_with_token(&url, bearer).await.bytes().await.unwrap();
    assert!(!body.is_empty());
    (job_id, file_name, body.to_vec())
}

#[test]
fn kick_off_query_strings_never_get_a_server_error() {
    let h = Harness::start(|_| {});
    h.check(corpus::kick_off_get, 160);
    h.finish();
}

#[test]
fn kick_off_parameters_bodies_never_get_a_server_error() {
    let h = Harness::start(|_| {});
    h.check(corpus::kick_off_post, 160);
    h.finish();
}

#[test]
fn token_requests_get_a_token_or_an_oauth_error() {
    let h = Harness::start(|_| {});
    h.check(corpus::token, 160);
    h.finish();
}

#[test]
fn status_and_file_paths_answer_only_the_clients_own_export() {
    let h = Harness::start(|_| {});
    h.check(corpus::status, 160);
    h.check(corpus::file, 240);
    h.finish();
}

#[test]
fn passthrough_never_gets_a_server_error_of_the_proxys_own() {
    let h = Harness::start(|_| {});
    h.check(corpus::passthrough, 200);
    h.finish();
}

#[test]
fn passthrough_on_the_general_path_never_gets_a_server_error_of_the_proxys_own() {
    let h = Harness::start(|config| config.server.http1_fast_path = false);
    h.check(corpus::passthrough, 200);
    h.finish();
}

/// The inputs of issue 14: one panicked in `format_instant` (the client got an empty reply), the
/// other was stored as an empty `_since`. Both are a 400 naming the parameter now, GET and POST.
#[tokio::test]
async fn the_instants_of_issue_14_are_a_400_naming_the_parameter() {
    let fhir = upstream().await;
    let mut config = TestProxy::config(&fhir.url());
    let smart = SmartClient::register(&mut config);
    let proxy = TestProxy::start(config).await;
    let bearer = smart.token(&proxy).await;
    let get = |query: &str| {
        plain_client()
            .get(proxy.url(&format!("/$export?{query}")))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async")
            .bearer_auth(&bearer)
            .send()
    };
    let until = outcome(get("_until=9999-12-31T23:59:59-23:59").await.unwrap(), 400).await;
    assert!(until.starts_with("_until: "), "{until}");
    let until = outcome(get("_until=9999-12-31T23:59:59-01:00").await.unwrap(), 400).await;
    assert!(until.contains("0001–9999"), "{until}");
    let since = outcome(
        get("_since=0000-01-01T00:00:00%2B23:59").await.unwrap(),
        400,
    )
    .await;
    assert!(since.starts_with("_since: "), "{since}");
    let since = outcome(get("_since=0000-01-01T00:00:00+23:59").await.unwrap(), 400).await;
    assert!(since.starts_with("_since: "), "{since}");

    let post = plain_client()
        .post(proxy.url("/Patient/$export"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .header("content-type", "application/fhir+json")
        .bearer_auth(&bearer)
        .body(
            json!({ "resourceType": "Parameters", "parameter": [
                { "name": "_until", "valueInstant": "9999-12-31T23:59:59-23:59" }
            ]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    let until = outcome(post, 400).await;
    assert!(until.starts_with("_until: "), "{until}");

    // The extremes that are instants are accepted.
    let ok = get("_since=0001-01-01T00:00:00%2B00:00&_until=9999-12-31T23:59:59.999999999Z")
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
}
