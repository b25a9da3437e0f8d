//! The agent's local state directory: what it must remember across restarts (the last
//! accepted desired config; each group's role, epoch and lease facts).
//!
//! Every file is written atomically (temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a crash leaves either the old or the new content. Each file
//! starts with a header line carrying a format version, the body length and a CRC32C of
//! the body, so a torn or edited file is recognised. A file that fails any check is
//! renamed aside (`<name>.corrupt-<unix seconds>`) and reported; it is never used.
//!
//! The files hold secrets (the desired config carries each group's heartbeat key inline),
//! so the directory is kept `0700` and every file in it `0600`: created so, and tightened
//! when the agent opens a directory an older agent or an administrator left wider.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;

const FORMAT: &str = "hapair-state v1";

/// Mode of the state directory: the agent's alone.
pub const DIR_MODE: u32 = 0o700;

/// Mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file name {0:?} must be a plain file name")]
    BadName(String),
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("state {name}: cannot encode: {source}")]
    Encode { name: String, source: serde_json::Error },
}

/// What loading a state file found.
#[derive(Debug, PartialEq)]
pub enum Loaded<T> {
    /// No such file: a first start.
    Missing,
    Found(T),
    /// The file was unusable; it was moved to `moved_to` and must be reported.
    Corrupt {
        reason: String,
        moved_to: PathBuf,
    },
}

/// A directory of checksummed, atomically written JSON documents.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Opens (creating if needed) the state directory, and takes away whatever access
    /// group and others have to it and to the files in it.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StateError> {
        let dir = dir.into();
        let io = |source| StateError::Io { path: dir.clone(), source };
        // Parents it has to create get the same mode: they lead only to this directory.
        fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir).map_err(io)?;
        // Followed if the directory is a symlink: its target is what holds the files.
        let meta = fs::metadata(&dir).map_err(io)?;
        restrict(&dir, &meta, DIR_MODE)?;
        for entry in fs::read_dir(&dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let path = entry.path();
            // Not followed: a symlink's target may be anything, outside the directory.
            let meta = entry.metadata().map_err(|source| StateError::Io { path: path.clone(), source })?;
            if meta.is_file() {
                restrict(&path, &meta, FILE_MODE)?;
            }
        }
        Ok(StateStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> Result<PathBuf, StateError> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !plain {
            return Err(StateError::BadName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    /// Replaces `name` with `value`, atomically and durably.
    pub fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let path = self.path(name)?;
        let body =
            serde_json::to_vec_pretty(value).map_err(|source| StateError::Encode { name: name.to_string(), source })?;
        let mut content = format!("{FORMAT} len={} crc32c={:08x}\n", body.len(), crc32c::crc32c(&body)).into_bytes();
        content.extend_from_slice(&body);
        content.push(b'\n');
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let io = |source| StateError::Io { path: tmp.clone(), source };
        let mut file =
            OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(&tmp).map_err(io)?;
        // `mode` applies only when the file is created; a temporary file left by a crashed
        // run keeps its own, so it is set on the open file before the secrets go in.
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE)).map_err(io)?;
        file.write_all(&content).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|source| StateError::Io { path: path.clone(), source })?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StateError::Io { path: self.dir.clone(), source })
    }

    /// Reads `name`. A corrupt file is moved aside and reported, never returned.
    pub fn load<T: DeserializeOwned>(&self, name: &str) -> Result<Loaded<T>, StateError> {
        let path = self.path(name)?;
        let content = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Missing),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        match decode(&content) {
            Ok(value) => Ok(Loaded::Found(value)),
            Err(reason) => {
                let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let mut moved_to = self.dir.join(format!("{name}.corrupt-{stamp}"));
                let mut n = 1;
                while moved_to.exists() {
                    moved_to = self.dir.join(format!("{name}.corrupt-{stamp}-{n}"));
                    n += 1;
                }
                fs::rename(&path, &moved_to).map_err(|source| StateError::Io { path: path.clone(), source })?;
                tracing::warn!(file = %path.display(), moved_to = %moved_to.display(), %reason, "corrupt state file set aside");
                Ok(Loaded::Corrupt { reason, moved_to })
            }
        }
    }

    /// Removes `name` if present.
    pub fn remove(&self, name: &str) -> Result<(), StateError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StateError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    /// A typed handle on one file.
    pub fn file<T>(&self, name: &str) -> Result<StateFile<T>, StateError> {
        self.path(name)?;
        Ok(StateFile { store: self.clone(), name: name.to_string(), _type: PhantomData })
    }
}

