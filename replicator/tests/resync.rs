//! The resync engine through the deterministic simulation: zero ranges
//! instead of data for chunks that read as zeros, and the `[sync] rate`
//! cap driven by the simulated clock.

use tandem_replicator::config::Fencing;
use tandem_replicator::core::Command;
use tandem_replicator::core::states::{DiskState, ReplState};
use tandem_replicator::sim::{Answer, SimCluster};
use tandem_replicator::status::{Counters, SyncProgress};

const MIB: u64 = 1 << 20;
const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;

fn counters(c: &SimCluster, i: usize) -> Counters {
    c.status(i).counters
}

fn sync(c: &SimCluster, i: usize) -> Option<SyncProgress> {
    c.status(i).sync
}

/// Alpha forced Primary with the link down (the caller connects).
fn promote(c: &mut SimCluster) {
    c.partition();
    let p = c.command(0, Command::Primary { force: true });
    c.settle();
    assert!(
        matches!(c.answer(p), Some(Answer::Command(Ok(_)))),
        "{:?}",
        c.answer(p)
    );
}

#[test]
fn zero_chunks_travel_as_zero_ranges_and_overwrite_the_targets_garbage() {
    for seed in 0..10 {
        let mut c = SimCluster::new(seed, 16 * MIB, Fencing::DontCare);
        promote(&mut c);
        // Data in one 1 MiB chunk (the full sync's chunks start at 0 and
        // are 1 MiB long); everything else reads as zeros.
        let t = c.write(0, 3 * MIB + 4096, &[0x5a; 65536], false);
        c.settle();
        assert!(matches!(c.answer(t), Some(Answer::Io(Ok(_)))));
        // The target's disk holds garbage everywhere in its data area.
        let size = c.data(1).len() as u64;
        for off in (0..size).step_by(MIB as usize / 2) {
            c.nodes[1].disk.poke(off, &[0xee; 8192]);
        }
        c.heal();
        assert!(c.try_connect());
        c.settle();
        assert_eq!(c.core(1).disk(), DiskState::UpToDate, "seed {seed}");
        assert_eq!(c.core(0).replication(), ReplState::Established);
        assert!(
            c.data(0) == c.data(1),
            "seed {seed}: data areas differ after the sync"
        );
        let (a, b) = (counters(&c, 0), counters(&c, 1));
        assert_eq!(a.resync_sent_bytes, MIB, "seed {seed}: {a:?}");
        assert_eq!(a.resync_zero_sent_bytes, size - MIB, "seed {seed}: {a:?}");
        assert_eq!(b.resync_received_bytes, MIB, "seed {seed}: {b:?}");
        assert_eq!(
            b.resync_zero_received_bytes,
            size - MIB,
            "seed {seed}: {b:?}"
        );
        // The disk counters include resync I/O, as DRBD's dr/dw do: the
        // source read every chunk, the target wrote (or zeroed) them all.
        assert!(a.disk_read_bytes >= size, "seed {seed}: {a:?}");
        assert!(b.disk_written_bytes >= size, "seed {seed}: {b:?}");
    }
}

#[test]
fn a_capped_resync_moves_with_the_clock_at_the_rate() {
    const RATE: u64 = 4 * MIB;
    for seed in 0..3 {
        let mut c = SimCluster::with_rate(seed, 40 * MIB, Fencing::DontCare, RATE);
        promote(&mut c);
        c.heal();
        assert!(c.try_connect());
        c.settle();
        assert_eq!(c.core(0).replication(), ReplState::SyncSource);
        // Without time passing, the resync stalls after its first chunk.
        let first = sync(&c, 0).expect("syncing").done_bytes;
        assert!(
            first <= RATE / 10,
            "seed {seed}: {first} bytes with no time"
        );
        // 10 ms ticks, the schedule settled between ticks.
        let mut now = 0;
        let mut at = Vec::new();
        while c.core(1).disk() != DiskState::UpToDate {
            now += 10 * MS;
            assert!(now < 60 * SECOND, "seed {seed}: not done after 60 s");
            c.tick(now);
            c.settle();
            if let Some(s) = sync(&c, 0) {
                at.push((now, s));
            }
        }
        let done = |t: u64| at.iter().rfind(|(n, _)| *n <= t).unwrap().1.done_bytes;
        for start in [SECOND, 2 * SECOND + 330 * MS] {
            let got = done(start + 5 * SECOND) - done(start);
            let want = 5 * RATE;
            assert!(
                got.abs_diff(want) * 100 <= want * 3,
                "seed {seed}: {got} bytes in 5 s at {RATE} bytes/s"
            );
        }
        // The status shows the measured rate and a consistent ETA.
        let (_, s) = at.iter().rfind(|(n, _)| *n <= 6 * SECOND).unwrap();
        assert!(
            s.bytes_per_sec.abs_diff(RATE) * 100 <= RATE * 3,
            "seed {seed}: {s:?}"
        );
        let eta = s.eta_sec.expect("an ETA once the rate is known");
        let want = (s.total_bytes - s.done_bytes) / RATE;
        assert!(eta.abs_diff(want) <= 1, "seed {seed}: {s:?}");
        // The whole data area took about size / rate.
        let size = c.data(0).len() as u64;
        let secs = now as f64 / SECOND as f64;
        let ideal = size as f64 / RATE as f64;
        assert!(
            (secs - ideal).abs() <= ideal * 0.05 + 0.2,
            "seed {seed}: {secs} s for {size} bytes at {RATE}/s"
        );
        assert!(c.data(0) == c.data(1), "seed {seed}");
    }
}

