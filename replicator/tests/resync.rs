//! The resync engine through the deterministic simulation: zero ranges
//! instead of data for chunks that read as zeros.

use tandem_replicator::config::Fencing;
use tandem_replicator::core::Command;
use tandem_replicator::core::states::{DiskState, ReplState};
use tandem_replicator::sim::{Answer, SimCluster};
use tandem_replicator::status::{Counters, EngineStatus};

const MIB: u64 = 1 << 20;

fn counters(c: &SimCluster, i: usize) -> Counters {
    c.core(i).status(EngineStatus::idle("sim")).counters
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
    }
}
