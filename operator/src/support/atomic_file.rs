//! Files the controller must never leave half-written: write to a temporary file in the same
//! directory, fsync it, rename it over the target, fsync the directory.
//!
//! A crash at any point leaves either the old or the new content, never a mix; readers
//! (including a restarted controller) always see a complete JSON document.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("{path}: cannot encode: {source}")]
    Encode { path: PathBuf, source: serde_json::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.to_path_buf(), source }
}

/// Replaces `path` with `bytes`, atomically. `mode` applies to the new file (e.g. 0o600 for
/// private keys and secrets), so the content is never visible with wider permissions.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file =
            OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io_err(&tmp))?;
        // `mode` is filtered by the umask at creation; set it explicitly so 0600 means 0600.
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(io_err(&tmp))?;
        file.write_all(bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Serializes `value` as pretty JSON and writes it atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), FileError> {
    let mut bytes =
        serde_json::to_vec_pretty(value).map_err(|source| FileError::Encode { path: path.to_path_buf(), source })?;
    bytes.push(b'\n');
    write(path, &bytes, mode)
}

/// Reads a JSON file; `Ok(None)` when it does not exist yet.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, FileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FileError::Io { path: path.to_path_buf(), source }),
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de)
        .map(Some)
        .map_err(|e| FileError::Decode { path: path.to_path_buf(), message: format!("{}: {}", e.path(), e.inner()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_replace_whole_content_with_the_given_mode() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state.json");
        write_json(&path, &vec![1, 2, 3], 0o600)?;
        write_json(&path, &vec![4], 0o600)?;
        assert_eq!(read_json::<Vec<u32>>(&path)?, Some(vec![4]));
        assert_eq!(fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }

    #[test]
    fn missing_is_none_and_garbage_names_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.json");
        assert_eq!(read_json::<Vec<u32>>(&path)?, None);
        fs::write(&path, "[1, \"two\"]")?;
        let err = read_json::<Vec<u32>>(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("x.json: not valid JSON: [1]"), "{err}");
        Ok(())
    }
}