/// `repctl adjust` mid-resync: the new cap holds from the next tick, up
/// and down, and the answer says what changed.
#[test]
fn adjusting_the_rate_mid_resync_takes_effect_at_once() {
    let mut c = SimCluster::with_rate(7, 40 * MIB, Fencing::DontCare, 2 * MIB);
    promote(&mut c);
    c.heal();
    assert!(c.try_connect());
    c.settle();
    assert_eq!(c.core(0).replication(), ReplState::SyncSource);
    let mut now = 0;
    let mut run = |c: &mut SimCluster, secs: u64| {
        let d0 = sync(c, 0).expect("syncing").done_bytes;
        for _ in 0..secs * 100 {
            now += 10 * MS;
            c.tick(now);
            c.settle();
        }
        (sync(c, 0).expect("still syncing").done_bytes - d0) / secs
    };
    let adjust = |c: &mut SimCluster, rate: u64| {
        let k = c.command(
            0,
            Command::Adjust {
                resync_rate: rate,
                max_buffers: 64,
            },
        );
        c.settle();
        match c.answer(k) {
            Some(Answer::Command(Ok(m))) => m.clone(),
            other => panic!("adjust: {other:?}"),
        }
    };
    run(&mut c, 1);
    for (rate, was) in [(8 * MIB, 2 * MIB), (MIB, 8 * MIB)] {
        let m = adjust(&mut c, rate);
        assert_eq!(m, format!("sync rate {rate} bytes/s (was {was} bytes/s)"));
        run(&mut c, 1); // the burst of the old cap drains
        let got = run(&mut c, 2);
        assert!(
            got.abs_diff(rate) * 100 <= rate * 5,
            "{got} bytes/s with the cap adjusted to {rate}"
        );
    }
    assert_eq!(
        adjust(&mut c, MIB),
        "nothing to change: sync rate and max-buffers are as configured"
    );
    assert!(adjust(&mut c, 0).starts_with("sync rate unlimited"));
    c.settle();
    assert_eq!(c.core(1).disk(), DiskState::UpToDate);
    assert!(c.data(0) == c.data(1));
}

/// With `max-buffers = 1`, the one buffer can be taken by another request
/// (a replicated flush) just when the resync is ready to start:
/// the resync starts when that request is answered, it does not wait for
/// a later event that may never come.
#[test]
fn a_resync_starts_once_a_busy_single_buffer_frees_up() {
    for seed in 0..40 {
        let mut c = SimCluster::new(seed, 8 * MIB, Fencing::DontCare);
        for i in 0..2 {
            let a = c.command(
                i,
                Command::Adjust {
                    resync_rate: 0,
                    max_buffers: 1,
                },
            );
            c.settle();
            assert!(matches!(c.answer(a), Some(Answer::Command(Ok(_)))));
        }
        promote(&mut c);
        c.heal();
        assert!(c.try_connect());
        // Client flushes (nothing else) while the handshake and the
        // resync get going: one of them may hold the buffer when the
        // resync is ready.
        for _ in 0..3 {
            c.client(0, tandem_replicator::core::ClientOp::Flush);
            for _ in 0..(seed % 5) {
                c.step();
            }
        }
        c.settle();
        assert_eq!(
            c.core(1).disk(),
            DiskState::UpToDate,
            "seed {seed}: {:?} / {:?}",
            c.core(0).replication(),
            c.core(1).replication()
        );
        assert!(c.data(0) == c.data(1), "seed {seed}");
    }
}
