//! The storage conformance suite: what every (engine, I/O mode, backing
//! kind) combination must do. Each check gets a fresh `Fixture` over a
//! zero-filled backing store of at least 8 MiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use bytes::Bytes;
use tandem_replicator::storage::{Done, Op, StorageError};

use super::{Fixture, HANG, bytes_at_misalignment, pattern, read, run, write};

const MIB: u64 = 1 << 20;

pub type Check = fn(&Fixture);

/// Every check, by name.
pub const CHECKS: &[(&str, Check)] = &[
    ("round_trips", round_trips),
    (
        "fua_write_is_dsync_and_plain_write_never_syncs",
        fua_write_is_dsync_and_plain_write_never_syncs,
    ),
    ("flush_is_one_fdatasync", flush_is_one_fdatasync),
    ("discard_punches_a_hole", discard_punches_a_hole),
    (
        "zeroes_with_and_without_unmap",
        zeroes_with_and_without_unmap,
    ),
    ("fast_zeroes", fast_zeroes),
    ("out_of_range_is_refused", out_of_range_is_refused),
    ("empty_ranges_complete", empty_ranges_complete),
    ("shutdown_drains_then_refuses", shutdown_drains_then_refuses),
];

/// Writes at aligned and unaligned offsets, lengths and addresses read back
/// exactly, through aligned and unaligned reads.
pub fn round_trips(fx: &Fixture) {
    let size = fx.storage.size();
    let mut model = vec![0u8; size as usize];
    let writes: &[(u64, usize, usize)] = &[
        (0, 4096, 0),
        (3 * 4096, 8192, 1),
        (100, 1, 0),
        (511, 2, 0),
        (1000, 5000, 3),
        (5 * 4096, 512, 7),
        (MIB + 13, 2 * MIB as usize + 100, 0),
        (size - 7, 7, 5),
    ];
    for (i, &(offset, len, misalign)) in writes.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        let op = Op::Write {
            offset,
            data: bytes_at_misalignment(&data, misalign),
            fua: false,
        };
        assert!(
            matches!(run(&fx.storage, op), Ok(Done::Ok)),
            "write {len} at {offset}"
        );
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    let reads: &[(u64, usize)] = &[
        (0, 4096),
        (1, 1),
        (510, 3),
        (4095, 4098),
        (999, 5002),
        (MIB, 3 * MIB as usize),
        (size - 1, 1),
        (0, size as usize),
    ];
    for &(offset, len) in reads {
        let got = read(&fx.storage, offset, len);
        assert!(
            got == model[offset as usize..offset as usize + len],
            "read {len} at {offset} differs"
        );
    }
}

pub fn fua_write_is_dsync_and_plain_write_never_syncs(fx: &Fixture) {
    for (offset, len) in [(0u64, 4096usize), (100, 10)] {
        let before = fx.stats();
        write(&fx.storage, offset, &pattern(1, len), false);
        let after = fx.stats();
        assert_eq!(after.writes, before.writes + 1, "plain write at {offset}");
        assert_eq!(
            after.dsync_writes, before.dsync_writes,
            "a plain write must not be DSYNC"
        );
        assert_eq!(
            after.fdatasyncs, before.fdatasyncs,
            "a plain write must not sync"
        );

        let before = fx.stats();
        write(&fx.storage, offset, &pattern(2, len), true);
        let after = fx.stats();
        assert_eq!(after.writes, before.writes + 1, "FUA write at {offset}");
        assert_eq!(
            after.dsync_writes,
            before.dsync_writes + 1,
            "a FUA write is one DSYNC write"
        );
        assert_eq!(
            after.fdatasyncs, before.fdatasyncs,
            "a FUA write needs no fdatasync"
        );
        assert_eq!(read(&fx.storage, offset, len), pattern(2, len));
    }
}

pub fn flush_is_one_fdatasync(fx: &Fixture) {
    write(&fx.storage, 0, &pattern(3, 4096), false);
    let before = fx.stats();
    assert!(matches!(run(&fx.storage, Op::Flush), Ok(Done::Ok)));
    let after = fx.stats();
    assert_eq!(after.fdatasyncs, before.fdatasyncs + 1);
    assert_eq!(
        (after.writes, after.dsync_writes),
        (before.writes, before.dsync_writes)
    );
}

