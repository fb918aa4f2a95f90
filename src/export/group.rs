//! Who a Group-level export is about (SPEC A5.2; FHIR R4 `Group.member`): the Patients a Group
//! names, after the membership rules.
//!
//! - A member with `inactive = true`, or whose `period.end` is before the export's
//!   `transactionTime`, is no longer a member and is not exported (`export.group_active_members_only`,
//!   on by default). A `period.end` with a precision coarser than an instant (`2024`, `2024-05`,
//!   `2024-05-31`) covers the whole year, month or day, and one to the second its whole second
//!   (`transactionTime` has fractions); one that is not a FHIR dateTime keeps the
//!   member and is reported.
//! - A member that is itself a Group is followed, to `export.group_max_depth` levels below the
//!   Group asked for (a Group met twice is read once, so a cycle ends); deeper Groups are reported,
//!   not followed, as are Groups past the first [`MAX_GROUP_READS`]. Members of other types (Device, Practitioner...) are not patients and are
//!   skipped.
//!
//! The upstream read is a closure, so the rules are tested without a server.

use std::collections::HashSet;
use std::future::Future;

use serde_json::Value;

use super::kickoff::is_fhir_id;
use crate::fhir::Instant;

/// Warnings kept from one resolution; past them, one more line says how many were left out. They
/// go into the job's record and its error file, which a Group of millions of garbled members or
/// missing nested Groups must not blow up.
pub const MAX_WARNINGS: usize = 100;

/// Groups read from the upstream for one kick-off, the Group asked for included; nested Groups
/// past them are reported, not followed. The depth bound alone does not bound a Group naming
/// thousands of others, each read while the kick-off request waits.
pub const MAX_GROUP_READS: usize = 1_000;

/// The membership rules (`export.group_active_members_only`, `export.group_max_depth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberRules {
    /// Leave out members that are inactive or whose period has ended.
    pub active_only: bool,
    /// How many levels of nested Groups are followed below the Group asked for (0: none).
    pub max_depth: usize,
}

/// The Patients of a Group, in the order first met, each once; and what was left out on the way
/// (for the error file).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub patients: Vec<String>,
    pub warnings: Vec<String>,
}

/// The id of a reference to a resource of `resource_type`: relative (`Patient/1`), absolute
/// (`https://host/fhir/Patient/1`) or versioned (`Patient/1/_history/2`).
pub fn reference_id<'a>(reference: &'a str, resource_type: &str) -> Option<&'a str> {
    let unversioned = match reference.split_once("/_history/") {
        Some((head, _)) => head,
        None => reference,
    };
    let (head, id) = unversioned.rsplit_once('/')?;
    let named = head.rsplit('/').next()?;
    (named == resource_type && is_fhir_id(id) && !is_dot_segment(id)).then_some(id)
}

/// `.` and `..`: ids by the grammar, but path segments in `Group/{id}`, which a URL resolves
/// away (the read would be of the upstream's base or of its Group search).
fn is_dot_segment(id: &str) -> bool {
    matches!(id, "." | "..")
}

/// Whether a member still counts at `now` under `rules`; `Err` with a warning when its
/// `period.end` cannot be read (it then counts).
fn counts(member: &Value, now: Instant, rules: &MemberRules) -> Result<bool, String> {
    if !rules.active_only {
        return Ok(true);
    }
    if member["inactive"].as_bool() == Some(true) {
        return Ok(false);
    }
    let Some(end) = member["period"]["end"].as_str() else {
        return Ok(true);
    };
    ended(end, now)
        .map(|ended| !ended)
        .ok_or_else(|| format!("member period.end {end:?} is not a FHIR dateTime; kept"))
}

