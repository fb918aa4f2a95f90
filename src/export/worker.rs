//! Export workers: claim units and page through the upstream with a checkpoint after each page;
//! the worker that finishes a job's last unit finalises the job ([`super::finalize`]). The
//! [`Exporter`] also runs the sweeper ([`super::sweep`]).
//!
//! Exactness (DESIGN "Exact output"): a checkpoint (next link, committed file sizes, the last
//! `meta.lastUpdated` and the ids written with it) is saved only after the page's lines are durable;
//! a resumed unit truncates its files to the checkpoint and carries on from the saved `next` link.
//! When that link has expired, the unit re-queries with `_lastUpdated=ge{last}` (the searches are
//! sorted by `_lastUpdated`) and skips the ids it already wrote with that timestamp — or, when it
//! could not track them, starts the unit again from scratch on empty files.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ndjson::{Line, read_page};
use super::pager::{FetchError, Pager};
use super::writer::UnitWriter;
use crate::config::ExportConfig;
use crate::job::{Checkpoint, Job, JobState, OutputFile, Unit, UnitState, now_unix};
use crate::storage::{Storage, StorageError};
use crate::store::JobStore;
use crate::telemetry::metrics;

/// Ids tracked at the last `meta.lastUpdated`; past this a unit restarts from scratch when its
/// cursor expires (bounded checkpoints even when an upstream stamps everything alike).
const MAX_TRACKED_IDS: usize = 5_000;
/// Expired cursors tolerated per unit before it fails (an upstream that expires every cursor).
const MAX_EXPIRIES: u32 = 20;

pub struct Exporter {
    pub store: Arc<dyn JobStore>,
    pub storage: Storage,
    pub pager: Arc<Pager>,
    pub(super) config: ExportConfig,
    /// Unique per process start: names its workers, finishers and sweeper in leases and claims.
    pub(super) process_id: String,
    pub(super) fault: Option<Fault>,
    wake: Notify,
}

/// A fault a test injects into a proxy process (`FBP_TEST_FAULT`, read by debug builds only: a
/// release binary has no way to turn it on, so it cannot hurt production). Tests use it to kill a
/// process mid-finalisation and to make finalisation fail, neither of which can be provoked from
/// outside reliably (a test cannot time a SIGKILL to land between the merge and the commit, and
/// permissions do not stop a process that runs as root from writing the storage directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `finalize-hang`: every finalisation stops for ever once its files are written, before it
    /// commits (the test then sends SIGKILL).
    FinalizeHang,
    /// `finalize-fail`: every finalisation attempt fails at that point with a storage error.
    FinalizeFail,
}

impl Fault {
    #[cfg(debug_assertions)]
    fn from_env() -> Option<Self> {
        let fault = match std::env::var("FBP_TEST_FAULT").ok()?.as_str() {
            "finalize-hang" => Self::FinalizeHang,
            "finalize-fail" => Self::FinalizeFail,
            other => {
                tracing::warn!(fault = other, "unknown FBP_TEST_FAULT ignored");
                return None;
            }
        };
        tracing::warn!(?fault, "test fault injection is on (FBP_TEST_FAULT)");
        Some(fault)
    }

    #[cfg(not(debug_assertions))]
    fn from_env() -> Option<Self> {
        None
    }
}

impl Exporter {
    pub fn new(
        store: Arc<dyn JobStore>,
        storage: Storage,
        pager: Pager,
        config: ExportConfig,
    ) -> Self {
        Self {
            store,
            storage,
            pager: Arc::new(pager),
            config,
            process_id: uuid::Uuid::new_v4().to_string(),
            fault: Fault::from_env(),
            wake: Notify::new(),
        }
    }

    /// Wakes idle workers (a job was just created).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Finalises a job in the background: one with no units, which no worker will finish. The
    /// sweeper would, later; this makes its empty manifest ready at once.
    pub fn finalize_soon(self: &Arc<Self>, job_id: String) {
        let this = self.clone();
        let finisher = format!("{}-kickoff", self.process_id);
        tokio::spawn(async move {
            this.finalize(&job_id, &finisher, &CancellationToken::new())
                .await;
        });
    }

