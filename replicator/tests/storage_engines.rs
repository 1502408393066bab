//! Engine lifecycle, used directly (without `Storage`): shutdown from a
//! completion, the last handle dropped in a completion, panicking
//! completions, and engine selection.

mod common;

use std::sync::{Arc, mpsc};

use bytes::Bytes;
use common::{EngineSel, HANG, make_file, run_engine, start_engine};
use tandem_replicator::storage::{
    Backing, Done, EngineChoice, EngineKind, IoMode, Op, OpenOptions, StorageError,
    start_engine as start,
};

fn backing(dir: &tempfile::TempDir) -> Arc<Backing> {
    let path = make_file(&dir.path().join("disk.img"), 1 << 20);
    Arc::new(
        Backing::open(
            path,
            OpenOptions {
                mode: IoMode::Direct,
            },
        )
        .unwrap(),
    )
}

fn aligned_write(i: u64) -> Op {
    Op::Write {
        offset: i * 4096,
        data: tandem_proto::AlignedBuf::copy_from(&[i as u8 + 1; 4096]).into_bytes(),
        fua: false,
    }
}

/// The last handle on an engine, dropped inside one of its completions:
/// the engine cannot join its own thread, and must not deadlock trying.
fn last_handle_dropped_in_completion(sel: EngineSel) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let engine = start_engine(backing(&dir), sel);
    let (tx, rx) = mpsc::channel();
    let handle = Arc::clone(&engine);
    engine.submit(
        Op::Read {
            offset: 0,
            len: 4096,
        },
        Box::new(move |result| {
            drop(handle); // the last handle, once the test has dropped its own
            tx.send(result).expect("test is waiting");
        }),
    );
    drop(engine);
    assert!(rx.recv_timeout(HANG).expect("the completion ran").is_ok());
}

#[test]
fn last_handle_dropped_in_completion_uring() {
    last_handle_dropped_in_completion(EngineSel::Uring)
}
#[test]
fn last_handle_dropped_in_completion_threads() {
    last_handle_dropped_in_completion(EngineSel::Threads)
}

/// `shutdown` called from a completion starts the shutdown; ops already
/// submitted still complete, and outside submissions are refused after.
fn shutdown_from_completion(sel: EngineSel) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let engine = start_engine(backing(&dir), sel);
    let (tx, rx) = mpsc::channel();
    let handle = Arc::clone(&engine);
    let tx2 = tx.clone();
    engine.submit(
        Op::Flush,
        Box::new(move |result| {
            handle.shutdown();
            tx2.send(result).expect("test is waiting");
        }),
    );
    assert!(rx.recv_timeout(HANG).expect("the flush completed").is_ok());
    engine.shutdown(); // joins the stopped threads
    engine.submit(
        Op::Flush,
        Box::new(move |result| tx.send(result).expect("test is waiting")),
    );
    assert_eq!(
        rx.recv_timeout(HANG).unwrap().unwrap_err(),
        StorageError::Shutdown
    );
}

#[test]
fn shutdown_from_completion_uring() {
    shutdown_from_completion(EngineSel::Uring)
}
#[test]
fn shutdown_from_completion_threads() {
    shutdown_from_completion(EngineSel::Threads)
}

/// A completion that panics does not take the engine down.
fn panicking_completion_is_contained(sel: EngineSel) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let engine = start_engine(backing(&dir), sel);
    let (tx, rx) = mpsc::channel();
    for i in 0..4 {
        let tx = tx.clone();
        engine.submit(
            aligned_write(i),
            Box::new(move |result| {
                tx.send(result).expect("test is waiting");
                panic!("deliberate panic in a completion (test)");
            }),
        );
    }
    for _ in 0..4 {
        assert!(rx.recv_timeout(HANG).unwrap().is_ok());
    }
    for i in 0..4 {
        match run_engine(
            &*engine,
            Op::Read {
                offset: i * 4096,
                len: 4096,
            },
        ) {
            Ok(Done::Read(bytes)) => assert!(bytes.iter().all(|&b| b == i as u8 + 1)),
            other => panic!("{other:?}"),
        }
    }
    engine.shutdown();
}

#[test]
fn panicking_completion_is_contained_uring() {
    panicking_completion_is_contained(EngineSel::Uring)
}
#[test]
fn panicking_completion_is_contained_threads() {
    panicking_completion_is_contained(EngineSel::Threads)
}

/// Engines used directly with aligned ops: round trip, counters, drain.
fn raw_engine(sel: EngineSel) {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let engine = start_engine(backing(&dir), sel);
    assert_eq!(
        engine.kind(),
        if sel == EngineSel::Uring {
            EngineKind::IoUring
        } else {
            EngineKind::Threads
        }
    );
    let (tx, rx) = mpsc::channel();
    for i in 0..200 {
        let tx = tx.clone();
        engine.submit(
            aligned_write(i % 256),
            Box::new(move |r| tx.send(r).expect("test is waiting")),
        );
    }
    engine.shutdown();
    for _ in 0..200 {
        assert!(
            rx.try_recv()
                .expect("drained before shutdown returned")
                .is_ok()
        );
    }
    let stats = engine.stats();
    assert_eq!(
        (stats.writes, stats.written_bytes, stats.fdatasyncs),
        (200, 200 * 4096, 0)
    );
    let data = Bytes::from_static(&[0; 4096]);
    assert_eq!(
        run_engine(
            &*engine,
            Op::Write {
                offset: 0,
                data,
                fua: true
            }
        )
        .unwrap_err(),
        StorageError::Shutdown
    );
}

