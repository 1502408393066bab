//! The threads engine: a pool of workers doing blocking syscalls.
//!
//! Owns its worker threads and a FIFO queue of submitted ops (a `Mutex` and
//! a `Condvar`). A worker takes one op, drives its [`Plan`] to the end with
//! blocking syscalls (so resumed short transfers, `EINTR` retries and every
//! fallback are exactly the uring engine's), and runs its completion.
//!
//! Invariants:
//! - every op accepted into the queue is completed exactly once, by a
//!   worker; an op refused (after shutdown) is completed at once with
//!   [`StorageError::Shutdown`] on the submitting thread;
//! - `shutdown` stops accepting ops from outside, lets the workers drain the
//!   queue (ops submitted by completions while draining are accepted, they are
//!   part of the work being finished), then joins them; a worker exits only
//!   when it finds the queue empty, so the worker that queued a follow-up op
//!   is still there to run it;
//! - ops run concurrently and may complete in any order. A `Flush` is an
//!   `fdatasync` that starts after it is dequeued, hence after every write
//!   that completed before it was submitted.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::backing::Backing;
use super::callback::{EngineThreads, complete};
use super::engine::{Completion, Engine, EngineKind, EngineStats, Op, StorageError};
use super::plan::{Geometry, Plan, Step, execute_blocking};
use super::stats::Counters;

/// The worker count callers use unless configured otherwise.
pub const DEFAULT_THREADS: usize = 16;

pub struct ThreadsEngine {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    backing: Arc<Backing>,
    geometry: Geometry,
    queue: Mutex<Queue>,
    work: Condvar,
    counters: Counters,
    threads: EngineThreads,
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<(Op, Completion)>,
    shutting_down: bool,
}

impl ThreadsEngine {
    /// Start `threads` workers (at least one) doing I/O on `backing`.
    ///
    /// # Panics
    /// If not a single worker thread can be spawned.
    pub fn new(backing: Arc<Backing>, threads: usize) -> ThreadsEngine {
        let shared = Arc::new(Shared {
            geometry: Geometry::of(&backing),
            backing,
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            counters: Counters::default(),
            threads: EngineThreads::new(),
        });
        let mut workers = Vec::with_capacity(threads.max(1));
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("storage-io-{i}"))
                .spawn(move || shared.run_worker());
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, started = workers.len(), "cannot start another storage worker thread")
                }
            }
        }
        assert!(
            !workers.is_empty(),
            "cannot start any storage worker thread"
        );
        ThreadsEngine {
            shared,
            workers: Mutex::new(workers),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A poisoned lock means a worker panicked outside a completion (those
        // are contained); the queue itself is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_worker(&self) {
        self.threads.enter();
        loop {
            let job = {
                let mut queue = self.lock();
                loop {
                    if let Some(job) = queue.ops.pop_front() {
                        break Some(job);
                    }
                    if queue.shutting_down {
                        break None;
                    }
                    queue = self.work.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Some((op, done)) = job else { return };
            let result = self.run_plan(Plan::new(op, self.geometry));
            complete(done, result);
        }
    }

    fn run_plan(&self, mut plan: Plan) -> Result<super::engine::Done, StorageError> {
        let mut last = None;
        loop {
            match plan.step(last, &self.counters) {
                // SAFETY: `prim` came from `plan`, which is alive and is not
                // stepped until the syscall returns.
                Step::Issue(prim) => {
                    last = Some(unsafe { execute_blocking(self.backing.as_fd(), &prim) })
                }
                Step::Finished(result) => return result,
            }
        }
    }
}

impl Engine for ThreadsEngine {
    fn submit(&self, op: Op, done: Completion) {
        let mut queue = self.shared.lock();
        if queue.shutting_down && !self.shared.threads.is_current() {
            drop(queue);
            complete(done, Err(StorageError::Shutdown));
            return;
        }
        queue.ops.push_back((op, done));
        drop(queue);
        self.shared.work.notify_one();
    }

    fn stats(&self) -> EngineStats {
        self.shared.counters.snapshot()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Threads
    }

    /// Drain and stop. Called from a completion (on a worker), it only starts
    /// the shutdown: a worker cannot wait for itself.
    fn shutdown(&self) {
        self.shared.lock().shutting_down = true;
        self.shared.work.notify_all();
        if self.shared.threads.is_current() {
            return;
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a storage worker thread panicked");
            }
        }
    }
}

impl Drop for ThreadsEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
