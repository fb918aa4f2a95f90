//! Where export files live: a local directory (one sub-directory per job). Several replicas
//! serving downloads need it on a shared volume; object storage is a later addition.
//!
//! Names are chosen by the proxy (never by clients): a job id is a UUID and a file name is built
//! from a resource type and numbers, and both are checked again here so no path can escape the root.

use std::path::{Path, PathBuf};

use tokio::fs::{File, OpenOptions};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed for {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid storage name {0:?}")]
    InvalidName(String),
}

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A job id or file name is `[A-Za-z0-9._-]`, not starting with a dot.
fn check_name(name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidName(name.to_owned()))
    }
}

impl Storage {
    pub fn local(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
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
    ) -> Result<File, StorageError> {
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
        Ok(file)
    }

    /// Appends `bytes` and makes them durable before returning.
    pub async fn append(
        &self,
        file: &mut File,
        bytes: &[u8],
        path_hint: &str,
    ) -> Result<(), StorageError> {
        let hint = Path::new(path_hint);
        file.write_all(bytes).await.map_err(io(hint))?;
        file.flush().await.map_err(io(hint))?;
        file.sync_data().await.map_err(io(hint))?;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_the_root() {
        let storage = Storage::local(std::env::temp_dir().join("fbp-storage-test")).unwrap();
        for bad in ["..", "../x", "a/b", ".hidden", "", "a\\b", "x%2f"] {
            assert!(storage.path("job", bad).is_err(), "{bad}");
            assert!(storage.path(bad, "f.ndjson").is_err(), "{bad}");
        }
        assert!(storage.path("0b7f-11", "Observation.u3.0.ndjson").is_ok());
    }

    #[tokio::test]
    async fn reopening_discards_uncommitted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::local(dir.path()).unwrap();
        let mut file = storage.open_at("j", "f.ndjson", 0).await.unwrap();
        storage
            .append(&mut file, b"line1\nline2\n", "f")
            .await
            .unwrap();
        drop(file);
        let mut file = storage.open_at("j", "f.ndjson", 6).await.unwrap();
        storage.append(&mut file, b"line3\n", "f").await.unwrap();
        let text = tokio::fs::read_to_string(storage.path("j", "f.ndjson").unwrap())
            .await
            .unwrap();
        assert_eq!(text, "line1\nline3\n");
    }
}