/// Clears the permission bits of `path` outside `allowed` (group and other access, setuid,
/// setgid, sticky), keeping what the owner has.
fn restrict(path: &Path, meta: &fs::Metadata, allowed: u32) -> Result<(), StateError> {
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !allowed == 0 {
        return Ok(());
    }
    let tightened = mode & allowed;
    fs::set_permissions(path, fs::Permissions::from_mode(tightened))
        .map_err(|source| StateError::Io { path: path.to_path_buf(), source })?;
    tracing::warn!(path = %path.display(), from = format!("{mode:04o}"), to = format!("{tightened:04o}"), "state file or directory was open to others; tightened");
    Ok(())
}

fn decode<T: DeserializeOwned>(content: &[u8]) -> Result<T, String> {
    let newline = content.iter().position(|b| *b == b'\n').ok_or("no header line")?;
    let header = std::str::from_utf8(&content[..newline]).map_err(|_| "header is not text")?;
    let fields = header.strip_prefix(FORMAT).ok_or_else(|| format!("unknown format {header:?}"))?;
    let mut len = None;
    let mut crc = None;
    for field in fields.split_whitespace() {
        match field.split_once('=') {
            Some(("len", v)) => len = v.parse::<usize>().ok(),
            Some(("crc32c", v)) => crc = u32::from_str_radix(v, 16).ok(),
            _ => return Err(format!("unexpected header field {field:?}")),
        }
    }
    let (len, crc) = len.zip(crc).ok_or("header lacks len or crc32c")?;
    let rest = &content[newline + 1..];
    let body = rest.get(..len).ok_or_else(|| format!("body is {} bytes, header says {len}", rest.len()))?;
    if rest.len() > len + 1 || rest.get(len..).is_some_and(|tail| tail != b"\n" && !tail.is_empty()) {
        return Err("trailing bytes after the body".into());
    }
    let actual = crc32c::crc32c(body);
    if actual != crc {
        return Err(format!("checksum mismatch: header {crc:08x}, body {actual:08x}"));
    }
    serde_json::from_slice(body).map_err(|e| format!("body does not decode: {e}"))
}

/// One state file holding a `T`.
#[derive(Debug)]
pub struct StateFile<T> {
    store: StateStore,
    name: String,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned> StateFile<T> {
    pub fn save(&self, value: &T) -> Result<(), StateError> {
        self.store.save(&self.name, value)
    }

    pub fn load(&self) -> Result<Loaded<T>, StateError> {
        self.store.load(&self.name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// File holding the last accepted `DesiredConfig`.
pub const DESIRED_CONFIG: &str = "desired-config.json";

/// File holding one group's persisted facts.
pub fn group_file_name(group: &hapair_crds::nodeapi::GroupKey) -> String {
    format!("group-{}-{}.json", group.namespace, group.name)
}

/// A record with an explicit schema version, so a future agent can tell an old layout from
/// a corrupt one.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub version: u32,
    #[serde(flatten)]
    pub record: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
    struct Facts {
        role: String,
        epoch: u64,
    }

    fn store() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = StateStore::open(dir.path().join("state")).unwrap_or_else(|e| panic!("{e}"));
        (dir, store)
    }

    fn facts(epoch: u64) -> Versioned<Facts> {
        Versioned { version: 1, record: Facts { role: "Primary".into(), epoch } }
    }

    #[test]
    fn saved_state_survives_a_reopen() {
        let (dir, store) = store();
        let file = store.file::<Versioned<Facts>>("group-db-pg.json").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.load().ok(), Some(Loaded::Missing));
        file.save(&facts(3)).unwrap_or_else(|e| panic!("{e}"));
        file.save(&facts(4)).unwrap_or_else(|e| panic!("{e}"));
        let reopened = StateStore::open(dir.path().join("state")).unwrap_or_else(|e| panic!("{e}"));
        let loaded: Loaded<Versioned<Facts>> = reopened.load("group-db-pg.json").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded, Loaded::Found(facts(4)));
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        assert_eq!(names, vec!["group-db-pg.json".to_string()], "no temporary file is left behind");
        let text = fs::read_to_string(store.dir().join("group-db-pg.json")).unwrap_or_default();
        assert!(text.starts_with("hapair-state v1 len="), "{text}");
        assert!(text.contains("\"version\": 1"), "{text}");
    }

