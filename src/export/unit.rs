//! The unit runner: pages through one unit's search, appends each page's lines to the unit's part
//! files and commits a checkpoint once they are durable; `UnitProgress` is the one place the
//! unit's progress is kept. Storage failures are retried with a backoff, then fail the unit.
//!
//! Exactness (DESIGN "Exact output"): a checkpoint (next link, committed file sizes, the last
//! `meta.lastUpdated` and the ids written with it) is saved only after the page's lines are durable;
//! a resumed unit truncates its files to the checkpoint and carries on from the saved `next` link.
//! When that link has expired, the unit re-queries with `_lastUpdated=ge{last}` (the searches are
//! sorted by `_lastUpdated`) and skips the ids it already wrote with that timestamp — or, when it
//! could not track them, starts the unit again from scratch on empty files.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::exporter::Exporter;
use super::membership;
use super::ndjson::{Line, instant, read_page_where, within_bounds};
use super::pager::{FetchError, Pager};
use super::supporting::Collector;
use super::writer::UnitWriter;
use crate::job::{Checkpoint, Job, JobState, Unit, UnitState, now_unix};
use crate::storage::{Storage, StorageError};
use crate::telemetry::metrics;

/// Ids tracked at the last `meta.lastUpdated`; past this a unit restarts from scratch when its
/// cursor expires (bounded checkpoints even when an upstream stamps everything alike).
const MAX_TRACKED_IDS: usize = 5_000;
/// Expired cursors tolerated per unit before it fails (an upstream that expires every cursor).
const MAX_EXPIRIES: u32 = 20;

/// A unit and how far it is. The cursor and counters of the pages written run ahead in `ahead`;
/// the files are the writer's; the unit's checkpoint (what the store is sent) is a snapshot of
/// both, taken only when everything it names is durable (object storage buffers up to a part,
/// so written pages may not be yet).
pub(super) struct UnitProgress<'a> {
    unit: Unit,
    /// The next link, pages, `lastUpdated` mark and issues of every page written, durable or
    /// not. Its `files` stay empty: the writer's are the truth.
    ahead: Checkpoint,
    writer: UnitWriter<'a>,
    /// Patient and Group level: records the supporting resources the lines reference.
    references: Option<Collector>,
}

/// What the unit fetches next.
enum NextPage {
    /// The search itself: nothing was fetched yet.
    First,
    /// The upstream's link to the following page (or the bounded query after an expired one).
    Link(String),
    /// The last page is written.
    Done,
}

impl<'a> UnitProgress<'a> {
    /// Resumes `unit` from its committed checkpoint; its part files are truncated to it.
    async fn resume(
        storage: &'a Storage,
        job: &Job,
        unit: Unit,
        limits: (u64, u64),
        references: Option<Collector>,
    ) -> Result<UnitProgress<'a>, (Unit, StorageError)> {
        let writer = UnitWriter::resume(
            storage,
            &job.id,
            format!("{}.u{}", unit.resource_type, unit.index),
            &unit.resource_type,
            limits,
            unit.checkpoint.files.clone(),
        )
        .await;
        match writer {
            Ok(writer) => Ok(Self {
                ahead: Checkpoint {
                    files: Vec::new(),
                    ..unit.checkpoint.clone()
                },
                unit,
                writer,
                references,
            }),
            Err(e) => Err((unit, e)),
        }
    }

    fn unit(&self) -> &Unit {
        &self.unit
    }

    fn next_page(&self) -> NextPage {
        match (&self.ahead.next, self.ahead.pages) {
            (Some(next), _) => NextPage::Link(next.clone()),
            (None, 0) => NextPage::First,
            (None, _) => NextPage::Done,
        }
    }

    /// Extends the lease by `lease_secs` from now (saved with the unit's next save).
    fn extend_lease(&mut self, lease_secs: u64) {
        self.unit.lease_until = now_unix() + lease_secs;
    }

    /// The unit's search failed: the unit ends Failed with what was fetched so far.
    fn search_failed(&mut self, error: impl std::fmt::Display) {
        self.unit.state = UnitState::Failed;
        self.unit.error = Some(format!("search {} failed: {error}", self.unit.search));
    }

    /// Writes a page's lines, but those a resumed unit wrote already, and moves on to `next`.
    /// Returns the lines written and whether everything written is durable; if so, the
    /// checkpoint now covers it.
    async fn write_page(
        &mut self,
        lines: Vec<Line>,
        issues: Vec<String>,
        next: Option<String>,
    ) -> Result<(usize, bool), StorageError> {
        let lines = skip_already_written(lines, &self.ahead);
        let durable = self.writer.write(&lines).await?;
        track_last_updated(&mut self.ahead, &lines);
        if let Some(references) = &self.references {
            references.collect(&lines, &mut self.ahead.references);
        }
        self.ahead.issues.extend(issues);
        self.ahead.next = next;
        self.ahead.pages += 1;
        if durable {
            self.commit();
        }
        Ok((lines.len(), durable))
    }

    /// Completes sealed uploads (once the checkpoint that records them is saved).
    async fn settle(&mut self) -> Result<(), StorageError> {
        self.writer.settle().await?;
        self.commit();
        Ok(())
    }

    /// Makes everything durable and seals the files: the unit has no more lines.
    async fn finish(&mut self) -> Result<(), StorageError> {
        self.writer.finish().await?;
        self.commit();
        Ok(())
    }

    fn commit(&mut self) {
        self.unit.checkpoint = Checkpoint {
            files: self.writer.files().to_vec(),
            ..self.ahead.clone()
        };
    }

    /// Continues from `query` (a bounded search after an expired cursor).
    fn requery_from(&mut self, query: String) {
        self.ahead.next = Some(query);
    }

    /// Forgets everything written: the checkpoint is empty, the files are still there until
    /// [`Self::discard_files`], so that the reset can be committed before the files go.
    fn restart(&mut self) {
        self.unit.checkpoint = Checkpoint::default();
        self.ahead = Checkpoint::default();
    }

    async fn discard_files(&mut self) {
        self.writer.discard_all().await;
    }

    fn into_unit(self) -> Unit {
        self.unit
    }
}

