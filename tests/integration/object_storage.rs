//! Exports into a real S3-compatible server (`s3s` + `s3s-fs` in process, see `support::s3`): exact output, cancel
//! and expiry deleting the objects, downloads through the proxy (Range, gzip, token and scopes),
//! presigned URLs in the manifest, and a process killed mid-unit whose multipart upload another
//! process resumes without loss or duplicates.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fhir_bulk_proxy::config::{Config, StoreBackend};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::get_anonymous;
use testkit::get_with_token;
use testkit::memory_fhir::MemoryFhir;
use testkit::start_export;

use testkit::plain_client;
use testkit::process::ProxyProcess;
use testkit::process::Store;
use testkit::redis::RedisServer;
use testkit::s3::S3Server;
use testkit::setup::{GROUP, Setup, assert_same, expected, group_members, ids};
use testkit::smart::SmartClient;

/// A proxy storing its files in a fresh bucket.
async fn on_s3(store: Store, configure: impl FnOnce(&mut Config)) -> (S3Server, Setup) {
    let s3 = S3Server::start();
    let setup = Setup::new(store, |c| {
        s3.configure(c);
        configure(c);
    })
    .await;
    (s3, setup)
}

fn job_id(status_url: &str) -> String {
    status_url.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn a_group_export_on_s3_is_exact_and_stored_as_objects() {
    let (s3, s) = on_s3(Store::Embedded, |_| {}).await;
    let status_url = s
        .start(&format!(
            "/Group/{GROUP}/$export?_type=Patient,Observation,Encounter,Condition"
        ))
        .await;
    let manifest = s.manifest(&status_url).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let files = s.download(&manifest).await;
    let members = group_members();
    let want: std::collections::BTreeMap<String, BTreeSet<String>> =
        expected(&s.fhir, Some(&members))
            .into_iter()
            .filter(|(t, _)| {
                ["Patient", "Observation", "Encounter", "Condition"].contains(&t.as_str())
            })
            .collect();
    assert_same(&ids(&files), &want);
    // Every manifest file is an object under the prefix; the units' part files are gone.
    let keys = s3.keys(&format!("bulk/{}", job_id(&status_url)));
    let names: BTreeSet<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let url = o["url"].as_str().unwrap();
            format!(
                "bulk/{}/{}",
                job_id(&status_url),
                url.rsplit('/').next().unwrap()
            )
        })
        .collect();
    assert_eq!(keys.iter().cloned().collect::<BTreeSet<_>>(), names);
}

#[tokio::test]
async fn a_system_export_on_s3_with_redis_is_exact() {
    let (_s3, s) = on_s3(Store::Redis, |_| {}).await;
    let (_, files) = s.export("/$export").await;
    assert_same(&ids(&files), &expected(&s.fhir, None));
}

#[tokio::test]
async fn downloads_through_the_proxy_check_token_and_scopes_and_support_range_and_gzip() {
    let (_s3, s) = on_s3(Store::Embedded, |_| {}).await;
    let (manifest, files) = s.export("/$export?_type=Patient,Observation").await;
    let url_of = |t: &str| {
        manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["type"] == t)
            .unwrap()["url"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let url = url_of("Patient");
    let plain = s.get(&url).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.headers()["content-type"], "application/fhir+ndjson");
    let plain = plain.bytes().await.unwrap();
    assert_eq!(
        plain.iter().filter(|b| **b == b'\n').count(),
        files["Patient"].len()
    );

    s.assert_gzip_and_range(&url, &plain).await;

    for (range, want) in [
        ("bytes=10-19", &plain[10..20]),
        ("bytes=-7", &plain[plain.len() - 7..]),
        (
            &format!("bytes={}-", plain.len() - 3) as &str,
            &plain[plain.len() - 3..],
        ),
    ] {
        let ranged = [("range", range), ("accept-encoding", "gzip")];
        let ranged = s.get_with(&url, &ranged).await;
        assert_eq!(ranged.status(), 206, "{range}");
        assert!(ranged.headers().get("content-encoding").is_none());
        assert!(ranged.headers().contains_key("content-range"));
        assert_eq!(ranged.bytes().await.unwrap(), want, "{range}");
    }
    let beyond = plain_client()
        .get(&url)
        .bearer_auth(&s.token)
        .header("range", format!("bytes={}-", plain.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), 416);

    assert_eq!(get_anonymous(&url).await.status(), 401, "no token");
    let narrow = s
        .client
        .token_for(&s.proxy, "system/Observation.read")
        .await;
    let forbidden = get_with_token(&url, &narrow).await;
    assert_eq!(forbidden.status(), 403, "a token without Patient scope");
    let allowed = get_with_token(url_of("Observation"), &narrow).await;
    assert_eq!(allowed.status(), 200);
}

