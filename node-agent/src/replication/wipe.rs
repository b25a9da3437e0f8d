//! Erasing a deleted volume's replica (`deletionPolicy: Wipe`): the data area is discarded
//! (it reads back as zeroes and, where the backing supports it, its space is freed), then
//! the metadata area is blanked.
//!
//! Only a replica whose metadata names the deleted volume's UUID is erased. Blank metadata
//! means there is nothing of this volume here; anything else (another volume's UUID, a
//! foreign or unreadable superblock) is refused and left exactly as it was, because a
//! backing path reused for other data must never be destroyed by a stale deletion.
//!
//! Data goes before metadata, each made durable before the next step: a wipe interrupted
//! by a crash still finds this volume's metadata on the next attempt and starts over,
//! whereas blanking the metadata first could leave data behind that no later attempt would
//! recognise as ours. The backing's exclusive lock is held throughout, so a replica cannot
//! open it mid-wipe (and a replica still open makes the wipe wait).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::disk::zero_file_range;
use super::metadata::{SUPERBLOCK_SIZE, SlotChoice};
use super::store::{MetaLocation, read_superblocks, uuid_text};

/// What a wipe found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wiped {
    /// `data_bytes` of data discarded and `meta_bytes` of metadata blanked.
    Erased { data_bytes: u64, meta_bytes: u64 },
    /// Nothing of the volume is on this node; the reason says what was found.
    NothingThere(String),
}

/// Why a wipe did not happen. [`WipeError::is_final`] tells a refusal (never retried) from
/// a condition that may pass.
#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is open by a replica (lock held); waiting for it to close")]
    Locked { path: String },
    #[error("{path}: metadata belongs to volume {found}, not {expected}: left as it is")]
    OtherVolume { path: String, expected: String, found: String },
    #[error("{path}: {what}: cannot tell whether this is the volume's data; left as it is")]
    Unrecognised { path: String, what: String },
}

impl WipeError {
    pub fn is_final(&self) -> bool {
        matches!(self, WipeError::OtherVolume { .. } | WipeError::Unrecognised { .. })
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> WipeError + 'a {
    move |source| WipeError::Io { path: path.display().to_string(), op, source }
}

fn open_rw(path: &Path) -> Result<File, WipeError> {
    OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path, "opening"))
}

fn length(file: &mut File, path: &Path) -> Result<u64, WipeError> {
    file.seek(SeekFrom::End(0)).map_err(io_err(path, "measuring size"))
}

