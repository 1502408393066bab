//! `repctl create-md` and `repctl dump-md`: metadata on a disk no `repd`
//! holds.

use std::fs::OpenOptions as FsOpen;

use serde_json::json;

use super::Failure;
use crate::config::{Config, MetaDisk, NodeConfig};
use crate::metadata::layout::md_size_for;
use crate::metadata::offline::{self, MetaLocation};
use crate::metadata::{BLOCK_SIZE, MdFlags, Superblock};
use crate::storage::{Backing, IoMode, OpenOptions};

fn open(path: &std::path::Path, what: &str) -> Result<Backing, Failure> {
    Backing::open(
        path,
        OpenOptions {
            mode: IoMode::Buffered,
        },
    )
    .map_err(|e| Failure::error(format!("cannot open {what} {}: {e}", path.display())))
}

/// Open the disk (and meta-disk) and run `f` on the metadata location.
fn with_location<R>(
    node: &NodeConfig,
    create_meta: bool,
    f: impl FnOnce(&MetaLocation) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let data = open(&node.disk, "disk")?;
    match &node.meta_disk {
        MetaDisk::Internal => f(&MetaLocation::Internal {
            file: data.file(),
            size: data.size(),
        }),
        MetaDisk::External(path) => {
            if create_meta {
                prepare_external(path, data.size())?;
            }
            let meta = open(path, "meta-disk")?;
            f(&MetaLocation::External {
                file: meta.file(),
                meta_size: meta.size(),
                data_size: data.size(),
            })
        }
    }
}

/// An external metadata *file* is created or grown to the size it needs; a
/// block device must already be large enough.
fn prepare_external(path: &std::path::Path, data_size: u64) -> Result<(), Failure> {
    let need = md_size_for(data_size - data_size % BLOCK_SIZE);
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Ok(()),
        Ok(m) if m.len() >= need => Ok(()),
        _ => {
            let f = FsOpen::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| {
                    Failure::error(format!("cannot create meta-disk {}: {e}", path.display()))
                })?;
            f.set_len(need).map_err(|e| {
                Failure::error(format!("cannot size meta-disk {}: {e}", path.display()))
            })?;
            Ok(())
        }
    }
}

pub fn create_md(config: &Config, node: &NodeConfig, force: bool) -> Result<(), Failure> {
    let device_id = {
        let mut b = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
        u64::from_ne_bytes(b)
    };
    let sb = with_location(node, true, |loc| {
        offline::create(loc, &config.resource.name, &node.name, device_id, force)
            .map_err(|e| Failure::error(e.to_string()))
    })?;
    println!(
        "created metadata for resource {} node {} on {}: {} bytes of data ({}), disk Inconsistent",
        config.resource.name,
        node.name,
        node.disk.display(),
        sb.layout.data_size,
        super::render::size(sb.layout.data_size)
    );
    Ok(())
}

pub fn dump_md(_config: &Config, node: &NodeConfig) -> Result<(), Failure> {
    let (sb, dirty) = with_location(node, false, |loc| {
        let sb = offline::load(loc).map_err(|e| Failure::error(e.to_string()))?;
        let dirty =
            offline::count_dirty(loc, &sb.layout).map_err(|e| Failure::error(e.to_string()))?;
        Ok((sb, dirty))
    })?;
    println!(
        "{}",
        serde_json::to_string_pretty(&dump(&sb, dirty)).expect("json")
    );
    Ok(())
}

fn dump(sb: &Superblock, dirty_blocks: u64) -> serde_json::Value {
    let hex = |v: u64| format!("{v:016x}");
    let g = &sb.generations;
    let flags: serde_json::Map<String, serde_json::Value> = MdFlags::NAMES
        .iter()
        .map(|(bit, name)| (name.to_string(), sb.flags.has(*bit).into()))
        .collect();
    let l = &sb.layout;
    json!({
        "resource": sb.resource,
        "node": sb.node,
        "device_id": hex(sb.device_id),
        "sequence": sb.sequence,
        "size_bytes": l.data_size,
        "layout": {
            "meta_disk": if l.internal { "internal" } else { "external" },
            "md_offset": l.md_offset,
            "md_size_bytes": l.md_size,
            "activity_log_offset": l.al_offset(),
            "bitmap_offset": l.bitmap_offset(),
            "bitmap_size_bytes": l.bitmap_size(),
            "block_size": BLOCK_SIZE,
        },
        "generation": {
            "current": hex(g.current),
            "bitmap": hex(g.bitmap),
            "history": [hex(g.history[0]), hex(g.history[1])],
        },
        "flags": flags,
        "out_of_sync_blocks": dirty_blocks,
        "out_of_sync_bytes": dirty_blocks * BLOCK_SIZE,
    })
}
