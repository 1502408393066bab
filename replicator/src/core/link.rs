//! The connection to the peer, as the core sees it: link up and down, the
//! state exchange and generation decision, the bitmap exchange, starting
//! and finishing a resync, promotion grants, and dispatching the peer's
//! messages.
//!
//! Resync protocol (both sides run it; the order of durable steps is what
//! makes an interruption at any point safe):
//! 1. both send `State`; each decides with `generations::compare/resolve`
//!    (the same decision, mirrored);
//! 2. both send their bitmap; each ORs the peer's into its own and makes
//!    the result durable;
//! 3. the source rotates its bitmap generation (durably) and sends
//!    `SyncUuid`; the target takes it as its current generation, marks its
//!    disk Inconsistent (durably) and only then reports `State`;
//! 4. the source copies every marked block (`resync`), then `ResyncDone`;
//! 5. the target flushes, takes the source's generations, becomes
//!    UpToDate (durably) and reports `State`; then the source rotates its
//!    bitmap generation into history (durably).
//!
//! An interrupted resync resumes on reconnect: the target's current
//! generation is the source's bitmap generation (rule 70/50), and the
//! bitmaps still mark what is left.

use tandem_proto::peer::message::{
    STATE_FLAG_CRASHED_PRIMARY, STATE_FLAG_DISCARD_MY_DATA, STATE_FLAG_INCONSISTENT,
};
use tandem_proto::peer::{Message, PeerState};
use tracing::{error, info, warn};

use super::fencing::Handler;
use super::generations::{Decision, Direction, Disks, Side, UUID_NEW_BM_OFFSET, compare, resolve};
use super::node::{
    CommandError, Deferred, Device, Link, LinkCommand, Need, Node, Output, PeerInfo, PeerReq,
    Phase, Purpose, disk_code, disk_from_code,
};
use super::resync::ResyncSource;
use super::states::{ConnState, DiskState, Role};
use crate::metadata::{Generations, MdFlags, UUID_JUST_CREATED};
use crate::storage::{Op, StorageError};

/// Extents per `Bitmap` message.
const EXTENTS_PER_MESSAGE: usize = 16 * 1024;

impl<T> Node<T> {
    fn my_state(&self) -> PeerState {
        let g = &self.md.generations;
        let mut flags = 0;
        if self.discard_my_data {
            flags |= STATE_FLAG_DISCARD_MY_DATA;
        }
        if self.md.flags.has(MdFlags::CRASHED_PRIMARY) {
            flags |= STATE_FLAG_CRASHED_PRIMARY;
        }
        if self.disk == DiskState::Inconsistent {
            flags |= STATE_FLAG_INCONSISTENT;
        }
        PeerState {
            role: u8::from(self.role == Role::Primary),
            disk: disk_code(self.disk),
            current: g.current,
            bitmap: g.bitmap,
            history: g.history,
            flags,
            dirty_blocks: self.bitmap.count(),
        }
    }

    /// Tell the peer our state (roles, disk, generations).
    pub(super) fn send_state(&mut self) {
        if self.link.is_some() {
            let s = self.my_state();
            if let Some(link) = self.link.as_mut() {
                link.sent_dirty = s.dirty_blocks;
            }
            self.send(Message::State(s));
        }
    }

    /// On the peer's fresh state while connected with nothing to sync: one
    /// disk is Inconsistent and the other UpToDate (after an `invalidate`,
    /// or `primary --force` on a fresh pair), so decide again, exactly as at
    /// connect time. A side that decides to sync announces its own state
    /// before its bitmap (`begin_bitmaps`), so the other side decides on
    /// fresh state too and the two decisions mirror each other.
    fn reevaluate(&mut self) {
        let Some(link) = self.link.as_ref() else {
            return;
        };
        let Some(peer) = link.peer else { return };
        if link.phase != Phase::Established {
            return;
        }
        let mine = self.disk;
        let needs = (mine == DiskState::Inconsistent && peer.disk == DiskState::UpToDate)
            || (mine == DiskState::UpToDate && peer.disk == DiskState::Inconsistent);
        if needs {
            info!(
                "disk states changed while connected ({mine} here, {} on the peer): deciding again",
                peer.disk
            );
            self.decide(peer.state);
        }
    }

    // ----- link up / down ---------------------------------------------------

    /// The link driver established a link (the link handshake passed).
    /// A link came up speaking peer-link protocol `version`.
    pub fn handle_link_up(&mut self, version: u16) {
        if self.conn == ConnState::StandAlone || self.stopping {
            self.outputs
                .push_back(Output::Link(LinkCommand::StandAlone));
            return;
        }
        if self.link.is_some() {
            self.link_lost("a new link replaced the old one");
        }
        info!("connected to {}", self.p.peer.as_deref().unwrap_or("?"));
        // `Connected` once the handshake decided to keep the link (decide).
        self.link = Some(Link::new(version));
        self.last_error = None;
        self.send_state();
    }

