//! The node state machine (see the module doc of `core` for the model).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;
use tracing::{error, info, warn};

use super::rng::SplitMix64;
use super::states::{ConnState, DiskState, ReplState, Role};
use crate::config::{Fencing, OnIoError};
use crate::metadata::{MdFlags, Superblock};
use crate::status::{Counters, EngineStatus, GenerationStatus, PeerStatus, Status};
use crate::storage::{Done, Op, StorageError};

/// Fixed facts about this node, from the configuration.
#[derive(Debug, Clone)]
pub struct NodeParams {
    pub resource: String,
    pub node: String,
    /// The peer's node name; `None` for a single-node resource.
    pub peer: Option<String>,
    pub fencing: Fencing,
    pub on_io_error: OnIoError,
    /// Seed for generation identifiers.
    pub seed: u64,
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
    /// Clean stop: demote, record a clean shutdown, then the driver exits.
    /// The driver has already stopped the NBD server.
    Down,
}

/// Why a command failed. `refused` marks a safety rule (exit status 3); the
/// message then starts with `refused:` and names the rule and the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub refused: bool,
    pub message: String,
}

impl CommandError {
    fn refused(message: impl Into<String>) -> Self {
        CommandError {
            refused: true,
            message: format!("refused: {}", message.into()),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
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

/// What the driver must do, in the order given.
#[derive(Debug)]
pub enum Output<T> {
    /// Submit a data-area operation to storage; report with
    /// [`Node::handle_local_done`].
    Submit { id: u64, op: Op },
    /// Write `data` at `offset` of the metadata device, durably (FUA);
    /// report with [`Node::handle_meta_written`].
    WriteMeta { seq: u64, offset: u64, data: Bytes },
    /// Answer a client request.
    Reply { token: T, result: IoResult },
    /// Answer an administrator command.
    CommandDone {
        id: u64,
        result: Result<String, CommandError>,
    },
    /// The user-visible state changed; publish an event.
    StateChanged { event: &'static str },
}

/// What follows once a superblock write is durable.
#[derive(Debug)]
enum Deferred {
    BecomePrimary { cmd: u64 },
    Demoted { cmd: u64 },
    Stopped { cmd: u64 },
}

/// A request waiting for storage.
#[derive(Debug)]
struct Pending<T> {
    token: T,
    /// Bytes written, for the counters (0 for reads and flushes).
    written: u64,
}

pub struct Node<T> {
    params: NodeParams,
    role: Role,
    disk: DiskState,
    /// The superblock as it should be (persisted or about to be).
    md: Superblock,
    /// Sequence of the superblock write in flight, if any.
    md_in_flight: Option<u64>,
    /// Highest sequence known durable.
    md_durable: u64,
    deferred: Vec<(u64, Deferred)>,
    pending: HashMap<u64, Pending<T>>,
    next_id: u64,
    nbd_clients: u32,
    stopping: bool,
    rng: SplitMix64,
    counters: Counters,
    outputs: VecDeque<Output<T>>,
}

impl<T> Node<T> {
    /// Attach a disk whose superblock is `md` (read at start).
    pub fn new(params: NodeParams, md: Superblock) -> Self {
        let mut node = Node {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            md_durable: md.sequence,
            md,
            md_in_flight: None,
            deferred: Vec::new(),
            pending: HashMap::new(),
            next_id: 0,
            nbd_clients: 0,
            stopping: false,
            rng: SplitMix64::new(params.seed),
            counters: Counters::default(),
            outputs: VecDeque::new(),
            params,
        };
        node.disk = node.attach_disk_state();
        if node.md.flags.has(MdFlags::PRIMARY_IND) {
            // The node stopped while Primary without demoting: remember it,
            // the generation rules use it to pick the resync direction.
            warn!(
                "disk was Primary when {} last stopped: marking it as a crashed Primary",
                node.params.node
            );
            node.md.flags.set(MdFlags::PRIMARY_IND, false);
            node.md.flags.set(MdFlags::CRASHED_PRIMARY, true);
            node.persist();
        }
        info!(
            "attached disk: {} (generation {:016x})",
            node.disk, node.md.generations.current
        );
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
            || self.params.fencing == Fencing::DontCare
            || self.params.peer.is_none()
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

    pub fn nbd_clients(&self) -> u32 {
        self.nbd_clients
    }

    fn event(&mut self, event: &'static str) {
        self.outputs.push_back(Output::StateChanged { event });
    }

    // ----- metadata -------------------------------------------------------

    /// Queue a durable write of `self.md` with a new sequence number. Only
    /// one superblock write is ever in flight: the two slots alternate, so
    /// writing both at once could tear both.
    fn persist(&mut self) -> u64 {
        self.md.sequence += 1;
        if self.md_in_flight.is_none() {
            self.write_md();
        }
        self.md.sequence
    }

    fn write_md(&mut self) {
        let seq = self.md.sequence;
        self.md_in_flight = Some(seq);
        let offset = self.md.layout.superblock_offset(seq % 2);
        self.outputs.push_back(Output::WriteMeta {
            seq,
            offset,
            data: Bytes::from(self.md.encode()),
        });
    }

    fn after_persisted(&mut self, seq: u64, then: Deferred) {
        if self.md_durable >= seq {
            self.run_deferred(then, Ok(()));
        } else {
            self.deferred.push((seq, then));
        }
    }

    /// A superblock write finished.
    pub fn handle_meta_written(&mut self, seq: u64, result: Result<(), StorageError>) {
        debug_assert_eq!(self.md_in_flight, Some(seq));
        self.md_in_flight = None;
        if let Err(e) = &result {
            error!("metadata write failed: {e}; the disk is Failed");
            self.set_disk(DiskState::Failed);
        } else {
            self.md_durable = seq;
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred)
            .into_iter()
            .partition(|(s, _)| *s <= seq || result.is_err());
        self.deferred = waiting;
        for (_, then) in ready {
            let r = result
                .clone()
                .map_err(|e| format!("writing metadata failed: {e}"));
            self.run_deferred(then, r);
        }
        if result.is_ok() && self.md.sequence > seq {
            self.write_md();
        }
    }

    fn run_deferred(&mut self, then: Deferred, result: Result<(), String>) {
        let done = |cmd, msg: &str, r: &Result<(), String>| Output::CommandDone {
            id: cmd,
            result: r
                .clone()
                .map(|()| msg.to_string())
                .map_err(CommandError::failed),
        };
        match then {
            Deferred::BecomePrimary { cmd } => {
                if result.is_ok() {
                    self.role = Role::Primary;
                    info!("{} is now Primary", self.params.node);
                    self.event("role");
                }
                self.outputs.push_back(done(cmd, "now Primary", &result));
            }
            Deferred::Demoted { cmd } => {
                self.outputs.push_back(done(cmd, "now Secondary", &result))
            }
            Deferred::Stopped { cmd } => self.outputs.push_back(done(cmd, "stopped", &result)),
        }
    }

    fn set_disk(&mut self, disk: DiskState) {
        if self.disk != disk {
            info!("disk state {} -> {}", self.disk, disk);
            self.disk = disk;
            self.event("disk");
        }
    }

    // ----- commands -------------------------------------------------------

    pub fn handle_command(&mut self, id: u64, command: Command) {
        let result = match command {
            Command::Primary { force } => self.promote(id, force),
            Command::Secondary => self.demote(id),
            Command::Down => self.stop(id),
        };
        if let Err(e) = result {
            self.outputs
                .push_back(Output::CommandDone { id, result: Err(e) });
        }
    }

    fn promote(&mut self, cmd: u64, force: bool) -> Result<(), CommandError> {
        if self.stopping {
            return Err(CommandError::failed("repd is stopping"));
        }
        if self.role == Role::Primary {
            self.outputs.push_back(Output::CommandDone {
                id: cmd,
                result: Ok("already Primary".into()),
            });
            return Ok(());
        }
        match self.disk {
            DiskState::UpToDate => {}
            DiskState::Diskless | DiskState::Failed => {
                return Err(CommandError::failed(format!(
                    "cannot become Primary: the disk is {}",
                    self.disk
                )));
            }
            _ if force => {
                warn!(
                    "primary --force on {}: declaring {} data UpToDate; if the peer has newer data this causes split-brain",
                    self.params.node, self.disk
                );
            }
            _ => {
                return Err(CommandError::refused(format!(
                    "need UpToDate data to become Primary, but the disk is {}; \
                     `repctl primary --force` declares this node's data the good copy",
                    self.disk
                )));
            }
        }
        // The generation rotates when a disconnected node is promoted (here
        // always: there is no link yet) and the bitmap generation is unused,
        // or on --force, as DRBD's drbd_set_role does. It is durable before
        // the role changes (Deferred::BecomePrimary).
        if force || self.md.generations.bitmap == 0 {
            self.new_current_generation();
        }
        self.md.flags.set(MdFlags::PRIMARY_IND, true);
        self.md.flags.set(MdFlags::CRASHED_PRIMARY, false);
        if force {
            self.md.flags.set(MdFlags::CONSISTENT, true);
            self.md.flags.set(MdFlags::WAS_UP_TO_DATE, true);
            self.set_disk(DiskState::UpToDate);
        }
        let seq = self.persist();
        self.after_persisted(seq, Deferred::BecomePrimary { cmd });
        Ok(())
    }

    /// Bitmap generation ← current, current ← new random value.
    fn new_current_generation(&mut self) {
        let g = &mut self.md.generations;
        if g.bitmap == 0 {
            g.bitmap = g.current;
        }
        g.current = self.rng.generation();
        info!("new current generation {:016x}", g.current);
    }

    fn demote(&mut self, cmd: u64) -> Result<(), CommandError> {
        if self.role == Role::Secondary {
            self.outputs.push_back(Output::CommandDone {
                id: cmd,
                result: Ok("already Secondary".into()),
            });
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
        self.role = Role::Secondary;
        info!("{} is now Secondary", self.params.node);
        self.event("role");
        self.md.flags.set(MdFlags::PRIMARY_IND, false);
        let seq = self.persist();
        self.after_persisted(seq, Deferred::Demoted { cmd });
        Ok(())
    }

    fn stop(&mut self, cmd: u64) -> Result<(), CommandError> {
        self.stopping = true;
        if self.role == Role::Primary {
            self.role = Role::Secondary;
            self.event("role");
        }
        self.md.flags.set(MdFlags::PRIMARY_IND, false);
        self.md.flags.set(MdFlags::AL_CLEAN, true);
        let seq = self.persist();
        self.after_persisted(seq, Deferred::Stopped { cmd });
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
                self.params.node, self.params.resource, self.role
            )));
        }
        if self.disk != DiskState::UpToDate {
            return Err(NbdRefusal::NotServing(format!(
                "node {} has no usable disk ({})",
                self.params.node, self.disk
            )));
        }
        Ok(())
    }

    pub fn nbd_detach(&mut self) {
        self.nbd_clients = self.nbd_clients.saturating_sub(1);
        self.event("nbd-client");
    }

    // ----- client I/O -----------------------------------------------------

    pub fn handle_client(&mut self, token: T, op: ClientOp) {
        if let Err(e) = self.check_client(&op) {
            self.outputs.push_back(Output::Reply {
                token,
                result: Err(e),
            });
            return;
        }
        let (op, written) = match op {
            ClientOp::Read { offset, len } => (
                Op::Read {
                    offset,
                    len: len as usize,
                },
                0,
            ),
            ClientOp::Write { offset, data, fua } => {
                let n = data.len() as u64;
                (Op::Write { offset, data, fua }, n)
            }
            ClientOp::Flush => (Op::Flush, 0),
            ClientOp::Trim {
                offset,
                len,
                fua: _,
            } => (
                Op::Discard {
                    offset,
                    len: len.into(),
                },
                0,
            ),
            ClientOp::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            } => (
                Op::WriteZeroes {
                    offset,
                    len: len.into(),
                    may_unmap: !no_hole,
                    fast_only: fast,
                    fua,
                },
                0,
            ),
        };
        // TRIM is advisory (its range reads back unspecified data), so its
        // FUA flag asks for nothing that must survive a crash.
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Pending { token, written });
        self.outputs.push_back(Output::Submit { id, op });
    }

