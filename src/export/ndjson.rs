//! Turns one upstream searchset page into NDJSON lines (DESIGN "hot path"): each entry's resource
//! is taken as raw JSON and written as one line; it is only re-serialised when its bytes must change
//! (a pretty-printed upstream, `_elements`). Entries with `search.mode` `include` or `outcome` are
//! not data; an OperationOutcome in a page is reported as an issue.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::fhir::{OperationOutcome, mandatory_elements};

/// `meta.tag` added to resources reduced by `_elements` (Bulk Data IG, A5.15).
const SUBSETTED: (&str, &str) = (
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "SUBSETTED",
);

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("the upstream page is not a FHIR searchset Bundle: {0}")]
    NotABundle(String),
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
    #[serde(default)]
    link: Vec<Link>,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    #[serde(default)]
    search: Option<EntrySearch>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
    meta: Option<HeadMeta>,
}

#[derive(Deserialize)]
struct HeadMeta {
    #[serde(rename = "lastUpdated")]
    last_updated: Option<String>,
}

/// One resource ready to be written.
#[derive(Debug)]
pub struct Line {
    pub id: Option<String>,
    pub last_updated: Option<String>,
    /// The resource as one line of JSON, with the trailing `\n`.
    pub bytes: Vec<u8>,
}

/// A FHIR instant (RFC 3339) as a time; `None` when it is not one.
pub(super) fn instant(text: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

/// Whether a line is inside the job's bounds (`_since` exclusive, `upper` inclusive) by its
/// `meta.lastUpdated`, for an upstream that could not apply them. A resource without a readable
/// `meta.lastUpdated` is kept: when it changed cannot be told, and leaving it out could lose it.
pub(super) fn within_bounds(line: &Line, since: Option<&str>, upper: &str) -> bool {
    let Some(at) = line.last_updated.as_deref().and_then(instant) else {
        return true;
    };
    since.and_then(instant).is_none_or(|since| at > since)
        && instant(upper).is_none_or(|upper| at <= upper)
}

/// What a page held.
#[derive(Debug, Default)]
pub struct PageContent {
    pub lines: Vec<Line>,
    /// The `next` link, as given (absolute or relative).
    pub next: Option<String>,
    /// OperationOutcome resources found in the page (as JSON text), to report.
    pub issues: Vec<String>,
}

/// Reads a searchset page; keeps resources of `resource_type` only, applying `elements`.
pub fn read_page(
    body: &[u8],
    resource_type: &str,
    elements: &[String],
) -> Result<PageContent, PageError> {
    read_page_where(body, resource_type, elements, None)
}

/// [`read_page`], also dropping the resources `keep` refuses (given each resource's JSON as the
/// upstream sent it, before `elements` removes anything).
pub fn read_page_where(
    body: &[u8],
    resource_type: &str,
    elements: &[String],
    keep: Option<&(dyn Fn(&str) -> bool + Sync)>,
) -> Result<PageContent, PageError> {
    let page: Page<'_> =
        serde_json::from_slice(body).map_err(|e| PageError::NotABundle(e.to_string()))?;
    if page.resource_type.as_deref() != Some("Bundle") {
        return Err(PageError::NotABundle(format!(
            "resourceType is {:?}",
            page.resource_type.unwrap_or_default()
        )));
    }
    let elements = elements_for(resource_type, elements);
    let mut content = PageContent {
        next: page
            .link
            .into_iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url),
        ..PageContent::default()
    };
    for entry in page.entry {
        let Some(raw) = entry.resource else { continue };
        let mode = entry.search.and_then(|s| s.mode);
        let head: Head = match serde_json::from_str(raw.get()) {
            Ok(head) => head,
            Err(e) => {
                content.issues.push(
                    OperationOutcome::error(
                        "processing",
                        format!("an entry's resource is not valid FHIR JSON: {e}"),
                    )
                    .to_line(),
                );
                continue;
            }
        };
        if head.resource_type == "OperationOutcome" || mode.as_deref() == Some("outcome") {
            content.issues.push(compact(raw.get()));
            continue;
        }
        if mode.as_deref() == Some("include")
            || head.resource_type != resource_type
            || keep.is_some_and(|keep| !keep(raw.get()))
        {
            continue;
        }
        let mut bytes = match &elements {
            Some(keep) => subset(raw.get(), keep),
            None => compact(raw.get()),
        }
        .into_bytes();
        bytes.push(b'\n');
        content.lines.push(Line {
            id: head.id,
            last_updated: head.meta.and_then(|m| m.last_updated),
            bytes,
        });
    }
    Ok(content)
}