    /// A connection attempt failed the link handshake (wrong secret,
    /// resource, size, names...). Nothing of the peer reached the core; the
    /// reason is shown in status until a link succeeds. Returns whether the
    /// reason is new (worth logging).
    pub fn handle_link_refused(&mut self, reason: &str) -> bool {
        let new = self.last_error.as_deref() != Some(reason);
        if new {
            self.last_error = Some(reason.to_string());
            self.event("connection");
        }
        new
    }

    /// The link broke or was closed.
    pub fn handle_link_down(&mut self, reason: &str) {
        if self.link.is_some() {
            self.link_lost(reason);
        }
    }

    /// Drop the link because the peer broke the protocol; reconnect later.
    fn protocol_error(&mut self, reason: String) {
        error!("peer link: {reason}; dropping the link");
        self.outputs
            .push_back(Output::Link(LinkCommand::Drop(reason.clone())));
        self.link_lost(&reason);
    }

    /// Go StandAlone until an operator runs `connect`.
    fn stand_alone(&mut self, reason: String) {
        self.last_error = Some(reason.clone());
        if self.link.is_some() {
            self.send(Message::Disconnect {
                reason: reason.clone(),
            });
        }
        self.outputs
            .push_back(Output::Link(LinkCommand::StandAlone));
        self.link_lost(&reason);
        self.conn = ConnState::StandAlone;
        self.event("connection");
    }

    pub(super) fn link_lost(&mut self, reason: &str) {
        let Some(link) = self.link.take() else { return };
        warn!(
            "link to {} lost: {reason}",
            self.p.peer.as_deref().unwrap_or("?")
        );
        if self.conn != ConnState::StandAlone {
            self.conn = ConnState::Connecting;
        }
        let was_replicating = matches!(link.phase, Phase::Established | Phase::SyncSource { .. })
            && link.peer.is_some_and(|p| p.disk >= DiskState::Inconsistent);
        // Everything the peer acknowledged but has not flushed may be lost
        // with it: mark it (the transfer log).
        let mut tl = link.tl;
        for (s, e) in tl.take_all() {
            self.bitmap.set(s, e);
        }
        // Resync chunks the peer did not acknowledge keep their marks.
        // (Hash maps are walked in key order here and below: what a lost
        // link releases and answers, and in which order, must follow from
        // the inputs alone, or a simulation seed would not replay.)
        for (start, owner) in sorted(link.resync_sent) {
            if let Some(super::node::RangeOwner::Resync { end, .. }) =
                self.range_owner.get(&owner).copied()
            {
                self.release_range(owner, start, end);
            }
        }
        self.csum_link_lost(link.csum);
        if let Some(run) = link.verify {
            self.verify_ended(run, false, Some(format!("the link was lost ({reason})")));
        }
        // A Primary that lost the peer it replicated to rotates its
        // generation and, with fencing, runs fence-peer (and with
        // resource-and-stonith suspends I/O first, so the writes whose peer
        // half was lost below are held, not answered).
        if was_replicating && self.role == Role::Primary {
            self.lost_peer_as_primary();
        }
        self.sync_total = 0;
        self.sync_done = 0;
        // A sync target keeps the progress made so far.
        self.checkpoint();
        self.event("connection");
        for (_, req) in sorted(link.reqs) {
            match req {
                PeerReq::Write { w } => self.peer_write_lost(w),
                PeerReq::Flush { f: Some(f) } => self.peer_flush_lost(f),
                PeerReq::Flush { f: None } => {}
                PeerReq::AlBarrier => self.al_flushed(false),
                PeerReq::Retire => self.retire_flushed(false),
                PeerReq::Promote { cmd, .. } => {
                    self.command_done(
                        cmd,
                        Err(CommandError::failed(
                            "the link to the peer was lost during the promotion; retry",
                        )),
                    );
                }
            }
        }
        self.resume();
    }

    // ----- peer messages ----------------------------------------------------

