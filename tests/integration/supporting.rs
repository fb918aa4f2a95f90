//! Supporting resources (issue 15 item 1): Patient and Group exports hold exactly the
//! Organization, Practitioner... resources that the exported data references, each once, fetched
//! by `_id`; `_type` selects them like any type; a valid type outside the compartment is exported
//! empty with a warning. Over sockets, on both job stores.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use testkit::both;
use testkit::memory_fhir::{LastUpdatedSearch, MemoryFhir, Paging, RunningFhir};
use testkit::plain_client;
use testkit::process::Store;
use testkit::setup::{GROUP, Setup, assert_same, expected, fixture_dir, group_members, ids};

const SUPPORTING: [&str; 2] = ["Organization", "Practitioner"];

/// The fixture, plus an Organization nothing references and an Encounter of the first patient
/// that references a Practitioner the upstream does not have.
async fn upstream() -> RunningFhir {
    let mut fhir = MemoryFhir::new().load_dir(&fixture_dir()).unwrap();
    fhir.insert(json!({"resourceType": "Organization", "id": "unreferenced", "name": "Nobody's"}));
    fhir.insert(json!({
        "resourceType": "Encounter", "id": "ghost-visit", "status": "finished",
        "class": {"code": "AMB"},
        "subject": {"reference": format!("Patient/{}", group_members()[0])},
        "participant": [{"individual": {"reference": "Practitioner/ghost"}}]
    }));
    fhir.start().await.unwrap()
}

