//! FLUSH and FUA reach stable storage (docs/durability.md, invariants 1-3).
//!
//! With the threads engine every storage syscall is visible to strace: a
//! plain write is a `pwritev2` without `RWF_DSYNC` and nothing syncs; a
//! FLUSH is an `fdatasync` issued after the writes it covers were
//! answered; a FUA write is a `pwritev2` with `RWF_DSYNC`. The io_uring
//! engine's syscalls are not visible, so there the engine's counters
//! (compared around each operation) carry the same checks.

mod common;

use common::tools::{Strace, Syscall, parse_strace};
use common::*;
use tandem_proto::nbd::consts::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// Offsets of the reads the test uses to mark the boundaries between
/// phases in the trace (past every write the test does).
const MARKS: [u64; 3] = [10 * MIB, 11 * MIB, 12 * MIB];

fn is_write(c: &Syscall) -> bool {
    matches!(c.name.as_str(), "pwritev2" | "pwritev" | "pwrite64")
}

/// The (offset, flags) a write call carries, from its entry half.
fn write_args(c: &Syscall) -> (u64, String) {
    match c.name.as_str() {
        // pwritev2(fd, iov, iovcnt, offset, flags)
        "pwritev2" => (c.args[3].parse().unwrap(), c.args[4].clone()),
        // pwritev(fd, iov, iovcnt, offset), pwrite64(fd, buf, count, offset)
        _ => (c.args[3].parse().unwrap(), String::new()),
    }
}

/// Where the marker read at `offset` completed.
fn mark_position(calls: &[Syscall], offset: u64) -> usize {
    calls
        .iter()
        .position(|c| {
            c.name == "pread64"
                && c.finished
                && c.args.last().and_then(|a| a.parse().ok()) == Some(offset)
        })
        .unwrap_or_else(|| panic!("marker read at {offset} not in the trace: {calls:#?}"))
}

fn strace_flush_and_fua(io: &str) {
    require("strace");
    let mut c = Spec::single(16 * MIB)
        .repd_args(&["--engine", "threads", "--io", io])
        .build();
    c.up_primary("alpha");
    assert_eq!(c.status("alpha")["engine"]["kind"], "threads");
    let size = c.size("alpha");
    let mut client = c.client("alpha");
    let trace_file = c.path("strace.log");
    let strace = Strace::attach(
        c.pid("alpha"),
        "pread64,pwritev2,pwritev,pwrite64,fdatasync,fsync,sync_file_range",
        &trace_file,
    );

    // Phase 1: N plain writes (answered), then marker 0.
    const N: u64 = 8;
    for i in 0..N {
        client
            .write(i * 2 * BLOCK as u64, &pattern(i, BLOCK), false)
            .unwrap();
    }
    client.read(MARKS[0], BLOCK as u32).unwrap();
    // Phase 2: a FLUSH, then marker 1.
    client.flush().unwrap();
    client.read(MARKS[1], BLOCK as u32).unwrap();
    // Phase 3: a FUA write, then marker 2.
    let fua_at = 64 * BLOCK as u64;
    client.write(fua_at, &pattern(99, BLOCK), true).unwrap();
    client.read(MARKS[2], BLOCK as u32).unwrap();
    // Phase 4: qemu-io's `write -f`, for a client we do not control.
    let qemu_at = 128 * BLOCK as u64;
    let out = c.qemu_io("alpha", &[&format!("write -f -P 0x42 {qemu_at} 4096")]);
    assert_eq!(out.code, 0, "{out:?}");

    let log = strace.finish();
    let calls = parse_strace(&log);
    let m: Vec<usize> = MARKS.iter().map(|&o| mark_position(&calls, o)).collect();
    let data_writes = |range: std::ops::Range<usize>| -> Vec<(u64, String)> {
        calls[range]
            .iter()
            .filter(|c| is_write(c) && !c.args.is_empty())
            .map(write_args)
            .filter(|(o, _)| *o < size)
            .collect()
    };
    let syncs = |range: std::ops::Range<usize>| {
        calls[range]
            .iter()
            .filter(|c| c.name.contains("sync") && !c.args.is_empty())
            .count()
    };

    // Phase 1: the writes, none synchronous, and no sync at all.
    let writes = data_writes(0..m[0]);
    assert_eq!(
        writes.len() as u64,
        N,
        "one pwritev2 per plain write: {writes:?}\n{log}"
    );
    for (offset, flags) in &writes {
        assert!(
            !flags.contains("DSYNC") && !flags.contains("SYNC"),
            "plain write at {offset} has {flags}\n{log}"
        );
    }
    assert_eq!(syncs(0..m[0]), 0, "plain writes must not sync\n{log}");

    // Phase 2: exactly one fdatasync, after the writes it covers.
    let flush: Vec<&Syscall> = calls[m[0]..m[1]]
        .iter()
        .filter(|c| c.name.contains("sync") && !c.args.is_empty())
        .collect();
    assert_eq!(flush.len(), 1, "a FLUSH is one fdatasync: {flush:?}\n{log}");
    assert_eq!(flush[0].name, "fdatasync");
    assert!(data_writes(m[0]..m[1]).is_empty(), "{log}");

    // Phase 3: the FUA write is RWF_DSYNC, with no fdatasync.
    let writes = data_writes(m[1]..m[2]);
    assert_eq!(writes.len(), 1, "{writes:?}\n{log}");
    assert_eq!(writes[0].0, fua_at);
    assert!(
        writes[0].1.contains("RWF_DSYNC"),
        "FUA write without RWF_DSYNC: {}\n{log}",
        writes[0].1
    );
    assert_eq!(syncs(m[1]..m[2]), 0, "{log}");

    // Phase 4: qemu's FUA write is RWF_DSYNC too.
    let writes = data_writes(m[2]..calls.len());
    assert!(
        writes
            .iter()
            .any(|(o, f)| *o == qemu_at && f.contains("RWF_DSYNC")),
        "qemu-io write -f: {writes:?}\n{log}"
    );

    // And the data is there.
    for i in 0..N {
        assert_eq!(
            c.read_disk("alpha", i * 2 * BLOCK as u64, BLOCK),
            pattern(i, BLOCK)
        );
    }
    assert_eq!(c.read_disk("alpha", fua_at, BLOCK), pattern(99, BLOCK));
}

