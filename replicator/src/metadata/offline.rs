//! Synchronous metadata I/O: used by `repctl create-md`/`dump-md` (while no
//! `repd` holds the disk) and by `repd` when it attaches the disk at start.
//!
//! All I/O is whole 4 KiB blocks at 4 KiB offsets through aligned buffers,
//! so it works on descriptors opened with `O_DIRECT`. Every write is
//! followed by `fdatasync` before the function returns.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use tandem_proto::AlignedBuf;

use super::BLOCK_SIZE;
use super::activity_log::AlTransaction;
use super::layout::{AL_RING_BLOCKS, Layout, LayoutError};
use super::superblock::{Generations, MAX_NAME, MdFlags, Superblock, SuperblockError};

#[derive(Debug, Error)]
pub enum MetaError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "no valid Tandem metadata found (slot 0: {0}; slot 1: {1}); run `repctl create-md` to create it"
    )]
    Missing(SuperblockError, SuperblockError),
    #[error(
        "metadata already exists (resource {resource:?}, node {node:?}); `repctl create-md --force` overwrites it and loses the generation history"
    )]
    Exists { resource: String, node: String },
    #[error("name {0:?} is longer than {MAX_NAME} bytes and cannot be recorded in the metadata")]
    NameTooLong(String),
}

/// Where the metadata of a disk is.
pub enum MetaLocation<'a> {
    /// At the end of the data backing store of `size` bytes.
    Internal { file: &'a File, size: u64 },
    /// In a separate file/device of `meta_size` bytes; the data backing
    /// store has `data_size` bytes.
    External {
        file: &'a File,
        meta_size: u64,
        data_size: u64,
    },
}

impl MetaLocation<'_> {
    pub fn layout(&self) -> Result<Layout, LayoutError> {
        match *self {
            MetaLocation::Internal { size, .. } => Layout::internal(size),
            MetaLocation::External {
                meta_size,
                data_size,
                ..
            } => Layout::external(data_size, meta_size),
        }
    }

    pub fn file(&self) -> &File {
        match self {
            MetaLocation::Internal { file, .. } | MetaLocation::External { file, .. } => file,
        }
    }
}

fn read_block(file: &File, offset: u64) -> Result<AlignedBuf, MetaError> {
    let mut buf = AlignedBuf::zeroed(BLOCK_SIZE as usize);
    file.read_exact_at(buf.as_mut_slice(), offset)
        .map_err(|source| MetaError::Io {
            what: format!("reading metadata at offset {offset}"),
            source,
        })?;
    Ok(buf)
}

fn write_all(file: &File, data: &[u8], offset: u64) -> Result<(), MetaError> {
    let buf = AlignedBuf::copy_from(data);
    file.write_all_at(buf.as_slice(), offset)
        .map_err(|source| MetaError::Io {
            what: format!("writing metadata at offset {offset}"),
            source,
        })
}

fn sync(file: &File) -> Result<(), MetaError> {
    file.sync_data().map_err(|source| MetaError::Io {
        what: "flushing metadata to stable storage".into(),
        source,
    })
}

/// Read the superblock in force.
pub fn load(loc: &MetaLocation) -> Result<Superblock, MetaError> {
    let layout = loc.layout()?;
    let a = read_block(loc.file(), layout.superblock_offset(0))?;
    let b = read_block(loc.file(), layout.superblock_offset(1))?;
    Superblock::choose(a.as_slice(), b.as_slice()).map_err(|(e1, e2)| MetaError::Missing(e1, e2))
}

/// Write `sb` durably into the slot its sequence number selects.
pub fn store(loc: &MetaLocation, sb: &Superblock) -> Result<(), MetaError> {
    write_all(
        loc.file(),
        &sb.encode(),
        sb.layout.superblock_offset(sb.sequence % 2),
    )?;
    sync(loc.file())
}

