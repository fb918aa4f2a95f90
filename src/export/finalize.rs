//! Finalisation: once every unit of a job is finished, one replica builds the manifest's files
//! (each resource id once per type where several searches fed it, and the error file) and commits
//! the job's final state. DESIGN "Every job ends": whatever dies when, some replica finishes it.
//!
//! - **One finisher at a time.** Finalising needs a claim in the store
//!   ([`JobStore::claim_finalize`](crate::store::JobStore::claim_finalize)) with a lease kept alive by a heartbeat. The worker that
//!   finishes the last unit claims it at once; a job submitted without units is claimed by the
//!   submitting process's finaliser task ([`Exporter::submit`]); every replica's sweeper also
//!   tries every Running job, so a job whose finisher died, or whose last unit's finish was
//!   recorded but not answered, is finalised once that lease lapses.
//! - **Repeatable.** An attempt only reads the units' part files, which stay until the job's final
//!   state is committed, and writes its own files (`{type}.f{attempt}.{n}.ndjson`,
//!   `errors.f{attempt}.0.ndjson`): an attempt cut short anywhere leaves its successor's inputs
//!   intact, and a finisher that lost its claim (stalled past its lease) cannot touch the files of
//!   the attempt that commits. Files of attempts that never commit go with the job.
//! - **Supporting resources.** At Patient and Group level the attempt also fetches the supporting
//!   resources the units' checkpoints reference ([`super::supporting`]) into its own
//!   `{type}.f{attempt}.{n}.ndjson`: an attempt cut short fetches them again.
//! - **One manifest.** The final state is committed by [`JobStore::complete_job`](crate::store::JobStore::complete_job), which only the
//!   claim's holder can do while the job is Running.
//! - **Bounded.** A failed attempt is retried after `export.retry_base_ms` (doubled per attempt,
//!   at most `export.retry_max_ms`); the store counts attempts across replicas and restarts, and
//!   after [`FINALIZE_ATTEMPTS`] the job is Failed: its status URL answers 500 with the reason
//!   (SPEC A6.5) and the client's export slot is free again.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;

use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::exporter::{Exporter, Fault};
use super::ndjson::Line;
use super::writer::UnitWriter;
use crate::fhir::OperationOutcome;
use crate::job::{Job, JobState, OutputFile, Unit, UnitState, now_unix};
use crate::storage::StorageError;
use crate::store::StoreError;
use crate::telemetry::metrics;

/// Attempts at finalising a job before it is Failed. Few: what fails here is local storage or the
/// store, and a job waiting on them holds its client's export slot.
pub const FINALIZE_ATTEMPTS: u32 = 5;

/// Why an attempt did not commit; the next attempt starts again from the part files.
#[derive(Debug, thiserror::Error)]
enum FinalizeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The files an attempt wrote.
struct Assembled {
    output: Vec<OutputFile>,
    errors: Vec<OutputFile>,
    /// Part files merged into `output`: removed once the job is committed.
    merged_parts: Vec<OutputFile>,
}

