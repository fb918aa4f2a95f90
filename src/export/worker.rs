//! Claiming and leases: each worker claims a unit from the store with a lease, runs it
//! ([`super::unit`]), and records it finished; the worker that finishes a job's last unit
//! finalises the job ([`super::finalize`]). A lease lost (the job deleted, or the unit taken over
//! after this worker stalled past its lease) stops the unit here.
//!
//! Leases are what make a fleet safe (DESIGN "Every job ends"): a unit is only worked on by its
//! lease holder, the runner extends the lease with every checkpoint and while a slow page is
//! fetched, and a unit whose worker died is claimed again by any replica once its lease lapses.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::job::{Unit, UnitState, now_unix};
use crate::telemetry::metrics;

// Where they were before the exporter had a file of its own.
pub use super::exporter::{Exporter, Fault};

impl Exporter {
    pub(super) async fn work(&self, slot: usize, shutdown: CancellationToken) {
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

    /// Records `unit` as finished (Done or Failed); the worker that finishes a job's last unit
    /// finalises the job.
    pub(super) async fn finish(&self, unit: &Unit, worker: &str, shutdown: &CancellationToken) {
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

    /// The lease was lost: another worker has the unit, or the job was deleted.
    pub(super) async fn lost(&self, unit: &Unit) {
        metrics::lease_lost();
        match self.store.get_job(&unit.job_id).await {
            Ok(None) => {
                tracing::debug!("job deleted; unit stopped");
                self.discard_unit_files(unit).await;
            }
            _ => tracing::info!("lease lost; another worker carries on"),
        }
    }
}
