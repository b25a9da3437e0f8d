//! What an NBD export serves: the [`BlockExport`] trait, and [`FileExport`], a plain file
//! served without replication (the baseline the benchmarks compare replication against).

use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::proto::Errno;

/// A failed export operation: the NBD error number and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    pub errno: Errno,
    pub message: String,
}

impl ExportError {
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        ExportError { errno, message: message.into() }
    }
}

/// A block device as the NBD server sees it. Offsets and lengths are already validated
/// against [`BlockExport::size`].
pub trait BlockExport: Send + Sync + 'static {
    fn name(&self) -> String;
    fn size(&self) -> u64;
    /// Whether new clients see the export as read-only.
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, ExportError>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), ExportError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// Makes the range read as zeroes; `may_trim` allows deallocating it.
    fn zero(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send;
    /// A client entered (or left) the transmission phase.
    fn client_attached(&self) {}
    fn client_detached(&self) {}
}

/// A file (or block device) served directly.
#[derive(Debug, Clone)]
pub struct FileExport {
    name: String,
    file: Arc<std::fs::File>,
    size: u64,
}

impl FileExport {
    pub fn open(name: &str, path: &Path) -> std::io::Result<FileExport> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileExport { name: name.to_string(), file: Arc::new(file), size })
    }
}

fn io(e: std::io::Error) -> ExportError {
    ExportError::new(Errno::Io, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ExportError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ExportError::new(Errno::Io, e.to_string()))?.map_err(io)
}

impl BlockExport for FileExport {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let file = self.file.clone();
        blocking(move || {
            file.write_all_at(&data, offset)?;
            if fua { file.sync_data() } else { Ok(()) }
        })
        .await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        let file = self.file.clone();
        blocking(move || file.sync_data()).await
    }

    async fn zero(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), ExportError> {
        let file = self.file.clone();
        blocking(move || {
            use nix::fcntl::{FallocateFlags, fallocate};
            let mode = if may_trim {
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            };
            let (off, l) = (i64::try_from(offset), i64::try_from(len));
            match (off, l) {
                (Ok(off), Ok(l)) if fallocate(&*file, mode, off, l).is_ok() => {}
                _ => file.write_all_at(&vec![0u8; len as usize], offset)?,
            }
            if fua { file.sync_data() } else { Ok(()) }
        })
        .await
    }
}
