//! The node: its state, its inputs and outputs, and the administrator
//! commands. The other modules of `core` add `impl` blocks for one concern
//! each: `meta` (what must be durable before what), `io` (client requests
//! and the peer's replicated writes), `link` (the connection, the
//! generation handshake, starting and finishing a resync), `resync` (the
//! sync source's copy loop).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::peer::Message;
use tracing::{info, warn};

use super::activity::ActivityLog;
use super::bitmap::Bitmap;
use super::epochs::TransferLog;
use super::fencing::{FenceFor, Handler};
use super::generations::Direction;
use super::pace::{Nanos, RateMeter, SECOND, TokenBucket};
use super::ranges::ActiveRanges;
use super::resync::ResyncSource;
use super::rng::SplitMix64;
use super::states::{ConnState, DiskState, ReplState, Role};
use crate::config::{Fencing, OnIoError, VerifyAlg};
use crate::metadata::activity_log::AlTransaction;
use crate::metadata::{BLOCK_SIZE, MdFlags, Superblock};
use crate::status::{
    Counters, EngineStatus, GenerationStatus, PeerStatus, Status, SyncProgress, VerifyStatus,
};
use crate::storage::Op;

/// Fixed facts about this node, from the configuration.
#[derive(Debug, Clone)]
pub struct NodeParams {
    pub resource: String,
    pub node: String,
    /// The peer's node name; `None` for a single-node resource.
    pub peer: Option<String>,
    pub fencing: Fencing,
    pub on_io_error: OnIoError,
    /// Requests in flight toward the peer (`[net] max-buffers`).
    pub max_buffers: u32,
    /// Extents in the activity log.
    pub al_extents: usize,
    /// Seed for generation identifiers.
    pub seed: u64,
    /// Resync rate cap in bytes/s (`[sync] rate`); 0 is unlimited. A
    /// capped resync needs [`Node::handle_tick`] to advance.
    pub resync_rate: u64,
    /// Block checksum for online verify and checksum-based resync
    /// (`[sync] verify-alg`).
    pub verify_alg: VerifyAlg,
}

/// A client request, already validated against the export's size by the
/// NBD layer (the core checks again).
#[derive(Debug, Clone)]
pub enum ClientOp {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fast: bool,
        fua: bool,
    },
}

/// The answer to a client request: data for reads.
pub type IoResult = Result<Option<Bytes>, ErrorCode>;

/// Administrator commands the core decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Primary {
        force: bool,
    },
    Secondary,
    /// Clean stop: demote, record a clean shutdown. The driver has already
    /// stopped the NBD server.
    Down,
    Connect {
        discard_my_data: bool,
    },
    Disconnect,
    Invalidate,
    NewCurrentUuid {
        clear_bitmap: bool,
    },
    /// The operator states that the (disconnected) peer is powered off.
    FenceConfirm,
    /// Online verify against the peer (this node is VerifySource).
    Verify,
    /// Apply new values of the settings that can change while running
    /// (`repctl adjust`): `[sync] rate` and `[net] max-buffers`.
    Adjust {
        resync_rate: u64,
        max_buffers: u32,
    },
}

/// Why a command failed. `refused` marks a safety rule (exit status 3); the
/// message then starts with `refused:` and names the rule and the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub refused: bool,
    pub message: String,
}

impl CommandError {
    pub(super) fn refused(message: impl Into<String>) -> Self {
        CommandError {
            refused: true,
            message: format!("refused: {}", message.into()),
        }
    }

    pub(super) fn failed(message: impl Into<String>) -> Self {
        CommandError {
            refused: false,
            message: message.into(),
        }
    }
}

/// Why an NBD client may not attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdRefusal {
    NotServing(String),
    ShuttingDown,
}

/// Which device a storage op is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Data,
    Meta,
}

/// What the link driver should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCommand {
    /// Keep a link to the peer up: accept and dial.
    Connect,
    /// No link: close any, stop dialing and accepting.
    StandAlone,
    /// Close the current link (protocol error, refusal); keep connecting.
    Drop(String),
}

