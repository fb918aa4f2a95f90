//! The vocabulary that `export` and `store` share: an export [`Job`], its [`Unit`]s of work and
//! their [`Checkpoint`]s. Both stores persist these as JSON, so every field is serde-friendly and
//! new fields must have defaults (a rolling upgrade reads records written by the previous version).
//!
//! A job is split at kick-off into units (one search: a resource type × a patient batch or a
//! `_typeFilter` query). Workers on any replica claim units with a lease, page through the
//! upstream, append NDJSON lines to the unit's part files and commit a checkpoint after each page.

use serde::{Deserialize, Serialize};

/// Seconds since the Unix epoch.
pub type UnixSecs = u64;

/// Current time in Unix seconds.
pub fn now_unix() -> UnixSecs {
    now_millis() / 1000
}

/// Current time in Unix milliseconds (rate limits, fleet slots).
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Export level (Bulk Data IG: system, Patient, Group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "level", content = "id", rename_all = "lowercase")]
pub enum Level {
    System,
    Patient,
    Group(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Planned; units are being worked on.
    Running,
    /// Every unit finished; the manifest is ready.
    Completed,
    /// Nothing could be exported; `Job::error` says why.
    Failed,
}

/// One file of the manifest (`output` or `error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Resource type of every line (`OperationOutcome` for error files).
    #[serde(rename = "type")]
    pub resource_type: String,
    /// Storage key of the file, relative to the job (e.g. `Observation.1.ndjson`).
    pub name: String,
    /// Number of lines (resources).
    pub count: u64,
    pub bytes: u64,
    /// Object storage only: the file's multipart upload while it is not complete (absent for local
    /// files and for complete objects, so manifests never carry it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Upload>,
}

/// A multipart upload in progress, as committed in a checkpoint: a resumed writer continues it
/// with part number `parts.len()` instead of starting the file again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The upload id the object store gave.
    pub id: String,
    /// Every uploaded part's id (ETag), in order.
    pub parts: Vec<String>,
    /// All the file's bytes are uploaded; only the completion is left (done after the checkpoint
    /// that records this is saved, and again, idempotently, by whoever resumes).
    #[serde(default)]
    pub sealed: bool,
}

/// An export job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// The client that started it; only this client sees it.
    pub client_id: String,
    pub level: Level,
    /// The kick-off URL exactly as requested (the manifest's `request`).
    pub request: String,
    /// FHIR instant fixed at kick-off; every search is bounded above by it.
    pub transaction_time: String,
    /// `_since` and `_until` (normalised FHIR instants), the searches' `_lastUpdated` bounds.
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// Resource types the job exports (after `_type`, scopes and upstream support).
    pub types: Vec<String>,
    /// Patient and Group level: the supporting types `_type` named (see `export::supporting`); one
    /// that nothing exported references is reported in the error file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named_supporting: Vec<String>,
    /// `_elements`, kept for the writers.
    #[serde(default)]
    pub elements: Vec<String>,
    pub state: JobState,
    pub created_at: UnixSecs,
    #[serde(default)]
    pub completed_at: Option<UnixSecs>,
    /// When the job and its files are deleted (set at completion).
    #[serde(default)]
    pub expires_at: Option<UnixSecs>,
    /// Number of units.
    pub units_total: u32,
    /// Units finished, and resources in the manifest's output files (after duplicates across
    /// searches are removed): set when the finaliser commits the job's files, 0 before (and for a
    /// job it gave up on). `X-Progress` counts from the units instead ([`Progress`]), as the `jobs`
    /// command does while the units are there.
    #[serde(default)]
    pub units_done: u32,
    #[serde(default)]
    pub resources_written: u64,
    /// OperationOutcome diagnostics known at kick-off (ignored parameters under lenient handling,
    /// unknown patients...), written to the error file at completion.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The manifest's files, set at completion.
    #[serde(default)]
    pub output: Vec<OutputFile>,
    #[serde(default)]
    pub error_files: Vec<OutputFile>,
    /// Why the job failed (state `Failed`).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    Pending,
    Running,
    Done,
    Failed,
}

/// Where a unit stands: enough to resume after a crash without loss or duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The upstream's `next` link for the following page (absent before the first page and after
    /// the last).
    #[serde(default)]
    pub next: Option<String>,
    /// Pages committed.
    #[serde(default)]
    pub pages: u64,
    /// The unit's part files and their committed sizes; bytes past `bytes` are discarded on resume.
    #[serde(default)]
    pub files: Vec<OutputFile>,
    /// The greatest `meta.lastUpdated` written, and the ids written with exactly that value: a
    /// unit whose paging cursor expired resumes with `_lastUpdated=ge{last_updated}` and skips them.
    #[serde(default)]
    pub last_updated: Option<String>,
    #[serde(default)]
    pub ids_at_last_updated: Vec<String>,
    /// OperationOutcome lines to report for this unit (page-level problems).
    #[serde(default)]
    pub issues: Vec<String>,
    /// Patient and Group level: the supporting resources (`Type/id`, the job's types outside the
    /// Patient compartment) that the lines written so far reference; the finaliser fetches their
    /// union over the job's units.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub references: std::collections::BTreeSet<String>,
}