#[test]
fn raw_engine_uring() {
    raw_engine(EngineSel::Uring)
}
#[test]
fn raw_engine_threads() {
    raw_engine(EngineSel::Threads)
}

#[test]
fn start_engine_gives_what_was_chosen() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let backing = backing(&dir);
    // io_uring works on the test machine (the fallback is tested in the crate).
    for (choice, kind) in [
        (EngineChoice::Auto, EngineKind::IoUring),
        (EngineChoice::IoUring, EngineKind::IoUring),
        (EngineChoice::Threads, EngineKind::Threads),
    ] {
        let engine = start(Arc::clone(&backing), choice).expect("start engine");
        assert_eq!(engine.kind(), kind, "{choice:?}");
        assert!(run_engine(&*engine, Op::Flush).is_ok());
        engine.shutdown();
    }
}

/// With the NBD connection's inline hint, an idle io_uring engine runs a
/// write or flush on the submitting thread and completes it before
/// `submit` returns, through the same plan: a FUA write still ends with its
/// sync, a flush is one `fdatasync`. The hint is taken once: what the
/// completion submits goes to the engine's threads.
#[test]
fn inline_hint_runs_writes_and_flushes_on_the_submitting_thread() {
    use tandem_replicator::storage::FuaMode;
    for mode in [IoMode::Direct, IoMode::Buffered] {
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let path = make_file(&dir.path().join("disk.img"), 1 << 20);
        let backing = Arc::new(Backing::open(path, OpenOptions { mode }).unwrap());
        let engine = start_engine(Arc::clone(&backing), EngineSel::Uring);
        let me = std::thread::current().id();
        let fua = Op::Write {
            offset: 2 * 4096,
            data: tandem_proto::AlignedBuf::copy_from(&[9; 4096]).into_bytes(),
            fua: true,
        };
        // (writes, FUA writes, flushes) issued, follow-ups included.
        let mut issued = (0, 0, 0);
        for (i, op) in [aligned_write(1), fua, Op::Flush].into_iter().enumerate() {
            // "Idle" is a heuristic: the previous op's bookkeeping may
            // still be finishing on an engine thread. Try again then.
            let mut inline = false;
            for _attempt in 0..100 {
                match op {
                    Op::Write { fua: true, .. } => issued.1 += 1,
                    Op::Write { .. } => issued.0 += 1,
                    _ => issued.2 += 1,
                }
                issued.2 += 1; // the completion's follow-up flush
                let (tx, rx) = mpsc::channel();
                let inner = Arc::clone(&engine);
                tandem_nbd::inline::allow(|| {
                    engine.submit(
                        op.clone(),
                        Box::new(move |r| {
                            let here = std::thread::current().id();
                            // A follow-up from the completion is not inline.
                            let (tx2, rx2) = mpsc::channel();
                            inner.submit(
                                Op::Flush,
                                Box::new(move |_| tx2.send(std::thread::current().id()).unwrap()),
                            );
                            tx.send((r, here, rx2)).unwrap();
                        }),
                    )
                });
                let done_before_return = rx.try_recv().ok();
                let before = done_before_return.is_some();
                let (r, thread, rx2) = match done_before_return {
                    Some(done) => done,
                    None => rx.recv_timeout(HANG).unwrap(),
                };
                assert!(r.is_ok(), "{r:?}");
                assert_ne!(rx2.recv_timeout(HANG).unwrap(), me);
                if thread == me {
                    assert!(before, "an inline op completes before submit returns");
                    inline = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(inline, "{mode:?} op {i} never ran on the submitting thread");
        }
        let (writes, fua_writes, flushes) = issued;
        let stats = engine.stats();
        assert_eq!(stats.writes, writes + fua_writes);
        match backing.fua_mode() {
            FuaMode::WriteThenSync => {
                assert_eq!(
                    (stats.fdatasyncs, stats.dsync_writes),
                    (fua_writes + flushes, 0)
                )
            }
            FuaMode::Dsync => {
                assert_eq!(
                    (stats.fdatasyncs, stats.dsync_writes),
                    (flushes, fua_writes)
                )
            }
        }
        let back = run_engine(
            &*engine,
            Op::Read {
                offset: 2 * 4096,
                len: 4096,
            },
        )
        .unwrap();
        match back {
            Done::Read(data) => assert!(data.iter().all(|&b| b == 9)),
            Done::Ok => panic!("a read yields data"),
        }
        // Without the hint, only a small plain buffered write runs on the
        // submitting thread (a page-cache copy; io_uring would punt it).
        let (tx, rx) = mpsc::channel();
        engine.submit(
            aligned_write(3),
            Box::new(move |r| tx.send((r, std::thread::current().id())).unwrap()),
        );
        let (r, thread) = rx.recv_timeout(HANG).unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(thread == me, mode == IoMode::Buffered, "{mode:?}");
        let (tx, rx) = mpsc::channel();
        engine.submit(
            Op::Flush,
            Box::new(move |_| tx.send(std::thread::current().id()).unwrap()),
        );
        assert_ne!(rx.recv_timeout(HANG).unwrap(), me);
        engine.shutdown();
    }
}
