//! Where each metadata structure lives, and how large the data area is.
//!
//! Invariants: every offset and size is a multiple of [`BLOCK_SIZE`]; the
//! data area `[0, data_size)` and the metadata area never overlap; with
//! internal metadata `data_size + md_size <= backing size`.

use thiserror::Error;

use super::BLOCK_SIZE;

/// Superblock slots.
pub const SUPERBLOCK_SLOTS: u64 = 2;
/// Blocks in the activity-log ring.
pub const AL_RING_BLOCKS: u64 = 16;
/// Smallest data area Tandem accepts.
pub const MIN_DATA_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Usable bytes, exported over NBD and replicated.
    pub data_size: u64,
    /// True when the metadata is at the end of the data backing store.
    pub internal: bool,
    /// Offset of the metadata area in its device (the data device when
    /// internal).
    pub md_offset: u64,
    pub md_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error(
        "backing store of {size} bytes is too small: Tandem needs at least {min} bytes of data plus its metadata"
    )]
    TooSmall { size: u64, min: u64 },
    #[error("external metadata device of {have} bytes is too small; it needs {need} bytes")]
    MetaTooSmall { have: u64, need: u64 },
}

/// Bytes of metadata needed for a data area of `data_size` bytes.
pub fn md_size_for(data_size: u64) -> u64 {
    let blocks = data_size.div_ceil(BLOCK_SIZE);
    let bitmap_bytes = blocks.div_ceil(8).next_multiple_of(BLOCK_SIZE);
    (SUPERBLOCK_SLOTS + AL_RING_BLOCKS) * BLOCK_SIZE + bitmap_bytes
}

impl Layout {
    /// Metadata at the end of a backing store of `backing_size` bytes.
    pub fn internal(backing_size: u64) -> Result<Layout, LayoutError> {
        let total = backing_size - backing_size % BLOCK_SIZE;
        // md_size grows by one block per 128 MiB of data: start from an
        // overestimate and step down until it fits.
        let mut data = total.saturating_sub(md_size_for(total));
        data -= data % BLOCK_SIZE;
        while data + md_size_for(data) > total {
            data -= BLOCK_SIZE;
        }
        while data + BLOCK_SIZE + md_size_for(data + BLOCK_SIZE) <= total {
            data += BLOCK_SIZE;
        }
        if data < MIN_DATA_SIZE {
            return Err(LayoutError::TooSmall {
                size: backing_size,
                min: MIN_DATA_SIZE + md_size_for(MIN_DATA_SIZE),
            });
        }
        Ok(Layout {
            data_size: data,
            internal: true,
            md_offset: data,
            md_size: md_size_for(data),
        })
    }

    /// Metadata in its own device of `meta_size` bytes, for a data backing
    /// store of `backing_size` bytes (all of it usable, rounded to 4 KiB).
    pub fn external(backing_size: u64, meta_size: u64) -> Result<Layout, LayoutError> {
        let data = backing_size - backing_size % BLOCK_SIZE;
        if data < MIN_DATA_SIZE {
            return Err(LayoutError::TooSmall {
                size: backing_size,
                min: MIN_DATA_SIZE,
            });
        }
        let need = md_size_for(data);
        if meta_size < need {
            return Err(LayoutError::MetaTooSmall {
                have: meta_size,
                need,
            });
        }
        Ok(Layout {
            data_size: data,
            internal: false,
            md_offset: 0,
            md_size: need,
        })
    }

    /// Offset of superblock slot `slot` (0 or 1) in the metadata device.
    pub fn superblock_offset(&self, slot: u64) -> u64 {
        debug_assert!(slot < SUPERBLOCK_SLOTS);
        self.md_offset + slot * BLOCK_SIZE
    }

    pub fn al_offset(&self) -> u64 {
        self.md_offset + SUPERBLOCK_SLOTS * BLOCK_SIZE
    }

    pub fn bitmap_offset(&self) -> u64 {
        self.al_offset() + AL_RING_BLOCKS * BLOCK_SIZE
    }

    pub fn bitmap_size(&self) -> u64 {
        self.md_size - (SUPERBLOCK_SLOTS + AL_RING_BLOCKS) * BLOCK_SIZE
    }

    /// Number of 4 KiB data blocks (bits in the bitmap).
    pub fn data_blocks(&self) -> u64 {
        self.data_size / BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_and_exact_sizes() {
        let l = Layout::internal(64 << 20).unwrap();
        assert_eq!(l.data_size + l.md_size, 64 << 20);
        assert_eq!(l.bitmap_size(), 4096);
        assert!(Layout::internal(512 * 1024).is_err());
        let e = Layout::external(1 << 30, 4096).unwrap_err();
        assert!(matches!(e, LayoutError::MetaTooSmall { .. }));
        let e = Layout::external(1 << 30, 1 << 20).unwrap();
        assert_eq!(e.data_size, 1 << 30);
        assert_eq!(e.bitmap_size(), (1u64 << 30) / 4096 / 8);
    }

    proptest! {
        #[test]
        fn internal_layout_fits_and_is_maximal(size in (2u64 << 20)..(1u64 << 44)) {
            let l = Layout::internal(size).unwrap();
            prop_assert_eq!(l.data_size % BLOCK_SIZE, 0);
            prop_assert!(l.data_size + l.md_size <= size);
            prop_assert!(l.bitmap_size() * 8 >= l.data_blocks());
            // One more block of data would not fit.
            let bigger = l.data_size + BLOCK_SIZE;
            prop_assert!(bigger + md_size_for(bigger) > size - size % BLOCK_SIZE);
        }
    }
}