/// Every `Type/id` reference to `types` in `files`' resources of other types, found by walking
/// each resource.
fn referenced(
    files: &BTreeMap<String, Vec<Value>>,
    types: &[&str],
) -> BTreeMap<String, BTreeSet<String>> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map {
                    match child {
                        Value::String(s) if key == "reference" => out.push(s.clone()),
                        _ => walk(child, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for (t, resources) in files {
        if !types.contains(&t.as_str()) {
            resources.iter().for_each(|r| walk(r, &mut found));
        }
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for reference in found {
        if let Some((t, id)) = reference.split_once('/')
            && types.contains(&t)
        {
            out.entry(t.to_owned()).or_default().insert(id.to_owned());
        }
    }
    out
}

/// First pages the upstream served for `resource_type` (one per `_id` batch).
fn searches_of(fhir: &RunningFhir, resource_type: &str) -> usize {
    let served = fhir.counters.served.lock().unwrap();
    served
        .iter()
        .filter(|(t, offset)| t == resource_type && *offset == 0)
        .count()
}

/// Checks a Patient or Group export of `patients`: the compartment exactly, and of each supporting
/// type exactly what it references (but `Practitioner/ghost`, which the upstream lacks and the
/// error file counts), each once, however many units referenced it: fetched in ⌈n/4⌉ `_id`
/// searches (batches of `export.patient_batch_size`, 4 here).
async fn assert_exact_with_supporting(s: &Setup, path: &str, patients: &[String]) {
    let before = SUPPORTING.map(|t| searches_of(&s.fhir, t));
    let (manifest, files) = s.export(path).await;
    let got = ids(&files);
    let mut want = expected(&s.fhir, Some(patients));
    // The extra Encounter is the first patient's, which every export here includes.
    let refs = referenced(&files, &SUPPORTING);
    assert!(refs["Practitioner"].contains("ghost"), "{path}");
    for (i, t) in SUPPORTING.into_iter().enumerate() {
        assert_eq!(
            searches_of(&s.fhir, t) - before[i],
            refs[t].len().div_ceil(4),
            "{path}: {t} searches"
        );
        let mut wanted = refs[t].clone();
        wanted.remove("ghost");
        assert!(!wanted.is_empty(), "{path}: the fixture references {t}s");
        want.insert(t.to_owned(), wanted);
    }
    assert_same(&got, &want);
    assert!(!got["Organization"].contains("unreferenced"));
    let errors = s.errors(&manifest).await;
    let missing: Vec<&Value> = errors
        .iter()
        .filter(|e| e.to_string().contains("Practitioner/ghost"))
        .collect();
    assert_eq!(missing.len(), 1, "{path}: {errors:?}");
    assert_eq!(
        errors.len(),
        1,
        "{path}: nothing else to report: {errors:?}"
    );
    assert_eq!(missing[0]["issue"][0]["severity"], "warning");
    assert!(
        missing[0]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with("1 of the "),
        "{:?}",
        missing[0]
    );
}

both!(patient_and_group_exports_hold_exactly_the_referenced_supporting_resources);
async fn patient_and_group_exports_hold_exactly_the_referenced_supporting_resources(store: Store) {
    let s = Setup::with_upstream(store, upstream().await, |_| {}).await;
    let patients = s.fhir.ids("Patient");
    assert_exact_with_supporting(&s, "/Patient/$export", &patients).await;
    assert_exact_with_supporting(&s, &format!("/Group/{GROUP}/$export"), &group_members()).await;
}

both!(type_selects_supporting_types_like_any_other);
async fn type_selects_supporting_types_like_any_other(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    let (_, files) = s
        .export("/Patient/$export?_type=Encounter,Organization")
        .await;
    let got = ids(&files);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ["Encounter", "Organization"]
    );
    let by_encounters = referenced(&files, &["Organization"]);
    assert_eq!(got["Organization"], by_encounters["Organization"]);

    let (manifest, files) = s.export("/Patient/$export?_type=Encounter").await;
    assert_eq!(files.keys().collect::<Vec<_>>(), ["Encounter"]);
    assert_eq!(manifest["error"], json!([]));

    // Named, but nothing exported references one (Patients name no Organization): exported
    // empty, and the error file says why.
    let (manifest, files) = s
        .export("/Patient/$export?_type=Patient,Organization")
        .await;
    assert_eq!(files.keys().collect::<Vec<_>>(), ["Patient"]);
    let errors = s.errors(&manifest).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["issue"][0]["severity"], "warning");
    let diagnostics = errors[0]["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.starts_with("exported empty: _type Organization"),
        "{diagnostics}"
    );

    // The references as written: `_elements` that drops them leaves nothing to fetch.
    let (_, files) = s
        .export("/Group/synthea-10/$export?_type=Encounter,Organization&_elements=period")
        .await;
    assert_eq!(files.keys().collect::<Vec<_>>(), ["Encounter"]);
}

both!(a_valid_type_outside_the_compartment_is_exported_empty_with_a_warning);
async fn a_valid_type_outside_the_compartment_is_exported_empty_with_a_warning(store: Store) {
    let s = Setup::new(store, |_| {}).await;
    for prefer in ["respond-async", "respond-async, handling=lenient"] {
        let response = plain_client()
            .get(s.proxy.url("/Patient/$export?_type=ValueSet"))
            .header("accept", "application/fhir+json")
            .header("prefer", prefer)
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{prefer}");
        let status_url = response.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_owned();
        let manifest = s.manifest(&status_url).await;
        assert_eq!(manifest["output"], json!([]), "{prefer}");
        let errors = s.errors(&manifest).await;
        assert_eq!(errors.len(), 1, "{prefer}: {errors:?}");
        assert_eq!(errors[0]["issue"][0]["severity"], "warning");
        let diagnostics = errors[0]["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains("exported empty: _type ValueSet"),
            "{diagnostics}"
        );
    }
}

both!(supporting_types_follow_the_tokens_scopes);
async fn supporting_types_follow_the_tokens_scopes(store: Store) {
    let mut s = Setup::new(store, |_| {}).await;
    s.token = s
        .client
        .token_for(
            &s.proxy,
            "system/Patient.read system/Encounter.read system/Practitioner.read",
        )
        .await;
    let (_, files) = s.export("/Patient/$export").await;
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["Encounter", "Patient", "Practitioner"],
        "no Organization file without its scope"
    );
    let response = s
        .kick_off("/Patient/$export?_type=Encounter,Organization")
        .await;
    assert_eq!(response.status(), 403, "a _type the token cannot read");
}

both!(an_upstream_failure_fetching_supporting_resources_is_an_error_line_not_a_failed_job);
async fn an_upstream_failure_fetching_supporting_resources_is_an_error_line_not_a_failed_job(
    store: Store,
) {
    let s = Setup::new(store, |c| c.export.retry_max_attempts = 2).await;
    *s.fhir.faults.broken_type.lock().unwrap() = Some("Organization".into());
    let (manifest, files) = s
        .export("/Patient/$export?_type=Encounter,Organization,Practitioner")
        .await;
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["Encounter", "Practitioner"]
    );
    let errors = s.errors(&manifest).await;
    assert!(!errors.is_empty());
    for e in &errors {
        assert_eq!(e["issue"][0]["severity"], "error", "{e}");
        let diagnostics = e["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains(
                "Organization resources referenced by the exported data could not be fetched"
            ),
            "{diagnostics}"
        );
    }
}