pub fn discard_punches_a_hole(fx: &Fixture) {
    let (offset, len) = (MIB, 2 * MIB);
    let data = pattern(4, (len + 2 * 4096) as usize);
    write(&fx.storage, offset - 4096, &data, false);
    run(&fx.storage, Op::Flush).expect("flush");
    let allocated = fx.allocated_bytes();

    let before = fx.stats();
    assert!(matches!(
        run(&fx.storage, Op::Discard { offset, len }),
        Ok(Done::Ok)
    ));
    assert_eq!(fx.stats().discards, before.discards + 1);
    let now = fx.allocated_bytes();
    assert!(
        now + MIB <= allocated,
        "discard should free space: {allocated} -> {now} bytes allocated"
    );
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0),
        "a punched hole reads zeros"
    );
    assert_eq!(
        read(&fx.storage, offset - 4096, 4096),
        data[..4096],
        "bytes before the range are kept"
    );
    assert_eq!(
        read(&fx.storage, offset + len, 4096),
        data[data.len() - 4096..],
        "bytes after the range are kept"
    );

    // Unaligned: advisory, so inside the range a byte is old or zero; outside
    // it is untouched.
    let base = 4 * MIB;
    let data = pattern(5, 20_000);
    write(&fx.storage, base, &data, false);
    let (offset, len) = (base + 100, 9000u64);
    assert!(matches!(
        run(&fx.storage, Op::Discard { offset, len }),
        Ok(Done::Ok)
    ));
    let got = read(&fx.storage, base, data.len());
    for (i, (&g, &d)) in got.iter().zip(&data).enumerate() {
        let inside = (100..9100).contains(&i);
        assert!(
            g == d || (inside && g == 0),
            "byte {i} after unaligned discard: {g:#x}, wrote {d:#x}"
        );
    }
}

pub fn zeroes_with_and_without_unmap(fx: &Fixture) {
    let (offset, len) = (MIB, 2 * MIB);
    let zeroes = |may_unmap, fua| Op::WriteZeroes {
        offset,
        len,
        may_unmap,
        fast_only: false,
        fua,
    };

    write(&fx.storage, offset, &pattern(6, len as usize), false);
    run(&fx.storage, Op::Flush).expect("flush");
    let allocated = fx.allocated_bytes();
    let before = fx.stats();
    assert!(matches!(
        run(&fx.storage, zeroes(false, false)),
        Ok(Done::Ok)
    ));
    let after = fx.stats();
    assert_eq!(after.zeroes, before.zeroes + 1);
    assert_eq!(
        after.fdatasyncs, before.fdatasyncs,
        "zeroes without FUA do not sync"
    );
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0)
    );
    assert!(
        fx.allocated_bytes() + 64 * 1024 >= allocated,
        "zeroing without unmap keeps the space allocated"
    );

    write(&fx.storage, offset, &pattern(7, len as usize), false);
    run(&fx.storage, Op::Flush).expect("flush");
    let allocated = fx.allocated_bytes();
    let before = fx.stats();
    assert!(matches!(run(&fx.storage, zeroes(true, true)), Ok(Done::Ok)));
    let after = fx.stats();
    assert_eq!(
        after.fdatasyncs,
        before.fdatasyncs + 1,
        "FUA zeroes end with one fdatasync"
    );
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0)
    );
    if !fx.is_block_device() {
        // A file punches a hole; BLKZEROOUT does not promise to unmap.
        let now = fx.allocated_bytes();
        assert!(
            now + MIB <= allocated,
            "may_unmap zeroing of a file frees space: {allocated} -> {now}"
        );
    }

    // Unaligned, and inside a single block: exactly the range turns to zeros.
    let base = 4 * MIB;
    let data = pattern(8, 20_000);
    for (start, n) in [(100u64, 9000u64), (20, 10), (511, 2)] {
        write(&fx.storage, base, &data, false);
        let op = Op::WriteZeroes {
            offset: base + start,
            len: n,
            may_unmap: true,
            fast_only: false,
            fua: false,
        };
        assert!(
            matches!(run(&fx.storage, op), Ok(Done::Ok)),
            "zeroes {n} at +{start}"
        );
        let got = read(&fx.storage, base, data.len());
        for (i, (&g, &d)) in got.iter().zip(&data).enumerate() {
            let inside = (start as usize..(start + n) as usize).contains(&i);
            assert_eq!(
                g,
                if inside { 0 } else { d },
                "byte {i} after zeroing {n} at +{start}"
            );
        }
    }
}

/// `fast_only` zeroing: a file on ext4 (ZERO_RANGE) and a punch on a block
/// device are fast; a block device without may_unmap cannot be, and is left
/// untouched.
pub fn fast_zeroes(fx: &Fixture) {
    let (offset, len) = (MIB, MIB);
    let data = pattern(9, len as usize);
    let fast = |may_unmap| Op::WriteZeroes {
        offset,
        len,
        may_unmap,
        fast_only: true,
        fua: false,
    };

    write(&fx.storage, offset, &data, false);
    let result = run(&fx.storage, fast(false));
    if fx.is_block_device() {
        assert_eq!(result.unwrap_err(), StorageError::NotSupported);
        assert_eq!(
            read(&fx.storage, offset, len as usize),
            data,
            "a refused fast zeroing writes nothing"
        );
    } else {
        assert!(matches!(result, Ok(Done::Ok)), "{result:?}");
        assert!(
            read(&fx.storage, offset, len as usize)
                .iter()
                .all(|&b| b == 0)
        );
    }

    write(&fx.storage, offset, &data, false);
    let result = run(&fx.storage, fast(true));
    assert!(matches!(result, Ok(Done::Ok)), "{result:?}");
    assert!(
        read(&fx.storage, offset, len as usize)
            .iter()
            .all(|&b| b == 0)
    );
}