/// Erases the replica at `data_path` (metadata at `meta`) if its metadata carries
/// `volume_uuid`. Blocking; run it off the async runtime.
pub fn wipe(data_path: &Path, meta: &MetaLocation, volume_uuid: [u8; 16]) -> Result<Wiped, WipeError> {
    if !data_path.exists() {
        return Ok(Wiped::NothingThere(format!("{} does not exist", data_path.display())));
    }
    let data = open_rw(data_path)?;
    let mut data = Flock::lock(data, FlockArg::LockExclusiveNonblock)
        .map_err(|_| WipeError::Locked { path: data_path.display().to_string() })?;
    let data_len = length(&mut data, data_path)?;
    let (mut external, meta_path): (Option<File>, PathBuf) = match meta {
        MetaLocation::Internal => (None, data_path.to_path_buf()),
        MetaLocation::External(path) if !path.exists() => {
            return Err(WipeError::Unrecognised {
                path: data_path.display().to_string(),
                what: format!("its metadata file {} does not exist", path.display()),
            });
        }
        MetaLocation::External(path) => (Some(open_rw(path)?), path.clone()),
    };
    let meta_len = match external.as_mut() {
        Some(file) => length(file, &meta_path)?,
        None => data_len,
    };
    let meta_file: &File = external.as_ref().unwrap_or(&data);
    let mp = meta_path.display().to_string();
    let slots = 2 * SUPERBLOCK_SIZE as u64;
    if meta_len < slots {
        return Err(WipeError::Unrecognised { path: mp, what: format!("{meta_len} bytes hold no metadata area") });
    }
    let slots = read_superblocks(meta_file, meta_len).map_err(io_err(&meta_path, "reading metadata"))?;
    let unrecognised = |what: String| WipeError::Unrecognised { path: mp.clone(), what };
    let sb = match slots {
        SlotChoice::Valid { sb, .. } => sb,
        SlotChoice::Blank => {
            return Ok(Wiped::NothingThere(format!(
                "{mp}: no metadata (never created on this node, or wiped already)"
            )));
        }
        SlotChoice::Foreign(magic) => {
            return Err(unrecognised(format!("no hapair metadata (found {:?})", String::from_utf8_lossy(&magic))));
        }
        SlotChoice::Version(v) => return Err(unrecognised(format!("metadata format version {v} is unknown"))),
        SlotChoice::Corrupt => return Err(unrecognised("the metadata checksum fails in both slots".into())),
    };
    if sb.volume_uuid != volume_uuid {
        return Err(WipeError::OtherVolume {
            path: mp,
            expected: uuid_text(&volume_uuid),
            found: uuid_text(&sb.volume_uuid),
        });
    }
    let layout = sb
        .layout(meta_len)
        .ok_or_else(|| unrecognised(format!("the superblock's layout does not fit {meta_len} bytes")))?;
    let data_bytes = if external.is_none() { sb.data_size.min(layout.area_offset) } else { sb.data_size.min(data_len) };

    zero_file_range(&data, 0, data_bytes, true).map_err(io_err(data_path, "discarding data"))?;
    data.sync_all().map_err(io_err(data_path, "syncing data"))?;
    let meta_bytes = meta_len - layout.area_offset;
    zero_file_range(meta_file, layout.area_offset, meta_bytes, true)
        .map_err(io_err(&meta_path, "blanking metadata"))?;
    meta_file.sync_all().map_err(io_err(&meta_path, "syncing metadata"))?;
    Ok(Wiped::Erased { data_bytes, meta_bytes })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    use crate::replication::store::{self, BackingPlan, volume_uuid_bytes};

    const SIZE: u64 = 8 << 20;
    const UUID: &str = "0f5c3c8e-2a4e-4c3b-9d57-3f1ad2f6b001";

    fn plan(dir: &Path, meta: MetaLocation) -> BackingPlan {
        BackingPlan {
            data_path: dir.join("data.img"),
            meta,
            volume_uuid: volume_uuid_bytes(UUID),
            size: SIZE,
            al_slots: 7,
            create_missing: true,
            initialize_blank: true,
        }
    }

    /// Creates the replica and writes a pattern all over its data area.
    fn replica_with_data(p: &BackingPlan) {
        drop(store::open(p, 7).unwrap());
        let f = OpenOptions::new().write(true).open(&p.data_path).unwrap();
        f.write_all_at(&vec![0xab; SIZE as usize], 0).unwrap();
        f.sync_all().unwrap();
    }

    fn all_zero(path: &Path, from: u64, len: u64) -> bool {
        let mut buf = vec![0u8; len as usize];
        File::open(path).unwrap().read_exact_at(&mut buf, from).unwrap();
        buf.iter().all(|b| *b == 0)
    }

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn erases_data_and_internal_metadata_of_its_own_volume_and_frees_the_space() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        replica_with_data(&p);
        let len = std::fs::metadata(&p.data_path).unwrap().len();
        assert!(allocated_bytes(&p.data_path) >= SIZE);

        let done = wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap();
        let meta_bytes = len - SIZE;
        assert_eq!(done, Wiped::Erased { data_bytes: SIZE, meta_bytes });
        assert!(all_zero(&p.data_path, 0, len), "something survived the wipe");
        assert_eq!(std::fs::metadata(&p.data_path).unwrap().len(), len, "the backing keeps its size");
        assert!(allocated_bytes(&p.data_path) < SIZE / 8, "the data's space was not freed");

        // A second attempt (say, after a crash before the report went out) finds nothing.
        let again = wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap();
        assert!(matches!(&again, Wiped::NothingThere(why) if why.contains("no metadata")), "{again:?}");
        // And a replica opened there afterwards starts fresh.
        let reopened = store::open(&p, 9).unwrap();
        assert!(reopened.created);
    }

    #[test]
    fn erases_external_metadata_too() {
        let dir = tempfile::tempdir().unwrap();
        let meta_path = dir.path().join("data.meta");
        let p = plan(dir.path(), MetaLocation::External(meta_path.clone()));
        replica_with_data(&p);
        let meta_len = std::fs::metadata(&meta_path).unwrap().len();
        let done = wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap();
        assert_eq!(done, Wiped::Erased { data_bytes: SIZE, meta_bytes: meta_len });
        assert!(all_zero(&p.data_path, 0, SIZE));
        assert!(all_zero(&meta_path, 0, meta_len));
    }

    #[test]
    fn another_volumes_replica_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        replica_with_data(&p);
        let before = std::fs::read(&p.data_path).unwrap();
        let other = volume_uuid_bytes("5b1e0f6a-93c2-4d7e-8a1f-0c2d3e4f5a6b");
        let err = wipe(&p.data_path, &p.meta, other).unwrap_err();
        assert!(err.is_final(), "{err}");
        let text = err.to_string();
        assert!(text.contains(UUID) && text.contains("5b1e0f6a") && text.contains("data.img"), "{text}");
        assert_eq!(std::fs::read(&p.data_path).unwrap(), before);
    }

    #[test]
    fn foreign_or_damaged_metadata_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        // An ext4 image, say: no hapair magic where the superblocks would be.
        std::fs::write(&path, vec![0x5a; 1 << 20]).unwrap();
        let err = wipe(&path, &MetaLocation::Internal, volume_uuid_bytes(UUID)).unwrap_err();
        assert!(err.is_final() && err.to_string().contains("no hapair metadata"), "{err}");
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0x5a));

        // hapair metadata whose checksums fail in both slots.
        let p = plan(dir.path(), MetaLocation::Internal);
        std::fs::remove_file(&path).unwrap();
        replica_with_data(&p);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        for slot in [len - 8192, len - 4096] {
            f.write_all_at(&[0xff; 16], slot + 100).unwrap();
        }
        let err = wipe(&path, &MetaLocation::Internal, p.volume_uuid).unwrap_err();
        assert!(err.is_final() && err.to_string().contains("checksum"), "{err}");
        assert!(!all_zero(&path, 0, SIZE));

        // External metadata that is gone.
        let missing = MetaLocation::External(dir.path().join("gone.meta"));
        let err = wipe(&path, &missing, p.volume_uuid).unwrap_err();
        assert!(err.is_final() && err.to_string().contains("gone.meta"), "{err}");
    }

    #[test]
    fn a_missing_backing_holds_nothing_and_an_open_replica_makes_it_wait() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let none = wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap();
        assert!(matches!(&none, Wiped::NothingThere(why) if why.contains("does not exist")), "{none:?}");

        let open = store::open(&p, 3).unwrap();
        let err = wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap_err();
        assert!(matches!(err, WipeError::Locked { .. }) && !err.is_final(), "{err}");
        drop(open);
        assert!(matches!(wipe(&p.data_path, &p.meta, p.volume_uuid).unwrap(), Wiped::Erased { .. }));
    }
}
