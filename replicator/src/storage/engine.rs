//! The engine trait: asynchronous block I/O with completion callbacks.
//!
//! An engine receives [`Op`]s through [`Engine::submit`] and calls each op's
//! [`Completion`] exactly once, when the op is done: on one of the engine's
//! own threads, or on the submitting thread before `submit` returns (a
//! refused op; and in the io_uring engine a small plain buffered write, or a
//! write or flush submitted with the NBD connection's inline hint while the
//! engine is idle, which `submit` does itself with blocking syscalls:
//! see `uring`). So a caller must not hold, across `submit`, a lock its
//! completion takes. `submit` may be called from inside a completion
//! callback; from there it never blocks on I/O. Engines require ops to be aligned already (see
//! `Storage` for the layer that guarantees it): when the backing store is
//! opened with `O_DIRECT`, every `offset`, length and buffer address is a
//! multiple of [`crate::storage::Backing::dio_align`].

use bytes::Bytes;
use thiserror::Error;

/// One I/O operation. Offsets are absolute byte offsets in the backing store.
#[derive(Debug, Clone)]
pub enum Op {
    /// Read `len` bytes; completes with [`Done::Read`] holding exactly them.
    Read { offset: u64, len: usize },
    /// Write `data`; with `fua` it is durable when the op completes (how:
    /// [`FuaMode`]).
    Write { offset: u64, data: Bytes, fua: bool },
    /// `fdatasync`: every write completed before this op was submitted is
    /// durable when it completes.
    Flush,
    /// TRIM: punch a hole (file) or `BLKDISCARD` (block device). Advisory.
    Discard { offset: u64, len: u64 },
    /// The range reads back as zeros afterwards. `may_unmap` allows a hole
    /// (file) / unmapping (device); `fast_only` fails with
    /// [`StorageError::NotSupported`] rather than writing zeros; `fua` makes
    /// the result durable before completion.
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    },
}

/// What a successful op yields.
#[derive(Debug, Clone)]
pub enum Done {
    Read(Bytes),
    Ok,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorageError {
    /// The operating system reported `errno` for this op.
    #[error("{op} at offset {offset}: {source}", source = std::io::Error::from_raw_os_error(*errno))]
    Os {
        op: &'static str,
        offset: u64,
        errno: i32,
    },
    #[error("{op} at offset {offset}: short transfer ({done} of {wanted} bytes)")]
    Short {
        op: &'static str,
        offset: u64,
        done: usize,
        wanted: usize,
    },
    /// A `fast_only` zeroing that cannot be fast.
    #[error("fast zeroing is not supported by this backing store")]
    NotSupported,
    /// The engine is shutting down.
    #[error("storage engine is shut down")]
    Shutdown,
    /// The request reaches past the end of the backing store (reported by
    /// `Storage`, which checks every range; engines do not).
    #[error(
        "{op} of {len} bytes at offset {offset} reaches past the end of the backing store ({size} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
}

impl StorageError {
    /// The closest `errno`, for mapping onto NBD errors.
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::Os { errno, .. } => *errno,
            StorageError::Short { .. } => libc::EIO,
            StorageError::NotSupported => libc::EOPNOTSUPP,
            StorageError::Shutdown => libc::ESHUTDOWN,
            StorageError::OutOfRange { .. } => libc::EINVAL,
        }
    }
}

/// Called exactly once per op, on an engine thread.
pub type Completion = Box<dyn FnOnce(Result<Done, StorageError>) + Send + 'static>;

/// How a FUA write (`Op::Write` with `fua`) is made durable. Either way it
/// is durable before the op completes (docs/durability.md, invariant 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuaMode {
    /// Every write of the op carries `RWF_DSYNC`. On a device with native
    /// FUA an `O_DIRECT` DSYNC write is a single FUA write.
    Dsync,
    /// Plain writes, then one `fdatasync` once they all completed. Chosen for
    /// `O_DIRECT` on a device without native FUA, where the kernel finishes
    /// a DSYNC direct write on a per-CPU kworker that can wait a whole
    /// scheduler tick (docs/benchmarks.md); nbdkit does the same.
    WriteThenSync,
}

impl FuaMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FuaMode::Dsync => "rwf_dsync",
            FuaMode::WriteThenSync => "write_fdatasync",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Threads,
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Threads => "threads",
        }
    }
}

/// Counters kept by an engine, counted when the op completes successfully.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub written_bytes: u64,
    /// `fdatasync` calls (Flush ops, and syncs done for FUA writes in
    /// [`FuaMode::WriteThenSync`] and FUA zeroes).
    pub fdatasyncs: u64,
    /// FUA writes made durable with `RWF_DSYNC` ([`FuaMode::Dsync`]).
    pub dsync_writes: u64,
    pub discards: u64,
    pub zeroes: u64,
}

pub trait Engine: Send + Sync + 'static {
    /// Queue `op`; `done` runs once it completes, possibly before this
    /// returns (see the module documentation).
    fn submit(&self, op: Op, done: Completion);
    fn stats(&self) -> EngineStats;
    fn kind(&self) -> EngineKind;
    /// Finish every submitted op, then stop the engine's threads. Later
    /// submissions complete with [`StorageError::Shutdown`].
    fn shutdown(&self);
}
