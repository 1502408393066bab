//! Per-block locks for read-modify-write, granted through callbacks.
//!
//! Completions arrive on engine threads and must never block, so a lock is
//! not waited for: [`BlockLocks::acquire`] takes a callback that runs once the
//! block is held, at once if it is free, otherwise on the thread that
//! releases it. Waiters are served in arrival order.
//!
//! Invariants:
//! - a block is in the table exactly while someone holds it; its queue holds
//!   the callbacks of those waiting for it, and a release hands the block
//!   straight to the first of them (it never becomes free in between);
//! - a callback runs with no table lock held, exactly once;
//! - callers that hold several blocks acquire them in ascending order, so
//!   there is no cycle of waiters;
//! - hand-offs are trampolined per thread: a release made while this thread
//!   is already running a hand-off queues the next grant instead of running
//!   it nested, so a chain of grants whose I/O completes inline (an engine
//!   refusing ops after shutdown) cannot grow the stack.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

/// Runs once the block is held by its owner.
pub(crate) type Grant = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
pub(crate) struct BlockLocks {
    held: Mutex<HashMap<u64, VecDeque<Grant>>>,
}

impl BlockLocks {
    fn table(&self) -> MutexGuard<'_, HashMap<u64, VecDeque<Grant>>> {
        // The table is only changed by the short, non-panicking sections below.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `granted` once `block` is held for the caller, who must later
    /// [`release`](Self::release) it exactly once.
    pub(crate) fn acquire(&self, block: u64, granted: Grant) {
        match self.table().entry(block) {
            Entry::Occupied(mut waiters) => {
                waiters.get_mut().push_back(granted);
                return;
            }
            Entry::Vacant(free) => {
                free.insert(VecDeque::new());
            }
        }
        granted();
    }

    /// Release `block`, handing it to the next waiter if there is one.
    pub(crate) fn release(&self, block: u64) {
        let next = {
            let mut table = self.table();
            let waiters = table.get_mut(&block).expect("a released block is held");
            let next = waiters.pop_front();
            if next.is_none() {
                table.remove(&block);
            }
            next
        };
        if let Some(next) = next {
            hand_off(next);
        }
    }

    /// How many blocks are held (for tests and debugging).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.table().len()
    }
}

thread_local! {
    /// Grants waiting to run on this thread, while a hand-off loop runs here.
    static HAND_OFFS: RefCell<Option<VecDeque<Grant>>> = const { RefCell::new(None) };
}

fn hand_off(grant: Grant) {
    let run_here = HAND_OFFS.with(|slot| {
        let mut slot = slot.borrow_mut();
        match slot.as_mut() {
            Some(queue) => {
                queue.push_back(grant);
                None
            }
            None => {
                *slot = Some(VecDeque::new());
                Some(grant)
            }
        }
    });
    let Some(mut grant) = run_here else { return };
    loop {
        // A grant that panics (a panicking completion further down) must not
        // leave this thread's trampoline claimed with grants in it.
        if catch_unwind(AssertUnwindSafe(grant)).is_err() {
            tracing::error!("a block-lock grant panicked; carrying on with the next");
        }
        let next = HAND_OFFS.with(|slot| {
            let mut slot = slot.borrow_mut();
            let next = slot.as_mut().and_then(VecDeque::pop_front);
            if next.is_none() {
                *slot = None;
            }
            next
        });
        match next {
            Some(next) => grant = next,
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn waiters_are_granted_in_order_one_at_a_time() {
        let locks = Arc::new(BlockLocks::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let log = Arc::clone(&log);
            locks.acquire(7, Box::new(move || log.lock().unwrap().push(i)));
        }
        assert_eq!(*log.lock().unwrap(), [0], "only the first is granted");
        locks.release(7);
        assert_eq!(*log.lock().unwrap(), [0, 1]);
        locks.release(7);
        locks.release(7);
        assert_eq!(*log.lock().unwrap(), [0, 1, 2]);
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn distinct_blocks_do_not_wait_for_each_other() {
        let locks = BlockLocks::default();
        let granted = Arc::new(AtomicUsize::new(0));
        for block in 0..4 {
            let granted = Arc::clone(&granted);
            locks.acquire(
                block,
                Box::new(move || _ = granted.fetch_add(1, Ordering::SeqCst)),
            );
        }
        assert_eq!(granted.load(Ordering::SeqCst), 4);
        assert_eq!(locks.held(), 4);
    }

    #[test]
    fn chains_of_inline_releases_do_not_recurse() {
        // Each grant releases at once (as an RMW whose I/O is refused inline
        // does); 100k of them would overflow the stack if handed off nested.
        const N: usize = 100_000;
        let locks = Arc::new(BlockLocks::default());
        let ran = Arc::new(AtomicUsize::new(0));
        locks.acquire(1, Box::new(|| {}));
        for _ in 0..N {
            let (locks2, ran) = (Arc::clone(&locks), Arc::clone(&ran));
            locks.acquire(
                1,
                Box::new(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                    locks2.release(1);
                }),
            );
        }
        locks.release(1);
        assert_eq!(ran.load(Ordering::SeqCst), N);
        assert_eq!(locks.held(), 0);
    }
}
