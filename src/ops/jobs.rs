//! `fhir-bulk-proxy jobs`: what an operator sees of the export jobs in the configured job store
//! (embedded file or Redis), without a client's token or status URL.
//!
//! - `jobs list [--json]`: every job, one line (or one JSON object) each;
//! - `jobs show ID [--json]`: one job with its units, files and errors;
//! - `jobs cancel ID`: what the client's `DELETE` on the status URL does (Bulk Data IG, "Delete
//!   a Bulk Data Request"): the record goes, then its files ([`crate::export::cancel`], the one
//!   code path both use).
//!
//! The embedded store is a redb file that one process at a time may open: while a proxy runs on
//! it, these commands refuse with [`JobsError::InUse`] (stop the proxy, or use Redis, which any
//! number of processes share). Opening it for reading only would not help: redb's lock is
//! exclusive whatever the access.
//!
//! The JSON field names are stable (documented in the README, "Inspecting and cancelling jobs").

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use crate::config::{Config, StoreBackend};
use crate::job::{Job, JobState, Level, Progress, Unit, UnitState, UnixSecs, now_unix};
use crate::storage::Storage;
use crate::store::{JobStore, StoreError};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum JobsCommand {
    /// List every export job: id, client, level, state, progress, resources, age, expiry.
    List {
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: its units (searches), files and errors.
    Show {
        id: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job as its client's DELETE would: remove its record and its files.
    Cancel { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no export job {0}")]
    NotFound(String),
    #[error(
        "no job store at {} (nothing has run with this configuration yet, or store.path points elsewhere)",
        .0.display()
    )]
    NoStore(PathBuf),
    #[error(
        "the job store {} is in use by a running proxy: the embedded store admits one process at a time. \
         Stop the proxy and run this command again, or use the Redis store (store.backend = \"redis\"), \
         which the proxy and this command can share",
        .0.display()
    )]
    InUse(PathBuf),
    #[error(transparent)]
    Store(StoreError),
    #[error("cannot open the file storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

impl From<StoreError> for JobsError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::InUse(path) => Self::InUse(path),
            other => Self::Store(other),
        }
    }
}

/// One job as `jobs list --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    pub id: String,
    pub client: String,
    /// `system`, `Patient` or `Group/{id}`.
    pub level: String,
    /// `running`, `completed` or `failed`.
    pub state: JobState,
    /// Units (searches) finished, of `units_total`.
    pub units_done: u32,
    pub units_total: u32,
    /// Resources written: in the manifest's files once completed, in the units' part files before.
    pub resources_written: u64,
    /// Unix seconds.
    pub created_at: UnixSecs,
    pub age_secs: u64,
    /// Unix seconds; absent until the job completes.
    pub expires_at: Option<UnixSecs>,
}

/// A unit as `jobs show --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnitSummary {
    pub index: u32,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub search: String,
    pub state: UnitState,
    pub pages: u64,
    pub resources: u64,
    pub error: Option<String>,
}

/// A manifest file as `jobs show --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileSummary {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub name: String,
    pub count: u64,
    pub bytes: u64,
}

/// One job in full, as `jobs show --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    pub request: String,
    pub transaction_time: String,
    pub types: Vec<String>,
    /// Why the job failed.
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub units: Vec<UnitSummary>,
    /// The manifest's `output` and `error` files (set at completion).
    pub output: Vec<FileSummary>,
    pub error_files: Vec<FileSummary>,
}

/// Runs `command` on a runtime of its own and returns what to print (the binary's entry point).
pub fn execute(config: &Config, command: &JobsCommand) -> Result<String, JobsError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(config, command))
}

/// Runs `command` against the store and storage `config` names, and returns what to print.
pub async fn run(config: &Config, command: &JobsCommand) -> Result<String, JobsError> {
    // `jobs` never creates an embedded store: a missing file is a wrong path, not an empty store.
    if config.store.backend == StoreBackend::Embedded && !config.store.path.exists() {
        return Err(JobsError::NoStore(config.store.path.clone()));
    }
    let store = crate::store::open(&config.store).await?;
    let store = store.as_ref();
    match command {
        JobsCommand::List { json } => {
            let jobs = list(store).await?;
            Ok(match json {
                true => to_json(&jobs),
                false => table(&jobs, now_unix()),
            })
        }
        JobsCommand::Show { id, json } => {
            let detail = show(store, id).await?;
            Ok(match json {
                true => to_json(&detail),
                false => text(&detail, now_unix()),
            })
        }
        JobsCommand::Cancel { id } => {
            let storage = Storage::from_config(&config.storage)?;
            cancel(store, &storage, id).await?;
            Ok(format!(
                "export {id} cancelled: its record and files are deleted\n"
            ))
        }
    }
}

/// Every stored job, oldest first.
pub async fn list(store: &dyn JobStore) -> Result<Vec<JobSummary>, JobsError> {
    let now = now_unix();
    let mut jobs = Vec::new();
    for id in store.job_ids().await? {
        // Deleted between the two reads: not listed.
        let Some(job) = store.get_job(&id).await? else {
            continue;
        };
        let units = store.units(&id).await?;
        jobs.push(summary(&job, &units, now));
    }
    jobs.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(jobs)
}

