//! The disk worker: executes the state machine's disk operations in emission order.
//!
//! One thread applies operations strictly in order, so a metadata update emitted before a
//! write is on disk before that write starts, and overlapping writes land in the order the
//! machine chose (the order the peer applies them too). `fdatasync` runs on a second
//! thread: a flush needs every write *before* it to be durable, which holds once the
//! ordered thread has issued them, and meanwhile later writes keep flowing. Concurrent
//! sync requests share one `fdatasync`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use bytes::Bytes;
use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use tokio::sync::mpsc::UnboundedSender;

use super::machine::{IoOp, IoOutput, IoTag, MetaStep};
use super::observer::{IoObserver, IoStage};
use super::store::BackingFiles;
use super::verify::block_digests;

pub type Completion = (IoTag, Result<IoOutput, String>);

/// An operation with the moment it was submitted, so the application's share of the
/// disk's time can be measured from the queue's back, not from when its turn came.
type Queued<T> = (T, Instant);

/// Where completions go: the replica core, and the observer for application I/O.
#[derive(Clone, Debug)]
struct Done {
    tx: UnboundedSender<Completion>,
    observer: Option<Arc<dyn IoObserver>>,
}

impl Done {
    fn send(&self, tag: IoTag, submitted: Instant, result: Result<IoOutput, String>) {
        if let (Some(o), IoTag::App(_) | IoTag::AppFlush(_)) = (&self.observer, &tag) {
            o.stage(IoStage::Local, submitted.elapsed());
        }
        let _ = self.tx.send((tag, result));
    }
}

/// Handle to the disk worker threads; dropping it stops them once queued work is done.
#[derive(Debug)]
pub struct DiskWorker {
    tx: mpsc::Sender<Queued<IoOp>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DiskWorker {
    pub fn spawn(
        files: Arc<BackingFiles>,
        done: UnboundedSender<Completion>,
        observer: Option<Arc<dyn IoObserver>>,
    ) -> std::io::Result<DiskWorker> {
        let done = Done { tx: done, observer };
        let (tx, rx) = mpsc::channel::<Queued<IoOp>>();
        let (sync_tx, sync_rx) = mpsc::channel::<Queued<IoTag>>();
        let sync_files = files.clone();
        let sync_done = done.clone();
        let sync = std::thread::Builder::new()
            .name("replica-sync".into())
            .spawn(move || sync_loop(&sync_files, &sync_rx, &sync_done))?;
        let disk = std::thread::Builder::new().name("replica-disk".into()).spawn(move || {
            while let Ok((op, submitted)) = rx.recv() {
                execute(&files, op, submitted, &sync_tx, &done);
            }
        })?;
        Ok(DiskWorker { tx, threads: vec![disk, sync] })
    }

    /// Finishes the queued operations and waits for the threads, which releases the files.
    pub fn join(self) {
        drop(self.tx);
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Queues an operation; false once the worker has stopped.
    pub fn submit(&self, op: IoOp) -> bool {
        self.tx.send((op, Instant::now())).is_ok()
    }
}

fn sync_loop(files: &BackingFiles, rx: &mpsc::Receiver<Queued<IoTag>>, done: &Done) {
    while let Ok(first) = rx.recv() {
        let mut tags = vec![first];
        tags.extend(rx.try_iter());
        let result = files.sync_data().map_err(|e| format!("fdatasync {}: {e}", files.data_path.display()));
        for (tag, submitted) in tags {
            done.send(tag, submitted, result.clone().map(|()| IoOutput::Done));
        }
    }
}

fn execute(files: &BackingFiles, op: IoOp, submitted: Instant, sync: &mpsc::Sender<Queued<IoTag>>, done: &Done) {
    let path = files.data_path.display();
    let finish = |tag: IoTag, result: Result<IoOutput, String>, fua: bool| {
        if fua && result.is_ok() {
            // Durable before the completion: the sync thread reports it.
            if sync.send((tag.clone(), submitted)).is_ok() {
                return;
            }
        }
        done.send(tag, submitted, result);
    };
    match op {
        IoOp::Write { tag, offset, data, fua } => {
            let r = files.data().write_all_at(&data, offset).map_err(|e| format!("write {path} at {offset}: {e}"));
            finish(tag, r.map(|()| IoOutput::Done), fua);
        }
        IoOp::Zero { tag, offset, len, punch, fua } => {
            let r = zero_range(files, offset, len, punch).map_err(|e| format!("zero {path} at {offset}+{len}: {e}"));
            finish(tag, r.map(|()| IoOutput::Done), fua);
        }
        IoOp::Read { tag, offset, len } => {
            let mut buf = vec![0u8; len as usize];
            let r = files.data().read_exact_at(&mut buf, offset).map_err(|e| format!("read {path} at {offset}: {e}"));
            finish(tag, r.map(|()| IoOutput::Data(Bytes::from(buf))), false);
        }
        IoOp::Digest { tag, offset, len } => {
            let mut buf = vec![0u8; len as usize];
            let r = files.data().read_exact_at(&mut buf, offset).map_err(|e| format!("read {path} at {offset}: {e}"));
            finish(tag, r.map(|()| IoOutput::Digests(block_digests(&buf))), false);
        }
        IoOp::Flush { tag } => {
            if sync.send((tag.clone(), submitted)).is_err() {
                done.send(tag, submitted, Err("the sync thread has stopped".into()));
            }
        }
        IoOp::Meta { tag, steps } => {
            let r = run_meta(files, steps);
            if let Some(tag) = tag {
                done.send(tag, submitted, r.map(|()| IoOutput::Done));
            } else if let Err(e) = r {
                // Untagged updates (activity log, tracking) have no caller to tell; the
                // failure surfaces through the next tagged update or write.
                tracing::error!(error = %e, "metadata update failed");
            }
        }
    }
}

fn run_meta(files: &BackingFiles, steps: Vec<MetaStep>) -> Result<(), String> {
    let meta = files.meta_path.display();
    for step in steps {
        match step {
            MetaStep::Write { offset, bytes } => files
                .write_meta_durable(offset, &bytes)
                .map_err(|e| format!("write metadata {meta} at {offset}: {e}"))?,
            MetaStep::SyncData => {
                files.sync_data().map_err(|e| format!("fdatasync {}: {e}", files.data_path.display()))?
            }
        }
    }
    Ok(())
}

/// Makes `[offset, offset + len)` read as zeroes, deallocating it when `punch` and the
/// backing supports it. Both replicas end up with zeroes either way, which keeps them
/// identical even where the protocol lets a trimmed range read as anything.
pub fn zero_range(files: &BackingFiles, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
    zero_file_range(files.data(), offset, len, punch)
}

/// [`zero_range`] on any file or block device: `fallocate` (which block devices turn into a
/// discard or write-zeroes), or plain zero writes where that is not supported.
pub fn zero_file_range(file: &File, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    if len == 0 {
        return Ok(());
    }
    let mode = if punch {
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
    } else {
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
    };
    match fallocate(file, mode, off, l) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENODEV) => write_zeroes(file, offset, len),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