/// Whether a FHIR dateTime lies wholly before `now`; `None` when it is not one.
fn ended(end: &str, now: Instant) -> Option<bool> {
    if end.len() > 10 {
        // Like a date, a time covers its whole precision: `12:00:00Z` lasts until `12:00:01Z`
        // (R4 Period.end includes any matching date/time), so `now` is cut to that precision.
        let end_at = Instant::parse(end).ok()?;
        let digits = match end.as_bytes().get(19) {
            Some(b'.') => end[20..].bytes().take_while(u8::is_ascii_digit).count(),
            _ => 0,
        };
        let unit = 10u32.pow(9u32.saturating_sub(digits as u32));
        let now = now.as_offset_date_time();
        let cut = now
            .replace_nanosecond(now.nanosecond() - now.nanosecond() % unit)
            .ok()
            .and_then(|cut| Instant::try_from(cut).ok())?;
        return Some(end_at < cut);
    }
    // YYYY, YYYY-MM or YYYY-MM-DD: over when the same prefix of `now` (in UTC) is later.
    let shape_ok = match end.len() {
        4 | 7 | 10 => end.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        }),
        _ => false,
    };
    if !shape_ok {
        return None;
    }
    // The shape is not enough: `2023-13` or `2023-02-30` name no date (FHIR's years start at
    // 0001), and compared as text they would end a membership silently.
    let field = |at: usize| end.get(at..at + 2).map(|d| d.parse::<u8>().ok());
    let year: i32 = end[..4].parse().ok()?;
    let month = match field(5) {
        Some(m) => time::Month::try_from(m?).ok()?,
        None => time::Month::January,
    };
    let day = field(8).unwrap_or(Some(1))?;
    if year < 1 || time::Date::from_calendar_date(year, month, day).is_err() {
        return None;
    }
    let now = now.to_string();
    Some(end < &now[..end.len()])
}

/// The Patients and nested Groups directly in `group`, after the rules.
fn direct_members(
    group: &Value,
    now: Instant,
    rules: &MemberRules,
    warnings: &mut Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let (mut patients, mut groups) = (Vec::new(), Vec::new());
    let label = group["id"].as_str().unwrap_or("?");
    for member in group["member"].as_array().into_iter().flatten() {
        let Some(reference) = member["entity"]["reference"].as_str() else {
            continue;
        };
        match counts(member, now, rules) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(warning) => warnings.push(format!("Group/{label}: {warning}")),
        }
        if let Some(id) = reference_id(reference, "Patient") {
            patients.push(id.to_owned());
        } else if let Some(id) = reference_id(reference, "Group") {
            groups.push(id.to_owned());
        }
    }
    (patients, groups)
}

