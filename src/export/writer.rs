//! A unit's part files: NDJSON appended page by page and rolled over at `export.max_file_bytes` /
//! `export.max_file_resources`, whatever the storage.
//!
//! The writer tells the worker when everything written so far is durable, because only then may a
//! checkpoint (with the `next` link of the last page) be saved. On a local disk that is after every
//! page. On object storage bytes are buffered and become durable when uploaded as a part, so the
//! writer commits once the buffers hold `storage.s3.part_size_bytes`: it uploads the open file's
//! buffer as a part (or, when that is below S3's 5 MiB minimum, makes it the file's last part and
//! starts a new file at the next line) and the last parts of files rolled over since. Files whose
//! parts are all uploaded are *sealed*; they are completed only after the checkpoint recording
//! them is saved ([`UnitWriter::settle`]), so a resumed unit never finds its open upload completed
//! behind its back. Memory: at most one part size plus one page per unit.

use super::ndjson::Line;
use crate::job::OutputFile;
use crate::storage::{MIN_PART_BYTES, Sink, Storage, StorageError};

/// Bytes of lines gathered before they are handed to the file's sink.
const APPEND_BYTES: usize = 256 * 1024;

pub struct UnitWriter<'a> {
    storage: &'a Storage,
    job_id: String,
    prefix: String,
    max_bytes: u64,
    max_lines: u64,
    resource_type: String,
    /// Every file, with counts and sizes including buffered lines.
    files: Vec<OutputFile>,
    /// The last file's sink, once opened.
    open: Option<Sink>,
    /// The last file takes no more lines (sealed or complete): the next line starts a new file.
    closed: bool,
    /// Rolled-over files whose last bytes are still buffered, by index in `files`.
    sealing: Vec<(usize, Sink)>,
}

impl<'a> UnitWriter<'a> {
    /// Continues after the committed `files` (empty for a new unit); `prefix` names the files
    /// (`{prefix}.{n}.ndjson`). Sealed uploads a dead worker left are completed now.
    pub async fn resume(
        storage: &'a Storage,
        job_id: &str,
        prefix: String,
        resource_type: &str,
        (max_bytes, max_lines): (u64, u64),
        mut files: Vec<OutputFile>,
    ) -> Result<Self, StorageError> {
        for file in &mut files {
            if file.upload.as_ref().is_some_and(|u| u.sealed) {
                storage.complete(job_id, file).await?;
                file.upload = None;
            }
        }
        // A complete object cannot be appended to.
        let closed =
            storage.part_size().is_some() && files.last().is_some_and(|f| f.upload.is_none());
        Ok(Self {
            storage,
            job_id: job_id.to_owned(),
            prefix,
            max_bytes,
            max_lines,
            resource_type: resource_type.to_owned(),
            files,
            open: None,
            closed,
            sealing: Vec::new(),
        })
    }

    /// The files as the checkpoint should record them: right after [`UnitWriter::write`] returned
    /// true, after [`UnitWriter::finish`] and after [`UnitWriter::settle`].
    pub fn files(&self) -> &[OutputFile] {
        &self.files
    }

    /// Appends `lines`; true when everything written so far is durable (a checkpoint is due).
    pub async fn write(&mut self, lines: &[Line]) -> Result<bool, StorageError> {
        let mut pending: Vec<u8> = Vec::new();
        for line in lines {
            let roll = match self.files.last() {
                None => true,
                Some(last) => {
                    self.closed
                        || (last.count > 0
                            && (last.bytes + line.bytes.len() as u64 > self.max_bytes
                                || last.count >= self.max_lines))
                }
            };
            if roll {
                self.append(&mut pending).await?;
                self.close_last().await?;
                self.files.push(OutputFile {
                    resource_type: self.resource_type.clone(),
                    name: format!("{}.{}.ndjson", self.prefix, self.files.len()),
                    count: 0,
                    bytes: 0,
                    upload: None,
                });
                self.closed = false;
            }
            pending.extend_from_slice(&line.bytes);
            if let Some(last) = self.files.last_mut() {
                last.count += 1;
                last.bytes += line.bytes.len() as u64;
            }
            // Handed on in slices, so a page is not held twice (its lines and one copy of them).
            if pending.len() >= APPEND_BYTES {
                self.append(&mut pending).await?;
            }
        }
        self.append(&mut pending).await?;
        let Some(part_size) = self.storage.part_size() else {
            return Ok(true);
        };
        let buffered: usize = self
            .open
            .iter()
            .chain(self.sealing.iter().map(|(_, sink)| sink))
            .map(Sink::buffered)
            .sum();
        if buffered < part_size {
            return Ok(false);
        }
        self.flush(false).await?;
        Ok(true)
    }

    /// Makes everything durable and seals every file: the unit has no more lines.
    pub async fn finish(&mut self) -> Result<(), StorageError> {
        self.flush(true).await
    }

    /// Completes sealed uploads, once the checkpoint recording them is saved.
    pub async fn settle(&mut self) -> Result<(), StorageError> {
        for file in &mut self.files {
            if file.upload.as_ref().is_some_and(|u| u.sealed) {
                self.storage.complete(&self.job_id, file).await?;
                file.upload = None;
            }
        }
        Ok(())
    }

    /// Removes every file (the unit starts again from scratch).
    pub async fn discard_all(&mut self) {
        self.open = None;
        self.sealing.clear();
        for file in self.files.drain(..) {
            let _ = self.storage.discard(&self.job_id, &file).await;
        }
        self.closed = false;
    }

    /// Appends `pending` to the last file.
    async fn append(&mut self, pending: &mut Vec<u8>) -> Result<(), StorageError> {
        if pending.is_empty() {
            return Ok(());
        }
        if self.open.is_none()
            && let Some(last) = self.files.last()
        {
            // The committed state: what the file held before `pending`.
            let mut committed = last.clone();
            committed.bytes -= pending.len() as u64;
            self.open = Some(self.storage.sink(&self.job_id, &committed).await?);
        }
        if let Some(sink) = self.open.as_mut() {
            sink.append(pending).await?;
        }
        pending.clear();
        Ok(())
    }

    /// The last file takes no more lines; its buffered bytes are uploaded at the next flush.
    async fn close_last(&mut self) -> Result<(), StorageError> {
        let index = self.files.len().wrapping_sub(1);
        let sink = match self.open.take() {
            Some(sink) => Some(sink),
            // A resumed upload that got no new line still needs its completion.
            None if !self.closed && self.files.last().is_some_and(|f| f.upload.is_some()) => {
                let last = &self.files[index];
                Some(self.storage.sink(&self.job_id, last).await?)
            }
            None => None,
        };
        if let Some(sink) = sink.filter(|s| !s.durable_now()) {
            self.sealing.push((index, sink));
        }
        self.closed = true;
        Ok(())
    }

    /// Uploads every buffer. The open file goes on with a new part, unless `last` or its buffer is
    /// below the minimum part size, in which case it is sealed.
    async fn flush(&mut self, last: bool) -> Result<(), StorageError> {
        if last
            || self
                .open
                .as_ref()
                .is_some_and(|s| (s.buffered() as u64) < MIN_PART_BYTES)
        {
            self.close_last().await?;
        }
        for (index, sink) in std::mem::take(&mut self.sealing) {
            let upload = sink.seal().await?;
            self.files[index].upload = upload;
        }
        if let Some(sink) = self.open.as_mut() {
            let upload = sink.upload_part().await?;
            if let Some(file) = self.files.last_mut() {
                file.upload = upload;
            }
        }
        Ok(())
    }
}