/// Write fresh metadata: generation `UUID_JUST_CREATED`, disk Inconsistent,
/// empty activity log and bitmap. Refuses to overwrite valid metadata
/// unless `force`.
pub fn create(
    loc: &MetaLocation,
    resource: &str,
    node: &str,
    device_id: u64,
    force: bool,
) -> Result<Superblock, MetaError> {
    for name in [resource, node] {
        if name.len() > MAX_NAME {
            return Err(MetaError::NameTooLong(name.to_string()));
        }
    }
    let layout = loc.layout()?;
    if !force && let Ok(existing) = load(loc) {
        return Err(MetaError::Exists {
            resource: existing.resource,
            node: existing.node,
        });
    }
    // Zero the activity log and the bitmap in 1 MiB pieces.
    let zero = vec![0u8; 1 << 20];
    let start = layout.al_offset();
    let end = layout.bitmap_offset() + layout.bitmap_size();
    debug_assert_eq!(layout.bitmap_offset(), start + AL_RING_BLOCKS * BLOCK_SIZE);
    let mut off = start;
    while off < end {
        let n = (end - off).min(zero.len() as u64) as usize;
        write_all(loc.file(), &zero[..n], off)?;
        off += n as u64;
    }
    let mut sb = Superblock {
        sequence: 0,
        layout,
        generations: Generations::just_created(),
        flags: MdFlags(MdFlags::AL_CLEAN),
        device_id,
        resource: resource.to_string(),
        node: node.to_string(),
    };
    // Both slots, so no stale superblock of an earlier format survives.
    write_all(loc.file(), &sb.encode(), layout.superblock_offset(0))?;
    sb.sequence = 1;
    write_all(loc.file(), &sb.encode(), layout.superblock_offset(1))?;
    sync(loc.file())?;
    Ok(sb)
}

/// The newest valid activity-log transaction, if any.
pub fn read_al(loc: &MetaLocation, layout: &Layout) -> Result<Option<AlTransaction>, MetaError> {
    let mut blocks = Vec::new();
    for i in 0..AL_RING_BLOCKS {
        blocks.push(read_block(loc.file(), layout.al_offset() + i * BLOCK_SIZE)?);
    }
    Ok(AlTransaction::newest(blocks.iter().map(|b| b.as_slice())))
}

/// Read the whole on-disk bitmap.
pub fn read_bitmap(loc: &MetaLocation, layout: &Layout) -> Result<Vec<u8>, MetaError> {
    let mut buf = AlignedBuf::zeroed(layout.bitmap_size() as usize);
    let at = layout.bitmap_offset();
    loc.file()
        .read_exact_at(buf.as_mut_slice(), at)
        .map_err(|source| MetaError::Io {
            what: format!("reading the bitmap at offset {at}"),
            source,
        })?;
    Ok(buf.as_slice().to_vec())
}

/// Count the set bits of the on-disk bitmap (blocks out of sync).
pub fn count_dirty(loc: &MetaLocation, layout: &Layout) -> Result<u64, MetaError> {
    let mut count = 0u64;
    let chunk = 1 << 20;
    let mut buf = AlignedBuf::zeroed(chunk);
    let mut off = 0u64;
    while off < layout.bitmap_size() {
        let n = (layout.bitmap_size() - off).min(chunk as u64) as usize;
        let at = layout.bitmap_offset() + off;
        loc.file()
            .read_exact_at(&mut buf.as_mut_slice()[..n], at)
            .map_err(|source| MetaError::Io {
                what: format!("reading the bitmap at offset {at}"),
                source,
            })?;
        count += buf.as_slice()[..n]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum::<u64>();
        off += n as u64;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(size: u64) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk"))
            .unwrap();
        f.set_len(size).unwrap();
        (dir, f)
    }

    #[test]
    fn create_load_store_and_refuse_overwrite() {
        let (_d, f) = scratch(64 << 20);
        let loc = MetaLocation::Internal {
            file: &f,
            size: 64 << 20,
        };
        assert!(matches!(load(&loc), Err(MetaError::Missing(..))));
        let sb = create(&loc, "r0", "alpha", 1, false).unwrap();
        assert_eq!(load(&loc).unwrap(), sb);
        assert!(matches!(
            create(&loc, "r0", "alpha", 2, false),
            Err(MetaError::Exists { .. })
        ));
        let mut next = sb.clone();
        next.sequence += 1;
        next.flags.set(MdFlags::CONSISTENT, true);
        store(&loc, &next).unwrap();
        assert_eq!(load(&loc).unwrap(), next);
        let again = create(&loc, "r0", "alpha", 3, true).unwrap();
        assert_eq!(load(&loc).unwrap(), again);
    }

    #[test]
    fn external_metadata_lives_at_offset_zero() {
        let (_d, data) = scratch(16 << 20);
        let (_e, meta) = scratch(1 << 20);
        let loc = MetaLocation::External {
            file: &meta,
            meta_size: 1 << 20,
            data_size: 16 << 20,
        };
        let sb = create(&loc, "r0", "beta", 1, false).unwrap();
        assert_eq!(sb.layout.data_size, 16 << 20);
        assert_eq!(load(&loc).unwrap(), sb);
        drop(data);
    }
}
