//! Bulk export end to end over real sockets: a proxy with the embedded store in front of the
//! in-memory FHIR server loaded with the 10-patient Synthea fixture (SPEC A5–A9).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fhir_bulk_proxy::config::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};
use testkit::get_accepting;
use testkit::get_anonymous;
use testkit::get_with_token;
use testkit::kick_off;
use testkit::memory_fhir::MemoryFhir;

use testkit::process::Store;
use testkit::setup::{
    GROUP, Setup, assert_same, expected, fixture_dir, fixture_upstream, group_members, ids,
};
use testkit::smart::{ClientKey, SmartClient};
use testkit::{TestProxy, outcome, plain_client, raw_get};
use testkit::{both, eventually};

both!(system_export_returns_every_resource_exactly_once);
async fn system_export_returns_every_resource_exactly_once(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (manifest, files) = s.export("/$export").await;
    assert_same(&ids(&files), &expected(&s.fhir, None));
    assert_eq!(manifest["request"], s.proxy.url("/$export").as_str());
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(manifest["error"], json!([]));
}

both!(patient_export_returns_the_patient_compartment_exactly);
async fn patient_export_returns_the_patient_compartment_exactly(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (_, files) = s.export("/Patient/$export").await;
    let patients = s.fhir.ids("Patient");
    let mut got = ids(&files);
    // Outside the compartment: only those the data references (tests/integration/supporting.rs).
    for t in ["Organization", "Practitioner"] {
        assert!(got.remove(t).is_some_and(|ids| !ids.is_empty()), "{t}");
    }
    let mut want = expected(&s.fhir, Some(&patients));
    want.remove("Organization");
    want.remove("Practitioner");
    assert_same(&got, &want);
}

both!(group_export_holds_exactly_the_groups_patients_with_batched_searches);
async fn group_export_holds_exactly_the_groups_patients_with_batched_searches(store: Store) {
    // Batches, not the type-level scans a Group of every patient gets by default (scan.rs).
    let s = Setup::new(store, |c| c.export.scan_min_coverage = 2.0).await;
    let before = s.fhir.counters.searches.load(Ordering::SeqCst);
    let (manifest, files) = s
        .export(&format!(
            "/Group/{GROUP}/$export?_type=Patient,Observation,Encounter,Condition"
        ))
        .await;
    let members = group_members();
    let got = ids(&files);
    assert_eq!(
        got["Patient"],
        members.iter().cloned().collect::<BTreeSet<_>>()
    );
    for t in ["Observation", "Encounter", "Condition"] {
        let want: BTreeSet<String> = s.fhir.ids_for_patients(t, &members).into_iter().collect();
        assert!(
            got[t] == want,
            "{t}: {} exported, {} expected",
            got[t].len(),
            want.len()
        );
    }
    // types × ⌈patients / batch⌉ first pages (+ the Group read and patient listing, which are reads).
    let searches = s.fhir.counters.searches.load(Ordering::SeqCst) - before;
    assert!(
        searches <= 4 * members.len().div_ceil(4) as u64,
        "{searches} searches"
    );
    assert!(
        manifest["output"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["count"].as_u64().unwrap() > 0)
    );
}

both!(post_kick_off_with_parameters_and_patient_filter);
async fn post_kick_off_with_parameters_and_patient_filter(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let members = group_members();
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Condition"},
        {"name": "patient", "valueReference": {"reference": format!("Patient/{}", members[0])}},
    ]});
    let response = plain_client()
        .post(s.proxy.url(&format!("/Group/{GROUP}/$export")))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .header("content-type", "application/json")
        .bearer_auth(&s.token)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status_url = testkit::accepted(response).await;
    let manifest = s.manifest(&status_url).await;
    let got = ids(&s.download(&manifest).await);
    assert_eq!(got["Patient"], BTreeSet::from([members[0].clone()]));
    let want: BTreeSet<String> = s
        .fhir
        .ids_for_patients("Condition", &members[..1])
        .into_iter()
        .collect();
    assert_eq!(got.get("Condition").cloned().unwrap_or_default(), want);
}

