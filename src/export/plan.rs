//! Planning: which resource types an export covers and the searches (units) that fetch them
//! (SPEC A5.14, A5.16, A5.19; DESIGN "one search per patient makes Group export take hours").
//!
//! Types = `_type` (or every type, for the level) ∩ what the token's scopes can read ∩ what the
//! upstream supports. At Patient and Group level the types are those of the R4 Patient compartment,
//! plus the supporting types (`export.supporting_types`, fetched by the finaliser without a search
//! of their own; another type outside the compartment is exported empty, with a warning). The
//! compartment types are fetched one of two ways:
//!
//! - **batched**: the patients are batched into `param=a,b,c` searches, the batch bounded by a
//!   count and by the search URL's length;
//! - **scanned** (when the patients are most of the upstream's: [`scan_pays`]): one type-level
//!   search per type, as at system level, whose resources outside the patients' compartment are
//!   dropped as they arrive (`membership.rs`). Upstreams answer a plain type search far faster per
//!   resource than a search by a list of patients (issue 17: hfs, Observation of 100 patients,
//!   0.71 s against 2.62 s), and one search per type replaces ⌈patients / batch⌉.
//!
//! Each `_typeFilter` of a type is its own search (the filters are OR'ed; the finaliser removes
//! resources that several searches returned).

use super::compartment::{NOT_EXPORTABLE, compartment_param};
use super::kickoff::{KickOff, KickOffError};
use crate::fhir::resource_types::R4_RESOURCE_TYPES;
use crate::job::Level;

/// Why an export cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Invalid(#[from] KickOffError),
    /// `_type` names a type the token's scopes do not cover.
    #[error("the access token's scopes do not allow reading {0}")]
    Forbidden(String),
}

/// What the planner needs to know besides the request.
pub struct PlanInput<'a> {
    pub level: &'a Level,
    pub kickoff: &'a KickOff,
    /// Whether the token may read a type.
    pub can_read: &'a dyn Fn(&str) -> bool,
    /// Types the upstream's CapabilityStatement lists (`None`: unknown, assume all).
    pub upstream_types: Option<&'a [String]>,
    /// Patient ids (Patient and Group level).
    pub patients: &'a [String],
    pub batch_size: usize,
    /// `export.supporting_types`: at Patient and Group level, the types outside the compartment
    /// whose referenced resources the export includes.
    pub supporting_types: &'a [String],
    /// Room for the patient list in a search URL, in bytes.
    pub max_ids_bytes: usize,
    /// Patient and Group level: fetch by type-level scans filtered by membership rather than by
    /// patient batches ([`scan_pays`] decides).
    pub scan: bool,
}

/// The types and searches of an export, and what was ignored on the way.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub types: Vec<String>,
    /// The supporting types `_type` named (Patient and Group level), a subset of `types`.
    pub named_supporting: Vec<String>,
    /// `(type, search)` with the search relative to the upstream base.
    pub searches: Vec<(String, String)>,
    /// The searches are type-level scans whose resources are kept only when in the compartment
    /// of the patients (stored with the job).
    pub members_only: bool,
    pub warnings: Vec<String>,
}

/// Whether an export of `patients` patients, out of the `all_patients` the upstream holds, is
/// better fetched by type-level scans: when they are at least `min_coverage` of all
/// (`export.scan_min_coverage`). A scan then reads at most 1 / `min_coverage` times the resources
/// the export keeps, in one search per type; below it, patient batches read less. Unknown totals
/// (an upstream without `Bundle.total`) keep the batches.
pub fn scan_pays(patients: usize, all_patients: Option<u64>, min_coverage: f64) -> bool {
    match all_patients {
        Some(all) if patients > 0 && all > 0 => patients as f64 >= min_coverage * all as f64,
        _ => false,
    }
}

pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    let k = input.kickoff;
    let patient_level = *input.level != Level::System;
    let supported = |t: &str| {
        input
            .upstream_types
            .is_none_or(|types| types.iter().any(|u| u == t))
    };
    let mut out = Plan::default();

    // At Patient and Group level, the supporting types have no searches: the finaliser fetches
    // the resources of theirs that the exported data references (`super::supporting`).
    let is_supporting = |t: &str| patient_level && input.supporting_types.iter().any(|s| s == t);
    let mut supporting = Vec::new();
    let types: Vec<String> = match &k.types {
        Some(requested) => {
            let mut types = Vec::new();
            for t in requested {
                let problem = if NOT_EXPORTABLE.contains(&t.as_str()) {
                    Some(format!("{t} is not exported by this server"))
                } else if patient_level && compartment_param(t).is_none() && !is_supporting(t) {
                    // A valid type, just not one a Patient or Group export holds: never a 400.
                    // Nothing of it is read, so neither scopes nor the upstream matter.
                    out.warnings.push(format!(
                        "exported empty: _type {t} is outside the Patient compartment and not a \
                         supporting type (export.supporting_types)"
                    ));
                    continue;
                } else if !supported(t) {
                    Some(format!("the upstream server does not support {t}"))
                } else {
                    None
                };
                if let Some(reason) = problem {
                    if k.lenient {
                        out.warnings.push(format!("ignored _type {t}: {reason}"));
                        continue;
                    }
                    return Err(KickOffError {
                        param: "_type".into(),
                        reason,
                    }
                    .into());
                }
                if !(input.can_read)(t) {
                    return Err(PlanError::Forbidden(t.clone()));
                }
                if is_supporting(t) {
                    supporting.push(t.clone());
                    out.named_supporting.push(t.clone());
                } else {
                    types.push(t.clone());
                }
            }
            types
        }
        None => {
            supporting = R4_RESOURCE_TYPES
                .iter()
                .filter(|t| is_supporting(t) && !NOT_EXPORTABLE.contains(t))
                .filter(|t| supported(t) && (input.can_read)(t))
                .map(|t| (*t).to_owned())
                .collect();
            R4_RESOURCE_TYPES
                .iter()
                .filter(|t| !NOT_EXPORTABLE.contains(t))
                .filter(|t| !patient_level || compartment_param(t).is_some())
                .filter(|t| supported(t) && (input.can_read)(t))
                .map(|t| (*t).to_owned())
                .collect()
        }
    };

    // Every compartment type's membership is decidable (membership.rs holds its table to that);
    // the check keeps a type added to the compartment table without an expression batched.
    let scan = patient_level
        && input.scan
        && !input.patients.is_empty()
        && types.iter().all(|t| super::membership::decidable(t));
    let batches = if patient_level && !scan {
        batch_ids(input.patients, input.batch_size, input.max_ids_bytes)
    } else {
        Vec::new()
    };
    for t in &types {
        let filters: Vec<&str> = k
            .type_filters
            .iter()
            .filter(|(ft, _)| ft == t)
            .map(|(_, q)| q.as_str())
            .collect();
        let filters = if filters.is_empty() {
            vec![""]
        } else {
            filters
        };
        for filter in filters {
            let and_filter = if filter.is_empty() {
                String::new()
            } else {
                format!("&{filter}")
            };
            if patient_level && !scan {
                let param = compartment_param(t).unwrap_or("patient");
                for batch in &batches {
                    out.searches
                        .push((t.clone(), format!("{t}?{param}={batch}{and_filter}")));
                }
            } else if filter.is_empty() {
                out.searches.push((t.clone(), t.clone()));
            } else {
                out.searches.push((t.clone(), format!("{t}?{filter}")));
            }
        }
    }
    out.types = types;
    out.members_only = scan;
    out.types.extend(supporting);
    Ok(out)
}

/// Orders searches by their counted size, largest first (uncounted ones last, in plan order):
/// with fewer workers than searches, the longest chain of pages starts at once instead of behind
/// the small ones (hfs, 100 patients: Observation's 17 pages started 0.5 s late in type order).
pub fn largest_first<T>(searches: &mut [(T, Option<u64>)]) {
    searches.sort_by_key(|(_, count)| std::cmp::Reverse(count.map_or(0, |c| c.saturating_add(1))));
}

/// Room for the patient ids in a search URL: what is left after the base URL, the longest
/// `/{Type}?{param}=` (45 bytes covers every compartment entry), the longest `_typeFilter` query,
/// and the paging parameters the pager adds (`_count`, two `_lastUpdated` bounds, `_sort`: at most
/// 140 bytes encoded: 13 + 2 × 50 + 19).
pub fn ids_room(max_url: usize, base: usize, filters: &[(String, String)]) -> usize {
    let filter = filters.iter().map(|(_, q)| q.len() + 1).max().unwrap_or(0);
    max_url.saturating_sub(base + 45 + filter + 140).max(64)
}

