//! The replication rules, exercised through the deterministic simulation
//! with real cores: initial sync, protocol C, degraded mode, bitmap resync,
//! interrupted resync, promotion rules, invalidate, new-current-uuid.

use tandem_replicator::config::Fencing;
use tandem_replicator::core::states::{ConnState, DiskState, ReplState, Role};
use tandem_replicator::core::{ClientOp, Command};
use tandem_replicator::sim::{Answer, SimCluster};

const SIZE: u64 = 8 << 20;

fn ok(c: &SimCluster, id: u64) -> String {
    match c.answer(id) {
        Some(Answer::Command(Ok(m))) => m.clone(),
        other => panic!("command {id}: {other:?}\ntrace: {:#?}", c.trace),
    }
}

/// Beta is UpToDate and both data areas are identical.
fn assert_beta_synced(c: &SimCluster, seed: u64) {
    assert_eq!(
        c.core(1).disk(),
        DiskState::UpToDate,
        "seed {seed}: {:#?}",
        c.trace
    );
    assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
}

fn io_ok(c: &SimCluster, t: u64) {
    match c.answer(t) {
        Some(Answer::Io(Ok(_))) => {}
        other => panic!(
            "request {t}: {other:?}\ntrace tail: {:#?}",
            &c.trace[c.trace.len().saturating_sub(30)..]
        ),
    }
}

/// `primary` (not forced) on node `i` is refused by a safety rule; its
/// message.
fn promotion_refused(c: &mut SimCluster, i: usize, context: &str) -> String {
    let p = c.command(i, Command::Primary { force: false });
    c.settle();
    match c.answer(p) {
        Some(Answer::Command(Err(e))) if e.refused => e.message.clone(),
        other => panic!("{context}: primary on node {i} was not refused: {other:?}"),
    }
}

