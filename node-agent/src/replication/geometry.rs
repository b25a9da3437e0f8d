//! The fixed units replication works in: 4 KiB blocks (bitmap granularity) and 4 MiB
//! extents (activity-log granularity), and the arithmetic that maps byte ranges onto them.

/// Bitmap granularity: one bit covers this many bytes.
pub const BLOCK_SIZE: u64 = 4096;
/// Activity-log granularity: one slot covers this many bytes.
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Blocks per activity-log extent.
pub const BLOCKS_PER_EXTENT: u64 = EXTENT_SIZE / BLOCK_SIZE;

/// A half-open range of 4 KiB blocks, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRange {
    pub start: u64,
    pub end: u64,
}

impl BlockRange {
    pub fn new(start: u64, end: u64) -> Self {
        BlockRange { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn byte_offset(&self) -> u64 {
        self.start * BLOCK_SIZE
    }

    pub fn byte_len(&self) -> u64 {
        self.len() * BLOCK_SIZE
    }

    pub fn overlaps(&self, other: &BlockRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bytes {}..{}", self.byte_offset(), self.end * BLOCK_SIZE)
    }
}

/// Blocks touched by the byte range `[offset, offset + len)`: partial blocks at either end
/// count, because the bitmap can only say "this whole block may differ".
pub fn blocks_touched(offset: u64, len: u64) -> BlockRange {
    if len == 0 {
        return BlockRange::new(offset / BLOCK_SIZE, offset / BLOCK_SIZE);
    }
    let end = offset.saturating_add(len);
    BlockRange::new(offset / BLOCK_SIZE, end.div_ceil(BLOCK_SIZE))
}

/// Activity-log extents touched by the byte range `[offset, offset + len)`.
pub fn extents_touched(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return offset / EXTENT_SIZE..offset / EXTENT_SIZE;
    }
    let end = offset.saturating_add(len);
    offset / EXTENT_SIZE..end.div_ceil(EXTENT_SIZE)
}

/// Number of 4 KiB blocks in a volume of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Blocks of an activity-log extent, clipped to the volume.
pub fn extent_blocks(extent: u64, total_blocks: u64) -> BlockRange {
    let start = extent.saturating_mul(BLOCKS_PER_EXTENT).min(total_blocks);
    let end = start.saturating_add(BLOCKS_PER_EXTENT).min(total_blocks);
    BlockRange::new(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_blocks_count_as_touched() {
        assert_eq!(blocks_touched(0, 4096), BlockRange::new(0, 1));
        assert_eq!(blocks_touched(512, 512), BlockRange::new(0, 1));
        assert_eq!(blocks_touched(4095, 2), BlockRange::new(0, 2));
        assert_eq!(blocks_touched(8192, 0), BlockRange::new(2, 2));
        assert!(blocks_touched(8192, 0).is_empty());
    }

    #[test]
    fn extents_cover_the_range() {
        assert_eq!(extents_touched(0, 1), 0..1);
        assert_eq!(extents_touched(EXTENT_SIZE - 1, 2), 0..2);
        assert_eq!(extents_touched(3 * EXTENT_SIZE, EXTENT_SIZE), 3..4);
        assert_eq!(extent_blocks(1, 1500), BlockRange::new(1024, 1500));
        assert_eq!(extent_blocks(2, 1500), BlockRange::new(1500, 1500));
    }
}