    /// Starts `export.workers` workers and the sweeper; they stop when `shutdown` is cancelled,
    /// releasing the units they hold so another replica carries on at once.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut handles: Vec<_> = (0..self.config.workers)
            .map(|slot| {
                let this = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { this.work(slot, shutdown).await })
            })
            .collect();
        let this = self.clone();
        handles.push(tokio::spawn(
            async move { this.sweep_forever(shutdown).await },
        ));
        handles
    }

    async fn work(&self, slot: usize, shutdown: CancellationToken) {
        let worker = format!("{}-{slot}", self.process_id);
        while !shutdown.is_cancelled() {
            let now = now_unix();
            match self
                .store
                .claim_unit(&worker, now, now + self.config.lease_secs)
                .await
            {
                Ok(Some(unit)) => {
                    let _active = metrics::unit_claimed();
                    let span = tracing::info_span!("unit", job = %unit.job_id, unit = unit.index, r#type = %unit.resource_type);
                    tracing::Instrument::instrument(self.run_unit(unit, &worker, &shutdown), span)
                        .await;
                }
                Ok(None) => {
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim work; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
    }

    async fn run_unit(&self, mut unit: Unit, worker: &str, shutdown: &CancellationToken) {
        let job = match self.store.get_job(&unit.job_id).await {
            Ok(Some(job)) if job.state == JobState::Running => job,
            Ok(_) => return self.discard_unit_files(&unit).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the job; leaving the unit to its lease");
                return;
            }
        };
        let upper = upper_bound(&job);
        let writer = UnitWriter::resume(
            &self.storage,
            &job.id,
            format!("{}.u{}", unit.resource_type, unit.index),
            &unit.resource_type,
            (self.config.max_file_bytes, self.config.max_file_resources),
            unit.checkpoint.files.clone(),
        )
        .await;
        let mut writer = match writer {
            Ok(writer) => writer,
            Err(e) => return self.storage_failed(&unit, worker, shutdown, &e).await,
        };
        // `unit.checkpoint` is what is committed (durable and saved); `progress` runs ahead of it
        // while written pages are not durable yet (object storage buffers up to a part).
        let mut progress = unit.checkpoint.clone();
        let mut expiries = 0;
        let mut prefetch: Option<Prefetch> = None;
        loop {
            if shutdown.is_cancelled() {
                let _ = self.store.release_unit(&unit, worker).await;
                return;
            }
            let (url, is_next) = match (&progress.next, progress.pages) {
                (Some(next), _) => (next.clone(), true),
                (None, 0) => {
                    let lower = job.since.as_deref().map(|s| ("gt", s));
                    (self.pager.search_url(&unit.search, lower, &upper), false)
                }
                (None, _) => break,
            };
            let fetched = {
                // The page fetched ahead while the last one was written, if it is this one.
                let ahead = prefetch.take().filter(|p| p.url == url);
                let fetch = async {
                    match ahead {
                        Some(mut ahead) => (&mut ahead.handle).await.unwrap_or_else(|e| {
                            Err(FetchError::Exhausted {
                                attempts: 0,
                                last: e.to_string(),
                            })
                        }),
                        None => self.pager.fetch(&url, is_next).await,
                    }
                };
                tokio::pin!(fetch);
                // Heartbeat: a page that takes longer than the lease (a slow upstream, retries)
                // must not let another replica take the unit over.
                let mut beat =
                    tokio::time::interval(Duration::from_secs((self.config.lease_secs / 3).max(1)));
                beat.tick().await;
                loop {
                    tokio::select! {
                        result = &mut fetch => break Some(result),
                        () = shutdown.cancelled() => break None,
                        _ = beat.tick() => {
                            unit.lease_until = now_unix() + self.config.lease_secs;
                            if let Ok(false) = self.store.save_unit(&unit, worker).await {
                                return self.lost(&unit).await;
                            }
                        }
                    }
                }
            };
            let Some(fetched) = fetched else {
                // SIGTERM: give the unit back at once; another replica resumes from the last
                // checkpoint (pages not durable yet are fetched again there).
                let _ = self.store.release_unit(&unit, worker).await;
                return;
            };
            let body = match fetched {
                Ok(body) => body,
                Err(FetchError::Expired(status)) if expiries < MAX_EXPIRIES => {
                    expiries += 1;
                    tracing::info!(%status, "upstream cursor expired; resuming with a bounded query");
                    if !self
                        .requery(&mut unit, &mut progress, &mut writer, &upper, worker)
                        .await
                    {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    unit.state = UnitState::Failed;
                    unit.error = Some(format!("search {} failed: {e}", unit.search));
                    break;
                }
            };
            let content = match read_page(&body, &unit.resource_type, &job.elements) {
                Ok(content) => content,
                Err(e) => {
                    unit.state = UnitState::Failed;
                    unit.error = Some(format!("search {} failed: {e}", unit.search));
                    break;
                }
            };
            let next = content.next.and_then(|n| self.pager.resolve_next(&url, &n));
            // Ask for the next page now, so the upstream works while this one is written and
            // checkpointed (DESIGN "Performance notes"); a crash only wastes that request.
            prefetch = next.clone().map(|url| Prefetch::start(&self.pager, url));
            let lines = skip_already_written(content.lines, &progress);
            let durable = match writer.write(&lines).await {
                Ok(durable) => durable,
                Err(e) => return self.storage_failed(&unit, worker, shutdown, &e).await,
            };
            track_last_updated(&mut progress, &lines);
            progress.issues.extend(content.issues);
            progress.next = next;
            progress.pages += 1;
            if durable {
                progress.files = writer.files().to_vec();
                unit.checkpoint = progress.clone();
            }
            // Saved after every page, durable or not, to keep the lease.
            unit.lease_until = now_unix() + self.config.lease_secs;
            match self.store.save_unit(&unit, worker).await {
                Ok(true) => metrics::page_written(&unit.resource_type, lines.len()),
                Ok(false) => return self.lost(&unit).await,
                Err(e) => {
                    // Redis unreachable and the like: the lease will lapse and the unit resume
                    // from its last saved checkpoint (pages after it are written again).
                    tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                    return;
                }
            }
            if durable {
                if let Err(e) = writer.settle().await {
                    return self.storage_failed(&unit, worker, shutdown, &e).await;
                }
                progress.files = writer.files().to_vec();
                unit.checkpoint.files = progress.files.clone();
            }
        }
        // What was fetched is kept, also when the unit failed: seal the files, commit that, and
        // only then complete the uploads.
        if let Err(e) = writer.finish().await {
            return self.storage_failed(&unit, worker, shutdown, &e).await;
        }
        progress.files = writer.files().to_vec();
        unit.checkpoint = progress;
        if self.storage.part_size().is_some() {
            match self.store.save_unit(&unit, worker).await {
                Ok(true) => {}
                Ok(false) => return self.lost(&unit).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                    return;
                }
            }
            if let Err(e) = writer.settle().await {
                return self.storage_failed(&unit, worker, shutdown, &e).await;
            }
            unit.checkpoint.files = writer.files().to_vec();
        }
        if unit.state != UnitState::Failed {
            unit.state = UnitState::Done;
        }
        self.finish(&unit, worker, shutdown).await;
    }

    /// The delay before retrying after failed attempt `attempt` (1-based) of our own work
    /// (finalising, writing files): `export.retry_base_ms` doubled per attempt, at most
    /// `export.retry_max_ms`.
    pub(super) fn retry_backoff(&self, attempt: u32) -> Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        Duration::from_millis(
            self.config
                .retry_base_ms
                .saturating_mul(factor)
                .min(self.config.retry_max_ms),
        )
    }

    /// Records `unit` as finished (Done or Failed); the worker that finishes a job's last unit
    /// finalises the job.
    async fn finish(&self, unit: &Unit, worker: &str, shutdown: &CancellationToken) {
        let finished = self.store.finish_unit(unit, worker).await;
        if let Ok(Some(_)) = finished {
            metrics::unit_finished(match unit.state {
                UnitState::Failed => "failed",
                _ => "done",
            });
        }
        match finished {
            Ok(Some(0)) => self.finalize(&unit.job_id, worker, shutdown).await,
            Ok(Some(_)) => {}
            Ok(None) => self.lost(unit).await,
            Err(e) => tracing::warn!(
                error = %e,
                "cannot record the finished unit; it is resumed, or the sweeper finalises the job"
            ),
        }
    }

    /// A storage failure is not the unit's fault: the unit is given back (with its committed
    /// checkpoint) for another attempt after a backoff, held meanwhile so that no worker retries
    /// it at once. After `export.retry_max_attempts` failures, counted in the store across workers
    /// and replicas, the unit fails with the storage's error, so that the job ends (DESIGN "Every
    /// job ends": wrong S3 credentials or a full disk fail the export instead of retrying it for
    /// ever). Unless the job was deleted meanwhile: removing its files under a writer is what made
    /// the write fail, and the unit just stops.
    async fn storage_failed(
        &self,
        unit: &Unit,
        worker: &str,
        shutdown: &CancellationToken,
        error: &StorageError,
    ) {
        if let Ok(None) = self.store.get_job(&unit.job_id).await {
            tracing::debug!(error = %error, "job deleted while its files were written; unit stopped");
            return self.discard_unit_files(unit).await;
        }
        let mut unit = unit.clone();
        unit.storage_failures += 1;
        if unit.storage_failures >= self.config.retry_max_attempts {
            tracing::error!(error = %error, failures = unit.storage_failures, "cannot write export files; the unit fails");
            unit.state = UnitState::Failed;
            unit.error = Some(format!(
                "search {} failed: the export files could not be written: {error}",
                unit.search
            ));
            return self.finish(&unit, worker, shutdown).await;
        }
        let backoff = self
            .retry_backoff(unit.storage_failures)
            // The unit stays this worker's while it waits: within its lease.
            .min(Duration::from_secs(self.config.lease_secs / 2));
        tracing::error!(error = %error, failures = unit.storage_failures, retry_in_ms = backoff.as_millis() as u64, "cannot write export files; retrying the unit");
        unit.lease_until = now_unix() + self.config.lease_secs;
        match self.store.save_unit(&unit, worker).await {
            Ok(true) => {}
            Ok(false) => return self.lost(&unit).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the unit; its lease lapses");
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => {}
        }
        let _ = self.store.release_unit(&unit, worker).await;
    }

    /// The unit's next query after an expired cursor; false when the unit must stop.
    async fn requery(
        &self,
        unit: &mut Unit,
        progress: &mut Checkpoint,
        writer: &mut UnitWriter<'_>,
        upper: &str,
        worker: &str,
    ) -> bool {
        match progress.last_updated.clone() {
            Some(last) => {
                progress.next = Some(self.pager.search_url(
                    &unit.search,
                    Some(("ge", &last)),
                    upper,
                ));
                true
            }
            None => {
                // Nothing identifies where the unit was: start again on empty files. The reset
                // is committed before the files go, so no checkpoint points at deleted files.
                unit.checkpoint = Checkpoint::default();
                *progress = Checkpoint::default();
                match self.store.save_unit(unit, worker).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.lost(unit).await;
                        return false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                        return false;
                    }
                }
                writer.discard_all().await;
                true
            }
        }
    }

    /// The lease was lost: another worker has the unit, or the job was deleted.
    async fn lost(&self, unit: &Unit) {
        metrics::lease_lost();
        match self.store.get_job(&unit.job_id).await {
            Ok(None) => {
                tracing::debug!("job deleted; unit stopped");
                self.discard_unit_files(unit).await;
            }
            _ => tracing::info!("lease lost; another worker carries on"),
        }
    }

    async fn discard_unit_files(&self, unit: &Unit) {
        for file in &unit.checkpoint.files {
            let _ = self.storage.discard(&unit.job_id, file).await;
        }
        self.remove_if_deleted(&unit.job_id, &unit.checkpoint.files)
            .await;
    }

    /// Removes every file of `job_id` if the job is gone. A DELETE removes the job's files once,
    /// but a worker or finisher writing at that moment may create them again; whoever finds the
    /// job gone after writing calls this, so the last writer leaves nothing behind. `files` are
    /// the ones this caller knows of (their unfinished uploads are aborted). True when the job
    /// is gone.
    pub(super) async fn remove_if_deleted(&self, job_id: &str, files: &[OutputFile]) -> bool {
        if !matches!(self.store.get_job(job_id).await, Ok(None)) {
            return false;
        }
        if let Err(e) = self.storage.delete_job(job_id, files).await {
            tracing::debug!(job = %job_id, error = %e, "files of a deleted job not all removed yet; their writer removes them");
        }
        true
    }
}