/// A pair after the initial full sync from alpha: both UpToDate, connected.
fn synced_pair(seed: u64) -> SimCluster {
    let mut c = SimCluster::new(seed, SIZE, Fencing::DontCare);
    let p = c.command(0, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    // Some data before the first sync.
    let t = c.write(0, 4096, &[0xaa; 8192], false);
    c.settle();
    io_ok(&c, t);
    assert!(c.try_connect() || c.link);
    c.settle();
    for i in 0..2 {
        assert_eq!(
            c.core(i).connection(),
            ConnState::Connected,
            "{:#?}",
            c.trace
        );
        assert_eq!(
            c.core(i).replication(),
            ReplState::Established,
            "{:#?}",
            c.trace
        );
        assert_eq!(c.core(i).disk(), DiskState::UpToDate);
    }
    assert!(c.data(0) == c.data(1), "data areas differ");
    assert_eq!(
        c.core(0).superblock().generations,
        c.core(1).superblock().generations
    );
    c
}

#[test]
fn initial_full_sync_then_identical_generations() {
    for seed in 0..20 {
        let c = synced_pair(seed);
        assert_eq!(c.core(0).bitmap().count(), 0);
        assert_eq!(c.core(1).bitmap().count(), 0);
    }
}

#[test]
fn forcing_primary_on_a_connected_fresh_pair_starts_the_full_sync() {
    for seed in 0..10 {
        let mut c = SimCluster::new(seed, SIZE, Fencing::DontCare);
        // Data only alpha has (e.g. restored before pairing).
        c.nodes[0].disk.poke(12345, b"only on alpha");
        assert!(c.try_connect());
        c.settle();
        assert_eq!(c.core(0).replication(), ReplState::Established);
        let p = c.command(0, Command::Primary { force: true });
        c.settle();
        ok(&c, p);
        assert_beta_synced(&c, seed);
    }
}

#[test]
fn writes_are_answered_only_after_the_peer_acknowledged() {
    let mut c = synced_pair(1);
    let t = c.write(0, 0, &[7; 4096], false);
    // Complete the local write; the peer has not seen it yet.
    while c.complete_one(0) {}
    assert!(
        c.answer(t).is_none(),
        "answered before the peer acknowledged"
    );
    c.settle();
    io_ok(&c, t);
    assert!(c.data(0) == c.data(1), "data areas differ");
}

/// A client that never flushes: the Primary closes the epoch with a barrier
/// flush of its own once the transfer log holds 1 GiB of acknowledged
/// writes (`MAX_EPOCH_BLOCKS`), so a lost link then marks nothing; one
/// write short of that, the whole unflushed epoch is marked.
#[test]
fn the_transfer_log_is_bounded_without_client_flushes() {
    const WRITE: usize = 4 << 20;
    const WRITES_PER_GIB: usize = (1 << 30) / WRITE;
    for (writes, marked) in [
        (WRITES_PER_GIB - 1, (WRITE / 4096) as u64),
        (WRITES_PER_GIB, 0),
    ] {
        let mut c = synced_pair(3);
        let f = c.client(0, ClientOp::Flush);
        c.settle();
        io_ok(&c, f);
        let data = vec![0x5a; WRITE];
        for _ in 0..writes {
            let t = c.write(0, 0, &data, false);
            c.settle();
            io_ok(&c, t);
        }
        c.partition();
        assert_eq!(
            c.core(0).bitmap().count(),
            marked,
            "after {writes} unflushed writes of 4 MiB"
        );
    }
}

#[test]
fn degraded_writes_are_marked_durably_then_only_they_are_resynced() {
    let mut c = synced_pair(2);
    // A flush empties the transfer log: the peer has everything durably.
    let f = c.client(0, ClientOp::Flush);
    c.settle();
    io_ok(&c, f);
    c.partition();
    assert_eq!(c.core(0).bitmap().count(), 0);
    let mut tokens = Vec::new();
    for k in 0..10u64 {
        tokens.push(c.write(0, k * 65536, &[k as u8 + 1; 4096], false));
    }
    c.settle();
    for &t in &tokens {
        io_ok(&c, t);
    }
    assert_eq!(c.core(0).bitmap().count(), 10);
    // The marks are on disk before the writes were answered.
    let (_, on_disk, _) = tandem_replicator::sim::load(&c.nodes[0].disk);
    assert_eq!(on_disk.count(), 10);
    assert!(c.data(0) != c.data(1));
    c.heal();
    c.settle();
    assert_eq!(
        c.core(0).replication(),
        ReplState::Established,
        "{:#?}",
        c.trace
    );
    assert!(c.data(0) == c.data(1), "data areas differ");
    assert_eq!(c.core(0).bitmap().count(), 0);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate);
}

#[test]
fn writes_the_peer_did_not_flush_are_marked_when_the_link_is_lost() {
    let mut c = synced_pair(8);
    let f = c.client(0, ClientOp::Flush);
    c.settle();
    io_ok(&c, f);
    let t = c.write(0, 40960, &[3; 4096], false);
    c.settle();
    io_ok(&c, t);
    c.partition();
    // Acknowledged by the peer, but not flushed there: it could be lost
    // with a crash of the peer, so it is resynced.
    assert_eq!(c.core(0).bitmap().count(), 1);
    assert!(c.core(0).bitmap().get(10));
}

#[test]
fn overlapping_writes_end_identical() {
    for seed in 0..30 {
        let mut c = synced_pair(seed);
        let mut ts = Vec::new();
        for k in 0..20u8 {
            let off = u64::from(k % 3) * 1000;
            ts.push(c.write(0, off, &[k; 3000], k % 4 == 0));
        }
        c.settle();
        for t in ts {
            io_ok(&c, t);
        }
        assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
    }
}

#[test]
fn flush_waits_for_both_nodes() {
    let mut c = synced_pair(3);
    let w = c.write(0, 0, &[1; 4096], false);
    c.settle();
    io_ok(&c, w);
    let f = c.client(0, ClientOp::Flush);
    while c.complete_one(0) {}
    assert!(c.answer(f).is_none());
    c.settle();
    io_ok(&c, f);
}