/// The raw JSON on one line: unchanged unless it holds line breaks (a pretty-printing upstream).
fn compact(raw: &str) -> String {
    if raw.contains(['\n', '\r']) {
        match serde_json::from_str::<Value>(raw) {
            Ok(value) => value.to_string(),
            Err(_) => raw.replace(['\n', '\r'], " "),
        }
    } else {
        raw.to_owned()
    }
}

/// The elements kept for `resource_type`, or `None` when `_elements` does not apply to it.
fn elements_for(resource_type: &str, elements: &[String]) -> Option<Vec<String>> {
    let applicable: Vec<String> = elements
        .iter()
        .filter_map(|e| match e.split_once('.') {
            Some((t, name)) if t == resource_type => Some(name.to_owned()),
            Some(_) => None,
            None => Some(e.clone()),
        })
        .collect();
    if applicable.is_empty() {
        return None;
    }
    let mut keep: Vec<String> = ["resourceType", "id", "meta"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    keep.extend(
        mandatory_elements(resource_type)
            .iter()
            .map(|s| (*s).to_owned()),
    );
    keep.extend(applicable);
    Some(keep)
}

/// Keeps the listed top-level elements and tags the resource SUBSETTED.
fn subset(raw: &str, keep: &[String]) -> String {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(raw) else {
        return compact(raw);
    };
    let kept = |key: &str| {
        let key = key.strip_prefix('_').unwrap_or(key);
        keep.iter()
            .any(|k| k == key || key.strip_prefix(k.as_str()).is_some_and(is_choice_suffix))
    };
    let mut out: Map<String, Value> = object.into_iter().filter(|(k, _)| kept(k)).collect();
    let meta = out.entry("meta").or_insert_with(|| json!({}));
    if let Some(meta) = meta.as_object_mut() {
        let tags = meta.entry("tag").or_insert_with(|| json!([]));
        if let Some(tags) = tags.as_array_mut() {
            // Once, also when the upstream had already subsetted the resource.
            let tagged = tags
                .iter()
                .any(|t| t["system"] == SUBSETTED.0 && t["code"] == SUBSETTED.1);
            if !tagged {
                tags.push(json!({ "system": SUBSETTED.0, "code": SUBSETTED.1 }));
            }
        }
    }
    Value::Object(out).to_string()
}

/// `Quantity` in `valueQuantity` for `value`: a choice element's name is its name followed by one
/// of the R4 data types a choice allows (capitalised). An element that merely starts with another
/// one's name (`statusReason` after `status`, `classHistory` after `class`) is not it.
fn is_choice_suffix(rest: &str) -> bool {
    const CHOICE_TYPES: &[&str] = &[
        "Base64Binary",
        "Boolean",
        "Canonical",
        "Code",
        "Date",
        "DateTime",
        "Decimal",
        "Id",
        "Instant",
        "Integer",
        "Markdown",
        "Oid",
        "PositiveInt",
        "String",
        "Time",
        "UnsignedInt",
        "Uri",
        "Url",
        "Uuid",
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactPoint",
        "Count",
        "Distance",
        "Duration",
        "HumanName",
        "Identifier",
        "Money",
        "Period",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "SampledData",
        "Signature",
        "Timing",
        "ContactDetail",
        "Contributor",
        "DataRequirement",
        "Expression",
        "ParameterDefinition",
        "RelatedArtifact",
        "TriggerDefinition",
        "UsageContext",
        "Dosage",
        "Meta",
    ];
    CHOICE_TYPES.contains(&rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(entries: &str, next: Option<&str>) -> Vec<u8> {
        let link = next.map_or(String::new(), |n| {
            format!(
                r#","link":[{{"relation":"self","url":"s"}},{{"relation":"next","url":"{n}"}}]"#
            )
        });
        format!(r#"{{"resourceType":"Bundle","type":"searchset","entry":[{entries}]{link}}}"#)
            .into_bytes()
    }

    #[test]
    fn raw_resources_become_lines_and_next_is_read() {
        let body = page(
            r#"{"resource":{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"2024-01-01T00:00:00Z"}},"search":{"mode":"match"}},
               {"resource":{"resourceType":"Patient","id":"b"}}"#,
            Some("http://up/fhir?page=2"),
        );
        let content = read_page(&body, "Patient", &[]).unwrap();
        assert_eq!(content.lines.len(), 2);
        assert_eq!(
            content.lines[0].bytes,
            br#"{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"2024-01-01T00:00:00Z"}}
"#
        );
        assert_eq!(
            content.lines[0].last_updated.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        assert_eq!(content.lines[1].id.as_deref(), Some("b"));
        assert_eq!(content.next.as_deref(), Some("http://up/fhir?page=2"));
    }

    #[test]
    fn pretty_printed_resources_become_one_line() {
        let body = page(
            "{\"resource\": {\n  \"resourceType\": \"Patient\",\n  \"id\": \"p\",\n  \"name\": [{\"text\": \"a\\nb\"}]\n}}",
            None,
        );
        let content = read_page(&body, "Patient", &[]).unwrap();
        let line = std::str::from_utf8(&content.lines[0].bytes).unwrap();
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let value: Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["name"][0]["text"], "a\nb");
    }

    #[test]
    fn includes_and_outcomes_are_not_data() {
        let body = page(
            r#"{"resource":{"resourceType":"Observation","id":"o"}},
               {"resource":{"resourceType":"Patient","id":"p"},"search":{"mode":"include"}},
               {"resource":{"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"processing"}]},"search":{"mode":"outcome"}}"#,
            None,
        );
        let content = read_page(&body, "Observation", &[]).unwrap();
        assert_eq!(content.lines.len(), 1);
        assert_eq!(content.issues.len(), 1);
        assert!(content.issues[0].contains("OperationOutcome"));
    }

    #[test]
    fn elements_keep_every_r4_types_mandatory_elements_and_tag_once() {
        // MedicationDispense was outside the old hand-written list: its status and medication[x]
        // were dropped. The upstream had subsetted it already: one SUBSETTED tag, not two.
        let body = page(
            r#"{"resource":{"resourceType":"MedicationDispense","id":"m","meta":{"tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED"}]},"status":"completed","_status":{"id":"s"},"medicationReference":{"reference":"Medication/1"},"subject":{"reference":"Patient/p"},"quantity":{"value":2}}}"#,
            None,
        );
        let content = read_page(&body, "MedicationDispense", &["quantity".into()]).unwrap();
        let value: Value = serde_json::from_slice(&content.lines[0].bytes).unwrap();
        assert_eq!(value["status"], "completed");
        assert_eq!(value["_status"]["id"], "s");
        assert_eq!(value["medicationReference"]["reference"], "Medication/1");
        assert_eq!(value["quantity"]["value"], 2);
        assert!(value.get("subject").is_none(), "{value}");
        assert_eq!(value["meta"]["tag"].as_array().unwrap().len(), 1, "{value}");
    }

    #[test]
    fn every_r4_resource_type_has_its_mandatory_elements() {
        use crate::fhir::mandatory_elements::MANDATORY_ELEMENTS;
        use crate::fhir::resource_types::R4_RESOURCE_TYPES;
        assert!(MANDATORY_ELEMENTS.windows(2).all(|w| w[0].0 < w[1].0));
        for t in R4_RESOURCE_TYPES {
            assert!(
                MANDATORY_ELEMENTS.iter().any(|(m, _)| m == t),
                "{t} has no entry"
            );
        }
        assert_eq!(
            crate::fhir::mandatory_elements("Observation"),
            ["status", "code"]
        );
        assert!(crate::fhir::mandatory_elements("NoSuchType").is_empty());
    }

    #[test]
    fn elements_keep_mandatory_ones_and_tag_subsetted() {
        let body = page(
            r#"{"resource":{"resourceType":"Observation","id":"o","status":"final","code":{"text":"c"},"valueQuantity":{"value":1},"subject":{"reference":"Patient/p"},"note":[{"text":"n"}]}}"#,
            None,
        );
        let content = read_page(
            &body,
            "Observation",
            &["Observation.value".into(), "Patient.name".into()],
        )
        .unwrap();
        let value: Value = serde_json::from_slice(&content.lines[0].bytes).unwrap();
        assert_eq!(value["status"], "final");
        assert_eq!(value["valueQuantity"]["value"], 1);
        assert!(value.get("subject").is_none() && value.get("note").is_none());
        assert_eq!(value["meta"]["tag"][0]["code"], "SUBSETTED");
        // _elements naming only other types leaves this type whole.
        let content = read_page(&body, "Observation", &["Patient.name".into()]).unwrap();
        let value: Value = serde_json::from_slice(&content.lines[0].bytes).unwrap();
        assert!(value.get("note").is_some() && value.get("meta").is_none());
    }

    #[test]
    fn elements_keep_choice_types_but_not_elements_that_merely_start_alike() {
        // Mandatory `status` and `class` are not `statusReason`, `statusHistory` or
        // `classHistory`: a name continued in upper case is a choice only when the rest is a
        // FHIR data type (`valueQuantity`, `occurrenceDateTime`).
        let body = page(
            r#"{"resource":{"resourceType":"Encounter","id":"e","status":"finished","statusHistory":[{"status":"planned"}],"class":{"code":"AMB"},"classHistory":[{"class":{"code":"IMP"}}],"subject":{"reference":"Patient/p"}}},{"resource":{"resourceType":"Encounter","id":"t","status":"finished","class":{"code":"AMB"},"_status":{"id":"x"}}}"#,
            None,
        );
        let content = read_page(&body, "Encounter", &["id".into()]).unwrap();
        let value: Value = serde_json::from_slice(&content.lines[0].bytes).unwrap();
        assert_eq!(value["status"], "finished");
        assert_eq!(value["class"]["code"], "AMB");
        for dropped in ["statusHistory", "classHistory", "subject"] {
            assert!(value.get(dropped).is_none(), "{dropped} kept: {value}");
        }
        let value: Value = serde_json::from_slice(&content.lines[1].bytes).unwrap();
        assert_eq!(value["_status"]["id"], "x");

        let body = page(
            r#"{"resource":{"resourceType":"Observation","id":"o","status":"final","code":{"text":"c"},"valueCodeableConcept":{"text":"v"},"valueSetX":1}}"#,
            None,
        );
        let content = read_page(&body, "Observation", &["value".into()]).unwrap();
        let value: Value = serde_json::from_slice(&content.lines[0].bytes).unwrap();
        assert_eq!(value["valueCodeableConcept"]["text"], "v");
        assert!(value.get("valueSetX").is_none(), "{value}");
    }

    #[test]
    fn a_non_bundle_is_an_error() {
        assert!(read_page(br#"{"resourceType":"OperationOutcome"}"#, "Patient", &[]).is_err());
        assert!(read_page(b"<html>", "Patient", &[]).is_err());
    }
}