    /// A message from the peer (after the link handshake).
    pub fn handle_peer_message(&mut self, msg: Message) {
        if self.link.is_none() {
            return; // raced with link loss
        }
        let phase = self.link.as_ref().map(|l| l.phase).expect("link");
        let result = match msg {
            Message::State(s) => {
                self.on_state(s);
                Ok(())
            }
            Message::Bitmap { extents } => match phase {
                Phase::Bitmaps { .. } => {
                    for e in extents {
                        let end = e.start.saturating_add(u64::from(e.count));
                        if end > self.bitmap.blocks() {
                            return self.protocol_error(format!("bitmap extent past the end ({end} blocks)"));
                        }
                        self.bitmap.set(e.start, end);
                    }
                    Ok(())
                }
                _ => Err("bitmap outside of a bitmap exchange".to_string()),
            },
            Message::BitmapDone => match phase {
                Phase::Bitmaps { dir, .. } => {
                    self.set_phase(Phase::Starting { dir });
                    self.sync_starting(dir);
                    Ok(())
                }
                _ => Err("end of bitmap outside of a bitmap exchange".to_string()),
            },
            Message::SyncUuid { uuid } => match phase {
                Phase::Starting { dir: Direction::Target } | Phase::SyncTarget => {
                    self.link.as_mut().expect("link").sync_uuid = Some(uuid);
                    if phase == Phase::SyncTarget {
                        self.apply_sync_uuid();
                    }
                    Ok(())
                }
                _ => Err("SyncUuid while not becoming sync target".to_string()),
            },
            Message::NewCurrentUuid { uuid } => self.adopt_new_current_uuid(uuid),
            Message::Data { .. } | Message::Trim { .. } | Message::Zero { .. } => self.apply(msg),
            Message::Flush { id } => {
                self.apply_flush(id);
                Ok(())
            }
            Message::WriteAck { id } => self.take_req(id).map(|r| match r {
                PeerReq::Write { w } => self.peer_write_done(w, true),
                _ => error!("WriteAck for a request that is not a write"),
            }),
            Message::NegAck { id, errno } => self.take_req(id).map(|r| {
                warn!("the peer failed a replicated write (errno {errno}); its blocks are marked out of sync");
                if let PeerReq::Write { w } = r {
                    self.peer_write_done(w, false);
                }
            }),
            Message::FlushAck { id, ok } => match self.take_req(id) {
                Ok(PeerReq::Flush { f }) => {
                    if ok {
                        self.link.as_mut().expect("link").tl.flushed(id);
                        self.peer_flush_done(f);
                        Ok(())
                    } else {
                        // The peer's disk could not make our writes durable:
                        // treat it as losing the link (its writes get marked).
                        Err("the peer's flush failed".to_string())
                    }
                }
                Ok(PeerReq::AlBarrier | PeerReq::Retire) if !ok => Err("the peer's flush failed".to_string()),
                Ok(r @ (PeerReq::AlBarrier | PeerReq::Retire)) => {
                    self.link.as_mut().expect("link").tl.flushed(id);
                    if r == PeerReq::AlBarrier {
                        self.al_flushed(false);
                    } else {
                        self.retire_flushed(false);
                    }
                    Ok(())
                }
                Ok(_) => Err("FlushAck for a request that is not a flush".into()),
                Err(e) => Err(e),
            },
            Message::ResyncData { offset, data } => self.resync_receive(phase, offset, Some(data), 0),
            Message::ResyncZero { offset, len } => self.resync_receive(phase, offset, None, len),
            Message::ResyncAck { offset, len, ok } if self.csum_owns_ack(offset) => {
                self.csum_run_acked(offset, len, ok)
            }
            Message::ResyncAck { offset, len, ok } => self.resync_acked(offset, len, ok),
            Message::CsumExtents { extents } => self.on_csum_extents(extents),
            Message::CsumRequest {
                offset,
                len,
                alg,
                sums,
            } => self.on_csum_request(phase, offset, len, alg, sums),
            Message::CsumReply {
                offset,
                len,
                differ,
            } => match phase {
                Phase::SyncSource { .. } => self.on_csum_reply(offset, len, differ),
                _ => Err("checksum reply while not sync source".to_string()),
            },
            Message::VerifyStart { total_bytes } => self.on_verify_start(phase, total_bytes),
            Message::VerifyRequest {
                offset,
                len,
                alg,
                sums,
            } => self.on_verify_request(offset, len, alg, sums),
            Message::VerifyReply {
                offset,
                len,
                differ,
            } => self.on_verify_reply(offset, len, differ),
            Message::VerifyDone { complete } => self.on_verify_done(complete),
            Message::VerifyRecheck {
                offset,
                len,
                alg,
                sums,
            } => self.on_verify_recheck(offset, len, alg, sums),
            Message::VerifyRecheckReply {
                offset,
                len,
                differ,
            } => self.on_verify_recheck_reply(offset, len, differ),
            Message::ResyncDone => match phase {
                Phase::SyncTarget => {
                    self.link.as_mut().expect("link").resync_done = true;
                    // Every resync write completed before the source could
                    // see its acknowledgement; this flush makes them durable
                    // before the disk is declared UpToDate.
                    let upto = self.next_clear_seq;
                    self.submit(Device::Data, Op::Flush, Purpose::TargetFlush { upto });
                    Ok(())
                }
                _ => Err("ResyncDone while not sync target".to_string()),
            },
            Message::PromoteRequest { id } => {
                self.on_promote_request(id);
                Ok(())
            }
            Message::PromoteReply { id, granted, reason } => match self.take_req(id) {
                Ok(PeerReq::Promote { cmd, force }) => {
                    if !granted {
                        self.command_done(cmd, Err(CommandError::refused(reason)));
                    } else if let Err(e) = self.check_promotable(force) {
                        self.command_done(cmd, Err(e));
                        self.send_state();
                    } else {
                        self.do_promote(cmd, force, true);
                    }
                    Ok(())
                }
                Ok(_) => Err("PromoteReply for a request that is not a promotion".into()),
                Err(e) => Err(e),
            },
            Message::Disconnect { reason } => {
                info!("the peer is closing the link: {reason}");
                Ok(())
            }
            Message::Ping | Message::PingAck => Ok(()),
            Message::Hello(_) | Message::AuthResponse { .. } | Message::Ready | Message::Refuse { .. } => {
                Err("link handshake message after the handshake".to_string())
            }
        };
        if let Err(reason) = result {
            self.protocol_error(reason);
        }
    }