/// One job with its units and files.
pub async fn show(store: &dyn JobStore, id: &str) -> Result<JobDetail, JobsError> {
    let job = store
        .get_job(id)
        .await?
        .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
    let units = store.units(id).await?;
    let files = |files: &[crate::job::OutputFile]| {
        files
            .iter()
            .map(|f| FileSummary {
                resource_type: f.resource_type.clone(),
                name: f.name.clone(),
                count: f.count,
                bytes: f.bytes,
            })
            .collect()
    };
    Ok(JobDetail {
        summary: summary(&job, &units, now_unix()),
        request: job.request.clone(),
        transaction_time: job.transaction_time.clone(),
        types: job.types.clone(),
        error: job.error.clone(),
        warnings: job.warnings.clone(),
        units: units
            .iter()
            .map(|u| UnitSummary {
                index: u.index,
                resource_type: u.resource_type.clone(),
                search: u.search.clone(),
                state: u.state,
                pages: u.checkpoint.pages,
                resources: u.resources(),
                error: u.error.clone(),
            })
            .collect(),
        output: files(&job.output),
        error_files: files(&job.error_files),
    })
}

/// Deletes a job and its files, as the client's DELETE on its status URL does.
pub async fn cancel(store: &dyn JobStore, storage: &Storage, id: &str) -> Result<(), JobsError> {
    let job = store
        .get_job(id)
        .await?
        .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
    if !crate::export::cancel::delete_job(store, storage, &job).await? {
        // Deleted by someone else (its client, the sweeper) since it was read.
        return Err(JobsError::NotFound(id.to_owned()));
    }
    tracing::info!(job = %id, "export cancelled by the operator");
    Ok(())
}

fn summary(job: &Job, units: &[Unit], now: UnixSecs) -> JobSummary {
    let progress = Progress::of(units);
    let (units_done, units_total) = match units.is_empty() {
        true => (job.units_done, job.units_total),
        false => (progress.done, progress.total),
    };
    JobSummary {
        id: job.id.clone(),
        client: job.client_id.clone(),
        level: match &job.level {
            Level::System => "system".into(),
            Level::Patient => "Patient".into(),
            Level::Group(id) => format!("Group/{id}"),
        },
        state: job.state,
        units_done,
        units_total,
        resources_written: match job.state {
            JobState::Completed => job.resources_written,
            _ => progress.resources.max(job.resources_written),
        },
        created_at: job.created_at,
        age_secs: now.saturating_sub(job.created_at),
        expires_at: job.expires_at,
    }
}

fn to_json(value: &impl Serialize) -> String {
    let mut out = serde_json::to_string_pretty(value).unwrap_or_default();
    out.push('\n');
    out
}

fn state_name(state: impl Serialize) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A duration as `2d3h`, `4h12m`, `5m30s` or `42s`: the two largest units.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn expiry(expires_at: Option<UnixSecs>, now: UnixSecs) -> String {
    match expires_at {
        None => "-".into(),
        Some(at) if at <= now => "expired".into(),
        Some(at) => format!("in {}", duration(at - now)),
    }
}

/// Aligned columns, the header first.
fn table(jobs: &[JobSummary], now: UnixSecs) -> String {
    let mut rows = vec![
        [
            "ID",
            "CLIENT",
            "LEVEL",
            "STATE",
            "PROGRESS",
            "RESOURCES",
            "AGE",
            "EXPIRES",
        ]
        .map(String::from),
    ];
    for job in jobs {
        rows.push([
            job.id.clone(),
            job.client.clone(),
            job.level.clone(),
            state_name(job.state),
            format!("{}/{}", job.units_done, job.units_total),
            job.resources_written.to_string(),
            duration(job.age_secs),
            expiry(job.expires_at, now),
        ]);
    }
    let mut widths = [0; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if jobs.is_empty() {
        out.push_str("(no jobs)\n");
    }
    out
}

fn text(job: &JobDetail, now: UnixSecs) -> String {
    let s = &job.summary;
    let mut out = String::new();
    let _ = writeln!(out, "job        {}", s.id);
    let _ = writeln!(out, "client     {}", s.client);
    let _ = writeln!(out, "level      {}", s.level);
    let _ = writeln!(out, "state      {}", state_name(s.state));
    let _ = writeln!(out, "request    {}", job.request);
    let _ = writeln!(out, "types      {}", job.types.join(","));
    let _ = writeln!(out, "txn time   {}", job.transaction_time);
    let _ = writeln!(
        out,
        "progress   {}/{} units, {} resources",
        s.units_done, s.units_total, s.resources_written
    );
    let _ = writeln!(out, "age        {}", duration(s.age_secs));
    let _ = writeln!(out, "expires    {}", expiry(s.expires_at, now));
    if let Some(error) = &job.error {
        let _ = writeln!(out, "error      {error}");
    }
    for warning in &job.warnings {
        let _ = writeln!(out, "warning    {warning}");
    }
    let _ = writeln!(out, "\nunits");
    for u in &job.units {
        let _ = writeln!(
            out,
            "  {:>3}  {:<8}  {} pages  {} resources  {}",
            u.index,
            state_name(u.state),
            u.pages,
            u.resources,
            u.search
        );
        if let Some(error) = &u.error {
            let _ = writeln!(out, "       error: {error}");
        }
    }
    for (title, files) in [("output", &job.output), ("error files", &job.error_files)] {
        if files.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{title}");
        for f in files {
            let _ = writeln!(
                out,
                "  {}  {}  {} resources  {} bytes",
                f.resource_type, f.name, f.count, f.bytes
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_show_the_two_largest_units() {
        assert_eq!(super::duration(42), "42s");
        assert_eq!(super::duration(330), "5m30s");
        assert_eq!(super::duration(4 * 3600 + 12 * 60 + 5), "4h12m");
        assert_eq!(super::duration(2 * 86_400 + 3 * 3600 + 59), "2d3h");
    }

    #[test]
    fn expiry_is_relative_to_now() {
        assert_eq!(super::expiry(None, 100), "-");
        assert_eq!(super::expiry(Some(100), 100), "expired");
        assert_eq!(super::expiry(Some(3700), 100), "in 1h0m");
    }
}