#[test]
fn interrupted_resync_resumes_and_completes() {
    for seed in 0..10 {
        let mut c = synced_pair(seed);
        c.partition();
        for k in 0..64u64 {
            c.write(0, k * 65536, &[k as u8; 65536], false);
        }
        c.settle();
        c.heal();
        assert!(c.try_connect());
        // Let part of the resync happen, then cut the link.
        for _ in 0..40 {
            c.step();
        }
        c.partition();
        c.settle();
        c.heal();
        c.settle();
        assert_beta_synced(&c, seed);
    }
}

#[test]
fn promotion_is_refused_while_the_connected_peer_is_primary() {
    let mut c = synced_pair(4);
    promotion_refused(&mut c, 1, "peer Primary");
    // Switch-over: demote alpha, then beta may become Primary.
    let d = c.command(0, Command::Secondary);
    c.settle();
    ok(&c, d);
    let p = c.command(1, Command::Primary { force: false });
    c.settle();
    ok(&c, p);
    assert_eq!(c.core(1).role(), Role::Primary);
    assert_eq!(c.core(0).role(), Role::Secondary);
    let t = c.write(1, 0, &[5; 4096], true);
    c.settle();
    io_ok(&c, t);
    assert!(c.data(0) == c.data(1), "data areas differ");
}

#[test]
fn simultaneous_promotions_never_give_two_primaries() {
    for seed in 0..50 {
        let mut c = synced_pair(seed);
        let d = c.command(0, Command::Secondary);
        c.settle();
        ok(&c, d);
        let a = c.command(0, Command::Primary { force: false });
        let b = c.command(1, Command::Primary { force: false });
        c.settle();
        let primaries = (0..2)
            .filter(|&i| c.core(i).role() == Role::Primary)
            .count();
        assert_eq!(
            primaries,
            1,
            "seed {seed}: {:?} {:?}",
            c.answer(a),
            c.answer(b)
        );
    }
}

#[test]
fn invalidate_resyncs_everything_from_the_peer() {
    let mut c = synced_pair(5);
    c.nodes[1].disk.poke(100, b"garbage behind tandem's back");
    assert!(c.data(0) != c.data(1));
    let i = c.command(1, Command::Invalidate);
    c.settle();
    ok(&c, i);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate, "{:#?}", c.trace);
    assert!(c.data(0) == c.data(1), "data areas differ");
}

#[test]
fn new_current_uuid_clear_bitmap_skips_the_initial_sync() {
    let mut c = SimCluster::new(6, SIZE, Fencing::DontCare);
    assert!(c.try_connect());
    c.settle();
    assert_eq!(c.core(0).disk(), DiskState::Inconsistent);
    let id = c.command(0, Command::NewCurrentUuid { clear_bitmap: true });
    c.settle();
    ok(&c, id);
    for i in 0..2 {
        assert_eq!(c.core(i).disk(), DiskState::UpToDate, "{:#?}", c.trace);
    }
    assert_eq!(
        c.core(0).superblock().generations,
        c.core(1).superblock().generations
    );
    let p = c.command(1, Command::Primary { force: false });
    c.settle();
    ok(&c, p);
}

#[test]
fn split_brain_is_detected_and_resolved_by_discarding_one_side() {
    let mut c = synced_pair(7);
    c.partition();
    let p = c.command(1, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    c.write(0, 0, &[1; 4096], false);
    c.write(1, 8192, &[2; 4096], false);
    c.settle();
    let before = (c.data(0).to_vec(), c.data(1).to_vec());
    c.heal();
    c.settle();
    for i in 0..2 {
        assert!(c.core(i).split_brain(), "{:#?}", c.trace);
        assert_eq!(c.core(i).connection(), ConnState::StandAlone);
    }
    assert!(
        (c.data(0).to_vec(), c.data(1).to_vec()) == before,
        "data touched on split-brain"
    );
    // Beta's changes are to go: demote it, discard, reconnect alpha too.
    let d = c.command(1, Command::Secondary);
    c.settle();
    ok(&c, d);
    let x = c.command(
        1,
        Command::Connect {
            discard_my_data: true,
        },
    );
    let y = c.command(
        0,
        Command::Connect {
            discard_my_data: false,
        },
    );
    c.settle();
    ok(&c, x);
    ok(&c, y);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate, "{:#?}", c.trace);
    assert!(c.data(0) == c.data(1), "data areas differ");
    assert!(
        c.data(1)[8192..8192 + 4096].iter().all(|&b| b == 0xaa),
        "beta's split-brain write survived"
    );
    assert!(
        c.data(1)[..4096].iter().all(|&b| b == 1),
        "alpha's split-brain write is missing"
    );
}

