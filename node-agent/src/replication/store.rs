//! Opening, validating and creating a replica's backing and metadata on disk.
//!
//! Everything here reads the metadata area only; the data area is neither read nor written
//! until the metadata has been found to belong to this volume, so a refused backing is left
//! exactly as it was.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};

use super::activity_log::{AL_BLOCK_SIZE, ActivityLog, ring_len_for};
use super::bitmap::{self, Bitmap};
use super::generation::Generations;
use super::geometry::{block_count, extent_blocks};
use super::metadata::{
    self, BLOCK, Layout, SUPERBLOCK_SIZE, SlotChoice, StoredDisk, Superblock, choose_slot, flags, metadata_len,
};

/// Why a backing or its metadata was refused. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not exist and creating it was not allowed")]
    Missing { path: String },
    #[error(
        "{path} is {len} bytes, but a {size}-byte volume with {kind} metadata needs at least {needed} bytes: \
         the backing is truncated or too small"
    )]
    Truncated { path: String, len: u64, needed: u64, size: u64, kind: &'static str },
    #[error("{path}: no hapair metadata here (found {found:?} where the magic belongs): refusing foreign data")]
    WrongMagic { path: String, found: String },
    #[error(
        "{path}: metadata format version {version} is not supported (this agent reads version {})",
        metadata::VERSION
    )]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path}: metadata superblock checksum failure in both slots: refusing to guess")]
    Checksum { path: String },
    #[error("{path}: metadata belongs to volume {found}, not {expected}")]
    WrongUuid { path: String, expected: String, found: String },
    #[error("{path}: metadata describes a {found}-byte volume, but the spec says {expected} bytes")]
    SizeMismatch { path: String, expected: u64, found: u64 },
    #[error("{path}: metadata is inconsistent: {reason}")]
    Inconsistent { path: String, reason: String },
    #[error("{path}: the metadata area is not blank and holds no hapair metadata: refusing to overwrite it")]
    AreaNotBlank { path: String },
    #[error("{path} is already open by another replica (lock held)")]
    Locked { path: String },
}

/// Where the metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaLocation {
    Internal,
    External(PathBuf),
}

impl MetaLocation {
    pub fn from_spec(metadata: &str) -> Self {
        if metadata == "internal" { MetaLocation::Internal } else { MetaLocation::External(PathBuf::from(metadata)) }
    }
}

/// What to open: one node's backing as the spec describes it.
#[derive(Debug, Clone)]
pub struct BackingPlan {
    pub data_path: PathBuf,
    pub meta: MetaLocation,
    pub volume_uuid: [u8; 16],
    pub size: u64,
    pub al_slots: u32,
    /// Create a sparse data file (and external metadata file) when missing.
    pub create_missing: bool,
    /// Write fresh metadata into an all-zero metadata area of an existing backing.
    pub initialize_blank: bool,
}

/// The open files. Internal metadata shares the data file.
#[derive(Debug)]
pub struct BackingFiles {
    data: Arc<Flock<File>>,
    meta: Option<Arc<File>>,
    /// The metadata again, opened `O_DSYNC`: a write through it is durable when it returns,
    /// and the kernel makes only that range durable (plus a device cache flush). An
    /// `fdatasync` instead would write back every dirty page of the file, which for
    /// internal metadata is all the data written since the last flush: an activity-log
    /// update would cost a full flush of the volume.
    meta_durable: File,
    pub data_path: PathBuf,
    pub meta_path: PathBuf,
    pub is_block_device: bool,
}

impl BackingFiles {
    pub fn data(&self) -> &File {
        &self.data
    }

    pub fn meta(&self) -> &File {
        self.meta.as_deref().unwrap_or(&self.data)
    }

    pub fn internal(&self) -> bool {
        self.meta.is_none()
    }

    pub fn write_meta(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.meta().write_all_at(bytes, offset)
    }

    /// Writes metadata and returns once that range is on stable storage.
    pub fn write_meta_durable(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.meta_durable.write_all_at(bytes, offset)
    }

    pub fn sync_meta(&self) -> std::io::Result<()> {
        self.meta().sync_data()
    }

