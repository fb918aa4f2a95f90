//! Export files in an S3-compatible bucket (`object_store`'s `AmazonS3`), under
//! `{prefix}/{job}/{name}`.
//!
//! A file is written as one multipart upload through the low-level, resumable
//! [`MultipartStore`] API rather than `object_store`'s buffered writer: the upload id and every
//! part's ETag go into the unit's checkpoint, so a worker that resumes a unit continues the same
//! upload with the next part number. Bytes are buffered in memory until a part is worth uploading
//! (S3 wants at least 5 MiB for every part but the last); only uploaded parts are durable, and the
//! writer commits a checkpoint only after a part upload (see `export::writer`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::{NDJSON, StorageError, check_name};
use crate::config::S3Config;
use crate::job::{OutputFile, Upload};

/// S3's smallest part (every part of an upload but the last).
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;

#[derive(Debug)]
pub struct S3Bucket {
    store: AmazonS3,
    /// Key prefix without slashes at either end (`""` for none).
    prefix: String,
    part_size: usize,
}

fn s3<'a>(
    op: &'static str,
    key: &'a Path,
) -> impl FnOnce(object_store::Error) -> StorageError + 'a {
    move |source| {
        if !matches!(source, object_store::Error::NotFound { .. }) {
            crate::telemetry::metrics::storage_error("s3");
        }
        StorageError::ObjectStore {
            op,
            key: key.to_string(),
            source: Box::new(source),
        }
    }
}

impl S3Bucket {
    /// Builds the client; credentials not in the configuration come from the environment
    /// (`AWS_ACCESS_KEY_ID`, web identity, instance metadata...). Connects to nothing yet.
    pub fn new(config: &S3Config) -> Result<Self, StorageError> {
        let options = ClientOptions::new().with_content_type_for_suffix("ndjson", NDJSON);
        let mut builder = AmazonS3Builder::from_env()
            .with_client_options(options)
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_allow_http(config.allow_http);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
        }
        let store = builder
            .build()
            .map_err(|e| StorageError::Config(e.to_string()))?;
        Ok(Self {
            store,
            prefix: config.prefix.trim_matches('/').to_owned(),
            part_size: usize::try_from(config.part_size_bytes).unwrap_or(usize::MAX),
        })
    }

    pub fn part_size(&self) -> usize {
        self.part_size
    }

    fn job_prefix(&self, job_id: &str) -> Result<Path, StorageError> {
        check_name(job_id)?;
        Ok(if self.prefix.is_empty() {
            Path::from(job_id)
        } else {
            Path::from(format!("{}/{job_id}", self.prefix))
        })
    }

    pub fn key(&self, job_id: &str, name: &str) -> Result<Path, StorageError> {
        check_name(name)?;
        Ok(self.job_prefix(job_id)?.join(name))
    }

    /// A sink continuing `file`'s committed upload (or starting one at its first part).
    pub fn sink(self: &Arc<Self>, job_id: &str, file: &OutputFile) -> Result<S3Sink, StorageError> {
        let (id, parts) = match &file.upload {
            Some(upload) => (
                Some(upload.id.clone()),
                upload
                    .parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.clone(),
                    })
                    .collect(),
            ),
            None => (None, Vec::new()),
        };
        Ok(S3Sink {
            bucket: self.clone(),
            path: self.key(job_id, &file.name)?,
            id,
            parts,
            buffer: Vec::new(),
        })
    }

    /// Completes a sealed upload. Idempotent: when completion fails because someone completed it
    /// already (a worker that died right after), an object of the expected size is success.
    pub async fn complete(&self, job_id: &str, file: &OutputFile) -> Result<(), StorageError> {
        let Some(upload) = &file.upload else {
            return Ok(());
        };
        let path = self.key(job_id, &file.name)?;
        let parts = upload
            .parts
            .iter()
            .map(|p| PartId {
                content_id: p.clone(),
            })
            .collect();
        match self
            .store
            .complete_multipart(&path, &upload.id, parts)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.store.head(&path).await {
                Ok(meta) if meta.size == file.bytes => Ok(()),
                _ => Err(s3("complete upload", &path)(e)),
            },
        }
    }

    /// Aborts `file`'s upload if it has one, and deletes the object.
    pub async fn discard(&self, job_id: &str, file: &OutputFile) -> Result<(), StorageError> {
        let path = self.key(job_id, &file.name)?;
        if let Some(upload) = &file.upload {
            // Already gone (completed or aborted) is fine.
            let _ = self.store.abort_multipart(&path, &upload.id).await;
        }
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3("delete", &path)(e)),
        }
    }

    /// Deletes every object under the job's prefix.
    pub async fn delete_job(&self, job_id: &str) -> Result<(), StorageError> {
        let prefix = self.job_prefix(job_id)?;
        let locations = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .boxed();
        let mut deleted = self.store.delete_stream(locations);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(s3("delete", &prefix)(e)),
            }
        }
        Ok(())
    }

    /// The object's size, or `None` when it does not exist.
    pub async fn size(&self, job_id: &str, name: &str) -> Result<Option<u64>, StorageError> {
        let path = self.key(job_id, name)?;
        match self.store.head(&path).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3("head", &path)(e)),
        }
    }

    /// Streams the object, or `range` of it (end exclusive).
    pub async fn get(
        &self,
        job_id: &str,
        name: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<BoxStream<'static, std::io::Result<Bytes>>, StorageError> {
        let path = self.key(job_id, name)?;
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&path, options)
            .await
            .map_err(s3("get", &path))?;
        Ok(result.into_stream().map_err(std::io::Error::other).boxed())
    }

    /// A presigned GET URL valid for `expires_in`.
    pub async fn signed_url(
        &self,
        job_id: &str,
        name: &str,
        expires_in: Duration,
    ) -> Result<url::Url, StorageError> {
        let path = self.key(job_id, name)?;
        self.store
            .signed_url(http::Method::GET, &path, expires_in)
            .await
            .map_err(s3("sign", &path))
    }
}

/// One object being written as a multipart upload.
#[derive(Debug)]
pub struct S3Sink {
    bucket: Arc<S3Bucket>,
    path: Path,
    /// Created with the first part, so an object that never gets a part leaves no upload behind.
    id: Option<String>,
    parts: Vec<PartId>,
    buffer: Vec<u8>,
}

impl S3Sink {
    pub fn append(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Uploads the buffer as the next part.
    pub async fn upload_part(&mut self) -> Result<(), StorageError> {
        let store = &self.bucket.store;
        let id = match &self.id {
            Some(id) => id.clone(),
            None => {
                let id = store
                    .create_multipart(&self.path)
                    .await
                    .map_err(s3("create upload", &self.path))?;
                self.id = Some(id.clone());
                id
            }
        };
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let part = store
            .put_part(&self.path, &id, self.parts.len(), data.into())
            .await
            .map_err(s3("upload part", &self.path))?;
        self.parts.push(part);
        Ok(())
    }

    /// The upload as a checkpoint records it.
    pub fn state(&self, sealed: bool) -> Option<Upload> {
        self.id.as_ref().map(|id| Upload {
            id: id.clone(),
            parts: self.parts.iter().map(|p| p.content_id.clone()).collect(),
            sealed,
        })
    }

    /// Uploads what is left as the last part: the file is then ready to be completed.
    pub async fn seal(mut self) -> Result<Option<Upload>, StorageError> {
        if !self.buffer.is_empty() || self.parts.is_empty() {
            self.upload_part().await?;
        }
        Ok(self.state(true))
    }
}
