//! Deleting a job and its files: what a client's `DELETE` on the status URL does (SPEC A7), what
//! the operator's `jobs cancel` does, and what the sweeper does to an expired job — one code path.

use crate::job::Job;
use crate::storage::{Storage, StorageError};
use crate::store::{JobStore, StoreError};

/// Deletes `job`'s record, then its files. Returns whether the record still existed (false when
/// someone else deleted it meanwhile; its files are removed all the same).
///
/// The record goes first: workers notice at their next checkpoint and stop, and the job is gone
/// for its client from here on, whatever happens to its files. A file that cannot be removed is
/// logged, not returned: the job is deleted either way.
pub async fn delete_job(
    store: &dyn JobStore,
    storage: &Storage,
    job: &Job,
) -> Result<bool, StoreError> {
    // The files the records know of (unfinished uploads among them are aborted).
    let files = super::sweep::job_files(job, store.units(&job.id).await.ok());
    let existed = store.delete_job(&job.id).await?;
    match storage.delete_job(&job.id, &files).await {
        Ok(()) => {}
        // A worker wrote a page into the directory while it was removed: that worker removes the
        // job's files itself when its next checkpoint finds the job gone.
        Err(StorageError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::DirectoryNotEmpty =>
        {
            tracing::debug!(job = %job.id, "a cancelled unit is still writing; it removes the files");
        }
        Err(e) => {
            tracing::warn!(job = %job.id, error = %e, "export deleted, but not all of its files")
        }
    }
    Ok(existed)
}
