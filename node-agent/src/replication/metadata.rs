//! The on-disk metadata format: superblock, bitmap pages and activity-log ring.
//!
//! The metadata area sits at the end of the backing (internal metadata) or makes up a
//! separate file (external metadata), laid out in 4 KiB blocks:
//!
//! ```text
//! [bitmap page 0 .. P-1][activity-log ring 0 .. R-1][superblock slot 0][superblock slot 1]
//!                                                                           ^ end of file
//! ```
//!
//! The two superblock slots are always the last 8 KiB, so the area can be found without
//! knowing its size; the superblock then says how large the rest is. Superblock updates
//! alternate between the slots with an increasing sequence number, so a torn update leaves
//! the previous one intact. Every block carries a CRC32C; bitmap pages and log blocks also
//! carry the metadata instance's `format_id`, so blocks left over from an earlier instance
//! are never mistaken for current ones.
//!
//! This module only encodes and decodes; [`super::store`] does the file I/O.

use super::bitmap::{self, Bitmap};
use super::generation::Generations;

pub const BLOCK: u64 = 4096;
pub const SUPERBLOCK_SIZE: usize = 4096;
pub const MAGIC: [u8; 8] = *b"HAPAIRMD";
pub const VERSION: u32 = 1;

const PAGE_MAGIC: u32 = 0x4850_424d; // "HPBM"
const SB_CRC_AT: usize = SUPERBLOCK_SIZE - 4;

/// The superblock flags.
pub mod flags {
    /// The replica is primary; found set at open time, it means the primary crashed.
    pub const PRIMARY: u32 = 1;
    /// The replica crashed as primary and its activity-log extents await resync.
    pub const CRASHED_PRIMARY: u32 = 2;
    /// The data area is known to be all zeroes (hapair created the sparse file itself).
    pub const DATA_ZEROED: u32 = 4;
    /// The replica was fenced at the end of its lease while primary in `promoted_epoch`,
    /// and has not served since;
    /// announced in the handshake as `superseded` (see `handshake`).
    pub const SUPERSEDED: u32 = 8;
}

/// The persisted part of a replica's disk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredDisk {
    UpToDate,
    Inconsistent,
    Outdated,
}

impl StoredDisk {
    fn code(self) -> u8 {
        match self {
            StoredDisk::UpToDate => 1,
            StoredDisk::Inconsistent => 2,
            StoredDisk::Outdated => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(StoredDisk::UpToDate),
            2 => Some(StoredDisk::Inconsistent),
            3 => Some(StoredDisk::Outdated),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub volume_uuid: [u8; 16],
    pub data_size: u64,
    /// Random per metadata instance; tags bitmap pages and log blocks.
    pub format_id: u64,
    pub gens: Generations,
    pub disk: StoredDisk,
    pub flags: u32,
    pub al_slots: u32,
    pub al_ring_len: u32,
    pub bitmap_pages: u32,
    /// Epoch and wall-clock time (ms since the Unix epoch) of the last promotion.
    pub promoted_epoch: u64,
    pub promoted_at_ms: u64,
    /// Highest engine epoch this replica has seen.
    pub known_epoch: u64,
}

impl Superblock {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn layout(&self, file_len: u64) -> Option<Layout> {
        Layout::ending_at(file_len, self.bitmap_pages, self.al_ring_len)
    }

    /// Encodes with the CRC; the caller chooses `seq` (and therefore the slot).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, VERSION);
        put_u32(&mut b, 12, 136);
        put_u64(&mut b, 16, self.seq);
        b[24..40].copy_from_slice(&self.volume_uuid);
        put_u64(&mut b, 40, self.data_size);
        put_u64(&mut b, 48, self.format_id);
        put_u64(&mut b, 56, self.gens.current);
        put_u64(&mut b, 64, self.gens.bitmap);
        put_u64(&mut b, 72, self.gens.history[0]);
        put_u64(&mut b, 80, self.gens.history[1]);
        b[88] = self.disk.code();
        put_u32(&mut b, 96, self.flags);
        put_u32(&mut b, 100, self.al_slots);
        put_u32(&mut b, 104, self.al_ring_len);
        put_u32(&mut b, 108, self.bitmap_pages);
        put_u64(&mut b, 112, self.promoted_epoch);
        put_u64(&mut b, 120, self.promoted_at_ms);
        put_u64(&mut b, 128, self.known_epoch);
        let crc = crc32c::crc32c(&b[..SB_CRC_AT]);
        put_u32(&mut b, SB_CRC_AT, crc);
        b
    }

    pub fn decode(b: &[u8]) -> SlotContent {
        if b.len() != SUPERBLOCK_SIZE {
            return SlotContent::Blank;
        }
        if b.iter().all(|&x| x == 0) {
            return SlotContent::Blank;
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return SlotContent::Foreign(magic);
        }
        let version = get_u32(b, 8);
        if version != VERSION {
            return SlotContent::Version(version);
        }
        if crc32c::crc32c(&b[..SB_CRC_AT]) != get_u32(b, SB_CRC_AT) {
            return SlotContent::Corrupt;
        }
        let Some(disk) = StoredDisk::from_code(b[88]) else { return SlotContent::Corrupt };
        let mut volume_uuid = [0u8; 16];
        volume_uuid.copy_from_slice(&b[24..40]);
        SlotContent::Valid(Superblock {
            seq: get_u64(b, 16),
            volume_uuid,
            data_size: get_u64(b, 40),
            format_id: get_u64(b, 48),
            gens: Generations {
                current: get_u64(b, 56),
                bitmap: get_u64(b, 64),
                history: [get_u64(b, 72), get_u64(b, 80)],
            },
            disk,
            flags: get_u32(b, 96),
            al_slots: get_u32(b, 100),
            al_ring_len: get_u32(b, 104),
            bitmap_pages: get_u32(b, 108),
            promoted_epoch: get_u64(b, 112),
            promoted_at_ms: get_u64(b, 120),
            known_epoch: get_u64(b, 128),
        })
    }
}

/// What one superblock slot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotContent {
    /// All zeroes: never written.
    Blank,
    /// Not hapair metadata; carries the first eight bytes found.
    Foreign([u8; 8]),
    /// hapair metadata of a format version this agent does not read.
    Version(u32),
    /// hapair magic but a checksum (or field) that does not verify.
    Corrupt,
    Valid(Superblock),
}