    fn take_req(&mut self, id: u64) -> Result<PeerReq, String> {
        let link = self.link.as_mut().expect("link");
        let r = link
            .reqs
            .remove(&id)
            .ok_or_else(|| format!("answer to unknown request {id}"))?;
        // A buffer is free (`max-buffers`): blocked writes and resync
        // chunks may start.
        self.resume();
        self.pump();
        Ok(r)
    }

    pub(super) fn set_phase(&mut self, phase: Phase) {
        if phase != Phase::Established && self.verify_running().is_some() {
            self.verify_abort("a resync starts", true);
        }
        if let Some(link) = self.link.as_mut()
            && link.phase != phase
        {
            link.phase = phase;
            self.event("replication");
        }
    }

    fn on_state(&mut self, s: PeerState) {
        let role = if s.role == 1 {
            Role::Primary
        } else {
            Role::Secondary
        };
        let disk = disk_from_code(s.disk);
        let link = self.link.as_mut().expect("link");
        let first = link.peer.is_none();
        link.peer = Some(PeerInfo {
            role,
            disk,
            state: s,
        });
        link.peer_promoting = false;
        let phase = link.phase;
        self.event("peer");
        if first {
            self.decide(s);
            return;
        }
        match phase {
            // The target is ready when it has taken our sync generation
            // (durably Inconsistent under it). Its disk state alone is not
            // enough: a target already Inconsistent from an interrupted
            // resync says so before it took the new sync generation.
            Phase::SyncSource { ready: false }
                if disk == DiskState::Inconsistent && s.current == self.md.generations.bitmap =>
            {
                self.set_phase(Phase::SyncSource { ready: true });
                // I/O frozen by fencing resumes only now: the target is
                // durably Inconsistent (it cannot be promoted without
                // --force) and the held writes are marked for the resync.
                // Answering them at the handshake would let a link loss
                // before this point leave an UpToDate peer without them.
                self.resume_io(false);
                self.link.as_mut().expect("link").resync = Some(ResyncSource::default());
                self.pace.restart();
                self.pump();
            }
            Phase::SyncSource { ready: true } if disk == DiskState::UpToDate => {
                self.source_finish()
            }
            Phase::Established => self.reevaluate(),
            _ => {}
        }
        self.resume();
    }

