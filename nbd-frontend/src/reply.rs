//! Running requests and sending their replies, without a task per request.
//!
//! A request read from the socket becomes a [`Request`]: the export's future
//! for it plus what its reply needs (cookie, budget share, the connection's
//! [`Outbox`]). The request is its own waker. The connection task polls it
//! once; from then on, whichever thread wakes it polls it, there and then,
//! and if it is done, puts the reply in the outbox and, when the socket
//! takes it at once, writes it from that same thread. For the replicator
//! that thread is the storage engine's: a completed disk write is answered
//! without waking any other thread. Only replies the socket cannot take at
//! once (a slow client, large read data) go through the connection's
//! flusher task.
//!
//! Invariants:
//! - a request's future is polled by one thread at a time (the `state`
//!   word); a wake-up that arrives while it is being polled makes that
//!   thread poll it again, so no wake-up is lost;
//! - every request is answered exactly once: with its result, or `EIO` if
//!   its future panicked or was dropped unfinished;
//! - reply bytes reach the socket in queue order and never interleave: they
//!   are written only under the outbox lock, and a reply is written at once
//!   only when nothing is queued before it;
//! - a request's budget share is given back once its reply is written (or
//!   dropped because the connection is broken or abandoned);
//! - the socket is never written after the outbox is closed;
//! - deferring (see below) only delays the writes of the deferring thread's
//!   own replies, and only until it [`release`](Outbox::release)s, which it
//!   does before it blocks on anything (the engine's batch ends before it
//!   waits for the kernel; the connection releases before it reads the
//!   socket or waits for budget); any other thread's reply, and the
//!   flusher, write everything queued, deferred replies included.
//!
//! Batching: at queue depth 32 the engine thread completes several requests
//! per wake-up, and a connection often reads several whole requests from one
//! socket read. Written one by one, each reply costs a `writev` and wakes the
//! client once (at QD32 that was one syscall per request, the most frequent
//! one in the daemon). Inside [`batch_replies`] (an engine thread's round of
//! completions) or [`defer_replies`] (the connection starting a request
//! while the next one is already buffered), this thread's replies are only
//! queued; the release writes them all with one `writev`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::transmission::SimpleReply;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

/// Replies at most this large (header and data) are written by the thread
/// that completes the request; larger ones are left to the flusher task, so
/// that a storage thread never copies megabytes into a socket.
const INLINE_REPLY_MAX: usize = 64 * 1024;

/// Most replies gathered into one `writev`.
const MAX_BATCH: usize = 64;

/// The most reply bytes a held outbox's release writes from the releasing
/// thread; more is left to the flusher (the same rule as
/// [`INLINE_REPLY_MAX`], for a batch).
const RELEASE_WRITE_MAX: usize = 256 * 1024;

thread_local! {
    /// The outboxes this thread has deferred replies for, released when its
    /// [`batch_replies`] ends; `None` outside a batch.
    static BATCH: RefCell<Option<Vec<Arc<Outbox>>>> = const { RefCell::new(None) };
    /// Inside [`defer_replies`]: this thread's replies are queued only; the
    /// caller releases the outbox.
    static DEFER: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the replies this thread sends only queued, not written; the
/// caller must [`Outbox::release`] the outbox afterwards, before it blocks
/// on anything.
pub(crate) fn defer_replies<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEFER.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEFER.with(|d| d.replace(true)));
    f()
}

/// Run `f` with the replies this thread sends batched: each connection's
/// replies are queued, and written with one `writev` per connection when
/// `f` returns (or unwinds). For a storage engine's thread around one round
/// of completions; `f` must not block waiting for anything a client does.
/// Nested calls join the outer batch.
pub fn batch_replies<R>(f: impl FnOnce() -> R) -> R {
    let outer = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_some() {
            true
        } else {
            *b = Some(Vec::new());
            false
        }
    });
    if outer {
        return f();
    }
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            // Taken first: what the releases cause is not batched.
            let held = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
            for outbox in held {
                outbox.release();
            }
        }
    }
    let _end = End;
    f()
}

