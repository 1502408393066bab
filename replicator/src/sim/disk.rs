//! A simulated disk with a volatile write cache.
//!
//! Reads see every completed write. A write is durable once a flush
//! submitted after it completed has completed ([`SimDisk::flush_upto`]: a
//! flush covers the writes completed before it was submitted, exactly what
//! the engine contract promises, and no more), or at once if it was FUA.
//! A crash keeps the durable state plus an arbitrary (seeded) subset of the writes completed since the last
//! flush, applied in completion order: exactly what a real disk with a
//! volatile cache may leave behind.

use bytes::Bytes;

use crate::core::rng::SplitMix64;
use crate::storage::{Done, Op, StorageError};

#[derive(Debug, Clone)]
pub struct SimDisk {
    data: Vec<u8>,
    /// The contents as of the last completed flush.
    base: Vec<u8>,
    /// Writes completed since: (offset, bytes, fua).
    log: Vec<(u64, Vec<u8>, bool)>,
    /// Sequence number of each `log` entry.
    log_seq: Vec<u64>,
    /// Writes completed so far (the next write's sequence number).
    completed: u64,
}

impl SimDisk {
    pub fn new(size: u64) -> Self {
        SimDisk {
            data: vec![0; size as usize],
            base: vec![0; size as usize],
            log: Vec::new(),
            log_seq: Vec::new(),
            completed: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    /// Write outside of the simulation (set-up, corruption behind Tandem's
    /// back): durable at once.
    pub fn poke(&mut self, offset: u64, bytes: &[u8]) {
        let r = offset as usize..offset as usize + bytes.len();
        self.data[r.clone()].copy_from_slice(bytes);
        self.base[r].copy_from_slice(bytes);
    }

    fn write(&mut self, offset: u64, bytes: &[u8], fua: bool) {
        self.data[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        self.log.push((offset, bytes.to_vec(), fua));
        self.log_seq.push(self.completed);
        self.completed += 1;
    }

    /// How many writes completed so far: a flush submitted now covers
    /// exactly these (pass the value to [`flush_upto`](Self::flush_upto)).
    pub fn completed_writes(&self) -> u64 {
        self.completed
    }

    /// A flush submitted when `upto` writes had completed finishes: those
    /// writes are durable; later ones stay volatile.
    pub fn flush_upto(&mut self, upto: u64) {
        let n = self.log_seq.iter().take_while(|&&s| s < upto).count();
        for (offset, bytes, _) in self.log.drain(..n) {
            self.base[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        }
        self.log_seq.drain(..n);
    }

    /// Carry out `op` (it completes now).
    pub fn apply(&mut self, op: &Op) -> Result<Done, StorageError> {
        let check = |offset: u64, len: u64| {
            if offset
                .checked_add(len)
                .is_none_or(|e| e > self.data.len() as u64)
            {
                Err(StorageError::OutOfRange {
                    op: "sim",
                    offset,
                    len,
                    size: self.data.len() as u64,
                })
            } else {
                Ok(())
            }
        };
        match op {
            Op::Read { offset, len } => {
                check(*offset, *len as u64)?;
                let s = *offset as usize;
                Ok(Done::Read(Bytes::copy_from_slice(&self.data[s..s + len])))
            }
            Op::Write { offset, data, fua } => {
                check(*offset, data.len() as u64)?;
                self.write(*offset, data, *fua);
                Ok(Done::Ok)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len, .. } => {
                check(*offset, *len)?;
                let fua = matches!(op, Op::WriteZeroes { fua: true, .. });
                self.write(*offset, &vec![0; *len as usize], fua);
                Ok(Done::Ok)
            }
            Op::Flush => {
                // Everything completed is durable now.
                self.flush_upto(self.completed);
                Ok(Done::Ok)
            }
        }
    }

    /// Power loss: keep what is durable and a random subset of the rest.
    pub fn crash(&mut self, rng: &mut SplitMix64) {
        let mut after = self.base.clone();
        self.log_seq.clear();
        for (offset, bytes, fua) in self.log.drain(..) {
            if fua || rng.next_u64().is_multiple_of(2) {
                after[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
            }
        }
        self.base.clone_from(&after);
        self.data = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fua_and_flushed_writes_survive_a_crash_in_order() {
        let mut d = SimDisk::new(16);
        d.apply(&Op::Write {
            offset: 0,
            data: Bytes::from_static(&[1; 4]),
            fua: false,
        })
        .unwrap();
        d.apply(&Op::Flush).unwrap();
        d.apply(&Op::Write {
            offset: 0,
            data: Bytes::from_static(&[2; 4]),
            fua: false,
        })
        .unwrap();
        d.apply(&Op::Write {
            offset: 0,
            data: Bytes::from_static(&[3; 4]),
            fua: true,
        })
        .unwrap();
        for seed in 0..20 {
            let mut c = d.clone();
            c.crash(&mut SplitMix64::new(seed));
            // The FUA write is last in order, so it always wins.
            assert_eq!(&c.contents()[..4], &[3; 4]);
        }
        d.apply(&Op::Write {
            offset: 8,
            data: Bytes::from_static(&[9; 4]),
            fua: false,
        })
        .unwrap();
        let outcomes: std::collections::HashSet<u8> = (0..20)
            .map(|seed| {
                let mut c = d.clone();
                c.crash(&mut SplitMix64::new(seed));
                c.contents()[8]
            })
            .collect();
        assert_eq!(
            outcomes,
            [0, 9].into_iter().collect(),
            "unflushed writes may or may not survive"
        );
    }
}
