//! A unit's part files: NDJSON appended page by page, made durable before the checkpoint that
//! records their size, and rolled over at `export.max_file_bytes` / `export.max_file_resources`.

use tokio::fs::File;

use super::ndjson::Line;
use crate::job::OutputFile;
use crate::storage::{Storage, StorageError};

pub struct UnitWriter<'a> {
    storage: &'a Storage,
    job_id: String,
    prefix: String,
    max_bytes: u64,
    max_lines: u64,
    resource_type: String,
    /// The open last file, if any.
    open: Option<File>,
}

impl<'a> UnitWriter<'a> {
    /// `prefix` names the files (`{prefix}.{n}.ndjson`).
    pub fn new(
        storage: &'a Storage,
        job_id: &str,
        prefix: String,
        resource_type: &str,
        max_bytes: u64,
        max_lines: u64,
    ) -> Self {
        Self {
            storage,
            job_id: job_id.to_owned(),
            prefix,
            max_bytes,
            max_lines,
            resource_type: resource_type.to_owned(),
            open: None,
        }
    }

    /// Appends `lines` after the committed state in `files` (updated in place). Bytes past the
    /// committed size of the last file (a crashed writer's) are discarded first.
    pub async fn write(
        &mut self,
        files: &mut Vec<OutputFile>,
        lines: &[Line],
    ) -> Result<(), StorageError> {
        let mut pending: Vec<u8> = Vec::new();
        for line in lines {
            let roll = match files.last() {
                None => true,
                Some(last) => {
                    let bytes = last.bytes + pending.len() as u64;
                    let count = last.count;
                    count > 0
                        && (bytes + line.bytes.len() as u64 > self.max_bytes
                            || count >= self.max_lines)
                }
            };
            if roll {
                self.flush(files, &mut pending).await?;
                files.push(OutputFile {
                    resource_type: self.resource_type.clone(),
                    name: format!("{}.{}.ndjson", self.prefix, files.len()),
                    count: 0,
                    bytes: 0,
                });
                self.open = None;
            }
            pending.extend_from_slice(&line.bytes);
            if let Some(last) = files.last_mut() {
                last.count += 1;
            }
        }
        self.flush(files, &mut pending).await
    }

    async fn flush(
        &mut self,
        files: &mut [OutputFile],
        pending: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        let Some(last) = files.last_mut() else {
            return Ok(());
        };
        if pending.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(
                self.storage
                    .open_at(&self.job_id, &last.name, last.bytes)
                    .await?,
            );
        }
        if let Some(file) = self.open.as_mut() {
            self.storage.append(file, pending, &last.name).await?;
        }
        last.bytes += pending.len() as u64;
        pending.clear();
        Ok(())
    }
}