#[test]
fn a_crashed_primary_resyncs_only_its_activity_log_regions() {
    const BIG: u64 = 64 << 20;
    const EXTENT: u64 = 4 << 20;
    for seed in 0..10 {
        let mut c = SimCluster::new(seed, BIG, Fencing::DontCare);
        let p = c.command(0, Command::Primary { force: true });
        c.settle();
        ok(&c, p);
        assert!(c.data(0) == c.data(1));
        // Writes into extents 2 and 5 only, some flushed, some not.
        c.write(0, 2 * EXTENT + 4096, &[1; 8192], false);
        c.write(0, 5 * EXTENT, &[2; 4096], false);
        c.settle();
        let f = c.client(0, ClientOp::Flush);
        c.settle();
        io_ok(&c, f);
        c.write(0, 5 * EXTENT + 65536, &[3; 4096], false);
        // Crash alpha with that write in flight somewhere.
        for _ in 0..(seed % 4) {
            c.step();
        }
        c.crash(0);
        // Beta takes over (fencing is off here) and writes a block.
        let p = c.command(1, Command::Primary { force: false });
        c.settle();
        ok(&c, p);
        let t = c.write(1, 9 * EXTENT, &[4; 4096], true);
        c.settle();
        io_ok(&c, t);
        let sent_before = c.status(1).counters.resync_sent_bytes;
        c.start(0);
        // The restarted node marked exactly its log's extents.
        assert_eq!(c.core(0).bitmap().count(), 2 * EXTENT / 4096, "seed {seed}");
        c.settle();
        assert_eq!(
            c.core(0).disk(),
            DiskState::UpToDate,
            "seed {seed}: {:#?}",
            c.trace
        );
        assert_eq!(c.core(0).role(), Role::Secondary);
        assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
        let sent = c.status(1).counters.resync_sent_bytes - sent_before;
        assert!(
            sent <= 2 * EXTENT + 4096,
            "seed {seed}: sent {sent}, more than the log's regions"
        );
    }
}

#[test]
fn activity_log_eviction_keeps_crashes_safe() {
    // The sim's log holds 4 extents; writes roam over 12 of them.
    const BIG: u64 = 64 << 20;
    const EXTENT: u64 = 4 << 20;
    for seed in 0..20 {
        let mut c = SimCluster::new(seed, BIG, Fencing::DontCare);
        let p = c.command(0, Command::Primary { force: true });
        c.settle();
        ok(&c, p);
        for k in 0..40u64 {
            let e = (k * 7 + seed) % 12;
            c.write(0, e * EXTENT + (k % 16) * 4096, &[k as u8 + 1; 4096], false);
            for _ in 0..(k % 3) {
                c.step();
            }
        }
        c.settle();
        // Both crash (power) and come back: nothing may differ unnoticed.
        c.crash(0);
        c.crash(1);
        c.start(0);
        c.start(1);
        c.settle();
        assert_eq!(
            c.core(0).replication(),
            ReplState::Established,
            "seed {seed}: {:#?}",
            c.trace
        );
        assert!(
            c.data(0) == c.data(1),
            "seed {seed}: data areas differ after both crashed"
        );
    }
}

/// A synced pair with `fencing`.
fn fenced_pair(seed: u64, fencing: Fencing) -> SimCluster {
    let mut c = SimCluster::new(seed, SIZE, fencing);
    let p = c.command(0, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate);
    c
}

