//! The activity log's on-disk transactions.
//!
//! The activity log (AL) records which 4 MiB extents of the data area a
//! Primary may be writing. Before a write to an extent that is not in the
//! log is submitted, a transaction listing the new set of active extents is
//! written durably. After a Primary crash, every extent of the newest valid
//! transaction is marked out of sync: exactly the regions that may have had
//! writes in flight (DRBD's activity log, simplified: each transaction
//! carries the whole active set, so recovery needs only the newest one).
//!
//! Layout: the AL area is a ring of [`AL_RING_BLOCKS`] 4 KiB slots;
//! transaction `n` goes to slot `n % AL_RING_BLOCKS`. A slot holds the magic,
//! the transaction number, the extent count, the extent numbers
//! (big-endian u32) and a crc32 over the rest in its last four bytes. A torn
//! slot fails its crc and the previous transaction (in another slot) wins.

use thiserror::Error;

use tandem_proto::reader::{Reader, Short};

use super::BLOCK_SIZE;
use super::layout::AL_RING_BLOCKS;

pub const AL_MAGIC: [u8; 8] = *b"TANDEMAL";
/// Bytes of data per extent (4 MiB).
pub const AL_EXTENT_SIZE: u64 = 4 << 20;
/// Extents one transaction can list.
pub const AL_MAX_EXTENTS: usize = (BLOCK_SIZE as usize - 8 - 8 - 4 - 4) / 4;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AlError {
    #[error("not an activity-log transaction")]
    BadMagic,
    #[error("activity-log checksum mismatch")]
    Checksum,
    #[error("activity-log transaction is malformed: {0}")]
    Malformed(&'static str),
    #[error(transparent)]
    Short(#[from] Short),
}

/// One transaction: the complete set of active extents after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlTransaction {
    pub number: u64,
    pub extents: Vec<u32>,
}

impl AlTransaction {
    /// The ring slot this transaction is written to.
    pub fn slot(&self) -> u64 {
        self.number % AL_RING_BLOCKS
    }

    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.extents.len() <= AL_MAX_EXTENTS,
            "too many active extents"
        );
        let mut out = Vec::with_capacity(BLOCK_SIZE as usize);
        out.extend_from_slice(&AL_MAGIC);
        out.extend_from_slice(&self.number.to_be_bytes());
        out.extend_from_slice(&(self.extents.len() as u32).to_be_bytes());
        for e in &self.extents {
            out.extend_from_slice(&e.to_be_bytes());
        }
        out.resize(BLOCK_SIZE as usize - 4, 0);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    pub fn decode(block: &[u8]) -> Result<AlTransaction, AlError> {
        if block.len() != BLOCK_SIZE as usize {
            return Err(AlError::Malformed("not one 4 KiB block"));
        }
        if block[..8] != AL_MAGIC {
            return Err(AlError::BadMagic);
        }
        let (body, tail) = block.split_at(BLOCK_SIZE as usize - 4);
        if crc32fast::hash(body) != u32::from_be_bytes(tail.try_into().expect("4 bytes")) {
            return Err(AlError::Checksum);
        }
        let mut r = Reader::new(&body[8..]);
        let number = r.u64()?;
        let n = r.u32()? as usize;
        if n > AL_MAX_EXTENTS {
            return Err(AlError::Malformed("extent count"));
        }
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            extents.push(r.u32()?);
        }
        if r.rest().iter().any(|&b| b != 0) {
            return Err(AlError::Malformed("reserved bytes are not zero"));
        }
        Ok(AlTransaction { number, extents })
    }

    /// The newest valid transaction among the ring's slots, if any.
    pub fn newest<'a>(slots: impl IntoIterator<Item = &'a [u8]>) -> Option<AlTransaction> {
        slots
            .into_iter()
            .filter_map(|b| AlTransaction::decode(b).ok())
            .max_by_key(|t| t.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_valid_slot_wins_and_torn_slots_are_ignored() {
        let t1 = AlTransaction {
            number: 1,
            extents: vec![1, 2, 3],
        };
        let t2 = AlTransaction {
            number: 2,
            extents: vec![1, 2, 3, 9],
        };
        let mut torn = t2.encode();
        torn[40] ^= 1;
        let empty = vec![0u8; 4096];
        let (a, b) = (t1.encode(), t2.encode());
        assert_eq!(
            AlTransaction::newest([&a[..], &b[..], &empty[..]]),
            Some(t2)
        );
        assert_eq!(AlTransaction::newest([&a[..], &torn[..]]), Some(t1));
        assert_eq!(AlTransaction::newest([&empty[..]]), None);
    }

    proptest! {
        #[test]
        fn round_trip(number in any::<u64>(), extents in proptest::collection::vec(any::<u32>(), 0..AL_MAX_EXTENTS)) {
            let t = AlTransaction { number, extents };
            prop_assert_eq!(AlTransaction::decode(&t.encode()).unwrap(), t);
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = AlTransaction::decode(&data);
        }
    }
}
