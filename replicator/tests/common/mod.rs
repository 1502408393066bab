//! Shared helpers for the storage integration tests: fixtures (a backing
//! store, an engine and a `Storage` over it), synchronous wrappers around the
//! callback API, and data patterns. Each test binary uses a subset.
#![allow(dead_code)]

pub mod conformance;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use tandem_replicator::storage::{
    Backing, BackingKind, Done, Engine, EngineStats, IoMode, Op, OpenOptions, Storage,
    StorageError, ThreadsEngine, UringEngine,
};

/// How long a test waits for a completion before declaring a hang. Not a
/// synchronisation device: results are waited for on channels.
pub const HANG: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineSel {
    Uring,
    Threads,
}

/// Start an engine of kind `sel`. The ring is small so the SQ backlog is
/// exercised; the pool is small to be gentle on shared test machines.
pub fn start_engine(backing: Arc<Backing>, sel: EngineSel) -> Arc<dyn Engine> {
    match sel {
        EngineSel::Uring => Arc::new(
            UringEngine::new(backing, 8).expect("io_uring is available on the test machine"),
        ),
        EngineSel::Threads => Arc::new(ThreadsEngine::new(backing, 4)),
    }
}

/// A backing store with an engine and a `Storage` on it.
pub struct Fixture {
    pub storage: Storage,
    pub backing: Arc<Backing>,
    /// The file whose allocation shows holes (the loop device's backing file
    /// for a block device).
    pub alloc_file: PathBuf,
}

impl Fixture {
    /// Open `path` in `mode` with engine `sel`. With `expect_direct`, insist
    /// that direct I/O really is in use, so a suite meant to test it cannot
    /// silently test buffered I/O instead.
    pub fn open(
        path: &Path,
        alloc_file: &Path,
        sel: EngineSel,
        mode: IoMode,
        expect_direct: bool,
    ) -> Fixture {
        let backing =
            Arc::new(Backing::open(path, OpenOptions { mode }).expect("open backing store"));
        if mode == IoMode::Direct && expect_direct {
            assert!(
                backing.is_direct(),
                "{} should be opened with O_DIRECT",
                path.display()
            );
            assert!(backing.dio_align() > 1);
        }
        if mode == IoMode::Buffered {
            assert!(!backing.is_direct());
            assert_eq!(backing.dio_align(), 1);
        }
        let engine = start_engine(Arc::clone(&backing), sel);
        let storage = Storage::new(engine, &backing);
        Fixture {
            storage,
            backing,
            alloc_file: alloc_file.to_path_buf(),
        }
    }

    pub fn is_block_device(&self) -> bool {
        self.backing.kind() == BackingKind::BlockDevice
    }

    pub fn allocated_bytes(&self) -> u64 {
        allocated_bytes(&self.alloc_file)
    }

    pub fn stats(&self) -> EngineStats {
        self.storage.stats()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.storage.shutdown();
    }
}

/// Create a zero-filled (sparse) file of `size` bytes.
pub fn make_file(path: &Path, size: u64) -> PathBuf {
    let file = std::fs::File::create(path).expect("create backing file");
    file.set_len(size).expect("size backing file");
    path.to_path_buf()
}

pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Submit `op` and wait for its completion.
pub fn run(storage: &Storage, op: Op) -> Result<Done, StorageError> {
    let (tx, rx) = mpsc::channel();
    storage.submit(
        op,
        Box::new(move |result| tx.send(result).expect("test is waiting")),
    );
    rx.recv_timeout(HANG).expect("op completed")
}

/// Submit `op` to an engine directly and wait for its completion.
pub fn run_engine(engine: &dyn Engine, op: Op) -> Result<Done, StorageError> {
    let (tx, rx) = mpsc::channel();
    engine.submit(
        op,
        Box::new(move |result| tx.send(result).expect("test is waiting")),
    );
    rx.recv_timeout(HANG).expect("op completed")
}

pub fn read(storage: &Storage, offset: u64, len: usize) -> Vec<u8> {
    match run(storage, Op::Read { offset, len }) {
        Ok(Done::Read(bytes)) => {
            assert_eq!(
                bytes.len(),
                len,
                "read {len} at {offset} returned {} bytes",
                bytes.len()
            );
            bytes.to_vec()
        }
        other => panic!("read {len} at {offset}: {other:?}"),
    }
}

pub fn write(storage: &Storage, offset: u64, data: &[u8], fua: bool) {
    let op = Op::Write {
        offset,
        data: Bytes::copy_from_slice(data),
        fua,
    };
    match run(storage, op) {
        Ok(Done::Ok) => {}
        other => panic!("write {} at {offset}: {other:?}", data.len()),
    }
}

/// `data` in a `Bytes` whose first byte sits `misalign` bytes past an
/// aligned address (so misalign > 0 is never 512-aligned).
pub fn bytes_at_misalignment(data: &[u8], misalign: usize) -> Bytes {
    let mut buf = tandem_proto::AlignedBuf::zeroed(data.len() + misalign);
    buf.as_mut_slice()[misalign..].copy_from_slice(data);
    buf.into_bytes().slice(misalign..)
}

/// Deterministic non-zero bytes, different for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as u8) | 1
        })
        .collect()
}

/// Whether the test process may create loop devices and mount namespaces.
/// Privileged tests fail when it may not, unless the environment sets
/// TANDEM_SKIP_PRIVILEGED_TESTS=1 (then they say so and return).
pub fn privileged_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("TANDEM_SKIP_PRIVILEGED_TESTS").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED (not root): {what}");
        return false;
    }
    panic!("{what} needs root; run as root or set TANDEM_SKIP_PRIVILEGED_TESTS=1 to skip it");
}

/// Run `f` with a subscriber that records this thread's WARN and ERROR
/// events; returns `f`'s result and the recorded lines.
pub fn capture_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(sink.0.lock().unwrap().clone()).expect("utf-8 logs");
    (out, text.lines().map(str::to_owned).collect())
}