/// What the driver must do, in the order given.
#[derive(Debug)]
pub enum Output<T> {
    /// Submit a storage op; report with [`Node::handle_io_done`]. Writes to
    /// the metadata device are always FUA.
    Submit { id: u64, device: Device, op: Op },
    /// Answer a client request.
    Reply { token: T, result: IoResult },
    /// Answer an administrator command.
    CommandDone {
        id: u64,
        result: Result<String, CommandError>,
    },
    /// Send a message to the peer (in order).
    Send(Message),
    /// Change what the link driver does.
    Link(LinkCommand),
    /// The user-visible state changed; publish an event.
    StateChanged { event: &'static str },
    /// Run a configured handler; report its exit with
    /// [`Node::handle_handler_exit`].
    RunHandler { id: u64, handler: Handler },
}

/// Why a storage op was submitted.
#[derive(Debug)]
pub(super) enum Purpose<T> {
    Read {
        token: T,
    },
    /// The local half of client write `w`.
    Write {
        w: u64,
    },
    Flush {
        f: u64,
    },
    /// Applying the peer's replicated write (we are Secondary).
    Apply {
        peer_id: u64,
        start: u64,
        end: u64,
    },
    ApplyFlush {
        peer_id: u64,
    },
    /// Reading resync chunk `owner`, bytes `[start, end)`, as sync source.
    ResyncRead {
        owner: u64,
        start: u64,
        end: u64,
    },
    /// Writing resync data as sync target.
    ResyncWrite {
        start: u64,
        end: u64,
    },
    /// Sync target's flush before it declares itself UpToDate; it covers
    /// the resync writes before sequence `upto`.
    TargetFlush {
        upto: u64,
    },
    /// Sync target's periodic flush; then the marks of the resync writes
    /// before sequence `upto` may go.
    TargetCheckpoint {
        upto: u64,
    },
    Superblock {
        seq: u64,
    },
    BitmapPage {
        page: usize,
        version: u64,
    },
    /// The flush before an activity-log transaction that evicts extents.
    AlFlush,
    AlWrite {
        number: u64,
    },
    /// The local flush before a clean stop or demotion retires the log.
    RetireFlush,
    /// Sync source: reading a checksum-resync chunk (`csum`).
    CsumRead {
        owner: u64,
        start: u64,
        end: u64,
    },
    /// Sync target: reading our side of a checksum-resync chunk.
    CsumCompare {
        start: u64,
        end: u64,
        alg: super::csum::Alg,
        sums: Bytes,
    },
    /// Verify source: reading a chunk (`verify`).
    VerifyRead {
        owner: u64,
        start: u64,
        end: u64,
    },
    /// Verify target: reading our side of a chunk.
    VerifyCompare {
        owner: u64,
        start: u64,
        end: u64,
    },
    /// Verify source: reading a chunk again for the target's recheck
    /// (`id` tells it from a read of an earlier verify).
    VerifyReread {
        id: u64,
        start: u64,
        end: u64,
    },
}

/// What a client write is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Its range overlaps a write in flight.
    Range,
    /// Admitted; waiting for the link handshake, buffers, or durable
    /// metadata before it can start.
    Blocked,
    /// Local and/or peer parts in flight.
    Running,
    /// Both parts done; waiting for out-of-sync marks to be durable.
    Finishing,
}

/// The peer half of a replicated write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PeerPart {
    /// Not replicated: the blocks are marked out of sync instead.
    None,
    Pending(u64),
    Acked,
    /// The peer failed it or the link went: the blocks must be marked.
    Lost,
}

#[derive(Debug)]
pub(super) struct Write<T> {
    pub token: T,
    pub start: u64,
    pub end: u64,
    /// The storage op for the local half.
    pub op: Op,
    /// The message for the peer half.
    pub msg: Message,
    pub stage: Stage,
    pub local: Option<Result<(), ErrorCode>>,
    pub peer: PeerPart,
}

#[derive(Debug)]
pub(super) struct Flush<T> {
    pub token: T,
    pub local: Option<Result<(), ErrorCode>>,
    /// Peer flush in flight, if any.
    pub peer: Option<u64>,
    pub started: bool,
}

/// Our requests the peer has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PeerReq {
    Write {
        w: u64,
    },
    /// A client flush, or (None) a barrier that bounds the transfer log.
    Flush {
        f: Option<u64>,
    },
    Promote {
        cmd: u64,
        force: bool,
    },
    /// The peer flush before an activity-log eviction.
    AlBarrier,
    /// The peer flush before a clean stop or demotion.
    Retire,
}

/// The connection handshake and replication phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Our state is sent; waiting for the peer's.
    AwaitState,
    /// A resync was decided; exchanging bitmaps.
    Bitmaps { dir: Direction, peer_done: bool },
    /// Making the merged bitmap (and the source's new bitmap generation)
    /// durable before the resync starts.
    Starting { dir: Direction },
    /// Source: waiting for the target to be Inconsistent (`ready`), then
    /// copying.
    SyncSource { ready: bool },
    /// Target: receiving the resync.
    SyncTarget,
    /// Replicating, no resync.
    Established,
}

/// What we know of the peer, from its last `State`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerInfo {
    pub role: Role,
    pub disk: DiskState,
    pub state: tandem_proto::peer::PeerState,
}

/// Everything that exists only while a link is up.
#[derive(Debug)]
pub(super) struct Link {
    pub peer: Option<PeerInfo>,
    pub phase: Phase,
    pub next_req: u64,
    pub reqs: HashMap<u64, PeerReq>,
    /// Resync chunks sent and not acknowledged, by byte offset.
    pub resync_sent: HashMap<u64, u64>,
    pub tl: TransferLog,
    pub resync: Option<ResyncSource>,
    /// Target: the source's new bitmap generation, once received.
    pub sync_uuid: Option<u64>,
    /// Target: the resync is complete on the source's side.
    pub resync_done: bool,
    /// We granted the peer a promotion and have not seen its new state.
    pub peer_promoting: bool,
    /// The marked-block count in the last state we sent: the handshake
    /// decides on what the peer saw.
    pub sent_dirty: u64,
    /// Checksum-based resync of activity-log regions.
    pub csum: super::csum::CsumLink,
    /// An online verify in progress.
    pub verify: Option<super::verify::VerifyRun>,
    /// The peer-link protocol version the link speaks (what the peer
    /// understands: `tandem_proto::peer::PROTOCOL_MAX` of the older side).
    pub version: u16,
}