/// The Patients of Group `id`: reads it (and the Groups nested in it) with `read`, which returns
/// the Group resource, `None` when the upstream has no such Group, or the caller's error, which
/// ends the resolution (a Group that cannot be read is not quietly left out). A nested Group that
/// does not exist is reported and skipped; the Group asked for not existing is `Ok(None)`.
pub async fn resolve<F, Fut, E>(
    id: &str,
    now: Instant,
    rules: &MemberRules,
    mut read: F,
) -> Result<Option<Members>, E>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Option<Value>, E>>,
{
    if is_dot_segment(id) {
        return Ok(None);
    }
    let mut out = Members::default();
    let mut seen_patients = HashSet::new();
    let mut seen_groups = HashSet::from([id.to_owned()]);
    let mut level = vec![id.to_owned()];
    let mut reads = 0;
    for depth in 0.. {
        let mut next = Vec::new();
        for group_id in level {
            if reads == MAX_GROUP_READS {
                out.warnings.push(format!(
                    "Group/{group_id} not followed: a Group exported names more than \
                     {MAX_GROUP_READS} Groups; its members are not exported"
                ));
                continue;
            }
            reads += 1;
            let Some(group) = read(group_id.clone()).await? else {
                if depth == 0 {
                    return Ok(None);
                }
                out.warnings.push(format!(
                    "Group/{group_id}, a member of a Group exported, does not exist; skipped"
                ));
                continue;
            };
            let (patients, groups) = direct_members(&group, now, rules, &mut out.warnings);
            for patient in patients {
                if seen_patients.insert(patient.clone()) {
                    out.patients.push(patient);
                }
            }
            next.extend(groups.into_iter().filter(|g| seen_groups.insert(g.clone())));
        }
        if next.is_empty() {
            break;
        }
        if depth >= rules.max_depth {
            out.warnings.extend(next.iter().map(|g| {
                format!(
                    "Group/{g} is nested more than {} levels deep (export.group_max_depth); \
                     its members are not exported",
                    rules.max_depth
                )
            }));
            break;
        }
        level = next;
    }
    if out.warnings.len() > MAX_WARNINGS {
        let more = out.warnings.len() - MAX_WARNINGS;
        out.warnings.truncate(MAX_WARNINGS);
        out.warnings.push(format!(
            "Group/{id}: {more} more problems with its members or nested Groups, not listed"
        ));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    const RULES: MemberRules = MemberRules {
        active_only: true,
        max_depth: 2,
    };

    fn now() -> Instant {
        Instant::parse("2024-06-15T12:00:00Z").unwrap()
    }

    fn member(reference: &str) -> Value {
        json!({ "entity": { "reference": reference } })
    }

    async fn run(
        groups: &HashMap<&str, Value>,
        id: &str,
        rules: &MemberRules,
    ) -> Result<Option<Members>, String> {
        resolve(id, now(), rules, |g: String| {
            let found = groups.get(g.as_str()).cloned();
            async move {
                match g.as_str() {
                    "broken" => Err(format!("cannot read Group/{g}")),
                    _ => Ok(found),
                }
            }
        })
        .await
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn references_of_every_form_name_their_id() {
        for (reference, want) in [
            ("Patient/1", Some("1")),
            ("https://h/fhir/Patient/a-b.c", Some("a-b.c")),
            ("Patient/1/_history/7", Some("1")),
            ("Group/1", None),
            ("Patient/", None),
            ("Patient/bad id", None),
            ("urn:uuid:1", None),
            ("MyPatient/1", None),
        ] {
            assert_eq!(reference_id(reference, "Patient"), want, "{reference}");
        }
    }

    #[test]
    fn inactive_and_ended_members_are_left_out_and_others_kept() {
        let m = |reference: &str, extra: Value| {
            let mut v = member(reference);
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let group = json!({ "resourceType": "Group", "id": "g", "member": [
            m("Patient/active", json!({})),
            m("Patient/inactive", json!({ "inactive": true })),
            m("Patient/explicitly-active", json!({ "inactive": false })),
            m("Patient/ended", json!({ "period": { "end": "2024-06-15T11:59:59Z" } })),
            m("Patient/ends-later", json!({ "period": { "end": "2024-06-15T12:00:01Z" } })),
            m("Patient/ended-year", json!({ "period": { "end": "2023" } })),
            m("Patient/this-year", json!({ "period": { "end": "2024" } })),
            m("Patient/this-month", json!({ "period": { "end": "2024-06" } })),
            m("Patient/ended-day", json!({ "period": { "end": "2024-06-14" } })),
            m("Patient/today", json!({ "period": { "end": "2024-06-15" } })),
            m("Patient/open", json!({ "period": { "start": "2020-01-01" } })),
            m("Patient/garbled", json!({ "period": { "end": "June" } })),
            m("Device/d1", json!({})),
            json!({ "entity": { "display": "no reference" } }),
        ]});
        let groups = HashMap::from([("g", group)]);
        let got = block_on(run(&groups, "g", &RULES)).unwrap().unwrap();
        assert_eq!(
            got.patients,
            [
                "active",
                "explicitly-active",
                "ends-later",
                "this-year",
                "this-month",
                "today",
                "open",
                "garbled"
            ]
        );
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
        assert!(got.warnings[0].contains("\"June\""), "{:?}", got.warnings);

        let all = MemberRules {
            active_only: false,
            ..RULES
        };
        assert_eq!(
            block_on(run(&groups, "g", &all))
                .unwrap()
                .unwrap()
                .patients
                .len(),
            12
        );
    }

    #[test]
    fn a_partial_period_end_that_is_no_date_keeps_the_member_and_is_reported() {
        // Shaped like YYYY, YYYY-MM or YYYY-MM-DD but no date of the calendar: not a FHIR
        // dateTime, so the member is kept and reported, never silently left out.
        let garbage = [
            "2023-13",
            "2024-00",
            "2023-02-30",
            "2023-06-31",
            "0000",
            "2023-00-10",
        ];
        let members: Vec<Value> = garbage
            .iter()
            .enumerate()
            .map(|(i, end)| {
                json!({ "entity": { "reference": format!("Patient/p{i}") },
                        "period": { "end": end } })
            })
            .collect();
        let groups = HashMap::from([("g", json!({ "id": "g", "member": members }))]);
        let got = block_on(run(&groups, "g", &RULES)).unwrap().unwrap();
        assert_eq!(got.patients.len(), garbage.len(), "{got:?}");
        assert_eq!(got.warnings.len(), garbage.len(), "{:?}", got.warnings);
        // Real dates of every precision still end membership.
        for (end, ended_by_now) in [
            ("2024-02-29", true),
            ("2023-12", true),
            ("0999", true),
            ("2024-06-15", false),
            ("9999-12-31", false),
        ] {
            assert_eq!(super::ended(end, now()), Some(ended_by_now), "{end}");
        }
    }

    #[test]
    fn dot_segment_references_are_neither_read_nor_exported() {
        // `.` and `..` match the id grammar, but in `Group/{id}` they are path segments: the read
        // would go to the upstream's base (or its Group search), not to a Group.
        for reference in [
            "Patient/..",
            "Patient/.",
            "https://h/fhir/Group/..",
            "Group/.",
        ] {
            assert_eq!(reference_id(reference, "Patient"), None, "{reference}");
            assert_eq!(reference_id(reference, "Group"), None, "{reference}");
        }
        assert_eq!(reference_id("Patient/...x", "Patient"), Some("...x"));
        let group = json!({ "id": "g", "member": [member("Group/.."), member("Group/."),
            member("Patient/.."), member("Patient/1")] });
        let read = std::cell::RefCell::new(Vec::new());
        let got = block_on(resolve("g", now(), &RULES, |id: String| {
            read.borrow_mut().push(id.clone());
            let found = (id == "g").then(|| group.clone());
            async move { Ok::<_, String>(found) }
        }))
        .unwrap()
        .unwrap();
        assert_eq!(got.patients, ["1"]);
        assert_eq!(*read.borrow(), ["g"]);
        // Nor is a dot segment asked for at the top.
        let top = block_on(resolve("..", now(), &RULES, |id: String| {
            read.borrow_mut().push(id);
            async { Ok::<_, String>(Some(json!({}))) }
        }))
        .unwrap();
        assert_eq!(top, None);
        assert_eq!(*read.borrow(), ["g"]);
    }

    #[test]
    fn a_period_end_covers_its_whole_second_like_a_date_covers_its_day() {
        // transactionTime carries fractions of a second; an end written to the second (as FHIR
        // dateTimes mostly are) includes that whole second (R4 Period.end: "includes any matching
        // date/time"), so a member ending in the export's very second is still a member.
        let now = Instant::parse("2024-06-15T12:00:00.5Z").unwrap();
        for (end, ended_by_now) in [
            ("2024-06-15T12:00:00Z", false),
            ("2024-06-15T14:00:00+02:00", false),
            ("2024-06-15T11:59:59Z", true),
            ("2024-06-15T12:00:00.4Z", true),
            ("2024-06-15T12:00:00.5Z", false),
            ("2024-06-15T12:00:00.49Z", true),
            ("2024-06-15T12:00:01Z", false),
        ] {
            assert_eq!(super::ended(end, now), Some(ended_by_now), "{end}");
        }
    }

    #[test]
    fn a_hostile_group_cannot_make_the_warnings_unbounded() {
        // The warnings go into the job's record (stored, read at every status poll) and the
        // error file: one per garbled member of a Group of millions would be millions.
        let members: Vec<Value> = (0..5_000)
            .map(|i| {
                json!({ "entity": { "reference": format!("Patient/p{i}") },
                        "period": { "end": "garbage" } })
            })
            .chain((0..5_000).map(|i| member(&format!("Group/missing{i}"))))
            .collect();
        let groups = HashMap::from([("g", json!({ "id": "g", "member": members }))]);
        let got = block_on(run(&groups, "g", &RULES)).unwrap().unwrap();
        assert_eq!(got.patients.len(), 5_000);
        assert_eq!(
            got.warnings.len(),
            MAX_WARNINGS + 1,
            "{:?}",
            &got.warnings[..3]
        );
        assert!(
            got.warnings[0].contains("\"garbage\""),
            "{}",
            got.warnings[0]
        );
        let last = got.warnings.last().unwrap();
        assert!(
            last.contains(&(10_000 - MAX_WARNINGS).to_string()),
            "{last}"
        );
    }

    #[test]
    fn a_hostile_group_cannot_make_the_kick_off_read_groups_without_end() {
        // The depth bound does not bound the breadth: a Group naming 100 000 others would make
        // the kick-off request read every one of them from the upstream, one after the other.
        let nested = MAX_GROUP_READS + 500;
        let mut groups: HashMap<String, Value> = (0..nested)
            .map(|i| {
                (
                    format!("n{i}"),
                    json!({ "id": format!("n{i}"), "member": [member(&format!("Patient/p{i}"))] }),
                )
            })
            .collect();
        let members: Vec<Value> = (0..nested)
            .map(|i| member(&format!("Group/n{i}")))
            .collect();
        groups.insert("top".into(), json!({ "id": "top", "member": members }));
        let reads = std::cell::Cell::new(0usize);
        let got = block_on(resolve("top", now(), &RULES, |g: String| {
            reads.set(reads.get() + 1);
            let found = groups.get(&g).cloned();
            async move { Ok::<_, String>(found) }
        }))
        .unwrap()
        .unwrap();
        assert_eq!(reads.get(), MAX_GROUP_READS);
        assert_eq!(got.patients.len(), MAX_GROUP_READS - 1);
        assert!(
            got.warnings.iter().any(|w| w.contains("not followed")),
            "{:?}",
            &got.warnings[..3]
        );
    }

    #[test]
    fn nested_groups_are_followed_to_the_depth_bound_once_each() {
        let groups = HashMap::from([
            (
                "top",
                json!({ "id": "top", "member": [member("Patient/1"), member("Group/a"),
                    member("Group/b"), member("Group/top")] }),
            ),
            (
                "a",
                json!({ "id": "a", "member": [member("Patient/2"), member("Patient/1"),
                    member("Group/deep")] }),
            ),
            (
                "b",
                json!({ "id": "b", "member": [member("Patient/3"), member("Group/a")] }),
            ),
            (
                "deep",
                json!({ "id": "deep", "member": [member("Patient/4"), member("Group/deeper")] }),
            ),
            (
                "deeper",
                json!({ "id": "deeper", "member": [member("Patient/5")] }),
            ),
        ]);
        let got = block_on(run(&groups, "top", &RULES)).unwrap().unwrap();
        assert_eq!(got.patients, ["1", "2", "3", "4"]);
        assert_eq!(got.warnings.len(), 1, "{:?}", got.warnings);
        assert!(
            got.warnings[0].starts_with("Group/deeper"),
            "{:?}",
            got.warnings
        );

        let flat = MemberRules {
            max_depth: 0,
            ..RULES
        };
        let got = block_on(run(&groups, "top", &flat)).unwrap().unwrap();
        assert_eq!(got.patients, ["1"]);
        assert_eq!(got.warnings.len(), 2, "Group/a and Group/b not followed");
    }

    #[test]
    fn a_missing_nested_group_is_reported_and_an_unreadable_one_fails() {
        let groups = HashMap::from([
            (
                "top",
                json!({ "id": "top", "member": [member("Patient/1"), member("Group/missing")] }),
            ),
            (
                "shaky",
                json!({ "id": "shaky", "member": [member("Patient/1"), member("Group/broken")] }),
            ),
        ]);
        let got = block_on(run(&groups, "top", &RULES)).unwrap().unwrap();
        assert_eq!(got.patients, ["1"]);
        assert!(
            got.warnings[0].starts_with("Group/missing"),
            "{:?}",
            got.warnings
        );
        assert_eq!(block_on(run(&groups, "nowhere", &RULES)).unwrap(), None);
        assert_eq!(
            block_on(run(&groups, "shaky", &RULES)).unwrap_err(),
            "cannot read Group/broken"
        );
    }
}