/// One search of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unit {
    pub job_id: String,
    /// Position within the job (0-based); also names the unit's part files.
    pub index: u32,
    pub resource_type: String,
    /// The search relative to the upstream base, e.g. `Observation?patient=a,b&code=x`, without
    /// `_count` and the `_lastUpdated` bounds (added by the pager).
    pub search: String,
    /// A type-level scan that keeps only the resources in the Patient compartment of the job's
    /// patients ([`crate::store::JobStore::members`]), decided from each resource
    /// (`export::membership`): how a Patient or Group export covering most patients is fetched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub members_only: bool,
    /// Resources the upstream counted for the search at kick-off (`_summary=count`): units are
    /// worked on largest first, and progress is told in percent. `None` when not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    pub state: UnitState,
    /// The worker holding the lease, and until when (Unix seconds).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub lease_until: UnixSecs,
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// Why the unit failed (state `Failed`).
    #[serde(default)]
    pub error: Option<String>,
    /// Attempts that failed to write the unit's files (not the upstream's fault); past
    /// `export.retry_max_attempts` the unit fails.
    #[serde(default)]
    pub storage_failures: u32,
}

impl Unit {
    pub fn new(job_id: &str, index: u32, resource_type: &str, search: String) -> Self {
        Self {
            job_id: job_id.to_owned(),
            index,
            resource_type: resource_type.to_owned(),
            search,
            members_only: false,
            expected: None,
            state: UnitState::Pending,
            owner: None,
            lease_until: 0,
            checkpoint: Checkpoint::default(),
            error: None,
            storage_failures: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, UnitState::Done | UnitState::Failed)
    }
}

/// How far a job's units are: what `X-Progress` and the `jobs` command report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Units finished (Done or Failed).
    pub done: u32,
    pub total: u32,
    /// Resources the units have written so far (before finalisation removes duplicates across
    /// searches).
    pub resources: u64,
    /// Resources the upstream counted for all the units at kick-off, when it counted every one
    /// and each unit writes what it fetches (a scan filtered by membership writes less).
    pub expected: Option<u64>,
}

impl Progress {
    pub fn of(units: &[Unit]) -> Self {
        Self {
            done: units.iter().filter(|u| u.is_finished()).count() as u32,
            total: units.len() as u32,
            resources: units.iter().map(Unit::resources).sum(),
            expected: units
                .iter()
                .map(|u| u.expected.filter(|_| !u.members_only))
                .sum(),
        }
    }

    /// `42% (16203 of 38473 resources), 3 of 18 searches done`; without counts, `3 of 18
    /// searches done, 16203 resources`. Below 100% until every search is done.
    pub fn describe(&self) -> String {
        let Progress {
            done,
            total,
            resources,
            expected,
        } = *self;
        match expected {
            Some(expected) if expected > 0 => {
                let percent = (resources.saturating_mul(100) / expected).min(if done < total {
                    99
                } else {
                    100
                });
                format!(
                    "{percent}% ({resources} of {expected} resources), {done} of {total} searches done"
                )
            }
            _ => format!("{done} of {total} searches done, {resources} resources"),
        }
    }
}

impl Unit {
    /// Resources written to the unit's part files so far.
    pub fn resources(&self) -> u64 {
        self.checkpoint.files.iter().map(|f| f.count).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_in_percent_when_every_search_was_counted() {
        let mut units = vec![
            Unit::new("j", 0, "Observation", "Observation".into()),
            Unit::new("j", 1, "Patient", "Patient".into()),
        ];
        units[0].expected = Some(300);
        units[1].expected = Some(100);
        units[0].checkpoint.files.push(OutputFile {
            resource_type: "Observation".into(),
            name: "o".into(),
            count: 300,
            bytes: 1,
            upload: None,
        });
        units[0].state = UnitState::Done;
        assert_eq!(
            Progress::of(&units).describe(),
            "75% (300 of 400 resources), 1 of 2 searches done"
        );
        // More written than counted (changes since the count): never 100% before the end.
        units[1].checkpoint = units[0].checkpoint.clone();
        assert!(
            Progress::of(&units)
                .describe()
                .starts_with("99% (600 of 400")
        );
        // A search not counted, or a scan (it keeps only part of what was counted): no percent.
        units[1].expected = None;
        assert_eq!(
            Progress::of(&units).describe(),
            "1 of 2 searches done, 600 resources"
        );
        units[1].expected = Some(100);
        units[1].members_only = true;
        assert!(!Progress::of(&units).describe().contains('%'));
    }
}
