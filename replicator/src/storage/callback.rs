//! Running completion callbacks, and knowing which engine's thread we are on.
//!
//! Completions are user code running on engine threads. A panic in one must
//! not kill the thread that owns in-flight I/O (the uring thread owns buffers
//! the kernel may still be writing into), so [`complete`] contains it and
//! logs it. [`EngineThreads`] tags an engine's own threads, so an engine can
//! tell a re-entrant `submit` (from one of its completions) from an outside
//! one: during shutdown the first is part of the drain, the second is refused.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::engine::{Completion, Done, StorageError};

/// Call `done` with `result`, containing (and logging) a panic.
pub(crate) fn complete(done: Completion, result: Result<Done, StorageError>) {
    // AssertUnwindSafe: after a panic nothing of the callback's is used again;
    // the engine's own state is not touched by the callback.
    if let Err(panic) = catch_unwind(AssertUnwindSafe(move || done(result))) {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into());
        tracing::error!(panic = %msg, "a storage completion callback panicked; the engine carries on");
    }
}

thread_local! {
    /// The id of the engine whose thread this is (0: none).
    static CURRENT_ENGINE: Cell<usize> = const { Cell::new(0) };
}

/// Identifies one engine instance's threads.
#[derive(Debug)]
pub(crate) struct EngineThreads(usize);

impl EngineThreads {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        EngineThreads(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Mark the calling thread as one of this engine's (call at its start).
    pub(crate) fn enter(&self) {
        CURRENT_ENGINE.with(|c| c.set(self.0));
    }

    /// Count the calling thread as one of this engine's until `f` returns
    /// (for an op an engine runs on the submitting thread), then restore
    /// what it was.
    pub(crate) fn within<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(usize);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT_ENGINE.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(CURRENT_ENGINE.with(|c| c.replace(self.0)));
        f()
    }

    /// Whether the calling thread is one of this engine's.
    pub(crate) fn is_current(&self) -> bool {
        CURRENT_ENGINE.with(|c| c.get()) == self.0
    }
}
