//! The activity log in memory: which 4 MiB extents may have writes in
//! flight, and the transactions that make that durable.
//!
//! Invariants (see docs/durability.md):
//! - a replicated write is submitted only when every extent it touches is
//!   in a *durable* transaction, so after a Primary crash the newest
//!   transaction covers every region that may differ between the nodes;
//! - an extent leaves the log only when no write to it is in flight and a
//!   flush on this node (and, while replicating, on the peer) made its
//!   earlier writes durable on both: dropping it from the log then cannot
//!   hide a difference;
//! - one transaction is written at a time, to the next ring slot, FUA.

use std::collections::{BTreeSet, HashMap};

use crate::metadata::activity_log::{AL_EXTENT_SIZE, AL_MAX_EXTENTS, AlTransaction};

/// Default number of extents in the log (≈ 4 GiB of hot data).
pub const DEFAULT_AL_EXTENTS: usize = 1009;

/// The most extents one client request may touch: the drivers split
/// larger trims and zero writes (NBD allows them up to 4 GiB) at extent
/// boundaries, so that a single request always fits in one transaction.
pub const MAX_REQUEST_EXTENTS: usize = 64;

/// Where the transaction being written is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlStage {
    /// Waiting for the flushes that must precede an eviction.
    Flushing { local: bool, peer: Option<u64> },
    /// The transaction write is in flight.
    Writing,
}

#[derive(Debug)]
pub struct ActivityLog {
    capacity: usize,
    /// Extents the next transaction will list, with their last use.
    desired: HashMap<u32, u64>,
    /// Extents listed by the newest durable transaction.
    durable: BTreeSet<u32>,
    /// Writes in flight per extent.
    refs: HashMap<u32, u32>,
    /// The transaction in progress: its number, its extents, its stage.
    pub writing: Option<(u64, BTreeSet<u32>, AlStage)>,
    next_number: u64,
    clock: u64,
}

/// The extents covering bytes `[start, end)`.
pub fn extents_of(start: u64, end: u64) -> std::ops::Range<u32> {
    (start / AL_EXTENT_SIZE) as u32..end.max(start + 1).div_ceil(AL_EXTENT_SIZE) as u32
}

impl ActivityLog {
    /// A log whose newest durable transaction was `newest` (None: empty).
    pub fn new(capacity: usize, newest: Option<&AlTransaction>) -> Self {
        let capacity = capacity.clamp(1, AL_MAX_EXTENTS);
        let durable: BTreeSet<u32> = newest
            .map(|t| t.extents.iter().copied().collect())
            .unwrap_or_default();
        ActivityLog {
            capacity,
            desired: durable.iter().map(|&e| (e, 0)).collect(),
            durable,
            refs: HashMap::new(),
            writing: None,
            next_number: newest.map_or(0, |t| t.number + 1),
            clock: 0,
        }
    }

    /// Whether every extent of `range` is in the durable log and stays in
    /// it: an extent that the transaction being written drops is not
    /// covered, even though it is still durable (a write started now would
    /// miss the flush that precedes the eviction, and the log that a crash
    /// recovers would not list it).
    pub fn covers(&self, range: std::ops::Range<u32>) -> bool {
        range.clone().all(|e| {
            self.durable.contains(&e)
                && self.desired.contains_key(&e)
                && self
                    .writing
                    .as_ref()
                    .is_none_or(|(_, set, _)| set.contains(&e))
        })
    }

    /// Ask for `range` to be in the log; true if a transaction is needed.
    /// Evicts the least recently used unreferenced extents to make room;
    /// if there is no room (every extent busy), nothing changes and the
    /// request must be repeated when a write finishes. A range wider than
    /// the whole log grows it for as long as it stays there (otherwise such
    /// a write could never start); the driver keeps every request within
    /// [`MAX_REQUEST_EXTENTS`].
    pub fn request(&mut self, range: std::ops::Range<u32>) -> bool {
        self.clock += 1;
        let new: Vec<u32> = range
            .clone()
            .filter(|e| !self.desired.contains_key(e))
            .collect();
        for e in range.clone() {
            if let Some(t) = self.desired.get_mut(&e) {
                *t = self.clock;
            }
        }
        let room = self.capacity.max(range.len());
        let need = (self.desired.len() + new.len()).saturating_sub(room);
        let mut victims: Vec<(u64, u32)> = self
            .desired
            .iter()
            .filter(|(e, _)| !range.contains(e) && !self.refs.contains_key(e))
            .map(|(e, t)| (*t, *e))
            .collect();
        if victims.len() < need {
            return false; // every extent busy: wait for writes to finish
        }
        victims.sort_unstable();
        for (_, v) in victims.into_iter().take(need) {
            self.desired.remove(&v);
        }
        for e in new {
            self.desired.insert(e, self.clock);
        }
        !self.covers(range)
    }