/// Whether this thread defers its replies to `outbox` (inside
/// [`defer_replies`], or inside [`batch_replies`], which then remembers
/// `outbox` to release it).
fn deferring(outbox: &Arc<Outbox>) -> bool {
    let batched = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        let Some(held) = b.as_mut() else {
            return false;
        };
        if !held.iter().any(|o| Arc::ptr_eq(o, outbox)) {
            held.push(outbox.clone());
        }
        true
    });
    batched || DEFER.with(Cell::get)
}

/// The write half of a client socket, as the outbox uses it: non-blocking
/// writes from any thread, and readiness for the flusher.
pub(crate) trait ReplySink: Send + Sync + 'static {
    /// Write without blocking; `WouldBlock` when the socket is full.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ready when the socket may take more.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReplySink for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.as_ref().try_write_vectored(bufs)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }
}

impl ReplySink for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.as_ref().try_write_vectored(bufs)
    }
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }
}

/// One reply waiting for the socket.
pub(crate) struct Reply {
    pub(crate) header: [u8; 16],
    pub(crate) data: Option<Bytes>,
    /// The request's share of the byte budget, given back once written.
    pub(crate) _budget: OwnedSemaphorePermit,
}

impl Reply {
    fn len(&self) -> usize {
        self.header.len() + self.data.as_ref().map_or(0, Bytes::len)
    }
}

/// A connection's replies on their way to the socket.
pub(crate) struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the flusher: replies are queued, or the session may be over.
    flusher: Notify,
    peer: String,
}

struct OutState {
    /// `None` once the connection is broken, abandoned or closed.
    sock: Option<Arc<dyn ReplySink>>,
    queue: VecDeque<Reply>,
    /// Bytes of the front reply already written.
    front_written: usize,
    /// Requests read whose reply is not queued yet.
    unanswered: usize,
    /// No more requests will be read.
    reading_done: bool,
}

