//! The sweeper every replica runs: every `export.sweep_interval_secs` it deletes jobs (and files)
//! past their expiry, and finalises Running jobs whose units are all finished but that nobody
//! finalised — their finisher died, or the last finish was recorded without its answer arriving.
//! With it, a Running job whose units are done leaves Running within about `export.lease_secs` +
//! `export.sweep_interval_secs` per attempt, whichever process died (DESIGN "Every job ends").

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::exporter::Exporter;
use crate::job::{JobState, UnixSecs, now_unix};

impl Exporter {
    pub(super) async fn sweep_forever(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(self.config.sweep_interval_secs)) => {}
                () = shutdown.cancelled() => return,
            }
            self.sweep(&shutdown).await;
        }
    }

    /// One sweep: deletes expired jobs, finalises finished ones nobody has.
    pub async fn sweep(&self, shutdown: &CancellationToken) {
        let Ok(ids) = self.store.job_ids().await else {
            return;
        };
        let finisher = format!("{}-sweep", self.process_id);
        let now = now_unix();
        // Stored jobs by state (running, completed, failed), for `bulk_proxy_jobs`.
        let mut states = [0; 3];
        for id in ids {
            if shutdown.is_cancelled() {
                return;
            }
            let span = tracing::info_span!("sweep", job = %id);
            let kept = tracing::Instrument::instrument(
                self.sweep_job(&id, &finisher, now, shutdown),
                span,
            )
            .await;
            if let Some(state) = kept {
                states[match state {
                    JobState::Running => 0,
                    JobState::Completed => 1,
                    JobState::Failed => 2,
                }] += 1;
            }
        }
        let [running, completed, failed] = states;
        crate::telemetry::metrics::jobs(running, completed, failed);
    }

    /// Deletes `id` if it expired, finalises it if its units are done and nobody has it. Returns
    /// the state of a job still stored (as it was read), for `bulk_proxy_jobs`.
    async fn sweep_job(
        &self,
        id: &str,
        finisher: &str,
        now: UnixSecs,
        shutdown: &CancellationToken,
    ) -> Option<JobState> {
        let Ok(Some(job)) = self.store.get_job(id).await else {
            return None;
        };
        if job.expires_at.is_some_and(|at| at <= now) {
            tracing::info!("export expired; deleting it and its files");
            let _ = super::cancel::delete_job(&*self.store, &self.storage, &job).await;
            return None;
        }
        if job.state == JobState::Running {
            // The store decides: only a job whose units are all finished, and whose
            // finalisation claim is free, is taken.
            self.finalize(id, finisher, shutdown).await;
        }
        Some(job.state)
    }
}

// Where it was before deletion had all its code in `cancel`.
pub use super::cancel::job_files;
