//! Byte ranges with an operation in flight, and operations waiting for them.
//!
//! Invariant: active ranges never overlap. An operation whose range
//! overlaps an active range, or an earlier waiting operation, waits; so
//! overlapping operations run one after the other in arrival order, and
//! both nodes apply overlapping writes in the same order (the Primary only
//! sends the second after the first completed on both).

use std::collections::{BTreeMap, VecDeque};

#[derive(Debug, Default)]
pub struct ActiveRanges {
    /// start → (end, owner)
    active: BTreeMap<u64, (u64, u64)>,
    waiting: VecDeque<(u64, u64, u64)>,
}

impl ActiveRanges {
    fn overlaps_active(&self, start: u64, end: u64) -> bool {
        // The only candidate is the active range starting last before `end`:
        // active ranges are disjoint and sorted.
        self.active
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _))| e > start)
    }

    /// Admit `owner` for `[start, end)` now (true) or queue it (false).
    /// Empty ranges are always admitted and never recorded.
    pub fn admit(&mut self, owner: u64, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let blocked = self.overlaps_active(start, end)
            || self.waiting.iter().any(|&(s, e, _)| s < end && start < e);
        if blocked {
            self.waiting.push_back((start, end, owner));
            false
        } else {
            self.active.insert(start, (end, owner));
            true
        }
    }

    /// Release the active range starting at `start`; returns the owners
    /// admitted as a result, in order.
    pub fn release(&mut self, start: u64, end: u64) -> Vec<u64> {
        if start >= end {
            return Vec::new();
        }
        let removed = self.active.remove(&start);
        debug_assert!(
            removed.is_some_and(|(e, _)| e == end),
            "releasing a range that is not active"
        );
        let mut admitted = Vec::new();
        let mut still = VecDeque::new();
        while let Some((s, e, owner)) = self.waiting.pop_front() {
            let blocked =
                self.overlaps_active(s, e) || still.iter().any(|&(ws, we, _)| ws < e && s < we);
            if blocked {
                still.push_back((s, e, owner));
            } else {
                self.active.insert(s, (e, owner));
                admitted.push(owner);
            }
        }
        self.waiting = still;
        admitted
    }

    #[cfg(test)]
    pub fn active_len(&self) -> usize {
        self.active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ops_run_in_order_and_others_pass() {
        let mut r = ActiveRanges::default();
        assert!(r.admit(1, 0, 100));
        assert!(!r.admit(2, 50, 150)); // overlaps 1
        assert!(!r.admit(3, 120, 130)); // overlaps waiting 2: keeps order
        assert!(r.admit(4, 200, 300)); // independent
        assert!(!r.admit(5, 100, 110)); // overlaps waiting 2
        assert_eq!(r.release(0, 100), vec![2]);
        assert_eq!(r.release(50, 150), vec![3, 5]);
        assert_eq!(r.release(120, 130), Vec::<u64>::new());
        assert_eq!(r.active_len(), 2);
        assert!(r.admit(6, 0, 0));
    }

    #[test]
    fn adjacent_ranges_do_not_overlap() {
        let mut r = ActiveRanges::default();
        assert!(r.admit(1, 0, 4096));
        assert!(r.admit(2, 4096, 8192));
        assert!(!r.admit(3, 4095, 4097));
    }
}
