//! Reading a file a user points us at without trusting what it is.
//!
//! A manifest directory or a `--bundle` path may hold anything: a FIFO, whose `open`
//! blocks until a writer appears (freezing whichever task read it), a device, whose
//! read never ends, a symlink loop, or a file of gigabytes. Each is refused with an error
//! that says what the path is, and no read ever waits for a writer or grows past a limit.

use std::fs::FileType;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum RegularFileError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is larger than the {limit} bytes allowed")]
    TooLarge { limit: usize },
    #[error("is not UTF-8 text (byte {offset})")]
    NotText { offset: usize },
}

/// Reads `path` as UTF-8 text of at most `limit` bytes, following symlinks, refusing
/// anything that is not a regular file.
pub fn read_text(path: &Path, limit: usize) -> Result<String, RegularFileError> {
    // O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer; the
    // type is then checked on the open handle, so a swap between check and open is caught.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(RegularFileError::NotRegular(describe(meta.file_type())));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(limit).min(limit) + 1);
    // One byte past the limit tells "exactly at the limit" from "over it" even when the
    // file grows while being read.
    Read::by_ref(&mut (&file)).take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(RegularFileError::TooLarge { limit });
    }
    String::from_utf8(bytes).map_err(|e| RegularFileError::NotText { offset: e.utf8_error().valid_up_to() })
}

fn describe(kind: FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hapair-regular-file-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_a_regular_file_and_refuses_everything_else_without_blocking() {
        let dir = scratch();
        std::fs::write(dir.join("ok.yaml"), "a: 1\n").unwrap();
        assert_eq!(read_text(&dir.join("ok.yaml"), 100).unwrap(), "a: 1\n");

        let fifo = dir.join("fifo.yaml");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert_eq!(read_text(&fifo, 100).unwrap_err().to_string(), "is a FIFO, not a regular file");

        assert_eq!(
            read_text(Path::new("/dev/zero"), 100).unwrap_err().to_string(),
            "is a character device, not a regular file"
        );
        assert_eq!(read_text(&dir, 100).unwrap_err().to_string(), "is a directory, not a regular file");

        std::os::unix::fs::symlink(dir.join("loop-b"), dir.join("loop-a")).unwrap();
        std::os::unix::fs::symlink(dir.join("loop-a"), dir.join("loop-b")).unwrap();
        let err = read_text(&dir.join("loop-a"), 100).unwrap_err().to_string();
        assert!(err.contains("symbolic links"), "{err}");

        std::fs::write(dir.join("big.yaml"), "x".repeat(101)).unwrap();
        assert_eq!(
            read_text(&dir.join("big.yaml"), 100).unwrap_err().to_string(),
            "is larger than the 100 bytes allowed"
        );
        std::fs::write(dir.join("exact.yaml"), "x".repeat(100)).unwrap();
        assert_eq!(read_text(&dir.join("exact.yaml"), 100).unwrap().len(), 100);

        std::fs::write(dir.join("bin.yaml"), b"ab\xffcd").unwrap();
        assert_eq!(read_text(&dir.join("bin.yaml"), 100).unwrap_err().to_string(), "is not UTF-8 text (byte 2)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
