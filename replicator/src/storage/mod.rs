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
//! Both engines run the same `plan` state machines, which define what every
//! op does as a sequence of syscalls; the engines differ only in how those
//! syscalls are issued. [`start_engine`] picks the engine.
//!
//! Durability contract of every engine (the NBD FLUSH/FUA rules rest on it):
//! - a completed `Write` is in the backing store's (possibly volatile)
//!   cache; `fua: true` makes it durable before completion (`RWF_DSYNC`);
//! - a `Flush` is an `fdatasync` issued after it is submitted, so it makes
//!   durable every write that completed before the `Flush` was submitted;
//! - a plain `Write` never syncs.

mod aligned;
mod backing;
mod blkdev;
mod callback;
mod engine;
mod locks;
mod plan;
mod stats;
mod threads;
mod uring;

use std::sync::Arc;

pub use aligned::Storage;
pub use backing::{
    BUSY_WAIT, Backing, BackingError, BackingKind, IoMode, MAX_DIO_ALIGN, OpenOptions,
};
pub use engine::{Completion, Done, Engine, EngineKind, EngineStats, Op, StorageError};
pub use threads::{DEFAULT_THREADS, ThreadsEngine};
pub use uring::{DEFAULT_URING_ENTRIES, UringEngine};

/// Which engine to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring if the kernel allows it, else threads (logged once).
    #[default]
    Auto,
    IoUring,
    Threads,
}

/// The engine could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartEngineError {
    #[error(
        "the io_uring engine is unavailable: {0} (io_uring may be disabled by the \
         kernel.io_uring_disabled sysctl or a seccomp filter; choose the threads engine)"
    )]
    IoUringUnavailable(#[source] std::io::Error),
}

/// Start the engine `choice` asks for on `backing`, with the default ring
/// size / thread count. `Auto` falls back from io_uring to threads, saying
/// why in one warning; `IoUring` fails when io_uring is unavailable;
/// `Threads` always works.
pub fn start_engine(
    backing: Arc<Backing>,
    choice: EngineChoice,
) -> Result<Arc<dyn Engine>, StartEngineError> {
    start_engine_with(backing, choice, |backing| {
        UringEngine::new(backing, DEFAULT_URING_ENTRIES)
    })
}

/// [`start_engine`] with the io_uring constructor as a parameter, so the
/// fallback can be tested on kernels where io_uring works.
fn start_engine_with(
    backing: Arc<Backing>,
    choice: EngineChoice,
    uring: impl FnOnce(Arc<Backing>) -> std::io::Result<UringEngine>,
) -> Result<Arc<dyn Engine>, StartEngineError> {
    let threads =
        |backing| -> Arc<dyn Engine> { Arc::new(ThreadsEngine::new(backing, DEFAULT_THREADS)) };
    match choice {
        EngineChoice::Threads => Ok(threads(backing)),
        EngineChoice::IoUring => match uring(Arc::clone(&backing)) {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(e) => Err(StartEngineError::IoUringUnavailable(e)),
        },
        EngineChoice::Auto => match uring(Arc::clone(&backing)) {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "io_uring is unavailable, using the threads storage engine instead"
                );
                Ok(threads(backing))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn unavailable(_: Arc<Backing>) -> std::io::Result<UringEngine> {
        Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
    }

    #[test]
    fn auto_falls_back_to_threads_with_one_warning() {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let backing = Arc::new(Backing::open(&path, OpenOptions::default()).unwrap());

        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let engine = tracing::subscriber::with_default(subscriber, || {
            start_engine_with(Arc::clone(&backing), EngineChoice::Auto, unavailable).unwrap()
        });
        assert_eq!(engine.kind(), EngineKind::Threads);
        let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{logs}");
        assert!(
            warnings[0].contains("io_uring") && warnings[0].contains("threads"),
            "{logs}"
        );
        assert!(
            warnings[0].contains(&std::io::Error::from_raw_os_error(libc::ENOSYS).to_string()),
            "says why: {logs}"
        );
        engine.shutdown();

        let err = start_engine_with(Arc::clone(&backing), EngineChoice::IoUring, unavailable)
            .err()
            .unwrap();
        assert!(matches!(err, StartEngineError::IoUringUnavailable(_)));
        assert!(err.to_string().contains("threads engine"), "{err}");

        let engine = start_engine_with(backing, EngineChoice::Threads, unavailable).unwrap();
        assert_eq!(engine.kind(), EngineKind::Threads);
    }
}
