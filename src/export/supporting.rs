//! Supporting resources (Bulk Data IG: a Patient or Group export MAY include the resources its
//! data references): at Patient and Group level, the job's types outside the Patient compartment
//! (those of `export.supporting_types` that `_type`, the token's scopes and the upstream allow)
//! have no searches. Instead each unit records, page by page in its checkpoint, which of their
//! resources the lines it wrote reference (`Collector`), and the finaliser fetches the union over
//! all units by `{Type}?_id=a,b,c` searches, each resource once (`Exporter::fetch_supporting`).
//!
//! - **What counts as a reference:** a `"reference"` string, as written (after `_elements`), of
//!   the form `Type/id` (optionally `/_history/v`), relative or absolute to the upstream base.
//!   Contained (`#x`), `urn:` and conditional (`Type?identifier=...`) references, and absolute ones
//!   to other servers, cannot be fetched by id and are not followed.
//! - **Bounds:** the fetch is bounded above by the job's `transactionTime`; `_since` does not apply
//!   (a client needs what the exported resources reference, changed or not), nor do `_typeFilter`s.
//!   A resource the upstream does not return (deleted, or changed after `transactionTime`) is
//!   counted in a warning in the error file; a batch that fails (after the pager's retries) is an
//!   error line there, not a failed job. A supporting type that `_type` named and nothing
//!   references is exported empty, with a warning saying so.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::compartment::compartment_param;
use super::exporter::Exporter;
use super::kickoff::is_fhir_id;
use super::ndjson::within_bounds;
use super::ndjson::{Line, read_page};
use super::pager::Pager;
use super::plan::{batch_ids, ids_room};
use super::writer::UnitWriter;
use crate::fhir::OperationOutcome;
use crate::job::{Job, Level, OutputFile, Unit};
use crate::storage::StorageError;

/// The job's supporting types: at Patient and Group level, its types outside the Patient
/// compartment (the planner adds only supporting types there). None at system level.
pub fn supporting_types(job: &Job) -> Vec<&str> {
    if job.level == Level::System {
        return Vec::new();
    }
    job.types
        .iter()
        .map(String::as_str)
        .filter(|t| compartment_param(t).is_none())
        .collect()
}

/// Finds the references to a job's supporting resources in the lines a unit writes.
pub(super) struct Collector {
    types: Vec<String>,
    /// The upstream's base URL with a trailing `/`: absolute references below it count.
    base: String,
}

impl Collector {
    /// `None` when the job has no supporting types (system level, or none requested or allowed).
    pub(super) fn for_job(job: &Job, pager: &Pager) -> Option<Self> {
        let types: Vec<String> = supporting_types(job)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if types.is_empty() {
            return None;
        }
        let base = format!("{}/", pager.base_url());
        Some(Self { types, base })
    }

    /// Adds the `Type/id` of every supporting resource that `lines` reference to `out`.
    pub(super) fn collect(&self, lines: &[Line], out: &mut BTreeSet<String>) {
        let mut found = Vec::new();
        for line in lines {
            // Most lines of some types never name a supporting type: skip the parse.
            let Ok(text) = std::str::from_utf8(&line.bytes) else {
                continue;
            };
            if !self.types.iter().any(|t| text.contains(t.as_str())) {
                continue;
            }
            let mut de = serde_json::Deserializer::from_str(text);
            // A line that is not JSON was written as the upstream sent it; it references nothing
            // this can follow.
            let _ = Walk {
                out: &mut found,
                is_reference: false,
            }
            .deserialize(&mut de);
        }
        for reference in found {
            if let Some(target) = self.target(&reference) {
                out.insert(target);
            }
        }
    }

    /// `Type/id` when `reference` names a supporting resource on the upstream.
    fn target(&self, reference: &str) -> Option<String> {
        let local = match reference.strip_prefix(self.base.as_str()) {
            Some(local) if !self.base.is_empty() => local,
            _ if reference.contains(':') => return None, // urn:, another server
            _ => reference,
        };
        if local.contains(['?', '#']) {
            return None;
        }
        let mut parts = local.split('/');
        let (t, id) = (parts.next()?, parts.next()?);
        match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => {}
            (Some("_history"), Some(_), None) => {}
            _ => return None,
        }
        (self.types.iter().any(|s| s == t) && is_fhir_id(id)).then(|| format!("{t}/{id}"))
    }
}

