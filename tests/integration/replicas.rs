//! Several proxies sharing one Redis (and one file directory): any replica serves any request,
//! and a client assertion is single-use across all of them.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use fhir_bulk_proxy::config::{Config, StoreBackend};
use serde_json::Value;
use testkit::get_with_token;
use testkit::kick_off;
use testkit::memory_fhir::RunningFhir;
use testkit::start_export;

use testkit::redis::RedisServer;
use testkit::setup::fixture_upstream;
use testkit::smart::{SmartClient, post_token, token_form};
use testkit::{TestProxy, plain_client};

/// The public URL every replica shares (behind one load balancer): assertions name its token URL.
const PUBLIC: &str = "http://fhir.example.test/fhir";

struct Fleet {
    fhir: RunningFhir,
    proxies: Vec<TestProxy>,
    client: SmartClient,
    _redis: RedisServer,
    _files: tempfile::TempDir,
}

async fn fleet(replicas: usize, configure: impl Fn(&mut Config)) -> Fleet {
    let fhir = fixture_upstream().await;
    let redis = RedisServer::start();
    let files = tempfile::tempdir().unwrap();
    let mut client = None;
    let mut proxies = Vec::new();
    for _ in 0..replicas {
        let mut config = TestProxy::config(&fhir.url());
        config.server.public_url = Some(PUBLIC.into());
        config.store.backend = StoreBackend::Redis;
        config.store.redis_url = Some(redis.url().into());
        config.storage.path = files.path().to_path_buf();
        config.export.poll_retry_after_secs = 1;
        config.export.page_size = 50;
        let registered = match &client {
            None => SmartClient::register(&mut config),
            Some(c) => {
                let c: &SmartClient = c;
                SmartClient::register_with(&mut config, &c.id, c.key.clone(), &["system/*.read"])
            }
        };
        client.get_or_insert(registered);
        configure(&mut config);
        proxies.push(TestProxy::start(config).await);
    }
    Fleet {
        fhir,
        proxies,
        client: client.unwrap(),
        _redis: redis,
        _files: files,
    }
}

/// `url` (built on the shared public base) sent to one replica's socket.
fn on(proxy: &TestProxy, url: &str) -> String {
    url.replace(PUBLIC, &proxy.url(""))
}

async fn token(fleet: &Fleet, replica: usize) -> String {
    let assertion = fleet
        .client
        .key
        .assertion(&fleet.client.id, &format!("{PUBLIC}/token"));
    let response = post_token(
        &fleet.proxies[replica],
        &token_form(&assertion, "system/*.read"),
    )
    .await;
    let body: Value = response.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_owned()
}

#[tokio::test]
async fn an_assertion_used_on_one_replica_is_refused_on_another() {
    let fleet = fleet(2, |_| {}).await;
    let assertion = fleet
        .client
        .key
        .assertion(&fleet.client.id, &format!("{PUBLIC}/token"));
    let form = token_form(&assertion, "system/*.read");
    let first = post_token(&fleet.proxies[0], &form).await;
    assert_eq!(first.status(), 200);
    let replay = post_token(&fleet.proxies[1], &form).await;
    assert_eq!(replay.status(), 400);
    let body: Value = replay.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn any_replica_serves_kick_off_status_download_and_delete() {
    let fleet = fleet(3, |_| {}).await;
    let token = token(&fleet, 0).await;
    // A token issued by one replica works on every other (shared signing secret).
    let status_url = start_export(
        fleet.proxies[1].url("/Group/synthea-10/$export?_type=Patient,Observation"),
        &token,
    )
    .await;
    assert!(status_url.starts_with(PUBLIC), "{status_url}");

    // Poll round-robin across the replicas.
    let mut manifest = None;
    for round in 0..120 {
        let proxy = &fleet.proxies[round % 3];
        let response = get_with_token(on(proxy, &status_url), &token).await;
        match response.status().as_u16() {
            202 | 429 => tokio::time::sleep(std::time::Duration::from_millis(400)).await,
            200 => {
                manifest = Some(response.json::<Value>().await.unwrap());
                break;
            }
            other => panic!("status {other}"),
        }
    }
    let manifest = manifest.expect("the export finished");
    let mut patients = BTreeSet::new();
    let mut observations = 0;
    for (i, item) in manifest["output"].as_array().unwrap().iter().enumerate() {
        let url = on(&fleet.proxies[i % 3], item["url"].as_str().unwrap());
        let response = get_with_token(&url, &token).await;
        assert_eq!(response.status(), 200, "{url}");
        let text = response.text().await.unwrap();
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            match resource["resourceType"].as_str().unwrap() {
                "Patient" => {
                    patients.insert(resource["id"].as_str().unwrap().to_owned());
                }
                _ => observations += 1,
            }
        }
    }
    assert_eq!(patients.len(), 10);
    assert_eq!(observations, fleet.fhir.ids("Observation").len());

    let deleted = plain_client()
        .delete(on(&fleet.proxies[2], &status_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    for proxy in &fleet.proxies {
        let gone = get_with_token(on(proxy, &status_url), &token).await;
        assert_eq!(gone.status(), 404);
    }
    assert!(fleet.fhir.counters.searches.load(Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn the_upstream_concurrency_cap_holds_for_the_whole_fleet() {
    let fleet = fleet(2, |c| {
        c.export.workers = 4;
        c.export.max_upstream_concurrency = 3;
        c.export.page_size = 20;
    })
    .await;
    fleet.fhir.faults.latency_ms.store(30, Ordering::SeqCst);
    let token = token(&fleet, 0).await;
    let mut status_urls = Vec::new();
    // Two exports, one through each replica, so both replicas' workers page at once.
    for proxy in &fleet.proxies {
        let response = kick_off(
            proxy.url("/$export?_type=Observation,Encounter,Claim,ExplanationOfBenefit"),
            &token,
        )
        .await;
        assert_eq!(response.status(), 202);
        status_urls.push(
            response.headers()["content-location"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    for status_url in &status_urls {
        for _ in 0..300 {
            let response = get_with_token(on(&fleet.proxies[0], status_url), &token).await;
            if response.status() == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        }
    }
    let max = fleet.fhir.counters.max_in_flight.load(Ordering::SeqCst);
    assert!(
        max <= 3,
        "{max} searches at once against a fleet-wide cap of 3"
    );
    assert!(max >= 2, "the fleet did work in parallel ({max})");
}
