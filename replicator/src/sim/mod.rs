//! Deterministic simulation of a two-node resource.
//!
//! Two real cores ([`crate::core::Node`]) run against simulated disks
//! ([`disk::SimDisk`], with a volatile cache that a crash partly loses), a
//! simulated link (two FIFO queues that can be cut), and a seeded
//! scheduler that decides which storage operation completes next and which
//! message is delivered next. Everything the cores do is a consequence of
//! the seed, so any failing schedule replays exactly from its seed.
//!
//! The harness is used by unit tests of the replication rules and by the
//! randomised safety simulation (`tests/simulation.rs`).

pub mod disk;

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tandem_proto::peer::Message;

use crate::config::{Fencing, OnIoError};
use crate::core::bitmap::Bitmap;
use crate::core::fencing::Handler;
use crate::core::rng::SplitMix64;
use crate::core::{
    ClientOp, Command, CommandError, Device, IoResult, LinkCommand, Node, NodeParams, Output,
};
use crate::metadata::activity_log::AlTransaction;
use crate::metadata::layout::AL_RING_BLOCKS;
use crate::metadata::{Generations, Layout, MdFlags, Superblock};
use crate::storage::Op;
use disk::SimDisk;

pub const NAMES: [&str; 2] = ["alpha", "beta"];

/// One simulated node: its disk survives crashes, its core does not.
pub struct SimNode {
    pub name: &'static str,
    pub core: Option<Node<u64>>,
    pub disk: SimDisk,
    /// Storage ops submitted and not completed: (op id, op).
    pub pending: Vec<(u64, Op)>,
    /// The core wants a link.
    pub wants_link: bool,
    /// Handlers running: (id, which).
    pub handlers: Vec<(u64, Handler)>,
    /// Flushes submitted: op id → writes completed at submission (what
    /// the flush covers).
    pub flush_upto: HashMap<u64, u64>,
    pub params: NodeParams,
}

/// A client-visible result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Io(IoResult),
    Command(Result<String, CommandError>),
}

pub struct SimCluster {
    pub nodes: [SimNode; 2],
    /// Whether the link is up.
    pub link: bool,
    /// A partition: the link cannot come up while set.
    pub partitioned: bool,
    /// Messages in flight, per direction (index = sender).
    pub wire: [VecDeque<Message>; 2],
    pub rng: SplitMix64,
    pub answers: HashMap<u64, Answer>,
    next_token: u64,
    /// A trace of what happened, for failure reports.
    pub trace: Vec<String>,
    /// The peer-link protocol version links come up with (the newest by
    /// default; lower to play an older peer).
    pub link_version: u16,
    /// Messages delivered, by type code.
    pub delivered: HashMap<u16, u64>,
}

/// Fresh metadata on a zeroed disk, as `create-md` writes it.
pub fn format(disk: &mut SimDisk, node: &str) -> Superblock {
    let layout = Layout::internal(disk.size()).expect("sim disk large enough");
    let mut sb = Superblock {
        sequence: 0,
        layout,
        generations: Generations::just_created(),
        flags: MdFlags(MdFlags::AL_CLEAN),
        device_id: 7,
        resource: "r0".into(),
        node: node.into(),
    };
    disk.poke(layout.superblock_offset(0), &sb.encode());
    sb.sequence = 1;
    disk.poke(layout.superblock_offset(1), &sb.encode());
    sb
}

/// Read the metadata a node would find at start.
pub fn load(disk: &SimDisk) -> (Superblock, Bitmap, Option<AlTransaction>) {
    let layout = Layout::internal(disk.size()).expect("layout");
    let block = |off: u64| &disk.contents()[off as usize..off as usize + 4096];
    let sb = Superblock::choose(
        block(layout.superblock_offset(0)),
        block(layout.superblock_offset(1)),
    )
    .expect("valid superblock");
    let start = layout.bitmap_offset() as usize;
    let bm = Bitmap::from_bytes(
        layout.data_blocks(),
        &disk.contents()[start..start + layout.bitmap_size() as usize],
    );
    let slots = (0..AL_RING_BLOCKS).map(|i| block(layout.al_offset() + i * 4096));
    (sb, bm, AlTransaction::newest(slots))
}

