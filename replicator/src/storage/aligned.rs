//! [`Storage`]: byte-granular I/O on top of an engine that needs alignment.
//!
//! Clients (qemu, raw NBD tools) send requests at any byte offset and length,
//! and payloads land at any address. With `O_DIRECT` the engine needs
//! offsets, lengths and buffer addresses that are multiples of the backing
//! store's alignment `A`. This layer owns the translation:
//! - aligned range, unaligned memory: copy into an [`AlignedBuf`];
//! - unaligned read: read the covering aligned span, complete with a
//!   zero-copy slice of it;
//! - unaligned write: read-modify-write of the partial head and tail blocks;
//! - unaligned write-zeroes: the aligned interior through the engine, the
//!   partial edges by read-modify-write of zeros; unaligned discard: only the
//!   aligned interior (discard is advisory).
//!
//! Invariants:
//! - a read-modify-write holds the locks of its partial head and tail blocks
//!   (taken in ascending order) from before it reads them until its write
//!   has completed, so two writes that share a block without sharing a byte
//!   both survive. Every other write touching such a block either overlaps
//!   the RMW's bytes (outcome unspecified by NBD) or is an RMW itself and
//!   takes the same lock; aligned writes therefore take no locks;
//! - durability is the engine's: `fua` is passed to every engine op a request
//!   becomes, so the request is durable when it completes;
//! - every request completes exactly once. It completes inline (before
//!   `submit` returns) only when no I/O is needed: a range past the end, an
//!   empty range (a read of nothing, a write of nothing), an empty discard,
//!   or an engine that refuses it after shutdown;
//! - with alignment 1 (buffered I/O) everything is passed straight through.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_proto::AlignedBuf;
use tandem_proto::buf::is_aligned;

use super::backing::Backing;
use super::callback::complete;
use super::engine::{Completion, Done, Engine, EngineKind, EngineStats, Op, StorageError};
use super::locks::BlockLocks;
use super::plan::{interior, zero_chunk};

/// The node's handle on its backing store. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn Engine>,
    /// Offset/length alignment `A` (1 when buffered).
    align: u64,
    mem_align: usize,
    direct: bool,
    size: u64,
    locks: BlockLocks,
}

impl Storage {
    /// Byte-granular I/O through `engine`, which does I/O on `backing`.
    pub fn new(engine: Arc<dyn Engine>, backing: &Backing) -> Storage {
        Storage {
            inner: Arc::new(Inner {
                engine,
                align: backing.dio_align() as u64,
                mem_align: backing.mem_align(),
                direct: backing.is_direct(),
                size: backing.size(),
                locks: BlockLocks::default(),
            }),
        }
    }