impl Link {
    pub fn new(version: u16) -> Self {
        Link {
            version,
            peer: None,
            phase: Phase::AwaitState,
            next_req: 0,
            reqs: HashMap::new(),
            resync_sent: HashMap::new(),
            tl: TransferLog::default(),
            resync: None,
            sync_uuid: None,
            resync_done: false,
            peer_promoting: false,
            sent_dirty: 0,
            csum: Default::default(),
            verify: None,
        }
    }

    pub fn req(&mut self, r: PeerReq) -> u64 {
        let id = self.next_req;
        self.next_req += 1;
        self.reqs.insert(id, r);
        id
    }
}

/// Durability a continuation waits for.
#[derive(Debug, Clone)]
pub(super) enum Need {
    /// Superblock sequence `seq` durable.
    Md(u64),
    /// These bitmap pages durable at least at these versions.
    Pages(Vec<(usize, u64)>),
    /// Every bitmap page durable (and the superblock at `seq`).
    Everything(u64),
}

/// What runs once a [`Need`] is met.
#[derive(Debug)]
pub(super) enum Deferred {
    CommandOk {
        cmd: u64,
        message: &'static str,
    },
    BecomePrimary {
        cmd: u64,
        connected: bool,
    },
    /// Re-check blocked client writes and flushes.
    Resume,
    /// Answer write `w` (its out-of-sync marks are durable).
    FinishWrite {
        w: u64,
    },
    FinishFlush {
        f: u64,
    },
    /// Merged bitmap and generations durable: go on starting the resync.
    SyncStarting,
    /// Target: Inconsistent state durable; tell the source.
    TargetReady,
    /// Target: UpToDate state durable; tell the source.
    TargetFinished,
    /// Source: final generations durable.
    SourceFinished,
    /// State changed durably; tell the peer.
    SendState,
    /// The crashed Primary's activity-log regions are durably marked.
    AlApplied,
    /// Tell the peer we are stopping.
    Goodbye,
    /// Fencing confirmed for a pending promotion: go on with it.
    PromoteFenced {
        cmd: u64,
    },
    /// Every bitmap page is durable: the activity-log transaction that
    /// evicts extents may be written.
    AlWrite,
    /// Both retirement flushes done and every bitmap page durable: the log
    /// may be marked clean, then `then` runs.
    Retired {
        then: Vec<Deferred>,
    },
    /// The verify's marks are durable: answer `repctl verify`.
    VerifyAnswered {
        cmd: u64,
        result: Result<String, String>,
    },
}

pub struct Node<T> {
    pub(super) p: NodeParams,
    pub(super) role: Role,
    pub(super) disk: DiskState,
    pub(super) md: Superblock,
    pub(super) md_in_flight: Option<u64>,
    pub(super) md_durable: u64,
    pub(super) bitmap: Bitmap,
    pub(super) page_writes: HashMap<usize, u64>,
    pub(super) waits: Vec<(Need, Deferred)>,
    pub(super) ops: HashMap<u64, Purpose<T>>,
    pub(super) next_id: u64,
    pub(super) writes: HashMap<u64, Write<T>>,
    pub(super) flushes: HashMap<u64, Flush<T>>,
    /// Admitted writes (by id) not yet started, in arrival order.
    pub(super) blocked: VecDeque<u64>,
    /// Flushes not yet started, in arrival order.
    pub(super) blocked_flushes: VecDeque<u64>,
    /// A `Deferred::Resume` is already waiting.
    pub(super) resume_pending: bool,
    pub(super) ranges: ActiveRanges,
    /// What each range owner is: a client write, a resync chunk.
    pub(super) range_owner: HashMap<u64, RangeOwner>,
    pub(super) conn: ConnState,
    pub(super) link: Option<Link>,
    pub(super) split_brain: bool,
    pub(super) discard_my_data: bool,
    /// Why the last connection was refused, for status.
    pub(super) last_error: Option<String>,
    /// The generation rule that decided the last connection, for status.
    pub(super) last_rule: Option<String>,
    /// Superblock sequence that must be durable before writes the peer
    /// does not get (a generation rotation).
    pub(super) degraded_seq: u64,
    /// A promotion was decided (granted by the connected peer, or fencing
    /// confirmed) and waits for its superblock: the node is becoming
    /// Primary and refuses the peer's promotion (invariant 17).
    pub(super) promoting: bool,
    pub(super) nbd_clients: u32,
    pub(super) stopping: bool,
    pub(super) rng: SplitMix64,
    pub(super) counters: Counters,
    pub(super) outputs: VecDeque<Output<T>>,
    /// Blocks the running resync set out to copy, and has copied.
    pub(super) sync_total: u64,
    pub(super) sync_done: u64,
    /// Sync target: resync writes completed but not yet known durable, as
    /// (sequence, blocks); their marks are cleared after a flush.
    pub(super) pending_clears: VecDeque<(u64, (u64, u64))>,
    pub(super) next_clear_seq: u64,
    /// A checkpoint flush is in flight.
    pub(super) checkpointing: bool,
    pub(super) al: ActivityLog,
    /// The activity-log transaction waiting for its flushes, or in flight.
    pub(super) al_pending: Option<AlTransaction>,
    /// A retirement in progress: flushes outstanding on this node and the
    /// peer, and what runs once everything is flushed and recorded.
    pub(super) retiring: Option<Retiring>,
    /// Client I/O is suspended until fencing confirms (resource-and-stonith).
    pub(super) io_suspended: bool,
    /// Client requests that arrived while suspended, in order.
    pub(super) frozen: VecDeque<(T, ClientOp)>,
    /// Writes and flushes whose answers wait for the suspension to end.
    pub(super) held_writes: Vec<u64>,
    pub(super) held_flushes: Vec<u64>,
    /// fence-peer runs in progress.
    pub(super) fencing: Vec<(u64, FenceFor)>,
    /// The resync source's rate cap (credit comes from `handle_tick`).
    pub(super) pace: TokenBucket,
    /// Resync progress over time, for `bytes_per_sec` and `eta_sec`.
    pub(super) meter: RateMeter,
    /// When the next periodic progress event is due.
    pub(super) next_progress_event: Option<Nanos>,
    /// Checksum for verify and checksum resync.
    pub(super) verify_alg: super::csum::Alg,
    /// The last (or running) online verify, for status.
    pub(super) last_verify: Option<VerifyStatus>,
}

