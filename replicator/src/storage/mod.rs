//! Storage: the backing file or block device, and the engines that do I/O on it.
//!
//! Layers, top to bottom:
//! - [`Storage`] (in `aligned`): the only entry point for the rest of the
//!   node. Accepts byte-granular requests at any offset, with any buffer
//!   address, and turns them into requests the engine can do with the
//!   backing store's direct-I/O alignment (bounce buffers for unaligned
//!   memory, read-modify-write for unaligned ranges, under per-block locks so
//!   two non-overlapping writes that share a block both survive).
//! - [`Engine`]: one trait, two engines. `uring` (io_uring on its own thread,
//!   eventfd wake-ups) and `threads` (plain pread/pwrite worker threads), the
//!   fallback when io_uring is unavailable.
//! - `backing`: opening the file or device, its size, kind and alignment.
//!
//! Durability contract of every engine (the NBD FLUSH/FUA rules rest on it):
//! - a completed `Write` is in the backing store's (possibly volatile)
//!   cache; `fua: true` makes it durable before completion (`RWF_DSYNC`);
//! - a `Flush` is an `fdatasync` issued after it is submitted, so it makes
//!   durable every write that completed before the `Flush` was submitted;
//! - a plain `Write` never syncs.

mod backing;
mod blkdev;
mod callback;
mod engine;
mod plan;
mod stats;
mod threads;

pub use backing::{Backing, BackingError, BackingKind, IoMode, MAX_DIO_ALIGN, OpenOptions};
pub use engine::{Completion, Done, Engine, EngineKind, EngineStats, Op, StorageError};
pub use threads::{DEFAULT_THREADS, ThreadsEngine};

/// Which engine to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else threads (logged once).
    #[default]
    Auto,
    IoUring,
    Threads,
}
