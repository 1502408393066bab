//! What an [`Op`] means, as a sequence of syscalls: the single definition of
//! the semantics both engines share.
//!
//! A [`Plan`] is a small state machine. The engine asks it for the next
//! primitive ([`Prim`]: one `pread`, `pwrite`, `fdatasync`, `fallocate` or
//! ioctl), performs it however it likes (a blocking syscall on a worker
//! thread, an SQE on the ring), and feeds the result back; the plan resumes
//! short transfers, retries `EINTR`/`EAGAIN`, picks fallbacks, and finally
//! yields the op's result. Because both engines drive the same plans, they
//! cannot differ in what they do, only in how.
//!
//! Durability invariants encoded here:
//! - a plain `Write` issues only plain writes, never a sync;
//! - a `fua` `Write` issues every one of its writes with `RWF_DSYNC`
//!   ([`FuaMode::Dsync`]), or plain writes and then exactly one `fdatasync`,
//!   issued only after every write succeeded ([`FuaMode::WriteThenSync`]);
//! - `Flush` issues exactly one `fdatasync`;
//! - `fua` `WriteZeroes` ends with one `fdatasync`, issued only after every
//!   other step of the op succeeded;
//! - an op's counters are added once, when it completes successfully.
//!
//! A [`Prim`] holds raw pointers into the plan's buffers: it is valid while
//! the plan that produced it is alive and has not been stepped again.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use bytes::Bytes;
use rustix::fs::FallocateFlags;
use rustix::io::{Errno, ReadWriteFlags};
use tandem_proto::AlignedBuf;

use super::backing::{Backing, BackingKind};
use super::blkdev;
use super::engine::{Done, EngineStats, FuaMode, Op, StorageError};
use super::stats::Counters;

/// The most one read or write syscall is asked to move (a multiple of every
/// alignment, and below the `u32` an SQE length holds).
pub(crate) const MAX_TRANSFER: usize = 1 << 30;
/// Chunk size when zeroing by writing zeros.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

const PUNCH_HOLE: FallocateFlags = FallocateFlags::PUNCH_HOLE.union(FallocateFlags::KEEP_SIZE);
const ZERO_RANGE: FallocateFlags = FallocateFlags::ZERO_RANGE.union(FallocateFlags::KEEP_SIZE);

/// One syscall an engine performs for a plan.
#[derive(Debug)]
pub(crate) enum Prim {
    Read {
        offset: u64,
        buf: *mut u8,
        len: usize,
    },
    Write {
        offset: u64,
        buf: *const u8,
        len: usize,
        dsync: bool,
    },
    Fdatasync,
    Fallocate {
        mode: FallocateFlags,
        offset: u64,
        len: u64,
    },
    BlkDiscard {
        offset: u64,
        len: u64,
    },
    BlkZeroOut {
        offset: u64,
        len: u64,
    },
}

/// A primitive's outcome: bytes moved (0 for non-transfers), or the errno.
pub(crate) type PrimResult = Result<usize, Errno>;

/// What the engine does next for a plan.
#[derive(Debug)]
pub(crate) enum Step {
    Issue(Prim),
    Finished(Result<Done, StorageError>),
}

/// What a backing store looks like to a plan.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) kind: BackingKind,
    /// Unit of BLKDISCARD / BLKZEROOUT (1 for files).
    pub(crate) logical_block_size: u64,
    pub(crate) fua: FuaMode,
}

