//! The io_uring engine: one thread owns the ring and every op in flight.
//!
//! Submitters push `(op, completion)` into a locked queue and, if no wake-up
//! is already pending, write the eventfd. The ring thread always keeps a poll
//! on that eventfd armed, so it sleeps in `submit_and_wait` and wakes on
//! either a completion or new work. Each op is driven by the same [`Plan`] as
//! in the threads engine: every primitive the plan asks for becomes one SQE
//! (read, write with `RWF_DSYNC` for FUA, `fsync(DATASYNC)`, `fallocate`),
//! except block-device `BLKDISCARD`/`BLKZEROOUT`, which io_uring cannot do on
//! the kernels we target and which run on a small side thread whose results
//! come back through the same eventfd. SQEs beyond the free SQ space, or
//! beyond the completion queue's capacity, wait in a backlog.
//!
//! `Flush` ops do not go through the ring: io_uring cannot `fsync` without
//! blocking and hands every one to an io-wq worker, whose completion then
//! has to wake the ring thread, which wakes whoever waits for the FLUSH. A
//! dedicated sync thread instead calls `fdatasync` itself and runs the op's
//! completion there and then (nbdkit likewise syncs on the thread that
//! answers). Likewise, when a plan on the ring asks for an `fdatasync` (a
//! FUA write in `FuaMode::WriteThenSync`, a FUA write-zeroes), once its
//! earlier SQEs have completed, the ring thread hands the whole op (plan and
//! completion) to the sync thread, which finishes the plan with blocking
//! syscalls and runs the completion.
//!
//! Two more paths skip the ring when it would only add thread hand-offs
//! (each a cross-CPU wake-up, tens of microseconds on a virtual machine):
//! - a write is handed whole to the sync thread when that thread is idle and
//!   the ring would only pass the write on: buffered writes (io_uring punts
//!   them to io-wq on ext4) and FUA writes in `FuaMode::WriteThenSync`;
//! - a write or `Flush` submitted with the NBD connection's inline hint
//!   (`tandem_nbd::inline`: the client has nothing else queued) while the
//!   engine has nothing in flight runs on the submitting thread, with
//!   blocking syscalls, and completes before `submit` returns (as nbdkit
//!   answers on the thread that read the request);
//! - a plain buffered write of at most 64 KiB always runs on the submitting
//!   thread: it is a copy into the page cache (it blocks only when the
//!   kernel throttles dirty memory, which is backpressure), cheaper than
//!   the io-wq punt plus two wake-ups it would otherwise cost.
//!
//! Both drive the same [`Plan`], so they issue the same syscalls in the same
//! order as the ring would; both count in `Queue::syncs`, so shutdown waits.
//!
//! Invariants:
//! - only the ring thread touches the ring, the in-flight table and the
//!   backlog; submitters and the side thread only touch the two locked
//!   queues, so a completion (run on the ring thread, with no lock held) may
//!   call `submit` re-entrantly;
//! - an op's plan, and so every buffer an SQE points into, stays in the
//!   in-flight table until the op's last CQE has been reaped; if the thread
//!   ever unwinds with SQEs in the kernel, those plans are leaked, not freed;
//! - every accepted op is completed exactly once, on the ring thread; a
//!   refused one (after shutdown) at once, on the submitting thread;
//! - `shutdown` stops accepting ops from other threads, waits until every
//!   accepted op (and every follow-up its completion submitted) has
//!   completed, then joins the thread;
//! - a `Flush` is handed to the sync thread (or run inline) in `submit` and
//!   its `fdatasync` is called after that, so it is issued after every write that completed
//!   before the `Flush` was submitted; it never waits behind other ops;
//! - the ring thread stops only when no `Flush` is outstanding either
//!   (`Queue::syncs`, decremented after the completion ran, so whatever the
//!   completion submitted is already queued); it then stops the sync thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use rustix::io::Errno;