/// Patient ids joined into comma lists of at most `size` ids and `max_bytes` bytes.
pub fn batch_ids(ids: &[String], size: usize, max_bytes: usize) -> Vec<String> {
    let mut batches = Vec::new();
    let mut current = String::new();
    let mut count = 0;
    for id in ids {
        if count > 0 && (count == size || current.len() + 1 + id.len() > max_bytes) {
            batches.push(std::mem::take(&mut current));
            count = 0;
        }
        if count > 0 {
            current.push(',');
        }
        current.push_str(id);
        count += 1;
    }
    if count > 0 {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input<'a>(
        level: &'a Level,
        kickoff: &'a KickOff,
        patients: &'a [String],
        can_read: &'a dyn Fn(&str) -> bool,
    ) -> PlanInput<'a> {
        PlanInput {
            level,
            kickoff,
            can_read,
            upstream_types: None,
            patients,
            batch_size: 2,
            supporting_types: supporting(),
            max_ids_bytes: 1000,
            scan: false,
        }
    }

    /// The default `export.supporting_types`.
    fn supporting() -> &'static [String] {
        Box::leak(
            crate::config::ExportConfig::default()
                .supporting_types
                .into_boxed_slice(),
        )
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    #[test]
    fn group_level_batches_patients_per_type() {
        let kickoff = KickOff {
            types: Some(vec!["Patient".into(), "Observation".into()]),
            ..KickOff::default()
        };
        let patients = ids(5);
        let all = |_: &str| true;
        let p = plan(&input(&Level::Group("g".into()), &kickoff, &patients, &all)).unwrap();
        assert_eq!(p.searches.len(), 2 * 3, "types × ⌈5/2⌉");
        assert_eq!(
            p.searches[0],
            ("Patient".into(), "Patient?_id=p0,p1".into())
        );
        assert_eq!(
            p.searches[5],
            ("Observation".into(), "Observation?patient=p4".into())
        );
    }

    #[test]
    fn types_are_limited_by_scopes_upstream_and_compartment() {
        let kickoff = KickOff::default();
        let readable = |t: &str| t == "Observation" || t == "Practitioner" || t == "ValueSet";
        let upstream = vec![
            "Observation".to_owned(),
            "Practitioner".to_owned(),
            "Organization".to_owned(),
            "ValueSet".to_owned(),
            "Patient".to_owned(),
        ];
        let patients = ids(1);
        let mut i = input(&Level::Patient, &kickoff, &patients, &readable);
        i.upstream_types = Some(&upstream);
        let p = plan(&i).unwrap();
        assert_eq!(
            p.types,
            ["Observation", "Practitioner"],
            "Practitioner is a readable supporting type, Organization is not readable, ValueSet \
             is neither in the compartment nor supporting"
        );
        assert_eq!(
            p.searches,
            [(
                "Observation".to_owned(),
                "Observation?patient=p0".to_owned()
            )],
            "no search for a supporting type"
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert!(p.named_supporting.is_empty(), "no _type: none named");
        let mut i = input(&Level::System, &kickoff, &patients, &readable);
        i.upstream_types = Some(&upstream);
        assert_eq!(
            plan(&i).unwrap().types,
            ["Observation", "Practitioner", "ValueSet"]
        );
        let mut i = input(&Level::Patient, &kickoff, &patients, &readable);
        i.supporting_types = &[];
        assert_eq!(plan(&i).unwrap().types, ["Observation"], "none configured");
    }

    #[test]
    fn requested_types_outside_scope_are_forbidden_and_unsupported_ones_rejected() {
        let none = |_: &str| false;
        let kickoff = KickOff {
            types: Some(vec!["Patient".into()]),
            ..KickOff::default()
        };
        assert!(matches!(
            plan(&input(&Level::System, &kickoff, &[], &none)),
            Err(PlanError::Forbidden(_))
        ));
        let organization = KickOff {
            types: Some(vec!["Encounter".into(), "Organization".into()]),
            ..KickOff::default()
        };
        let only_encounter = |t: &str| t == "Encounter";
        assert!(matches!(
            plan(&input(&Level::Patient, &organization, &[], &only_encounter)),
            Err(PlanError::Forbidden(t)) if t == "Organization"
        ));
        let all = |_: &str| true;
        let upstream = vec!["Patient".to_owned()];
        let mut i = input(&Level::Patient, &organization, &[], &all);
        i.upstream_types = Some(&upstream);
        assert!(matches!(plan(&i), Err(PlanError::Invalid(_))));
        let lenient = KickOff {
            lenient: true,
            ..organization
        };
        let mut i = input(&Level::Patient, &lenient, &[], &all);
        i.upstream_types = Some(&upstream);
        let p = plan(&i).unwrap();
        assert!(p.types.is_empty() && p.warnings.len() == 2, "{p:?}");
    }

    #[test]
    fn a_valid_type_outside_the_compartment_is_exported_empty_with_a_warning_never_a_400() {
        let patients = ids(3);
        let none = |_: &str| false;
        let all = |_: &str| true;
        for lenient in [false, true] {
            let kickoff = KickOff {
                types: Some(vec!["ValueSet".into(), "Organization".into()]),
                lenient,
                ..KickOff::default()
            };
            let p = plan(&input(&Level::Group("g".into()), &kickoff, &patients, &all)).unwrap();
            assert_eq!(p.types, ["Organization"]);
            assert_eq!(p.named_supporting, ["Organization"]);
            assert!(p.searches.is_empty(), "{:?}", p.searches);
            assert_eq!(p.warnings.len(), 1);
            assert!(p.warnings[0].contains("exported empty: _type ValueSet"));
            // Nothing of it is read: no scope needed.
            let kickoff = KickOff {
                types: Some(vec!["ValueSet".into()]),
                lenient,
                ..KickOff::default()
            };
            let p = plan(&input(&Level::Patient, &kickoff, &patients, &none)).unwrap();
            assert!(p.types.is_empty() && p.warnings.len() == 1);
        }
    }

    #[test]
    fn a_scan_is_one_type_level_search_per_type_and_filter() {
        let kickoff = KickOff {
            types: Some(vec!["Patient".into(), "Observation".into()]),
            type_filters: vec![("Observation".into(), "code=1".into())],
            ..KickOff::default()
        };
        let patients = ids(5);
        let all = |_: &str| true;
        let group = Level::Group("g".into());
        let mut i = input(&group, &kickoff, &patients, &all);
        i.scan = true;
        let p = plan(&i).unwrap();
        assert!(p.members_only);
        assert_eq!(
            p.searches,
            [
                ("Patient".to_owned(), "Patient".to_owned()),
                ("Observation".to_owned(), "Observation?code=1".to_owned()),
            ]
        );
        // No patients: nothing to scan for.
        let mut i = input(&group, &kickoff, &[], &all);
        i.scan = true;
        let p = plan(&i).unwrap();
        assert!(p.searches.is_empty() && !p.members_only);
        // System level is never filtered.
        let mut i = input(&Level::System, &kickoff, &patients, &all);
        i.scan = true;
        assert!(!plan(&i).unwrap().members_only);
    }

    #[test]
    fn searches_go_largest_first_and_uncounted_last_in_order() {
        let mut searches = vec![
            ("a", Some(5)),
            ("b", None),
            ("c", Some(900)),
            ("d", Some(0)),
            ("e", None),
        ];
        largest_first(&mut searches);
        let order: Vec<&str> = searches.iter().map(|(s, _)| *s).collect();
        assert_eq!(order, ["c", "a", "d", "b", "e"]);
    }

    #[test]
    fn scans_pay_from_the_configured_coverage() {
        assert!(scan_pays(100, Some(100), 0.5));
        assert!(scan_pays(50, Some(100), 0.5));
        assert!(!scan_pays(49, Some(100), 0.5));
        assert!(!scan_pays(0, Some(0), 0.5));
        assert!(!scan_pays(100, None, 0.5), "unknown total: batches");
        assert!(!scan_pays(100, Some(100), 1.01), "above 1 disables scans");
    }

    #[test]
    fn each_type_filter_is_a_search() {
        let kickoff = KickOff {
            types: Some(vec!["Observation".into(), "Condition".into()]),
            type_filters: vec![
                ("Observation".into(), "code=1".into()),
                ("Observation".into(), "category=lab".into()),
            ],
            ..KickOff::default()
        };
        let all = |_: &str| true;
        let p = plan(&input(&Level::System, &kickoff, &[], &all)).unwrap();
        assert_eq!(
            p.searches,
            [
                ("Observation".to_owned(), "Observation?code=1".to_owned()),
                (
                    "Observation".to_owned(),
                    "Observation?category=lab".to_owned()
                ),
                ("Condition".to_owned(), "Condition".to_owned()),
            ]
        );
    }

    #[test]
    fn a_batch_of_100_uuids_fits_a_4096_byte_search_url() {
        let base = "http://fhir.internal:8080/fhir";
        let ids: Vec<String> = (0..100u64)
            .map(|i| format!("{i:08x}-0000-4000-8000-{i:012x}"))
            .collect();
        let batches = batch_ids(&ids, 100, ids_room(4096, base.len(), &[]));
        assert_eq!(batches.len(), 1, "one search for 100 patients");
        let mut config = crate::config::Config::default();
        config.upstream.url = base.into();
        let pager = crate::export::pager::Pager::new(&config, Default::default()).unwrap();
        let instant = "2026-11-30T09:41:11.123456789Z";
        let search = format!("CoverageEligibilityResponse?patient={}", batches[0]);
        let url = pager.search_url(&search, Some(("gt", instant)), instant);
        assert!(url.len() <= 4096, "{} bytes", url.len());
    }

    proptest! {
        #[test]
        fn batches_keep_every_id_once_within_bounds(n in 0usize..300, size in 1usize..60, max in 20usize..400) {
            let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
            let batches = batch_ids(&ids, size, max);
            let rejoined: Vec<String> = batches.iter().flat_map(|b| b.split(',').map(str::to_owned)).collect();
            prop_assert_eq!(rejoined, ids);
            for b in &batches {
                prop_assert!(b.split(',').count() <= size);
                prop_assert!(b.len() <= max || b.split(',').count() == 1);
            }
        }
    }
}
