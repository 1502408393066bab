//! Online verify and checksum-based resync, through the deterministic
//! simulation with real cores: verify finds blocks changed behind
//! Tandem's back and marks exactly them, `disconnect` + `connect` resyncs
//! exactly them; verify under client writes finds nothing; an interrupted
//! verify releases its ranges; after a Primary crash the activity-log
//! regions are compared by checksum and only the differing blocks are
//! sent; a target crashing in the middle of a checksum resync never loses
//! a block it compared equal (docs/durability.md, invariant 26).

use tandem_replicator::config::{Fencing, VerifyAlg};
use tandem_replicator::core::states::{ConnState, DiskState, ReplState, Role};
use tandem_replicator::core::{ClientOp, Command};
use tandem_replicator::sim::{Answer, SimCluster};
use tandem_replicator::status::Status;

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const EXTENT: u64 = 4 << 20;

fn answer(c: &SimCluster, id: u64) -> Result<String, String> {
    match c.answer(id) {
        Some(Answer::Command(r)) => r.clone().map_err(|e| e.message),
        other => panic!("command {id}: {other:?}\ntrace: {:#?}", c.trace),
    }
}

fn ok(c: &SimCluster, id: u64) -> String {
    answer(c, id).unwrap_or_else(|e| panic!("command {id} failed: {e}"))
}

fn io_ok(c: &SimCluster, t: u64) {
    match c.answer(t) {
        Some(Answer::Io(Ok(_))) => {}
        other => panic!("request {t}: {other:?}"),
    }
}

fn status(c: &SimCluster, i: usize) -> Status {
    c.status(i)
}