impl Outbox {
    pub(crate) fn new(sock: Arc<dyn ReplySink>, peer: String) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutState {
                sock: Some(sock),
                queue: VecDeque::new(),
                front_written: 0,
                unanswered: 0,
                reading_done: false,
            }),
            flusher: Notify::new(),
            peer,
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        // Nothing panics while holding the lock but the allocator; the state
        // stays consistent either way.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `reply` (and, if it was a request's, count that request
    /// answered). If what is queued, this reply included, is small, write it
    /// now, from this thread; whatever the socket does not take is left to
    /// the flusher.
    ///
    /// While this thread defers its replies, the reply is only queued: the
    /// thread's release writes it (or another thread's reply, before).
    pub(crate) fn send(self: &Arc<Self>, reply: Reply, answers_request: bool) {
        let deferred = deferring(self);
        let mut written = Vec::new();
        let mut state = self.lock();
        if answers_request {
            state.unanswered -= 1;
        }
        let wake_flusher = if state.sock.is_none() {
            // Broken or abandoned: the reply is dropped with its budget.
            written.push(reply);
            answers_request && state.session_over()
        } else {
            // Replies another thread deferred are written with this one:
            // they are ahead of it in the queue.
            let inline = !deferred
                && if state.queue.is_empty() {
                    reply.len() <= INLINE_REPLY_MAX
                } else {
                    state.queue.iter().map(Reply::len).sum::<usize>() + reply.len()
                        <= RELEASE_WRITE_MAX
                };
            state.queue.push_back(reply);
            if inline {
                self.write_some(&mut state, &mut written);
            }
            // Whatever is still queued is the flusher's to write, unless
            // this thread's release will write it.
            (!deferred && !state.queue.is_empty()) || (answers_request && state.session_over())
        };
        drop(state);
        if wake_flusher {
            self.flusher.notify_one();
        }
        // Budget permits go back outside the lock.
        drop(written);
    }

    /// After deferring: write what is queued (up to [`RELEASE_WRITE_MAX`]
    /// bytes from this thread) and leave the rest to the flusher.
    pub(crate) fn release(&self) {
        let mut written = Vec::new();
        let mut state = self.lock();
        let queued: usize = state.queue.iter().map(Reply::len).sum();
        if queued <= RELEASE_WRITE_MAX {
            self.write_some(&mut state, &mut written);
        }
        let wake_flusher = !state.queue.is_empty();
        drop(state);
        if wake_flusher {
            self.flusher.notify_one();
        }
        drop(written);
    }

    /// Count a request read, before its future first runs.
    fn request_started(&self) {
        self.lock().unanswered += 1;
    }

    /// No more requests will be read: the flusher ends once every request
    /// read is answered and its reply written.
    pub(crate) fn finish_reading(&self) {
        self.lock().reading_done = true;
        self.flusher.notify_one();
    }

    /// Write queued replies until the queue is empty or the socket is full.
    /// Written (or, on a broken socket, dropped) replies are moved to
    /// `done`, for the caller to drop once the lock is released.
    fn write_some(&self, state: &mut OutState, done: &mut Vec<Reply>) {
        while !state.queue.is_empty() {
            let Some(sock) = state.sock.clone() else {
                break;
            };
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 * MAX_BATCH.min(16));
            let mut skip = state.front_written;
            for reply in state.queue.iter().take(MAX_BATCH) {
                for part in [&reply.header[..], reply.data.as_deref().unwrap_or(&[])] {
                    if skip >= part.len() {
                        skip -= part.len();
                    } else {
                        slices.push(IoSlice::new(&part[skip..]));
                        skip = 0;
                    }
                }
            }
            match sock.try_write_vectored(&slices) {
                Ok(0) => {
                    self.broken(state, done, "the socket takes no more data");
                    break;
                }
                Ok(mut n) => {
                    while n > 0 {
                        let front = state.queue.front().expect("written bytes were queued");
                        let left = front.len() - state.front_written;
                        if n < left {
                            state.front_written += n;
                            break;
                        }
                        n -= left;
                        state.front_written = 0;
                        done.extend(state.queue.pop_front());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.broken(state, done, &e.to_string());
                    break;
                }
            }
        }
    }

    /// Stop writing to the socket: drop every queued reply (and later ones).
    fn break_off(&self, why: &str) {
        let mut done = Vec::new();
        let mut state = self.lock();
        self.broken(&mut state, &mut done, why);
        drop(state);
        drop(done);
    }

    fn broken(&self, state: &mut OutState, done: &mut Vec<Reply>, why: &str) {
        if state.sock.take().is_some() {
            debug!("NBD client {}: cannot send reply: {why}", self.peer);
        }
        done.extend(state.queue.drain(..));
        state.front_written = 0;
    }

    /// Write what the inline writers could not, until every request read is
    /// answered and written. After `abandon`, remaining replies are
    /// dropped. Ends with the socket released (its write side shuts down
    /// when the last reference goes).
    pub(crate) async fn flush_until_done(self: Arc<Self>, abandon: CancellationToken) {
        loop {
            // Write what is queued; wait for socket space when it is full.
            let blocked_on = {
                let mut done = Vec::new();
                let mut state = self.lock();
                self.write_some(&mut state, &mut done);
                let blocked = if state.queue.is_empty() {
                    None
                } else {
                    state.sock.clone()
                };
                let over = state.session_over() && state.queue.is_empty();
                if over {
                    // Closed: nothing writes the socket from now on.
                    state.sock = None;
                }
                drop(state);
                drop(done);
                if over {
                    return;
                }
                blocked
            };
            let notified = self.flusher.notified();
            tokio::select! {
                biased;
                _ = abandon.cancelled() => {
                    self.break_off("server stopped waiting for the client to read");
                    // Keep waiting for the requests still running: their
                    // replies are dropped as they come.
                    self.wait_unanswered().await;
                    return;
                }
                _ = notified, if blocked_on.is_none() => {}
                ready = std::future::poll_fn(|cx| match &blocked_on {
                    Some(sock) => sock.poll_write_ready(cx),
                    None => Poll::Pending,
                }), if blocked_on.is_some() => {
                    if let Err(e) = ready {
                        self.break_off(&e.to_string());
                    }
                }
            }
        }
    }

    /// After abandoning: wait until every request read has been answered.
    async fn wait_unanswered(&self) {
        loop {
            let notified = self.flusher.notified();
            // Replies that arrive meanwhile are dropped by `send`.
            let over = self.lock().session_over();
            if over {
                return;
            }
            notified.await;
        }
    }
}

impl OutState {
    fn session_over(&self) -> bool {
        self.reading_done && self.unanswered == 0
    }
}