    /// The first state of a new link: decide what to do (DRBD's sync
    /// handshake).
    fn decide(&mut self, peer: PeerState) {
        let me = Side {
            gens: self.md.generations,
            crashed_primary: self.md.flags.has(MdFlags::CRASHED_PRIMARY),
            primary: self.role == Role::Primary,
        };
        let them = Side {
            gens: Generations {
                current: peer.current,
                bitmap: peer.bitmap,
                history: peer.history,
            },
            crashed_primary: peer.flags & STATE_FLAG_CRASHED_PRIMARY != 0,
            primary: peer.role == 1,
        };
        let peer_name = self.p.peer.clone().unwrap_or_default();
        let c = compare(&me, &them, self.p.node < peer_name);
        if let Some(fix) = c.my_fix {
            info!(
                "generation repair (rule {}): {:?} -> {:?}",
                c.rule, self.md.generations, fix
            );
            self.md.generations = fix;
            self.persist();
        }
        let peer_disk = disk_from_code(peer.disk);
        let disks = Disks {
            me_inconsistent: self.disk == DiskState::Inconsistent,
            peer_inconsistent: peer_disk == DiskState::Inconsistent,
            me_discard: self.discard_my_data,
            peer_discard: peer.flags & STATE_FLAG_DISCARD_MY_DATA != 0,
            me_primary: self.role == Role::Primary,
            peer_primary: peer.role == 1,
            me_dirty: self.link.as_ref().is_some_and(|l| l.sent_dirty > 0),
            peer_dirty: peer.dirty_blocks > 0,
        };
        let decision = resolve(&c, &disks);

        if matches!(decision, Decision::NoSync | Decision::Sync { .. })
            && self.conn != ConnState::Connected
        {
            self.conn = ConnState::Connected;
            self.event("connection");
        }
        if self.md.flags.has(MdFlags::PEER_OUT_DATED) {
            // Connected again: what fencing said about the peer is history.
            self.md.flags.set(MdFlags::PEER_OUT_DATED, false);
            self.persist();
        }
        let g = &self.md.generations;
        info!(
            "generation handshake with {peer_name}: self {:016x}:{:016x}:{:016x}:{:016x} peer {:016x}:{:016x}:{:016x}:{:016x}: {:?} by rule {} -> {:?}",
            g.current,
            g.bitmap,
            g.history[0],
            g.history[1],
            peer.current,
            peer.bitmap,
            peer.history[0],
            peer.history[1],
            c.outcome,
            c.rule,
            decision
        );
        self.last_rule = Some(format!("rule {}: {:?}", c.rule, c.outcome));
        match decision {
            Decision::NoSync => {
                self.discard_my_data = false;
                // The peer is back and has our data: held I/O may go on.
                self.resume_io(false);
                self.set_phase(Phase::Established);
                // Same generation, same data: a Consistent or Outdated disk
                // facing a peer with good data is UpToDate.
                if matches!(self.disk, DiskState::Consistent | DiskState::Outdated)
                    && peer_disk >= DiskState::Outdated
                {
                    self.md.flags.set(MdFlags::WAS_UP_TO_DATE, true);
                    self.set_disk(DiskState::UpToDate);
                    let seq = self.persist();
                    self.wait(Need::Md(seq), Deferred::SendState);
                }
                self.resume();
            }
            Decision::Sync { direction, full } => {
                self.discard_my_data = false;
                // A Secondary that learns the peer has data it lacks is
                // Outdated from this moment, durably: if the link goes
                // before the resync makes it Inconsistent, neither a
                // restart (Consistent) nor `fence-confirm` may make this
                // stale copy UpToDate and promotable (docs/durability.md,
                // invariant 23).
                if direction == Direction::Target
                    && self.role == Role::Secondary
                    && matches!(self.disk, DiskState::UpToDate | DiskState::Consistent)
                {
                    info!("the peer has newer data: this disk is Outdated until the resync");
                    self.md.flags.set(MdFlags::WAS_UP_TO_DATE, false);
                    self.set_disk(DiskState::Outdated);
                    self.persist();
                }

                if full {
                    self.bitmap.set_all();
                }
                info!(
                    "{} resync as Sync{}: {} blocks marked here",
                    if full { "full" } else { "bitmap-based" },
                    if direction == Direction::Source {
                        "Source"
                    } else {
                        "Target"
                    },
                    self.bitmap.count()
                );
                self.begin_bitmaps(direction);
            }
            Decision::SplitBrain if disks.me_discard && disks.peer_discard => {
                let reason = "split-brain, and both nodes were told to discard their data: run `repctl connect` \
                     (without --discard-my-data) on the node whose data is to be kept";
                error!("{reason}");
                self.split_brain = true;
                self.event("split-brain");
                self.stand_alone(reason.into());
            }
            Decision::SplitBrain => {
                error!(
                    "split-brain detected (rule {}): both nodes have changes the other lacks; neither side's data is touched. \
                     Resolve with `repctl connect --discard-my-data` on the node whose changes are to be dropped",
                    c.rule
                );
                self.split_brain = true;
                self.event("split-brain");
                self.run_handler(Handler::SplitBrain);
                self.stand_alone(format!("split-brain detected by rule {}", c.rule));
            }
            Decision::Refuse(reason) => {
                error!("not connecting to {peer_name}: {reason}");
                self.stand_alone(reason);
            }
        }
    }

    fn begin_bitmaps(&mut self, dir: Direction) {
        self.set_phase(Phase::Bitmaps {
            dir,
            peer_done: false,
        });
        self.send_state();
        let mut from = Some(0);
        while let Some(f) = from {
            let (extents, next) = self.bitmap.extents(f, EXTENTS_PER_MESSAGE);
            if !extents.is_empty() {
                self.send(Message::Bitmap { extents });
            }
            from = next;
        }
        self.send_csum_extents();
        self.send(Message::BitmapDone);
    }

