//! Job state: the [`JobStore`] trait and its two implementations, which pass one contract suite
//! (`tests/integration/store_contract.rs`):
//!
//! - [`embedded`] (the default): a redb database file on local disk; one node, nothing to install,
//!   persistent across restarts (a restarted node still answers status and resumes its jobs);
//! - [`redis`]: several replicas share jobs, units, leases, rate limits and `jti`s.
//!
//! Records are the JSON of the types in [`crate::job`]. Every operation that decides between
//! workers (claiming a unit, saving it under a lease, finishing the last unit, claiming and
//! committing a job's finalisation, the per-client cap, first use of a `jti`, a job's first status
//! poll) is atomic in both stores.

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{StoreBackend, StoreConfig};
use crate::job::{Job, Unit, UnixSecs};

pub mod embedded;
pub mod redis;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or failing (Redis down, disk error): callers answer 503 and retry.
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    /// A record could not be decoded (written by an incompatible version, or corrupted).
    #[error("job store record is corrupt: {0}")]
    Corrupt(String),
    /// The embedded store's file is open in another process (redb locks it exclusively): a
    /// running proxy, or a second one configured with the same file.
    #[error("the job store file {} is open in another process", .0.display())]
    InUse(std::path::PathBuf),
}

/// Opens the configured store: the embedded file (created, with its directory, when missing) or
/// a connection to Redis. What the proxy and the `jobs` command both use.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn JobStore>, StoreError> {
    Ok(match config.backend {
        StoreBackend::Embedded => {
            if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            Arc::new(embedded::EmbeddedStore::open(&config.path)?)
        }
        StoreBackend::Redis => Arc::new(redis::RedisStore::connect_configured(config).await?),
    })
}

/// Outcome of [`JobStore::create_job`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    /// The client already has `max_active` running jobs.
    TooManyActive,
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new job (state Running), its units and its patients (`members`, for the units
    /// that filter a type-level scan by them; may be empty), unless the client already has
    /// `max_active_per_client` jobs in state Running. Atomic: concurrent kick-offs of one client
    /// on several replicas cannot exceed the cap. Job ids are unique: a job whose id is already
    /// stored is refused with [`StoreError::Corrupt`], never overwritten.
    async fn create_job(
        &self,
        job: &Job,
        units: &[Unit],
        members: &[String],
        max_active_per_client: usize,
    ) -> Result<Created, StoreError>;

    /// The patients stored with the job by [`JobStore::create_job`] (empty when none were, or the
    /// job is gone). Kept apart from the job and unit records, which are read and written far
    /// more often, so a Group of 100,000 patients is stored once, not in every checkpoint.
    async fn members(&self, job_id: &str) -> Result<Vec<String>, StoreError>;

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// Replaces an existing job record (state, progress, manifest). Returns false, writing nothing,
    /// when the job no longer exists (deleted meanwhile).
    async fn put_job(&self, job: &Job) -> Result<bool, StoreError>;

    /// Deletes a job, its units, its finalisation claim and its poll markers. Returns whether it
    /// existed.
    async fn delete_job(&self, id: &str) -> Result<bool, StoreError>;

    /// Ids of every stored job (for the sweeper and for resuming after a restart).
    async fn job_ids(&self) -> Result<Vec<String>, StoreError>;

    /// The units of a job, ordered by index.
    async fn units(&self, job_id: &str) -> Result<Vec<Unit>, StoreError>;

    /// Claims one unit of a Running job that is Pending, or Running with `lease_until < now`
    /// (its worker died): sets `owner = worker`, `lease_until`, state Running, and returns it.
    async fn claim_unit(
        &self,
        worker: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<Unit>, StoreError>;

    /// Saves `unit` (checkpoint, lease extension) if `worker` still owns it. Returns false, writing
    /// nothing, when the lease was lost (taken over, or the job was deleted) or the unit is
    /// already finished. The stored owner stays `worker` whatever `unit.owner` says.
    async fn save_unit(&self, unit: &Unit, worker: &str) -> Result<bool, StoreError>;

    /// Saves a finished unit (state Done or Failed) if `worker` owns it, and returns how many units
    /// of its job are still unfinished. Atomic: exactly one worker sees `Some(0)`. `None` when the
    /// lease was lost or the job is gone. A retry by the same worker of a finish that was already
    /// committed (its answer lost, e.g. a Redis timeout) returns the current count again without
    /// counting twice, so that worker can still complete the job.
    async fn finish_unit(&self, unit: &Unit, worker: &str) -> Result<Option<u32>, StoreError>;

    /// Gives a unit back (state Pending, no owner) if `worker` owns it: graceful shutdown, so
    /// another worker carries on at once.
    async fn release_unit(&self, unit: &Unit, worker: &str) -> Result<(), StoreError>;

    /// Claims the finalisation of a Running job whose units are all finished (none at all counts),
    /// for `finisher` until `lease_until`, when nobody else holds it: no claim yet, a claim whose
    /// `lease_until < now` (its holder died, or is waiting out a backoff), or `finisher`'s own
    /// (its retry). Returns the attempt number: 1 for the first claim, one more for every claim
    /// since, whoever took it (a finaliser that dies counts as an attempt). `None` when the job is
    /// gone, no longer Running, has unfinished units, or another finisher holds the claim.
    async fn claim_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<u32>, StoreError>;

    /// Moves `finisher`'s claim on the job's finalisation to `lease_until` (a heartbeat, or the end
    /// of a backoff). False when it does not hold the claim or the job is no longer Running.
    async fn extend_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        lease_until: UnixSecs,
    ) -> Result<bool, StoreError>;

    /// Commits a finalisation: replaces the job record with `job` (its final state, Completed or
    /// Failed) if the job is still Running and `finisher` holds its finalisation claim, and frees
    /// the client's export slot. Returns false, writing nothing, otherwise — so however many
    /// finishers race, one manifest is recorded.
    async fn complete_job(&self, job: &Job, finisher: &str) -> Result<bool, StoreError>;

    /// Marks the job's status as polled. True the first time for an existing job, false after
    /// that and for a job that does not exist. The mark goes with the job.
    async fn first_poll(&self, job_id: &str) -> Result<bool, StoreError>;

    /// Records a status poll of `job_id` at `now_ms`. Returns false (and records nothing) when the
    /// previous accepted poll was less than `min_interval_ms` earlier.
    async fn record_poll(
        &self,
        job_id: &str,
        now_ms: u64,
        min_interval_ms: u64,
    ) -> Result<bool, StoreError>;

    /// Remembers a client assertion's `jti` for `issuer` until `expires_at`. Returns true the first
    /// time, false for a replay. Expired entries are forgotten.
    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        now: UnixSecs,
        expires_at: UnixSecs,
    ) -> Result<bool, StoreError>;

    /// Takes one of `max` fleet-wide upstream request slots for `holder` until `expires_ms`
    /// (a crashed holder's slot frees itself then). Returns false when all are taken. The default
    /// — one node — always grants: the replica's own semaphore is then the whole cap.
    async fn acquire_slot(
        &self,
        _holder: &str,
        _now_ms: u64,
        _expires_ms: u64,
        _max: usize,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Gives a slot back.
    async fn release_slot(&self, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }
}
