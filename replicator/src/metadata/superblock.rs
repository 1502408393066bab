//! The superblock: generations, flags, identity and layout of a disk.
//!
//! Encoded big-endian into one 4 KiB block, with a crc32 (crc32fast) over
//! everything before it in the last four bytes. Decoding checks magic,
//! version, crc, and that the recorded layout is self-consistent, so a
//! stray or torn block is rejected rather than trusted.

use thiserror::Error;

use tandem_proto::reader::{Reader, Short};

use super::layout::Layout;
use super::{BLOCK_SIZE, UUID_JUST_CREATED};

pub const MAGIC: [u8; 8] = *b"TANDEMMD";
pub const FORMAT_VERSION: u32 = 1;
/// Longest resource or node name the superblock records.
pub const MAX_NAME: usize = 63;

/// Generation identifiers, as DRBD keeps them (`UI_CURRENT`, `UI_BITMAP`,
/// two history slots). Bit 0 is never set here; "I am Primary" is a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl Generations {
    pub fn just_created() -> Self {
        Generations {
            current: UUID_JUST_CREATED,
            bitmap: 0,
            history: [0, 0],
        }
    }
}

/// Metadata flags (DRBD's `MDF_*` where one exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MdFlags(pub u32);

impl MdFlags {
    /// The data is consistent (not mid-sync as a target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// The data was UpToDate when last known.
    pub const WAS_UP_TO_DATE: u32 = 1 << 1;
    /// This node is (or was, when it stopped) Primary.
    pub const PRIMARY_IND: u32 = 1 << 2;
    /// The node stopped while Primary without a clean demotion.
    pub const CRASHED_PRIMARY: u32 = 1 << 3;
    /// The peer is known to be Outdated (fencing confirmed it).
    pub const PEER_OUT_DATED: u32 = 1 << 4;
    /// Every block must be synced (a full sync was started).
    pub const FULL_SYNC: u32 = 1 << 5;
    /// The activity log was applied after a crash (or the node stopped cleanly).
    pub const AL_CLEAN: u32 = 1 << 6;
    /// The current generation was created on this node after it last
    /// started a resync as source or took the peer's generation: the peer
    /// cannot hold it, so writes without the peer need no new one.
    pub const CURRENT_UNSHARED: u32 = 1 << 7;

    pub const NAMES: [(u32, &'static str); 8] = [
        (Self::CONSISTENT, "consistent"),
        (Self::WAS_UP_TO_DATE, "was_up_to_date"),
        (Self::PRIMARY_IND, "primary_indicator"),
        (Self::CRASHED_PRIMARY, "crashed_primary"),
        (Self::PEER_OUT_DATED, "peer_outdated"),
        (Self::FULL_SYNC, "full_sync"),
        (Self::AL_CLEAN, "al_clean"),
        (Self::CURRENT_UNSHARED, "current_unshared"),
    ];

    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }

    pub fn set(&mut self, flag: u32, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Higher wins between the two slots.
    pub sequence: u64,
    pub layout: Layout,
    pub generations: Generations,
    pub flags: MdFlags,
    /// Random identity of this disk, for humans and logs.
    pub device_id: u64,
    pub resource: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SuperblockError {
    #[error("not Tandem metadata (bad magic)")]
    BadMagic,
    #[error(
        "metadata format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    #[error("metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("metadata layout is inconsistent: {0}")]
    Layout(&'static str),
    #[error("metadata is truncated: {0}")]
    Short(#[from] Short),
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let bytes = &name.as_bytes()[..name.len().min(MAX_NAME)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
    out.resize(out.len() + MAX_NAME - bytes.len(), 0);
}

fn get_name(r: &mut Reader) -> Result<String, SuperblockError> {
    let len = r.u8()? as usize;
    let raw = r.bytes(MAX_NAME)?;
    if len > MAX_NAME {
        return Err(SuperblockError::Layout("name length"));
    }
    String::from_utf8(raw[..len].to_vec()).map_err(|_| SuperblockError::Layout("name is not UTF-8"))
}

impl Superblock {
    /// Encode into exactly one 4 KiB block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCK_SIZE as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&self.flags.0.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        let l = &self.layout;
        for v in [l.data_size, l.md_offset, l.md_size] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.push(u8::from(l.internal));
        let g = &self.generations;
        for v in [
            g.current,
            g.bitmap,
            g.history[0],
            g.history[1],
            self.device_id,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        put_name(&mut out, &self.resource);
        put_name(&mut out, &self.node);
        out.resize(BLOCK_SIZE as usize - 4, 0);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decode one 4 KiB block.
    pub fn decode(block: &[u8]) -> Result<Superblock, SuperblockError> {
        if block.len() != BLOCK_SIZE as usize {
            return Err(SuperblockError::Layout("superblock is not one 4 KiB block"));
        }
        if block[..8] != MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let (body, tail) = block.split_at(BLOCK_SIZE as usize - 4);
        let stored = u32::from_be_bytes(tail.try_into().expect("4 bytes"));
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(SuperblockError::Checksum { stored, computed });
        }
        let mut r = Reader::new(&body[8..]);
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(SuperblockError::Version(version));
        }
        let flags = MdFlags(r.u32()?);
        let sequence = r.u64()?;
        let (data_size, md_offset, md_size) = (r.u64()?, r.u64()?, r.u64()?);
        let internal = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(SuperblockError::Layout("internal flag")),
        };
        let generations = Generations {
            current: r.u64()?,
            bitmap: r.u64()?,
            history: [r.u64()?, r.u64()?],
        };
        let device_id = r.u64()?;
        let resource = get_name(&mut r)?;
        let node = get_name(&mut r)?;
        if r.rest().iter().any(|&b| b != 0) {
            return Err(SuperblockError::Layout("reserved bytes are not zero"));
        }
        let layout = Layout {
            data_size,
            internal,
            md_offset,
            md_size,
        };
        if data_size % BLOCK_SIZE != 0
            || md_offset % BLOCK_SIZE != 0
            || md_size != super::layout::md_size_for(data_size)
        {
            return Err(SuperblockError::Layout("sizes do not match the format"));
        }
        if internal && md_offset != data_size {
            return Err(SuperblockError::Layout(
                "internal metadata must follow the data area",
            ));
        }
        Ok(Superblock {
            sequence,
            layout,
            generations,
            flags,
            device_id,
            resource,
            node,
        })
    }

    /// The slot the *next* write of this superblock goes to: the one not
    /// holding the current sequence.
    pub fn next_slot(&self) -> u64 {
        (self.sequence + 1) % 2
    }

    /// Pick the superblock in force from the two slots' raw blocks.
    pub fn choose(a: &[u8], b: &[u8]) -> Result<Superblock, (SuperblockError, SuperblockError)> {
        match (Superblock::decode(a), Superblock::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if y.sequence > x.sequence { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(e1), Err(e2)) => Err((e1, e2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            sequence: 7,
            layout: Layout::internal(256 << 20).unwrap(),
            generations: Generations {
                current: 0xabcdef00,
                bitmap: 4,
                history: [2, 0],
            },
            flags: MdFlags(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE),
            device_id: 99,
            resource: "r0".into(),
            node: "alpha".into(),
        }
    }

    #[test]
    fn round_trip_and_every_flipped_bit_is_caught() {
        let sb = sample();
        let block = sb.encode();
        assert_eq!(block.len(), 4096);
        assert_eq!(Superblock::decode(&block).unwrap(), sb);
        for bit in (0..4096 * 8).step_by(37) {
            let mut bad = block.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Superblock::decode(&bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn choose_prefers_the_valid_newest_slot() {
        let mut a = sample();
        let mut b = sample();
        b.sequence = 8;
        b.flags = MdFlags(0);
        let (ea, eb) = (a.encode(), b.encode());
        assert_eq!(Superblock::choose(&ea, &eb).unwrap(), b);
        assert_eq!(Superblock::choose(&eb, &ea).unwrap(), b);
        let mut torn = eb.clone();
        torn[100] ^= 0xff;
        assert_eq!(Superblock::choose(&ea, &torn).unwrap(), a);
        a.sequence = 9;
        assert_eq!(Superblock::choose(&a.encode(), &eb).unwrap(), a);
        assert!(Superblock::choose(&[0u8; 4096], &[0u8; 4096]).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = Superblock::decode(&data);
        }
    }
}