/// Which superblock to trust, or why none can be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotChoice {
    Valid { sb: Superblock, slot: usize },
    Blank,
    Foreign([u8; 8]),
    Version(u32),
    Corrupt,
}

/// Chooses between the two slots: the newest valid one wins; a damaged slot next to a
/// valid one is a torn update and harmless.
pub fn choose_slot(slots: [SlotContent; 2]) -> SlotChoice {
    let mut best: Option<(Superblock, usize)> = None;
    let mut corrupt = false;
    let mut foreign = None;
    let mut version = None;
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            SlotContent::Valid(sb) => {
                if best.as_ref().is_none_or(|(b, _)| sb.seq > b.seq) {
                    best = Some((sb, i));
                }
            }
            SlotContent::Corrupt => corrupt = true,
            SlotContent::Foreign(m) => foreign = Some(m),
            SlotContent::Version(v) => version = Some(v),
            SlotContent::Blank => {}
        }
    }
    if let Some((sb, slot)) = best {
        return SlotChoice::Valid { sb, slot };
    }
    if let Some(v) = version {
        return SlotChoice::Version(v);
    }
    if corrupt {
        return SlotChoice::Corrupt;
    }
    if let Some(m) = foreign {
        return SlotChoice::Foreign(m);
    }
    SlotChoice::Blank
}

/// Where each part of the metadata area lives, as absolute offsets in the metadata file
/// (which is the backing itself for internal metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub area_offset: u64,
    pub bitmap_pages: u32,
    pub al_ring_len: u32,
}

impl Layout {
    /// The layout whose superblocks are the last 8 KiB of a file of `file_len` bytes.
    pub fn ending_at(file_len: u64, bitmap_pages: u32, al_ring_len: u32) -> Option<Layout> {
        let len = area_len(bitmap_pages, al_ring_len);
        let area_offset = file_len.checked_sub(len)?;
        (area_offset % BLOCK == 0).then_some(Layout { area_offset, bitmap_pages, al_ring_len })
    }

    pub fn area_len(&self) -> u64 {
        area_len(self.bitmap_pages, self.al_ring_len)
    }

    pub fn bitmap_page_offset(&self, page: u32) -> u64 {
        self.area_offset + u64::from(page) * BLOCK
    }

    pub fn al_block_offset(&self, index: u32) -> u64 {
        self.area_offset + (u64::from(self.bitmap_pages) + u64::from(index)) * BLOCK
    }

    pub fn superblock_offset(&self, slot: usize) -> u64 {
        self.area_offset + (u64::from(self.bitmap_pages) + u64::from(self.al_ring_len) + slot as u64) * BLOCK
    }
}

fn area_len(bitmap_pages: u32, al_ring_len: u32) -> u64 {
    (u64::from(bitmap_pages) + u64::from(al_ring_len) + 2) * BLOCK
}

/// Size of the metadata area for a volume of `data_size` bytes and `al_slots` log slots.
pub fn metadata_len(data_size: u64, al_slots: u32) -> u64 {
    let blocks = super::geometry::block_count(data_size);
    area_len(bitmap::page_count(blocks), super::activity_log::ring_len_for(al_slots))
}