/// Flushing both nodes before the activity log is marked clean.
#[derive(Debug, Default)]
pub(super) struct Retiring {
    pub local: bool,
    pub peer: Option<u64>,
    pub then: Vec<Deferred>,
}

/// Who holds an active range.
#[derive(Debug, Clone, Copy)]
pub(super) enum RangeOwner {
    Write(u64),
    Resync {
        start: u64,
        end: u64,
    },
    /// An online-verify chunk (either side).
    Verify {
        start: u64,
        end: u64,
    },
}

/// Disk state codes on the wire (`PeerState::disk`).
pub(super) fn disk_code(d: DiskState) -> u8 {
    d as u8
}

pub(super) fn disk_from_code(c: u8) -> DiskState {
    DiskState::ALL
        .get(c as usize)
        .copied()
        .unwrap_or(DiskState::DUnknown)
}

impl<T> Node<T> {
    /// Attach a disk: its superblock, on-disk bitmap and newest activity-log
    /// transaction, read at start.
    pub fn new(
        params: NodeParams,
        md: Superblock,
        bitmap: Bitmap,
        al: Option<AlTransaction>,
    ) -> Self {
        let mut node = Node {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            md_durable: md.sequence,
            md,
            md_in_flight: None,
            bitmap,
            page_writes: HashMap::new(),
            waits: Vec::new(),
            ops: HashMap::new(),
            next_id: 0,
            writes: HashMap::new(),
            flushes: HashMap::new(),
            blocked: VecDeque::new(),
            blocked_flushes: VecDeque::new(),
            resume_pending: false,
            ranges: ActiveRanges::default(),
            range_owner: HashMap::new(),
            conn: ConnState::StandAlone,
            link: None,
            split_brain: false,
            discard_my_data: false,
            last_error: None,
            last_rule: None,
            degraded_seq: 0,
            promoting: false,

            nbd_clients: 0,
            stopping: false,
            rng: SplitMix64::new(params.seed),
            counters: Counters::default(),
            outputs: VecDeque::new(),
            sync_total: 0,
            sync_done: 0,
            pending_clears: VecDeque::new(),
            next_clear_seq: 0,
            checkpointing: false,
            al: ActivityLog::new(params.al_extents, al.as_ref()),
            al_pending: None,
            retiring: None,
            io_suspended: false,
            frozen: VecDeque::new(),
            held_writes: Vec::new(),
            held_flushes: Vec::new(),
            fencing: Vec::new(),
            pace: TokenBucket::new(params.resync_rate),
            meter: RateMeter::default(),
            next_progress_event: None,
            verify_alg: params.verify_alg.into(),
            last_verify: None,
            p: params,
        };
        node.disk = node.attach_disk_state();
        if node.md.flags.has(MdFlags::PRIMARY_IND) {
            // The node stopped while Primary without demoting: remember it,
            // the generation rules use it to pick the resync direction.
            warn!(
                "disk was Primary when {} last stopped: marking it as a crashed Primary",
                node.p.node
            );
            node.md.flags.set(MdFlags::PRIMARY_IND, false);
            node.md.flags.set(MdFlags::CRASHED_PRIMARY, true);
            node.persist();
        }
        if !node.md.flags.has(MdFlags::AL_CLEAN) && node.p.peer.is_some() {
            node.apply_al();
        }
        info!(
            "attached disk: {} (generation {:016x}, {} blocks out of sync)",
            node.disk,
            node.md.generations.current,
            node.bitmap.count()
        );
        if node.p.peer.is_some() {
            node.conn = ConnState::Connecting;
            node.outputs.push_back(Output::Link(LinkCommand::Connect));
        }
        node
    }