impl Exporter {
    /// The finaliser task: finalises the jobs [`Exporter::submit`] queued because they have no
    /// units, as soon as they are queued, until `shutdown`. Each on a task of its own, so that
    /// one backing off after a failed attempt does not hold up the jobs queued after it; at
    /// `shutdown` those stop too (their claims lapse, and a sweeper carries on) and are awaited.
    pub(super) async fn finalize_unitless_forever(self: Arc<Self>, shutdown: CancellationToken) {
        let finisher = format!("{}-unitless", self.process_id);
        let mut running = tokio::task::JoinSet::new();
        while !shutdown.is_cancelled() {
            let next = self.lock_unitless().pop_front();
            match next {
                Some(job_id) => {
                    let (this, finisher, shutdown) =
                        (self.clone(), finisher.clone(), shutdown.clone());
                    running
                        .spawn(async move { this.finalize(&job_id, &finisher, &shutdown).await });
                }
                None => tokio::select! {
                    () = self.unitless_added.notified() => {}
                    () = shutdown.cancelled() => {}
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                },
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Finalises `job_id` if its units are all finished and no other finisher holds it; retries a
    /// failed attempt after a backoff, and fails the job after [`FINALIZE_ATTEMPTS`]. `finisher`
    /// names the caller (unique per process and task kind: the store lets a finisher take its own
    /// claim again). Returns when the job is committed, someone else has it, or on `shutdown`
    /// (the claim then lapses and another replica carries on).
    pub async fn finalize(&self, job_id: &str, finisher: &str, shutdown: &CancellationToken) {
        loop {
            let now = now_unix();
            let lease_until = now + self.config.lease_secs;
            let attempt = match self
                .store
                .claim_finalize(job_id, finisher, now, lease_until)
                .await
            {
                Ok(Some(attempt)) => attempt,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(job = %job_id, error = %e, "cannot claim the job's finalisation; the sweeper tries again");
                    return;
                }
            };
            let span = tracing::info_span!("finalize", job = %job_id, attempt);
            if attempt > FINALIZE_ATTEMPTS {
                // Every earlier finisher died or gave up without committing.
                let reason = format!("finalisation was interrupted {FINALIZE_ATTEMPTS} times");
                return self
                    .give_up(job_id, finisher, &reason)
                    .instrument(span)
                    .await;
            }
            let result = self
                .attempt(job_id, finisher, attempt)
                .instrument(span.clone())
                .await;
            // Deleted under the attempt: what the attempt wrote after the DELETE removed the
            // job's files (or while a lost claim cut it short) goes too.
            if self.remove_if_deleted(job_id, &[]).await {
                return;
            }
            let error = match result {
                Ok(()) => return,
                Err(error) => error,
            };
            let gone = match self.store.get_job(job_id).await {
                Ok(job) => job.is_none_or(|j| j.state != JobState::Running),
                Err(_) => false,
            };
            if gone {
                // Finished elsewhere: nothing to retry.
                span.in_scope(|| {
                    tracing::debug!(error = %error, "finalisation stopped: the job was deleted or finished elsewhere");
                });
                return;
            }
            if attempt >= FINALIZE_ATTEMPTS {
                let reason = format!("the export files could not be assembled: {error}");
                return self
                    .give_up(job_id, finisher, &reason)
                    .instrument(span)
                    .await;
            }
            let delay = self.retry_backoff(attempt);
            span.in_scope(|| {
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "finalisation failed; retrying");
            });
            // Keep the claim through the backoff so the retry is this finisher's; should this
            // process die meanwhile, the claim lapses when the backoff would have ended.
            let until = now_unix() + delay.as_secs() + 1;
            if !matches!(
                self.store.extend_finalize(job_id, finisher, until).await,
                Ok(true)
            ) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// One attempt, with a heartbeat on the claim. `Ok` also when the claim was lost (the job
    /// was deleted, or another finisher took over): nothing is left for this one to do.
    async fn attempt(
        &self,
        job_id: &str,
        finisher: &str,
        attempt: u32,
    ) -> Result<(), FinalizeError> {
        let work = self.build_and_commit(job_id, finisher, attempt);
        tokio::pin!(work);
        let mut beat = self.heartbeat().await;
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = beat.tick() => {
                    let until = now_unix() + self.config.lease_secs;
                    match self.store.extend_finalize(job_id, finisher, until).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::debug!("finalisation claim lost; the job was deleted or another replica has it");
                            return Ok(());
                        }
                        // The commit is refused if the claim lapses meanwhile.
                        Err(e) => tracing::warn!(error = %e, "cannot extend the finalisation claim"),
                    }
                }
            }
        }
    }

    async fn build_and_commit(
        &self,
        job_id: &str,
        finisher: &str,
        attempt: u32,
    ) -> Result<(), FinalizeError> {
        let Some(mut job) = self.store.get_job(job_id).await? else {
            return Ok(());
        };
        if job.state != JobState::Running {
            return Ok(());
        }
        let units = self.store.units(job_id).await?;
        let assembled = self.assemble(&job, &units, attempt).await?;
        self.fault_point().await?;
        let failed: Vec<&Unit> = units
            .iter()
            .filter(|u| u.state == UnitState::Failed)
            .collect();
        if assembled.output.is_empty() && !units.is_empty() && failed.len() == units.len() {
            job.state = JobState::Failed;
            job.error = failed[0].error.clone();
        } else {
            job.state = JobState::Completed;
        }
        job.output = assembled.output.clone();
        job.error_files = assembled.errors.clone();
        job.units_done = units.len() as u32;
        job.resources_written = job.output.iter().map(|f| f.count).sum();
        self.set_finished(&mut job);
        if self.store.complete_job(&job, finisher).await? {
            tracing::info!(job = %job_id, state = ?job.state, resources = job.resources_written, "export finished");
            metrics::job_finished(match job.state {
                JobState::Failed => "failed",
                _ => "completed",
            });
            for part in &assembled.merged_parts {
                if let Err(e) = self.storage.discard(job_id, part).await {
                    // Left for the job's deletion.
                    tracing::debug!(file = %part.name, error = %e, "cannot remove a merged part file");
                }
            }
            return Ok(());
        }
        // Deleted meanwhile (then [`Self::finalize`] removes whatever is left), or another
        // finisher committed: these files are nobody's.
        for file in assembled.output.iter().chain(&assembled.errors) {
            let _ = self.discard_own(job_id, file, attempt).await;
        }
        tracing::debug!(
            job = %job_id,
            "finalisation not committed: the job was deleted or finished elsewhere"
        );
        Ok(())
    }

    /// Removes `file` if this attempt wrote it (not a unit's part file used as it is).
    async fn discard_own(
        &self,
        job_id: &str,
        file: &OutputFile,
        attempt: u32,
    ) -> Result<(), StorageError> {
        if file.name.contains(&format!(".f{attempt}.")) {
            self.storage.discard(job_id, file).await?;
        }
        Ok(())
    }

    /// Fails the job with `reason`: the status URL answers it, and the client's slot is free.
    async fn give_up(&self, job_id: &str, finisher: &str, reason: &str) {
        let mut job = match self.store.get_job(job_id).await {
            Ok(Some(job)) if job.state == JobState::Running => job,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fail the job now; the sweeper tries again");
                return;
            }
        };
        job.state = JobState::Failed;
        job.error = Some(reason.to_owned());
        self.set_finished(&mut job);
        match self.store.complete_job(&job, finisher).await {
            Ok(true) => {
                metrics::job_finished("failed");
                tracing::error!(reason, "export failed");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot fail the job now; the sweeper tries again")
            }
        }
    }

    fn set_finished(&self, job: &mut Job) {
        let now = now_unix();
        job.completed_at = Some(now);
        job.expires_at = Some(now + self.config.job_ttl_secs);
    }

    /// Test-only fault injection (see [`Fault`]): where an attempt has written its files and has
    /// not committed yet.
    async fn fault_point(&self) -> Result<(), StorageError> {
        match self.fault {
            None => Ok(()),
            Some(Fault::FinalizeHang) => {
                tracing::warn!("fault injection: finalisation stops before its commit");
                std::future::pending().await
            }
            Some(Fault::FinalizeFail) => {
                tracing::warn!("fault injection: finalisation fails before its commit");
                Err(StorageError::Io {
                    path: "(fault injection)".into(),
                    source: std::io::Error::other("injected finalisation failure"),
                })
            }
        }
    }

    /// Output files per type (deduplicated where several searches fed one type) and the error file.
    async fn assemble(
        &self,
        job: &Job,
        units: &[Unit],
        attempt: u32,
    ) -> Result<Assembled, StorageError> {
        let mut output = Vec::new();
        let mut merged_parts = Vec::new();
        for t in &job.types {
            let of_type: Vec<&Unit> = units.iter().filter(|u| &u.resource_type == t).collect();
            let files: Vec<OutputFile> = of_type
                .iter()
                .flat_map(|u| u.checkpoint.files.iter().filter(|f| f.count > 0).cloned())
                .collect();
            if of_type.len() <= 1 {
                output.extend(files);
            } else {
                output.extend(self.merge_unique(job, t, &files, attempt).await?);
                merged_parts.extend(files);
            }
        }
        let mut issues: Vec<String> = job
            .warnings
            .iter()
            .map(|w| OperationOutcome::warning(w.as_str()).to_line())
            .collect();
        for unit in units {
            issues.extend(unit.checkpoint.issues.iter().cloned());
            if let Some(error) = &unit.error {
                issues.push(OperationOutcome::error("processing", error.as_str()).to_line());
            }
        }
        let supporting = self.fetch_supporting(job, units, attempt).await?;
        output.extend(supporting.output);
        issues.extend(supporting.issues);
        let mut errors = Vec::new();
        if !issues.is_empty() {
            let lines: Vec<Line> = issues
                .into_iter()
                .map(|i| Line {
                    id: None,
                    last_updated: None,
                    bytes: format!("{i}\n").into_bytes(),
                })
                .collect();
            let mut writer = UnitWriter::resume(
                &self.storage,
                &job.id,
                format!("errors.f{attempt}"),
                "OperationOutcome",
                (u64::MAX, u64::MAX),
                Vec::new(),
            )
            .await?;
            writer.write(&lines).await?;
            writer.finish().await?;
            writer.settle().await?;
            errors = writer.files().to_vec();
        }
        Ok(Assembled {
            output,
            errors,
            merged_parts,
        })
    }

    /// Writes a type's part files into `{type}.f{attempt}.{n}.ndjson` with each resource id once.
    /// The parts stay: they are this attempt's input, and a later attempt's if this one does not
    /// commit.
    async fn merge_unique(
        &self,
        job: &Job,
        resource_type: &str,
        parts: &[OutputFile],
        attempt: u32,
    ) -> Result<Vec<OutputFile>, StorageError> {
        let mut seen: HashSet<u128> = HashSet::new();
        let hasher = IdHasher::new();
        let mut writer = UnitWriter::resume(
            &self.storage,
            &job.id,
            format!("{resource_type}.f{attempt}"),
            resource_type,
            (self.config.max_file_bytes, self.config.max_file_resources),
            Vec::new(),
        )
        .await?;
        for part in parts {
            let mut reader = self.storage.reader(&job.id, &part.name).await?.lines();
            let mut batch = Vec::new();
            loop {
                let line = reader
                    .next_line()
                    .await
                    .map_err(|source| StorageError::Io {
                        path: part.name.clone(),
                        source,
                    })?;
                let Some(line) = line else { break };
                let id = serde_json::from_str::<IdOnly>(&line)
                    .ok()
                    .and_then(|r| r.id)
                    .unwrap_or_default();
                if id.is_empty() || seen.insert(hasher.hash(&id)) {
                    batch.push(Line {
                        id: None,
                        last_updated: None,
                        bytes: format!("{line}\n").into_bytes(),
                    });
                }
                if batch.len() >= 1000 {
                    writer.write(&batch).await?;
                    batch.clear();
                }
            }
            writer.write(&batch).await?;
        }
        // Not checkpointed: an attempt that does not finish is started again from the parts.
        writer.finish().await?;
        writer.settle().await?;
        Ok(writer.files().to_vec())
    }
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: Option<String>,
}

/// 128-bit id hashes (two keyed SipHashes): collisions are negligible at any export size, and
/// the set costs 16 bytes per resource rather than the id's length.
struct IdHasher(
    std::collections::hash_map::RandomState,
    std::collections::hash_map::RandomState,
);

impl IdHasher {
    fn new() -> Self {
        Self(Default::default(), Default::default())
    }

    fn hash(&self, id: &str) -> u128 {
        let one = |state: &std::collections::hash_map::RandomState| state.hash_one(id);
        (u128::from(one(&self.0)) << 64) | u128::from(one(&self.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hashes_differ() {
        let h = IdHasher::new();
        assert_ne!(h.hash("a"), h.hash("b"));
        assert_eq!(h.hash("a"), h.hash("a"));
    }
}