impl SimCluster {
    /// Two nodes with fresh metadata on zeroed disks of `size` bytes, both
    /// running, link down.
    pub fn new(seed: u64, size: u64, fencing: Fencing) -> Self {
        Self::with_al(seed, size, fencing, 4)
    }

    /// Like [`new`](Self::new), with an activity log of `al_extents`.
    pub fn with_al(seed: u64, size: u64, fencing: Fencing, al_extents: usize) -> Self {
        Self::build(seed, size, fencing, al_extents, 0)
    }

    /// Like [`new`](Self::new), with a resync rate cap of `rate` bytes/s
    /// (the resync then advances only with [`tick`](Self::tick)).
    pub fn with_rate(seed: u64, size: u64, fencing: Fencing, rate: u64) -> Self {
        Self::build(seed, size, fencing, 4, rate)
    }

    fn build(seed: u64, size: u64, fencing: Fencing, al_extents: usize, rate: u64) -> Self {
        let mk = |i: usize| {
            let mut disk = SimDisk::new(size);
            format(&mut disk, NAMES[i]);
            let params = NodeParams {
                resource: "r0".into(),
                node: NAMES[i].into(),
                peer: Some(NAMES[1 - i].into()),
                fencing,
                on_io_error: OnIoError::Detach,
                max_buffers: 64,
                al_extents,
                seed: seed.wrapping_mul(31).wrapping_add(i as u64),
                resync_rate: rate,
                verify_alg: crate::config::VerifyAlg::Crc32,
            };
            SimNode {
                name: NAMES[i],
                core: None,
                disk,
                pending: Vec::new(),
                wants_link: false,
                handlers: Vec::new(),
                flush_upto: HashMap::new(),
                params,
            }
        };
        let mut c = SimCluster {
            nodes: [mk(0), mk(1)],
            link: false,
            partitioned: false,
            wire: [VecDeque::new(), VecDeque::new()],
            rng: SplitMix64::new(seed),
            answers: HashMap::new(),
            next_token: 1,
            trace: Vec::new(),
            link_version: tandem_proto::peer::PROTOCOL_MAX,
            delivered: HashMap::new(),
        };
        c.start(0);
        c.start(1);
        c
    }

    pub fn core(&self, i: usize) -> &Node<u64> {
        self.nodes[i].core.as_ref().expect("node is running")
    }