impl Exporter {
    pub(super) async fn run_unit(&self, unit: Unit, worker: &str, shutdown: &CancellationToken) {
        let job = match self.store.get_job(&unit.job_id).await {
            Ok(Some(job)) if job.state == JobState::Running => job,
            Ok(_) => return self.discard_unit_files(&unit).await,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the job; leaving the unit to its lease");
                return;
            }
        };
        // A scan keeps what is in its patients' compartment.
        let members: Option<HashSet<String>> = if unit.members_only {
            match self.store.members(&job.id).await {
                Ok(members) if !members.is_empty() => Some(members.into_iter().collect()),
                Ok(_) => {
                    let mut unit = unit;
                    unit.state = UnitState::Failed;
                    unit.error = Some(format!(
                        "search {} failed: the job's patients are missing from the job store",
                        unit.search
                    ));
                    return self.finish(&unit, worker, shutdown).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the job's patients; leaving the unit to its lease");
                    return;
                }
            }
        } else {
            None
        };
        let resource_type = unit.resource_type.clone();
        let in_compartment = |json: &str| {
            members
                .as_ref()
                .is_none_or(|patients| membership::is_member_json(&resource_type, json, patients))
        };
        let keep: Option<&(dyn Fn(&str) -> bool + Sync)> =
            members.is_some().then_some(&in_compartment);
        let upper = upper_bound(&job);
        let limits = (self.config.max_file_bytes, self.config.max_file_resources);
        let references = Collector::for_job(&job, &self.pager);
        let mut progress =
            match UnitProgress::resume(&self.storage, &job, unit, limits, references).await {
                Ok(progress) => progress,
                Err((unit, e)) => return self.storage_failed(&unit, worker, shutdown, &e).await,
            };
        // An upstream without `_lastUpdated` search: the bounds are applied here instead.
        let unbounded = self
            .pager
            .lacks_last_updated(&progress.unit().resource_type)
            .await;
        let mut expiries = 0;
        let mut prefetch: Option<Prefetch> = None;
        loop {
            if shutdown.is_cancelled() {
                let _ = self.store.release_unit(progress.unit(), worker).await;
                return;
            }
            let (url, is_next) = match progress.next_page() {
                NextPage::Link(next) => (next, true),
                NextPage::First if unbounded => (
                    self.pager.unbounded_search_url(&progress.unit().search),
                    false,
                ),
                NextPage::First => {
                    let lower = job.since.as_deref().map(|s| ("gt", s));
                    let unit = progress.unit();
                    (self.pager.search_url(&unit.search, lower, &upper), false)
                }
                NextPage::Done => break,
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
                let mut beat = self.heartbeat().await;
                loop {
                    tokio::select! {
                        result = &mut fetch => break Some(result),
                        () = shutdown.cancelled() => break None,
                        _ = beat.tick() => {
                            progress.extend_lease(self.config.lease_secs);
                            if let Ok(false) = self.store.save_unit(progress.unit(), worker).await {
                                return self.lost(progress.unit()).await;
                            }
                        }
                    }
                }
            };
            let Some(fetched) = fetched else {
                // SIGTERM: give the unit back at once; another replica resumes from the last
                // checkpoint (pages not durable yet are fetched again there).
                let _ = self.store.release_unit(progress.unit(), worker).await;
                return;
            };
            let body = match fetched {
                Ok(body) => body,
                Err(FetchError::Expired(status)) if expiries < MAX_EXPIRIES => {
                    expiries += 1;
                    tracing::info!(%status, "upstream cursor expired; resuming with a bounded query");
                    if !self.requery(&mut progress, &upper, unbounded, worker).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    progress.search_failed(e);
                    break;
                }
            };
            let content = read_page_where(&body, &resource_type, &job.elements, keep);
            // The lines are copies: the page's body goes before they are written (peak memory).
            drop(body);
            let mut content = match content {
                Ok(content) => content,
                Err(e) => {
                    progress.search_failed(e);
                    break;
                }
            };
            if unbounded {
                content
                    .lines
                    .retain(|line| within_bounds(line, job.since.as_deref(), &upper));
            }
            // A `next` link to this very page (an upstream bug) would be followed forever.
            let next = content.next.and_then(|n| self.pager.resolve_next(&url, &n));
            // Ask for the next page now, so the upstream works while this one is written and
            // checkpointed (DESIGN "Performance notes"); a crash only wastes that request.
            prefetch = next.clone().map(|url| Prefetch::start(&self.pager, url));
            let (written, durable) = match progress
                .write_page(content.lines, content.issues, next)
                .await
            {
                Ok(written) => written,
                Err(e) => {
                    return self
                        .storage_failed(progress.unit(), worker, shutdown, &e)
                        .await;
                }
            };
            // Saved after every page, durable or not, to keep the lease.
            progress.extend_lease(self.config.lease_secs);
            match self.store.save_unit(progress.unit(), worker).await {
                Ok(true) => metrics::page_written(&progress.unit().resource_type, written),
                Ok(false) => return self.lost(progress.unit()).await,
                Err(e) => {
                    // Redis unreachable and the like: the lease will lapse and the unit resume
                    // from its last saved checkpoint (pages after it are written again).
                    tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                    return;
                }
            }
            if durable && let Err(e) = progress.settle().await {
                return self
                    .storage_failed(progress.unit(), worker, shutdown, &e)
                    .await;
            }
        }
        // What was fetched is kept, also when the unit failed: seal the files, commit that, and
        // only then complete the uploads.
        if let Err(e) = progress.finish().await {
            return self
                .storage_failed(progress.unit(), worker, shutdown, &e)
                .await;
        }
        if self.storage.part_size().is_some() {
            match self.store.save_unit(progress.unit(), worker).await {
                Ok(true) => {}
                Ok(false) => return self.lost(progress.unit()).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                    return;
                }
            }
            if let Err(e) = progress.settle().await {
                return self
                    .storage_failed(progress.unit(), worker, shutdown, &e)
                    .await;
            }
        }
        let mut unit = progress.into_unit();
        if unit.state != UnitState::Failed {
            unit.state = UnitState::Done;
        }
        self.finish(&unit, worker, shutdown).await;
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

    /// Points the unit at its next query after an expired cursor; false when the unit must stop.
    /// `unbounded`: the upstream cannot search by `_lastUpdated`, so the unit starts again.
    async fn requery(
        &self,
        progress: &mut UnitProgress<'_>,
        upper: &str,
        unbounded: bool,
        worker: &str,
    ) -> bool {
        match progress.ahead.last_updated.clone().filter(|_| !unbounded) {
            Some(last) => {
                let query =
                    self.pager
                        .search_url(&progress.unit().search, Some(("ge", &last)), upper);
                progress.requery_from(query);
                true
            }
            None => {
                // Nothing identifies where the unit was: start again on empty files. The reset
                // is committed before the files go, so no checkpoint points at deleted files.
                progress.restart();
                match self.store.save_unit(progress.unit(), worker).await {
                    Ok(true) => {}
                    Ok(false) => {
                        self.lost(progress.unit()).await;
                        return false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save the checkpoint; stopping this unit");
                        return false;
                    }
                }
                progress.discard_files().await;
                true
            }
        }
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
            Some((Some(new), Some(old))) if new < old => {
                // Out of `_lastUpdated` order: the upstream ignores `_sort`, so a query from the
                // mark could miss earlier resources not written yet. Untrackable: a restart from
                // scratch on expiry instead.
                cp.last_updated = None;
                cp.ids_at_last_updated = vec![String::new()];
            }
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
    fn lines_out_of_last_updated_order_make_the_mark_untrackable() {
        let mut cp = Checkpoint::default();
        track_last_updated(
            &mut cp,
            &[
                line("b", "2024-01-02T00:00:00Z"),
                line("a", "2024-01-01T00:00:00Z"),
            ],
        );
        assert_eq!(cp.last_updated, None);
        cp.pages = 1;
        track_last_updated(&mut cp, &[line("c", "2024-01-03T00:00:00Z")]);
        assert_eq!(cp.last_updated, None, "stays untrackable");
    }

    #[test]
    fn bounds_apply_to_meta_last_updated_and_keep_what_has_none() {
        let upper = "2024-01-03T00:00:00Z";
        let since = Some("2024-01-01T00:00:00+00:00");
        let within = |l: &Line| within_bounds(l, since, upper);
        assert!(
            !within(&line("a", "2024-01-01T00:00:00Z")),
            "since is exclusive"
        );
        assert!(within(&line("b", "2024-01-01T00:00:00.001Z")));
        assert!(
            within(&line("c", "2024-01-03T01:00:00+01:00")),
            "upper is inclusive"
        );
        assert!(!within(&line("d", "2024-01-03T00:00:00.001Z")));
        let mut none = line("e", "");
        none.last_updated = None;
        assert!(within(&none));
        assert!(within_bounds(
            &line("f", "2000-01-01T00:00:00Z"),
            None,
            upper
        ));
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

#[cfg(test)]
mod reference_tests {
    use super::*;

    fn encounter(id: &str, organization: &str) -> Line {
        Line {
            id: Some(id.into()),
            last_updated: Some(format!("2024-01-01T00:00:0{}Z", id.len())),
            bytes: format!(
                r#"{{"resourceType":"Encounter","id":"{id}","serviceProvider":{{"reference":"{organization}"}}}}
"#
            )
            .into_bytes(),
        }
    }

    /// A unit resumed by another process (from its checkpoint, as stored) keeps the references of
    /// the pages it committed and adds those of the next; a restart from scratch forgets them with
    /// the files.
    #[tokio::test]
    async fn a_resumed_unit_keeps_the_references_of_its_committed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).unwrap();
        let mut config = crate::config::Config::default();
        config.upstream.url = "http://up/fhir".into();
        let pager = Pager::new(&config, Default::default()).unwrap();
        let job: Job = serde_json::from_value(serde_json::json!({
            "id": "j", "client_id": "c", "level": {"level": "patient"}, "request": "r",
            "transaction_time": "2026-01-01T00:00:00Z", "types": ["Encounter", "Organization"],
            "state": "running", "created_at": 0, "units_total": 1
        }))
        .unwrap();
        let resume = |unit: Unit| {
            UnitProgress::resume(
                &storage,
                &job,
                unit,
                (1 << 20, 1000),
                Collector::for_job(&job, &pager),
            )
        };
        let unit = Unit::new("j", 0, "Encounter", "Encounter?patient=p".into());
        let mut progress = resume(unit).await.unwrap_or_else(|(_, e)| panic!("{e}"));
        let (_, durable) = progress
            .write_page(
                vec![encounter("e1", "Organization/a")],
                vec![],
                Some("http://up/fhir?page=2".into()),
            )
            .await
            .unwrap();
        assert!(durable);
        let stored = serde_json::to_string(&progress.into_unit()).unwrap();

        let unit: Unit = serde_json::from_str(&stored).unwrap();
        let mut progress = resume(unit).await.unwrap_or_else(|(_, e)| panic!("{e}"));
        progress
            .write_page(
                vec![
                    encounter("e22", "http://up/fhir/Organization/b"),
                    encounter("e333", "Location/x"),
                ],
                vec![],
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            progress.unit().checkpoint.references,
            ["Organization/a".to_owned(), "Organization/b".to_owned()].into()
        );
        progress.restart();
        assert!(progress.unit().checkpoint.references.is_empty());
    }
}