    #[test]
    fn corrupt_files_are_set_aside_and_reported() {
        let (_dir, store) = store();
        type Damage = Box<dyn Fn(&str) -> String>;
        let cases: [(&str, Damage); 5] = [
            ("checksum", Box::new(|t: &str| t.replacen("\"epoch\": 4", "\"epoch\": 5", 1))),
            ("truncated", Box::new(|t: &str| t[..t.len() - 10].to_string())),
            ("header", Box::new(|t: &str| t.replacen("hapair-state v1", "something else", 1))),
            ("bad json", Box::new(|_: &str| "hapair-state v1 len=3 crc32c=00000000\n{x}\n".into())),
            ("empty", Box::new(|_: &str| String::new())),
        ];
        for (what, damage) in cases {
            store.save("f.json", &facts(4)).unwrap_or_else(|e| panic!("{e}"));
            let path = store.dir().join("f.json");
            let text = fs::read_to_string(&path).unwrap_or_default();
            fs::write(&path, damage(&text)).unwrap_or_else(|e| panic!("{e}"));
            match store.load::<Versioned<Facts>>("f.json") {
                Ok(Loaded::Corrupt { reason, moved_to }) => {
                    assert!(!reason.is_empty(), "{what}");
                    assert!(moved_to.exists(), "{what}: {}", moved_to.display());
                    assert!(moved_to.file_name().is_some_and(|n| n.to_string_lossy().starts_with("f.json.corrupt-")));
                    assert!(!path.exists(), "{what}: the corrupt file stays in place");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(store.load::<Versioned<Facts>>("f.json").ok(), Some(Loaded::Missing), "{what}");
        }
        let corrupt = fs::read_dir(store.dir()).map(|d| d.count()).unwrap_or(0);
        assert_eq!(corrupt, 5, "each corrupt file kept under its own name");
    }

    #[test]
    fn a_record_of_the_wrong_shape_is_corrupt_too() {
        let (_dir, store) = store();
        store.save("f.json", &serde_json::json!({"version": 1, "role": 7})).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(store.load::<Versioned<Facts>>("f.json"), Ok(Loaded::Corrupt { .. })));
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or_else(|e| panic!("{e}"))
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn the_directory_is_created_private_and_files_are_written_owner_only() {
        let (dir, store) = store();
        assert_eq!(mode(store.dir()), 0o700);
        // Parents created on the way are private too.
        let nested = StateStore::open(dir.path().join("a/b/state")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (mode(&dir.path().join("a")), mode(&dir.path().join("a/b")), mode(nested.dir())),
            (0o700, 0o700, 0o700)
        );

        store.save("desired-config.json", &facts(1)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&store.dir().join("desired-config.json")), 0o600);
        // A temporary file a crashed run left behind with a wide mode is not reused as is.
        let stale = store.dir().join(format!(".f.json.tmp-{}", std::process::id()));
        fs::write(&stale, "old").unwrap_or_else(|e| panic!("{e}"));
        chmod(&stale, 0o666);
        store.save("f.json", &facts(2)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&store.dir().join("f.json")), 0o600);
        assert_eq!(store.load::<Versioned<Facts>>("f.json").ok(), Some(Loaded::Found(facts(2))));
    }

    #[test]
    fn a_directory_left_open_to_others_is_tightened_at_open() {
        let (dir, store) = store();
        store.save("desired-config.json", &facts(1)).unwrap_or_else(|e| panic!("{e}"));
        fs::write(store.dir().join("node.json.corrupt-1"), "x").unwrap_or_else(|e| panic!("{e}"));
        fs::create_dir(store.dir().join("sub")).unwrap_or_else(|e| panic!("{e}"));
        let outside = dir.path().join("outside");
        fs::write(&outside, "not ours").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&outside, store.dir().join("link")).unwrap_or_else(|e| panic!("{e}"));
        chmod(store.dir(), 0o2775);
        chmod(&store.dir().join("desired-config.json"), 0o644);
        chmod(&store.dir().join("node.json.corrupt-1"), 0o4755);
        chmod(&store.dir().join("sub"), 0o755);
        chmod(&outside, 0o644);

        let reopened = StateStore::open(store.dir()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(reopened.dir()), 0o700);
        assert_eq!(mode(&reopened.dir().join("desired-config.json")), 0o600);
        assert_eq!(mode(&reopened.dir().join("node.json.corrupt-1")), 0o600);
        // Only the agent's own files: what a symlink points at and directories it did not
        // make are left alone.
        assert_eq!(mode(&outside), 0o644);
        assert_eq!(mode(&reopened.dir().join("sub")), 0o755);
        // Owner-only modes already narrower than the defaults stay as they are.
        chmod(&reopened.dir().join("desired-config.json"), 0o400);
        StateStore::open(store.dir()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mode(&reopened.dir().join("desired-config.json")), 0o400);
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        let (_dir, store) = store();
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(matches!(store.save(bad, &1), Err(StateError::BadName(_))), "{bad}");
        }
    }
}