/// Walks a JSON value without building it, keeping the strings under `"reference"` keys.
struct Walk<'a> {
    out: &'a mut Vec<String>,
    is_reference: bool,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        if self.is_reference {
            self.out.push(value.to_owned());
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Walk {
                out: &mut *self.out,
                is_reference: false,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(is_reference) = map.next_key_seed(IsReference)? {
            map.next_value_seed(Walk {
                out: &mut *self.out,
                is_reference,
            })?;
        }
        Ok(())
    }
}

/// A map key: whether it is `reference`.
struct IsReference;

impl<'de> DeserializeSeed<'de> for IsReference {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for IsReference {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == "reference")
    }
}

/// What fetching the supporting resources gave: the output files and the error file's lines.
pub(super) struct Fetched {
    pub output: Vec<OutputFile>,
    pub issues: Vec<String>,
}

impl Exporter {
    /// Fetches the supporting resources the `units` referenced, each once, into this attempt's
    /// `{Type}.f{attempt}.{n}.ndjson`. Only storage failures are errors (the attempt is repeated);
    /// what the upstream does not give is reported in `issues`.
    pub(super) async fn fetch_supporting(
        &self,
        job: &Job,
        units: &[Unit],
        attempt: u32,
    ) -> Result<Fetched, StorageError> {
        let mut fetched = Fetched {
            output: Vec::new(),
            issues: Vec::new(),
        };
        let mut wanted: BTreeMap<&str, BTreeSet<&str>> = supporting_types(job)
            .into_iter()
            .map(|t| (t, BTreeSet::new()))
            .collect();
        for reference in units.iter().flat_map(|u| &u.checkpoint.references) {
            if let Some((t, id)) = reference.split_once('/')
                && let Some(ids) = wanted.get_mut(t)
            {
                ids.insert(id);
            }
        }
        let base_len = self.pager.base_url().len();
        for (t, ids) in wanted {
            if ids.is_empty() {
                if job.named_supporting.iter().any(|n| n == t) {
                    fetched.issues.push(
                        OperationOutcome::warning(format!(
                            "exported empty: _type {t} names a supporting type, and no exported \
                             resource references a {t}"
                        ))
                        .to_line(),
                    );
                }
                continue;
            }
            let ids: Vec<String> = ids.into_iter().map(str::to_owned).collect();
            let mut writer = UnitWriter::resume(
                &self.storage,
                &job.id,
                format!("{t}.f{attempt}"),
                t,
                (self.config.max_file_bytes, self.config.max_file_resources),
                Vec::new(),
            )
            .await?;
            let room = ids_room(self.config.max_search_url_bytes, base_len, &[]);
            let mut found: HashSet<String> = HashSet::new();
            // Ids of batches that failed: reported as such, not as missing.
            let mut failed: HashSet<String> = HashSet::new();
            // An upstream without `_lastUpdated` search: the bound is applied here instead.
            let unbounded = self.pager.lacks_last_updated(t).await;
            for batch in batch_ids(&ids, self.config.patient_batch_size, room) {
                let requested: HashSet<&str> = batch.split(',').collect();
                let search = format!("{t}?_id={batch}");
                let mut url = Some(if unbounded {
                    self.pager.unbounded_search_url(&search)
                } else {
                    self.pager.search_url(&search, None, &job.transaction_time)
                });
                let mut is_next = false;
                while let Some(current) = url.take() {
                    let problem = match self.pager.fetch(&current, is_next).await {
                        Ok(body) => match read_page(&body, t, &job.elements) {
                            Ok(content) => {
                                let lines: Vec<Line> = content
                                    .lines
                                    .into_iter()
                                    .filter(|l| {
                                        !unbounded || within_bounds(l, None, &job.transaction_time)
                                    })
                                    .filter(|l| {
                                        l.id.as_deref().is_some_and(|id| {
                                            requested.contains(id) && found.insert(id.to_owned())
                                        })
                                    })
                                    .collect();
                                writer.write(&lines).await?;
                                fetched.issues.extend(content.issues);
                                url = content
                                    .next
                                    .and_then(|next| self.pager.resolve_next(&current, &next));
                                None
                            }
                            Err(e) => Some(e.to_string()),
                        },
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(problem) = problem {
                        failed.extend(requested.iter().map(|id| (*id).to_owned()));
                        fetched.issues.push(
                            OperationOutcome::error(
                                "exception",
                                format!(
                                    "the {} {t} resources referenced by the exported data could \
                                     not be fetched ({search}): {problem}",
                                    requested.len()
                                ),
                            )
                            .to_line(),
                        );
                    }
                    is_next = true;
                }
            }
            writer.finish().await?;
            writer.settle().await?;
            fetched
                .output
                .extend(writer.files().iter().filter(|f| f.count > 0).cloned());
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !found.contains(*id) && !failed.contains(id.as_str()))
                .collect();
            if !missing.is_empty() {
                let some: Vec<String> = missing
                    .iter()
                    .take(5)
                    .map(|id| format!("{t}/{id}"))
                    .collect();
                fetched.issues.push(
                    OperationOutcome::warning(format!(
                        "{} of the {} {t} resources referenced by the exported data were not \
                         returned by the upstream (deleted, or changed after transactionTime), \
                         e.g. {}",
                        missing.len(),
                        ids.len(),
                        some.join(", ")
                    ))
                    .to_line(),
                );
            }
        }
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collector() -> Collector {
        Collector {
            types: vec!["Organization".into(), "Practitioner".into()],
            base: "http://up:8080/fhir/".into(),
        }
    }

    fn line(json: &str) -> Line {
        Line {
            id: None,
            last_updated: None,
            bytes: format!("{json}\n").into_bytes(),
        }
    }

    #[test]
    fn references_to_supporting_types_are_collected_and_the_rest_ignored() {
        let mut out = BTreeSet::new();
        collector().collect(
            &[
                line(
                    r##"{"resourceType":"Encounter","id":"e","subject":{"reference":"Patient/p"},
                    "participant":[{"individual":{"reference":"Practitioner/a","display":"Dr A"}},
                                   {"individual":{"reference":"http://up:8080/fhir/Practitioner/b/_history/3"}}],
                    "serviceProvider":{"reference":"Organization/o1"},
                    "contained":[{"resourceType":"Organization","id":"c"}],
                    "location":[{"location":{"reference":"#c"}}],
                    "hospitalization":{"origin":{"reference":"urn:uuid:1234"}},
                    "partOf":{"reference":"Organization?identifier=x|1"},
                    "basedOn":[{"reference":"http://other/fhir/Organization/o9"}],
                    "text":{"div":"<div>\"reference\":\"Organization/o8\"</div>"},
                    "extension":[{"valueReference":{"reference":"Organization/o2"}}]}"##,
                ),
                line(r#"{"resourceType":"Claim","provider":{"reference":"Practitioner/a"}}"#),
                line(r#"{"resourceType":"Claim","provider":{"reference":"Location/l"}}"#),
                line(r#"{"resourceType":"Claim","reference":{"reference":"Organization/o3"}}"#),
                line("not json Organization/o4"),
            ],
            &mut out,
        );
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            [
                "Organization/o1",
                "Organization/o2",
                "Organization/o3",
                "Practitioner/a",
                "Practitioner/b"
            ]
        );
    }

    #[test]
    fn only_type_slash_id_forms_are_targets() {
        let c = collector();
        assert_eq!(
            c.target("Organization/x.1-A").as_deref(),
            Some("Organization/x.1-A")
        );
        for not in [
            "Organization/",
            "Organization",
            "Organization/a/b",
            "Organization/a/_history",
            "Organization/bad id",
            "Organizations/a",
            "http://up:8080/fhir2/Organization/a",
            "urn:oid:1.2",
        ] {
            assert_eq!(c.target(not), None, "{not}");
        }
    }
}
