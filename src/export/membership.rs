//! Whether a resource belongs to a set of patients, decided from the resource alone: what a
//! `{Type}?{param}=Patient/a,b,...` search of the Patient compartment (`compartment.rs`) would
//! return, without asking the upstream.
//!
//! The rule is the search parameter's own FHIRPath expression (R4 SearchParameter, generated into
//! [`PATIENT_REFERENCE_EXPRESSIONS`]). Every one of them is a union of plain paths, some ending in
//! `.where(resolve() is Patient)`: a resource is a member when a reference found along one of the
//! paths names a Patient of the set. References to other types at the same place (a Group as an
//! AdverseEvent's subject) never make a member, as a `Patient/…` search value would not match
//! them either. A Patient is a member when its own id is in the set.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde_json::Value;

use super::compartment::PATIENT_REFERENCE_EXPRESSIONS;

/// The element paths of one expression, e.g. `Appointment.participant.actor.where(resolve() is
/// Patient) | ...` → `[["participant", "actor"], ...]`; `None` for anything beyond that grammar.
fn paths(resource_type: &str, expression: &'static str) -> Option<Vec<Vec<&'static str>>> {
    expression
        .split('|')
        .map(|alternative| {
            let alternative = alternative.trim();
            let path = alternative
                .strip_suffix(".where(resolve() is Patient)")
                .unwrap_or(alternative);
            let mut steps = path.split('.');
            if steps.next()? != resource_type {
                return None;
            }
            let steps: Vec<&str> = steps.collect();
            let plain = |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric());
            (!steps.is_empty() && steps.iter().all(plain)).then_some(steps)
        })
        .collect()
}

/// Every compartment type's paths, parsed once.
fn table() -> &'static HashMap<&'static str, Vec<Vec<&'static str>>> {
    static TABLE: OnceLock<HashMap<&'static str, Vec<Vec<&'static str>>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        PATIENT_REFERENCE_EXPRESSIONS
            .iter()
            .filter_map(|(t, e)| Some((*t, paths(t, e)?)))
            .collect()
    })
}

/// Whether membership of `resource_type` can be decided from a resource (every compartment type
/// can; the test below holds the table to that).
pub fn decidable(resource_type: &str) -> bool {
    resource_type == "Patient" || table().contains_key(resource_type)
}

/// The Patient ids `resource` (of `resource_type`) is in the compartment of.
pub fn patients_of<'a>(resource_type: &str, resource: &'a Value) -> Vec<&'a str> {
    if resource_type == "Patient" {
        return resource["id"].as_str().into_iter().collect();
    }
    let mut found = Vec::new();
    for path in table().get(resource_type).into_iter().flatten() {
        collect(resource, path, &mut found);
    }
    found
}

/// Follows `path` through objects and arrays (FHIRPath flattens collections) and keeps the
/// Patient ids of the references at its end.
fn collect<'a>(value: &'a Value, path: &[&str], found: &mut Vec<&'a str>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect(v, path, found)),
        Value::Object(map) => match path.split_first() {
            Some((step, rest)) => {
                if let Some(next) = map.get(*step) {
                    collect(next, rest, found);
                }
            }
            None => {
                if let Some(id) = map
                    .get("reference")
                    .and_then(Value::as_str)
                    .and_then(patient_id)
                {
                    found.push(id);
                }
            }
        },
        _ => {}
    }
}

/// The id of the Patient `reference` names (`Patient/id`, relative or absolute, optionally
/// `/_history/v`), whatever the id's characters or length: it is only compared with the set, which
/// holds the ids as the upstream gave them (a search by `patient=` finds ids beyond FHIR's grammar).
fn patient_id(reference: &str) -> Option<&str> {
    let unversioned = reference
        .split_once("/_history/")
        .map_or(reference, |(head, _)| head);
    let (head, id) = unversioned.rsplit_once('/')?;
    (head.rsplit('/').next() == Some("Patient") && !id.is_empty()).then_some(id)
}

/// Whether `resource` is in the compartment of one of `patients`.
pub fn is_member(resource_type: &str, resource: &Value, patients: &HashSet<String>) -> bool {
    patients_of(resource_type, resource)
        .into_iter()
        .any(|id| patients.contains(id))
}

/// Whether the resource `json` (of `resource_type`, as the upstream sent it) is in the
/// compartment of one of `patients`; JSON that does not parse is not.
pub fn is_member_json(resource_type: &str, json: &str, patients: &HashSet<String>) -> bool {
    serde_json::from_str::<Value>(json).is_ok_and(|r| is_member(resource_type, &r, patients))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::compartment::PATIENT_COMPARTMENT;
    use serde_json::json;

    #[test]
    fn every_compartment_type_is_decidable_from_the_resource() {
        for (t, _) in PATIENT_COMPARTMENT {
            assert!(decidable(t), "{t}: expression outside the grammar");
        }
        assert_eq!(table().len() + 1, PATIENT_COMPARTMENT.len());
        assert!(!decidable("Practitioner"));
    }

    #[test]
    fn references_are_followed_through_arrays_and_unions() {
        let appointment = json!({ "resourceType": "Appointment", "participant": [
            { "actor": { "reference": "Practitioner/d" } },
            { "actor": { "reference": "Patient/p1" } },
            { "actor": { "reference": "https://h/fhir/Patient/p2/_history/3" } } ]});
        assert_eq!(patients_of("Appointment", &appointment), ["p1", "p2"]);

        let audit = json!({ "resourceType": "AuditEvent",
            "agent": [{ "who": { "reference": "Patient/a" } }],
            "entity": [{ "what": { "reference": "Patient/b" } }, { "what": { "display": "x" } }] });
        assert_eq!(patients_of("AuditEvent", &audit), ["a", "b"]);

        let observation = json!({ "resourceType": "Observation", "subject": { "reference": "Group/g" },
            "performer": [{ "reference": "Patient/not-the-subject" }] });
        assert!(patients_of("Observation", &observation).is_empty());

        let patient = json!({ "resourceType": "Patient", "id": "p9" });
        let set: HashSet<String> = ["p9".to_owned(), "b".to_owned()].into();
        assert!(is_member("Patient", &patient, &set));
        assert!(is_member("AuditEvent", &audit, &set));
        assert!(!is_member("Appointment", &appointment, &set));
    }

    #[test]
    fn expressions_outside_the_grammar_are_refused() {
        assert!(
            paths(
                "Observation",
                "Observation.subject.where(resolve() is Group)"
            )
            .is_none()
        );
        assert!(paths("Observation", "Encounter.subject").is_none());
        assert!(paths("Observation", "Observation.subject[0]").is_none());
        assert_eq!(
            paths("Coverage", "Coverage.beneficiary").unwrap(),
            [vec!["beneficiary"]]
        );
    }
}
