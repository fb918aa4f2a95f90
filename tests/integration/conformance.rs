//! Bulk Data conformance over real sockets, at the levels each rule applies to: Group membership
//! rules (inactive, ended and nested members), which Groups a client may export, `_elements`
//! keeping every type's mandatory elements, and `allowPartialManifests` validated.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use testkit::both;
use testkit::memory_fhir::MemoryFhir;
use testkit::process::Store;
use testkit::setup::{Setup, fixture_dir, group_members};

/// The fixture plus Group `rules`: member 0 active, 1 inactive, 2 ended in 2001, 3 ending in
/// 9999, 4 a date-only end in the past, then Group `inner` (members 5 and 6, and Group `deep`,
/// member 7); `deep` is two levels down.
fn with_rule_groups() -> MemoryFhir {
    let members = group_members();
    let patient = |i: usize| json!({ "reference": format!("Patient/{}", members[i]) });
    let mut fhir = MemoryFhir::new().load_dir(&fixture_dir()).unwrap();
    fhir.insert(
        json!({ "resourceType": "Group", "id": "rules", "type": "person", "actual": true,
        "member": [
            { "entity": patient(0) },
            { "entity": patient(1), "inactive": true },
            { "entity": patient(2), "period": { "end": "2001-01-01T00:00:00Z" } },
            { "entity": patient(3), "period": { "end": "9999-01-01T00:00:00Z" } },
            { "entity": patient(4), "period": { "end": "2001-05" } },
            { "entity": { "reference": "Group/inner" } },
        ]}),
    );
    fhir.insert(
        json!({ "resourceType": "Group", "id": "inner", "type": "person", "actual": true,
        "member": [ { "entity": patient(5) }, { "entity": patient(6) },
                    { "entity": { "reference": "Group/deep" } } ]}),
    );
    fhir.insert(
        json!({ "resourceType": "Group", "id": "deep", "type": "person", "actual": true,
        "member": [ { "entity": patient(7) } ]}),
    );
    fhir
}

fn patient_ids(files: &std::collections::BTreeMap<String, Vec<Value>>) -> BTreeSet<String> {
    files["Patient"]
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn group_membership(store: Store) {
    let members = group_members();
    let fhir = with_rule_groups().start().await.unwrap();
    let setup = Setup::with_upstream(store, fhir, |_| {}).await;
    let (manifest, files) = setup.export("/Group/rules/$export?_type=Patient").await;
    let want: BTreeSet<String> = [0, 3, 5, 6, 7]
        .iter()
        .map(|&i| members[i].clone())
        .collect();
    assert_eq!(patient_ids(&files), want, "active members, nested two deep");
    assert!(setup.errors(&manifest).await.is_empty());

    // One level of nesting: Group/deep is reported in the error file, not followed.
    let fhir = with_rule_groups().start().await.unwrap();
    let setup = Setup::with_upstream(store, fhir, |c| {
        c.export.group_max_depth = 1;
        c.export.group_active_members_only = false;
    })
    .await;
    let (manifest, files) = setup.export("/Group/rules/$export?_type=Patient").await;
    let want: BTreeSet<String> = (0..7).map(|i| members[i].clone()).collect();
    assert_eq!(patient_ids(&files), want, "every member, one level down");
    let errors = Value::Array(setup.errors(&manifest).await).to_string();
    assert!(errors.contains("Group/deep"), "{errors}");
}
both!(group_membership);

/// From the attacker's side: a client limited to Group `rules` asks for another Group, with and
/// without `_type`, by GET and POST; every answer is a 403 OperationOutcome, the Group allowed
/// still exports.
#[tokio::test]
async fn a_client_exports_only_the_groups_it_is_registered_for() {
    let fhir = with_rule_groups().start().await.unwrap();
    let setup = Setup::with_upstream(Store::Embedded, fhir, |c| {
        c.auth.clients.last_mut().unwrap().groups = Some(vec!["rules".into()]);
    })
    .await;
    for path in [
        "/Group/synthea-10/$export",
        "/Group/inner/$export?_type=Patient",
        "/Group/RULES/$export",
        "/Group/no-such-group/$export",
    ] {
        let response = setup.kick_off(path).await;
        assert_eq!(response.status(), 403, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{path}");
        assert!(
            body.to_string().contains("auth.clients.groups"),
            "{path}: {body}"
        );
    }
    let response = setup
        .kick_off_post(
            "/Group/inner/$export",
            json!({ "resourceType": "Parameters", "parameter": [] }).to_string(),
        )
        .await;
    assert_eq!(response.status(), 403);
    setup.start("/Group/rules/$export?_type=Patient").await;
}

/// `_elements` at every level keeps each resource's mandatory elements (Encounter: status,
/// class) and what was asked, drops the rest, and tags SUBSETTED once.
#[tokio::test]
async fn elements_keep_mandatory_elements_at_every_level() {
    let setup = Setup::new(Store::Embedded, |_| {}).await;
    for path in [
        "/$export?_type=Encounter&_elements=Encounter.period",
        "/Patient/$export?_type=Encounter&_elements=period",
        "/Group/synthea-10/$export?_type=Encounter&_elements=Encounter.period",
    ] {
        let (_, files) = setup.export(path).await;
        let encounters = &files["Encounter"];
        assert!(!encounters.is_empty(), "{path}");
        for e in encounters {
            let mut keys: Vec<&str> = e.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["class", "id", "meta", "period", "resourceType", "status"],
                "{path}"
            );
            let tags = e["meta"]["tag"].as_array().unwrap();
            let subsetted = tags.iter().filter(|t| t["code"] == "SUBSETTED").count();
            assert_eq!(subsetted, 1, "{path}: {e}");
        }
    }
}

/// `allowPartialManifests` is a boolean at every level; anything else is a 400 naming it.
#[tokio::test]
async fn allow_partial_manifests_must_be_a_boolean_at_every_level() {
    let setup = Setup::new(Store::Embedded, |_| {}).await;
    for base in ["/$export", "/Patient/$export", "/Group/synthea-10/$export"] {
        for bad in ["banana", "1", "yes"] {
            let response = setup
                .kick_off(&format!("{base}?allowPartialManifests={bad}"))
                .await;
            assert_eq!(response.status(), 400, "{base} {bad}");
            let body: Value = response.json().await.unwrap();
            assert!(body.to_string().contains("allowPartialManifests"), "{body}");
        }
        let status_url = setup
            .start(&format!("{base}?allowPartialManifests=true&_type=Patient"))
            .await;
        setup.manifest(&status_url).await;
    }
}