    pub fn sync_data(&self) -> std::io::Result<()> {
        self.data().sync_data()
    }
}

/// A backing whose metadata was found valid (or freshly written), loaded into memory.
#[derive(Debug)]
pub struct Opened {
    pub files: BackingFiles,
    pub layout: Layout,
    pub sb: Superblock,
    pub bitmap: Bitmap,
    pub al: ActivityLog,
    /// The metadata was created by this open.
    pub created: bool,
    /// Bitmap pages whose checksum failed (torn by a crash); their blocks were marked dirty.
    pub untrusted_pages: Vec<u32>,
    /// Set when the replica had crashed as primary: the activity-log extents that were
    /// marked out of sync.
    pub crash_extents: Option<Vec<u64>>,
}

/// The 16 bytes stored for a volume UUID: the UUID itself, or a hash of an opaque id.
pub fn volume_uuid_bytes(id: &str) -> [u8; 16] {
    match uuid::Uuid::parse_str(id) {
        Ok(u) => *u.as_bytes(),
        Err(_) => xxhash_rust::xxh3::xxh3_128(id.as_bytes()).to_le_bytes(),
    }
}

pub fn uuid_text(bytes: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*bytes).to_string()
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> MetadataError + 'a {
    move |source| MetadataError::Io { path: path.display().to_string(), op, source }
}

fn file_len(file: &mut File, path: &Path) -> Result<u64, MetadataError> {
    file.seek(SeekFrom::End(0)).map_err(io_err(path, "measuring size"))
}

fn open_rw(path: &Path) -> Result<File, MetadataError> {
    OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path, "opening"))
}

/// Reads both superblock slots of a metadata area ending at `meta_len` (at least two slots
/// long) and chooses between them.
pub fn read_superblocks(meta: &File, meta_len: u64) -> std::io::Result<SlotChoice> {
    let read_slot = |offset: u64| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; SUPERBLOCK_SIZE];
        meta.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    };
    let slot0 = Superblock::decode(&read_slot(meta_len - 2 * SUPERBLOCK_SIZE as u64)?);
    let slot1 = Superblock::decode(&read_slot(meta_len - SUPERBLOCK_SIZE as u64)?);
    Ok(choose_slot([slot0, slot1]))
}