/// What a request's future yields: the result, and a read's data.
pub(crate) type Outcome = (Result<(), ErrorCode>, Option<Bytes>);

type RequestFuture = Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;

const IDLE: u8 = 0;
/// A thread is polling the future.
const POLLING: u8 = 1;
/// Woken while being polled: the polling thread polls again.
const NOTIFIED: u8 = 2;
/// Answered; the future is gone.
const DONE: u8 = 3;

/// A request in flight: its future, and what its reply needs.
pub(crate) struct Request {
    state: AtomicU8,
    /// Only touched by the thread that moved `state` to `POLLING`.
    future: Mutex<Option<RequestFuture>>,
    /// `None` once answered.
    answer: Mutex<Option<Answer>>,
}

struct Answer {
    cookie: u64,
    budget: OwnedSemaphorePermit,
    outbox: Arc<Outbox>,
}

impl Request {
    /// Start `future` for the request `cookie`: poll it once, here.
    pub(crate) fn start<F>(
        cookie: u64,
        future: F,
        budget: OwnedSemaphorePermit,
        outbox: &Arc<Outbox>,
    ) where
        F: Future<Output = Outcome> + Send + 'static,
    {
        outbox.request_started();
        let request = Arc::new(Request {
            state: AtomicU8::new(IDLE),
            // Polled without tokio's cooperative budget: it may be polled
            // inside another task's poll, whose budget is not its own, and
            // an exhausted budget would make it wake itself forever.
            future: Mutex::new(Some(Box::pin(tokio::task::unconstrained(future)))),
            answer: Mutex::new(Some(Answer {
                cookie,
                budget,
                outbox: outbox.clone(),
            })),
        });
        request.run();
    }

    /// Poll the future on this thread unless another thread is polling it,
    /// in which case that thread polls again.
    fn run(self: &Arc<Self>) {
        let mut seen = self.state.load(Ordering::Acquire);
        loop {
            let next = match seen {
                IDLE => POLLING,
                POLLING => NOTIFIED,
                _ => return, // already notified, or done
            };
            match self
                .state
                .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) if next == NOTIFIED => return,
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        loop {
            let polled = {
                let mut slot = self.future.lock().unwrap_or_else(|p| p.into_inner());
                let future = slot.as_mut().expect("a future is present until answered");
                let polled = catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
                if !matches!(polled, Ok(Poll::Pending)) {
                    // Dropping the finished future may run the export's
                    // code; a panic there is contained too.
                    let finished = slot.take();
                    drop(slot);
                    let _ = catch_unwind(AssertUnwindSafe(move || drop(finished)));
                }
                polled
            };
            match polled {
                Ok(Poll::Pending) => {
                    match self.state.compare_exchange(
                        POLLING,
                        IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => return,
                        // Woken meanwhile: poll again.
                        Err(_) => self.state.store(POLLING, Ordering::Release),
                    }
                }
                Ok(Poll::Ready((result, data))) => {
                    self.state.store(DONE, Ordering::Release);
                    self.answer(result, data);
                    return;
                }
                Err(_) => {
                    self.state.store(DONE, Ordering::Release);
                    let cookie = self.cookie();
                    error!(
                        "NBD request {cookie:#x}: the export's operation panicked; answering EIO"
                    );
                    self.answer(Err(ErrorCode::Io), None);
                    return;
                }
            }
        }
    }

    fn cookie(&self) -> u64 {
        self.answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |a| a.cookie)
    }

    fn answer(&self, result: Result<(), ErrorCode>, data: Option<Bytes>) {
        let answer = self.answer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(answer) = answer {
            answer.send(result, data);
        }
    }
}

impl Answer {
    fn send(self, result: Result<(), ErrorCode>, data: Option<Bytes>) {
        let header = match result {
            Ok(()) => SimpleReply::ok(self.cookie),
            Err(e) => SimpleReply::err(self.cookie, e),
        };
        let reply = Reply {
            header: header.encode(),
            data: if result.is_ok() { data } else { None },
            _budget: self.budget,
        };
        self.outbox.send(reply, true);
    }
}

impl Wake for Request {
    fn wake(self: Arc<Self>) {
        self.run();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.run();
    }
}

