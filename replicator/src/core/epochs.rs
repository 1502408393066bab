//! The transfer log: writes the peer acknowledged but has not yet flushed.
//!
//! A peer's write acknowledgement means its disk completed the write, which
//! may be in a volatile cache. Until a flush on the peer covers it, a peer
//! crash could lose it. The Primary therefore keeps, per epoch (the writes
//! acknowledged between two flushes sent to the peer), the blocks written;
//! a `FlushAck` retires every epoch up to that flush, and when the link is
//! lost every block still in the log is marked out of sync. This is DRBD's
//! transfer log and barrier acknowledgement.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct TransferLog {
    /// Closed epochs: (flush id that closes them, block ranges).
    closed: VecDeque<(u64, Vec<(u64, u64)>)>,
    current: Vec<(u64, u64)>,
    /// Blocks recorded in the open epoch (overlaps counted each time).
    current_blocks: u64,
}

impl TransferLog {
    /// Record blocks `[start, end)` as acknowledged and not yet flushed.
    pub fn record(&mut self, start: u64, end: u64) {
        self.current_blocks += end - start;
        if let Some(last) = self.current.last_mut()
            && last.1 == start
        {
            last.1 = end;
            return;
        }
        self.current.push((start, end));
    }

    /// Entries in the open epoch (to bound it with a flush).
    pub fn open_len(&self) -> usize {
        self.current.len()
    }

    /// Blocks recorded in the open epoch (to bound what a lost link marks).
    pub fn open_blocks(&self) -> u64 {
        self.current_blocks
    }

    /// A flush with `flush_id` is being sent: it closes the open epoch.
    pub fn close(&mut self, flush_id: u64) {
        let ranges = std::mem::take(&mut self.current);
        self.current_blocks = 0;
        self.closed.push_back((flush_id, ranges));
    }

    /// The peer's flush `flush_id` completed: its epoch and older are safe.
    pub fn flushed(&mut self, flush_id: u64) {
        while let Some((id, _)) = self.closed.front() {
            let done = *id <= flush_id;
            if !done {
                break;
            }
            self.closed.pop_front();
        }
    }

    /// Everything not known flushed on the peer (the link is gone).
    pub fn take_all(&mut self) -> Vec<(u64, u64)> {
        let mut all: Vec<_> = self.closed.drain(..).flat_map(|(_, r)| r).collect();
        all.append(&mut self.current);
        self.current_blocks = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_retire_epochs_and_the_rest_is_handed_back() {
        let mut t = TransferLog::default();
        t.record(0, 1);
        t.record(1, 2); // merged
        t.close(10);
        t.record(5, 6);
        t.close(11);
        t.record(9, 10);
        assert_eq!(t.open_len(), 1);
        t.flushed(10);
        assert_eq!(t.take_all(), vec![(5, 6), (9, 10)]);
        assert!(t.take_all().is_empty());
    }
}
