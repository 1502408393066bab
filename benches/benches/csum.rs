//! Criterion benchmarks for the block checksums of online verify and
//! checksum-based resync (`tandem_replicator::core::csum`).
//!
//! - `sums/{crc32,sha256}`: one digest per 4 KiB block over a 1 MiB chunk
//!   (what the source computes for each chunk it sends as checksums);
//! - `compare/{crc32,sha256}`: the target's side, digesting its own 1 MiB
//!   and comparing with the source's digests into a bitmask.
//!
//! Throughput is reported in bytes of data checksummed, so the figures
//! compare directly with the link and disk rates.
//!
//! Run: `cargo bench -p tandem-benches --bench csum`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tandem_replicator::core::csum::{Alg, block_sums, differing};

const CHUNK: usize = 1 << 20;

fn data() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sums(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("sums");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for alg in [Alg::Crc32, Alg::Sha256] {
        g.bench_with_input(BenchmarkId::from_parameter(alg.name()), &d, |b, d| {
            b.iter(|| black_box(block_sums(alg, black_box(d))))
        });
    }
    g.finish();
}

fn compare(c: &mut Criterion) {
    let d = data();
    let mut g = c.benchmark_group("compare");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for alg in [Alg::Crc32, Alg::Sha256] {
        let s = block_sums(alg, &d);
        g.bench_with_input(BenchmarkId::from_parameter(alg.name()), &d, |b, d| {
            b.iter(|| black_box(differing(alg, black_box(d), black_box(&s))))
        });
    }
    g.finish();
}

criterion_group!(benches, sums, compare);
criterion_main!(benches);