use super::backing::{Backing, BackingKind};
use super::blkdev;
use super::callback::{EngineThreads, complete};
use super::engine::{Completion, Engine, EngineKind, EngineStats, FuaMode, Op, StorageError};
use super::plan::{Geometry, Plan, Prim, PrimResult, Step, execute_blocking};
use super::stats::Counters;

/// The ring size callers use unless configured otherwise.
pub const DEFAULT_URING_ENTRIES: u32 = 256;

/// The largest plain buffered write done on the submitting thread.
const INLINE_BUFFERED_WRITE: usize = 64 * 1024;

/// `user_data` of the eventfd poll; op slots use their index.
const WAKE_TOKEN: u64 = u64::MAX;

pub struct UringEngine {
    shared: Arc<Shared>,
    /// For ops run on the submitting thread (see `run_inline`).
    backing: Arc<Backing>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What submitters, the side thread and the ring thread share.
struct Shared {
    queue: Mutex<Queue>,
    /// Results of side-thread ioctls: (slot, result).
    side_done: Mutex<Vec<(usize, PrimResult)>>,
    eventfd: OwnedFd,
    counters: Counters,
    /// The ring thread and the sync thread.
    threads: EngineThreads,
    /// The ring thread's id (set before any op can be submitted).
    ring_thread: std::sync::OnceLock<ThreadId>,
    /// Jobs for the sync thread.
    syncs: Mutex<SyncJobs>,
    sync_work: Condvar,
    /// Ops on the ring (the ring thread's `live`), for `run_inline`'s
    /// idleness check; only a heuristic, never relied on for correctness.
    ring_live: AtomicUsize,
    /// Writes bypass the page cache (`O_DIRECT`).
    direct: bool,
    fua: FuaMode,
}

/// Work for the sync thread.
enum SyncJob {
    /// A whole op: a `Flush`, or a write taken while the thread was idle
    /// (see [`Shared::sync_thread_takes`]).
    Op(Op, Completion),
    /// An op whose plan's next primitive is `Fdatasync`, with no SQE of it
    /// in the kernel.
    Plan(Plan, Completion),
}

#[derive(Default)]
struct SyncJobs {
    jobs: VecDeque<SyncJob>,
    /// The sync thread is running a job.
    busy: bool,
    /// Set by the ring thread when it stops: the sync thread ends.
    stop: bool,
}

#[derive(Default)]
struct Queue {
    ops: Vec<(Op, Completion)>,
    /// The eventfd has been written since the ring thread last took `ops`.
    wake_pending: bool,
    shutting_down: bool,
    /// The ring thread has exited: nothing will take `ops` any more.
    stopped: bool,
    /// Ops handed to the sync thread whose completion has not run.
    syncs: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_syncs(&self) -> MutexGuard<'_, SyncJobs> {
        self.syncs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_ring_thread(&self) -> bool {
        self.ring_thread.get() == Some(&std::thread::current().id())
    }

    /// Whether `op` is better done by the sync thread with blocking
    /// syscalls than through the ring, given whether that thread is `idle`.
    ///
    /// A `Flush` always is (see the module documentation). So is, when the
    /// sync thread is idle, a write the ring would only pass on: a FUA write
    /// in [`FuaMode::WriteThenSync`] (the ring would hand its `fdatasync` to
    /// the sync thread anyway), and any write without `O_DIRECT`, which
    /// io_uring cannot do without blocking on ext4 and punts to an io-wq
    /// worker whose completion then wakes the ring thread. The blocking
    /// write on the sync thread answers after one thread hand-off instead of
    /// three (nbdkit does it with none). When the sync thread is busy, the
    /// write goes to the ring as before, so writes still run in parallel.
    fn sync_thread_takes(&self, op: &Op, idle: bool) -> bool {
        match *op {
            Op::Flush => true,
            Op::Write { fua, .. } => {
                idle && (!self.direct || (fua && self.fua == FuaMode::WriteThenSync))
            }
            _ => false,
        }
    }

