//! Patient and Group exports fetched by type-level scans filtered by membership (issue 17):
//! exactly what the patient-batched plan returns, in one search per type.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use testkit::both;
use testkit::memory_fhir::MemoryFhir;
use testkit::process::Store;
use testkit::setup::{GROUP, Setup, fixture_dir, group_members, ids};

/// The fixture upstream plus `Group/part` holding the first `n` of the fixture Group's patients.
async fn upstream_with_part_group(n: usize) -> (testkit::memory_fhir::RunningFhir, Vec<String>) {
    let members: Vec<String> = group_members().into_iter().take(n).collect();
    let mut fhir = MemoryFhir::new().load_dir(&fixture_dir()).unwrap();
    fhir.insert(json!({
        "resourceType": "Group", "id": "part", "type": "person", "actual": true,
        "member": members.iter().map(|p| json!({"entity": {"reference": format!("Patient/{p}")}})).collect::<Vec<_>>(),
    }));
    (fhir.start().await.unwrap(), members)
}

/// Exports `path` through a proxy in front of a fresh upstream built by `upstream`, with
/// `scan_min_coverage` set; returns the ids per type and the searches the upstream served.
async fn export_with(
    store: Store,
    path: &str,
    scan_min_coverage: f64,
    part: usize,
) -> (BTreeMap<String, BTreeSet<String>>, u64, Value) {
    let (fhir, _) = upstream_with_part_group(part).await;
    let s = Setup::with_upstream(store, fhir, |c| {
        c.export.scan_min_coverage = scan_min_coverage
    })
    .await;
    let before = s.fhir.counters.searches.load(Ordering::SeqCst);
    let (manifest, files) = s.export(path).await;
    let searches = s.fhir.counters.searches.load(Ordering::SeqCst) - before;
    assert_eq!(
        manifest["error"],
        json!([]),
        "no errors expected from {path}"
    );
    (ids(&files), searches, manifest)
}

/// Both plans, one after the other, for the same export: the same resources.
async fn scans_match_batches(store: Store, path: &str, part: usize) -> u64 {
    let (scanned, scan_searches, _) = export_with(store, path, 0.5, part).await;
    let (batched, batch_searches, _) = export_with(store, path, 2.0, part).await;
    assert_eq!(scanned, batched, "{path}: scans and batches differ");
    assert!(
        scan_searches <= batch_searches,
        "{path}: {scan_searches} searches scanning, {batch_searches} batching"
    );
    let resources: usize = scanned.values().map(BTreeSet::len).sum();
    assert!(resources > 0, "{path}: nothing exported");
    scan_searches
}

both!(a_group_of_every_patient_is_scanned_exactly);
async fn a_group_of_every_patient_is_scanned_exactly(store: Store) {
    // The fixture's compartment types (the supporting types' `_id` searches are alike in both
    // plans, and counted in `scans_match_batches`).
    let types = "AllergyIntolerance,CarePlan,CareTeam,Claim,Condition,Device,DiagnosticReport,\
                 Encounter,ExplanationOfBenefit,Group,ImagingStudy,Immunization,MedicationRequest,\
                 Observation,Patient,Procedure";
    let searches =
        scans_match_batches(store, &format!("/Group/{GROUP}/$export?_type={types}"), 10).await;
    // One search per type: far fewer than types × batches.
    assert_eq!(searches, 16);
    scans_match_batches(store, &format!("/Group/{GROUP}/$export"), 10).await;
}

both!(a_group_of_most_patients_drops_the_others);
async fn a_group_of_most_patients_drops_the_others(store: Store) {
    // 6 of 10 patients: above the 0.5 coverage, so scanned; the other 4's data must go.
    let (scanned, _, _) = export_with(store, "/Group/part/$export", 0.5, 6).await;
    let (_, members) = upstream_with_part_group(6).await;
    let want: BTreeSet<String> = members.iter().cloned().collect();
    assert_eq!(scanned["Patient"], want);
    scans_match_batches(
        store,
        "/Group/part/$export?_type=Patient,Observation,Encounter,Claim",
        6,
    )
    .await;
}

both!(patient_level_exports_are_scanned_exactly);
async fn patient_level_exports_are_scanned_exactly(store: Store) {
    scans_match_batches(store, "/Patient/$export", 10).await;
}

both!(scans_filter_before_elements_and_with_type_filters);
async fn scans_filter_before_elements_and_with_type_filters(store: Store) {
    // `_elements=status` removes the subject the membership is read from: the filter must see the
    // resource as sent.
    scans_match_batches(
        store,
        "/Group/part/$export?_type=Observation,Encounter&_elements=status",
        6,
    )
    .await;
    scans_match_batches(
        store,
        "/Group/part/$export?_type=Observation&_typeFilter=Observation%3Fstatus%3Dfinal",
        7,
    )
    .await;
}

both!(a_small_group_keeps_patient_batches);
async fn a_small_group_keeps_patient_batches(store: Store) {
    // 3 of 10 patients, below the 0.5 coverage: batches (`patient=…`), one patient each here.
    let (fhir, members) = upstream_with_part_group(3).await;
    let s = Setup::with_upstream(store, fhir, |c| c.export.patient_batch_size = 1).await;
    let before = s.fhir.counters.searches.load(Ordering::SeqCst);
    let (_, files) = s
        .export("/Group/part/$export?_type=Patient,Observation")
        .await;
    let searches = s.fhir.counters.searches.load(Ordering::SeqCst) - before;
    let got = ids(&files);
    assert_eq!(got["Patient"], members.iter().cloned().collect());
    // 2 types × 3 batches (2 if scanned).
    assert_eq!(searches, 2 * 3);
}

both!(patients_whose_ids_break_the_id_grammar_keep_their_data_when_scanned);
async fn patients_whose_ids_break_the_id_grammar_keep_their_data_when_scanned(store: Store) {
    // Upstreams hold ids longer than FHIR's 64 characters or with other characters; a Patient
    // export lists them as they are, and a batched search by `patient=` finds their data, so a
    // scan must too.
    let odd = ["p".repeat(70), "odd_id".to_owned()];
    let mut got = Vec::new();
    for coverage in [0.5, 2.0] {
        let mut fhir = MemoryFhir::new();
        for (i, id) in odd.iter().enumerate() {
            fhir.insert(json!({"resourceType": "Patient", "id": id}));
            fhir.insert(json!({
                "resourceType": "Observation", "id": format!("obs-{i}"), "status": "final",
                "code": {"text": "x"}, "subject": {"reference": format!("Patient/{id}")}
            }));
        }
        let s = Setup::with_upstream(store, fhir.start().await.unwrap(), |c| {
            c.export.scan_min_coverage = coverage
        })
        .await;
        let (_, files) = s.export("/Patient/$export?_type=Patient,Observation").await;
        got.push(ids(&files));
    }
    assert_eq!(got[1]["Observation"].len(), 2, "batches: {:?}", got[1]);
    assert_eq!(got[0], got[1], "scans and batches differ");
}
