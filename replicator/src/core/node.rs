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