    /// The disk state at attach time, as DRBD decides it: not consistent →
    /// Inconsistent; consistent and was up to date → Consistent, else
    /// Outdated; Consistent becomes UpToDate only when the peer is known
    /// outdated, fencing is off, or there is no peer at all.
    fn attach_disk_state(&self) -> DiskState {
        let f = self.md.flags;
        if !f.has(MdFlags::CONSISTENT) {
            return DiskState::Inconsistent;
        }
        if !f.has(MdFlags::WAS_UP_TO_DATE) {
            return DiskState::Outdated;
        }
        if f.has(MdFlags::PEER_OUT_DATED)
            || self.p.fencing == Fencing::DontCare
            || self.p.peer.is_none()
        {
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        }
    }

    pub fn poll_output(&mut self) -> Option<Output<T>> {
        self.outputs.pop_front()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn size(&self) -> u64 {
        self.md.layout.data_size
    }

    pub fn superblock(&self) -> &Superblock {
        &self.md
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn nbd_clients(&self) -> u32 {
        self.nbd_clients
    }

    pub fn connection(&self) -> ConnState {
        self.conn
    }

    pub fn replication(&self) -> ReplState {
        match self.link.as_ref().map(|l| l.phase) {
            None | Some(Phase::AwaitState) => ReplState::Off,
            Some(Phase::Established) => match self.verify_running() {
                Some(true) => ReplState::VerifySource,
                Some(false) => ReplState::VerifyTarget,
                None => ReplState::Established,
            },
            Some(Phase::SyncSource { .. }) => ReplState::SyncSource,
            Some(Phase::SyncTarget) => ReplState::SyncTarget,
            Some(Phase::Bitmaps { dir, .. } | Phase::Starting { dir }) => match dir {
                Direction::Source => ReplState::SyncSource,
                Direction::Target => ReplState::SyncTarget,
            },
        }
    }

    /// The peer's role and disk as last reported, if connected.
    pub fn peer_state(&self) -> Option<(Role, DiskState)> {
        self.link.as_ref()?.peer.map(|p| (p.role, p.disk))
    }

    pub fn split_brain(&self) -> bool {
        self.split_brain
    }

    /// A one-line summary of internal state, for debugging stuck schedules.
    pub fn debug_state(&self) -> String {
        let link = self.link.as_ref().map(|l| {
            format!(
                "phase={:?} reqs={:?} resync={:?} sync_uuid={:?} resync_sent={} peer={:?}",
                l.phase,
                l.reqs,
                l.resync,
                l.sync_uuid,
                l.resync_sent.len(),
                l.peer.map(|p| (p.role, p.disk))
            )
        });
        format!(
            "flags={:?} role={:?} disk={:?} md_seq={} md_durable={} md_in_flight={:?} waits={:?} ops={} writes={} blocked={} ranges_owned={} dirty_pages={:?} page_writes={:?} al_pending={:?} al={:?} resume_pending={} retiring={:?} suspended={} link={link:?}",
            self.md.flags,
            self.role,
            self.disk,
            self.md.sequence,
            self.md_durable,
            self.md_in_flight,
            self.waits,
            self.ops.len(),
            self.writes.len(),
            self.blocked.len(),
            self.range_owner.len(),
            self.bitmap.dirty_pages().collect::<Vec<_>>(),
            self.page_writes,
            self.al_pending.as_ref().map(|t| t.number),
            self.al,
            self.resume_pending,
            self.retiring,
            self.io_suspended,
        )
    }

    pub(super) fn event(&mut self, event: &'static str) {
        self.outputs.push_back(Output::StateChanged { event });
    }

    pub(super) fn send(&mut self, msg: Message) {
        self.outputs.push_back(Output::Send(msg));
    }

    pub(super) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Submit a storage op for `purpose`.
    pub(super) fn submit(&mut self, device: Device, op: Op, purpose: Purpose<T>) {
        let id = self.next_id();
        self.ops.insert(id, purpose);
        self.outputs.push_back(Output::Submit { id, device, op });
    }

    pub(super) fn set_disk(&mut self, disk: DiskState) {
        if self.disk != disk {
            info!("disk state {} -> {}", self.disk, disk);
            self.disk = disk;
            self.event("disk");
        }
    }

    pub(super) fn command_done(&mut self, id: u64, result: Result<String, CommandError>) {
        self.outputs.push_back(Output::CommandDone { id, result });
    }

    // ----- commands -------------------------------------------------------

    pub fn handle_command(&mut self, id: u64, command: Command) {
        let result = match command {
            Command::Primary { force } => self.promote(id, force),
            Command::Secondary => self.demote(id),
            Command::Down => self.stop(id),
            Command::Connect { discard_my_data } => self.connect(id, discard_my_data),
            Command::Disconnect => self.disconnect(id),
            Command::Invalidate => self.invalidate(id),
            Command::NewCurrentUuid { clear_bitmap } => self.new_current_uuid(id, clear_bitmap),
            Command::FenceConfirm => self.fence_confirm(id),
            Command::Verify => self.verify(id),
            Command::Adjust {
                resync_rate,
                max_buffers,
            } => self.adjust(id, resync_rate, max_buffers),
        };
        if let Err(e) = result {
            self.command_done(id, Err(e));
        }
    }

    /// `repctl adjust`: the resync rate cap and the requests allowed in
    /// flight toward the peer take effect at once (a resync this node is
    /// the source of speeds up or slows down mid-run; the rate is paced by
    /// the source, so the SyncTarget's value matters only if the direction
    /// changes). The answer says what changed.
    fn adjust(&mut self, cmd: u64, resync_rate: u64, max_buffers: u32) -> Result<(), CommandError> {
        if max_buffers == 0 {
            return Err(CommandError::failed("max-buffers must be at least 1"));
        }
        let rate = |r: u64| {
            if r == 0 {
                "unlimited".to_string()
            } else {
                format!("{r} bytes/s")
            }
        };
        let mut changes = Vec::new();
        if self.pace.rate() != resync_rate {
            changes.push(format!(
                "sync rate {} (was {})",
                rate(resync_rate),
                rate(self.pace.rate())
            ));
            self.p.resync_rate = resync_rate;
            self.pace.set_rate(resync_rate);
        }
        if self.p.max_buffers != max_buffers {
            changes.push(format!(
                "max-buffers {max_buffers} (was {})",
                self.p.max_buffers
            ));
            self.p.max_buffers = max_buffers;
        }
        let message = if changes.is_empty() {
            "nothing to change: sync rate and max-buffers are as configured".to_string()
        } else {
            info!("adjusted: {}", changes.join(", "));
            changes.join(", ")
        };
        // More room may let blocked writes and resync chunks start.
        self.resume();
        self.pump();
        self.command_done(cmd, Ok(message));
        Ok(())
    }

    fn promote(&mut self, cmd: u64, force: bool) -> Result<(), CommandError> {
        if self.stopping {
            return Err(CommandError::failed("repd is stopping"));
        }
        if self.role == Role::Primary {
            self.command_done(cmd, Ok("already Primary".into()));
            return Ok(());
        }
        if let Some(link) = &self.link {
            // Rule 1: never two Primaries while connected. Whether the
            // peer is Primary is the peer's to say: it answers the
            // PromoteRequest below and refuses while it is Primary. Our
            // view of its role can be behind (its demotion may be on the
            // wire: `secondary` there, then `primary` here at once), so it
            // is not used to refuse; a promotion we granted the peer is
            // ours to know.
            if link.peer_promoting {
                return Err(CommandError::refused(format!(
                    "the connected peer {} is being promoted (two Primaries while connected are never allowed); \
                     demote it with `repctl secondary` there first",
                    self.p.peer.as_deref().unwrap_or("?")
                )));
            }
        }
        self.check_promotable(force)?;
        if self.link.is_none() && self.fencing_on() && !self.peer_known_outdated() {
            if force {
                warn!(
                    "primary --force on {} without fencing confirmation: if the peer is alive and writing, this is a split-brain",
                    self.p.node
                );
            } else {
                // Rule 2: a node that cannot see its peer becomes Primary only
                // once fencing confirmed the peer cannot write.
                info!(
                    "promotion while disconnected: asking fence-peer to confirm the peer is outdated or dead"
                );
                self.start_fencing(FenceFor::Promote { cmd });
                return Ok(());
            }
        }
        if let Some(link) = &mut self.link {
            // Ask the peer first: it grants only if it is not Primary and not
            // being promoted itself, so two promotions cannot both succeed.
            let req = link.req(PeerReq::Promote { cmd, force });
            self.send(Message::PromoteRequest { id: req });
            return Ok(());
        }
        self.do_promote(cmd, force, false);
        Ok(())
    }

    pub(super) fn check_promotable(&self, force: bool) -> Result<(), CommandError> {
        // A node the handshake chose as sync target is refused, forced or
        // not, from the bitmap exchange on: its data is about to be (or is
        // being) overwritten by the peer's, and a Primary cannot be a sync
        // target. It is still UpToDate until it takes the sync generation,
        // so the disk-state test below would let it through.
        let target = self.link.as_ref().is_some_and(|l| {
            matches!(
                l.phase,
                Phase::SyncTarget
                    | Phase::Bitmaps {
                        dir: Direction::Target,
                        ..
                    }
                    | Phase::Starting {
                        dir: Direction::Target
                    }
            )
        });
        if target {
            return Err(CommandError::refused(
                "this node is sync target of a resync from the peer: wait for it (`repctl wait-sync`), \
                 or `repctl disconnect` first",
            ));
        }
        match self.disk {
            DiskState::UpToDate => Ok(()),
            DiskState::Diskless | DiskState::Failed => Err(CommandError::failed(format!(
                "cannot become Primary: the disk is {}",
                self.disk
            ))),
            // Forcing stale data over a connected peer's good copy would
            // leave this node Primary over a resync in progress (as target).
            _ if force
                && self.link.as_ref().is_some_and(|l| {
                    l.phase == Phase::SyncTarget || l.peer.is_some_and(|p| p.disk > self.disk)
                }) =>
            {
                Err(CommandError::refused(format!(
                    "the disk is {} and the connected peer has better data: wait for the resync \
                     (`repctl wait-sync`), or `repctl disconnect` first to declare this node's data the good copy",
                    self.disk
                )))
            }
            _ if force => Ok(()),
            _ => Err(CommandError::refused(format!(
                "need UpToDate data to become Primary, but the disk is {}; \
                 `repctl primary --force` declares this node's data the good copy",
                self.disk
            ))),
        }
    }

    pub(super) fn do_promote(&mut self, cmd: u64, force: bool, connected: bool) {
        self.promoting = true;
        // As DRBD's `forced`: `--force` counts only where it overrides
        // something, i.e. the data was not UpToDate. A forced rotation on
        // an UpToDate sync source would leave `current_unshared` set after
        // the target took that generation at the end of the resync, and
        // the next loss of the peer would not rotate (simulation, seed
        // 8520 of 20000: divergence resynced over).
        let forced = force && self.disk != DiskState::UpToDate;
        if forced {
            warn!(
                "primary --force on {}: declaring {} data UpToDate; if the peer has newer data this causes split-brain",
                self.p.node, self.disk
            );
            self.md.flags.set(MdFlags::CONSISTENT, true);
            self.md.flags.set(MdFlags::WAS_UP_TO_DATE, true);
            self.set_disk(DiskState::UpToDate);
        }
        // The generation rotates when a disconnected node is promoted and
        // its current generation may be one the peer holds too, or when
        // --force declared data good that was not UpToDate. DRBD tests "bitmap generation unused" instead, but a
        // sync source sets its bitmap generation at resync start without
        // rotating, so a promotion after a link lost mid-resync would write
        // under the peer's own current generation and a later handshake
        // would resync over those writes (docs/durability.md). It is
        // durable before the role changes.
        if forced || (!connected && !self.md.flags.has(MdFlags::CURRENT_UNSHARED)) {
            self.new_current_generation();
        }
        self.md.flags.set(MdFlags::PRIMARY_IND, true);
        self.md.flags.set(MdFlags::CRASHED_PRIMARY, false);
        if self.al_enabled() {
            // From now on the log is live: a crash must apply it.
            self.md.flags.set(MdFlags::AL_CLEAN, false);
        }
        let seq = self.persist();
        self.wait(Need::Md(seq), Deferred::BecomePrimary { cmd, connected });
    }

    /// Bitmap generation ← current (or, when the bitmap generation is in
    /// use, history ← current), current ← new random value. The old current
    /// stays findable, so a peer still at it is recognised as behind.
    pub(super) fn new_current_generation(&mut self) {
        let g = &mut self.md.generations;
        if g.bitmap == 0 {
            g.bitmap = g.current;
        } else if g.current != g.bitmap && g.current != crate::metadata::UUID_JUST_CREATED {
            g.history = [g.current, g.history[0]];
        }
        g.current = self.rng.generation();
        // Persisted by the caller, with the generation.
        self.md.flags.set(MdFlags::CURRENT_UNSHARED, true);
        info!("new current generation {:016x}", g.current);
    }

    fn demote(&mut self, cmd: u64) -> Result<(), CommandError> {
        if self.role == Role::Secondary {
            self.command_done(cmd, Ok("already Secondary".into()));
            return Ok(());
        }
        // Demoting under an attached client would fail its I/O; the rule
        // is checked under the same lock that admits clients (nbd_attach),
        // so no client can slip in between.
        if self.nbd_clients > 0 {
            return Err(CommandError::refused(format!(
                "{} NBD client(s) attached; disconnect them (e.g. nbd-client -d, or stop the qemu/nbdfuse using the export) and retry",
                self.nbd_clients
            )));
        }
        // Requests in flight belong to a client that was attached a moment
        // ago; they finish as a Primary's.
        if !self.writes.is_empty() || !self.flushes.is_empty() || !self.frozen.is_empty() {
            return Err(CommandError::refused(
                "client requests are still in flight; retry when they are answered",
            ));
        }
        self.role = Role::Secondary;
        info!("{} is now Secondary", self.p.node);
        self.event("role");
        self.md.flags.set(MdFlags::PRIMARY_IND, false);
        // Both nodes flush what this Primary wrote before the log is
        // retired and the demotion answered.
        self.retire(Deferred::CommandOk {
            cmd,
            message: "now Secondary",
        });
        self.retire(Deferred::SendState);
        Ok(())
    }

    fn stop(&mut self, cmd: u64) -> Result<(), CommandError> {
        self.stopping = true;
        if self.role == Role::Primary {
            self.role = Role::Secondary;
            self.event("role");
        }
        self.md.flags.set(MdFlags::PRIMARY_IND, false);
        // Both nodes flush, the log is retired, and every bitmap page (the
        // cleared marks too) is written: the disk is exact after a clean
        // stop.
        self.retire(Deferred::Goodbye);
        self.retire(Deferred::CommandOk {
            cmd,
            message: "stopped",
        });
        Ok(())
    }

    fn invalidate(&mut self, cmd: u64) -> Result<(), CommandError> {
        if self.role == Role::Primary {
            return Err(CommandError::refused(
                "a Primary cannot discard its own data; demote it (`repctl secondary`) first",
            ));
        }
        if self.p.peer.is_none() {
            return Err(CommandError::failed(
                "a single-node resource has no peer to resync from",
            ));
        }
        info!("invalidate: every block out of sync, full resync from the peer");
        self.bitmap.set_all();
        self.md.flags.set(MdFlags::CONSISTENT, false);
        self.set_disk(DiskState::Inconsistent);
        let seq = self.persist();
        self.wait(
            Need::Everything(seq),
            Deferred::CommandOk {
                cmd,
                message: "invalidated: full resync from the peer",
            },
        );
        self.wait(Need::Everything(seq), Deferred::SendState);
        Ok(())
    }

    // ----- NBD clients ----------------------------------------------------

    /// Admit an NBD client. Only a Primary with UpToDate data serves.
    pub fn nbd_attach(&mut self) -> Result<(), NbdRefusal> {
        self.nbd_check()?;
        self.nbd_clients += 1;
        self.event("nbd-client");
        Ok(())
    }

    /// Whether an NBD client would be admitted now (no side effects).
    pub fn nbd_check(&self) -> Result<(), NbdRefusal> {
        if self.stopping {
            return Err(NbdRefusal::ShuttingDown);
        }
        if self.role != Role::Primary {
            return Err(NbdRefusal::NotServing(format!(
                "node {} of resource {} is {}; only the Primary serves I/O",
                self.p.node, self.p.resource, self.role
            )));
        }
        if self.disk != DiskState::UpToDate {
            return Err(NbdRefusal::NotServing(format!(
                "node {} has no usable disk ({})",
                self.p.node, self.disk
            )));
        }
        Ok(())
    }

    pub fn nbd_detach(&mut self) {
        self.nbd_clients = self.nbd_clients.saturating_sub(1);
        self.event("nbd-client");
    }

    // ----- time -----------------------------------------------------------

    /// The driver's clock: `now` is a monotonic time in nanoseconds (any
    /// origin, never going back). It earns the resync source its credit
    /// under a rate cap, samples the resync progress for the rate and ETA
    /// in status, and emits a `sync-progress` event every second while a
    /// resync runs. Drivers call it at least every [`Node::tick_interval`].
    pub fn handle_tick(&mut self, now: Nanos) {
        self.pace.refill(now);
        match self.sync_progress() {
            Some((done, _)) => {
                self.meter.record(now, done);
                if self.next_progress_event.is_none_or(|t| now >= t) {
                    self.next_progress_event = Some(now + SECOND);
                    self.event("sync-progress");
                }
            }
            None => {
                self.meter.clear();
                self.next_progress_event = None;
            }
        }
        self.pump();
        self.verify_pump();
    }

    /// How often the driver should call [`Node::handle_tick`]: often while
    /// a capped resync is sending (the cap's granularity), otherwise a few
    /// times a second for progress.
    pub fn tick_interval(&self) -> std::time::Duration {
        let pacing = !self.pace.unlimited()
            && self.link.as_ref().is_some_and(|l| {
                matches!(l.phase, Phase::SyncSource { .. })
                    || l.verify.as_ref().is_some_and(|v| v.source)
            });
        if pacing {
            std::time::Duration::from_millis(10)
        } else {
            std::time::Duration::from_millis(250)
        }
    }

    // ----- status ---------------------------------------------------------

    /// Resync (or online verify) progress in bytes: (done, total), while
    /// one runs. Before the copy starts (bitmap exchange) the total is
    /// what is marked so far, and nothing is done.
    pub fn sync_progress(&self) -> Option<(u64, u64)> {
        if let Some(v) = self.verify_progress() {
            return Some(v);
        }
        let phase = self.link.as_ref()?.phase;
        match phase {
            Phase::Bitmaps { .. } | Phase::Starting { .. } => {
                Some((0, self.bitmap.count() * BLOCK_SIZE))
            }
            Phase::SyncSource { .. } | Phase::SyncTarget => {
                Some((self.sync_done * BLOCK_SIZE, self.sync_total * BLOCK_SIZE))
            }
            Phase::AwaitState | Phase::Established => None,
        }
    }

    pub fn status(&self, engine: EngineStatus) -> Status {
        let peer = self.p.peer.as_ref().map(|name| {
            let (role, disk) = self
                .peer_state()
                .unwrap_or((Role::Unknown, DiskState::DUnknown));
            PeerStatus {
                node: name.clone(),
                role,
                disk,
            }
        });
        Status {
            resource: self.p.resource.clone(),
            node: self.p.node.clone(),
            role: self.role,
            disk: self.disk,
            size_bytes: self.size(),
            nbd_clients: self.nbd_clients,
            io_suspended: self.io_suspended,
            connection: self.conn,
            replication: self.replication(),
            peer,
            out_of_sync_bytes: self.bitmap.count() * BLOCK_SIZE,
            sync: self
                .sync_progress()
                .map(|(done_bytes, total_bytes)| SyncProgress {
                    done_bytes,
                    total_bytes,
                    bytes_per_sec: self.meter.bytes_per_sec(),
                    eta_sec: self.meter.eta_sec(total_bytes.saturating_sub(done_bytes)),
                }),
            split_brain: self.split_brain,
            generation: GenerationStatus::from_generations(&self.md.generations),
            counters: self.counters,
            engine,
            last_error: self.last_error.clone(),
            generation_rule: self.last_rule.clone(),
            verify: self.last_verify.clone(),
        }
    }
}
