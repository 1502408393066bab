//! The conformance suite on regular files: every check × {io_uring, threads}
//! × {direct, buffered}, on a file under /tmp (ext4 here, so direct I/O is
//! real), plus tmpfs-specific zeroing behaviour.

mod common;

use common::conformance::{self, Check};
use common::{EngineSel, Fixture, make_file, pattern, read, run, write};
use tandem_replicator::storage::{Done, IoMode, Op, StorageError};

const SIZE: u64 = 8 << 20;

/// Run `check` on a fresh file under /tmp.
fn on_file(check: Check, sel: EngineSel, mode: IoMode) {
    let dir = tempfile::tempdir_in("/tmp").expect("temp dir");
    let path = make_file(&dir.path().join("disk.img"), SIZE);
    let fx = Fixture::open(&path, &path, sel, mode, true);
    check(&fx);
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        $(
            mod $check {
                use super::*;
                #[test]
                fn uring_direct() { on_file(conformance::$check, EngineSel::Uring, IoMode::Direct) }
                #[test]
                fn uring_buffered() { on_file(conformance::$check, EngineSel::Uring, IoMode::Buffered) }
                #[test]
                fn threads_direct() { on_file(conformance::$check, EngineSel::Threads, IoMode::Direct) }
                #[test]
                fn threads_buffered() { on_file(conformance::$check, EngineSel::Threads, IoMode::Buffered) }
            }
        )*
        /// Every check in the suite has a test here.
        #[test]
        fn every_check_is_run() {
            let here = [$(stringify!($check)),*];
            for (name, _) in conformance::CHECKS {
                assert!(here.contains(name), "conformance check {name} is not run on files");
            }
        }
    };
}

conformance!(
    round_trips,
    fua_write_is_dsync_and_plain_write_never_syncs,
    flush_is_one_fdatasync,
    discard_punches_a_hole,
    zeroes_with_and_without_unmap,
    fast_zeroes,
    out_of_range_is_refused,
    empty_ranges_complete,
    shutdown_drains_then_refuses,
);

/// tmpfs has no ZERO_RANGE: fast_only zeroing is refused (and writes
/// nothing), plain zeroing writes zeros, and a punch (may_unmap) is fast.
fn tmpfs_zeroing(sel: EngineSel, mode: IoMode) {
    let dir = tempfile::tempdir_in("/dev/shm").expect("temp dir on tmpfs");
    let path = make_file(&dir.path().join("disk.img"), SIZE);
    // tmpfs direct I/O is a kernel-version matter (see storage_backing.rs).
    let fx = Fixture::open(&path, &path, sel, mode, false);
    let (offset, len) = (4096u64, 3u64 << 20);
    let data = pattern(11, len as usize);
    let zeroes = |may_unmap, fast_only| Op::WriteZeroes {
        offset,
        len,
        may_unmap,
        fast_only,
        fua: true,
    };

    write(&fx.storage, offset, &data, false);
    let before = fx.stats();
    assert_eq!(
        run(&fx.storage, zeroes(false, true)).unwrap_err(),
        StorageError::NotSupported
    );
    assert_eq!(
        read(&fx.storage, offset, len as usize),
        data,
        "a refused fast zeroing writes nothing"
    );
    let after = fx.stats();
    assert_eq!(
        (after.zeroes, after.fdatasyncs),
        (before.zeroes, before.fdatasyncs),
        "a failed op counts nothing"
    );

    let before = fx.stats();
    assert!(matches!(
        run(&fx.storage, zeroes(false, false)),
        Ok(Done::Ok)
    ));
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0),
        "zeros were written"
    );
    let after = fx.stats();
    assert_eq!(after.zeroes, before.zeroes + 1);
    assert_eq!(
        after.fdatasyncs,
        before.fdatasyncs + 1,
        "FUA zeroing ends with an fdatasync"
    );
    assert_eq!(
        after.writes, before.writes,
        "zero-filling is part of the zeroes op, not a client write"
    );

    write(&fx.storage, offset, &data, false);
    assert!(
        matches!(run(&fx.storage, zeroes(true, true)), Ok(Done::Ok)),
        "tmpfs can punch holes"
    );
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn tmpfs_zeroing_uring_direct() {
    tmpfs_zeroing(EngineSel::Uring, IoMode::Direct)
}
#[test]
fn tmpfs_zeroing_uring_buffered() {
    tmpfs_zeroing(EngineSel::Uring, IoMode::Buffered)
}
#[test]
fn tmpfs_zeroing_threads_direct() {
    tmpfs_zeroing(EngineSel::Threads, IoMode::Direct)
}
#[test]
fn tmpfs_zeroing_threads_buffered() {
    tmpfs_zeroing(EngineSel::Threads, IoMode::Buffered)
}