    /// Both bitmaps are merged: make that durable, and as source, rotate the
    /// bitmap generation first.
    fn sync_starting(&mut self, dir: Direction) {
        if dir == Direction::Source {
            let g = &mut self.md.generations;
            let new = if g.bitmap != 0 && g.bitmap != UUID_JUST_CREATED {
                g.bitmap.wrapping_add(UUID_NEW_BM_OFFSET) & !1
            } else {
                self.rng.generation()
            };
            if g.bitmap != 0 && g.bitmap != UUID_JUST_CREATED {
                g.history = [g.bitmap, g.history[0]];
            }
            g.bitmap = new;
            // The target takes our current generation when the resync
            // ends: from now on it may hold it. Durable before SyncUuid.
            self.md.flags.set(MdFlags::CURRENT_UNSHARED, false);
        }
        let seq = self.persist();
        self.wait(Need::Everything(seq), Deferred::SyncStarting);
    }

    pub(super) fn sync_starting_durable(&mut self) {
        let Some(Phase::Starting { dir }) = self.link.as_ref().map(|l| l.phase) else {
            return;
        };
        self.sync_total = self.bitmap.count();
        self.sync_done = 0;
        match dir {
            Direction::Source => {
                let uuid = self.md.generations.bitmap;
                self.send(Message::SyncUuid { uuid });
                self.send_state();
                self.set_phase(Phase::SyncSource { ready: false });
                self.resume();
            }
            Direction::Target => {
                self.set_phase(Phase::SyncTarget);
                if self.link.as_ref().is_some_and(|l| l.sync_uuid.is_some()) {
                    self.apply_sync_uuid();
                }
            }
        }
    }

    /// Target: take the source's bitmap generation as current, be
    /// Inconsistent (durably), then tell the source to start.
    fn apply_sync_uuid(&mut self) {
        let uuid = self
            .link
            .as_ref()
            .and_then(|l| l.sync_uuid)
            .expect("sync uuid known");
        self.md.generations.current = uuid;
        self.md.generations.bitmap = 0;
        self.md.flags.set(MdFlags::CURRENT_UNSHARED, false);
        self.md.flags.set(MdFlags::CONSISTENT, false);
        self.set_disk(DiskState::Inconsistent);
        let seq = self.persist();
        self.wait(Need::Md(seq), Deferred::TargetReady);
    }

    pub(super) fn target_ready(&mut self) {
        self.send_state();
    }

    pub(super) fn target_flush_done(&mut self, upto: u64, result: Result<(), StorageError>) {
        if let Err(e) = result {
            let code = self.io_error(e);
            return self.protocol_error(format!(
                "cannot finish the resync: flushing the disk failed ({code})"
            ));
        }
        let Some(peer) = self.link.as_ref().and_then(|l| l.peer) else {
            return;
        };
        // The flush covered every resync write: their marks may go now.
        self.apply_clears(upto);
        let left = self.bitmap.count();
        if left != 0 {
            warn!(
                "resync finished with {left} blocks still marked here; clearing them (the source sent every marked block)"
            );
            self.bitmap.clear_all();
        }
        let s = peer.state;
        // The target takes the source's generations; both then rotate the
        // bitmap generation into history (DRBD's drbd_resync_finished).
        self.md.generations = Generations {
            current: s.current,
            bitmap: 0,
            history: [s.bitmap, s.history[0]],
        };
        self.md.flags.set(MdFlags::CONSISTENT, true);
        self.md.flags.set(MdFlags::WAS_UP_TO_DATE, true);
        self.md.flags.set(MdFlags::CRASHED_PRIMARY, false);
        self.md.flags.set(MdFlags::CURRENT_UNSHARED, false);
        self.set_disk(DiskState::UpToDate);
        let seq = self.persist();
        self.wait(Need::Everything(seq), Deferred::TargetFinished);
    }

    pub(super) fn target_finished(&mut self) {
        // Deferred until the metadata was durable: the link it was for may
        // be gone, and a new link's phase is not ours to change.
        if self.link.as_ref().map(|l| l.phase) != Some(Phase::SyncTarget) {
            return;
        }
        info!("resync finished: the disk is UpToDate");
        self.set_phase(Phase::Established);
        self.event("sync-finished");
        self.send_state();
    }

    fn source_finish(&mut self) {
        let done = self
            .link
            .as_ref()
            .and_then(|l| l.resync.as_ref())
            .is_some_and(|r| r.done_sent);
        if !done {
            return;
        }
        let g = &mut self.md.generations;
        if g.bitmap != 0 {
            g.history = [g.bitmap, g.history[0]];
            g.bitmap = 0;
        }
        self.md.flags.set(MdFlags::CRASHED_PRIMARY, false);
        // The target takes our current generation (the one in our last
        // State, even if it rotated during the resync, e.g. by a forced
        // promotion of Consistent data): it is shared from now on, so
        // losing the peer later must rotate again (invariant 19;
        // simulation seed 7687 of 20,000). If the target never takes it,
        // that rotation is merely one more than needed.
        self.md.flags.set(MdFlags::CURRENT_UNSHARED, false);
        let seq = self.persist();
        self.wait(Need::Everything(seq), Deferred::SourceFinished);
    }

