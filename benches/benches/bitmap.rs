//! Criterion benchmarks for the dirty bitmap scan
//! (`tandem_replicator::core::bitmap::Bitmap`).
//!
//! The resync source walks the bitmap with `next_set` / `next_clear`
//! (`core/resync.rs`, `pump`: a run of set bits from the cursor, at most
//! 256 blocks = 1 MiB per chunk), and the bitmap exchange at connect time
//! walks it the same way (`Bitmap::extents`). A bitmap has one bit per
//! 4 KiB block, so a 1 TiB device has 2^28 bits (32 MiB of words). What is
//! measured, on such a bitmap:
//! - `scan/walk_runs/<pattern>`: the resync's walk over the whole bitmap,
//!   `next_set(cursor)`, then `next_clear_before(s, s + 256)`, until the end;
//!   one iteration = the whole device. Throughput is in bitmap bytes.
//! - `scan/extents/<pattern>`: `extents(0, usize::MAX)`, the whole bitmap as
//!   extents (what a connect sends when the bitmaps are exchanged).
//! - `count/cached/<pattern>`: `count()`, a counter kept up to date by
//!   `set`/`clear` (for scale: it does not scan);
//! - `load/from_bytes/<pattern>`: `Bitmap::from_bytes`, loading a bitmap
//!   from its on-disk bytes, which recounts every word.
//!
//! Patterns: `empty` (nothing to resync: a scan that finds nothing),
//! `sparse` (one set block in every 64 Ki, i.e. one per 256 MiB, the
//! bitmap of a short disconnection), `random10` (10% of the blocks set at
//! random, the issue-5 bitmap resync case; almost every run is one block),
//! `dense_runs` (runs of 256 set blocks separated by 256 clear ones), all
//! on a 1 TiB device; and `full` (every block set: a full sync) on 1, 4
//! and 16 GiB devices (`scan/walk_runs_full/<GiB>`), because the walk was
//! quadratic there while each chunk's `next_clear(s)` scanned to the end
//! of the set run (the end of the device) before `.min(s + 256)` cut it;
//! the bounded `next_clear_before` makes the time per GiB constant.
//!
//! Run: `cargo bench -p tandem-benches --bench bitmap`
//! (`BITMAP_BENCH_TIB=0.25` for a smaller device for the 1 TiB patterns).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tandem_replicator::core::bitmap::Bitmap;

/// The resync's chunk: at most this many blocks per `next_clear` run
/// (`core::resync::CHUNK_BLOCKS`, which is private to the core).
const CHUNK_BLOCKS: u64 = 256;

/// Blocks of the device the non-`full` patterns use (1 TiB by default).
fn device_blocks() -> u64 {
    let tib: f64 = std::env::var("BITMAP_BENCH_TIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    ((tib * (1u64 << 40) as f64) as u64 / 4096).max(64)
}

/// A small deterministic generator (xorshift64*), so every run sets the
/// same bits.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn pattern(name: &str, blocks: u64) -> Bitmap {
    let mut b = Bitmap::new(blocks);
    match name {
        "empty" => {}
        "sparse" => {
            let mut i = 12_345 % blocks;
            while i < blocks {
                b.set(i, i + 1);
                i += 64 * 1024;
            }
        }
        "random10" => {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            // Draw until exactly 10% of the blocks are set.
            let want = blocks / 10;
            while b.count() < want {
                let i = rng.next() % blocks;
                b.set(i, i + 1);
            }
        }
        "dense_runs" => {
            let mut i = 0;
            while i < blocks {
                b.set(i, i + CHUNK_BLOCKS);
                i += 2 * CHUNK_BLOCKS;
            }
        }
        "full" => {
            b.set_all();
        }
        _ => unreachable!("unknown pattern {name}"),
    }
    b
}

/// The resync source's walk (`Node::pump`), without the I/O: returns the
/// number of chunks and the blocks they cover.
fn walk_runs(b: &Bitmap) -> (u64, u64) {
    let (mut chunks, mut covered, mut cursor) = (0, 0, 0);
    while let Some(s) = b.next_set(cursor) {
        let e = b.next_clear_before(s, s + CHUNK_BLOCKS);
        chunks += 1;
        covered += e - s;
        cursor = e;
    }
    (chunks, covered)
}

/// The on-disk bytes of the whole bitmap.
fn to_bytes(b: &Bitmap) -> Vec<u8> {
    (0..b.pages()).flat_map(|p| b.page_bytes(p)).collect()
}

const PATTERNS: [&str; 4] = ["empty", "sparse", "random10", "dense_runs"];

/// Device sizes, in GiB, of the `full` pattern.
const FULL_GIB: [u64; 3] = [1, 4, 16];

fn scan(c: &mut Criterion) {
    let blocks = device_blocks();
    let mut g = c.benchmark_group("scan");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(blocks / 8));
    for name in PATTERNS {
        let b = pattern(name, blocks);
        // The walk must find exactly what is set.
        assert_eq!(walk_runs(&b).1, b.count(), "{name}");
        g.bench_with_input(BenchmarkId::new("walk_runs", name), &b, |bench, b| {
            bench.iter(|| walk_runs(black_box(b)))
        });
        // `extents` allocates one entry per run: skip random10, whose 27
        // million runs would take gigabytes.
        if name != "random10" {
            g.bench_with_input(BenchmarkId::new("extents", name), &b, |bench, b| {
                bench.iter(|| black_box(b).extents(0, usize::MAX).0.len())
            });
        }
    }
    g.finish();

    // The full bitmap: one iteration per sample, the walk takes seconds.
    let mut g = c.benchmark_group("scan");
    g.sample_size(10);
    g.sampling_mode(criterion::SamplingMode::Flat);
    for gib in FULL_GIB {
        let blocks = gib << 18;
        let b = pattern("full", blocks);
        g.throughput(Throughput::Bytes(blocks / 8));
        g.bench_with_input(BenchmarkId::new("walk_runs_full", gib), &b, |bench, b| {
            bench.iter(|| walk_runs(black_box(b)))
        });
    }
    g.finish();
}

fn count(c: &mut Criterion) {
    let blocks = device_blocks();
    let bitmaps: Vec<(&str, Bitmap)> = ["empty", "random10", "full"]
        .into_iter()
        .map(|name| (name, pattern(name, blocks)))
        .collect();
    let mut g = c.benchmark_group("count");
    for (name, b) in &bitmaps {
        g.bench_with_input(BenchmarkId::new("cached", name), b, |bench, b| {
            bench.iter(|| black_box(b).count())
        });
    }
    g.finish();
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(blocks.div_ceil(8)));
    for (name, b) in &bitmaps {
        let bytes = to_bytes(b);
        g.bench_with_input(
            BenchmarkId::new("from_bytes", name),
            &bytes,
            |bench, bytes| bench.iter(|| Bitmap::from_bytes(blocks, black_box(bytes)).count()),
        );
    }
    g.finish();
}

criterion_group!(benches, scan, count);
criterion_main!(benches);