pub fn out_of_range_is_refused(fx: &Fixture) {
    let size = fx.storage.size();
    let ops = [
        Op::Read {
            offset: size - 10,
            len: 11,
        },
        Op::Write {
            offset: size,
            data: Bytes::from_static(b"x"),
            fua: false,
        },
        Op::Discard {
            offset: u64::MAX,
            len: 2,
        },
        Op::WriteZeroes {
            offset: size - 512,
            len: 1024,
            may_unmap: false,
            fast_only: false,
            fua: false,
        },
    ];
    for op in ops {
        let result = run(&fx.storage, op.clone());
        assert!(
            matches!(result, Err(StorageError::OutOfRange { .. })),
            "{op:?}: {result:?}"
        );
        assert_eq!(result.unwrap_err().errno(), libc::EINVAL);
    }
    assert_eq!(read(&fx.storage, size - 10, 10).len(), 10);
}

/// `shutdown` returns only after every submitted op (read-modify-writes
/// included) has completed; later ops are refused.
pub fn shutdown_drains_then_refuses(fx: &Fixture) {
    const N: usize = 300;
    let completed = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    for i in 0..N {
        // Unaligned offsets turn into RMWs whose writes are submitted from
        // completions while the engine drains.
        let offset = (i as u64) * 4099;
        let op = if i % 50 == 49 {
            Op::Flush
        } else {
            Op::Write {
                offset,
                data: Bytes::from(pattern(i as u64, 700)),
                fua: false,
            }
        };
        let (completed, tx) = (Arc::clone(&completed), tx.clone());
        fx.storage.submit(
            op,
            Box::new(move |result| {
                completed.fetch_add(1, Ordering::SeqCst);
                tx.send(result).expect("test is waiting");
            }),
        );
    }
    fx.storage.shutdown();
    assert_eq!(
        completed.load(Ordering::SeqCst),
        N,
        "shutdown returned before every op completed"
    );
    for _ in 0..N {
        assert!(rx.try_recv().expect("a result per op").is_ok());
    }

    let (tx, rx) = mpsc::channel();
    fx.storage.submit(
        Op::Read {
            offset: 0,
            len: 512,
        },
        Box::new(move |r| tx.send(r).expect("test is waiting")),
    );
    let refused = rx.recv_timeout(HANG).expect("a refused op still completes");
    assert_eq!(refused.unwrap_err(), StorageError::Shutdown);

    // What was written is there (read through the page cache, another fd).
    let mut on_disk = vec![0u8; N * 4099];
    std::fs::File::open(fx.backing.path())
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut on_disk))
        .expect("read the backing store");
    for i in (0..N).filter(|i| i % 50 != 49) {
        let offset = i * 4099;
        assert_eq!(
            on_disk[offset..offset + 700],
            pattern(i as u64, 700)[..],
            "write {i} after shutdown"
        );
    }
}

/// Requests for nothing (length 0), at aligned and unaligned offsets and at
/// the very end, complete at once with success and touch nothing.
pub fn empty_ranges_complete(fx: &Fixture) {
    let size = fx.storage.size();
    let data = pattern(42, 8192);
    write(&fx.storage, 0, &data, false);
    for offset in [0, 4095, 4096, size - 1, size] {
        match run(&fx.storage, Op::Read { offset, len: 0 }) {
            Ok(Done::Read(b)) => assert!(b.is_empty(), "read of nothing at {offset}"),
            other => panic!("read of nothing at {offset}: {other:?}"),
        }
        let ops = [
            Op::Write {
                offset,
                data: Bytes::new(),
                fua: false,
            },
            Op::Write {
                offset,
                data: Bytes::new(),
                fua: true,
            },
            Op::Discard { offset, len: 0 },
            Op::WriteZeroes {
                offset,
                len: 0,
                may_unmap: true,
                fast_only: false,
                fua: false,
            },
            Op::WriteZeroes {
                offset,
                len: 0,
                may_unmap: false,
                fast_only: true,
                fua: true,
            },
        ];
        for op in ops {
            let what = format!("{op:?}");
            assert!(matches!(run(&fx.storage, op), Ok(Done::Ok)), "{what}");
        }
    }
    assert!(
        read(&fx.storage, 0, 8192) == data,
        "an empty request changed data"
    );
}