/// A page requested ahead of time; aborted if dropped unused (cancel, shutdown, lost lease).
struct Prefetch {
    url: String,
    handle: tokio::task::JoinHandle<Result<bytes::Bytes, FetchError>>,
}

impl Prefetch {
    fn start(pager: &Arc<Pager>, url: String) -> Self {
        let pager = pager.clone();
        let target = url.clone();
        Self {
            url,
            handle: tokio::spawn(async move { pager.fetch(&target, true).await }),
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The searches' upper `_lastUpdated` bound: `transactionTime`, or `_until` when earlier.
fn upper_bound(job: &Job) -> String {
    match &job.until {
        Some(until) if instant(until) < instant(&job.transaction_time) => until.clone(),
        _ => job.transaction_time.clone(),
    }
}

fn instant(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Drops lines a resumed unit already wrote (same `lastUpdated` as the checkpoint, known id).
fn skip_already_written(lines: Vec<Line>, cp: &Checkpoint) -> Vec<Line> {
    let Some(last) = &cp.last_updated else {
        return lines;
    };
    lines
        .into_iter()
        .filter(|line| {
            !(line.last_updated.as_ref() == Some(last)
                && line
                    .id
                    .as_ref()
                    .is_some_and(|id| cp.ids_at_last_updated.contains(id)))
        })
        .collect()
}

/// Moves the checkpoint's `lastUpdated` mark past the lines just written.
fn track_last_updated(cp: &mut Checkpoint, lines: &[Line]) {
    for line in lines {
        let (Some(updated), Some(id)) = (&line.last_updated, &line.id) else {
            continue;
        };
        match cp
            .last_updated
            .as_ref()
            .map(|last| (instant(updated), instant(last)))
        {
            None if cp.pages > 0 || !cp.ids_at_last_updated.is_empty() => {}
            Some((Some(new), Some(old))) if new < old => {}
            Some((Some(new), Some(old))) if new == old => {
                if cp.ids_at_last_updated.len() >= MAX_TRACKED_IDS {
                    // Untrackable: fall back to a restart from scratch on expiry.
                    cp.last_updated = None;
                    cp.ids_at_last_updated = vec![String::new()];
                } else {
                    cp.ids_at_last_updated.push(id.clone());
                }
            }
            _ => {
                cp.last_updated = Some(updated.clone());
                cp.ids_at_last_updated = vec![id.clone()];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, updated: &str) -> Line {
        Line {
            id: Some(id.into()),
            last_updated: Some(updated.into()),
            bytes: vec![],
        }
    }

    #[test]
    fn the_last_updated_mark_tracks_ids_at_the_greatest_instant() {
        let mut cp = Checkpoint::default();
        track_last_updated(
            &mut cp,
            &[
                line("a", "2024-01-01T00:00:00Z"),
                line("b", "2024-01-02T00:00:00Z"),
                line("c", "2024-01-02T00:00:00Z"),
            ],
        );
        assert_eq!(cp.last_updated.as_deref(), Some("2024-01-02T00:00:00Z"));
        assert_eq!(cp.ids_at_last_updated, ["b", "c"]);
        let kept = skip_already_written(
            vec![
                line("b", "2024-01-02T00:00:00Z"),
                line("d", "2024-01-02T00:00:00Z"),
                line("e", "2024-01-03T00:00:00Z"),
            ],
            &cp,
        );
        let ids: Vec<_> = kept.iter().map(|l| l.id.clone().unwrap()).collect();
        assert_eq!(ids, ["d", "e"]);
    }

    #[test]
    fn a_resource_without_last_updated_after_tracking_started_stops_nothing() {
        let mut cp = Checkpoint::default();
        track_last_updated(&mut cp, &[line("a", "2024-01-01T00:00:00Z")]);
        let mut no_meta = line("z", "");
        no_meta.last_updated = None;
        track_last_updated(&mut cp, &[no_meta]);
        assert_eq!(cp.ids_at_last_updated, ["a"]);
    }
}
