//! Concurrency: read-modify-write under contention, re-entrant submission
//! from completions, and many ops in flight at once, on both engines.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use common::{EngineSel, Fixture, HANG, make_file, pattern, read, write};
use tandem_replicator::storage::{Done, IoMode, Op, Storage, StorageError};

const SIZE: u64 = 8 << 20;

fn fixture(dir: &tempfile::TempDir, sel: EngineSel, mode: IoMode) -> Fixture {
    let path = make_file(&dir.path().join("disk.img"), SIZE);
    Fixture::open(&path, &path, sel, mode, true)
}

/// 4096 one-byte writes to distinct offsets packed into a few direct-I/O
/// blocks, all in flight at once from several threads: every one is a
/// read-modify-write of a block others are modifying too. Without the block
/// locks, concurrent RMWs of one block lose each other's bytes.
fn rmw_race(sel: EngineSel) {
    const WRITES: usize = 4096;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let fx = fixture(&dir, sel, IoMode::Direct);
    let align = fx.storage.dio_align();
    assert!(WRITES / align >= 1 && align <= 4096, "alignment {align}");
    let base = 64 * 1024u64;
    write(&fx.storage, base, &vec![0u8; WRITES], false);

    let value = |i: usize| (i % 255 + 1) as u8; // never 0, the initial content
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (storage, tx) = (fx.storage.clone(), tx.clone());
            scope.spawn(move || {
                // Interleave the threads' offsets so neighbours race.
                for i in (t..WRITES).step_by(4) {
                    let tx = tx.clone();
                    let op = Op::Write {
                        offset: base + i as u64,
                        data: Bytes::from(vec![value(i)]),
                        fua: false,
                    };
                    storage.submit(op, Box::new(move |r| tx.send(r).expect("test is waiting")));
                }
            });
        }
    });
    for _ in 0..WRITES {
        assert!(
            rx.recv_timeout(HANG)
                .expect("every write completes")
                .is_ok()
        );
    }
    let got = read(&fx.storage, base, WRITES);
    let lost: Vec<usize> = (0..WRITES).filter(|&i| got[i] != value(i)).collect();
    assert!(
        lost.is_empty(),
        "{} of {WRITES} one-byte writes were lost, e.g. at {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

#[test]
fn rmw_race_uring() {
    rmw_race(EngineSel::Uring)
}

#[test]
fn rmw_race_threads() {
    rmw_race(EngineSel::Threads)
}

/// Each completion submits the next op (a chain of 1000), and some
/// completions submit several: nothing deadlocks, everything completes.
fn reentrant_submit(sel: EngineSel, mode: IoMode) {
    const CHAIN: u64 = 1000;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let fx = fixture(&dir, sel, mode);
    let (tx, rx) = mpsc::channel::<Result<Done, StorageError>>();

    fn step(storage: Storage, i: u64, tx: mpsc::Sender<Result<Done, StorageError>>) {
        // Unaligned offsets: each step is an RMW, itself several engine ops.
        let op = Op::Write {
            offset: i * 1001,
            data: Bytes::from(pattern(i, 100)),
            fua: i.is_multiple_of(100),
        };
        let next = storage.clone();
        storage.submit(
            op,
            Box::new(move |result| {
                if result.is_err() || i + 1 == CHAIN {
                    tx.send(result).expect("test is waiting");
                    return;
                }
                if i.is_multiple_of(10) {
                    // A fan-out of re-entrant reads too.
                    for k in 0..3 {
                        let tx = tx.clone();
                        next.submit(
                            Op::Read {
                                offset: k * 4096,
                                len: 4096,
                            },
                            Box::new(move |r| {
                                if r.is_err() {
                                    tx.send(r).expect("test is waiting");
                                }
                            }),
                        );
                    }
                }
                step(next, i + 1, tx);
            }),
        );
    }

    step(fx.storage.clone(), 0, tx);
    let result = rx.recv_timeout(HANG).expect("the chain completes");
    assert!(result.is_ok(), "{result:?}");
    fx.storage.shutdown();
    assert!(rx.try_recv().is_err(), "no read failed");
    // The chain's writes are all there.
    let path = fx.backing.path().to_path_buf();
    let on_disk = std::fs::read(path).unwrap();
    for i in 0..CHAIN {
        let at = (i * 1001) as usize;
        assert_eq!(
            on_disk[at..at + 100],
            pattern(i, 100)[..],
            "chain write {i}"
        );
    }
}

#[test]
fn reentrant_submit_uring_direct() {
    reentrant_submit(EngineSel::Uring, IoMode::Direct)
}
#[test]
fn reentrant_submit_uring_buffered() {
    reentrant_submit(EngineSel::Uring, IoMode::Buffered)
}
#[test]
fn reentrant_submit_threads_direct() {
    reentrant_submit(EngineSel::Threads, IoMode::Direct)
}
#[test]
fn reentrant_submit_threads_buffered() {
    reentrant_submit(EngineSel::Threads, IoMode::Buffered)
}

/// 12 000 ops of every kind in flight at once, from four threads: each
/// completes exactly once, also after the engine has been shut down.
fn many_ops_complete_once(sel: EngineSel, mode: IoMode) {
    const OPS: usize = 12_000;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let fx = fixture(&dir, sel, mode);
    let calls: Arc<Vec<AtomicU32>> = Arc::new((0..OPS).map(|_| AtomicU32::new(0)).collect());
    let failures = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel::<usize>();

    let op_for = |i: usize| -> Op {
        let slot = (i as u64 % 2000) * 4096; // disjoint 4 KiB slots per op kind
        match i % 6 {
            0 => Op::Write {
                offset: slot,
                data: Bytes::from(pattern(i as u64, 4096)),
                fua: false,
            },
            1 => Op::Write {
                offset: slot + 100,
                data: Bytes::from(pattern(i as u64, 50)),
                fua: i % 12 == 1,
            },
            2 => Op::Read {
                offset: slot,
                len: 4096,
            },
            3 => Op::Read {
                offset: slot + 7,
                len: 300,
            },
            4 => Op::WriteZeroes {
                offset: slot + 1000,
                len: 100,
                may_unmap: false,
                fast_only: false,
                fua: false,
            },
            _ => Op::Flush,
        }
    };
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (storage, tx, calls, failures) = (
                fx.storage.clone(),
                tx.clone(),
                Arc::clone(&calls),
                Arc::clone(&failures),
            );
            scope.spawn(move || {
                for i in (t..OPS).step_by(4) {
                    let (tx, calls, failures) =
                        (tx.clone(), Arc::clone(&calls), Arc::clone(&failures));
                    storage.submit(
                        op_for(i),
                        Box::new(move |result| {
                            calls[i].fetch_add(1, Ordering::SeqCst);
                            if let Err(e) = result {
                                failures.lock().unwrap().push((i, e));
                            }
                            tx.send(i).expect("test is waiting");
                        }),
                    );
                }
            });
        }
    });
    for _ in 0..OPS {
        rx.recv_timeout(HANG).expect("every op completes");
    }
    fx.storage.shutdown();
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        &failures.lock().unwrap()[..]
    );
    let wrong: Vec<(usize, u32)> = (0..OPS)
        .map(|i| (i, calls[i].load(Ordering::SeqCst)))
        .filter(|&(_, n)| n != 1)
        .collect();
    assert!(wrong.is_empty(), "ops completed other than once: {wrong:?}");
    assert!(rx.try_recv().is_err(), "no completion after the last");
}

#[test]
fn many_ops_uring_direct() {
    many_ops_complete_once(EngineSel::Uring, IoMode::Direct)
}
#[test]
fn many_ops_uring_buffered() {
    many_ops_complete_once(EngineSel::Uring, IoMode::Buffered)
}
#[test]
fn many_ops_threads_direct() {
    many_ops_complete_once(EngineSel::Threads, IoMode::Direct)
}
#[test]
fn many_ops_threads_buffered() {
    many_ops_complete_once(EngineSel::Threads, IoMode::Buffered)
}
