//! Export files in a local directory, one sub-directory per job. Every append is written and
//! fsynced before it returns, so each page is durable on its own and a checkpoint may follow any
//! page. Several replicas serving downloads need the directory on a shared volume.

use std::path::{Path, PathBuf};

use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;

use super::{StorageError, check_name};

#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| {
        // A missing file is an answer (404, nothing to delete), not a storage failure.
        if source.kind() != std::io::ErrorKind::NotFound {
            crate::telemetry::metrics::storage_error("local");
        }
        StorageError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// A local file open for appending.
#[derive(Debug)]
pub struct LocalSink {
    file: File,
    path: PathBuf,
}

impl LocalSink {
    /// Appends `bytes` and makes them durable before returning.
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.file.write_all(bytes).await.map_err(io(&self.path))?;
        self.file.flush().await.map_err(io(&self.path))?;
        self.file.sync_data().await.map_err(io(&self.path))?;
        Ok(())
    }
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root })
    }

    /// The path of a job's file.
    pub fn path(&self, job_id: &str, name: &str) -> Result<PathBuf, StorageError> {
        check_name(job_id)?;
        check_name(name)?;
        Ok(self.root.join(job_id).join(name))
    }

    /// Opens a file for appending after its first `committed` bytes; anything past them (written
    /// after the last checkpoint by a worker that died) is discarded.
    pub async fn open_at(
        &self,
        job_id: &str,
        name: &str,
        committed: u64,
    ) -> Result<LocalSink, StorageError> {
        let path = self.path(job_id, name)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await.map_err(io(dir))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .map_err(io(&path))?;
        file.set_len(committed).await.map_err(io(&path))?;
        Ok(LocalSink { file, path })
    }

    pub async fn remove(&self, job_id: &str, name: &str) -> Result<(), StorageError> {
        let path = self.path(job_id, name)?;
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// Deletes every file of a job.
    pub async fn delete_job(&self, job_id: &str) -> Result<(), StorageError> {
        check_name(job_id)?;
        let dir = self.root.join(job_id);
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&dir)(e)),
            _ => Ok(()),
        }
    }

    pub async fn open(&self, job_id: &str, name: &str) -> Result<File, StorageError> {
        let path = self.path(job_id, name)?;
        File::open(&path).await.map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reopening_discards_uncommitted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalDir::new(dir.path()).unwrap();
        let mut file = storage.open_at("j", "f.ndjson", 0).await.unwrap();
        file.append(b"line1\nline2\n").await.unwrap();
        drop(file);
        let mut file = storage.open_at("j", "f.ndjson", 6).await.unwrap();
        file.append(b"line3\n").await.unwrap();
        let text = tokio::fs::read_to_string(storage.path("j", "f.ndjson").unwrap())
            .await
            .unwrap();
        assert_eq!(text, "line1\nline3\n");
    }
}