#[test]
fn resource_and_stonith_suspends_until_the_peer_is_fenced() {
    let mut fenced = 0;
    let mut stuck = 0;
    for seed in 0..40 {
        let mut c = fenced_pair(seed, Fencing::ResourceAndStonith);
        let w = c.write(0, 0, &[9; 4096], false);
        // The link goes while the write is in flight.
        c.step();
        c.partition();
        let later = c.write(0, 8192, &[8; 4096], false);
        // Everything but the handler settles: nothing is answered yet.
        while c.step_except_handlers() {}
        assert!(c.status(0).io_suspended, "seed {seed}");
        if c.answer(later).is_some() {
            panic!("seed {seed}: answered while suspended");
        }
        c.settle(); // the handler runs: STONITH of beta, or failure
        if c.running(1) {
            stuck += 1;
            // Not confirmed: still suspended, nothing answered.
            assert!(c.status(0).io_suspended, "seed {seed}");
            assert!(c.answer(later).is_none(), "seed {seed}");
            // The operator powers beta off and confirms.
            c.crash(1);
            let f = c.command(0, Command::FenceConfirm);
            c.settle();
            ok(&c, f);
        } else {
            fenced += 1;
        }
        assert!(!c.status(0).io_suspended, "seed {seed}");
        io_ok(&c, later);
        if let Some(Answer::Io(r)) = c.answer(w) {
            assert!(r.is_ok());
        }
    }
    assert!(
        fenced > 0 && stuck > 0,
        "both outcomes exercised: {fenced} fenced, {stuck} stuck"
    );
}

#[test]
fn a_disconnected_node_is_promoted_only_after_fencing() {
    for seed in 0..30 {
        let mut c = fenced_pair(seed, Fencing::ResourceOnly);
        c.partition();
        // Alpha runs fence-peer for losing its peer; it may power beta off.
        c.settle();
        if !c.running(1) {
            c.start(1); // beta reboots, isolated
        }
        let p = c.command(1, Command::Primary { force: false });
        c.settle();
        match c.answer(p) {
            Some(Answer::Command(Ok(_))) => {
                // Only if fence-peer really powered alpha off.
                assert!(
                    !c.running(0),
                    "seed {seed}: promoted while alpha runs unfenced"
                );
                assert_eq!(c.core(1).role(), Role::Primary);
            }
            Some(Answer::Command(Err(e))) => {
                assert!(e.refused, "seed {seed}: {e:?}");
                assert_eq!(c.core(1).role(), Role::Secondary);
            }
            other => panic!("seed {seed}: {other:?}"),
        }
    }
}

#[test]
fn a_rebooted_isolated_secondary_cannot_promote_itself() {
    let mut c = fenced_pair(3, Fencing::ResourceOnly);
    c.partition();
    c.settle();
    if c.running(1) {
        c.crash(1);
    }
    c.start(1);
    assert_eq!(c.core(1).disk(), DiskState::Consistent);
    promotion_refused(&mut c, 1, "rebooted, isolated");
    // Powering alpha off and confirming it (fence-confirm) proves only that
    // alpha cannot write now, not that beta has alpha's last writes
    // (durability.md, invariant 28): still Consistent, still refused, also
    // after a restart; only --force takes it.
    c.crash(0);
    let f = c.command(1, Command::FenceConfirm);
    c.settle();
    let m = ok(&c, f);
    assert!(m.contains("not UpToDate") && m.contains("--force"), "{m}");
    for restart in [false, true] {
        if restart {
            c.crash(1);
            c.start(1);
        }
        assert_eq!(c.core(1).disk(), DiskState::Consistent);
        let m = promotion_refused(&mut c, 1, &format!("fence-confirmed, restart {restart}"));
        assert!(m.contains("--force"), "{m}");
    }
    let p = c.command(1, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate);
}