/// A connected pair after the initial full sync from alpha (Primary),
/// with some data, both UpToDate.
fn synced_pair(seed: u64, size: u64) -> SimCluster {
    let mut c = SimCluster::new(seed, size, Fencing::DontCare);
    let p = c.command(0, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    for k in 0..16u64 {
        let t = c.write(0, k * 65536, &[k as u8 + 1; 8192], false);
        c.settle();
        io_ok(&c, t);
    }
    let f = c.client(0, ClientOp::Flush);
    c.settle();
    io_ok(&c, f);
    assert!(c.try_connect() || c.link);
    c.settle();
    for i in 0..2 {
        assert_eq!(c.core(i).replication(), ReplState::Established);
        assert_eq!(c.core(i).disk(), DiskState::UpToDate);
    }
    assert!(c.data(0) == c.data(1));
    c
}

#[test]
fn verify_marks_exactly_the_blocks_changed_behind_tandems_back_and_reconnecting_resyncs_them() {
    for seed in 0..8 {
        let mut c = synced_pair(seed, SIZE);
        // Change three blocks of beta's data area directly (two adjacent).
        let bad = [12 * BLOCK, 13 * BLOCK, 1500 * BLOCK];
        for &off in &bad {
            c.nodes[1].disk.poke(off + 100, &[0xee; 7]);
        }
        assert!(c.data(0) != c.data(1));
        let v = c.command(0, Command::Verify);
        // While it runs: VerifySource / VerifyTarget with progress.
        let mut seen = (false, false);
        for _ in 0..40 {
            c.step();
            seen.0 |=
                c.core(0).replication() == ReplState::VerifySource && status(&c, 0).sync.is_some();
            seen.1 |= c.core(1).replication() == ReplState::VerifyTarget;
        }
        c.settle();
        assert!(seen.0 && seen.1, "seed {seed}: verify states never shown");
        let msg = ok(&c, v);
        assert!(
            msg.contains("3 blocks (12288 bytes) out of sync")
                && msg.contains("49152+8192")
                && msg.contains(&format!("{}+4096", 1500 * BLOCK)),
            "seed {seed}: {msg}"
        );
        for i in 0..2 {
            assert_eq!(c.core(i).replication(), ReplState::Established);
            assert_eq!(c.core(i).bitmap().count(), 3, "seed {seed} node {i}");
            let s = status(&c, i);
            let vs = s.verify.expect("verify status");
            assert!(!vs.running && vs.complete);
            assert_eq!(vs.out_of_sync_blocks, 3);
            assert_eq!(vs.done_bytes, vs.total_bytes);
            assert_eq!(s.out_of_sync_bytes, 3 * BLOCK);
            assert!(s.sync.is_none());
        }
        // Nothing was copied by the verify itself.
        assert!(c.data(0) != c.data(1));
        // The marks are durable: a restart of the Secondary keeps them.
        assert_eq!(
            tandem_replicator::sim::load(&c.nodes[1].disk).1.count(),
            3,
            "seed {seed}: marks not durable after the verify answered"
        );

        // DRBD's way: disconnect and connect; the Primary is sync source.
        // Data or zero ranges (the source's blocks may read as zeros).
        let resynced = |c: &SimCluster| {
            let k = status(c, 0).counters;
            k.resync_sent_bytes + k.resync_zero_sent_bytes
        };
        let sent0 = resynced(&c);
        let d = c.command(0, Command::Disconnect);
        c.settle();
        ok(&c, d);
        let k = c.command(
            0,
            Command::Connect {
                discard_my_data: false,
            },
        );
        c.settle();
        ok(&c, k);
        assert_eq!(c.core(0).connection(), ConnState::Connected);
        assert_eq!(c.core(1).disk(), DiskState::UpToDate, "{:#?}", c.trace);
        let sent = resynced(&c) - sent0;
        assert_eq!(sent, 3 * BLOCK, "seed {seed}: resync sent {sent}");
        assert!(c.data(0) == c.data(1), "seed {seed}: data differs");
        assert_eq!(c.core(0).bitmap().count(), 0);
        assert_eq!(c.core(1).bitmap().count(), 0);
    }
}

#[test]
fn verify_from_the_secondary_with_sha256_finds_a_change_on_the_primary() {
    let mut c = synced_pair(3, SIZE);
    // Restart beta with verify-alg = sha256 (a clean stop first).
    let d = c.command(1, Command::Down);
    c.settle();
    ok(&c, d);
    c.crash(1);
    c.nodes[1].params.verify_alg = VerifyAlg::Sha256;
    c.start(1);
    c.settle();
    assert_eq!(
        c.core(1).replication(),
        ReplState::Established,
        "{:#?}",
        c.trace
    );
    let w = c.write(0, 300 * BLOCK, &[9; 4096], false);
    c.settle();
    io_ok(&c, w);
    c.nodes[0].disk.poke(700 * BLOCK, &[1; 1]);
    let v = c.command(1, Command::Verify);
    c.settle();
    let msg = ok(&c, v);
    assert!(msg.contains("sha256") && msg.contains("1 blocks"), "{msg}");
    assert_eq!(c.core(0).bitmap().count(), 1);
    assert_eq!(c.core(1).bitmap().count(), 1);
    let s = status(&c, 1).verify.unwrap();
    assert_eq!(
        (s.role.as_str(), s.alg.as_str()),
        ("VerifySource", "sha256")
    );
    assert_eq!(s.ranges[0].offset, 700 * BLOCK);
}

#[test]
fn verify_on_the_primary_under_client_writes_reports_no_false_difference() {
    for seed in 0..10 {
        let mut c = synced_pair(100 + seed, SIZE);
        let v = c.command(0, Command::Verify);
        let mut tokens = Vec::new();
        for k in 0..40u64 {
            let off = (k * 7919 * BLOCK + seed * BLOCK) % (SIZE - 2 * 65536);
            tokens.push(c.write(0, off, &[k as u8; 12288], false));
            for _ in 0..(k % 5) {
                c.step();
            }
        }
        c.settle();
        for t in tokens {
            io_ok(&c, t);
        }
        let msg = ok(&c, v);
        assert!(msg.contains(" 0 blocks"), "seed {seed}: {msg}");
        assert_eq!(c.core(0).bitmap().count(), 0);
        assert_eq!(c.core(1).bitmap().count(), 0);
        assert!(c.data(0) == c.data(1));
    }
}

/// Client writes on the Primary while the Secondary runs the verify: a
/// block can reach the Primary's disk before the Secondary's read and the
/// Secondary's after it. The Primary has every candidate read again while
/// it holds the chunk (protocol 2): no false difference, and a real one
/// (a byte changed behind Tandem's back) is still found, exactly.
#[test]
fn verify_on_the_secondary_under_client_writes_is_exact() {
    let mut rechecks = 0;
    for seed in 0..10 {
        let mut c = synced_pair(200 + seed, SIZE);
        // Changed behind Tandem's back, where no client write lands.
        let poked = c.core(0).size() - BLOCK;
        c.nodes[1].disk.poke(poked, &[0xa5; 1]);
        let v = c.command(1, Command::Verify);
        let mut tokens = Vec::new();
        for k in 0..40u64 {
            let off = (k * 7919 * BLOCK + seed * BLOCK) % (SIZE - 2 * 65536);
            tokens.push(c.write(0, off, &[k as u8; 12288], false));
            for _ in 0..(k % 5) {
                c.step();
            }
        }
        c.settle();
        for t in tokens {
            io_ok(&c, t);
        }
        let msg = ok(&c, v);
        assert!(
            msg.contains(" 1 blocks") && msg.contains(&format!("{poked}+4096")),
            "seed {seed}: {msg}"
        );
        assert_eq!(c.core(0).bitmap().count(), 1);
        assert_eq!(c.core(1).bitmap().count(), 1);
        rechecks += c
            .delivered
            .get(&tandem_proto::peer::message::code::VERIFY_RECHECK)
            .copied()
            .unwrap_or(0);
    }
    // The poked block alone makes one per run; the writes make more.
    assert!(rechecks > 10, "only {rechecks} rechecks in 10 runs");
}

/// A peer speaking protocol 1 knows no recheck: the Primary never sends
/// one, and the verify still finds the real difference (it may also count
/// blocks a client write changed meanwhile, as before protocol 2).
#[test]
fn a_protocol_1_peer_gets_no_verify_recheck() {
    let mut c = synced_pair(9, SIZE);
    c.link_version = 1;
    let d = c.command(1, Command::Disconnect);
    c.settle();
    ok(&c, d);
    let r = c.command(
        1,
        Command::Connect {
            discard_my_data: false,
        },
    );
    c.settle();
    ok(&c, r);
    assert_eq!(c.core(1).replication(), ReplState::Established);
    c.nodes[1].disk.poke(5 * BLOCK, &[0xa5; 1]);
    let v = c.command(1, Command::Verify);
    c.settle();
    let msg = ok(&c, v);
    assert!(
        msg.contains(" 1 blocks") && msg.contains("20480+4096"),
        "{msg}"
    );
    assert_eq!(
        c.delivered
            .get(&tandem_proto::peer::message::code::VERIFY_RECHECK),
        None
    );
}

#[test]
fn a_verify_cut_by_the_link_fails_keeps_its_findings_and_frees_its_ranges() {
    let mut c = synced_pair(7, SIZE);
    c.nodes[1].disk.poke(0, &[0x55; 1]);
    let v = c.command(0, Command::Verify);
    for _ in 0..30 {
        c.step();
    }
    c.partition();
    c.settle();
    let e = answer(&c, v).unwrap_err();
    assert!(e.contains("online verify stopped"), "{e}");
    assert_ne!(c.core(0).replication(), ReplState::VerifySource);
    // Every range is free again: writes everywhere complete (degraded).
    for k in 0..(SIZE / (1 << 20)) {
        let t = c.write(0, k << 20, &[1; 4096], false);
        c.settle();
        io_ok(&c, t);
    }
    c.heal();
    c.settle();
    assert_eq!(c.core(1).disk(), DiskState::UpToDate, "{:#?}", c.trace);
    // Whether or not the changed block was compared before the cut, the
    // writes over it were marked: the data ends identical.
    assert!(c.data(0) == c.data(1));
}

#[test]
fn verify_is_refused_without_a_connected_up_to_date_peer() {
    let mut c = SimCluster::new(1, SIZE, Fencing::DontCare);
    let v = c.command(0, Command::Verify);
    c.settle();
    let e = answer(&c, v).unwrap_err();
    assert!(e.contains("verify needs"), "{e}");
}

/// Alpha (Primary) writes into extents 2 and 5, crashes with a write in
/// flight; beta takes over; alpha restarts as sync target of its log.
fn crashed_primary(seed: u64, steps: u64) -> (SimCluster, u64, u64) {
    const BIG: u64 = 32 << 20;
    let mut c = synced_pair(seed, BIG);
    for k in 0..64u64 {
        c.write(0, 2 * EXTENT + k * 3 * BLOCK, &[k as u8; 4096], false);
    }
    c.write(0, 5 * EXTENT, &[2; 8192], false);
    c.settle();
    let f = c.client(0, ClientOp::Flush);
    c.settle();
    io_ok(&c, f);
    c.write(0, 5 * EXTENT + 65536, &[3; 4096], false);
    c.write(0, 2 * EXTENT + 4 * BLOCK, &[4; 4096], false);
    for _ in 0..steps {
        c.step();
    }
    c.crash(0);
    let p = c.command(1, Command::Primary { force: false });
    c.settle();
    ok(&c, p);
    let s = status(&c, 1).counters;
    (c, s.resync_sent_bytes, s.resync_same_bytes)
}

#[test]
fn after_a_primary_crash_the_activity_log_regions_are_compared_by_checksum() {
    for seed in 0..12 {
        let (mut c, sent0, same0) = crashed_primary(seed, seed % 5);
        // The new Primary changes one block of extent 2 and one elsewhere.
        let t = c.write(1, 2 * EXTENT + 100 * BLOCK, &[7; 4096], true);
        let u = c.write(1, 7 * EXTENT, &[8; 4096], true);
        c.settle();
        io_ok(&c, t);
        io_ok(&c, u);
        c.start(0);
        // Marked: the log's extents 0 (the first writes), 2 and 5.
        let marked = c.core(0).bitmap().count() * BLOCK;
        assert_eq!(marked, 3 * EXTENT, "seed {seed}");
        c.settle();
        assert_eq!(
            c.core(0).disk(),
            DiskState::UpToDate,
            "seed {seed}: {:#?}",
            c.trace
        );
        assert_eq!(c.core(0).role(), Role::Secondary);
        assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
        let s = status(&c, 1).counters;
        let (sent, same) = (s.resync_sent_bytes - sent0, s.resync_same_bytes - same0);
        // The log regions (12 MiB) plus beta's block in extent 7 were in
        // the resync; the log regions went by checksum.
        assert_eq!(sent + same, marked + BLOCK, "seed {seed}");
        // Sent: beta's two blocks, and at most the two writes alpha had in
        // flight (one of them two blocks).
        assert!(
            (2 * BLOCK..=5 * BLOCK).contains(&sent),
            "seed {seed}: sent {sent}"
        );
    }
}

#[test]
fn a_target_crashing_during_a_checksum_resync_never_trusts_a_block_it_may_lose() {
    // Invariant 26: blocks found identical are cleared only after a flush.
    // Beta writes over alpha's log regions while alpha (target) compares,
    // then alpha loses power at a random point: after it returns, the
    // resync must still end with identical data.
    for seed in 0..60 {
        let (mut c, _, _) = crashed_primary(1000 + seed, seed % 3);
        c.start(0);
        let mut n = 0;
        while c.core(0).replication() != ReplState::SyncTarget && n < 10_000 {
            c.step();
            n += 1;
        }
        for k in 0..24u64 {
            c.write(
                1,
                2 * EXTENT + k * 5 * BLOCK,
                &[0x80 | k as u8; 4096],
                false,
            );
            c.write(
                1,
                5 * EXTENT + k * 11 * BLOCK,
                &[0x40 | k as u8; 4096],
                false,
            );
            for _ in 0..(seed % 7) {
                c.step();
            }
        }
        for _ in 0..(seed * 3 % 50) {
            c.step();
        }
        c.crash(0);
        c.settle();
        c.start(0);
        c.settle();
        assert_eq!(
            c.core(0).disk(),
            DiskState::UpToDate,
            "seed {seed}: {:#?}",
            c.trace
        );
        assert!(
            c.data(0) == c.data(1),
            "seed {seed}: data areas differ after the crash"
        );
    }
}

#[test]
fn a_sync_target_clears_marks_only_when_a_flush_completes() {
    // Invariant 26, step by step: on the sync target a mark goes only when
    // one of its flushes completes, never when a checksum compare finds
    // the block identical (that data may still be in a volatile cache).
    for seed in 0..20 {
        let (mut c, _, _) = crashed_primary(2000 + seed, seed % 4);
        c.start(0);
        let mut prev = c.core(0).bitmap().count();
        let mut steps = 0;
        let mut cleared_by_flush = 0;
        loop {
            let flushes: Vec<u64> = c.nodes[0].flush_upto.keys().copied().collect();
            if steps % 97 == 13 && c.core(1).role() == Role::Primary {
                // Partial-block writes keep their marks on both nodes.
                let off = 2 * EXTENT + (steps % 1000) * BLOCK + 512;
                c.write(1, off, &[steps as u8; 1024], false);
            }
            if !c.step() {
                break;
            }
            steps += 1;
            let now = c.core(0).bitmap().count();
            if now < prev {
                let flushed = flushes
                    .iter()
                    .any(|id| !c.nodes[0].flush_upto.contains_key(id));
                assert!(
                    flushed,
                    "seed {seed}: the sync target cleared {} marks without a flush",
                    prev - now
                );
                cleared_by_flush += prev - now;
            }
            prev = now;
        }
        assert!(cleared_by_flush > 0, "seed {seed}: nothing was cleared");
        assert_eq!(c.core(0).disk(), DiskState::UpToDate, "seed {seed}");
        assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
    }
}

/// `[sync] rate` caps an online verify too: at 4 MiB/s (set with `adjust`
/// after a fast initial sync), a 24 MiB verify advances at the cap, not
/// at the speed of the (simulated) disks, and still finishes and finds
/// a change.
#[test]
fn the_sync_rate_caps_an_online_verify() {
    const MIB: u64 = 1 << 20;
    const MS: u64 = 1_000_000;
    const RATE: u64 = 4 * MIB;
    let mut c = synced_pair(3, 24 * MIB);
    c.nodes[1].disk.poke(20 * MIB + 5, &[0xee; 3]);
    let a = c.command(
        0,
        Command::Adjust {
            resync_rate: RATE,
            max_buffers: 64,
        },
    );
    c.settle();
    ok(&c, a);
    let v = c.command(0, Command::Verify);
    c.settle();
    let done = |c: &SimCluster| status(c, 0).sync.map(|s| s.done_bytes);
    let first = done(&c).expect("verifying");
    assert!(first <= RATE / 10, "{first} bytes verified with no time");
    let mut now = 0;
    let mut at = Vec::new();
    while c.answer(v).is_none() {
        now += 10 * MS;
        assert!(now < 60_000 * MS, "not done after 60 s");
        c.tick(now);
        c.settle();
        if let Some(d) = done(&c) {
            at.push((now, d));
        }
    }
    let got = |t: u64| at.iter().rfind(|(n, _)| *n <= t).unwrap().1;
    let (from, to) = (1_000 * MS, 4_000 * MS);
    let rate = (got(to) - got(from)) * 1_000 * MS / (to - from);
    assert!(
        rate.abs_diff(RATE) * 100 <= RATE * 5,
        "verify at {rate} bytes/s with the cap at {RATE}"
    );
    let m = ok(&c, v);
    assert!(m.contains("(4096 bytes) out of sync: 20971520+4096"), "{m}");
    assert!(now >= 5_000 * MS, "24 MiB verified in {now} ns at 4 MiB/s");
}