    /// A write to `range` starts / finishes.
    pub fn get(&mut self, range: std::ops::Range<u32>) {
        self.clock += 1;
        for e in range {
            *self.refs.entry(e).or_insert(0) += 1;
            if let Some(t) = self.desired.get_mut(&e) {
                *t = self.clock;
            }
        }
    }

    pub fn put(&mut self, range: std::ops::Range<u32>) {
        for e in range {
            if let Some(r) = self.refs.get_mut(&e) {
                *r -= 1;
                if *r == 0 {
                    self.refs.remove(&e);
                }
            }
        }
    }

    /// The next transaction to write, if the desired set differs from the
    /// durable one and none is being written: (transaction, whether it
    /// evicts extents).
    pub fn next_transaction(&mut self) -> Option<(AlTransaction, bool)> {
        if self.writing.is_some() {
            return None;
        }
        let set: BTreeSet<u32> = self.desired.keys().copied().collect();
        if set == self.durable {
            return None;
        }
        let evicts = self.durable.iter().any(|e| !set.contains(e));
        let number = self.next_number;
        self.next_number += 1;
        let t = AlTransaction {
            number,
            extents: set.iter().copied().collect(),
        };
        self.writing = Some((number, set, AlStage::Writing));
        Some((t, evicts))
    }

    /// The transaction being written reached stable storage.
    pub fn written(&mut self, number: u64) {
        if let Some((n, set, _)) = self.writing.take() {
            debug_assert_eq!(n, number);
            self.durable = set;
        }
    }

    /// The extents of the durable log (recovery marks them after a crash).
    pub fn durable_extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.durable.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.durable.len()
    }

    pub fn is_empty(&self) -> bool {
        self.durable.is_empty()
    }

    /// The stage of the transaction in progress.
    pub fn stage_mut(&mut self) -> Option<&mut AlStage> {
        self.writing.as_mut().map(|(_, _, stage)| stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_cover_byte_ranges() {
        assert_eq!(extents_of(0, 1), 0..1);
        assert_eq!(extents_of(AL_EXTENT_SIZE - 1, AL_EXTENT_SIZE + 1), 0..2);
        assert_eq!(extents_of(AL_EXTENT_SIZE, 2 * AL_EXTENT_SIZE), 1..2);
        assert_eq!(extents_of(5, 5), 0..1);
    }

    #[test]
    fn requests_transactions_eviction_and_busy_extents() {
        let mut al = ActivityLog::new(2, None);
        assert!(al.request(0..1));
        let (t, evicts) = al.next_transaction().unwrap();
        assert_eq!((t.number, t.extents.clone(), evicts), (0, vec![0], false));
        assert!(!al.covers(0..1), "covered before durable");
        al.written(0);
        assert!(al.covers(0..1));
        al.get(0..1);
        assert!(al.request(1..2));
        let (t, _) = al.next_transaction().unwrap();
        al.written(t.number);
        // Full and extent 0 busy: extent 1 is evicted for 2.
        assert!(al.request(2..3));
        let (t, evicts) = al.next_transaction().unwrap();
        assert_eq!((t.extents.clone(), evicts), (vec![0, 2], true));
        al.written(t.number);
        // An extent the transaction in flight drops is not covered, even
        // while it is still durable and asked for again.
        assert!(al.request(3..4));
        let (t, evicts) = al.next_transaction().unwrap();
        assert_eq!((t.extents.clone(), evicts), (vec![0, 3], true));
        assert!(al.request(2..3), "2 evicted from desired");
        assert!(
            !al.covers(2..3),
            "2 is being dropped by transaction {}",
            t.number
        );
        al.written(t.number);
        let (t, _) = al.next_transaction().unwrap();
        assert_eq!(t.extents, vec![0, 2]);
        al.written(t.number);
        assert!(al.covers(2..3));
        // Both busy: 3 must wait.
        al.get(2..3);
        assert!(!al.request(3..4));
        assert!(al.next_transaction().is_none());
        al.put(0..1);
        assert!(al.request(3..4));
        let (t, _) = al.next_transaction().unwrap();
        assert_eq!(t.extents, vec![2, 3]);
    }

    #[test]
    fn recovery_starts_from_the_newest_transaction() {
        let t = AlTransaction {
            number: 41,
            extents: vec![3, 7],
        };
        let mut al = ActivityLog::new(10, Some(&t));
        assert!(al.covers(3..4) && al.covers(7..8));
        assert_eq!(al.durable_extents().collect::<Vec<_>>(), vec![3, 7]);
        al.request(9..10);
        assert_eq!(al.next_transaction().unwrap().0.number, 42);
    }
}