/// A Secondary that learned from the handshake that the peer has newer
/// data is Outdated at once (durability.md, invariant 23): when the link
/// and then both nodes go before the resync starts, the stale copy is not
/// promotable after a restart, even with fencing off (`dont-care` makes a
/// Consistent disk UpToDate at start). Only `--force` takes it.
#[test]
fn a_secondary_that_learned_it_is_behind_stays_outdated_until_resynced() {
    for seed in 0..20 {
        let mut c = fenced_pair(seed, Fencing::DontCare);
        c.partition();
        c.settle();
        let w = c.write(0, 0, &[7; 4096], false);
        let f = c.client(0, ClientOp::Flush);
        c.settle();
        assert!(matches!(c.answer(w), Some(Answer::Io(Ok(_)))), "{seed}");
        assert!(matches!(c.answer(f), Some(Answer::Io(Ok(_)))), "{seed}");
        c.heal();
        let mut n = 0;
        while c.core(1).replication() != ReplState::SyncTarget {
            assert!(c.step(), "seed {seed}: beta never became sync target");
            n += 1;
            assert!(n < 100_000);
        }
        // Beta knows now; the link goes before the resync ran.
        c.partition();
        c.settle();
        c.crash(0);
        c.crash(1);
        c.start(1);
        assert_eq!(c.core(1).disk(), DiskState::Outdated, "seed {seed}");
        promotion_refused(&mut c, 1, &format!("seed {seed}: stale copy"));
    }
}

/// Two disks that share no generation are refused (neither side is
/// touched), and the refusal names the way out that works: fresh metadata
/// (`create-md --force`) on the node whose data is replaced, then a full
/// resync from the other.
#[test]
fn unrelated_data_is_refused_and_fresh_metadata_resolves_it() {
    use tandem_replicator::metadata::Generations;
    use tandem_replicator::sim::load;
    let mut c = fenced_pair(2, Fencing::DontCare);
    let w = c.write(0, 0, &[3; 4096], false);
    c.settle();
    assert!(matches!(c.answer(w), Some(Answer::Io(Ok(_)))));
    c.partition();
    c.settle();
    let w = c.write(0, 4096, &[5; 4096], false);
    c.settle();
    assert!(matches!(c.answer(w), Some(Answer::Io(Ok(_)))));
    let f = c.client(0, ClientOp::Flush);
    c.settle();
    assert!(matches!(c.answer(f), Some(Answer::Io(Ok(_)))));
    let s = c.command(0, Command::Secondary);
    c.settle();
    ok(&c, s);
    // Give each disk generations the other has never seen.
    for (i, base) in [(0usize, 0x1000u64), (1, 0x2000)] {
        c.crash(i);
        let (mut sb, _, _) = load(&c.nodes[i].disk);
        sb.generations = Generations {
            current: base,
            bitmap: base + 0x10,
            history: [base + 0x20, base + 0x30],
        };
        for _ in 0..2 {
            sb.sequence += 1;
            let off = sb.layout.superblock_offset(sb.sequence % 2);
            c.nodes[i].disk.poke(off, &sb.encode());
        }
        c.start(i);
    }
    let before = [c.data(0).to_vec(), c.data(1).to_vec()];
    c.heal();
    c.settle();
    for (i, untouched) in before.iter().enumerate() {
        let st = c.status(i);
        assert_ne!(st.connection, ConnState::Connected);
        let e = st.last_error.expect("a reason");
        assert!(
            e.contains("unrelated data") && e.contains("create-md --force"),
            "{e}"
        );
        assert_eq!(c.data(i), &untouched[..], "node {i} touched");
    }
    c.recreate_md(1);
    let k = c.command(
        0,
        Command::Connect {
            discard_my_data: false,
        },
    );
    c.settle();
    ok(&c, k);
    assert_eq!(c.core(1).disk(), DiskState::UpToDate);
    assert_eq!(c.core(1).replication(), ReplState::Established);
    assert_eq!(c.data(0), c.data(1));
}