/// Opens (and if allowed creates) a backing, validating its metadata against the plan.
pub fn open(plan: &BackingPlan, format_id_seed: u64) -> Result<Opened, MetadataError> {
    let data_path = plan.data_path.as_path();
    let p = || data_path.display().to_string();
    let mut created_file = false;
    if !data_path.exists() {
        if !plan.create_missing {
            return Err(MetadataError::Missing { path: p() });
        }
        create_sparse(plan)?;
        created_file = true;
    }
    let mut data = open_rw(data_path)?;
    let is_block_device =
        data.metadata().map_err(io_err(data_path, "reading file type"))?.file_type().is_block_device();
    let data_len = file_len(&mut data, data_path)?;
    let data = Flock::lock(data, FlockArg::LockExclusiveNonblock).map_err(|_| MetadataError::Locked { path: p() })?;
    let (meta_file, meta_path) = match &plan.meta {
        MetaLocation::Internal => (None, data_path.to_path_buf()),
        MetaLocation::External(path) => {
            if !path.exists() {
                if !plan.create_missing {
                    return Err(MetadataError::Missing { path: path.display().to_string() });
                }
                let f = File::create_new(path).map_err(io_err(path, "creating metadata file"))?;
                f.set_len(metadata_len(plan.size, plan.al_slots)).map_err(io_err(path, "sizing metadata file"))?;
            }
            (Some(Arc::new(open_rw(path)?)), path.clone())
        }
    };
    let meta_durable = OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DSYNC.bits())
        .open(&meta_path)
        .map_err(io_err(&meta_path, "opening for synchronous metadata writes"))?;
    let files = BackingFiles {
        data: Arc::new(data),
        meta: meta_file,
        meta_durable,
        data_path: data_path.to_path_buf(),
        meta_path,
        is_block_device,
    };
    let internal = files.internal();
    let kind = if internal { "internal" } else { "external" };
    let mp = files.meta_path.display().to_string();

    // The data area must hold the volume.
    let meta_len_needed = metadata_len(plan.size, plan.al_slots);
    if internal {
        let needed = plan.size + meta_len_needed;
        if data_len < plan.size + 2 * SUPERBLOCK_SIZE as u64 {
            return Err(MetadataError::Truncated { path: p(), len: data_len, needed, size: plan.size, kind });
        }
    } else if data_len < plan.size {
        return Err(MetadataError::Truncated { path: p(), len: data_len, needed: plan.size, size: plan.size, kind });
    }
    let meta_len = if internal {
        data_len
    } else {
        let mut f = open_rw(&files.meta_path)?;
        file_len(&mut f, &files.meta_path)?
    };
    if meta_len < 2 * SUPERBLOCK_SIZE as u64 || meta_len % BLOCK != 0 {
        let needed = if internal { plan.size + meta_len_needed } else { meta_len_needed };
        return Err(MetadataError::Truncated { path: mp, len: meta_len, needed, size: plan.size, kind });
    }

    let read_block = |offset: u64, len: usize| -> Result<Vec<u8>, MetadataError> {
        let mut buf = vec![0u8; len];
        files.meta().read_exact_at(&mut buf, offset).map_err(io_err(&files.meta_path, "reading metadata"))?;
        Ok(buf)
    };
    let slots = read_superblocks(files.meta(), meta_len).map_err(io_err(&files.meta_path, "reading metadata"))?;
    let truncated = || MetadataError::Truncated {
        path: mp.clone(),
        len: meta_len,
        needed: if internal { plan.size + meta_len_needed } else { meta_len_needed },
        size: plan.size,
        kind,
    };
    let too_small = meta_len < if internal { plan.size + meta_len_needed } else { meta_len_needed };
    let sb = match slots {
        SlotChoice::Valid { sb, .. } => sb,
        SlotChoice::Blank => {
            if too_small {
                return Err(truncated());
            }
            if !(plan.initialize_blank || created_file) {
                return Err(MetadataError::WrongMagic { path: mp, found: "nothing (blank)".into() });
            }
            return initialize(files, plan, meta_len, created_file, format_id_seed);
        }
        SlotChoice::Foreign(magic) => {
            if too_small {
                return Err(truncated());
            }
            return Err(MetadataError::WrongMagic { path: mp, found: String::from_utf8_lossy(&magic).into_owned() });
        }
        SlotChoice::Version(version) => return Err(MetadataError::UnsupportedVersion { path: mp, version }),
        SlotChoice::Corrupt => return Err(MetadataError::Checksum { path: mp }),
    };
    if sb.volume_uuid != plan.volume_uuid {
        return Err(MetadataError::WrongUuid {
            path: mp,
            expected: uuid_text(&plan.volume_uuid),
            found: uuid_text(&sb.volume_uuid),
        });
    }
    if sb.data_size != plan.size {
        return Err(MetadataError::SizeMismatch { path: mp, expected: plan.size, found: sb.data_size });
    }
    let inconsistent = |reason: String| MetadataError::Inconsistent { path: mp.clone(), reason };
    let blocks = block_count(sb.data_size);
    if sb.bitmap_pages != bitmap::page_count(blocks) {
        return Err(inconsistent(format!(
            "{} bitmap pages recorded, {} needed for {} bytes",
            sb.bitmap_pages,
            bitmap::page_count(blocks),
            sb.data_size
        )));
    }
    if sb.al_slots == 0 || sb.al_ring_len < ring_len_for(sb.al_slots) {
        return Err(inconsistent(format!("activity log of {} slots in a ring of {}", sb.al_slots, sb.al_ring_len)));
    }
    let layout = sb.layout(meta_len).ok_or_else(truncated)?;
    if internal && layout.area_offset < sb.data_size {
        return Err(truncated());
    }

    let mut bm = Bitmap::new(blocks);
    let mut untrusted_pages = Vec::new();
    for page in 0..layout.bitmap_pages {
        let raw = read_block(layout.bitmap_page_offset(page), BLOCK as usize)?;
        match metadata::decode_bitmap_page(&raw, page, sb.format_id) {
            Some(payload) => bm.load_page(page, payload),
            None => {
                untrusted_pages.push(page);
                bm.set_page(page);
            }
        }
    }
    let mut ring = Vec::with_capacity(layout.al_ring_len as usize);
    for i in 0..layout.al_ring_len {
        ring.push(read_block(layout.al_block_offset(i), AL_BLOCK_SIZE)?);
    }
    let al = ActivityLog::recover(sb.format_id, sb.al_slots, &ring);
    let mut opened = Opened { files, layout, sb, bitmap: bm, al, created: false, untrusted_pages, crash_extents: None };
    recover_crash(&mut opened)?;
    Ok(opened)
}