both!(status_is_202_first_then_429_when_polled_too_fast);
async fn status_is_202_first_then_429_when_polled_too_fast(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let status_url = s.start("/$export?_type=Patient").await;
    let first = s.get(&status_url).await;
    assert_eq!(first.status(), 202, "the first poll is always 202");
    let progress = first.headers()["x-progress"].to_str().unwrap().to_owned();
    assert!(progress.len() < 100, "{progress}");
    let retry: u64 = testkit::retry_after(&first);
    assert!(retry >= 1);
    let second = s.get(&status_url).await;
    assert!(second.headers().contains_key("retry-after"));
    outcome(second, 429).await;
}

both!(invalid_kick_offs_are_400_with_an_operation_outcome);
async fn invalid_kick_offs_are_400_with_an_operation_outcome(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let cases = [
        ("/$export?_outputFormat=application/xml", "_outputFormat"),
        ("/$export?_outputFormat=text/html", "_outputFormat"),
        ("/$export?_type=MissingType", "_type"),
        ("/$export?_since=0000-60-01T30:70:80%2B05:00", "_since"),
        ("/$export?_since=2057-01-01T00:00:00Z", "_since"),
        (
            "/$export?_typeFilter=Observation%3F_include%3DObservation:subject",
            "_typeFilter",
        ),
        ("/Patient/$export?_type=Bundle", "_type"),
        ("/Group/bad%20id/$export", "Group"),
    ];
    for (path, param) in cases {
        let diagnostics = outcome(s.kick_off(path).await, 400).await;
        assert!(diagnostics.contains(param), "{path}: {diagnostics}");
    }
    let bearer = format!("Bearer {}", s.token);
    let path = format!("{}/$export", s.proxy.config.base_path());
    let no_accept = raw_get(
        s.proxy.addr,
        &path,
        &[("Prefer", "respond-async"), ("Authorization", &bearer)],
    )
    .await;
    assert_eq!(no_accept, 400, "Accept is required");
    let no_prefer = raw_get(
        s.proxy.addr,
        &path,
        &[
            ("Accept", "application/fhir+json"),
            ("Authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(no_prefer, 400, "Prefer: respond-async is required");
    let unknown_group = s.kick_off("/Group/nope/$export").await;
    assert_eq!(unknown_group.status(), 404);
    let patient_at_system_level = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/1"}}
    ]});
    let bodies: [(&str, Vec<u8>, u16); 3] = [
        (
            "patient at system level",
            patient_at_system_level.to_string().into(),
            400,
        ),
        ("not JSON", b"{not json".to_vec(), 400),
        ("2 MiB", vec![b' '; 2 * 1024 * 1024], 413),
    ];
    for (what, body, status) in bodies {
        let response = s.kick_off_post("/$export", body).await;
        assert_eq!(response.status(), status, "{what}");
    }
}

both!(lenient_handling_reports_ignored_parameters_in_the_error_file);
async fn lenient_handling_reports_ignored_parameters_in_the_error_file(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let response =
        plain_client()
            .get(s.proxy.url(
                "/$export?_type=Patient&includeAssociatedData=LatestProvenanceResources&_bogus=1",
            ))
            .header("accept", "application/fhir+json")
            .header("prefer", "respond-async, handling=lenient")
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
    let status_url = testkit::accepted(response).await;
    let manifest = s.manifest(&status_url).await;
    let errors = s.errors(&manifest).await;
    let text = serde_json::to_string(&errors).unwrap();
    assert!(
        text.contains("includeAssociatedData") && text.contains("_bogus"),
        "{text}"
    );
}