    pub(super) fn source_finished(&mut self) {
        // Deferred until the metadata was durable: the link it was for may
        // be gone, and a new link in its bitmap exchange must not be taken
        // for a finished resync (the target then waited forever).
        if self.link.as_ref().map(|l| l.phase) != Some(Phase::SyncSource { ready: true }) {
            return;
        }
        if let Some(link) = self.link.as_mut() {
            link.resync = None;
        }
        info!("resync finished: the peer is UpToDate");
        self.set_phase(Phase::Established);
        self.event("sync-finished");
        self.send_state();
    }

    // ----- promotion --------------------------------------------------------

    fn on_promote_request(&mut self, id: u64) {
        let peer_name = self.p.peer.clone().unwrap_or_default();
        let my_pending = self.link.as_ref().is_some_and(|l| {
            l.reqs
                .values()
                .any(|r| matches!(r, PeerReq::Promote { .. }))
        });
        // Invariant 17: a node that is Primary, or becoming Primary (its
        // own promotion granted or fencing confirmed, the superblock not yet
        // durable), never grants; without the second condition two
        // promotions crossing on the wire both succeeded once the grantor's
        // stale state message had cleared `peer_promoting` on the other
        // side (simulation, seed 50943).
        let refusal = if self.role == Role::Primary || self.promoting {
            Some(format!(
                "the connected peer {} is {} (two Primaries while connected are never allowed); \
                 demote it with `repctl secondary` there first",
                self.p.node,
                if self.role == Role::Primary {
                    "Primary"
                } else {
                    "becoming Primary"
                }
            ))
        } else if my_pending && self.p.node < peer_name {
            Some(format!(
                "node {} is being promoted at the same moment",
                self.p.node
            ))
        } else {
            None
        };
        let granted = refusal.is_none();
        if granted {
            self.link.as_mut().expect("link").peer_promoting = true;
        }
        self.send(Message::PromoteReply {
            id,
            granted,
            reason: refusal.unwrap_or_default(),
        });
    }

    pub(super) fn became_primary(&mut self, cmd: u64, connected: bool, result: Result<(), String>) {
        self.promoting = false;
        match result {
            // The peer granted the promotion, but the link went before the
            // superblock was durable (docs/durability.md, invariant 25):
            // becoming Primary now would write without the peer under a
            // generation the peer holds too (invariant 19), and without
            // asking fencing (rule 2). Fail it;
            // a retry takes the disconnected path, which does both. (The
            // randomized simulation found this, seed 180, once the
            // checksum-resync messages changed its schedules.)
            Ok(()) if connected && self.link.is_none() => {
                self.md.flags.set(MdFlags::PRIMARY_IND, false);
                self.persist();
                self.command_done(
                    cmd,
                    Err(CommandError::failed(
                        "the link to the peer was lost during the promotion; retry",
                    )),
                );
            }
            // The reverse: a promotion decided without a peer, and a link
            // came up before the superblock was durable. The peer never
            // agreed; becoming Primary now could make two Primaries on a
            // connected link. Fail it; a retry asks the peer.
            Ok(()) if !connected && self.link.is_some() => {
                self.md.flags.set(MdFlags::PRIMARY_IND, false);
                self.persist();
                self.command_done(
                    cmd,
                    Err(CommandError::failed(
                        "the peer connected during the promotion; retry (the peer now decides)",
                    )),
                );
            }
            Ok(()) => {
                self.role = Role::Primary;
                info!("{} is now Primary", self.p.node);
                self.event("role");
                self.command_done(cmd, Ok("now Primary".into()));
            }
            Err(e) => self.command_done(cmd, Err(CommandError::failed(e))),
        }
        self.send_state();
    }

    // ----- connect, disconnect, new generation --------------------------------