/// After a primary crash: every extent the activity log names becomes out of sync, and the
/// replica remembers it crashed as primary until the next resync completes.
fn recover_crash(o: &mut Opened) -> Result<(), MetadataError> {
    let crashed = o.sb.has(flags::PRIMARY);
    if !crashed && o.untrusted_pages.is_empty() {
        o.bitmap.take_dirty_pages();
        return Ok(());
    }
    if crashed {
        let extents = o.al.active_extents();
        let blocks = o.bitmap.blocks();
        for &e in &extents {
            o.bitmap.set_range(extent_blocks(e, blocks));
        }
        o.sb.set_flag(flags::PRIMARY, false);
        o.sb.set_flag(flags::CRASHED_PRIMARY, true);
        o.crash_extents = Some(extents);
    }
    let path = o.files.meta_path.clone();
    let mut pages = o.bitmap.take_dirty_pages();
    pages.extend(o.untrusted_pages.iter().copied());
    pages.sort_unstable();
    pages.dedup();
    for page in pages {
        let bytes = metadata::encode_bitmap_page(&o.bitmap, page, o.sb.format_id);
        o.files.write_meta(o.layout.bitmap_page_offset(page), &bytes).map_err(io_err(&path, "writing bitmap"))?;
    }
    o.files.sync_meta().map_err(io_err(&path, "syncing metadata"))?;
    o.sb.seq += 1;
    let slot = (o.sb.seq % 2) as usize;
    o.files
        .write_meta(o.layout.superblock_offset(slot), &o.sb.encode())
        .map_err(io_err(&path, "writing superblock"))?;
    o.files.sync_meta().map_err(io_err(&path, "syncing metadata"))?;
    Ok(())
}

fn create_sparse(plan: &BackingPlan) -> Result<(), MetadataError> {
    let path = plan.data_path.as_path();
    let len = match plan.meta {
        MetaLocation::Internal => plan.size + metadata_len(plan.size, plan.al_slots),
        MetaLocation::External(_) => plan.size,
    };
    let f = File::create_new(path).map_err(io_err(path, "creating backing file"))?;
    f.set_len(len).map_err(io_err(path, "sizing backing file"))?;
    f.sync_all().map_err(io_err(path, "syncing backing file"))?;
    Ok(())
}

