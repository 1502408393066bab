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