    /// A plain write of at most [`INLINE_BUFFERED_WRITE`] bytes without
    /// `O_DIRECT`: a copy into the page cache, which the submitting thread
    /// does faster than any hand-off (io_uring would punt it to an io-wq
    /// worker on ext4, which has no non-blocking buffered writes).
    fn small_buffered_write(&self, op: &Op) -> bool {
        matches!(op, Op::Write { fua: false, data, .. }
            if !self.direct && data.len() <= INLINE_BUFFERED_WRITE)
    }

    fn wake(&self) {
        // A full counter (EAGAIN) already means "wake up"; nothing else can fail.
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }
}

impl UringEngine {
    /// Set up a ring of `entries` SQEs for `backing` and start its thread.
    /// Fails when io_uring is unavailable (ENOSYS, EPERM from
    /// `kernel.io_uring_disabled` or a seccomp filter, ...) or lacks an
    /// operation this engine uses.
    pub fn new(backing: Arc<Backing>, entries: u32) -> io::Result<UringEngine> {
        let ring = IoUring::new(entries.max(2))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [
            ("read", opcode::Read::CODE),
            ("write", opcode::Write::CODE),
            ("fsync", opcode::Fsync::CODE),
            ("fallocate", opcode::Fallocate::CODE),
            ("poll", opcode::PollAdd::CODE),
        ];
        if let Some((name, _)) = needed.iter().find(|(_, code)| !probe.is_supported(*code)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("this kernel's io_uring lacks the {name} operation"),
            ));
        }

