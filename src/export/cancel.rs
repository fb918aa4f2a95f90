//! Deleting a job and its files: what a client's `DELETE` on the status URL does (SPEC A7), what
//! the operator's `jobs cancel` does, and what the sweeper does to an expired job — one code path.
//! And the other side of it: a worker or finisher that finds its job deleted under it removes what
//! it wrote meanwhile (`Exporter::remove_if_deleted`).

use super::exporter::Exporter;
use crate::job::{Job, OutputFile, Unit};
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
    let files = job_files(job, store.units(&job.id).await.ok());
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

/// Every file a job's records know of (manifest files and units' part files), so that deleting
/// the job aborts unfinished uploads too.
pub fn job_files(job: &Job, units: Option<Vec<Unit>>) -> Vec<OutputFile> {
    let mut files: Vec<OutputFile> = job.output.iter().chain(&job.error_files).cloned().collect();
    for unit in units.into_iter().flatten() {
        files.extend(unit.checkpoint.files);
    }
    files
}

impl Exporter {
    /// Removes a stopped unit's part files, and the job's if it is gone.
    pub(super) async fn discard_unit_files(&self, unit: &Unit) {
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