/// `primary --force` on UpToDate data changes nothing a plain `primary`
/// would not (DRBD's `forced`): while connected it does not start a new
/// generation, which the peer would never learn of (simulation seed 8520:
/// the stale `current_unshared` flag later kept a Primary that lost its
/// peer from rotating, and divergence was resynced over).
#[test]
fn a_forced_promotion_of_uptodate_data_while_connected_keeps_the_generation() {
    let mut c = fenced_pair(4, Fencing::DontCare);
    let s = c.command(0, Command::Secondary);
    c.settle();
    ok(&c, s);
    let before = c.core(0).superblock().generations;
    let p = c.command(0, Command::Primary { force: true });
    c.settle();
    ok(&c, p);
    assert_eq!(c.core(0).role(), Role::Primary);
    assert_eq!(c.core(0).superblock().generations, before);
    // Losing the peer now starts a new generation as usual.
    c.partition();
    let w = c.write(0, 0, &[1; 4096], false);
    c.settle();
    assert!(matches!(c.answer(w), Some(Answer::Io(Ok(_)))));
    assert_ne!(c.core(0).superblock().generations.current, before.current);
}

/// Simulation seed 60380, replayed by hand (durability.md, invariant 28):
/// beta, Primary, crashes with the link down; alpha takes over after
/// `fence-confirm`, writes and flushes; beta restarts alone (Consistent,
/// old generation); alpha crashes; the operator truthfully confirms on
/// beta that alpha is off. beta must not become promotable over alpha's
/// flushed write, and when alpha is back the resync runs from alpha.
#[test]
fn a_confirmed_peer_does_not_make_the_stale_old_primary_promotable() {
    for seed in 0..10 {
        let mut c = fenced_pair(seed, Fencing::ResourceAndStonith);
        let s = c.command(0, Command::Secondary);
        c.settle();
        ok(&c, s);
        let p = c.command(1, Command::Primary { force: false });
        c.settle();
        ok(&c, p);
        c.partition();
        while c.step_except_handlers() {}
        c.crash(1);
        for cmd in [Command::FenceConfirm, Command::Primary { force: false }] {
            let k = c.command(0, cmd);
            c.settle();
            ok(&c, k);
        }
        let t = c.write(0, 40960, &[0x60; 4096], false);
        c.settle();
        io_ok(&c, t);
        let f = c.client(0, ClientOp::Flush);
        c.settle();
        io_ok(&c, f);
        c.start(1);
        c.settle();
        assert_eq!(c.core(1).disk(), DiskState::Consistent, "seed {seed}");
        c.crash(0);
        let k = c.command(1, Command::FenceConfirm);
        c.settle();
        ok(&c, k);
        assert_eq!(c.core(1).disk(), DiskState::Consistent, "seed {seed}");
        promotion_refused(&mut c, 1, &format!("seed {seed}: stale old Primary"));
        c.start(0);
        c.heal();
        c.settle();
        assert_eq!(c.core(1).disk(), DiskState::UpToDate, "seed {seed}");
        assert!(c.data(0) == c.data(1), "seed {seed}: data areas differ");
        assert_eq!(&c.data(1)[40960..45056], &[0x60; 4096][..], "seed {seed}");
    }
}