        // SAFETY: eventfd has no memory-safety preconditions.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };

        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            side_done: Mutex::new(Vec::new()),
            eventfd,
            counters: Counters::default(),
            threads: EngineThreads::new(),
            ring_thread: std::sync::OnceLock::new(),
            syncs: Mutex::new(SyncJobs::default()),
            sync_work: Condvar::new(),
            ring_live: AtomicUsize::new(0),
            direct: backing.is_direct(),
            fua: backing.fua_mode(),
        });
        let sync_thread = {
            let shared = Arc::clone(&shared);
            let backing = Arc::clone(&backing);
            std::thread::Builder::new()
                .name("storage-sync".into())
                .spawn(move || sync_thread(&shared, &backing))?
        };
        let side = match backing.kind() {
            BackingKind::BlockDevice => Some(SideThread::start(
                Arc::clone(&backing),
                Arc::clone(&shared),
            )?),
            BackingKind::File => None,
        };
        let ring_shared = Arc::clone(&shared);
        let ring_backing = Arc::clone(&backing);
        // The ring thread's state holds raw pointers (not Send): build it there.
        let spawned = std::thread::Builder::new()
            .name("storage-uring".into())
            .spawn(move || {
                RingThread::new(ring, ring_shared, side, sync_thread, ring_backing).run()
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                shared.lock_syncs().stop = true;
                shared.sync_work.notify_all();
                return Err(e);
            }
        };
        let _ = shared.ring_thread.set(thread.thread().id());
        Ok(UringEngine {
            shared,
            backing,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Engine for UringEngine {
    fn submit(&self, op: Op, done: Completion) {
        // A completion on the ring or the sync thread is part of the drain.
        let on_engine_thread = self.shared.threads.is_current();
        let on_ring_thread = on_engine_thread && self.shared.on_ring_thread();
        let mut queue = self.shared.lock();
        if queue.stopped || (queue.shutting_down && !on_engine_thread) {
            drop(queue);
            complete(done, Err(StorageError::Shutdown));
            return;
        }
        if !on_engine_thread && self.shared.small_buffered_write(&op) {
            queue.syncs += 1;
            drop(queue);
            self.run_inline(op, done);
            return;
        }
        if !on_engine_thread
            && matches!(op, Op::Flush | Op::Write { .. })
            && tandem_nbd::inline::take()
            && queue.ops.is_empty()
            && queue.syncs == 0
            && self.shared.ring_live.load(Ordering::Relaxed) == 0
        {
            // Counted like a sync-thread op: the ring thread does not stop
            // while it runs.
            queue.syncs += 1;
            drop(queue);
            self.run_inline(op, done);
            return;
        }
        if matches!(op, Op::Flush | Op::Write { .. }) {
            let mut syncs = self.shared.lock_syncs();
            let idle = !syncs.busy && syncs.jobs.is_empty();
            if self.shared.sync_thread_takes(&op, idle) {
                // Counted before the ring thread can see the queue empty.
                queue.syncs += 1;
                drop(queue);
                syncs.jobs.push_back(SyncJob::Op(op, done));
                drop(syncs);
                self.shared.sync_work.notify_one();
                return;
            }
        }
        queue.ops.push((op, done));
        // The ring thread looks at the queue before it sleeps again, so a
        // submit from one of its completions needs no wake-up.
        let wake = !on_ring_thread && !std::mem::replace(&mut queue.wake_pending, true);
        drop(queue);
        if wake {
            self.shared.wake();
        }
    }

    fn stats(&self) -> EngineStats {
        self.shared.counters.snapshot()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    /// Drain and stop. Called from a completion (on the ring thread), it only
    /// starts the shutdown: the thread cannot wait for itself.
    fn shutdown(&self) {
        self.shared.lock().shutting_down = true;
        self.shared.wake();
        if self.shared.threads.is_current() {
            return;
        }
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the io_uring storage thread panicked");
        }
    }
}

impl UringEngine {
    /// Run `op` on this (the submitting) thread with blocking syscalls and
    /// complete it before returning. Only for a write or flush submitted
    /// with the connection's [`tandem_nbd::inline`] hint while the engine
    /// has nothing else in flight: the client waits for this answer alone,
    /// and any hand-off to the ring or sync thread would only add a thread
    /// wake-up to its latency (nbdkit answers on the thread that read the
    /// request). The same plan as on every other path decides the
    /// syscalls, so durability is unchanged: a `Flush`'s `fdatasync` is
    /// issued after it was submitted, a FUA write completes after its sync.
    /// The caller counted the op in `Queue::syncs`. The thread counts as an
    /// engine thread meanwhile, so what the completion submits is part of a
    /// shutdown's drain, and never runs inline itself.
    fn run_inline(&self, op: Op, done: Completion) {
        let shared = &self.shared;
        shared.threads.within(|| {
            let plan = Plan::new(op, Geometry::of(&self.backing));
            finish_blocking(shared, &self.backing, plan, None, done);
        });
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// An op in flight.
struct Slot {
    plan: Plan,
    done: Option<Completion>,
    /// The primitive waiting in the backlog for SQ space.
    pending: Option<Prim>,
}

/// State owned by the ring thread.
struct RingThread {
    geometry: Geometry,
    fd: types::Fd,
    ring: IoUring,
    shared: Arc<Shared>,
    side: Option<SideThread>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Occupied slots.
    live: usize,
    /// Joined when the ring thread stops.
    sync_thread: Option<JoinHandle<()>>,
    /// Slots whose pending primitive awaits SQ space.
    backlog: VecDeque<usize>,
    /// SQEs pushed whose CQE has not been reaped (the eventfd poll excluded).
    in_kernel: usize,
    /// Cap on `in_kernel`, so completions always fit the CQ.
    max_in_kernel: usize,
    poll_armed: bool,
    cqes: Vec<(u64, i32)>,
    /// Keeps the descriptor in `fd` open.
    _backing: Arc<Backing>,
}

impl RingThread {
    fn new(
        ring: IoUring,
        shared: Arc<Shared>,
        side: Option<SideThread>,
        sync_thread: JoinHandle<()>,
        backing: Arc<Backing>,
    ) -> RingThread {
        RingThread {
            geometry: Geometry::of(&backing),
            fd: types::Fd(backing.as_raw_fd()),
            max_in_kernel: (ring.params().cq_entries() as usize)
                .saturating_sub(1)
                .max(1),
            ring,
            shared,
            side,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            sync_thread: Some(sync_thread),
            backlog: VecDeque::new(),
            in_kernel: 0,
            poll_armed: false,
            cqes: Vec::new(),
            _backing: backing,
        }
    }

    fn run(mut self) {
        self.shared.threads.enter();
        loop {
            // Replies to the requests completed in one round go out together
            // (one `writev` per connection, `tandem_nbd::batch_replies`); the
            // batch ends before the thread waits in `submit_and_wait`.
            tandem_nbd::batch_replies(|| {
                self.take_side_results();
                self.take_new_ops();
            });
            self.fill_sq();
            let must_not_sleep = {
                let mut queue = self.shared.lock();
                if queue.shutting_down && queue.ops.is_empty() && self.live == 0 && queue.syncs == 0
                {
                    queue.stopped = true;
                    break;
                }
                !queue.ops.is_empty()
                    || (!self.backlog.is_empty() && self.in_kernel < self.max_in_kernel)
                    || !self
                        .shared
                        .side_done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
            };
            match self
                .ring
                .submit_and_wait(if must_not_sleep { 0 } else { 1 })
            {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
            tandem_nbd::batch_replies(|| self.reap());
        }
        if let Some(side) = self.side.take() {
            side.stop();
        }
        self.stop_sync_thread();
    }

    /// End the sync thread (it has nothing outstanding once the ring thread
    /// stops normally) and wait for it.
    fn stop_sync_thread(&mut self) {
        self.shared.lock_syncs().stop = true;
        self.shared.sync_work.notify_all();
        if let Some(thread) = self.sync_thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the storage sync thread panicked");
        }
    }

    fn take_side_results(&mut self) {
        let results = std::mem::take(
            &mut *self
                .shared
                .side_done
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (slot, result) in results {
            self.advance(slot, Some(result));
        }
    }

    fn take_new_ops(&mut self) {
        let ops = {
            let mut queue = self.shared.lock();
            queue.wake_pending = false;
            std::mem::take(&mut queue.ops)
        };
        for (op, done) in ops {
            let slot = Slot {
                plan: Plan::new(op, self.geometry),
                done: Some(done),
                pending: None,
            };
            let index = match self.free.pop() {
                Some(index) => {
                    self.slots[index] = Some(slot);
                    index
                }
                None => {
                    self.slots.push(Some(slot));
                    self.slots.len() - 1
                }
            };
            self.live += 1;
            self.shared.ring_live.fetch_add(1, Ordering::Relaxed);
            self.advance(index, None);
        }
    }

    /// Step slot `index`'s plan with `last` and act on what it says next.
    fn advance(&mut self, index: usize, last: Option<PrimResult>) {
        let slot = self.slots[index]
            .as_mut()
            .expect("advanced slot is occupied");
        match slot.plan.step(last, &self.shared.counters) {
            Step::Issue(prim @ (Prim::BlkDiscard { .. } | Prim::BlkZeroOut { .. })) => {
                let side = self
                    .side
                    .as_ref()
                    .expect("block-device ioctls only arise on block devices");
                side.send(index, &prim);
            }
            Step::Issue(Prim::Fdatasync) => {
                // No SQE of this op is in the kernel (its plan issues one
                // primitive at a time): the sync thread finishes it.
                let slot = self.slots[index].take().expect("slot is occupied");
                self.free.push(index);
                self.live -= 1;
                self.shared.ring_live.fetch_sub(1, Ordering::Relaxed);
                let done = slot.done.expect("an op completes once");
                // Counted before the slot stops counting as live.
                self.shared.lock().syncs += 1;
                self.shared
                    .lock_syncs()
                    .jobs
                    .push_back(SyncJob::Plan(slot.plan, done));
                self.shared.sync_work.notify_one();
            }
            Step::Issue(prim) => {
                slot.pending = Some(prim);
                self.backlog.push_back(index);
            }
            Step::Finished(result) => {
                let mut slot = self.slots[index].take().expect("slot is occupied");
                self.free.push(index);
                self.live -= 1;
                self.shared.ring_live.fetch_sub(1, Ordering::Relaxed);
                let done = slot.done.take().expect("an op completes once");
                complete(done, result);
            }
        }
    }

    /// Move backlog primitives into the SQ while it and the CQ have room.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        if !self.poll_armed {
            let poll = opcode::PollAdd::new(
                types::Fd(self.shared.eventfd.as_raw_fd()),
                libc::POLLIN as u32,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // SAFETY: a poll SQE references no memory.
            if unsafe { sq.push(&poll) }.is_ok() {
                self.poll_armed = true;
            }
        }
        while self.in_kernel < self.max_in_kernel
            && let Some(&index) = self.backlog.front()
        {
            let slot = self.slots[index]
                .as_mut()
                .expect("backlogged slot is occupied");
            let prim = slot
                .pending
                .as_ref()
                .expect("backlogged slot has a primitive");
            let entry = sqe_for(self.fd, prim).user_data(index as u64);
            // SAFETY: the SQE's buffer (if any) lives in this slot's plan, or
            // is the static zero chunk. The slot stays in `slots`, and the
            // plan is not stepped, until this SQE's CQE is reaped.
            if unsafe { sq.push(&entry) }.is_err() {
                break; // SQ full: submit, then come back
            }
            slot.pending = None;
            self.backlog.pop_front();
            self.in_kernel += 1;
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, result) in &cqes {
            if user_data == WAKE_TOKEN {
                self.poll_armed = false;
                let mut counter = [0u8; 8];
                // Reset the counter; EAGAIN (already zero) is fine.
                let _ = rustix::io::read(&self.shared.eventfd, &mut counter);
                continue;
            }
            self.in_kernel -= 1;
            let result = if result < 0 {
                Err(Errno::from_raw_os_error(-result))
            } else {
                Ok(result as usize)
            };
            self.advance(user_data as usize, Some(result));
        }
        cqes.clear();
        self.cqes = cqes;
    }
}

impl Drop for RingThread {
    /// Runs when the thread ends, normally or by a panic. Refuse what is still
    /// queued; on a panic with ops in flight, fail them and leak their plans,
    /// whose buffers the kernel may still be using.
    fn drop(&mut self) {
        let queued = {
            let mut queue = self.shared.lock();
            queue.stopped = true;
            std::mem::take(&mut queue.ops)
        };
        // On a panic the sync thread still finishes its jobs, then ends.
        self.shared.lock_syncs().stop = true;
        self.shared.sync_work.notify_all();
        for (_, done) in queued {
            complete(done, Err(StorageError::Shutdown));
        }
        if self.live > 0 {
            tracing::error!(
                ops = self.live,
                "the io_uring storage thread stopped with ops in flight; failing them"
            );
            for slot in std::mem::take(&mut self.slots).into_iter().flatten() {
                let Slot { plan, done, .. } = slot;
                std::mem::forget(plan);
                if let Some(done) = done {
                    complete(done, Err(StorageError::Shutdown));
                }
            }
        }
    }
}

/// The sync thread: run each `Flush` (one `fdatasync`, through the same
/// plan as every engine) and its completion, then tell the ring thread, which
/// may be waiting for it to stop.
fn sync_thread(shared: &Shared, backing: &Backing) {
    shared.threads.enter();
    let geometry = Geometry::of(backing);
    loop {
        let job = {
            let mut syncs = shared.lock_syncs();
            syncs.busy = false;
            loop {
                if let Some(job) = syncs.jobs.pop_front() {
                    syncs.busy = true;
                    break Some(job);
                }
                if syncs.stop {
                    break None;
                }
                syncs = shared
                    .sync_work
                    .wait(syncs)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let (plan, done, last) = match job {
            None => return,
            Some(SyncJob::Op(op, done)) => (Plan::new(op, geometry), done, None),
            // Its pending primitive is an fdatasync: do it, then step on.
            Some(SyncJob::Plan(plan, done)) => {
                // SAFETY: Fdatasync holds no pointers.
                let synced = unsafe { execute_blocking(backing.as_fd(), &Prim::Fdatasync) };
                (plan, done, Some(synced))
            }
        };
        finish_blocking(shared, backing, plan, last, done);
    }
}

/// Step `plan` to its end with blocking syscalls (`last`: the result of
/// its pending primitive, if already issued), complete it, and give back
/// its `Queue::syncs` slot, waking a ring thread that waits to shut down.
fn finish_blocking(
    shared: &Shared,
    backing: &Backing,
    mut plan: Plan,
    mut last: Option<Result<usize, Errno>>,
    done: Completion,
) {
    let result = loop {
        match plan.step(last, &shared.counters) {
            // SAFETY: `prim` came from `plan`, which is alive and is not
            // stepped until the syscall returns.
            Step::Issue(prim) => last = Some(unsafe { execute_blocking(backing.as_fd(), &prim) }),
            Step::Finished(result) => break result,
        }
    };
    complete(done, result);
    let shutting_down = {
        let mut queue = shared.lock();
        queue.syncs -= 1;
        queue.shutting_down
    };
    if shutting_down {
        shared.wake();
    }
}

/// The SQE performing `prim` on `fd`.
fn sqe_for(fd: types::Fd, prim: &Prim) -> squeue::Entry {
    match *prim {
        // Lengths are at most plan::MAX_TRANSFER (or ZERO_CHUNK), below u32::MAX.
        Prim::Read { offset, buf, len } => opcode::Read::new(fd, buf, len as u32)
            .offset(offset)
            .build(),
        Prim::Write {
            offset,
            buf,
            len,
            dsync,
        } => opcode::Write::new(fd, buf, len as u32)
            .offset(offset)
            .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
            .build(),
        Prim::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Prim::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(mode.bits() as i32)
            .build(),
        Prim::BlkDiscard { .. } | Prim::BlkZeroOut { .. } => {
            unreachable!("block-device ioctls go to the side thread")
        }
    }
}

/// A block-device ioctl for the side thread.
enum Ioctl {
    Discard,
    ZeroOut,
}

/// The thread doing blocking block-device ioctls for the ring thread.
struct SideThread {
    jobs: mpsc::Sender<(usize, Ioctl, u64, u64)>,
    handle: JoinHandle<()>,
}

impl SideThread {
    fn start(backing: Arc<Backing>, shared: Arc<Shared>) -> io::Result<SideThread> {
        let (jobs, rx) = mpsc::channel::<(usize, Ioctl, u64, u64)>();
        let handle = std::thread::Builder::new()
            .name("storage-uring-ioctl".into())
            .spawn(move || {
                for (slot, ioctl, offset, len) in rx {
                    let result = match ioctl {
                        Ioctl::Discard => blkdev::discard(backing.as_fd(), offset, len),
                        Ioctl::ZeroOut => blkdev::zero_out(backing.as_fd(), offset, len),
                    };
                    shared
                        .side_done
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((slot, result.map(|()| 0)));
                    shared.wake();
                }
            })?;
        Ok(SideThread { jobs, handle })
    }

    fn send(&self, slot: usize, prim: &Prim) {
        let job = match *prim {
            Prim::BlkDiscard { offset, len } => (slot, Ioctl::Discard, offset, len),
            Prim::BlkZeroOut { offset, len } => (slot, Ioctl::ZeroOut, offset, len),
            _ => unreachable!("only ioctls go to the side thread"),
        };
        self.jobs
            .send(job)
            .expect("the ioctl thread outlives the ring thread's use of it");
    }

    fn stop(self) {
        drop(self.jobs);
        if self.handle.join().is_err() {
            tracing::error!("the storage ioctl thread panicked");
        }
    }
}
