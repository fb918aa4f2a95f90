//! Where export files live: a local directory (the default) or an S3-compatible bucket
//! (`storage.backend`). The worker and the writer see one API, [`Storage`] and its [`Sink`]s; they
//! differ in one thing the writer must respect: a local append is durable at once, while an
//! object's bytes are durable only once uploaded as a part (see [`Sink::durable_now`]).
//!
//! Names are chosen by the proxy (never by clients): a job id is a UUID and a file name is built
//! from a resource type and numbers, and both are checked again here so no path or key can escape
//! the root or prefix.

mod local;
mod s3;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufRead;

pub use local::{LocalDir, LocalSink};
pub use s3::{MIN_PART_BYTES, S3Bucket, S3Sink};

use crate::config::{StorageBackend, StorageConfig};
use crate::job::{OutputFile, Upload};

/// Media type of NDJSON export files (SPEC A9.4), also stored on objects.
pub const NDJSON: &str = "application/fhir+ndjson";

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
    #[error("object storage: {op} failed for {key}: {source}")]
    ObjectStore {
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("object storage configuration: {0}")]
    Config(String),
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

#[derive(Debug, Clone)]
pub struct Storage {
    backend: Backend,
    presigned_urls: bool,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(LocalDir),
    S3(Arc<S3Bucket>),
}

/// A file open for appending.
#[derive(Debug)]
pub enum Sink {
    Local(LocalSink),
    S3(S3Sink),
}

impl Sink {
    /// Appends bytes: durable on return for a local file, buffered for an object.
    pub async fn append(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        match self {
            Self::Local(file) => file.append(bytes).await,
            Self::S3(object) => {
                object.append(bytes);
                Ok(())
            }
        }
    }

    /// Bytes appended but not yet durable.
    pub fn buffered(&self) -> usize {
        match self {
            Self::Local(_) => 0,
            Self::S3(object) => object.buffered(),
        }
    }

    /// Whether every append is durable when it returns (so any page may be checkpointed).
    pub fn durable_now(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    /// Makes the buffer durable as a part of an upload that goes on.
    pub async fn upload_part(&mut self) -> Result<Option<Upload>, StorageError> {
        match self {
            Self::Local(_) => Ok(None),
            Self::S3(object) => {
                object.upload_part().await?;
                Ok(object.state(false))
            }
        }
    }

    /// Makes everything durable; no more bytes will come. An object is then ready to complete.
    pub async fn seal(self) -> Result<Option<Upload>, StorageError> {
        match self {
            Self::Local(_) => Ok(None),
            Self::S3(object) => object.seal().await,
        }
    }
}

impl Storage {
    pub fn local(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        Ok(Self {
            backend: Backend::Local(LocalDir::new(root)?),
            presigned_urls: false,
        })
    }

    pub fn from_config(config: &StorageConfig) -> Result<Self, StorageError> {
        match config.backend {
            StorageBackend::Local => Self::local(&config.path),
            StorageBackend::S3 => Ok(Self {
                backend: Backend::S3(Arc::new(S3Bucket::new(&config.s3)?)),
                presigned_urls: config.presigned_urls,
            }),
        }
    }

    /// Whether manifests carry presigned object URLs (`requiresAccessToken: false`).
    pub fn presigned_urls(&self) -> bool {
        self.presigned_urls && matches!(self.backend, Backend::S3(_))
    }

    /// Buffered bytes worth a part upload, for storage whose appends are not durable at once.
    pub fn part_size(&self) -> Option<usize> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::S3(bucket) => Some(bucket.part_size()),
        }
    }

    /// The local path of a job's file (`None` for object storage).
    pub fn local_path(&self, job_id: &str, name: &str) -> Result<Option<PathBuf>, StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.path(job_id, name).map(Some),
            Backend::S3(_) => Ok(None),
        }
    }

    /// Opens `file` for appending after its committed state: a local file is cut back to its
    /// committed size (bytes a dead worker wrote after its last checkpoint go), an object's
    /// upload goes on after its committed parts (parts uploaded later are overwritten).
    pub async fn sink(&self, job_id: &str, file: &OutputFile) -> Result<Sink, StorageError> {
        match &self.backend {
            Backend::Local(dir) => Ok(Sink::Local(
                dir.open_at(job_id, &file.name, file.bytes).await?,
            )),
            Backend::S3(bucket) => Ok(Sink::S3(bucket.sink(job_id, file)?)),
        }
    }

    /// Completes `file` if it is a sealed upload (idempotent); a no-op otherwise.
    pub async fn complete(&self, job_id: &str, file: &OutputFile) -> Result<(), StorageError> {
        match (&self.backend, &file.upload) {
            (Backend::S3(bucket), Some(upload)) if upload.sealed => {
                bucket.complete(job_id, file).await
            }
            _ => Ok(()),
        }
    }

    /// Removes a file, aborting its upload if it has one.
    pub async fn discard(&self, job_id: &str, file: &OutputFile) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.remove(job_id, &file.name).await,
            Backend::S3(bucket) => bucket.discard(job_id, file).await,
        }
    }

    /// Deletes every file of a job. `files` are the job's files as its units' checkpoints know
    /// them: unfinished uploads among them are aborted (object storage cannot list them by
    /// prefix through `object_store`; a bucket lifecycle rule catches any left by a crash).
    pub async fn delete_job(&self, job_id: &str, files: &[OutputFile]) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(dir) => dir.delete_job(job_id).await,
            Backend::S3(bucket) => {
                for file in files.iter().filter(|f| f.upload.is_some()) {
                    bucket.discard(job_id, file).await?;
                }
                bucket.delete_job(job_id).await
            }
        }
    }

    /// Reads a file from its start.
    pub async fn reader(
        &self,
        job_id: &str,
        name: &str,
    ) -> Result<Box<dyn AsyncBufRead + Send + Unpin>, StorageError> {
        match &self.backend {
            Backend::Local(dir) => Ok(Box::new(tokio::io::BufReader::new(
                dir.open(job_id, name).await?,
            ))),
            Backend::S3(bucket) => Ok(Box::new(tokio_util::io::StreamReader::new(
                bucket.get(job_id, name, None).await?,
            ))),
        }
    }

    /// An object's size (`None` when it does not exist); object storage only.
    pub async fn object_size(&self, job_id: &str, name: &str) -> Result<Option<u64>, StorageError> {
        match &self.backend {
            Backend::Local(_) => Ok(None),
            Backend::S3(bucket) => bucket.size(job_id, name).await,
        }
    }

    /// Streams an object or a range of it (end exclusive); object storage only.
    pub async fn object_stream(
        &self,
        job_id: &str,
        name: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>, StorageError>
    {
        match &self.backend {
            Backend::Local(_) => Err(StorageError::Config(
                "object streams need object storage".into(),
            )),
            Backend::S3(bucket) => bucket.get(job_id, name, range).await,
        }
    }

    /// A presigned GET URL for a job's file, valid for `expires_in`; `None` for local storage.
    pub async fn signed_url(
        &self,
        job_id: &str,
        name: &str,
        expires_in: Duration,
    ) -> Result<Option<url::Url>, StorageError> {
        match &self.backend {
            Backend::Local(_) => Ok(None),
            Backend::S3(bucket) => bucket.signed_url(job_id, name, expires_in).await.map(Some),
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
            assert!(storage.local_path("job", bad).is_err(), "{bad}");
            assert!(storage.local_path(bad, "f.ndjson").is_err(), "{bad}");
        }
        assert!(
            storage
                .local_path("0b7f-11", "Observation.u3.0.ndjson")
                .is_ok()
        );
    }
}