    fn check_client(&self, op: &ClientOp) -> Result<(), ErrorCode> {
        if self.stopping {
            return Err(ErrorCode::Shutdown);
        }
        if self.role != Role::Primary || self.disk != DiskState::UpToDate {
            return Err(ErrorCode::Io);
        }
        let size = self.size();
        let (offset, len, is_write) = match op {
            ClientOp::Read { offset, len } => (*offset, u64::from(*len), false),
            ClientOp::Write { offset, data, .. } => (*offset, data.len() as u64, true),
            ClientOp::Flush => return Ok(()),
            ClientOp::Trim { offset, len, .. } => (*offset, u64::from(*len), false),
            ClientOp::WriteZeroes { offset, len, .. } => (*offset, u64::from(*len), true),
        };
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ if is_write => Err(ErrorCode::NoSpace),
            _ => Err(ErrorCode::Invalid),
        }
    }

    /// A data-area operation submitted with [`Output::Submit`] finished.
    pub fn handle_local_done(&mut self, id: u64, result: Result<Done, StorageError>) {
        let Some(p) = self.pending.remove(&id) else {
            debug_assert!(false, "completion for unknown op {id}");
            return;
        };
        let result = match result {
            Ok(Done::Read(data)) => {
                self.counters.disk_read_bytes += data.len() as u64;
                Ok(Some(data))
            }
            Ok(Done::Ok) => {
                self.counters.disk_written_bytes += p.written;
                Ok(None)
            }
            Err(e) => Err(self.io_error(e)),
        };
        self.outputs.push_back(Output::Reply {
            token: p.token,
            result,
        });
    }

    fn io_error(&mut self, e: StorageError) -> ErrorCode {
        let code = match e {
            StorageError::NotSupported => return ErrorCode::NotSupported,
            StorageError::Shutdown => return ErrorCode::Shutdown,
            ref e => ErrorCode::from_errno(e.errno()),
        };
        // ENOSPC on a sparse backing file is the backing store's problem,
        // but it is an I/O failure all the same.
        error!("I/O error on the backing store: {e}");
        if self.params.on_io_error == OnIoError::Detach && self.disk != DiskState::Failed {
            error!(
                "on-io-error = detach: the disk is Failed; I/O now fails until repd is restarted with a good disk"
            );
            self.set_disk(DiskState::Failed);
        }
        code
    }

    // ----- status ---------------------------------------------------------

    pub fn status(&self, engine: EngineStatus) -> Status {
        Status {
            resource: self.params.resource.clone(),
            node: self.params.node.clone(),
            role: self.role,
            disk: self.disk,
            size_bytes: self.size(),
            nbd_clients: self.nbd_clients,
            io_suspended: false,
            connection: ConnState::StandAlone,
            replication: ReplState::Off,
            peer: self.params.peer.as_ref().map(|p| PeerStatus {
                node: p.clone(),
                role: Role::Unknown,
                disk: DiskState::DUnknown,
            }),
            out_of_sync_bytes: 0,
            sync: None,
            split_brain: false,
            generation: GenerationStatus::from_generations(&self.md.generations),
            counters: self.counters,
            engine,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Generations, Layout, UUID_JUST_CREATED};

    fn params(peer: Option<&str>, fencing: Fencing) -> NodeParams {
        NodeParams {
            resource: "r0".into(),
            node: "alpha".into(),
            peer: peer.map(str::to_string),
            fencing,
            on_io_error: OnIoError::Detach,
            seed: 1,
        }
    }

    fn fresh_sb() -> Superblock {
        Superblock {
            sequence: 1,
            layout: Layout::internal(64 << 20).unwrap(),
            generations: Generations::just_created(),
            flags: MdFlags(MdFlags::AL_CLEAN),
            device_id: 1,
            resource: "r0".into(),
            node: "alpha".into(),
        }
    }

    fn drain(node: &mut Node<u32>) -> Vec<Output<u32>> {
        std::iter::from_fn(|| node.poll_output()).collect()
    }

    /// Complete every metadata write the node asks for, until none is left.
    fn settle_meta(node: &mut Node<u32>) -> Vec<Output<u32>> {
        let mut seen = Vec::new();
        loop {
            let outs = drain(node);
            if outs.is_empty() {
                return seen;
            }
            for o in outs {
                if let Output::WriteMeta { seq, .. } = o {
                    node.handle_meta_written(seq, Ok(()));
                } else {
                    seen.push(o);
                }
            }
        }
    }

    fn command_result(outs: &[Output<u32>], id: u64) -> Option<Result<String, CommandError>> {
        outs.iter().find_map(|o| match o {
            Output::CommandDone { id: i, result } if *i == id => Some(result.clone()),
            _ => None,
        })
    }

    fn primary_node() -> Node<u32> {
        let mut n = Node::new(params(None, Fencing::DontCare), fresh_sb());
        n.handle_command(1, Command::Primary { force: true });
        settle_meta(&mut n);
        assert_eq!(n.role(), Role::Primary);
        n
    }

    #[test]
    fn fresh_disk_is_inconsistent_and_promotion_needs_force() {
        let mut n: Node<u32> = Node::new(params(None, Fencing::DontCare), fresh_sb());
        assert_eq!(n.disk(), DiskState::Inconsistent);
        n.handle_command(1, Command::Primary { force: false });
        let r = command_result(&drain(&mut n), 1).unwrap().unwrap_err();
        assert!(r.refused && r.message.starts_with("refused:"), "{r:?}");
        assert_eq!(n.role(), Role::Secondary);
    }

    #[test]
    fn promotion_takes_effect_only_after_the_superblock_is_durable() {
        let mut n: Node<u32> = Node::new(params(None, Fencing::DontCare), fresh_sb());
        n.handle_command(7, Command::Primary { force: true });
        let outs = drain(&mut n);
        let Some(Output::WriteMeta { seq, data, .. }) =
            outs.iter().find(|o| matches!(o, Output::WriteMeta { .. }))
        else {
            panic!("no metadata write: {outs:?}")
        };
        assert!(
            command_result(&outs, 7).is_none(),
            "answered before durable"
        );
        assert_eq!(
            n.role(),
            Role::Secondary,
            "Primary before the superblock is durable"
        );
        assert!(matches!(n.nbd_check(), Err(NbdRefusal::NotServing(_))));
        let written = Superblock::decode(data).unwrap();
        assert!(
            written
                .flags
                .has(MdFlags::PRIMARY_IND | MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE)
        );
        assert_eq!(written.generations.bitmap, UUID_JUST_CREATED);
        assert_ne!(written.generations.current, UUID_JUST_CREATED);
        assert_eq!(written.generations.current & 1, 0);
        n.handle_meta_written(*seq, Ok(()));
        let outs = drain(&mut n);
        assert_eq!(command_result(&outs, 7), Some(Ok("now Primary".into())));
        assert_eq!(n.role(), Role::Primary);
        assert!(n.nbd_check().is_ok());
    }

    #[test]
    fn failed_metadata_write_fails_the_disk_and_the_command() {
        let mut n: Node<u32> = Node::new(params(None, Fencing::DontCare), fresh_sb());
        n.handle_command(1, Command::Primary { force: true });
        let seq = drain(&mut n)
            .into_iter()
            .find_map(|o| {
                if let Output::WriteMeta { seq, .. } = o {
                    Some(seq)
                } else {
                    None
                }
            })
            .unwrap();
        n.handle_meta_written(
            seq,
            Err(StorageError::Os {
                op: "write",
                offset: 0,
                errno: libc::EIO,
            }),
        );
        let outs = drain(&mut n);
        assert!(command_result(&outs, 1).unwrap().is_err());
        assert_eq!(n.role(), Role::Secondary);
        assert_eq!(n.disk(), DiskState::Failed);
    }

    #[test]
    fn only_one_superblock_write_is_in_flight_and_slots_alternate() {
        let mut n = primary_node();
        let before = n.superblock().sequence;
        // Two changes in a row: demote (persist) then promote (persist).
        n.handle_command(2, Command::Secondary);
        n.handle_command(3, Command::Primary { force: false });
        let outs = drain(&mut n);
        let writes: Vec<_> = outs
            .iter()
            .filter(|o| matches!(o, Output::WriteMeta { .. }))
            .collect();
        assert_eq!(writes.len(), 1, "two superblock writes in flight: {outs:?}");
        let Output::WriteMeta { seq, offset, .. } = writes[0] else {
            unreachable!()
        };
        assert_eq!(*seq, before + 1);
        let first_offset = *offset;
        n.handle_meta_written(*seq, Ok(()));
        let outs = drain(&mut n);
        let Some(Output::WriteMeta {
            seq: seq2,
            offset: offset2,
            data,
        }) = outs.iter().find(|o| matches!(o, Output::WriteMeta { .. }))
        else {
            panic!("second write not issued: {outs:?}")
        };
        assert_eq!(*seq2, before + 2);
        assert_ne!(
            *offset2, first_offset,
            "consecutive writes must use the other slot"
        );
        assert!(
            Superblock::decode(data)
                .unwrap()
                .flags
                .has(MdFlags::PRIMARY_IND)
        );
        assert_eq!(command_result(&outs, 2), Some(Ok("now Secondary".into())));
        n.handle_meta_written(*seq2, Ok(()));
        assert_eq!(
            command_result(&drain(&mut n), 3),
            Some(Ok("now Primary".into()))
        );
    }

    #[test]
    fn demotion_is_refused_while_a_client_is_attached() {
        let mut n = primary_node();
        n.nbd_attach().unwrap();
        n.handle_command(2, Command::Secondary);
        let r = command_result(&drain(&mut n), 2).unwrap().unwrap_err();
        assert!(r.refused && r.message.contains("NBD client"), "{r:?}");
        assert_eq!(n.role(), Role::Primary);
        n.nbd_detach();
        n.handle_command(3, Command::Secondary);
        // Clients are refused as soon as the demotion is decided.
        assert!(n.nbd_attach().is_err());
        assert!(command_result(&settle_meta(&mut n), 3).unwrap().is_ok());
        assert!(!n.superblock().flags.has(MdFlags::PRIMARY_IND));
    }

    #[test]
    fn a_node_that_stopped_as_primary_is_a_crashed_primary() {
        let mut sb = fresh_sb();
        sb.flags = MdFlags(MdFlags::CONSISTENT | MdFlags::WAS_UP_TO_DATE | MdFlags::PRIMARY_IND);
        let mut n: Node<u32> = Node::new(params(None, Fencing::DontCare), sb);
        settle_meta(&mut n);
        let f = n.superblock().flags;
        assert!(f.has(MdFlags::CRASHED_PRIMARY) && !f.has(MdFlags::PRIMARY_IND));
        assert_eq!(n.role(), Role::Secondary);
        assert_eq!(n.disk(), DiskState::UpToDate);
    }

    #[test]
    fn attach_disk_state_follows_drbd() {
        let case = |flags: u32, peer: Option<&str>, fencing| {
            let mut sb = fresh_sb();
            sb.flags = MdFlags(flags);
            Node::<u32>::new(params(peer, fencing), sb).disk()
        };
        use MdFlags as F;
        let both = F::CONSISTENT | F::WAS_UP_TO_DATE;
        assert_eq!(
            case(0, Some("beta"), Fencing::ResourceOnly),
            DiskState::Inconsistent
        );
        assert_eq!(
            case(F::CONSISTENT, Some("beta"), Fencing::ResourceOnly),
            DiskState::Outdated
        );
        assert_eq!(
            case(both, Some("beta"), Fencing::ResourceOnly),
            DiskState::Consistent
        );
        assert_eq!(
            case(both, Some("beta"), Fencing::ResourceAndStonith),
            DiskState::Consistent
        );
        assert_eq!(
            case(
                both | F::PEER_OUT_DATED,
                Some("beta"),
                Fencing::ResourceOnly
            ),
            DiskState::UpToDate
        );
        assert_eq!(
            case(both, Some("beta"), Fencing::DontCare),
            DiskState::UpToDate
        );
        assert_eq!(
            case(both, None, Fencing::ResourceAndStonith),
            DiskState::UpToDate
        );
    }

    #[test]
    fn client_io_is_bounds_checked_and_answered_once() {
        let mut n = primary_node();
        let size = n.size();
        n.handle_client(
            1,
            ClientOp::Read {
                offset: size - 512,
                len: 1024,
            },
        );
        n.handle_client(
            2,
            ClientOp::Write {
                offset: size,
                data: Bytes::from_static(b"x"),
                fua: false,
            },
        );
        n.handle_client(
            3,
            ClientOp::Trim {
                offset: u64::MAX,
                len: 2,
                fua: false,
            },
        );
        let outs = drain(&mut n);
        let replies: Vec<_> = outs
            .iter()
            .filter_map(|o| {
                if let Output::Reply { token, result } = o {
                    Some((*token, result.clone()))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            replies,
            vec![
                (1, Err(ErrorCode::Invalid)),
                (2, Err(ErrorCode::NoSpace)),
                (3, Err(ErrorCode::Invalid))
            ]
        );
        n.handle_client(
            4,
            ClientOp::Write {
                offset: 0,
                data: Bytes::from_static(b"abc"),
                fua: true,
            },
        );
        let outs = drain(&mut n);
        let [
            Output::Submit {
                id,
                op: Op::Write { fua: true, .. },
            },
        ] = &outs[..]
        else {
            panic!("{outs:?}")
        };
        assert!(
            !outs.iter().any(|o| matches!(o, Output::Reply { .. })),
            "answered before the disk"
        );
        n.handle_local_done(*id, Ok(Done::Ok));
        let outs = drain(&mut n);
        assert!(matches!(
            &outs[..],
            [Output::Reply {
                token: 4,
                result: Ok(None)
            }]
        ));
        assert_eq!(n.status(test_engine()).counters.disk_written_bytes, 3);
    }

    #[test]
    fn io_error_with_detach_fails_the_disk() {
        let mut n = primary_node();
        n.handle_client(
            1,
            ClientOp::Read {
                offset: 0,
                len: 4096,
            },
        );
        let Some(Output::Submit { id, .. }) = drain(&mut n).into_iter().next() else {
            panic!()
        };
        n.handle_local_done(
            id,
            Err(StorageError::Os {
                op: "read",
                offset: 0,
                errno: libc::EIO,
            }),
        );
        assert!(matches!(
            &drain(&mut n)[..],
            [
                Output::StateChanged { .. },
                Output::Reply {
                    token: 1,
                    result: Err(ErrorCode::Io)
                }
            ]
        ));
        assert_eq!(n.disk(), DiskState::Failed);
        n.handle_client(2, ClientOp::Flush);
        assert!(matches!(
            &drain(&mut n)[..],
            [Output::Reply {
                token: 2,
                result: Err(ErrorCode::Io)
            }]
        ));
    }

    #[test]
    fn clean_stop_demotes_and_records_it() {
        let mut n = primary_node();
        n.handle_command(9, Command::Down);
        assert_eq!(n.role(), Role::Secondary);
        let outs = settle_meta(&mut n);
        assert_eq!(command_result(&outs, 9), Some(Ok("stopped".into())));
        let f = n.superblock().flags;
        assert!(!f.has(MdFlags::PRIMARY_IND) && f.has(MdFlags::AL_CLEAN));
        n.handle_client(1, ClientOp::Flush);
        assert!(matches!(
            &drain(&mut n)[..],
            [Output::Reply {
                token: 1,
                result: Err(ErrorCode::Shutdown)
            }]
        ));
    }

    fn test_engine() -> EngineStatus {
        EngineStatus {
            kind: "test".into(),
            direct_io: false,
            fua: "rwf_dsync".into(),
            fdatasyncs: 0,
            dsync_writes: 0,
        }
    }
}