both!(supporting_resources_come_from_an_upstream_that_rejects_last_updated);
async fn supporting_resources_come_from_an_upstream_that_rejects_last_updated(store: Store) {
    // The compartment's units search such an upstream without `_lastUpdated`; the `_id` searches
    // of the supporting resources must too, or every one of them is a 400.
    let fhir = MemoryFhir::new()
        .load_dir(&fixture_dir())
        .unwrap()
        .paging(Paging {
            last_updated: LastUpdatedSearch::Rejected,
            ..Paging::default()
        })
        .start()
        .await
        .unwrap();
    let s = Setup::with_upstream(store, fhir, |_| {}).await;
    let (manifest, files) = s
        .export("/Patient/$export?_type=Encounter,Organization")
        .await;
    let errors = s.errors(&manifest).await;
    assert!(errors.is_empty(), "{errors:?}");
    let refs = referenced(&files, &["Organization"]);
    assert!(!refs["Organization"].is_empty());
    assert_eq!(ids(&files).get("Organization"), refs.get("Organization"));
}

/// The fixture upstream behind a front whose searches of `looping` answer their last page with a
/// `next` link to that very page (an upstream bug); returns the front's FHIR base URL.
async fn self_linking_front(fhir: &RunningFhir, looping: &'static str) -> String {
    use axum::extract::Request;
    let origin = format!("http://{}", fhir.addr);
    let app = axum::Router::new().fallback(move |request: Request| {
        let origin = origin.clone();
        async move {
            let target = request.uri().path_and_query().unwrap().to_string();
            let body = reqwest::get(format!("{origin}{target}"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let mut json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let last = !json["link"]
                .as_array()
                .is_some_and(|links| links.iter().any(|l| l["relation"] == "next"));
            if target.starts_with(&format!("/fhir/{looping}?"))
                && json["type"] == "searchset"
                && last
            {
                json["link"] = json!([{"relation": "next", "url": target}]);
            }
            (
                [("content-type", "application/fhir+json")],
                json.to_string(),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/fhir", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

both!(a_next_link_to_the_same_page_ends_the_supporting_search);
async fn a_next_link_to_the_same_page_ends_the_supporting_search(store: Store) {
    let fhir = testkit::setup::fixture_upstream().await;
    let front = self_linking_front(&fhir, "Organization").await;
    let s = Setup::with_upstream(store, fhir, |c| c.upstream.url = front).await;
    let status_url = s
        .start("/Patient/$export?_type=Encounter,Organization")
        .await;
    let manifest =
        tokio::time::timeout(std::time::Duration::from_secs(30), s.manifest(&status_url))
            .await
            .expect("the export never finishes");
    let files = s.download(&manifest).await;
    let refs = referenced(&files, &["Organization"]);
    assert_eq!(ids(&files).get("Organization"), refs.get("Organization"));
}

both!(a_next_link_to_the_same_page_ends_a_unit);
async fn a_next_link_to_the_same_page_ends_a_unit(store: Store) {
    let fhir = testkit::setup::fixture_upstream().await;
    let front = self_linking_front(&fhir, "Encounter").await;
    let s = Setup::with_upstream(store, fhir, |c| c.upstream.url = front).await;
    let status_url = s.start("/$export?_type=Encounter").await;
    let manifest =
        tokio::time::timeout(std::time::Duration::from_secs(30), s.manifest(&status_url))
            .await
            .expect("the export never finishes");
    let files = s.download(&manifest).await;
    let count = s.fhir.ids("Encounter").len();
    assert!(count > 100, "several pages");
    assert_eq!(files["Encounter"].len(), count, "each once");
    assert_eq!(ids(&files)["Encounter"].len(), count);
}

both!(a_next_link_to_the_same_page_ends_the_patient_list);
async fn a_next_link_to_the_same_page_ends_the_patient_list(store: Store) {
    // A Patient export lists the upstream's Patients at kick-off.
    let fhir = testkit::setup::fixture_upstream().await;
    let front = self_linking_front(&fhir, "Patient").await;
    let s = Setup::with_upstream(store, fhir, |c| {
        c.upstream.url = front;
        c.export.page_size = 4;
    })
    .await;
    let (_, files) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.export("/Patient/$export?_type=Patient"),
    )
    .await
    .expect("the export never finishes");
    assert_eq!(files["Patient"].len(), 10);
}
