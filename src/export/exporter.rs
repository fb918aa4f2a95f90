//! The [`Exporter`]: what a process's export machinery shares (store, storage, pager, settings)
//! and its entry points — [`Exporter::submit`] stores a planned job and hands it to the workers,
//! [`Exporter::spawn`] starts the workers ([`super::worker`]), the finaliser
//! ([`super::finalize`]) and the sweeper ([`super::sweep`]). Request handlers only ever submit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::pager::Pager;
use crate::config::ExportConfig;
use crate::job::{Job, Unit};
use crate::storage::Storage;
use crate::store::{Created, JobStore, StoreError};
use crate::telemetry::metrics;

pub struct Exporter {
    pub store: Arc<dyn JobStore>,
    pub storage: Storage,
    pub pager: Arc<Pager>,
    pub(super) config: ExportConfig,
    /// Unique per process start: names its workers, finishers and sweeper in leases and claims.
    pub(super) process_id: String,
    pub(super) fault: Option<Fault>,
    /// Idle workers wait on it; a submitted job with units wakes them.
    pub(super) wake: Notify,
    /// Jobs submitted without units, for the finaliser: no unit's finish will finalise them.
    pub(super) unitless: Mutex<VecDeque<String>>,
    /// The finaliser waits on it; it keeps a wake-up that comes while the finaliser is busy.
    pub(super) unitless_added: Notify,
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
            unitless: Mutex::new(VecDeque::new()),
            unitless_added: Notify::new(),
        }
    }

    /// Stores a planned `job` with its `units` and patients (`members`, for the scans that filter by them) (at most `max_active_per_client` running jobs per
    /// client) and sets it going: idle workers are woken, and a job without units (no matching
    /// types or patients) goes to this process's finaliser, since no unit's finish will finalise
    /// it. Should this process stop first, any replica's sweeper finalises it.
    pub async fn submit(
        &self,
        job: &Job,
        units: &[Unit],
        members: &[String],
        max_active_per_client: usize,
    ) -> Result<Created, StoreError> {
        let created = self
            .store
            .create_job(job, units, members, max_active_per_client)
            .await?;
        if created == Created::Yes {
            metrics::job_started();
            if units.is_empty() {
                self.lock_unitless().push_back(job.id.clone());
                self.unitless_added.notify_one();
            } else {
                self.wake();
            }
        }
        Ok(created)
    }

    /// Wakes idle workers (there is work to claim).
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    pub(super) fn lock_unitless(&self) -> std::sync::MutexGuard<'_, VecDeque<String>> {
        // The queue holds plain ids: a panic elsewhere cannot leave it inconsistent.
        self.unitless
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts `export.workers` workers, the finaliser of unitless jobs and the sweeper; they stop
    /// when `shutdown` is cancelled, releasing the units they hold so another replica carries on
    /// at once.
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
        let stop = shutdown.clone();
        handles.push(tokio::spawn(async move {
            this.finalize_unitless_forever(stop).await
        }));
        let this = self.clone();
        handles.push(tokio::spawn(
            async move { this.sweep_forever(shutdown).await },
        ));
        handles
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

    /// The heartbeat of a lease held while working (a unit's page, a finalisation): a tick every
    /// third of `export.lease_secs` (at least a second), so a slow step never lets the lease lapse
    /// and another replica take the work over. The first tick is already taken.
    pub(super) async fn heartbeat(&self) -> tokio::time::Interval {
        let mut beat =
            tokio::time::interval(Duration::from_secs((self.config.lease_secs / 3).max(1)));
        beat.tick().await;
        beat
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;

    use super::*;
    use crate::config::Config;
    use crate::job::{JobState, Level};
    use crate::store::embedded::EmbeddedStore;

    fn job(id: &str, warnings: &[&str]) -> Job {
        Job {
            id: id.into(),
            client_id: "client".into(),
            level: Level::Patient,
            request: "http://proxy/fhir/Patient/$export".into(),
            transaction_time: "2026-01-01T00:00:00Z".into(),
            since: None,
            until: None,
            types: vec!["Patient".into()],
            named_supporting: Vec::new(),
            elements: Vec::new(),
            state: JobState::Running,
            created_at: 0,
            completed_at: None,
            expires_at: None,
            units_total: 0,
            units_done: 0,
            resources_written: 0,
            warnings: warnings.iter().map(|w| (*w).into()).collect(),
            output: Vec::new(),
            error_files: Vec::new(),
            error: None,
        }
    }

    /// An exporter on an embedded store in `dir` (files in `dir/files`), no sweeps during a
    /// test, its tasks running until the token is cancelled; and the store.
    fn exporter(
        dir: &std::path::Path,
        retry_base_ms: u64,
    ) -> (
        Arc<Exporter>,
        Arc<dyn JobStore>,
        CancellationToken,
        Vec<tokio::task::JoinHandle<()>>,
    ) {
        let store: Arc<dyn JobStore> =
            Arc::new(EmbeddedStore::open(&dir.join("jobs.redb")).unwrap());
        let mut config = Config::default();
        config.upstream.url = "http://127.0.0.1:9/fhir".into();
        config.export.sweep_interval_secs = 3600;
        config.export.retry_base_ms = retry_base_ms;
        let exporter = Arc::new(Exporter::new(
            store.clone(),
            Storage::local(dir.join("files")).unwrap(),
            Pager::new(&config, HeaderMap::new()).unwrap(),
            config.export.clone(),
        ));
        let shutdown = CancellationToken::new();
        let tasks = exporter.spawn(shutdown.clone());
        (exporter, store, shutdown, tasks)
    }

    /// The state of job `id` once it leaves Running, or Running after `tries` × 10 ms.
    async fn settled(store: &Arc<dyn JobStore>, id: &str, tries: u32) -> Job {
        let mut job = store.get_job(id).await.unwrap().unwrap();
        for _ in 0..tries {
            if job.state != JobState::Running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            job = store.get_job(id).await.unwrap().unwrap();
        }
        job
    }

    /// Nothing but the exporter finalises it: no sweep runs during the test, and no request
    /// handler is involved.
    #[tokio::test]
    async fn a_job_submitted_without_units_is_finalised_by_the_exporter() {
        let dir = tempfile::tempdir().unwrap();
        let (exporter, store, shutdown, tasks) = exporter(dir.path(), 500);

        let submitted = job(
            "unitless",
            &["Patient/x is not a member of Group/g; not exported"],
        );
        let created = exporter.submit(&submitted, &[], &[], 1).await.unwrap();
        assert_eq!(created, Created::Yes);
        let finished = settled(&store, "unitless", 500).await;
        assert_eq!(finished.state, JobState::Completed, "finalised within 5 s");
        assert!(finished.output.is_empty());
        // Its kick-off warning is in the error file.
        assert_eq!(finished.error_files.len(), 1);
        assert_eq!(finished.error_files[0].count, 1);

        // The cap counts it no longer: another job of the client is accepted.
        let again = exporter
            .submit(&job("next", &[]), &[], &[], 1)
            .await
            .unwrap();
        assert_eq!(again, Created::Yes);

        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// Before the finaliser task, each unitless job was finalised on its own task (34efccc's
    /// `finalize_soon`); one job whose finalisation fails and backs off must not hold up the
    /// others queued behind it.
    #[tokio::test]
    async fn a_unitless_job_backing_off_does_not_hold_up_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let (exporter, store, shutdown, tasks) = exporter(dir.path(), 10_000);
        // Its error file cannot be written: a file stands where its directory would go.
        std::fs::write(dir.path().join("files/stuck"), b"").unwrap();

        let stuck = job("stuck", &["a warning, for the error file"]);
        assert_eq!(
            exporter.submit(&stuck, &[], &[], 5).await.unwrap(),
            Created::Yes
        );
        let next = Job {
            client_id: "other".into(),
            ..job("next", &[])
        };
        assert_eq!(
            exporter.submit(&next, &[], &[], 5).await.unwrap(),
            Created::Yes
        );
        let state = settled(&store, "next", 300).await.state;
        assert_eq!(state, JobState::Completed, "held up behind the failing job");
        assert_eq!(
            store.get_job("stuck").await.unwrap().unwrap().state,
            JobState::Running
        );

        shutdown.cancel();
        for task in tasks {
            task.await.unwrap();
        }
    }
}