both!(tokens_are_required_and_scopes_enforced);
async fn tokens_are_required_and_scopes_enforced(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let no_token = plain_client()
        .get(s.proxy.url("/$export"))
        .header("accept", "application/fhir+json")
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert!(
        no_token.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    outcome(no_token, 401).await;

    let status_url = s.start("/$export?_type=Patient,Observation").await;
    let manifest = s.manifest(&status_url).await;
    let patient_file = output_url(&manifest, "Patient");
    for (what, url) in [("file", &patient_file), ("status", &status_url)] {
        let response = get_anonymous(url).await;
        assert_eq!(response.status(), 401, "{what} without a token");
    }
    let bad = get_with_token(&status_url, "invalidToken").await;
    assert_eq!(bad.status(), 401);
}

both!(other_clients_cannot_see_a_job_and_narrow_scopes_cannot_download_other_types);
async fn other_clients_cannot_see_a_job_and_narrow_scopes_cannot_download_other_types(
    store: Store,
) {
    let observer_key = ClientKey::es384();
    let key = observer_key.clone();
    let s = Setup::new(store, move |c| {
        SmartClient::register_with(
            c,
            "observer",
            key,
            &["system/Observation.read", "system/Patient.read"],
        );
    })
    .await;
    let observer = SmartClient {
        id: "observer".into(),
        key: observer_key,
    };
    let status_url = s.start("/$export?_type=Patient,Observation").await;
    let manifest = s.manifest(&status_url).await;

    let other = observer.token(&s.proxy).await;
    let response = get_with_token(&status_url, &other).await;
    assert_eq!(
        response.status(),
        404,
        "another client's job does not exist for it"
    );
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    assert_eq!(get_with_token(&file, &other).await.status(), 404);

    // The owner with a token narrowed to Observation cannot download the Patient file.
    let narrow = s
        .client
        .token_for(&s.proxy, "system/Observation.read")
        .await;
    let patient_file = output_url(&manifest, "Patient");
    let response = get_with_token(&patient_file, &narrow).await;
    assert_eq!(response.status(), 403);
    let response = kick_off(s.proxy.url("/$export?_type=Patient"), &narrow).await;
    assert_eq!(
        response.status(),
        403,
        "kick-off for a type outside the scopes"
    );
}

both!(downloads_support_gzip_and_range);
async fn downloads_support_gzip_and_range(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (manifest, files) = s.export("/$export?_type=Patient").await;
    let url = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let plain = s.get(&url).await.bytes().await.unwrap();
    assert_eq!(
        plain.iter().filter(|b| **b == b'\n').count(),
        files["Patient"].len()
    );

    s.assert_gzip_and_range(&url, &plain).await;
}

both!(delete_cancels_and_everything_is_404_afterwards);
async fn delete_cancels_and_everything_is_404_afterwards(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (manifest, _) = s.export("/$export?_type=Patient").await;
    let status_url = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .rsplit_once("/$export-file/")
        .unwrap()
        .0
        .to_owned();
    let job_id = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .split("/$export-file/")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let status_url = format!("{status_url}/$export-status/{job_id}");
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();

    let deleted = s.delete(&status_url).await;
    assert_eq!(deleted.status(), 202);
    for response in [
        s.get(&status_url).await,
        s.delete(&status_url).await,
        s.get(&file).await,
    ] {
        outcome(response, 404).await;
    }
    let files_dir = s.proxy.config.storage.path.join(&job_id);
    assert!(!files_dir.exists(), "files deleted");
}

both!(cancelling_a_running_export_stops_its_searches);
async fn cancelling_a_running_export_stops_its_searches(store: Store) {
    let fhir = fixture_upstream().await;
    fhir.faults.latency_ms.store(200, Ordering::SeqCst);
    let s = Setup::with_upstream(store, fhir, |c| c.export.page_size = 20).await;
    let status_url = s.start("/$export?_type=Observation").await;
    let counters = s.fhir.counters.clone();
    eventually("the export to page", Duration::from_secs(20), || async {
        (counters.pages.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let deleted = s.delete(&status_url).await;
    assert_eq!(deleted.status(), 202);
    eventually("the searches to stop", Duration::from_secs(10), || async {
        (counters.in_flight.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    let pages = s.fhir.counters.pages.load(Ordering::SeqCst);
    // Part of the scenario: time for paging to go on (seven 200 ms pages), had it not stopped.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        s.fhir.counters.pages.load(Ordering::SeqCst) <= pages + 1,
        "paging stopped"
    );
    let job_id = status_url.rsplit('/').next().unwrap();
    assert!(
        !s.proxy.config.storage.path.join(job_id).exists(),
        "files deleted"
    );
}

both!(a_page_that_fails_then_succeeds_is_retried);
async fn a_page_that_fails_then_succeeds_is_retried(store: Store) {
    let fhir = fixture_upstream().await;
    fhir.faults.fail_searches.store(3, Ordering::SeqCst);
    fhir.faults.throttle_searches.store(1, Ordering::SeqCst);
    let s = Setup::with_upstream(store, fhir, |_| {}).await;
    let (manifest, files) = s.export("/$export?_type=Patient,Observation").await;
    let got = ids(&files);
    assert_eq!(got["Observation"].len(), s.fhir.ids("Observation").len());
    assert_eq!(got["Patient"].len(), 10);
    assert_eq!(manifest["error"], json!([]));
}

both!(a_permanent_failure_goes_to_the_error_file_and_the_job_completes);
async fn a_permanent_failure_goes_to_the_error_file_and_the_job_completes(store: Store) {
    let fhir = fixture_upstream().await;
    *fhir.faults.broken_type.lock().unwrap() = Some("Observation".into());
    let s = Setup::with_upstream(store, fhir, |c| c.export.retry_max_attempts = 2).await;
    let (manifest, files) = s.export("/$export?_type=Patient,Observation").await;
    assert_eq!(ids(&files)["Patient"].len(), 10);
    assert!(!files.contains_key("Observation"));
    let errors = s.errors(&manifest).await;
    assert!(
        serde_json::to_string(&errors)
            .unwrap()
            .contains("Observation"),
        "{errors:?}"
    );
}

both!(a_job_where_nothing_worked_fails_with_an_operation_outcome);
async fn a_job_where_nothing_worked_fails_with_an_operation_outcome(store: Store) {
    let fhir = fixture_upstream().await;
    *fhir.faults.broken_type.lock().unwrap() = Some("Observation".into());
    let s = Setup::with_upstream(store, fhir, |c| c.export.retry_max_attempts = 1).await;
    let status_url = s.start("/$export?_type=Observation").await;
    let (last, body) = eventually("the job to fail", Duration::from_secs(30), || async {
        let response = s.get(&status_url).await;
        let status = response.status();
        let running = [StatusCode::ACCEPTED, StatusCode::TOO_MANY_REQUESTS];
        (!running.contains(&status)).then_some((status, response))
    })
    .await;
    let body: Value = body.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(last.is_server_error(), "{last}");
}

both!(an_expired_paging_cursor_resumes_without_loss_or_duplicates);
async fn an_expired_paging_cursor_resumes_without_loss_or_duplicates(store: Store) {
    let fhir = fixture_upstream().await;
    fhir.faults.expire_next_links.store(4, Ordering::SeqCst);
    let s = Setup::with_upstream(store, fhir, |c| c.export.page_size = 37).await;
    let (_, files) = s.export("/$export?_type=Observation,Encounter").await;
    let got = ids(&files);
    for t in ["Observation", "Encounter"] {
        let want = s.fhir.ids(t).into_iter().collect::<BTreeSet<_>>();
        assert_same(
            &BTreeMap::from([(t.to_owned(), got[t].clone())]),
            &BTreeMap::from([(t.to_owned(), want)]),
        );
    }
    assert_eq!(
        s.fhir.faults.expire_next_links.load(Ordering::SeqCst),
        0,
        "the cursors did expire"
    );
}

both!(type_filters_are_ored_and_since_bounds_the_export);
async fn type_filters_are_ored_and_since_bounds_the_export(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (_, files) = s
        .export("/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory&_typeFilter=Observation%3Fcategory%3Dsurvey")
        .await;
    let observations = &files["Observation"];
    assert_eq!(observations.len(), 614 + 89);
    assert_eq!(ids(&files)["Observation"].len(), observations.len());

    let (manifest, _) = s.export("/$export?_type=Patient").await;
    let since = manifest["transactionTime"]
        .as_str()
        .unwrap()
        .replace('+', "%2B");
    let (manifest, files) = s
        .export(&format!("/$export?_type=Patient&_since={since}"))
        .await;
    assert!(files.is_empty(), "nothing changed since the last export");
    assert_eq!(manifest["output"], json!([]));
}

both!(elements_subset_resources_and_tag_them);
async fn elements_subset_resources_and_tag_them(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (_, files) = s
        .export("/$export?_type=Patient&_elements=id,Patient.meta")
        .await;
    for patient in &files["Patient"] {
        assert!(patient.get("name").is_none());
        assert!(patient["id"].is_string());
        let tags = patient["meta"]["tag"].as_array().unwrap();
        assert!(tags.iter().any(|t| t["code"] == "SUBSETTED"));
    }
}

both!(the_per_client_export_cap_answers_429);
async fn the_per_client_export_cap_answers_429(store: Store) {
    let fhir = fixture_upstream().await;
    fhir.faults.latency_ms.store(300, Ordering::SeqCst);
    let s = Setup::with_upstream(store, fhir, |c| c.export.max_active_jobs_per_client = 1).await;
    let _running = s.start("/$export?_type=Observation").await;
    let second = s.kick_off("/$export?_type=Patient").await;
    assert_eq!(second.status(), 429);
    assert!(
        second.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn a_restarted_node_answers_for_its_jobs_and_resumes_them() {
    use fhir_bulk_proxy::store::JobStore as _;
    let fhir = fixture_upstream().await;
    // Slow pages (part of the scenario): the restart must fall in the middle of the export.
    fhir.faults.latency_ms.store(100, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let paths = |c: &mut Config| {
        c.store.path = dir.path().join("jobs.redb");
        c.storage.path = dir.path().join("files");
        c.export.page_size = 50;
    };
    let first = Setup::with_upstream(Store::Embedded, fhir, paths).await;
    let status_url = first.start("/$export?_type=Observation,Patient").await;
    let job = status_url.rsplit('/').next().unwrap().to_owned();
    let counters = first.fhir.counters.clone();
    eventually("a few pages fetched", Duration::from_secs(20), || async {
        (counters.pages.load(Ordering::SeqCst) >= 4).then_some(())
    })
    .await;
    let Setup {
        fhir,
        proxy,
        client: smart,
        ..
    } = first;
    proxy.shutdown().await.unwrap();
    let served_before = fhir.counters.served.lock().unwrap().len();

    // What the first process checkpointed: per type, the offset its next page starts at.
    let store =
        fhir_bulk_proxy::store::embedded::EmbeddedStore::open(&dir.path().join("jobs.redb"))
            .unwrap();
    let mut resume_at = BTreeMap::new();
    for unit in store.units(&job).await.unwrap() {
        let offset = unit.checkpoint.next.as_deref().map(|next| {
            let query = next.split_once('?').map_or("", |(_, q)| q);
            url_offset(query)
        });
        assert!(
            resume_at
                .insert(unit.resource_type.clone(), (unit.checkpoint.pages, offset))
                .is_none(),
            "one unit per type"
        );
    }
    drop(store);
    assert!(
        resume_at.values().any(|(pages, _)| *pages > 0),
        "the first process checkpointed nothing: {resume_at:?}"
    );
    fhir.faults.latency_ms.store(0, Ordering::SeqCst);

    // Same store and files, new process (new port: the status URL's port changes with it).
    let mut config = TestProxy::config(&fhir.url());
    paths(&mut config);
    config.export.poll_retry_after_secs = 1;
    SmartClient::register_with(
        &mut config,
        &smart.id,
        smart.key.clone(),
        &["system/*.read"],
    );
    let proxy = TestProxy::start(config).await;
    let token = smart.token(&proxy).await;
    let s = Setup {
        fhir,
        proxy,
        client: smart,
        token,
        _redis: None,
    };
    let manifest = s
        .manifest(&s.proxy.url(&format!("/$export-status/{job}")))
        .await;
    // Each resource exactly once (ids() refuses duplicates), none missing.
    let got = ids(&s.download(&manifest).await);
    assert_same(
        &got,
        &expected(&s.fhir, None)
            .into_iter()
            .filter(|(t, _)| t == "Observation" || t == "Patient")
            .collect(),
    );
    // The second process went on from the checkpoints: no page before one was fetched again, and
    // a finished unit was not searched at all.
    let served = s.fhir.counters.served.lock().unwrap().clone();
    for (resource_type, offset) in &served[served_before..] {
        match resume_at.get(resource_type) {
            Some((pages, Some(next))) if *pages > 0 => assert!(
                offset >= next,
                "{resource_type} page at {offset} fetched again (checkpointed up to {next})"
            ),
            Some((pages, None)) if *pages > 0 => {
                panic!("{resource_type} was finished, yet its page at {offset} was fetched again")
            }
            _ => {}
        }
    }
}

/// The `_offset` of a memory_fhir `next` link's query (0 when absent).
fn url_offset(query: &str) -> usize {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("_offset="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

both!(expired_jobs_and_their_files_are_swept);
async fn expired_jobs_and_their_files_are_swept(store: Store) {
    let s = Setup::new(store, |c| {
        // Long enough to fetch the manifest on a loaded machine, short enough to wait for.
        c.export.job_ttl_secs = 4;
        c.export.sweep_interval_secs = 1;
    })
    .await;
    let status_url = s.start("/$export?_type=Patient").await;
    let manifest = s.manifest(&status_url).await;
    let job_id = status_url.rsplit('/').next().unwrap().to_owned();
    assert!(s.proxy.config.storage.path.join(&job_id).exists());
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let expired = eventually("the job to expire", Duration::from_secs(15), || async {
        let response = s.get(&status_url).await;
        (response.status() == 404).then_some(())
    });
    expired.await;
    let response = s.get(&file).await;
    assert_eq!(response.status(), 404);
    assert!(
        !s.proxy.config.storage.path.join(&job_id).exists(),
        "files swept"
    );
}

both!(the_proxy_authenticates_to_an_upstream_that_requires_it);
async fn the_proxy_authenticates_to_an_upstream_that_requires_it(store: Store) {
    let fhir = MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .require_bearer("upstream-secret")
        .start()
        .await
        .unwrap();
    let s = Setup::with_upstream(store, fhir, |c| {
        c.upstream.auth.scheme = fhir_bulk_proxy::config::UpstreamAuthScheme::Bearer;
        c.upstream.auth.token = Some("upstream-secret".into());
    })
    .await;
    let (_, files) = s
        .export(&format!("/Group/{GROUP}/$export?_type=Patient,Condition"))
        .await;
    let got = ids(&files);
    assert_eq!(got["Patient"].len(), 10);
    assert_eq!(got["Condition"].len(), s.fhir.ids("Condition").len());
}

both!(files_are_split_at_the_configured_size);
async fn files_are_split_at_the_configured_size(store: Store) {
    let s = Setup::new(store, |c| c.export.max_file_resources = 300).await;
    let (manifest, files) = s.export("/$export?_type=Observation").await;
    let counts: Vec<u64> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.len(), 5, "{counts:?}");
    assert!(counts.iter().all(|c| *c <= 300), "{counts:?}");
    assert_eq!(ids(&files)["Observation"].len(), 1369);
}

/// SPEC A5.6: the kick-off answers `application/fhir+json` only; `application/json` alone is a
/// 400 naming the Accept header, a wildcard covering FHIR JSON is fine.
#[tokio::test]
async fn kick_off_accept_must_cover_fhir_json() {
    let s = Setup::new(Store::Embedded, |c| {
        c.export.max_active_jobs_per_client = 10
    })
    .await;
    let kick_off = |accept: &'static str| {
        plain_client()
            .get(s.proxy.url("/$export?_type=Patient"))
            .header("accept", accept)
            .header("prefer", "respond-async")
            .bearer_auth(&s.token)
            .send()
    };
    for accept in [
        "application/fhir+json",
        "*/*",
        "application/*;q=0.8",
        "text/html, application/fhir+json;q=0.9",
    ] {
        let response = kick_off(accept).await.unwrap();
        assert_eq!(response.status(), 202, "{accept}");
    }
    for accept in ["application/json", "application/fhir+xml", "text/html"] {
        let response = kick_off(accept).await.unwrap();
        assert_eq!(response.status(), 400, "{accept}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        let diagnostics = body["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(diagnostics.contains("Accept"), "{accept}: {diagnostics}");
    }
}

/// The proxy's own OperationOutcome errors are sent as `application/json` to a client whose
/// Accept prefers it, and as `application/fhir+json` otherwise; the body is the same outcome.
#[tokio::test]
async fn errors_honour_accept() {
    let s = Setup::new(Store::Embedded, |_| {}).await;
    let missing_status = s.proxy.url("/$export-status/no-such-job");
    let cases = [
        ("application/json", "application/json"),
        (
            "application/fhir+json;q=0.5, application/json",
            "application/json",
        ),
        ("application/json, */*", "application/fhir+json"),
        ("application/fhir+json", "application/fhir+json"),
        ("*/*", "application/fhir+json"),
    ];
    for (accept, expected) in cases {
        let not_found = plain_client()
            .get(&missing_status)
            .header("accept", accept)
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        let kick_off = plain_client()
            .get(s.proxy.url("/$export?_type=NotAType"))
            .header("accept", accept)
            .header("prefer", "respond-async")
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        for (response, status) in [(not_found, 404), (kick_off, 400)] {
            assert_eq!(response.status(), status, "{accept}");
            assert_eq!(response.headers()["content-type"], expected, "{accept}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
            assert!(body["issue"][0]["diagnostics"].is_string(), "{body}");
        }
    }
    // A 401 without a token, too.
    let unauthorized = get_accepting(&missing_status, "application/json").await;
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(unauthorized.headers()["content-type"], "application/json");
}

/// Without the proxy's authorization (`auth.enabled = false`) nothing claims a token is needed:
/// the manifest says `requiresAccessToken: false`, metadata advertises no token endpoint and
/// `.well-known/smart-configuration` is not the proxy's. With it, all three do.
#[tokio::test]
async fn metadata_and_manifest_tell_the_truth_about_tokens() {
    for enabled in [false, true] {
        let fhir = fixture_upstream().await;
        let mut config = TestProxy::config(&fhir.url());
        config.export.poll_retry_after_secs = 1;
        let client_of_proxy = SmartClient::register(&mut config);
        config.auth.enabled = enabled;
        let proxy = TestProxy::start(config).await;
        let token = match enabled {
            true => client_of_proxy.token(&proxy).await,
            false => "not-checked".to_owned(),
        };
        let s = Setup {
            fhir,
            proxy,
            client: client_of_proxy,
            token,
            _redis: None,
        };
        let status_url = s.start("/$export?_type=Patient").await;
        let manifest = s.manifest(&status_url).await;
        assert_eq!(manifest["requiresAccessToken"], enabled, "{manifest}");
        if !enabled {
            let url = manifest["output"][0]["url"].as_str().unwrap();
            let file = get_anonymous(url).await;
            assert_eq!(file.status(), 200, "no token needed");
        }

        let cs: Value = get_anonymous(s.proxy.url("/metadata"))
            .await
            .json()
            .await
            .unwrap();
        let text = cs.to_string();
        assert_eq!(text.contains("oauth-uris"), enabled, "{text}");
        assert_eq!(
            text.contains(s.proxy.url("/token").as_str()),
            enabled,
            "{text}"
        );
        let smart = get_anonymous(s.proxy.url("/.well-known/smart-configuration")).await;
        let status = smart.status();
        let body = smart.text().await.unwrap();
        if enabled {
            assert_eq!(status, 200);
            assert!(body.contains("token_endpoint"), "{body}");
        } else {
            assert!(!body.contains("token_endpoint"), "{status}: {body}");
        }
    }
}

/// With `poll_retry_after_secs = 5` polls closer than 2.5 s apart are 429: a client honouring
/// every `Retry-After`, the first poll's included (the job is done by then), never gets one.
#[tokio::test]
async fn a_client_honouring_retry_after_is_never_throttled() {
    let s = Setup::new(Store::Embedded, |c| c.export.poll_retry_after_secs = 5).await;
    let status_url = s.start("/$export?_type=Patient").await;
    // Part of the scenario: a client waits before its first poll (the first Retry-After is 5 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut waits = Vec::new();
    for _ in 0..20 {
        let response = s.get(&status_url).await;
        match response.status() {
            StatusCode::ACCEPTED => {
                let wait: u64 = testkit::retry_after(&response);
                waits.push(wait);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            StatusCode::OK => {
                assert!(!waits.is_empty(), "the first poll is a 202");
                assert!(waits[0] >= 3, "{waits:?}");
                return;
            }
            other => panic!("{other} after waiting {waits:?}"),
        }
    }
    panic!("the export did not finish: {waits:?}");
}

/// The 202 says which preferences it applied (RFC 7240 §3): `respond-async`, and the `handling`
/// the client asked for.
#[tokio::test]
async fn kick_off_reports_the_preferences_applied() {
    let s = Setup::new(Store::Embedded, |c| {
        c.export.max_active_jobs_per_client = 10
    })
    .await;
    for (prefer, applied) in [
        ("respond-async", "respond-async"),
        (
            "respond-async, handling=strict",
            "respond-async, handling=strict",
        ),
        (
            "respond-async; handling=lenient",
            "respond-async, handling=lenient",
        ),
    ] {
        let response = plain_client()
            .get(s.proxy.url("/$export?_type=Patient"))
            .header("accept", "application/fhir+json")
            .header("prefer", prefer)
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{prefer}");
        assert_eq!(
            response.headers()["preference-applied"],
            applied,
            "{prefer}"
        );
    }
}

/// The URL of the manifest's first output file of `resource_type`.
fn output_url(manifest: &Value, resource_type: &str) -> String {
    let outputs = manifest["output"].as_array().unwrap();
    let item = outputs.iter().find(|o| o["type"] == resource_type).unwrap();
    item["url"].as_str().unwrap().to_owned()
}
