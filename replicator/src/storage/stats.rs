//! Engine counters: atomics updated when an op completes successfully, read
//! as an [`EngineStats`] snapshot.
//!
//! Invariant: an op's counts are added in one [`Counters::add`] call, after
//! its last syscall succeeded and before its completion runs, so a caller
//! that saw an op complete sees its counts in the next snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::EngineStats;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    fdatasyncs: AtomicU64,
    dsync_writes: AtomicU64,
    discards: AtomicU64,
    zeroes: AtomicU64,
}

impl Counters {
    /// Add one completed op's counts.
    pub(crate) fn add(&self, delta: &EngineStats) {
        let pairs = [
            (&self.reads, delta.reads),
            (&self.read_bytes, delta.read_bytes),
            (&self.writes, delta.writes),
            (&self.written_bytes, delta.written_bytes),
            (&self.fdatasyncs, delta.fdatasyncs),
            (&self.dsync_writes, delta.dsync_writes),
            (&self.discards, delta.discards),
            (&self.zeroes, delta.zeroes),
        ];
        for (counter, n) in pairs {
            if n != 0 {
                // Release pairs with the Acquire loads in `snapshot`: counts
                // added before a completion ran are visible to whoever it told.
                counter.fetch_add(n, Ordering::Release);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> EngineStats {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        EngineStats {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            written_bytes: get(&self.written_bytes),
            fdatasyncs: get(&self.fdatasyncs),
            dsync_writes: get(&self.dsync_writes),
            discards: get(&self.discards),
            zeroes: get(&self.zeroes),
        }
    }
}