#[test]
fn strace_shows_flush_and_fua_reach_the_disk_direct() {
    strace_flush_and_fua("direct");
}

#[test]
fn strace_shows_flush_and_fua_reach_the_disk_buffered() {
    strace_flush_and_fua("buffered");
}

/// The same rules counted by the engine, for either engine and I/O mode.
fn counted_flush_and_fua(args: &[&str]) {
    let mut c = Spec::single(16 * MIB).repd_args(args).build();
    c.up_primary("alpha");
    let mut client = c.client("alpha");
    let delta = |c: &Cluster, before: (u64, u64)| {
        let now = c.syncs("alpha");
        (now.0 - before.0, now.1 - before.1)
    };

    let s = c.syncs("alpha");
    for i in 0..16u64 {
        client
            .write(i * BLOCK as u64 + 3, &pattern(i, BLOCK), false)
            .unwrap();
    }
    client.write_zeroes(MIB, 64 * 1024, 0).unwrap();
    client.trim(2 * MIB, 64 * 1024, false).unwrap();
    assert_eq!(
        delta(&c, s),
        (0, 0),
        "plain writes, zeroes and trims never sync"
    );

    let s = c.syncs("alpha");
    client.flush().unwrap();
    assert_eq!(delta(&c, s), (1, 0), "a FLUSH is one fdatasync");

    let s = c.syncs("alpha");
    client.write(3 * MIB, &pattern(7, 2 * BLOCK), true).unwrap();
    assert_eq!(
        delta(&c, s),
        (0, 1),
        "an aligned FUA write is one RWF_DSYNC write"
    );

    let s = c.syncs("alpha");
    client.write(4 * MIB + 5, &pattern(8, 100), true).unwrap();
    let (f, d) = delta(&c, s);
    assert_eq!(f, 0);
    assert!(d >= 1, "an unaligned FUA write is written with RWF_DSYNC");

    let s = c.syncs("alpha");
    client
        .write_zeroes(5 * MIB, 64 * 1024, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
        .unwrap();
    let (f, d) = delta(&c, s);
    assert!(f + d >= 1, "a FUA write-zeroes is made durable");

    // A FUA trim asks for nothing durable (the range is unspecified).
    let s = c.syncs("alpha");
    client.trim(6 * MIB, 64 * 1024, true).unwrap();
    assert_eq!(delta(&c, s), (0, 0));
    // Reads never sync.
    let s = c.syncs("alpha");
    client.read(0, 1 << 20).unwrap();
    assert_eq!(delta(&c, s), (0, 0));
}

#[test]
fn counters_show_flush_and_fua_with_io_uring_direct() {
    counted_flush_and_fua(&["--engine", "io-uring", "--io", "direct"]);
}

#[test]
fn counters_show_flush_and_fua_with_io_uring_buffered() {
    counted_flush_and_fua(&["--engine", "io-uring", "--io", "buffered"]);
}

#[test]
fn counters_show_flush_and_fua_with_threads() {
    counted_flush_and_fua(&["--engine", "threads"]);
}