/// Encodes bitmap page `page` of `bm`.
pub fn encode_bitmap_page(bm: &Bitmap, page: u32, format_id: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    put_u32(&mut b, 0, PAGE_MAGIC);
    put_u32(&mut b, 4, page);
    put_u64(&mut b, 8, format_id);
    b[bitmap::PAGE_HEADER_BYTES..].copy_from_slice(&bm.page_payload(page));
    let crc = page_crc(&b);
    put_u32(&mut b, 16, crc);
    b
}

/// The payload of an intact bitmap page, or `None` when the page cannot be trusted.
pub fn decode_bitmap_page(b: &[u8], page: u32, format_id: u64) -> Option<&[u8]> {
    if b.len() != BLOCK as usize || get_u32(b, 0) != PAGE_MAGIC || get_u32(b, 4) != page || get_u64(b, 8) != format_id {
        return None;
    }
    (page_crc(b) == get_u32(b, 16)).then(|| &b[bitmap::PAGE_HEADER_BYTES..])
}

fn page_crc(b: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&b[..16]);
    crc = crc32c::crc32c_append(crc, &b[20..]);
    crc
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::replication::geometry::BlockRange;

    fn sb(seq: u64) -> Superblock {
        Superblock {
            seq,
            volume_uuid: [7; 16],
            data_size: 1 << 30,
            format_id: 99,
            gens: Generations { current: 11, bitmap: 12, history: [13, 14] },
            disk: StoredDisk::Outdated,
            flags: flags::PRIMARY | flags::DATA_ZEROED,
            al_slots: 257,
            al_ring_len: 4,
            bitmap_pages: 9,
            promoted_epoch: 5,
            promoted_at_ms: 1_700_000_000_000,
            known_epoch: 6,
        }
    }

    #[test]
    fn superblock_round_trips() {
        let s = sb(3);
        assert_eq!(Superblock::decode(&s.encode()), SlotContent::Valid(s));
    }

    #[test]
    fn damaged_superblocks_are_classified() {
        let good = sb(3).encode();
        let mut flipped = good.clone();
        flipped[60] ^= 1;
        assert_eq!(Superblock::decode(&flipped), SlotContent::Corrupt);
        let mut foreign = good.clone();
        foreign[0..8].copy_from_slice(b"XFSB\0\0\0\0");
        assert_eq!(Superblock::decode(&foreign), SlotContent::Foreign(*b"XFSB\0\0\0\0"));
        let mut version = good.clone();
        version[8] = 9;
        assert_eq!(Superblock::decode(&version), SlotContent::Version(9));
        assert_eq!(Superblock::decode(&vec![0; SUPERBLOCK_SIZE]), SlotContent::Blank);
    }

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_is_tolerated() {
        let a = SlotContent::Valid(sb(4));
        let b = SlotContent::Valid(sb(5));
        assert_eq!(choose_slot([a.clone(), b]), SlotChoice::Valid { sb: sb(5), slot: 1 });
        assert_eq!(choose_slot([a, SlotContent::Corrupt]), SlotChoice::Valid { sb: sb(4), slot: 0 });
        assert_eq!(choose_slot([SlotContent::Corrupt, SlotContent::Blank]), SlotChoice::Corrupt);
        assert_eq!(
            choose_slot([SlotContent::Blank, SlotContent::Foreign(*b"ABCDEFGH")]),
            SlotChoice::Foreign(*b"ABCDEFGH")
        );
        assert_eq!(choose_slot([SlotContent::Blank, SlotContent::Blank]), SlotChoice::Blank);
    }

    #[test]
    fn bitmap_pages_verify_index_instance_and_checksum() {
        let mut bm = Bitmap::new(100_000);
        bm.set_range(BlockRange::new(40_000, 40_010));
        let page = encode_bitmap_page(&bm, 1, 77);
        let payload = decode_bitmap_page(&page, 1, 77).unwrap();
        let mut copy = Bitmap::new(100_000);
        copy.load_page(1, payload);
        assert_eq!(copy.runs(), bm.runs());
        assert!(decode_bitmap_page(&page, 0, 77).is_none(), "page index");
        assert!(decode_bitmap_page(&page, 1, 78).is_none(), "other instance");
        let mut torn = page.clone();
        torn[3000] ^= 4;
        assert!(decode_bitmap_page(&torn, 1, 77).is_none(), "checksum");
    }

    #[test]
    fn layout_places_superblocks_last() {
        let l = Layout::ending_at(1 << 20, 3, 4).unwrap();
        assert_eq!(l.area_len(), 9 * 4096);
        assert_eq!(l.superblock_offset(1), (1 << 20) - 4096);
        assert_eq!(l.al_block_offset(0), l.area_offset + 3 * 4096);
        assert!(Layout::ending_at(4096, 3, 4).is_none());
        assert_eq!(metadata_len(4 << 30, 257), (33 + 4 + 2) * 4096);
    }
}