    pub(super) fn connect(&mut self, cmd: u64, discard_my_data: bool) -> Result<(), CommandError> {
        if self.p.peer.is_none() {
            return Err(CommandError::failed(
                "this resource has a single node; there is no peer to connect to",
            ));
        }
        if discard_my_data {
            if self.role == Role::Primary {
                if self.nbd_clients > 0 {
                    return Err(CommandError::refused(format!(
                        "this node is Primary with {} NBD client(s) attached; its data cannot be discarded under them: \
                         stop the clients, then run `repctl connect --discard-my-data` again",
                        self.nbd_clients
                    )));
                }
                // The node whose changes are to be dropped is usually one of
                // the two force-promoted Primaries: demote it on the way.
                warn!("connect --discard-my-data on a Primary: demoting it first");
                self.role = Role::Secondary;
                self.event("role");
                self.md.flags.set(MdFlags::PRIMARY_IND, false);
                self.persist();
            }
            self.discard_my_data = true;
        } else {
            // Each `connect` states its options anew (as drbdadm's net
            // options do): a plain connect withdraws an earlier
            // --discard-my-data.
            self.discard_my_data = false;
        }
        if self.conn == ConnState::StandAlone {
            self.split_brain = false;
            self.conn = ConnState::Connecting;
            self.outputs.push_back(Output::Link(LinkCommand::Connect));
            self.event("connection");
        } else if discard_my_data && self.link.is_some() {
            // Connected already: the decision is made; reconnect so the
            // handshake sees the flag.
            self.outputs.push_back(Output::Link(LinkCommand::Drop(
                "reconnecting to discard this node's data".into(),
            )));
            self.link_lost("reconnecting to discard this node's data");
        }
        let msg = if discard_my_data {
            "connecting; this node's data will be discarded on split-brain"
        } else {
            "connecting"
        };
        self.command_done(cmd, Ok(msg.into()));
        Ok(())
    }

    pub(super) fn disconnect(&mut self, cmd: u64) -> Result<(), CommandError> {
        if self.p.peer.is_none() {
            return Err(CommandError::failed(
                "this resource has a single node; there is no link",
            ));
        }
        if self.link.is_some() {
            self.send(Message::Disconnect {
                reason: "disconnected by the operator".into(),
            });
        }
        self.outputs
            .push_back(Output::Link(LinkCommand::StandAlone));
        self.link_lost("disconnected by the operator");
        self.conn = ConnState::StandAlone;
        self.event("connection");
        self.command_done(
            cmd,
            Ok("disconnected (StandAlone until `repctl connect`)".into()),
        );
        Ok(())
    }

    pub(super) fn new_current_uuid(
        &mut self,
        cmd: u64,
        clear_bitmap: bool,
    ) -> Result<(), CommandError> {
        if !clear_bitmap {
            if self.link.is_some() {
                return Err(CommandError::refused(
                    "a new generation while connected would diverge from the peer; use --clear-bitmap on a fresh pair, or disconnect first",
                ));
            }
            self.new_current_generation();
            let seq = self.persist();
            self.wait(
                Need::Md(seq),
                Deferred::CommandOk {
                    cmd,
                    message: "new current generation",
                },
            );
            return Ok(());
        }
        let fresh_pair = self.link.as_ref().is_some_and(|l| {
            l.phase == Phase::Established
                && l.peer.is_some_and(|p| {
                    p.disk == DiskState::Inconsistent && p.state.current == UUID_JUST_CREATED
                })
        }) && self.disk == DiskState::Inconsistent
            && self.md.generations.current == UUID_JUST_CREATED;
        if !fresh_pair {
            return Err(CommandError::refused(
                "--clear-bitmap skips the initial sync only for a brand-new pair: both nodes connected, \
                 both disks Inconsistent with fresh metadata (create-md on both, both zeroed)",
            ));
        }
        let uuid = self.rng.generation();
        self.take_new_current_uuid(uuid);
        self.send(Message::NewCurrentUuid { uuid });
        let seq = self.md.sequence;
        self.wait(
            Need::Everything(seq),
            Deferred::CommandOk {
                cmd,
                message: "new generation; both disks UpToDate without a sync",
            },
        );
        Ok(())
    }

    fn adopt_new_current_uuid(&mut self, uuid: u64) -> Result<(), String> {
        if self.disk != DiskState::Inconsistent || self.md.generations.current != UUID_JUST_CREATED
        {
            return Err("NewCurrentUuid for a disk that is not fresh".into());
        }
        self.take_new_current_uuid(uuid);
        Ok(())
    }

    /// Both disks of a fresh pair are declared identical (zeroed) and
    /// UpToDate under generation `uuid`.
    fn take_new_current_uuid(&mut self, uuid: u64) {
        info!(
            "new current generation {uuid:016x} with a cleared bitmap: skipping the initial sync"
        );
        self.md.generations = Generations {
            current: uuid,
            bitmap: 0,
            history: [0, 0],
        };
        self.md.flags.set(MdFlags::CONSISTENT, true);
        self.md.flags.set(MdFlags::WAS_UP_TO_DATE, true);
        self.md.flags.set(MdFlags::CURRENT_UNSHARED, false);
        self.bitmap.clear_all();
        self.set_disk(DiskState::UpToDate);
        let seq = self.persist();
        self.wait(Need::Everything(seq), Deferred::SendState);
    }
}

/// The entries of `map` in key order.
pub(super) fn sorted<K: Ord, V>(map: std::collections::HashMap<K, V>) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = map.into_iter().collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    v
}