impl Drop for Request {
    /// The future was dropped unfinished (every waker is gone): the client
    /// still gets an answer.
    fn drop(&mut self) {
        let answer = self
            .answer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(answer) = answer {
            error!(
                "NBD request {:#x} ended without an answer (the export dropped its operation?); answering EIO",
                answer.cookie
            );
            answer.send(Err(ErrorCode::Io), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    /// A socket that takes everything and records each `writev`.
    #[derive(Default)]
    struct Recorder {
        writes: Mutex<Vec<Vec<u8>>>,
    }

    impl ReplySink for Recorder {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let bytes: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = bytes.len();
            self.writes.lock().unwrap().push(bytes);
            Ok(n)
        }
        fn poll_write_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn reply(cookie: u64, budget: &Arc<Semaphore>) -> Reply {
        Reply {
            header: SimpleReply::ok(cookie).encode(),
            data: None,
            _budget: budget.clone().try_acquire_owned().unwrap(),
        }
    }

    fn cookies(write: &[u8]) -> Vec<u64> {
        write
            .chunks(16)
            .map(|r| u64::from_be_bytes(r[8..16].try_into().unwrap()))
            .collect()
    }

    fn setup() -> (Arc<Recorder>, Arc<Outbox>, Arc<Semaphore>) {
        let sock = Arc::new(Recorder::default());
        let outbox = Outbox::new(sock.clone(), "test".into());
        (sock, outbox, Arc::new(Semaphore::new(16)))
    }

    #[test]
    fn replies_are_written_one_by_one_outside_a_batch() {
        let (sock, outbox, budget) = setup();
        for cookie in 1..=3 {
            outbox.send(reply(cookie, &budget), false);
        }
        let writes = sock.writes.lock().unwrap();
        assert_eq!(writes.len(), 3);
        assert_eq!(
            budget.available_permits(),
            16,
            "written replies give back their budget"
        );
    }

    #[test]
    fn a_batch_writes_its_replies_once_in_order_when_it_ends() {
        let (sock, outbox, budget) = setup();
        let (other_sock, other, other_budget) = setup();
        batch_replies(|| {
            for cookie in 1..=3 {
                outbox.send(reply(cookie, &budget), false);
                other.send(reply(10 + cookie, &other_budget), false);
            }
            // A nested batch joins the outer one.
            batch_replies(|| outbox.send(reply(4, &budget), false));
            assert!(sock.writes.lock().unwrap().is_empty());
            assert!(other_sock.writes.lock().unwrap().is_empty());
        });
        let writes = sock.writes.lock().unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(cookies(&writes[0]), vec![1, 2, 3, 4]);
        assert_eq!(
            cookies(&other_sock.writes.lock().unwrap()[0]),
            vec![11, 12, 13]
        );
        assert_eq!(budget.available_permits(), 16);
        // After the batch, replies are written at once again.
        drop(writes);
        outbox.send(reply(5, &budget), false);
        assert_eq!(sock.writes.lock().unwrap().len(), 2);
    }

    #[test]
    fn deferred_replies_wait_for_the_release_or_another_threads_reply() {
        let (sock, outbox, budget) = setup();
        defer_replies(|| {
            outbox.send(reply(1, &budget), false);
            outbox.send(reply(2, &budget), false);
        });
        assert!(sock.writes.lock().unwrap().is_empty());
        outbox.release();
        assert_eq!(cookies(&sock.writes.lock().unwrap()[0]), vec![1, 2]);

        // Another thread's reply does not wait behind deferred ones: it
        // writes them with its own, in queue order.
        defer_replies(|| outbox.send(reply(3, &budget), false));
        let other = outbox.clone();
        let other_budget = budget.clone();
        std::thread::spawn(move || other.send(reply(4, &other_budget), false))
            .join()
            .unwrap();
        let writes = sock.writes.lock().unwrap();
        assert_eq!(writes.len(), 2);
        assert_eq!(cookies(&writes[1]), vec![3, 4]);
        drop(writes);
        // The release then finds nothing left to write.
        outbox.release();
        assert_eq!(sock.writes.lock().unwrap().len(), 2);
        assert_eq!(budget.available_permits(), 16);
    }
}
