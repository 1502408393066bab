//! Model test: random batches of reads, writes, zeroes, discards and flushes
//! at random (mostly unaligned) offsets and lengths, with random buffer
//! misalignment, run through `Storage` and checked against an in-memory
//! model. The ops of a batch are in flight together; they never overlap in
//! bytes (but often share blocks, which exercises the RMW locks).

mod common;

use std::sync::mpsc;

use common::{EngineSel, Fixture, HANG, bytes_at_misalignment, make_file, pattern, read};
use proptest::prelude::*;
use tandem_replicator::storage::{Done, IoMode, Op, StorageError};

const SIZE: u64 = 64 * 1024;

#[derive(Debug, Clone)]
enum MOp {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        len: usize,
        seed: u64,
        misalign: usize,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl MOp {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            MOp::Read { offset, len } | MOp::Write { offset, len, .. } => {
                Some((offset, offset + len as u64))
            }
            MOp::Zeroes { offset, len, .. } | MOp::Discard { offset, len } => {
                Some((offset, offset + len))
            }
            MOp::Flush => None,
        }
    }
}

/// An offset and length inside the device: aligned or not, short or long.
fn extent() -> impl Strategy<Value = (u64, u64)> {
    let offset = prop_oneof![
        0..SIZE,
        (0..SIZE / 512).prop_map(|b| b * 512),
        (SIZE - 600..SIZE)
    ];
    let len = prop_oneof![
        1..=16u64,
        1..=1500u64,
        1..=12_000u64,
        (1..=8u64).prop_map(|n| n * 512)
    ];
    (offset, len).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)))
}

fn mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        3 => extent().prop_map(|(offset, len)| MOp::Read { offset, len: len as usize }),
        6 => (extent(), any::<u64>(), 0..8usize, any::<bool>()).prop_map(|((offset, len), seed, misalign, fua)| {
            MOp::Write { offset, len: len as usize, seed, misalign, fua }
        }),
        2 => (extent(), any::<bool>(), any::<bool>())
            .prop_map(|((offset, len), may_unmap, fua)| MOp::Zeroes { offset, len, may_unmap, fua }),
        1 => extent().prop_map(|(offset, len)| MOp::Discard { offset, len }),
        1 => Just(MOp::Flush),
    ]
}

/// Keep the ops of a batch that do not overlap an earlier kept one.
fn disjoint(batch: Vec<MOp>) -> Vec<MOp> {
    let mut kept: Vec<MOp> = Vec::new();
    for op in batch {
        let clashes = op.range().is_some_and(|(a, b)| {
            kept.iter()
                .filter_map(MOp::range)
                .any(|(c, d)| a < d && c < b)
        });
        if !clashes {
            kept.push(op);
        }
    }
    kept
}

/// The expected content: each byte's value, and whether a discard allows it
/// to read as zero instead.
struct Model {
    bytes: Vec<u8>,
    maybe_zero: Vec<bool>,
}

impl Model {
    fn check(&self, offset: u64, got: &[u8]) -> Result<(), TestCaseError> {
        for (i, &g) in got.iter().enumerate() {
            let at = offset as usize + i;
            let ok = g == self.bytes[at] || (self.maybe_zero[at] && g == 0);
            prop_assert!(
                ok,
                "byte {} reads {:#x}, expected {:#x}",
                at,
                g,
                self.bytes[at]
            );
        }
        Ok(())
    }

    fn set(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.maybe_zero[at..at + data.len()].fill(false);
    }
}

fn run_case(sel: EngineSel, mode: IoMode, batches: Vec<Vec<MOp>>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let path = make_file(&dir.path().join("disk.img"), SIZE);
    let fx = Fixture::open(&path, &path, sel, mode, true);
    let mut model = Model {
        bytes: vec![0; SIZE as usize],
        maybe_zero: vec![false; SIZE as usize],
    };

    for batch in batches {
        let batch = disjoint(batch);
        let (tx, rx) = mpsc::channel::<(usize, Result<Done, StorageError>)>();
        for (i, op) in batch.iter().enumerate() {
            let op = match *op {
                MOp::Read { offset, len } => Op::Read { offset, len },
                MOp::Write {
                    offset,
                    len,
                    seed,
                    misalign,
                    fua,
                } => Op::Write {
                    offset,
                    data: bytes_at_misalignment(&pattern(seed, len), misalign),
                    fua,
                },
                MOp::Zeroes {
                    offset,
                    len,
                    may_unmap,
                    fua,
                } => Op::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                    fast_only: false,
                    fua,
                },
                MOp::Discard { offset, len } => Op::Discard { offset, len },
                MOp::Flush => Op::Flush,
            };
            let tx = tx.clone();
            fx.storage.submit(
                op,
                Box::new(move |result| tx.send((i, result)).expect("test is waiting")),
            );
        }
        let mut results: Vec<Option<Result<Done, StorageError>>> = vec![None; batch.len()];
        for _ in 0..batch.len() {
            let (i, result) = rx.recv_timeout(HANG).expect("every op completes");
            prop_assert!(results[i].is_none(), "op {} completed twice", i);
            results[i] = Some(result);
        }
        // Reads do not overlap this batch's writes: check them against the
        // model as it was, then apply the batch.
        for (op, result) in batch.iter().zip(results) {
            let result = result.expect("collected");
            match (op, result) {
                (MOp::Read { offset, len }, Ok(Done::Read(bytes))) => {
                    prop_assert_eq!(bytes.len(), *len);
                    model.check(*offset, &bytes)?;
                }
                (
                    MOp::Write {
                        offset, len, seed, ..
                    },
                    Ok(Done::Ok),
                ) => model.set(*offset, &pattern(*seed, *len)),
                (MOp::Zeroes { offset, len, .. }, Ok(Done::Ok)) => {
                    model.set(*offset, &vec![0; *len as usize])
                }
                (MOp::Discard { offset, len }, Ok(Done::Ok)) => {
                    let at = *offset as usize;
                    model.maybe_zero[at..at + *len as usize].fill(true);
                }
                (MOp::Flush, Ok(Done::Ok)) => {}
                (op, result) => prop_assert!(false, "{:?} gave {:?}", op, result),
            }
        }
    }
    model.check(0, &read(&fx.storage, 0, SIZE as usize))
}

fn batches() -> impl Strategy<Value = Vec<Vec<MOp>>> {
    prop::collection::vec(prop::collection::vec(mop(), 1..10), 1..12)
}

macro_rules! model_tests {
    ($($name:ident: $sel:expr, $mode:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $name(batches in batches()) {
                    run_case($sel, $mode, batches)?;
                }
            )*
        }
    };
}

model_tests! {
    model_uring_direct: EngineSel::Uring, IoMode::Direct;
    model_uring_buffered: EngineSel::Uring, IoMode::Buffered;
    model_threads_direct: EngineSel::Threads, IoMode::Direct;
    model_threads_buffered: EngineSel::Threads, IoMode::Buffered;
}