#[tokio::test]
async fn delete_removes_the_objects() {
    let (s3, s) = on_s3(Store::Embedded, |_| {}).await;
    let status_url = s.start("/$export?_type=Patient,Condition").await;
    let manifest = s.manifest(&status_url).await;
    let prefix = format!("bulk/{}", job_id(&status_url));
    assert!(!s3.keys(&prefix).is_empty());
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let deleted = s.delete(&status_url).await;
    assert_eq!(deleted.status(), 202);
    assert_eq!(s3.keys(&prefix), Vec::<String>::new(), "objects deleted");
    let response = s.get(&file).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn cancelling_a_running_export_leaves_no_objects() {
    let s3 = S3Server::start();
    let fhir = MemoryFhir::new()
        .load_dir(&testkit::setup::fixture_dir())
        .unwrap()
        .start()
        .await
        .unwrap();
    fhir.faults.latency_ms.store(150, Ordering::SeqCst);
    let s = Setup::with_upstream(Store::Embedded, fhir, |c| {
        s3.configure(c);
        c.export.page_size = 20;
    })
    .await;
    let status_url = s.start("/$export?_type=Observation,Patient").await;
    let counters = s.fhir.counters.clone();
    eventually("the export to page", Duration::from_secs(20), || async {
        (counters.pages.load(Ordering::SeqCst) >= 3).then_some(())
    })
    .await;
    let deleted = s.delete(&status_url).await;
    assert_eq!(deleted.status(), 202);
    // Workers notice at their next page and drop what they hold.
    let prefix = format!("bulk/{}", job_id(&status_url));
    eventually(
        "the objects to be deleted",
        Duration::from_secs(15),
        || async { s3.keys(&prefix).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn expired_jobs_lose_their_objects() {
    let (s3, s) = on_s3(Store::Embedded, |c| {
        c.export.job_ttl_secs = 4;
        c.export.sweep_interval_secs = 1;
    })
    .await;
    let status_url = s.start("/$export?_type=Patient").await;
    s.manifest(&status_url).await;
    let prefix = format!("bulk/{}", job_id(&status_url));
    assert!(!s3.keys(&prefix).is_empty());
    eventually(
        "the objects to be swept",
        Duration::from_secs(20),
        || async { s3.keys(&prefix).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn presigned_urls_work_without_a_token_and_expire() {
    let (s3, s) = on_s3(Store::Embedded, |c| {
        c.storage.presigned_urls = true;
        c.auth.token_lifetime_secs = 3;
    })
    .await;
    let status_url = s.start("/$export?_type=Patient").await;
    let manifest = s.manifest(&status_url).await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&s3.endpoint()), "{url}");
    let expires: u64 = url::Url::parse(&url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Expires")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(expires <= 3, "no longer than an access token: {expires}");
    let response = get_anonymous(&url).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/fhir+ndjson"
    );
    let text = response.text().await.unwrap();
    assert_eq!(
        text.lines().count() as u64,
        manifest["output"][0]["count"].as_u64().unwrap()
    );
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["resourceType"] == "Patient")
    );
    let tampered = url.replace("X-Amz-Expires=", "X-Amz-Expires=9");
    assert_ne!(get_anonymous(&tampered).await.status(), 200);
    eventually(
        "the presigned URL to expire",
        Duration::from_secs(20),
        || async {
            let status = get_anonymous(&url).await.status();
            (status == 403).then_some(())
        },
    )
    .await;
    assert_eq!(get_anonymous(&url).await.status(), 403, "expired");
    // A new manifest request signs anew (SPEC A9.8). The token may have expired too.
    let token = s.client.token(&s.proxy).await;
    let again: Value = get_with_token(&status_url, &token)
        .await
        .json()
        .await
        .unwrap();
    let fresh = again["output"][0]["url"].as_str().unwrap();
    assert_eq!(get_anonymous(fresh).await.status(), 200);
    assert_eq!(again["error"], json!([]));
}

const PUBLIC: &str = "http://fhir.example.test/fhir";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_unit_has_its_multipart_upload_resumed_by_another() {
    // One unit (system-level Observation) of ~24 MiB: several 5 MiB parts, ~120 pages.
    let mut upstream = MemoryFhir::new();
    let padding = "x".repeat(2000);
    upstream.insert(json!({"resourceType": "Patient", "id": "p0"}));
    for o in 0..12_000 {
        upstream.insert(json!({
            "resourceType": "Observation", "id": format!("obs-{o}"), "status": "final",
            "code": {"text": padding},
            "subject": {"reference": "Patient/p0"},
        }));
    }
    let fhir = upstream.start().await.unwrap();
    fhir.faults.latency_ms.store(25, Ordering::SeqCst);
    let s3 = S3Server::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.upstream.url = fhir.url();
    config.server.public_url = Some(PUBLIC.into());
    config.store.backend = StoreBackend::Redis;
    config.store.redis_url = Some(redis.url().into());
    s3.configure(&mut config);
    config.export.page_size = 100;
    config.export.lease_secs = 3;
    config.export.poll_retry_after_secs = 1;
    let client_reg = SmartClient::register(&mut config);
    let config_path = dir.path().join("proxy.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let mut first = ProxyProcess::spawn(&config_path, "info", &[]);
    let token = testkit::process::token(&client_reg, &first, PUBLIC).await;
    let status_url = start_export(
        format!("{}/$export?_type=Observation", first.base()),
        &token,
    )
    .await;

    // Past the first part (about 26 pages), well before the end: SIGKILL, no release.
    eventually("45 pages fetched", Duration::from_secs(60), || async {
        (fhir.counters.pages.load(Ordering::SeqCst) >= 45).then_some(())
    })
    .await;
    first.kill9();
    let pages_at_kill = fhir.counters.pages.load(Ordering::SeqCst);
    assert!(
        pages_at_kill < 100,
        "killed mid-unit ({pages_at_kill} pages)"
    );

    let second = ProxyProcess::spawn(&config_path, "info", &[]);
    let status_url = status_url.replace(PUBLIC, &second.base());
    let manifest: Value = eventually("the export to finish", Duration::from_secs(120), || async {
        let response = get_with_token(&status_url, &token).await;
        match response.status().as_u16() {
            200 => Some(response.json().await.unwrap()),
            _ => None,
        }
    })
    .await;
    let mut got = BTreeSet::new();
    for item in manifest["output"].as_array().unwrap() {
        let url = item["url"]
            .as_str()
            .unwrap()
            .replace(PUBLIC, &second.base());
        let text = get_with_token(&url, &token).await.text().await.unwrap();
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            let id = resource["id"].as_str().unwrap().to_owned();
            assert!(got.insert(id.clone()), "Observation/{id} twice");
        }
    }
    let want: BTreeSet<String> = fhir.ids("Observation").into_iter().collect();
    assert_eq!(got.len(), want.len(), "every Observation once");
    assert!(got == want);
    // The second process went on from the last uploaded part, not from scratch: it re-fetched
    // fewer pages than the whole unit (120).
    let total = fhir.counters.pages.load(Ordering::SeqCst);
    let refetched = total - pages_at_kill;
    eprintln!("pages: {pages_at_kill} before the kill, {refetched} after, {total} in all");
    assert!(
        refetched <= 100,
        "{refetched} pages after the kill ({pages_at_kill} before): the upload was not resumed"
    );
}