/// resource-and-stonith: the Primary loses its peer with a write in
/// flight and suspends; the peer is forced Primary and writes; the fence
/// handler finds it Primary (exit 6) and outdates the old Primary's disk;
/// the operator then confirms fencing anyway, so the held write is
/// answered. Both now hold answered writes the other lacks: the next
/// handshake must report split-brain, not resync over either. (Before, the
/// Outdated Primary skipped its new generation and looked merely behind:
/// simulation seed 6548.)
#[test]
fn a_held_write_answered_on_an_outdated_primary_is_still_divergence() {
    for seed in 0..20 {
        let mut c = fenced_pair(seed, Fencing::ResourceAndStonith);
        let held = c.write(0, 0, &[0x11; 4096], false);
        c.step();
        c.partition();
        while c.step_except_handlers() {}
        assert!(c.status(0).io_suspended, "seed {seed}");
        let p = c.command(1, Command::Primary { force: true });
        while c.step_except_handlers() {}
        ok(&c, p);
        let theirs = c.write(1, 65536, &[0x22; 4096], false);
        while c.step_except_handlers() {}
        io_ok(&c, theirs);
        // Alpha's fence-peer finds beta Primary: exit 6.
        while c.finish_handler(0) {}
        while c.step_except_handlers() {}
        assert_eq!(c.core(0).disk(), DiskState::Outdated, "seed {seed}");
        let k = c.command(0, Command::FenceConfirm);
        while c.step_except_handlers() {}
        ok(&c, k);
        io_ok(&c, held);
        assert_eq!(&c.data(0)[..4096], &[0x11; 4096][..], "seed {seed}");
        let s = c.command(1, Command::Secondary);
        while c.step_except_handlers() {}
        ok(&c, s);
        c.heal();
        c.settle();
        assert!(
            c.core(0).split_brain() && c.core(1).split_brain(),
            "seed {seed}: {:?} / {:?}",
            c.core(0).replication(),
            c.core(1).replication()
        );
        assert_eq!(&c.data(0)[..4096], &[0x11; 4096][..], "seed {seed}");
        assert_eq!(&c.data(1)[65536..69632], &[0x22; 4096][..], "seed {seed}");
    }
}

/// Two promotions crossing on the wire, started at every offset of each
/// other: at most one node ends Primary while they are connected. (The
/// grantor of the first used to forget it had granted when the requester's
/// earlier state message arrived, and the requester, granted but not yet
/// Primary, granted the second: simulation seed 50943.)
#[test]
fn crossing_promotions_never_make_two_primaries() {
    let mut both_tried = 0;
    for seed in 0..120 {
        let mut c = synced_pair(seed);
        // A switch-over: alpha demotes and promotes again at once (its
        // demotion's state message still on the wire), beta promotes too.
        let s = c.command(0, Command::Secondary);
        for _ in 0..(seed % 4) {
            c.step();
        }
        let a = c.command(0, Command::Primary { force: false });
        for _ in 0..(seed / 4 % 10) {
            c.step();
        }
        let b = c.command(1, Command::Primary { force: false });
        c.settle();
        ok(&c, s);
        let primaries = (0..2)
            .filter(|&i| c.core(i).role() == Role::Primary)
            .count();
        assert!(
            primaries <= 1 || !c.link,
            "seed {seed}: two Primaries while connected\n{:#?}",
            c.trace
        );
        if c.answer(a).is_some() && c.answer(b).is_some() {
            both_tried += 1;
        }
    }
    assert_eq!(both_tried, 120);
}

/// `secondary` on one node then `primary` on the other at once (a cluster
/// manager's switch-over): the promotion must not be refused because the
/// demotion's state message is still on the wire. Whether the peer is
/// Primary is the peer's to answer (it refuses while it is), so rule 1
/// holds and the switch-over works.
#[test]
fn promotion_right_after_the_peer_demoted_is_granted_by_the_peer() {
    for seed in 0..10 {
        let mut c = synced_pair(seed);
        // Still Primary: refused by alpha itself, naming the way out.
        let m = promotion_refused(&mut c, 1, &format!("seed {seed}: alpha Primary"));
        assert!(m.contains("repctl secondary"), "{m}");
        let s = c.command(0, Command::Secondary);
        // alpha does its part of the demotion; nothing reaches beta yet.
        while c.complete_one(0) {}
        assert_eq!(
            c.core(1).peer_state().map(|(r, _)| r),
            Some(Role::Primary),
            "seed {seed}: beta's view is behind"
        );
        let p = c.command(1, Command::Primary { force: false });
        c.settle();
        ok(&c, s);
        ok(&c, p);
        assert_eq!(c.core(1).role(), Role::Primary, "seed {seed}");
        assert_eq!(c.core(0).role(), Role::Secondary, "seed {seed}");
        assert_eq!(c.core(0).connection(), ConnState::Connected, "seed {seed}");
    }
}