impl Geometry {
    pub(crate) fn of(backing: &Backing) -> Geometry {
        Geometry {
            kind: backing.kind(),
            logical_block_size: backing.logical_block_size(),
            fua: backing.fua_mode(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Plan {
    name: &'static str,
    state: State,
    /// Counts to add when the op succeeds.
    delta: EngineStats,
}

#[derive(Debug)]
enum State {
    Read {
        offset: u64,
        buf: Option<AlignedBuf>,
        done: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
        done: usize,
        /// Every write carries `RWF_DSYNC`.
        dsync: bool,
        /// An `fdatasync` is still to be issued once every byte is written.
        sync_after: bool,
    },
    /// Flush, Discard, WriteZeroes: steps run in order.
    Phases(VecDeque<Phase>),
    /// Finishes with NotSupported without doing anything.
    Refused,
}

/// What to do when `fallocate` says the filesystem lacks the mode.
#[derive(Debug, Clone, Copy)]
enum Unsupported {
    /// Advisory op: nothing to do.
    Ignore,
    /// `fast_only` zeroing: fail with NotSupported.
    Fail,
    /// Write zeros instead.
    ZeroFill,
}

#[derive(Debug)]
enum Phase {
    /// `fallocate(mode)`; if it is a hole punch and `then_zero_range`, an
    /// unsupported punch is retried as ZERO_RANGE before `unsupported` applies.
    Fallocate {
        mode: FallocateFlags,
        then_zero_range: bool,
        offset: u64,
        len: u64,
        unsupported: Unsupported,
    },
    BlkDiscard {
        offset: u64,
        len: u64,
    },
    BlkZeroOut {
        offset: u64,
        len: u64,
    },
    /// Write zeros over `[offset + done, offset + len)`, in chunks.
    ZeroFill {
        offset: u64,
        len: u64,
        done: u64,
    },
    Sync,
}

impl Plan {
    pub(crate) fn new(op: Op, geometry: Geometry) -> Plan {
        let mut delta = EngineStats::default();
        let (name, state) = match op {
            Op::Read { offset, len } => {
                delta.reads = 1;
                delta.read_bytes = len as u64;
                (
                    "read",
                    State::Read {
                        offset,
                        // SAFETY: the buffer is only written (through its
                        // pointer, by reads) until `done == len`; `output`,
                        // the one place it is read or handed on, runs only
                        // once every byte has been read into it (a short or
                        // failed read finishes the plan with an error and
                        // drops it).
                        buf: Some(unsafe { AlignedBuf::uninit(len) }),
                        done: 0,
                    },
                )
            }
            Op::Write { offset, data, fua } => {
                delta.writes = 1;
                delta.written_bytes = data.len() as u64;
                let dsync = fua && geometry.fua == FuaMode::Dsync;
                delta.dsync_writes = u64::from(dsync);
                (
                    "write",
                    State::Write {
                        offset,
                        data,
                        done: 0,
                        dsync,
                        sync_after: fua && geometry.fua == FuaMode::WriteThenSync,
                    },
                )
            }
            Op::Flush => ("flush", State::Phases(VecDeque::from([Phase::Sync]))),
            Op::Discard { offset, len } => {
                delta.discards = 1;
                (
                    "discard",
                    State::Phases(discard_phases(geometry, offset, len)),
                )
            }
            Op::WriteZeroes {
                offset,
                len,
                may_unmap,
                fast_only,
                fua,
            } => {
                delta.zeroes = 1;
                if geometry.kind == BackingKind::BlockDevice && fast_only && !may_unmap {
                    // BLKZEROOUT may write zeros, and nothing else can zero
                    // a device quickly without unmapping.
                    return Plan {
                        name: "write zeroes",
                        state: State::Refused,
                        delta: EngineStats::default(),
                    };
                }
                let mut phases = zeroes_phases(geometry, offset, len, may_unmap, fast_only);
                if fua {
                    phases.push_back(Phase::Sync);
                }
                ("write zeroes", State::Phases(phases))
            }
        };
        Plan { name, state, delta }
    }

    /// Feed the previous primitive's result (None on the first call) and get
    /// what to do next. After `Finished`, the plan must not be stepped again.
    pub(crate) fn step(&mut self, last: Option<PrimResult>, counters: &Counters) -> Step {
        if let Some(result) = last
            && let Err(e) = self.absorb(result)
        {
            return Step::Finished(Err(e));
        }
        match self.next_prim() {
            Ok(Some(prim)) => Step::Issue(prim),
            Ok(None) => {
                counters.add(&self.delta);
                Step::Finished(Ok(self.output()))
            }
            Err(e) => Step::Finished(Err(e)),
        }
    }

    fn os_error(&self, offset: u64, errno: Errno) -> StorageError {
        StorageError::Os {
            op: self.name,
            offset,
            errno: errno.raw_os_error(),
        }
    }

    /// Account for a primitive's result.
    fn absorb(&mut self, result: PrimResult) -> Result<(), StorageError> {
        if matches!(result, Err(Errno::INTR) | Err(Errno::AGAIN)) {
            return Ok(()); // the same primitive is issued again
        }
        let name = self.name;
        match &mut self.state {
            State::Read { offset, buf, done } => {
                let wanted = buf.as_ref().map_or(0, AlignedBuf::len);
                advance_transfer(name, *offset, done, wanted, result).map_err(|e| self.resolve(e))
            }
            State::Write {
                offset,
                data,
                done,
                sync_after,
                ..
            } => {
                if *done < data.len() {
                    return advance_transfer(name, *offset, done, data.len(), result)
                        .map_err(|e| self.resolve(e));
                }
                // Every byte was written: this was the FUA fdatasync.
                match result {
                    Ok(_) => {
                        *sync_after = false;
                        self.delta.fdatasyncs += 1;
                        Ok(())
                    }
                    Err(errno) => Err(StorageError::Os {
                        op: name,
                        offset: *offset,
                        errno: errno.raw_os_error(),
                    }),
                }
            }
            State::Phases(phases) => {
                let Some(front) = phases.pop_front() else {
                    return Ok(());
                };
                if let Some(unfinished) = self.absorb_phase(front, result)? {
                    self.phases_mut().push_front(unfinished);
                }
                Ok(())
            }
            State::Refused => Ok(()),
        }
    }

    /// Account `result` to the current phase; return it if it is not done.
    fn absorb_phase(
        &mut self,
        phase: Phase,
        result: PrimResult,
    ) -> Result<Option<Phase>, StorageError> {
        match (phase, result) {
            (Phase::ZeroFill { offset, len, done }, result) => {
                let mut moved = done as usize;
                advance_transfer(self.name, offset, &mut moved, len as usize, result)
                    .map_err(|e| self.resolve(e))?;
                let done = moved as u64;
                Ok((done < len).then_some(Phase::ZeroFill { offset, len, done }))
            }
            (Phase::Sync, Ok(_)) => {
                self.delta.fdatasyncs += 1;
                Ok(None)
            }
            (_, Ok(_)) => Ok(None),
            // Discard is advisory: a device without it is fine.
            (Phase::BlkDiscard { .. }, Err(Errno::OPNOTSUPP)) => Ok(None),
            (
                Phase::Fallocate {
                    mode,
                    then_zero_range: true,
                    offset,
                    len,
                    unsupported,
                },
                Err(Errno::OPNOTSUPP),
            ) if mode == PUNCH_HOLE => Ok(Some(Phase::Fallocate {
                mode: ZERO_RANGE,
                then_zero_range: false,
                offset,
                len,
                unsupported,
            })),
            (
                Phase::Fallocate {
                    offset,
                    len,
                    unsupported,
                    ..
                },
                Err(Errno::OPNOTSUPP),
            ) => match unsupported {
                Unsupported::Ignore => Ok(None),
                Unsupported::Fail => Err(StorageError::NotSupported),
                Unsupported::ZeroFill => Ok(Some(Phase::ZeroFill {
                    offset,
                    len,
                    done: 0,
                })),
            },
            (phase, Err(errno)) => Err(self.os_error(phase.offset(), errno)),
        }
    }

    /// Fill in the op name of a transfer error.
    fn resolve(&self, e: TransferError) -> StorageError {
        match e {
            TransferError::Os { offset, errno } => self.os_error(offset, errno),
            TransferError::Short(e) => e,
        }
    }

    fn phases_mut(&mut self) -> &mut VecDeque<Phase> {
        match &mut self.state {
            State::Phases(phases) => phases,
            _ => unreachable!("only phased plans have phases"),
        }
    }

    /// The next primitive, or None when the op is complete.
    fn next_prim(&mut self) -> Result<Option<Prim>, StorageError> {
        Ok(match &mut self.state {
            State::Read { offset, buf, done } => {
                let buf = buf
                    .as_mut()
                    .expect("read buffer is present until the read finishes");
                (*done < buf.len()).then(|| Prim::Read {
                    offset: *offset + *done as u64,
                    // In bounds: done < len. No slice: the bytes past
                    // `done` are not initialised yet.
                    buf: buf.as_mut_ptr().wrapping_add(*done),
                    len: (buf.len() - *done).min(MAX_TRANSFER),
                })
            }
            State::Write {
                offset,
                data,
                done,
                dsync,
                sync_after,
            } => {
                if *done < data.len() {
                    Some(Prim::Write {
                        offset: *offset + *done as u64,
                        buf: data[*done..].as_ptr(),
                        len: (data.len() - *done).min(MAX_TRANSFER),
                        dsync: *dsync,
                    })
                } else {
                    sync_after.then_some(Prim::Fdatasync)
                }
            }
            State::Phases(phases) => match phases.front() {
                None => None,
                Some(Phase::Fallocate {
                    mode, offset, len, ..
                }) => Some(Prim::Fallocate {
                    mode: *mode,
                    offset: *offset,
                    len: *len,
                }),
                Some(Phase::BlkDiscard { offset, len }) => Some(Prim::BlkDiscard {
                    offset: *offset,
                    len: *len,
                }),
                Some(Phase::BlkZeroOut { offset, len }) => Some(Prim::BlkZeroOut {
                    offset: *offset,
                    len: *len,
                }),
                Some(Phase::ZeroFill { offset, len, done }) => {
                    let zeros = zero_chunk();
                    let n = (*len - *done).min(zeros.len() as u64) as usize;
                    Some(Prim::Write {
                        offset: *offset + *done,
                        buf: zeros.as_ptr(),
                        len: n,
                        dsync: false,
                    })
                }
                Some(Phase::Sync) => Some(Prim::Fdatasync),
            },
            State::Refused => return Err(StorageError::NotSupported),
        })
    }

    fn output(&mut self) -> Done {
        match &mut self.state {
            State::Read { buf, .. } => {
                Done::Read(buf.take().map(AlignedBuf::into_bytes).unwrap_or_default())
            }
            _ => Done::Ok,
        }
    }
}

impl Phase {
    fn offset(&self) -> u64 {
        match self {
            Phase::Fallocate { offset, .. }
            | Phase::BlkDiscard { offset, .. }
            | Phase::BlkZeroOut { offset, .. } => *offset,
            Phase::ZeroFill { offset, done, .. } => offset + done,
            Phase::Sync => 0,
        }
    }
}

enum TransferError {
    Os { offset: u64, errno: Errno },
    Short(StorageError),
}

/// Account `result` to a transfer of `wanted` bytes at `offset` of which
/// `done` are already moved. A zero-byte result before the end is a short
/// transfer (end of file or device): retrying would not move more.
fn advance_transfer(
    name: &'static str,
    offset: u64,
    done: &mut usize,
    wanted: usize,
    result: PrimResult,
) -> Result<(), TransferError> {
    match result {
        Ok(0) if *done < wanted => Err(TransferError::Short(StorageError::Short {
            op: name,
            offset,
            done: *done,
            wanted,
        })),
        Ok(n) => {
            *done += n;
            Ok(())
        }
        Err(errno) => Err(TransferError::Os {
            offset: offset + *done as u64,
            errno,
        }),
    }
}

fn discard_phases(geometry: Geometry, offset: u64, len: u64) -> VecDeque<Phase> {
    let mut phases = VecDeque::new();
    match geometry.kind {
        BackingKind::File if len > 0 => phases.push_back(Phase::Fallocate {
            mode: PUNCH_HOLE,
            then_zero_range: false,
            offset,
            len,
            unsupported: Unsupported::Ignore,
        }),
        BackingKind::File => {}
        BackingKind::BlockDevice => {
            // Only whole logical blocks can be discarded; discard is
            // advisory, so the partial edges are simply left alone.
            let (start, end) = interior(offset, len, geometry.logical_block_size);
            if end > start {
                phases.push_back(Phase::BlkDiscard {
                    offset: start,
                    len: end - start,
                });
            }
        }
    }
    phases
}

fn zeroes_phases(
    geometry: Geometry,
    offset: u64,
    len: u64,
    may_unmap: bool,
    fast_only: bool,
) -> VecDeque<Phase> {
    let mut phases = VecDeque::new();
    if len == 0 {
        return phases;
    }
    let unsupported = if fast_only {
        Unsupported::Fail
    } else {
        Unsupported::ZeroFill
    };
    match geometry.kind {
        BackingKind::File => {
            let mode = if may_unmap { PUNCH_HOLE } else { ZERO_RANGE };
            phases.push_back(Phase::Fallocate {
                mode,
                then_zero_range: may_unmap,
                offset,
                len,
                unsupported,
            });
        }
        BackingKind::BlockDevice => {
            let end = offset + len;
            let (start, stop) = interior(offset, len, geometry.logical_block_size);
            // The interior first: with fast_only it is what may be refused,
            // and then nothing has been written.
            if stop > start {
                phases.push_back(if fast_only {
                    // Reached only with may_unmap (see Plan::new): a punch on a
                    // block device unmaps or fails, it never writes zeros.
                    Phase::Fallocate {
                        mode: PUNCH_HOLE,
                        then_zero_range: false,
                        offset: start,
                        len: stop - start,
                        unsupported,
                    }
                } else {
                    Phase::BlkZeroOut {
                        offset: start,
                        len: stop - start,
                    }
                });
            }
            // Partial edges (only when the caller is not block-aligned, i.e.
            // buffered I/O): written as zeros.
            if stop > start {
                if offset < start {
                    phases.push_back(Phase::ZeroFill {
                        offset,
                        len: start - offset,
                        done: 0,
                    });
                }
                if stop < end {
                    phases.push_back(Phase::ZeroFill {
                        offset: stop,
                        len: end - stop,
                        done: 0,
                    });
                }
            } else {
                phases.push_back(Phase::ZeroFill {
                    offset,
                    len,
                    done: 0,
                });
            }
        }
    }
    phases
}

/// The largest `[start, end)` inside `[offset, offset + len)` whose ends are
/// multiples of `unit`; `start >= end` when there is none.
pub(crate) fn interior(offset: u64, len: u64, unit: u64) -> (u64, u64) {
    let start = offset.div_ceil(unit) * unit;
    let end = (offset + len) / unit * unit;
    (start, end.max(start))
}

/// A shared, aligned, all-zero buffer of [`ZERO_CHUNK`] bytes.
pub(crate) fn zero_chunk() -> &'static Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS.get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK).into_bytes())
}

/// Perform `prim` with a blocking syscall on `fd`.
///
/// # Safety
/// The pointers in `prim` must be valid: the plan that produced it is alive
/// and has not been stepped since (see the module docs).
pub(crate) unsafe fn execute_blocking(fd: BorrowedFd<'_>, prim: &Prim) -> PrimResult {
    match *prim {
        Prim::Read { offset, buf, len } => {
            // SAFETY: per this function's contract `buf` points at `len`
            // writable bytes owned by the plan, which nothing else touches
            // until the plan is stepped. They may be uninitialised (see
            // `AlignedBuf::uninit`), hence MaybeUninit.
            let slice = unsafe {
                std::slice::from_raw_parts_mut(buf.cast::<std::mem::MaybeUninit<u8>>(), len)
            };
            rustix::io::pread(fd, slice, offset).map(|(filled, _)| filled.len())
        }
        Prim::Write {
            offset,
            buf,
            len,
            dsync,
        } => {
            // SAFETY: per this function's contract `buf` points at `len`
            // readable bytes kept alive by the plan (or the static zeros).
            let slice = unsafe { std::slice::from_raw_parts(buf, len) };
            let flags = if dsync {
                ReadWriteFlags::DSYNC
            } else {
                ReadWriteFlags::empty()
            };
            rustix::io::pwritev2(fd, &[IoSlice::new(slice)], offset, flags)
        }
        Prim::Fdatasync => rustix::fs::fdatasync(fd).map(|()| 0),
        Prim::Fallocate { mode, offset, len } => {
            rustix::fs::fallocate(fd, mode, offset, len).map(|()| 0)
        }
        Prim::BlkDiscard { offset, len } => blkdev::discard(fd, offset, len).map(|()| 0),
        Prim::BlkZeroOut { offset, len } => blkdev::zero_out(fd, offset, len).map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: Geometry = Geometry {
        kind: BackingKind::File,
        logical_block_size: 1,
        fua: FuaMode::Dsync,
    };
    const DEV: Geometry = Geometry {
        kind: BackingKind::BlockDevice,
        logical_block_size: 512,
        fua: FuaMode::Dsync,
    };
    /// `O_DIRECT` on a file whose device has no native FUA.
    const FILE_NO_FUA: Geometry = Geometry {
        fua: FuaMode::WriteThenSync,
        ..FILE
    };

    /// Drive a plan with scripted results; return the primitives it issued
    /// (as short names) and its outcome.
    fn drive(
        op: Op,
        geometry: Geometry,
        mut results: Vec<PrimResult>,
    ) -> (Vec<String>, Result<Done, StorageError>, EngineStats) {
        let counters = Counters::default();
        let mut plan = Plan::new(op, geometry);
        let mut issued = Vec::new();
        let mut last = None;
        results.reverse();
        loop {
            match plan.step(last, &counters) {
                Step::Issue(prim) => {
                    issued.push(match prim {
                        Prim::Read { offset, len, .. } => format!("read {offset}+{len}"),
                        Prim::Write {
                            offset, len, dsync, ..
                        } => format!("write {offset}+{len} dsync={dsync}"),
                        Prim::Fdatasync => "fdatasync".into(),
                        Prim::Fallocate { mode, offset, len } => {
                            let m = if mode == PUNCH_HOLE {
                                "punch"
                            } else {
                                "zero_range"
                            };
                            format!("fallocate {m} {offset}+{len}")
                        }
                        Prim::BlkDiscard { offset, len } => format!("blkdiscard {offset}+{len}"),
                        Prim::BlkZeroOut { offset, len } => format!("blkzeroout {offset}+{len}"),
                    });
                    last = Some(
                        results
                            .pop()
                            .expect("a scripted result for every primitive"),
                    );
                }
                Step::Finished(result) => {
                    assert!(results.is_empty(), "unused scripted results");
                    return (issued, result, counters.snapshot());
                }
            }
        }
    }

    #[test]
    fn short_and_interrupted_reads_are_resumed() {
        let op = Op::Read {
            offset: 4096,
            len: 8192,
        };
        let (issued, result, stats) = drive(op, FILE, vec![Ok(4096), Err(Errno::INTR), Ok(4096)]);
        assert_eq!(
            issued,
            ["read 4096+8192", "read 8192+4096", "read 8192+4096"]
        );
        assert!(matches!(result, Ok(Done::Read(b)) if b.len() == 8192));
        assert_eq!((stats.reads, stats.read_bytes), (1, 8192));
    }

    #[test]
    fn end_of_file_is_a_short_transfer_and_counts_nothing() {
        let (_, result, stats) = drive(
            Op::Read {
                offset: 0,
                len: 100,
            },
            FILE,
            vec![Ok(40), Ok(0)],
        );
        assert_eq!(
            result.unwrap_err(),
            StorageError::Short {
                op: "read",
                offset: 0,
                done: 40,
                wanted: 100
            }
        );
        assert_eq!(stats, EngineStats::default());
    }

    #[test]
    fn fua_write_uses_dsync_on_every_piece_and_never_syncs() {
        let data = Bytes::from(vec![1u8; 1000]);
        let op = Op::Write {
            offset: 0,
            data: data.clone(),
            fua: true,
        };
        let (issued, result, stats) = drive(op, FILE, vec![Ok(600), Ok(400)]);
        assert_eq!(
            issued,
            ["write 0+1000 dsync=true", "write 600+400 dsync=true"]
        );
        assert!(result.is_ok());
        assert_eq!(
            (stats.writes, stats.dsync_writes, stats.fdatasyncs),
            (1, 1, 0)
        );
        let (issued, _, stats) = drive(
            Op::Write {
                offset: 0,
                data,
                fua: false,
            },
            FILE,
            vec![Ok(1000)],
        );
        assert_eq!(issued, ["write 0+1000 dsync=false"]);
        assert_eq!((stats.dsync_writes, stats.fdatasyncs), (0, 0));
    }

    #[test]
    fn fua_write_without_native_fua_writes_then_syncs_once() {
        let data = Bytes::from(vec![1u8; 1000]);
        let fua = |data: &Bytes| Op::Write {
            offset: 0,
            data: data.clone(),
            fua: true,
        };
        // A short write is resumed; the one fdatasync comes after the last byte.
        let (issued, result, stats) = drive(
            fua(&data),
            FILE_NO_FUA,
            vec![Ok(600), Err(Errno::INTR), Ok(400), Err(Errno::INTR), Ok(0)],
        );
        assert_eq!(
            issued,
            [
                "write 0+1000 dsync=false",
                "write 600+400 dsync=false",
                "write 600+400 dsync=false",
                "fdatasync",
                "fdatasync"
            ]
        );
        assert!(result.is_ok());
        assert_eq!(
            (stats.writes, stats.dsync_writes, stats.fdatasyncs),
            (1, 0, 1)
        );
        // A failed write is not followed by a sync; a failed sync fails the op
        // and counts nothing.
        let (issued, result, stats) = drive(fua(&data), FILE_NO_FUA, vec![Err(Errno::IO)]);
        assert_eq!(issued, ["write 0+1000 dsync=false"]);
        assert!(result.is_err());
        assert_eq!(stats, EngineStats::default());
        let (issued, result, stats) =
            drive(fua(&data), FILE_NO_FUA, vec![Ok(1000), Err(Errno::IO)]);
        assert_eq!(issued, ["write 0+1000 dsync=false", "fdatasync"]);
        assert!(result.is_err());
        assert_eq!(stats, EngineStats::default());
        // Plain writes never sync in this mode either.
        let plain = Op::Write {
            offset: 0,
            data,
            fua: false,
        };
        let (issued, _, stats) = drive(plain, FILE_NO_FUA, vec![Ok(1000)]);
        assert_eq!(issued, ["write 0+1000 dsync=false"]);
        assert_eq!((stats.dsync_writes, stats.fdatasyncs), (0, 0));
    }

    #[test]
    fn write_errors_name_the_failing_offset() {
        let op = Op::Write {
            offset: 512,
            data: Bytes::from(vec![0u8; 1024]),
            fua: false,
        };
        let (_, result, _) = drive(op, FILE, vec![Ok(512), Err(Errno::NOSPC)]);
        assert_eq!(
            result.unwrap_err(),
            StorageError::Os {
                op: "write",
                offset: 1024,
                errno: libc::ENOSPC
            }
        );
    }

    #[test]
    fn file_zeroes_fall_back_from_punch_to_zero_range_to_writing_zeros() {
        let op = Op::WriteZeroes {
            offset: 0,
            len: 3 << 20,
            may_unmap: true,
            fast_only: false,
            fua: true,
        };
        let unsupported = Err(Errno::OPNOTSUPP);
        let results = vec![
            unsupported,
            unsupported,
            Ok(1 << 20),
            Ok(1 << 20),
            Ok(1 << 20),
            Ok(0),
        ];
        let (issued, result, stats) = drive(op, FILE, results);
        assert_eq!(
            issued,
            [
                "fallocate punch 0+3145728",
                "fallocate zero_range 0+3145728",
                "write 0+1048576 dsync=false",
                "write 1048576+1048576 dsync=false",
                "write 2097152+1048576 dsync=false",
                "fdatasync",
            ]
        );
        assert!(result.is_ok());
        assert_eq!((stats.zeroes, stats.fdatasyncs, stats.writes), (1, 1, 0));
    }

    #[test]
    fn fast_only_zeroes_refuse_to_write_zeros() {
        let op = Op::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: false,
            fast_only: true,
            fua: true,
        };
        let (issued, result, stats) = drive(op, FILE, vec![Err(Errno::OPNOTSUPP)]);
        assert_eq!(issued, ["fallocate zero_range 0+4096"]);
        assert_eq!(result.unwrap_err(), StorageError::NotSupported);
        assert_eq!(stats, EngineStats::default());

        let op = Op::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: false,
            fast_only: true,
            fua: false,
        };
        let (issued, result, _) = drive(op, DEV, vec![]);
        assert!(issued.is_empty());
        assert_eq!(result.unwrap_err(), StorageError::NotSupported);

        let op = Op::WriteZeroes {
            offset: 0,
            len: 4096,
            may_unmap: true,
            fast_only: true,
            fua: false,
        };
        let (issued, result, _) = drive(op, DEV, vec![Err(Errno::OPNOTSUPP)]);
        assert_eq!(issued, ["fallocate punch 0+4096"]);
        assert_eq!(result.unwrap_err(), StorageError::NotSupported);
    }

    #[test]
    fn device_zeroes_and_discards_use_whole_blocks() {
        let op = Op::WriteZeroes {
            offset: 100,
            len: 2000,
            may_unmap: false,
            fast_only: false,
            fua: false,
        };
        let (issued, result, _) = drive(op, DEV, vec![Ok(0), Ok(412), Ok(52)]);
        assert_eq!(
            issued,
            [
                "blkzeroout 512+1536",
                "write 100+412 dsync=false",
                "write 2048+52 dsync=false"
            ]
        );
        assert!(result.is_ok());

        let (issued, result, stats) = drive(
            Op::Discard {
                offset: 100,
                len: 2000,
            },
            DEV,
            vec![Err(Errno::OPNOTSUPP)],
        );
        assert_eq!(issued, ["blkdiscard 512+1536"]);
        assert!(result.is_ok());
        assert_eq!(stats.discards, 1);

        let (issued, result, _) = drive(
            Op::Discard {
                offset: 100,
                len: 300,
            },
            DEV,
            vec![],
        );
        assert!(issued.is_empty() && result.is_ok());
    }

    #[test]
    fn flush_is_one_fdatasync() {
        let (issued, result, stats) = drive(Op::Flush, FILE, vec![Err(Errno::INTR), Ok(0)]);
        assert_eq!(issued, ["fdatasync", "fdatasync"]);
        assert!(result.is_ok());
        assert_eq!(stats.fdatasyncs, 1);
        let (_, result, stats) = drive(Op::Flush, FILE, vec![Err(Errno::IO)]);
        assert_eq!(
            result.unwrap_err(),
            StorageError::Os {
                op: "flush",
                offset: 0,
                errno: libc::EIO
            }
        );
        assert_eq!(stats.fdatasyncs, 0);
    }

    #[test]
    fn interior_trims_to_whole_units() {
        assert_eq!(interior(100, 2000, 512), (512, 2048));
        assert_eq!(interior(0, 1024, 512), (0, 1024));
        let (s, e) = interior(100, 300, 512);
        assert!(s >= e);
    }
}