    /// Node `i`'s status, as `repctl status` would show it (the simulated
    /// engine reports idle).
    pub fn status(&self, i: usize) -> crate::status::Status {
        self.core(i)
            .status(crate::status::EngineStatus::idle("sim"))
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].core.is_some()
    }

    fn log(&mut self, s: String) {
        self.trace.push(s);
    }

    /// Start node `i` from what its disk holds.
    pub fn start(&mut self, i: usize) {
        assert!(self.nodes[i].core.is_none());
        let (sb, bm, al) = load(&self.nodes[i].disk);
        // Every start draws fresh randomness, as repd does from the OS.
        self.nodes[i].params.seed = self.rng.next_u64();
        let core = Node::new(self.nodes[i].params.clone(), sb, bm, al);
        self.nodes[i].core = Some(core);
        self.log(format!("start {}", NAMES[i]));
        self.drain(i);
    }

    /// The operator replaces node `i`'s data: it stops, gets fresh metadata
    /// (`repctl create-md --force`) and starts again, so the next handshake
    /// makes it a full sync target.
    pub fn recreate_md(&mut self, i: usize) {
        if self.running(i) {
            self.crash(i);
        }
        self.log(format!("create-md --force on {}", NAMES[i]));
        format(&mut self.nodes[i].disk, NAMES[i]);
        self.start(i);
    }

    /// Power loss of node `i`: its core and in-flight I/O vanish, its disk
    /// keeps what a real disk might.
    pub fn crash(&mut self, i: usize) {
        self.log(format!("crash {}", NAMES[i]));
        self.nodes[i].core = None;
        self.nodes[i].pending.clear();
        self.nodes[i].handlers.clear();
        self.nodes[i].flush_upto.clear();
        self.nodes[i].wants_link = false;
        let mut rng = SplitMix64::new(self.rng.next_u64());
        self.nodes[i].disk.crash(&mut rng);
        self.link_down("peer crashed");
    }

    fn link_down(&mut self, reason: &str) {
        if !self.link {
            return;
        }
        self.link = false;
        self.wire = [VecDeque::new(), VecDeque::new()];
        self.log(format!("link down: {reason}"));
        for i in 0..2 {
            if let Some(core) = self.nodes[i].core.as_mut() {
                core.handle_link_down(reason);
                self.drain(i);
            }
        }
    }

    /// Cut the link and keep it down until [`heal`].
    pub fn partition(&mut self) {
        self.partitioned = true;
        self.link_down("partition");
    }

    pub fn heal(&mut self) {
        self.partitioned = false;
        self.log("heal".into());
    }

    /// Bring the link up if both nodes want it and nothing prevents it.
    pub fn try_connect(&mut self) -> bool {
        if self.link || self.partitioned || !self.running(0) || !self.running(1) {
            return false;
        }
        if !(self.nodes[0].wants_link && self.nodes[1].wants_link) {
            return false;
        }
        self.link = true;
        self.log("link up".into());
        for i in 0..2 {
            self.nodes[i]
                .core
                .as_mut()
                .expect("running")
                .handle_link_up(self.link_version);
        }
        self.drain(0);
        self.drain(1);
        true
    }

    /// Carry out node `i`'s outputs.
    pub fn drain(&mut self, i: usize) {
        loop {
            let Some(out) = self.nodes[i].core.as_mut().and_then(|c| c.poll_output()) else {
                return;
            };
            match out {
                Output::Submit {
                    id,
                    device: Device::Data | Device::Meta,
                    op,
                } => {
                    if matches!(op, Op::Flush) {
                        let upto = self.nodes[i].disk.completed_writes();
                        self.nodes[i].flush_upto.insert(id, upto);
                    }
                    self.nodes[i].pending.push((id, op))
                }
                Output::Reply { token, result } => {
                    self.answers.insert(token, Answer::Io(result));
                }
                Output::CommandDone { id, result } => {
                    self.answers.insert(id, Answer::Command(result));
                }
                Output::Send(msg) => {
                    if self.link {
                        self.wire[i].push_back(msg);
                    }
                }
                Output::Link(LinkCommand::Connect) => self.nodes[i].wants_link = true,
                Output::Link(LinkCommand::StandAlone) => {
                    self.nodes[i].wants_link = false;
                    self.link_down_from(i, "stand-alone");
                }
                Output::Link(LinkCommand::Drop(reason)) => self.link_down_from(i, &reason),
                Output::StateChanged { .. } => {}
                Output::RunHandler { id, handler } => self.nodes[i].handlers.push((id, handler)),
            }
        }
    }

    /// Node `i` closed the link. A close is orderly: what `i` sent before
    /// closing still reaches the peer (TCP delivers data before the FIN);
    /// what the peer sent to `i` is not read any more.
    fn link_down_from(&mut self, i: usize, reason: &str) {
        if !self.link {
            return;
        }
        self.log(format!("{} closes the link: {reason}", NAMES[i]));
        let j = 1 - i;
        self.wire[j].clear();
        while let Some(msg) = self.wire[i].pop_front() {
            let Some(core) = self.nodes[j].core.as_mut() else {
                break;
            };
            core.handle_peer_message(msg);
            // The peer's answers go nowhere: drop them as they come.
            self.drain(j);
            self.wire[j].clear();
            if !self.link {
                return; // the peer closed too while reading
            }
        }
        self.link = false;
        self.wire = [VecDeque::new(), VecDeque::new()];
        if let Some(core) = self.nodes[j].core.as_mut() {
            core.handle_link_down(reason);
            self.drain(j);
        }
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Submit a client request to node `i`; returns its token.
    pub fn client(&mut self, i: usize, op: ClientOp) -> u64 {
        let t = self.token();
        self.log(format!("client {} {t}: {}", NAMES[i], describe(&op)));
        self.nodes[i]
            .core
            .as_mut()
            .expect("running")
            .handle_client(t, op);
        self.drain(i);
        t
    }

    pub fn write(&mut self, i: usize, offset: u64, data: &[u8], fua: bool) -> u64 {
        self.client(
            i,
            ClientOp::Write {
                offset,
                data: Bytes::copy_from_slice(data),
                fua,
            },
        )
    }

    /// Submit an administrator command to node `i`; returns its id.
    pub fn command(&mut self, i: usize, cmd: Command) -> u64 {
        let t = self.token();
        self.log(format!("command {} {t}: {cmd:?}", NAMES[i]));
        self.nodes[i]
            .core
            .as_mut()
            .expect("running")
            .handle_command(t, cmd);
        self.drain(i);
        t
    }

    /// The clock reads `now` (nanoseconds) on every running node.
    pub fn tick(&mut self, now: u64) {
        for i in 0..2 {
            if let Some(core) = self.nodes[i].core.as_mut() {
                core.handle_tick(now);
                self.drain(i);
            }
        }
    }

    /// Complete one random pending storage op of node `i`; false if none.
    pub fn complete_one(&mut self, i: usize) -> bool {
        if self.nodes[i].pending.is_empty() || self.nodes[i].core.is_none() {
            return false;
        }
        let k = (self.rng.next_u64() % self.nodes[i].pending.len() as u64) as usize;
        let (id, op) = self.nodes[i].pending.swap_remove(k);
        let result = match self.nodes[i].flush_upto.remove(&id) {
            Some(upto) => {
                self.nodes[i].disk.flush_upto(upto);
                Ok(crate::storage::Done::Ok)
            }
            None => self.nodes[i].disk.apply(&op),
        };
        self.nodes[i]
            .core
            .as_mut()
            .expect("running")
            .handle_io_done(id, result);
        self.drain(i);
        true
    }

    /// Deliver the next message from node `i` to its peer; false if none.
    pub fn deliver_one(&mut self, i: usize) -> bool {
        if !self.link {
            return false;
        }
        let Some(msg) = self.wire[i].pop_front() else {
            return false;
        };
        let j = 1 - i;
        *self.delivered.entry(msg.code()).or_default() += 1;
        if std::env::var_os("TANDEM_SIM_MESSAGES").is_some() {
            let mut text = format!("{msg:?}");
            text.truncate(120);
            self.log(format!("deliver {} -> {}: {text}", NAMES[i], NAMES[j]));
        }
        self.nodes[j]
            .core
            .as_mut()
            .expect("running")
            .handle_peer_message(msg);
        self.drain(j);
        true
    }

    /// Finish node `i`'s oldest running handler. Fencing is modelled as a
    /// cluster manager does it: a peer the cluster runs as Primary cannot
    /// be fenced (exit 6: outdate yourself); a down peer, or a Secondary
    /// powered off by STONITH, is reported fenced (exit 7) and its data is
    /// recorded as outdated where it will see it when it comes back (a
    /// Pacemaker constraint, `drbdadm outdate`); or the handler fails
    /// (exit 1). It never claims what is not true.
    pub fn finish_handler(&mut self, i: usize) -> bool {
        if self.nodes[i].handlers.is_empty() || self.nodes[i].core.is_none() {
            return false;
        }
        let (id, handler) = self.nodes[i].handlers.remove(0);
        let code = match handler {
            Handler::SplitBrain => 0,
            Handler::FencePeer => {
                let j = 1 - i;
                if self.running(j) && self.core(j).role() == crate::core::states::Role::Primary {
                    6
                } else if !self.running(j) {
                    self.outdate(j);
                    7
                } else if self.rng.next_u64().is_multiple_of(2) {
                    self.log(format!("{} fences {} (STONITH)", NAMES[i], NAMES[j]));
                    self.crash(j);
                    self.outdate(j);
                    7
                } else {
                    1
                }
            }
        };
        self.log(format!("{} handler {handler:?} exits {code}", NAMES[i]));
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.handle_handler_exit(id, Some(code));
            self.drain(i);
        }
        true
    }

    /// Mark node `j`'s (stopped) disk Outdated in its metadata, as the
    /// fencing side does out of band.
    pub fn outdate(&mut self, j: usize) {
        assert!(!self.running(j));
        let (mut sb, _, _) = load(&self.nodes[j].disk);
        if !sb.flags.has(MdFlags::WAS_UP_TO_DATE) {
            return;
        }
        sb.flags.set(MdFlags::WAS_UP_TO_DATE, false);
        sb.sequence += 1;
        let at = sb.layout.superblock_offset(sb.sequence % 2);
        self.nodes[j].disk.poke(at, &sb.encode());
        self.log(format!("{} is outdated by fencing", NAMES[j]));
    }

    /// One random step: complete an I/O, deliver a message, or finish a
    /// handler; with none of those left, bring the link up if it can come
    /// up. False when nothing is left to do.
    pub fn step(&mut self) -> bool {
        match self.random_step(true) {
            Some(progress) => progress,
            None => self.try_connect(),
        }
    }

    /// Like [`step`](Self::step), but never finishes a handler (nor brings
    /// the link up).
    pub fn step_except_handlers(&mut self) -> bool {
        self.random_step(false).unwrap_or(false)
    }

    /// Pick one pending I/O, message or (with `handlers`) handler at
    /// random and carry it out; `None` when there is none.
    fn random_step(&mut self, handlers: bool) -> Option<bool> {
        let mut choices = Vec::new();
        for i in 0..2 {
            if !self.nodes[i].pending.is_empty() {
                choices.push(i);
            }
            if self.link && !self.wire[i].is_empty() {
                choices.push(2 + i);
            }
            if handlers && !self.nodes[i].handlers.is_empty() {
                choices.push(4 + i);
            }
        }
        if choices.is_empty() {
            return None;
        }
        Some(
            match choices[(self.rng.next_u64() % choices.len() as u64) as usize] {
                c @ 0..=1 => self.complete_one(c),
                c @ 2..=3 => self.deliver_one(c - 2),
                c => self.finish_handler(c - 4),
            },
        )
    }

    /// Step until nothing is left to do (bounded).
    pub fn settle(&mut self) {
        for _ in 0..10_000_000 {
            if !self.step() {
                return;
            }
        }
        panic!("simulation did not settle");
    }

    pub fn answer(&self, token: u64) -> Option<&Answer> {
        self.answers.get(&token)
    }

    /// The data area of node `i`'s disk.
    pub fn data(&self, i: usize) -> &[u8] {
        let size = Layout::internal(self.nodes[i].disk.size())
            .expect("layout")
            .data_size as usize;
        &self.nodes[i].disk.contents()[..size]
    }
}

fn describe(op: &ClientOp) -> String {
    match op {
        ClientOp::Read { offset, len } => format!("read {offset}+{len}"),
        ClientOp::Write { offset, data, fua } => format!("write {offset}+{} fua={fua}", data.len()),
        ClientOp::Flush => "flush".into(),
        ClientOp::Trim { offset, len, .. } => format!("trim {offset}+{len}"),
        ClientOp::WriteZeroes { offset, len, .. } => format!("zero {offset}+{len}"),
    }
}