/// Writes fresh metadata into a blank area. An area that is not entirely zero might be
/// somebody's data, so it is refused rather than overwritten.
fn initialize(
    files: BackingFiles,
    plan: &BackingPlan,
    meta_len: u64,
    created_file: bool,
    format_id_seed: u64,
) -> Result<Opened, MetadataError> {
    let blocks = block_count(plan.size);
    let ring_len = ring_len_for(plan.al_slots);
    let pages = bitmap::page_count(blocks);
    let mp = files.meta_path.display().to_string();
    let layout = Layout::ending_at(meta_len, pages, ring_len).ok_or_else(|| MetadataError::Truncated {
        path: mp.clone(),
        len: meta_len,
        needed: metadata_len(plan.size, plan.al_slots),
        size: plan.size,
        kind: if files.internal() { "internal" } else { "external" },
    })?;
    if !created_file {
        let mut buf = vec![0u8; 1 << 20];
        let mut off = layout.area_offset;
        while off < meta_len {
            let n = ((meta_len - off) as usize).min(buf.len());
            files.meta().read_exact_at(&mut buf[..n], off).map_err(io_err(&files.meta_path, "reading metadata"))?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Err(MetadataError::AreaNotBlank { path: mp });
            }
            off += n as u64;
        }
    }
    let format_id = format_id_seed | 1;
    let data_zeroed = created_file && !files.is_block_device;
    let mut sb = Superblock {
        seq: 1,
        volume_uuid: plan.volume_uuid,
        data_size: plan.size,
        format_id,
        gens: Generations::just_created(),
        disk: StoredDisk::Inconsistent,
        flags: if data_zeroed { flags::DATA_ZEROED } else { 0 },
        al_slots: plan.al_slots,
        al_ring_len: ring_len,
        bitmap_pages: pages,
        promoted_epoch: 0,
        promoted_at_ms: 0,
        known_epoch: 0,
    };
    let bm = Bitmap::new(blocks);
    let path = files.meta_path.clone();
    for page in 0..pages {
        let bytes = metadata::encode_bitmap_page(&bm, page, format_id);
        files.write_meta(layout.bitmap_page_offset(page), &bytes).map_err(io_err(&path, "writing bitmap"))?;
    }
    for slot in 0..2 {
        files.write_meta(layout.superblock_offset(slot), &sb.encode()).map_err(io_err(&path, "writing superblock"))?;
    }
    files.sync_meta().map_err(io_err(&path, "syncing metadata"))?;
    sb.seq = 1;
    let al = ActivityLog::new(format_id, plan.al_slots, ring_len);
    Ok(Opened { files, layout, sb, bitmap: bm, al, created: true, untrusted_pages: Vec::new(), crash_extents: None })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::replication::geometry::BlockRange;

    const SIZE: u64 = 64 << 20;

    fn plan(dir: &Path, meta: MetaLocation) -> BackingPlan {
        BackingPlan {
            data_path: dir.join("data.img"),
            meta,
            volume_uuid: volume_uuid_bytes("0f5c3c8e-2a4e-4c3b-9d57-3f1ad2f6b001"),
            size: SIZE,
            al_slots: 7,
            create_missing: true,
            initialize_blank: true,
        }
    }

    fn digest(path: &Path, len: u64) -> u128 {
        let f = File::open(path).unwrap();
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        xxhash_rust::xxh3::xxh3_128(&buf)
    }

    #[test]
    fn creates_sparse_backing_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let o = open(&p, 0x1234).unwrap();
        assert!(o.created);
        assert!(o.sb.has(flags::DATA_ZEROED));
        assert_eq!(o.sb.disk, StoredDisk::Inconsistent);
        assert!(o.sb.gens.is_just_created());
        assert_eq!(std::fs::metadata(&p.data_path).unwrap().len(), SIZE + metadata_len(SIZE, 7));
        let format_id = o.sb.format_id;
        drop(o);
        let again = open(&p, 0x9999).unwrap();
        assert!(!again.created);
        assert_eq!(again.sb.format_id, format_id);
        assert!(again.bitmap.is_empty());
    }

    #[test]
    fn a_second_opener_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let _first = open(&p, 1).unwrap();
        assert!(matches!(open(&p, 1), Err(MetadataError::Locked { .. })));
    }

    #[test]
    fn foreign_uuid_size_and_truncation_are_refused_without_touching_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let o = open(&p, 1).unwrap();
        o.files.data().write_all_at(&[0xab; 4096], 8192).unwrap();
        drop(o);
        let before = digest(&p.data_path, SIZE);

        let mut other = p.clone();
        other.volume_uuid = volume_uuid_bytes("7d1b0e3a-0000-4000-8000-000000000002");
        let err = open(&other, 1).unwrap_err();
        assert!(matches!(err, MetadataError::WrongUuid { .. }), "{err}");
        assert!(err.to_string().contains("7d1b0e3a-0000-4000-8000-000000000002"), "{err}");

        let mut bigger = p.clone();
        bigger.size = SIZE * 2;
        let err = open(&bigger, 1).unwrap_err();
        assert!(matches!(err, MetadataError::Truncated { .. }), "{err}");
        let mut smaller = p.clone();
        smaller.size = SIZE / 2;
        let err = open(&smaller, 1).unwrap_err();
        assert!(
            matches!(err, MetadataError::SizeMismatch { expected, found, .. } if expected == SIZE / 2 && found == SIZE),
            "{err}"
        );
        assert_eq!(digest(&p.data_path, SIZE), before);

        let f = OpenOptions::new().write(true).open(&p.data_path).unwrap();
        f.set_len(SIZE + 4096).unwrap();
        drop(f);
        let err = open(&p, 1).unwrap_err();
        assert!(matches!(err, MetadataError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(digest(&p.data_path, SIZE), before, "the data area is never touched");
    }

    #[test]
    fn checksum_failure_and_foreign_magic_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::External(dir.path().join("meta.img")));
        drop(open(&p, 1).unwrap());
        let meta_path = dir.path().join("meta.img");
        let len = std::fs::metadata(&meta_path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&meta_path).unwrap();
        for slot in 1..=2u64 {
            f.write_all_at(&[0x55], len - slot * 4096 + 60).unwrap();
        }
        drop(f);
        let err = open(&p, 1).unwrap_err();
        assert!(matches!(err, MetadataError::Checksum { .. }), "{err}");

        let f = OpenOptions::new().write(true).open(&meta_path).unwrap();
        for slot in 1..=2u64 {
            f.write_all_at(b"NOTOURS!", len - slot * 4096).unwrap();
        }
        drop(f);
        let err = open(&p, 1).unwrap_err();
        assert!(matches!(err, MetadataError::WrongMagic { .. }), "{err}");
        assert!(err.to_string().contains("NOTOURS!"), "{err}");
    }

    #[test]
    fn a_non_blank_area_without_metadata_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let f = File::create(&p.data_path).unwrap();
        let len = SIZE + metadata_len(SIZE, 7);
        f.set_len(len).unwrap();
        f.write_all_at(b"somebody's filesystem", len - 20_000).unwrap();
        drop(f);
        let err = open(&p, 1).unwrap_err();
        assert!(matches!(err, MetadataError::AreaNotBlank { .. }), "{err}");
        // A blank area on an existing backing is initialised, but its data is not trusted.
        let q = plan(dir.path(), MetaLocation::External(dir.path().join("m2")));
        let o = open(&q, 1).unwrap();
        assert!(o.created && !o.sb.has(flags::DATA_ZEROED));
    }

    #[test]
    fn torn_bitmap_pages_become_dirty_and_a_crashed_primary_marks_its_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(dir.path(), MetaLocation::Internal);
        let mut o = open(&p, 1).unwrap();
        // Pretend the replica was primary with writes under extents 2 and 5.
        let mut ring = o.al.clone();
        for e in [2u64, 5] {
            let crate::replication::activity_log::Admission::Ready(Some(tx)) = ring.admit(e..e + 1) else {
                panic!("expected a transaction")
            };
            o.files.write_meta(o.layout.al_block_offset(tx.ring_index), &tx.block).unwrap();
        }
        o.sb.set_flag(flags::PRIMARY, true);
        o.sb.seq += 1;
        o.files.write_meta(o.layout.superblock_offset((o.sb.seq % 2) as usize), &o.sb.encode()).unwrap();
        drop(o);
        let o = open(&p, 1).unwrap();
        assert_eq!(o.crash_extents, Some(vec![2, 5]));
        assert!(o.sb.has(flags::CRASHED_PRIMARY) && !o.sb.has(flags::PRIMARY));
        assert_eq!(o.bitmap.runs(), vec![BlockRange::new(2048, 3072), BlockRange::new(5120, 6144)]);
        let page_off = o.layout.bitmap_page_offset(0);
        o.files.write_meta(page_off + 100, &[1, 2, 3]).unwrap();
        drop(o);
        let o = open(&p, 1).unwrap();
        assert_eq!(o.crash_extents, None, "recovery is not repeated");
        assert_eq!(o.untrusted_pages, vec![0]);
        assert_eq!(o.bitmap.count(), o.bitmap.blocks(), "a torn page marks all its blocks");
    }
}
