//! Randomised safety simulation: two real cores, simulated disks that lose
//! unflushed writes when a node crashes, a link that is cut and healed, and
//! random schedules of client writes and flushes, crashes and restarts,
//! promotions with and without fencing or `--force`, demotions, and
//! operator actions (`fence-confirm` on a powered-off peer, `connect
//! --discard-my-data`, online `verify` from either node, `adjust` of the
//! requests allowed in flight). After every action:
//!
//! 1. never two Primaries while connected;
//! 2. with `resource-and-stonith` and no rule broken by an operator
//!    (`--force`, `--discard-my-data`), every write answered and then
//!    flushed is on whichever node is Primary now (no failover loses it);
//! 3. divergence is detected: if both nodes hold answered writes the other
//!    lacks when the link comes up, the link never ends in a resync;
//! 4. an online verify, from either node, which the operator waited for,
//!    reports no difference (connected UpToDate disks hold the same data,
//!    and verify is exact under client writes);
//!
//! and at the end, after healing, restarting and resolving, both nodes are
//! connected with identical data areas.
//!
//! `TANDEM_SIM_SCHEDULES` sets the number of schedules (default 2000),
//! `TANDEM_SIM_BASE` the first seed, `TANDEM_SIM_ACTIONS` the actions per
//! schedule (120); `TANDEM_SIM_SEED` replays one. Every failure prints its
//! seed. Debugging a replay: `TANDEM_SIM_TRACE[=lines]` prints the logs and
//! the schedule's last actions (with `TANDEM_SIM_MESSAGES=1`, every message
//! delivered too), `TANDEM_SIM_WATCH=<block>` follows one
//! block on both nodes, `TANDEM_SIM_DUMP=<node>` prints a node's core state
//! after every step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_replicator::config::Fencing;
use tandem_replicator::core::states::{ConnState, DiskState, ReplState, Role};
use tandem_replicator::core::{ClientOp, Command};
use tandem_replicator::sim::{Answer, SimCluster};

const SIZE: u64 = 6 << 20;

/// Mid-schedule online verifies that completed, over all schedules run.
static VERIFIES_COMPLETED: AtomicU64 = AtomicU64::new(0);
const BLOCK: u64 = 4096;

/// xorshift for choosing actions (the cluster has its own generator).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the schedule did that the invariants need.
#[derive(Default)]
struct Model {
    next_id: u64,
    /// Client write tokens: (node, id, first block, blocks).
    writes: HashMap<u64, (usize, u64, u64, u64)>,
    /// Client flush tokens: (node, ids of writes answered before it).
    flushes: HashMap<u64, (usize, Vec<u64>)>,
    /// Answered writes per node, in answer order: (id, first block, blocks).
    answered: [Vec<(u64, u64, u64)>; 2],
    /// Writes whose answer has been seen.
    seen: HashMap<u64, bool>,
    /// Block → newest id that was answered and then flushed.
    committed: HashMap<u64, u64>,
    /// Answered writes the other node did not have when answered.
    alone: [Vec<(u64, u64, u64)>; 2],
    /// An operator broke a rule: the durability check no longer applies.
    rules_broken: bool,
    /// An operator asked to discard a node's data.
    discarded: bool,
    /// The current link came up over diverged data.
    expect_split: bool,
    /// Writes covered by an answered flush on the node that answered them.
    flushed: std::collections::HashSet<u64>,
}

