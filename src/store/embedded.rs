//! The default [`JobStore`]: a [redb](https://docs.rs/redb/2) database file on local disk. One
//! node, nothing to install, and persistent: a restarted proxy reopens the file, still answers
//! status polls and resumes its jobs' units.
//!
//! Design choices:
//!
//! - **One write transaction per operation.** redb runs one write transaction at a time and
//!   commits it atomically, so every decision between workers (claim, save under a lease, the
//!   last finisher, the per-client cap, a `jti`'s first use) reads and writes under that single
//!   lock. redb is blocking, so each transaction runs in `tokio::task::spawn_blocking`.
//! - **Records are JSON** of the [`crate::job`] types (the same bytes the Redis store keeps),
//!   so a new field with a default reads old records.
//! - **Units are keyed `(job_id, index)`**: redb orders tuple keys element by element, so a range
//!   scan over one job id yields its units in index order.
//! - **A claimable index** keyed `(lease_until, job_id, index)` holds every unfinished unit of a
//!   Running job (Pending units have `lease_until = 0`). Claiming reads the first entry below
//!   `now` — an O(log n) lookup that deserializes one unit, however many units are stored.
//!   Membership doubles as "its job is Running": [`JobStore::put_job`] drops a job's entries
//!   when it leaves Running, so saving a unit only re-keys an entry that is already there. No
//!   fairness between jobs is promised: entries of equal lease order by job id.
//! - **An unfinished-unit counter per job**, decremented only when a unit goes from unfinished
//!   to finished, so exactly one finisher observes 0 and a retried finish cannot count twice.
//! - **Running jobs per client** in a multimap (client → job ids) for the kick-off cap.
//! - **A finalisation claim per job** (owner, lease, attempts) beside the job record, so claiming
//!   and committing a job's finalisation are decided under the write lock like unit claims; the
//!   attempt count survives restarts, which is what bounds the retries of a job whose finaliser
//!   keeps dying.
//! - **`jti`s** are kept with an expiry index so each [`JobStore::first_use`] forgets a bounded
//!   batch of expired entries without scanning the table.
//! - Status polls are committed with [`Durability::Eventual`]: losing the last poll time in a
//!   crash costs nothing, and an fsync per poll would.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, Durability, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, Table,
    TableDefinition, WriteTransaction,
};

use super::{Created, JobStore, StoreError};
use crate::job::{Job, JobState, Unit, UnitState, UnixSecs};

/// job id → Job JSON.
const JOBS: TableDefinition<&str, &str> = TableDefinition::new("jobs");
/// (job id, index) → Unit JSON.
const UNITS: TableDefinition<(&str, u32), &str> = TableDefinition::new("units");
/// (lease_until, job id, index) → (): unfinished units of Running jobs.
const CLAIMABLE: TableDefinition<(u64, &str, u32), ()> = TableDefinition::new("claimable");
/// job id → number of unfinished units.
const UNFINISHED: TableDefinition<&str, u32> = TableDefinition::new("unfinished");
/// client id → ids of its Running jobs.
const ACTIVE: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("active");
/// job id → JSON array of the job's patients (`JobStore::members`).
const MEMBERS: TableDefinition<&str, &str> = TableDefinition::new("members");
/// job id → time of the last accepted status poll (Unix ms).
const POLLS: TableDefinition<&str, u64> = TableDefinition::new("polls");
/// job id → (): the job's status has been polled (the first poll answers 202).
const POLLED: TableDefinition<&str, ()> = TableDefinition::new("polled");
/// job id → (finisher, lease_until, attempts): the claim on the job's finalisation.
const FINALIZING: TableDefinition<&str, (&str, u64, u32)> = TableDefinition::new("finalizing");
/// (issuer, jti) → expires_at.
const JTIS: TableDefinition<(&str, &str), u64> = TableDefinition::new("jtis");
/// (expires_at, issuer, jti) → (): lets `first_use` find expired `jti`s in order.
const JTI_EXPIRY: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("jti_expiry");