    /// Queue `op` at any offset and length, with any buffer address; `done`
    /// runs once, normally on an engine thread (see the module docs).
    pub fn submit(&self, op: Op, done: Completion) {
        if let Err(e) = self.inner.check_range(&op) {
            complete(done, Err(e));
            return;
        }
        // Nothing to do (and an unaligned-range path would wait forever for
        // the edge blocks of a range that has none).
        match &op {
            Op::Read { len: 0, .. } => return complete(done, Ok(Done::Read(Bytes::new()))),
            Op::Write { data, .. } if data.is_empty() => return complete(done, Ok(Done::Ok)),
            Op::Discard { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => {
                return complete(done, Ok(Done::Ok));
            }
            _ => {}
        }
        if self.inner.align == 1 {
            self.inner.engine.submit(op, done);
            return;
        }
        match op {
            Op::Read { offset, len } => self.inner.read(offset, len, done),
            Op::Write { offset, data, fua } => Inner::write(&self.inner, offset, data, fua, done),
            Op::Flush => self.inner.engine.submit(Op::Flush, done),
            Op::Discard { offset, len } => self.inner.discard(offset, len, done),
            Op::WriteZeroes {
                offset,
                len,
                may_unmap,
                fast_only,
                fua,
            } => Inner::write_zeroes(
                &self.inner,
                offset,
                len,
                Zeroing {
                    may_unmap,
                    fast_only,
                    fua,
                },
                done,
            ),
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.inner.engine.stats()
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// The alignment requests are rounded to internally (1 when buffered).
    pub fn dio_align(&self) -> usize {
        self.inner.align as usize
    }

    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// The backing store's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Finish every submitted request (read-modify-writes included: their
    /// follow-up I/O is submitted from completions, which the engine accepts
    /// while draining), then stop the engine.
    pub fn shutdown(&self) {
        self.inner.engine.shutdown();
    }
}

#[derive(Clone, Copy)]
struct Zeroing {
    may_unmap: bool,
    fast_only: bool,
    fua: bool,
}

impl Inner {
    fn check_range(&self, op: &Op) -> Result<(), StorageError> {
        let (name, offset, len) = match op {
            Op::Read { offset, len } => ("read", *offset, *len as u64),
            Op::Write { offset, data, .. } => ("write", *offset, data.len() as u64),
            Op::Flush => return Ok(()),
            Op::Discard { offset, len } => ("discard", *offset, *len),
            Op::WriteZeroes { offset, len, .. } => ("write zeroes", *offset, *len),
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StorageError::OutOfRange {
                op: name,
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn is_aligned(&self, value: u64) -> bool {
        value.is_multiple_of(self.align)
    }

    fn align_down(&self, value: u64) -> u64 {
        value / self.align * self.align
    }

    fn align_up(&self, value: u64) -> u64 {
        value.div_ceil(self.align) * self.align
    }

    fn read(&self, offset: u64, len: usize, done: Completion) {
        let end = offset + len as u64;
        if self.is_aligned(offset) && self.is_aligned(end) {
            self.engine.submit(Op::Read { offset, len }, done);
            return;
        }
        let start = self.align_down(offset);
        let span = (self.align_up(end) - start) as usize;
        let skip = (offset - start) as usize;
        self.engine.submit(
            Op::Read {
                offset: start,
                len: span,
            },
            Box::new(move |result| {
                done(result.map(|d| match d {
                    Done::Read(bytes) => Done::Read(bytes.slice(skip..skip + len)),
                    other => other,
                }))
            }),
        );
    }

    fn write(this: &Arc<Inner>, offset: u64, data: Bytes, fua: bool, done: Completion) {
        let end = offset + data.len() as u64;
        if !this.is_aligned(offset) || !this.is_aligned(end) {
            Inner::read_modify_write(this, offset, data, fua, done);
            return;
        }
        let data = if is_aligned(&data, this.mem_align) {
            data
        } else {
            AlignedBuf::copy_from(&data).into_bytes()
        };
        this.engine.submit(Op::Write { offset, data, fua }, done);
    }

    fn discard(&self, offset: u64, len: u64, done: Completion) {
        let (start, end) = interior(offset, len, self.align);
        if end > start {
            self.engine.submit(
                Op::Discard {
                    offset: start,
                    len: end - start,
                },
                done,
            );
        } else {
            complete(done, Ok(Done::Ok)); // advisory: nothing whole to discard
        }
    }

    fn write_zeroes(this: &Arc<Inner>, offset: u64, len: u64, how: Zeroing, done: Completion) {
        let end = offset + len;
        let (start, stop) = interior(offset, len, this.align);
        let edges: Vec<(u64, u64)> = if stop > start {
            [(offset, start), (stop, end)]
                .into_iter()
                .filter(|(a, b)| b > a)
                .collect()
        } else {
            vec![(offset, end)] // within at most two blocks: one RMW covers it
        };
        if edges.is_empty() {
            this.engine.submit(
                Op::WriteZeroes {
                    offset,
                    len,
                    may_unmap: how.may_unmap,
                    fast_only: how.fast_only,
                    fua: how.fua,
                },
                done,
            );
            return;
        }
        let zero_edges = {
            let this = Arc::clone(this);
            move |done: Completion| {
                let join = Join::new(edges.len(), done);
                for (from, to) in edges {
                    let zeros = zero_chunk().slice(..(to - from) as usize);
                    Inner::read_modify_write(&this, from, zeros, how.fua, join.part());
                }
            }
        };
        if stop <= start {
            zero_edges(done);
            return;
        }
        // The interior first: with fast_only it is the part that may be
        // refused, and then nothing has been written.
        let op = Op::WriteZeroes {
            offset: start,
            len: stop - start,
            may_unmap: how.may_unmap,
            fast_only: how.fast_only,
            fua: how.fua,
        };
        this.engine.submit(
            op,
            Box::new(move |result| match result {
                Ok(_) => zero_edges(done),
                Err(e) => done(Err(e)),
            }),
        );
    }

    /// Write `data` at an unaligned `offset` / end: lock the partial edge
    /// blocks, read them, merge, write the whole aligned span, unlock.
    fn read_modify_write(this: &Arc<Inner>, offset: u64, data: Bytes, fua: bool, done: Completion) {
        debug_assert!(!data.is_empty(), "an empty range has no edge to merge");
        let end = offset + data.len() as u64;
        let mut edges = Vec::with_capacity(2);
        if !this.is_aligned(offset) {
            edges.push(offset / this.align);
        }
        if !this.is_aligned(end) && edges.last() != Some(&((end - 1) / this.align)) {
            edges.push((end - 1) / this.align);
        }
        let rmw = Rmw {
            inner: Arc::clone(this),
            offset,
            data,
            fua,
            edges,
            done,
        };
        rmw.lock_edges(0);
    }
}

/// One read-modify-write in progress.
struct Rmw {
    inner: Arc<Inner>,
    offset: u64,
    data: Bytes,
    fua: bool,
    /// Block indices of the partial edges, ascending.
    edges: Vec<u64>,
    done: Completion,
}

/// The merge buffer of an RMW while its edge reads complete.
struct Merge {
    rmw: Option<Rmw>,
    buf: AlignedBuf,
    reads_left: usize,
    error: Option<StorageError>,
}

impl Rmw {
    fn span(&self) -> (u64, u64) {
        let end = self.offset + self.data.len() as u64;
        (self.inner.align_down(self.offset), self.inner.align_up(end))
    }

    /// Take the edge locks from `next` on, in ascending order, then read.
    fn lock_edges(self, next: usize) {
        match self.edges.get(next).copied() {
            None => self.read_edges(),
            Some(block) => {
                let inner = Arc::clone(&self.inner);
                inner
                    .locks
                    .acquire(block, Box::new(move || self.lock_edges(next + 1)));
            }
        }
    }

    fn read_edges(self) {
        let (start, stop) = self.span();
        let align = self.inner.align;
        let engine = Arc::clone(&self.inner.engine);
        let edges = self.edges.clone();
        let merge = Arc::new(Mutex::new(Merge {
            buf: AlignedBuf::zeroed((stop - start) as usize),
            reads_left: edges.len(),
            error: None,
            rmw: Some(self),
        }));
        for block in edges {
            let merge = Arc::clone(&merge);
            let block_offset = block * align;
            let at = (block_offset - start) as usize;
            engine.submit(
                Op::Read {
                    offset: block_offset,
                    len: align as usize,
                },
                Box::new(move |result| {
                    let mut m = merge.lock().unwrap_or_else(|p| p.into_inner());
                    match result {
                        Ok(Done::Read(bytes)) => {
                            m.buf.as_mut_slice()[at..at + bytes.len()].copy_from_slice(&bytes)
                        }
                        Ok(Done::Ok) => unreachable!("a read completes with data"),
                        Err(e) => {
                            m.error.get_or_insert(e);
                        }
                    }
                    m.reads_left -= 1;
                    if m.reads_left > 0 {
                        return;
                    }
                    let rmw = m.rmw.take().expect("the last edge read finishes the merge");
                    let buf = std::mem::replace(&mut m.buf, AlignedBuf::zeroed(0));
                    let error = m.error.take();
                    drop(m);
                    match error {
                        Some(e) => rmw.finish(Err(e)),
                        None => rmw.write_merged(buf),
                    }
                }),
            );
        }
    }

    fn write_merged(self, mut buf: AlignedBuf) {
        let (start, _) = self.span();
        let at = (self.offset - start) as usize;
        buf.as_mut_slice()[at..at + self.data.len()].copy_from_slice(&self.data);
        let op = Op::Write {
            offset: start,
            data: buf.into_bytes(),
            fua: self.fua,
        };
        let engine = Arc::clone(&self.inner.engine);
        engine.submit(op, Box::new(move |result| self.finish(result)));
    }

    /// Unlock the edges and complete the request.
    fn finish(self, result: Result<Done, StorageError>) {
        for &block in self.edges.iter().rev() {
            self.inner.locks.release(block);
        }
        (self.done)(result.map(|_| Done::Ok));
    }
}

/// Completes `done` once every part has completed: with the first error, or
/// `Ok` if none failed.
struct Join {
    state: Arc<Mutex<JoinState>>,
}

struct JoinState {
    left: usize,
    error: Option<StorageError>,
    done: Option<Completion>,
}

impl Join {
    fn new(parts: usize, done: Completion) -> Join {
        Join {
            state: Arc::new(Mutex::new(JoinState {
                left: parts,
                error: None,
                done: Some(done),
            })),
        }
    }

    fn part(&self) -> Completion {
        let state = Arc::clone(&self.state);
        Box::new(move |result| {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = result {
                s.error.get_or_insert(e);
            }
            s.left -= 1;
            if s.left > 0 {
                return;
            }
            let done = s.done.take().expect("a join completes once");
            let result = match s.error.take() {
                Some(e) => Err(e),
                None => Ok(Done::Ok),
            };
            drop(s);
            done(result);
        })
    }
}