fn block_id(c: &SimCluster, node: usize, block: u64) -> u64 {
    let d = c.data(node);
    let at = (block * BLOCK) as usize;
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

fn holds(c: &SimCluster, node: usize, id: u64, first: u64, blocks: u64) -> bool {
    (first..first + blocks).any(|b| block_id(c, node, b) == id)
}

fn primary(c: &SimCluster) -> Option<usize> {
    (0..2).find(|&i| {
        c.running(i) && c.core(i).role() == Role::Primary && c.core(i).disk() == DiskState::UpToDate
    })
}

/// Absorb new answers into the model.
fn observe(c: &SimCluster, m: &mut Model) {
    for i in 0..2 {
        if !c.running(i) {
            // Crashed (or powered off by fencing): see the crash action.
            // Writes it answered but never flushed may be lost in the
            // crash, and resyncing over them is such a loss: they no
            // longer count as divergence.
            m.answered[i].clear();
            let flushed = &m.flushed;
            m.alone[i].retain(|w| flushed.contains(&w.0));
        }
    }
    let tokens: Vec<u64> = m
        .writes
        .keys()
        .copied()
        .filter(|t| !m.seen.contains_key(t))
        .collect();
    for t in tokens {
        if let Some(Answer::Io(r)) = c.answer(t) {
            m.seen.insert(t, true);
            if env("TANDEM_SIM_WATCH").is_some() {
                eprintln!(
                    "    answered write token {t} id {} -> {r:?} after {:?}",
                    m.writes[&t].1,
                    c.trace.last()
                );
            }
            if r.is_ok() {
                let (node, id, first, blocks) = m.writes[&t];
                m.answered[node].push((id, first, blocks));
                let peer = 1 - node;
                if !(c.running(peer) && (first..first + blocks).all(|b| block_id(c, peer, b) == id))
                {
                    m.alone[node].push((id, first, blocks));
                }
            }
        }
    }
    let flushes: Vec<u64> = m
        .flushes
        .keys()
        .copied()
        .filter(|t| !m.seen.contains_key(t))
        .collect();
    for t in flushes {
        if let Some(Answer::Io(r)) = c.answer(t) {
            m.seen.insert(t, true);
            if env("TANDEM_SIM_WATCH").is_some() {
                eprintln!(
                    "    answered flush token {t} covering {:?} -> {r:?}",
                    m.flushes[&t].1
                );
            }
            if r.is_ok() {
                m.flushed.extend(m.flushes[&t].1.iter().copied());
                for &id in &m.flushes[&t].1 {
                    if let Some(&(_, _, first, blocks)) = m.writes.values().find(|w| w.1 == id) {
                        for b in first..first + blocks {
                            let e = m.committed.entry(b).or_insert(0);
                            *e = (*e).max(id);
                        }
                    }
                }
            }
        }
    }
}

/// Check the invariants after an action.
fn check(c: &SimCluster, m: &mut Model, fencing: Fencing) -> Result<(), String> {
    observe(c, m);
    // A write that reached the peer (by replication or resync) is no
    // longer a sign of divergence.
    for i in 0..2 {
        if c.running(1 - i) {
            m.alone[i].retain(|&(id, f, n)| !holds(c, 1 - i, id, f, n));
        }
    }
    if let Some(b) = env("TANDEM_SIM_WATCH") {
        let ids: Vec<String> = (0..2)
            .map(|i| {
                if c.running(i) {
                    format!("{}", block_id(c, i, b))
                } else {
                    "-".into()
                }
            })
            .collect();
        eprintln!("    watch block {b}: {ids:?} after {:?}", c.trace.last());
    }
    let connected =
        c.link && (0..2).all(|i| c.running(i) && c.core(i).connection() == ConnState::Connected);
    if connected && (0..2).all(|i| c.core(i).role() == Role::Primary) {
        return Err("two Primaries while connected".into());
    }
    if fencing == Fencing::ResourceAndStonith && !m.rules_broken {
        for i in 0..2 {
            if !c.running(i) || c.core(i).role() != Role::Primary || c.status(i).io_suspended {
                continue;
            }
            for (&b, &id) in &m.committed {
                let have = block_id(c, i, b);
                if have < id {
                    return Err(format!(
                        "Primary {} lost flushed write {id} on block {b} (has {have})",
                        ["alpha", "beta"][i]
                    ));
                }
            }
        }
    }
    if c.link && m.expect_split && !m.discarded {
        for i in 0..2 {
            if c.running(i)
                && matches!(
                    c.core(i).replication(),
                    ReplState::SyncSource | ReplState::SyncTarget
                )
            {
                return Err(
                    "diverged data was resynced over instead of being reported as split-brain"
                        .into(),
                );
            }
        }
    }
    if !c.link {
        m.expect_split = false;
    }
    Ok(())
}

/// Both nodes hold answered writes the other lacks: true divergence.
fn diverged(c: &SimCluster, m: &Model) -> bool {
    let only_on = |i: usize, id: u64, first: u64, blocks: u64| {
        (first..first + blocks).any(|b| block_id(c, i, b) == id && block_id(c, 1 - i, b) != id)
    };
    (0..2).all(|i| c.running(i))
        && (0..2).all(|i| m.alone[i].iter().any(|&(id, f, n)| only_on(i, id, f, n)))
}

/// Step the cluster, noting when the link comes up over diverged data.
fn steps(c: &mut SimCluster, m: &mut Model, n: u64, fencing: Fencing) -> Result<(), String> {
    for _ in 0..n {
        let was_up = c.link;
        let div = !was_up && diverged(c, m);
        if !c.step() {
            break;
        }
        if !was_up && c.link {
            m.expect_split = div;
        }
        if let Some(n) = env("TANDEM_SIM_DUMP").map(|n| n as usize)
            && c.running(n)
        {
            eprintln!("DUMP {:?} || {}", c.trace.last(), c.core(n).debug_state());
        }
        check(c, m, fencing)?;
    }
    Ok(())
}

fn write(c: &mut SimCluster, m: &mut Model, d: &mut Dice, node: usize) {
    m.next_id += 1;
    let id = m.next_id;
    let data_blocks = c.core(node).size() / BLOCK;
    let blocks = 1 + d.below(4);
    let first = d.below(data_blocks - blocks);
    let mut data = vec![(id % 251) as u8; (blocks * BLOCK) as usize];
    for b in 0..blocks as usize {
        data[b * BLOCK as usize..b * BLOCK as usize + 8].copy_from_slice(&id.to_le_bytes());
    }
    let t = c.write(node, first * BLOCK, &data, d.below(5) == 0);
    m.writes.insert(t, (node, id, first, blocks));
}

fn run(seed: u64, actions: u64) -> Result<(), String> {
    let mut trace = Vec::new();
    let r = run_traced(seed, actions, &mut trace);
    if r.is_err() && std::env::var_os("TANDEM_SIM_TRACE").is_some() {
        let n = std::env::var("TANDEM_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(80usize);
        for line in &trace[trace.len().saturating_sub(n)..] {
            eprintln!("  {line}");
        }
    }
    r
}

fn run_traced(seed: u64, actions: u64, trace: &mut Vec<String>) -> Result<(), String> {
    let mut c = start(seed);
    let r = schedule(&mut c, seed, actions);
    *trace = std::mem::take(&mut c.trace);
    r
}

fn start(seed: u64) -> SimCluster {
    let fencing = [
        Fencing::DontCare,
        Fencing::ResourceOnly,
        Fencing::ResourceAndStonith,
    ][(seed % 3) as usize];
    SimCluster::with_al(seed, SIZE, fencing, 1)
}

fn schedule(c: &mut SimCluster, seed: u64, actions: u64) -> Result<(), String> {
    let c = &mut *c;
    let fencing = [
        Fencing::DontCare,
        Fencing::ResourceOnly,
        Fencing::ResourceAndStonith,
    ][(seed % 3) as usize];
    let mut d = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut m = Model::default();
    let mut verifies = Vec::new();
    c.command(0, Command::Primary { force: true });
    c.settle();
    check(c, &mut m, fencing)?;
    for _ in 0..actions {
        let roll = d.below(106);
        match roll {
            0..=34 => {
                if let Some(p) = primary(c) {
                    write(c, &mut m, &mut d, p);
                }
            }
            35..=44 => {
                if let Some(p) = primary(c) {
                    let before: Vec<u64> = m.answered[p].iter().map(|w| w.0).collect();
                    let t = c.client(p, ClientOp::Flush);
                    m.flushes.insert(t, (p, before));
                }
            }
            45..=74 => steps(c, &mut m, 1 + d.below(8), fencing)?,
            75..=79 => {
                if c.partitioned {
                    c.heal();
                } else {
                    c.partition();
                }
            }
            80..=83 => {
                let i = d.below(2) as usize;
                if c.running(i) {
                    c.crash(i);
                    // A flush after the restart covers only what is answered
                    // after it: unflushed writes may be lost in the crash.
                    m.answered[i].clear();
                }
            }
            84..=89 => {
                let i = d.below(2) as usize;
                if !c.running(i) {
                    c.start(i);
                }
            }
            90..=94 => {
                let i = d.below(2) as usize;
                if c.running(i) && c.core(i).role() == Role::Secondary {
                    let force = d.below(10) == 0;
                    if force {
                        m.rules_broken = true;
                    }
                    c.command(i, Command::Primary { force });
                }
            }
            95..=96 => {
                if let Some(p) = primary(c) {
                    c.command(p, Command::Secondary);
                }
            }
            97 => {
                // The operator confirms fencing only for a peer that is off.
                let i = d.below(2) as usize;
                if c.running(i) && !c.running(1 - i) {
                    c.command(i, Command::FenceConfirm);
                }
            }
            100..=102 => {
                // Online verify from either node, whatever state it is in
                // (refused unless connected to an UpToDate peer); it only
                // marks blocks out of sync, which a resync then copies in
                // the direction the generations decide.
                let i = d.below(2) as usize;
                if c.running(i) {
                    let was_primary = c.core(i).role() == Role::Primary;
                    let t = c.command(i, Command::Verify);
                    verifies.push(t);
                    // Half the time the operator waits for it (`repctl
                    // verify` does), so that verifies also run to the end
                    // while writes and flushes keep coming.
                    if d.below(2) == 0 {
                        for _ in 0..20_000 {
                            if c.answer(t).is_some() {
                                break;
                            }
                            if let Some(p) = primary(c)
                                && d.below(50) == 0
                            {
                                write(c, &mut m, &mut d, p);
                            }
                            if !c.step() {
                                break;
                            }
                            check(c, &mut m, fencing)?;
                        }
                        // Verify is exact under client writes, from either
                        // node (docs/durability.md, invariant 27), and two
                        // connected UpToDate disks hold the same data.
                        if let Some(Answer::Command(Ok(msg))) = c.answer(t)
                            && !msg.contains(": 0 blocks")
                        {
                            return Err(format!(
                                "an online verify run on the {} ({}) reported differences: {msg}",
                                if was_primary { "Primary" } else { "Secondary" },
                                ["alpha", "beta"][i]
                            ));
                        }
                    }
                }
            }
            103..=104 => {
                let i = d.below(2) as usize;
                if c.running(i) {
                    let max_buffers = [1, 2, 8, 64][d.below(4) as usize];
                    c.command(
                        i,
                        Command::Adjust {
                            resync_rate: 0,
                            max_buffers,
                        },
                    );
                }
            }
            _ => {
                // The operator resolves a split-brain by discarding a node.
                if let Some(i) = (0..2).find(|&i| c.running(i) && c.core(i).split_brain()) {
                    m.rules_broken = true;
                    m.discarded = true;
                    m.alone[i].clear();
                    c.command(
                        i,
                        Command::Connect {
                            discard_my_data: true,
                        },
                    );
                    if c.running(1 - i) {
                        c.command(
                            1 - i,
                            Command::Connect {
                                discard_my_data: false,
                            },
                        );
                    }
                }
            }
        }
        check(c, &mut m, fencing)?;
    }
    heal_all(c, &mut m, fencing)?;
    // Mid-schedule verifies that ran to the end (the rest were refused or
    // cut by a link loss or crash): the test asserts some did.
    let completed = verifies
        .iter()
        .filter(|&&t| matches!(c.answer(t), Some(Answer::Command(Ok(_)))))
        .count();
    VERIFIES_COMPLETED.fetch_add(completed as u64, Ordering::Relaxed);

    // Online verify agrees with a byte-for-byte comparison of the data
    // areas (and finds nothing when the resync did its job).
    let blocks = c.data(0).len() as u64 / BLOCK;
    let differing = (0..blocks)
        .filter(|&b| {
            let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
            c.data(0)[r.clone()] != c.data(1)[r]
        })
        .count() as u64;
    let v = c.command(0, Command::Verify);
    c.settle();
    if let Some(tandem_replicator::sim::Answer::Command(Ok(_))) = c.answer(v) {
        let found = c
            .status(0)
            .verify
            .map_or(u64::MAX, |v| v.out_of_sync_blocks);
        if found != differing {
            return Err(format!(
                "online verify found {found} differing blocks, the data areas differ in {differing}"
            ));
        }
    }
    if c.data(0) != c.data(1) {
        let blocks = c.data(0).len() as u64 / BLOCK;
        let differ: Vec<String> = (0..blocks)
            .filter(|&b| {
                let r = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
                c.data(0)[r.clone()] != c.data(1)[r]
            })
            .take(8)
            .map(|b| format!("block {b}: {} vs {}", block_id(c, 0, b), block_id(c, 1, b)))
            .collect();
        return Err(format!(
            "data areas differ after healing and resync: {differ:?}"
        ));
    }
    Ok(())
}

/// Heal, restart, resolve, and wait until both nodes are connected and in
/// sync.
fn heal_all(c: &mut SimCluster, m: &mut Model, fencing: Fencing) -> Result<(), String> {
    for round in 0..12 {
        c.heal();
        for i in 0..2 {
            if !c.running(i) {
                c.start(i);
            }
        }
        steps(c, m, 1_000_000, fencing)?;
        if !(c.running(0) && c.running(1)) {
            continue; // fencing powered one off again: restart it
        }
        let synced = (0..2).all(|i| {
            c.core(i).connection() == ConnState::Connected
                && c.core(i).replication() == ReplState::Established
        });
        if synced {
            return Ok(());
        }
        // The operator steps in for what only an operator may decide. A
        // Primary whose I/O stays frozen (its fence-peer never confirmed)
        // cannot be demoted with requests held: the operator confirms
        // fencing by hand (a lie here, since the peer runs: rules broken).
        for i in 0..2 {
            if c.core(i).role() == Role::Primary
                && c.status(i).io_suspended
                && c.core(i).connection() != ConnState::Connected
            {
                m.rules_broken = true;
                c.command(i, Command::FenceConfirm);
            }
        }
        for i in 0..2 {
            if c.core(i).connection() != ConnState::StandAlone {
                continue;
            }
            let discard =
                i == 1 && (c.core(0).split_brain() || c.core(1).split_brain() || round > 2);
            if discard {
                m.rules_broken = true;
                m.discarded = true;
                m.alone[1].clear();
            }
            c.command(
                i,
                Command::Connect {
                    discard_my_data: discard,
                },
            );
        }
        // Generations can drift apart until they share none (repeated
        // interrupted resyncs and promotions push the common ancestor out
        // of the two history slots, as in DRBD): the operator replaces
        // beta's data as the refusal says.
        if round > 1
            && (0..2).any(|i| {
                c.running(i)
                    && c.status(i)
                        .last_error
                        .is_some_and(|e| e.contains("unrelated data"))
            })
        {
            m.rules_broken = true;
            m.discarded = true;
            m.alone[1].clear();
            c.recreate_md(1);
        }
        // A Primary that must become sync target is demoted first, as the
        // refusal says (also one whose disk fencing outdated: exit 6).
        if round > 3
            && let Some(p) = (0..2).find(|&i| c.running(i) && c.core(i).role() == Role::Primary)
        {
            c.command(p, Command::Secondary);
        }
    }
    if std::env::var_os("TANDEM_SIM_TRACE").is_some() {
        for i in 0..2 {
            if c.running(i) {
                eprintln!("node {i}: {}", c.core(i).debug_state());
            }
        }
    }
    let states: Vec<String> = (0..2)
        .filter(|&i| c.running(i))
        .map(|i| {
            format!(
                "{:?}/{:?}/{:?}/{:?}",
                c.core(i).role(),
                c.core(i).disk(),
                c.core(i).connection(),
                c.core(i).replication()
            )
        })
        .collect();
    Err(format!(
        "the nodes did not end connected and in sync: {states:?}"
    ))
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_schedules_keep_every_safety_invariant() {
    let actions = env("TANDEM_SIM_ACTIONS").unwrap_or(120);
    if std::env::var_os("TANDEM_SIM_TRACE").is_some() {
        let r = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_target(false)
            .without_time()
            .try_init();
        eprintln!("tracing: {r:?}");
    }
    if let Some(seed) = env("TANDEM_SIM_SEED") {
        if let Err(e) = run(seed, actions) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let schedules = env("TANDEM_SIM_SCHEDULES").unwrap_or(2000);
    let base = env("TANDEM_SIM_BASE").unwrap_or(0);
    let mut failures = Vec::new();
    for seed in base..base + schedules {
        let started = std::time::Instant::now();
        let result = run(seed, actions);
        // A schedule normally takes milliseconds; a slow one is worth a
        // look (a livelock makes `heal_all` run out its step budget).
        if started.elapsed() > std::time::Duration::from_secs(5) {
            eprintln!("seed {seed} took {:?}", started.elapsed());
        }
        if let Err(e) = result {
            failures.push(format!("seed {seed}: {e}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing schedule(s); replay one with TANDEM_SIM_SEED=<seed>:\n{}",
        failures.len(),
        failures.join("\n")
    );
    let verifies = VERIFIES_COMPLETED.load(Ordering::Relaxed);
    eprintln!("{schedules} schedules; {verifies} online verifies ran to completion mid-schedule");
    assert!(
        schedules < 100 || verifies > schedules / 20,
        "only {verifies} mid-schedule verifies completed in {schedules} schedules: the schedules no longer exercise verify"
    );
}