/// How many expired `jti`s one `first_use` forgets: bounds its work; expiry keeps pace as long as
/// fewer than this many assertions expire between two token requests.
const JTI_PURGE_BATCH: usize = 64;

/// Page cache of the embedded database.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The embedded job store. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

/// Every redb failure (I/O, a full disk, a lock held by another process) leaves the store
/// unusable for now: callers answer 503.
macro_rules! redb_unavailable {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                crate::telemetry::metrics::store_error("embedded");
                StoreError::Unavailable(error.to_string())
            }
        }
    )*};
}
redb_unavailable!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);

fn decode<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl EmbeddedStore {
    /// Opens the database at `path`, creating it (and its tables) if needed. Fails with
    /// [`StoreError::InUse`] if another process holds it open.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // redb's page cache defaults to 1 GiB; job records are small and each checkpoint a short
        // write, so a bounded cache keeps a long export's memory flat (bench: 98 MB RSS at 1M).
        let db = match redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
        {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::InUse(path.to_owned()));
            }
            other => other?,
        };
        // Create every table up front so that read-only operations never meet a missing table.
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(UNITS)?;
        txn.open_table(CLAIMABLE)?;
        txn.open_table(UNFINISHED)?;
        txn.open_table(MEMBERS)?;
        txn.open_multimap_table(ACTIVE)?;
        txn.open_table(POLLS)?;
        txn.open_table(POLLED)?;
        txn.open_table(FINALIZING)?;
        txn.open_table(JTIS)?;
        txn.open_table(JTI_EXPIRY)?;
        txn.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` in one write transaction on the blocking pool and commits it.
    async fn write<T, F>(&self, durability: Durability, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        blocking(move || {
            let mut txn = db.begin_write()?;
            txn.set_durability(durability);
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `f` in one read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        blocking(move || f(&db.begin_read()?)).await
    }
}

async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}

/// Reads a unit record.
fn get_unit(
    units: &Table<(&str, u32), &str>,
    job_id: &str,
    index: u32,
) -> Result<Option<Unit>, StoreError> {
    units
        .get((job_id, index))?
        .map(|json| decode(json.value()))
        .transpose()
}

/// Unit records of a job, in index order.
fn job_units(
    units: &impl ReadableTable<(&'static str, u32), &'static str>,
    job_id: &str,
) -> Result<Vec<Unit>, StoreError> {
    let mut out = Vec::new();
    for entry in units.range((job_id, 0)..=(job_id, u32::MAX))? {
        let (_, json) = entry?;
        out.push(decode(json.value())?);
    }
    Ok(out)
}

/// Replaces `old` by `new` (same job and index) and keeps the claimable index and the job's
/// unfinished counter in step. The caller has checked that `old` is unfinished.
fn rewrite_unit(txn: &WriteTransaction, old: &Unit, new: &Unit) -> Result<(), StoreError> {
    let job_id = old.job_id.as_str();
    txn.open_table(UNITS)?
        .insert((job_id, old.index), encode(new)?.as_str())?;
    let mut claimable = txn.open_table(CLAIMABLE)?;
    // Present only while the job is Running (see the module docs): re-key it, never add it.
    let indexed = claimable
        .remove((old.lease_until, job_id, old.index))?
        .is_some();
    if indexed && !new.is_finished() {
        claimable.insert((new.lease_until, job_id, new.index), ())?;
    }
    if new.is_finished() {
        let mut unfinished = txn.open_table(UNFINISHED)?;
        let left = unfinished.get(job_id)?.map_or(0, |n| n.value());
        unfinished.insert(job_id, left.saturating_sub(1))?;
    }
    Ok(())
}

/// The stored unit if `worker` holds its lease and it is unfinished.
fn owned_unit(
    txn: &WriteTransaction,
    unit: &Unit,
    worker: &str,
) -> Result<Option<Unit>, StoreError> {
    let units = txn.open_table(UNITS)?;
    Ok(get_unit(&units, &unit.job_id, unit.index)?
        .filter(|stored| stored.owner.as_deref() == Some(worker) && !stored.is_finished()))
}

/// A Running job whose units are all finished, and whose finalisation claim `finisher` may take.
fn may_finalize(
    jobs: &impl ReadableTable<&'static str, &'static str>,
    unfinished: &impl ReadableTable<&'static str, u32>,
    claims: &impl ReadableTable<&'static str, (&'static str, u64, u32)>,
    (job_id, finisher, now): (&str, &str, UnixSecs),
) -> Result<bool, StoreError> {
    let running = match jobs.get(job_id)? {
        Some(json) => decode::<Job>(json.value())?.state == JobState::Running,
        None => false,
    };
    if !running || unfinished.get(job_id)?.is_some_and(|n| n.value() > 0) {
        return Ok(false);
    }
    Ok(match claims.get(job_id)? {
        Some(claim) => {
            let (owner, lease_until, _) = claim.value();
            owner == finisher || lease_until < now
        }
        None => true,
    })
}

/// Whether the job is Running and `finisher` holds its finalisation claim.
fn holds_finalize(
    txn: &WriteTransaction,
    job_id: &str,
    finisher: &str,
) -> Result<bool, StoreError> {
    let running = match txn.open_table(JOBS)?.get(job_id)? {
        Some(json) => decode::<Job>(json.value())?.state == JobState::Running,
        None => false,
    };
    Ok(running
        && txn
            .open_table(FINALIZING)?
            .get(job_id)?
            .is_some_and(|c| c.value().0 == finisher))
}

/// Adds (`running`) or removes the claimable entries of a job's unfinished units.
fn index_units(txn: &WriteTransaction, job_id: &str, running: bool) -> Result<(), StoreError> {
    let units = job_units(&txn.open_table(UNITS)?, job_id)?;
    let mut claimable = txn.open_table(CLAIMABLE)?;
    for unit in units.iter().filter(|u| !u.is_finished()) {
        let key = (unit.lease_until, job_id, unit.index);
        if running {
            claimable.insert(key, ())?;
        } else {
            claimable.remove(key)?;
        }
    }
    Ok(())
}

#[async_trait]
impl JobStore for EmbeddedStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(JOBS)?;
            Ok(())
        })
        .await
    }

    async fn create_job(
        &self,
        job: &Job,
        units: &[Unit],
        members: &[String],
        max_active_per_client: usize,
    ) -> Result<Created, StoreError> {
        let job = job.clone();
        let units = units.to_vec();
        let members = (!members.is_empty())
            .then(|| encode(&members))
            .transpose()?;
        self.write(Durability::Immediate, move |txn| {
            let id = job.id.as_str();
            let mut jobs = txn.open_table(JOBS)?;
            if jobs.get(id)?.is_some() {
                // Ids are random UUIDs: a duplicate is a caller bug, and overwriting would orphan
                // the first job's units.
                return Err(StoreError::Corrupt(format!("job {id} already exists")));
            }
            let running = job.state == JobState::Running;
            if running {
                let mut active = txn.open_multimap_table(ACTIVE)?;
                if active.get(job.client_id.as_str())?.len() >= max_active_per_client as u64 {
                    return Ok(Created::TooManyActive);
                }
                active.insert(job.client_id.as_str(), id)?;
            }
            jobs.insert(id, encode(&job)?.as_str())?;
            let mut table = txn.open_table(UNITS)?;
            let mut claimable = txn.open_table(CLAIMABLE)?;
            let mut unfinished = 0u32;
            for unit in &units {
                table.insert((id, unit.index), encode(unit)?.as_str())?;
                if !unit.is_finished() {
                    unfinished += 1;
                    if running {
                        claimable.insert((unit.lease_until, id, unit.index), ())?;
                    }
                }
            }
            txn.open_table(UNFINISHED)?.insert(id, unfinished)?;
            if let Some(members) = &members {
                txn.open_table(MEMBERS)?.insert(id, members.as_str())?;
            }
            Ok(Created::Yes)
        })
        .await
    }

    async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let id = id.to_owned();
        self.read(move |txn| {
            txn.open_table(JOBS)?
                .get(id.as_str())?
                .map(|json| decode(json.value()))
                .transpose()
        })
        .await
    }

    async fn put_job(&self, job: &Job) -> Result<bool, StoreError> {
        let job = job.clone();
        self.write(Durability::Immediate, move |txn| {
            let id = job.id.as_str();
            let mut jobs = txn.open_table(JOBS)?;
            let old: Job = match jobs.get(id)? {
                Some(json) => decode(json.value())?,
                None => return Ok(false),
            };
            jobs.insert(id, encode(&job)?.as_str())?;
            let was_running = old.state == JobState::Running;
            let running = job.state == JobState::Running;
            if was_running != running {
                let mut active = txn.open_multimap_table(ACTIVE)?;
                if running {
                    active.insert(old.client_id.as_str(), id)?;
                } else {
                    active.remove(old.client_id.as_str(), id)?;
                }
                index_units(txn, id, running)?;
            }
            Ok(true)
        })
        .await
    }

    async fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let id = id.as_str();
            let old: Job = match txn.open_table(JOBS)?.remove(id)? {
                Some(json) => decode(json.value())?,
                None => return Ok(false),
            };
            txn.open_multimap_table(ACTIVE)?
                .remove(old.client_id.as_str(), id)?;
            index_units(txn, id, false)?;
            txn.open_table(UNITS)?
                .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
            txn.open_table(UNFINISHED)?.remove(id)?;
            txn.open_table(MEMBERS)?.remove(id)?;
            let mut polls = txn.open_table(POLLS)?;
            polls.remove(id)?;
            // The first-poll mark of versions before `first_poll`, kept here under this key.
            polls.remove(format!("{id}:first").as_str())?;
            txn.open_table(POLLED)?.remove(id)?;
            txn.open_table(FINALIZING)?.remove(id)?;
            Ok(true)
        })
        .await
    }

    async fn members(&self, job_id: &str) -> Result<Vec<String>, StoreError> {
        let id = job_id.to_owned();
        self.read(move |txn| {
            txn.open_table(MEMBERS)?
                .get(id.as_str())?
                .map_or(Ok(Vec::new()), |json| decode(json.value()))
        })
        .await
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        self.read(|txn| {
            let mut ids = Vec::new();
            for entry in txn.open_table(JOBS)?.iter()? {
                ids.push(entry?.0.value().to_owned());
            }
            Ok(ids)
        })
        .await
    }

    async fn units(&self, job_id: &str) -> Result<Vec<Unit>, StoreError> {
        let job_id = job_id.to_owned();
        self.read(move |txn| job_units(&txn.open_table(UNITS)?, &job_id))
            .await
    }

    async fn claim_unit(
        &self,
        worker: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<Unit>, StoreError> {
        // Idle workers ask twice a second: a read transaction answers "nothing" without the
        // fsync a write transaction's commit costs.
        let any = self
            .read(move |txn| {
                let claimable = txn.open_table(CLAIMABLE)?;
                Ok(claimable.range(..(now, "", 0))?.next().is_some())
            })
            .await?;
        if !any {
            return Ok(None);
        }
        let worker = worker.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let mut claimable = txn.open_table(CLAIMABLE)?;
            let mut units = txn.open_table(UNITS)?;
            loop {
                // The first entry whose lease expired before `now` (Pending ones have lease 0).
                let first = claimable
                    .range(..(now, "", 0))?
                    .next()
                    .transpose()?
                    .map(|(key, _)| {
                        let (lease, job_id, index) = key.value();
                        (lease, job_id.to_owned(), index)
                    });
                let Some((old_lease, job_id, index)) = first else {
                    return Ok(None);
                };
                claimable.remove((old_lease, job_id.as_str(), index))?;
                let Some(mut unit) = get_unit(&units, &job_id, index)? else {
                    // An entry that outlived its unit (cannot happen by construction): dropping
                    // it heals the index, and the loop ends because every turn removes one.
                    continue;
                };
                unit.owner = Some(worker);
                unit.lease_until = lease_until;
                unit.state = UnitState::Running;
                units.insert((job_id.as_str(), index), encode(&unit)?.as_str())?;
                claimable.insert((lease_until, job_id.as_str(), index), ())?;
                return Ok(Some(unit));
            }
        })
        .await
    }

    async fn save_unit(&self, unit: &Unit, worker: &str) -> Result<bool, StoreError> {
        let mut new = unit.clone();
        let worker = worker.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let Some(old) = owned_unit(txn, &new, &worker)? else {
                return Ok(false);
            };
            // The lease stays with `worker` whatever the record says: only release_unit gives it up.
            new.owner = Some(worker);
            if !new.is_finished() {
                new.state = UnitState::Running;
            }
            rewrite_unit(txn, &old, &new)?;
            Ok(true)
        })
        .await
    }

    async fn finish_unit(&self, unit: &Unit, worker: &str) -> Result<Option<u32>, StoreError> {
        let mut new = unit.clone();
        let worker = worker.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let stored = {
                let units = txn.open_table(UNITS)?;
                get_unit(&units, &new.job_id, new.index)?
            };
            let Some(old) = stored.filter(|u| u.owner.as_deref() == Some(worker.as_str())) else {
                return Ok(None);
            };
            let left = |txn: &WriteTransaction| -> Result<u32, StoreError> {
                Ok(txn
                    .open_table(UNFINISHED)?
                    .get(new.job_id.as_str())?
                    .map_or(0, |n| n.value()))
            };
            if old.is_finished() {
                // A retry of a finish that was committed (its answer lost): idempotent.
                return Ok(Some(left(txn)?));
            }
            new.owner = Some(worker);
            rewrite_unit(txn, &old, &new)?;
            Ok(Some(left(txn)?))
        })
        .await
    }

    async fn release_unit(&self, unit: &Unit, worker: &str) -> Result<(), StoreError> {
        let unit = unit.clone();
        let worker = worker.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let Some(old) = owned_unit(txn, &unit, &worker)? else {
                return Ok(());
            };
            let mut new = old.clone();
            new.state = UnitState::Pending;
            new.owner = None;
            new.lease_until = 0;
            rewrite_unit(txn, &old, &new)
        })
        .await
    }

    async fn claim_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        now: UnixSecs,
        lease_until: UnixSecs,
    ) -> Result<Option<u32>, StoreError> {
        let key = (job_id.to_owned(), finisher.to_owned());
        // The sweeper asks about every Running job: a read answers "not ready" without the fsync a
        // write transaction's commit costs.
        let ready = {
            let (job_id, finisher) = key.clone();
            self.read(move |txn| {
                may_finalize(
                    &txn.open_table(JOBS)?,
                    &txn.open_table(UNFINISHED)?,
                    &txn.open_table(FINALIZING)?,
                    (&job_id, &finisher, now),
                )
            })
            .await?
        };
        if !ready {
            return Ok(None);
        }
        let (job_id, finisher) = key;
        self.write(Durability::Immediate, move |txn| {
            let mut claims = txn.open_table(FINALIZING)?;
            let id = job_id.as_str();
            if !may_finalize(
                &txn.open_table(JOBS)?,
                &txn.open_table(UNFINISHED)?,
                &claims,
                (id, &finisher, now),
            )? {
                return Ok(None);
            }
            let attempt = claims.get(id)?.map_or(0, |c| c.value().2) + 1;
            claims.insert(id, (finisher.as_str(), lease_until, attempt))?;
            Ok(Some(attempt))
        })
        .await
    }

    async fn extend_finalize(
        &self,
        job_id: &str,
        finisher: &str,
        lease_until: UnixSecs,
    ) -> Result<bool, StoreError> {
        let job_id = job_id.to_owned();
        let finisher = finisher.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let id = job_id.as_str();
            if !holds_finalize(txn, id, &finisher)? {
                return Ok(false);
            }
            let mut claims = txn.open_table(FINALIZING)?;
            let attempts = claims.get(id)?.map_or(0, |c| c.value().2);
            claims.insert(id, (finisher.as_str(), lease_until, attempts))?;
            Ok(true)
        })
        .await
    }

    async fn complete_job(&self, job: &Job, finisher: &str) -> Result<bool, StoreError> {
        let job = job.clone();
        let finisher = finisher.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let id = job.id.as_str();
            if !holds_finalize(txn, id, &finisher)? {
                return Ok(false);
            }
            let mut jobs = txn.open_table(JOBS)?;
            let old: Job = match jobs.get(id)? {
                Some(json) => decode(json.value())?,
                None => return Ok(false),
            };
            jobs.insert(id, encode(&job)?.as_str())?;
            if job.state != JobState::Running {
                txn.open_multimap_table(ACTIVE)?
                    .remove(old.client_id.as_str(), id)?;
                index_units(txn, id, false)?;
            }
            Ok(true)
        })
        .await
    }

    async fn first_poll(&self, job_id: &str) -> Result<bool, StoreError> {
        let job_id = job_id.to_owned();
        // Losing the mark in a crash costs one more 202; an fsync per first poll would cost more.
        self.write(Durability::Eventual, move |txn| {
            let id = job_id.as_str();
            if txn.open_table(JOBS)?.get(id)?.is_none() {
                return Ok(false);
            }
            Ok(txn.open_table(POLLED)?.insert(id, ())?.is_none())
        })
        .await
    }

    async fn record_poll(
        &self,
        job_id: &str,
        now_ms: u64,
        min_interval_ms: u64,
    ) -> Result<bool, StoreError> {
        let job_id = job_id.to_owned();
        self.write(Durability::Eventual, move |txn| {
            let mut polls = txn.open_table(POLLS)?;
            let last = polls.get(job_id.as_str())?.map(|t| t.value());
            if last.is_some_and(|last| now_ms.saturating_sub(last) < min_interval_ms) {
                return Ok(false);
            }
            polls.insert(job_id.as_str(), now_ms)?;
            Ok(true)
        })
        .await
    }

    async fn first_use(
        &self,
        issuer: &str,
        jti: &str,
        now: UnixSecs,
        expires_at: UnixSecs,
    ) -> Result<bool, StoreError> {
        let issuer = issuer.to_owned();
        let jti = jti.to_owned();
        self.write(Durability::Immediate, move |txn| {
            let mut jtis = txn.open_table(JTIS)?;
            let mut expiry = txn.open_table(JTI_EXPIRY)?;
            // Forget a batch of expired entries (expires_at <= now).
            let mut expired = Vec::new();
            for entry in expiry.range(..(now.saturating_add(1), "", ""))? {
                let (key, _) = entry?;
                let (at, iss, id) = key.value();
                expired.push((at, iss.to_owned(), id.to_owned()));
                if expired.len() == JTI_PURGE_BATCH {
                    break;
                }
            }
            for (at, iss, id) in &expired {
                expiry.remove((*at, iss.as_str(), id.as_str()))?;
                jtis.remove((iss.as_str(), id.as_str()))?;
            }
            let key = (issuer.as_str(), jti.as_str());
            if let Some(previous) = jtis.get(key)?.map(|t| t.value()) {
                if previous > now {
                    return Ok(false);
                }
                expiry.remove((previous, issuer.as_str(), jti.as_str()))?;
            }
            if expires_at > now {
                jtis.insert(key, expires_at)?;
                expiry.insert((expires_at, issuer.as_str(), jti.as_str()), ())?;
            }
            Ok(true)
        })
        .await
    }
}
