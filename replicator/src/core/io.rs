//! Client requests (as Primary), the peer's replicated writes (as
//! Secondary), and storage completions.
//!
//! Invariants enforced here (see docs/durability.md):
//! - protocol C: a client write is answered only when the local write
//!   completed *and* the peer acknowledged it, or, when the peer does not
//!   get it, when its blocks are marked out of sync *durably*;
//! - a block is marked on disk before a write the peer will not get is
//!   submitted, so a crash cannot forget it (degraded mode);
//! - a FLUSH is answered only when the local flush and the peer's flush
//!   both completed (every write answered before it was acknowledged by the
//!   peer, so the peer's flush covers it), or, without a peer, when the
//!   local flush and every out-of-sync mark are durable;
//! - overlapping writes run one after the other on both nodes (`ranges`).

use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::peer::Message;
use tandem_proto::peer::message::{
    DATA_FLAG_FUA, ZERO_FLAG_FAST, ZERO_FLAG_FUA, ZERO_FLAG_NO_HOLE,
};
use tracing::error;

use super::activity::extents_of;
use super::bitmap::Bitmap;
use super::node::{
    ClientOp, Deferred, Device, Flush, Need, Node, PeerPart, PeerReq, Phase, Purpose, RangeOwner,
    Stage, Write,
};
use super::states::{DiskState, Role};
use crate::config::OnIoError;
use crate::metadata::BLOCK_SIZE;
use crate::storage::{Done, Op, StorageError};

/// A barrier flush is sent to the peer once the open epoch holds this many
/// acknowledged writes (entries of the transfer log: its memory)...
///
/// Each barrier flush is an `fdatasync` on the peer, and a device cache
/// flush stalls the writes queued behind it: with DRBD's 2048-write epochs
/// (and our first bound of 1024) a 4 KiB QD32 write load on a virtual disk
/// spent about 40% of its time stalled behind flushes of about 20 ms each
/// (docs/benchmarks.md). Clients that care flush anyway (a filesystem at
/// least every journal commit), and every client FLUSH closes the epoch,
/// so the bound only matters for a client that never flushes.
pub(super) const MAX_EPOCH_WRITES: usize = 65_536;

/// ...or this many blocks (1 GiB): the most a lost link marks out of sync
/// beyond the writes in flight.
pub(super) const MAX_EPOCH_BLOCKS: u64 = (1 << 30) / BLOCK_SIZE;

impl<T> Node<T> {
    pub fn handle_client(&mut self, token: T, op: ClientOp) {
        if self.io_suspended {
            // resource-and-stonith: nothing is answered until fencing
            // confirms the peer cannot write (fencing.rs).
            self.frozen.push_back((token, op));
            return;
        }
        if let Err(e) = self.check_client(&op) {
            self.outputs.push_back(super::node::Output::Reply {
                token,
                result: Err(e),
            });
            return;
        }
        let (start, end, local, msg) = match op {
            ClientOp::Read { offset, len } => {
                self.submit(
                    Device::Data,
                    Op::Read {
                        offset,
                        len: len as usize,
                    },
                    Purpose::Read { token },
                );
                return;
            }
            ClientOp::Flush => {
                let f = self.next_id();
                self.flushes.insert(
                    f,
                    Flush {
                        token,
                        local: None,
                        peer: None,
                        started: false,
                    },
                );
                self.blocked_flushes.push_back(f);
                self.resume();
                return;
            }
            ClientOp::Write { offset, data, fua } => {
                let end = offset + data.len() as u64;
                let flags = if fua { DATA_FLAG_FUA } else { 0 };
                let msg = Message::Data {
                    id: 0,
                    offset,
                    flags,
                    data: data.clone(),
                };
                (offset, end, Op::Write { offset, data, fua }, msg)
            }
            ClientOp::Trim {
                offset,
                len,
                fua: _,
            } => {
                // TRIM is advisory (its range reads back unspecified data),
                // so its FUA flag asks for nothing that must survive a crash.
                let msg = Message::Trim { id: 0, offset, len };
                (
                    offset,
                    offset + u64::from(len),
                    Op::Discard {
                        offset,
                        len: len.into(),
                    },
                    msg,
                )
            }
            ClientOp::WriteZeroes {
                offset,
                len,
                no_hole,
                fast,
                fua,
            } => {
                let mut flags = 0;
                for (on, f) in [
                    (no_hole, ZERO_FLAG_NO_HOLE),
                    (fast, ZERO_FLAG_FAST),
                    (fua, ZERO_FLAG_FUA),
                ] {
                    if on {
                        flags |= f;
                    }
                }
                let op = Op::WriteZeroes {
                    offset,
                    len: len.into(),
                    may_unmap: !no_hole,
                    fast_only: fast,
                    fua,
                };
                (
                    offset,
                    offset + u64::from(len),
                    op,
                    Message::Zero {
                        id: 0,
                        offset,
                        len,
                        flags,
                    },
                )
            }
        };
        let w = self.next_id();
        let write = Write {
            token,
            start,
            end,
            op: local,
            msg,
            stage: Stage::Range,
            local: None,
            peer: PeerPart::None,
        };
        self.writes.insert(w, write);
        self.range_owner.insert(w, RangeOwner::Write(w));
        if self.ranges.admit(w, start, end) {
            self.admitted(w);
            self.resume();
        }
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

    /// A range owner got its range.
    fn admitted(&mut self, owner: u64) {
        match self.range_owner.get(&owner).copied() {
            Some(RangeOwner::Write(w)) => {
                if let Some(write) = self.writes.get_mut(&w) {
                    write.stage = Stage::Blocked;
                    self.blocked.push_back(w);
                }
            }
            Some(RangeOwner::Resync { start, end }) => self.start_resync_read(owner, start, end),
            Some(RangeOwner::Verify { start, end }) => self.verify_admitted(owner, start, end),
            None => debug_assert!(false, "admitted an unknown range owner"),
        }
    }

    /// Release a range and start whatever waited for it.
    pub(super) fn release_range(&mut self, owner: u64, start: u64, end: u64) {
        self.range_owner.remove(&owner);
        for next in self.ranges.release(start, end) {
            self.admitted(next);
        }
    }

    /// True while the link handshake decides what the peer gets: client
    /// writes and flushes wait (briefly) so none slips between the state
    /// exchange and the start of replication or resync.
    fn handshaking(&self) -> bool {
        self.link.as_ref().is_some_and(|l| {
            matches!(
                l.phase,
                Phase::AwaitState | Phase::Bitmaps { .. } | Phase::Starting { .. }
            )
        })
    }

    /// Whether client writes go to the peer now.
    pub(super) fn replicating(&self) -> bool {
        self.link.as_ref().is_some_and(|l| {
            matches!(l.phase, Phase::Established | Phase::SyncSource { .. })
                && l.peer.is_some_and(|p| p.disk >= DiskState::Inconsistent)
        })
    }

    pub(super) fn peer_in_flight(&self) -> usize {
        self.link
            .as_ref()
            .map_or(0, |l| l.reqs.len() + l.resync_sent.len())
    }

    /// Start the blocked writes and flushes that can start. Blocked writes
    /// never overlap (overlaps wait for their range), so they may start in
    /// any order.
    pub(super) fn resume(&mut self) {
        if self.handshaking() || self.io_suspended {
            return;
        }
        let queue = std::mem::take(&mut self.blocked);
        let mut pages = Vec::new();
        let mut md = false;
        // The activity log lists a write's extents, durably, before the
        // write is submitted (docs/durability.md). Writes already covered go
        // first: starting them takes references that keep their extents
        // from being evicted by the requests of the others.
        let mut uncovered = Vec::new();
        for w in queue {
            let Some(write) = self.writes.get(&w) else {
                continue;
            };
            if self.al_enabled() && !self.al.covers(extents_of(write.start, write.end)) {
                uncovered.push(w);
                continue;
            }
            if self.replicating() {
                if self.peer_in_flight() >= self.p.max_buffers as usize {
                    self.blocked.push_back(w); // an acknowledgement resumes
                    continue;
                }
                self.start_write(w, true);
                continue;
            }
            if self.p.peer.is_none() {
                // A single-node resource has nobody to be out of sync with.
                self.start_write(w, false);
                continue;
            }
            // Degraded: the blocks are marked out of sync, durably, before
            // the write is submitted, and so is any generation rotation for
            // losing the peer.
            let (s, e) = Bitmap::blocks_of(write.start, write.end - write.start);
            self.bitmap.set(s, e);
            if !self.bitmap.durable(s, e) {
                if let Need::Pages(p) = self.pages_need(s, e) {
                    pages.extend(p);
                }
                self.blocked.push_back(w);
            } else if self.md_durable < self.degraded_seq {
                md = true;
                self.blocked.push_back(w);
            } else {
                self.start_write(w, false);
            }
        }
        for &w in &uncovered {
            if let Some(write) = self.writes.get(&w) {
                self.al.request(extents_of(write.start, write.end));
            }
            self.blocked.push_back(w);
        }
        if !uncovered.is_empty() {
            // A written transaction, or a finished write freeing an extent,
            // resumes them.
            self.al_pump();
        }
        if !self.blocked.is_empty() && !self.resume_pending && (md || !pages.is_empty()) {
            self.resume_pending = true;
            let need = if pages.is_empty() {
                Need::Md(self.degraded_seq)
            } else {
                Need::Pages(pages)
            };
            self.wait(need, Deferred::Resume);
        }
        while let Some(f) = self.blocked_flushes.pop_front() {
            self.start_flush(f);
        }
    }

    fn start_write(&mut self, w: u64, replicate: bool) {
        let peer = if replicate {
            let link = self.link.as_mut().expect("replicating");
            let id = link.req(PeerReq::Write { w });
            PeerPart::Pending(id)
        } else {
            PeerPart::None
        };
        let al = self.al_enabled();
        let write = self.writes.get_mut(&w).expect("blocked write exists");
        if al {
            self.al.get(extents_of(write.start, write.end));
        }
        write.stage = Stage::Running;
        write.peer = peer;
        let op = write.op.clone();
        let msg = match (&write.msg, peer) {
            (m, PeerPart::Pending(id)) => Some(with_id(m, id)),
            _ => None,
        };
        self.submit(Device::Data, op, Purpose::Write { w });
        if let Some(m) = msg {
            self.send(m);
        }
    }

    fn start_flush(&mut self, f: u64) {
        let replicate = self.replicating();
        let Some(flush) = self.flushes.get_mut(&f) else {
            return;
        };
        flush.started = true;
        if replicate {
            let link = self.link.as_mut().expect("replicating");
            let id = link.req(PeerReq::Flush { f: Some(f) });
            link.tl.close(id);
            flush.peer = Some(id);
            self.send(Message::Flush { id });
        }
        self.submit(Device::Data, Op::Flush, Purpose::Flush { f });
    }

    /// The peer acknowledged write `w` (`ok`) or failed it.
    pub(super) fn peer_write_done(&mut self, w: u64, ok: bool) {
        let Some(write) = self.writes.get_mut(&w) else {
            return;
        };
        if !ok {
            return self.lose_peer_half(w);
        }
        write.peer = PeerPart::Acked;
        let (s, e) = Bitmap::blocks_of(write.start, write.end - write.start);
        if let Some(link) = self.link.as_mut() {
            link.tl.record(s, e);
            if link.tl.open_len() >= MAX_EPOCH_WRITES || link.tl.open_blocks() >= MAX_EPOCH_BLOCKS {
                let id = link.req(PeerReq::Flush { f: None });
                link.tl.close(id);
                self.send(Message::Flush { id });
            }
        }
        self.maybe_complete(w);
    }

    /// The link is gone: a pending peer half is lost.
    pub(super) fn peer_write_lost(&mut self, w: u64) {
        if self
            .writes
            .get(&w)
            .is_some_and(|write| matches!(write.peer, PeerPart::Pending(_)))
        {
            self.lose_peer_half(w);
        }
    }

    /// The peer may not have write `w`: its blocks are marked at once, in
    /// memory, so a handshake on the next link counts them even while the
    /// write is still on the local disk or held by frozen I/O; they are
    /// durable before the answer (maybe_complete). The write holds its
    /// range, so no resync clears the marks meanwhile.
    fn lose_peer_half(&mut self, w: u64) {
        let Some(write) = self.writes.get_mut(&w) else {
            return;
        };
        write.peer = PeerPart::Lost;
        let (s, e) = Bitmap::blocks_of(write.start, write.end - write.start);
        self.bitmap.set(s, e);
        self.maybe_complete(w);
    }

    pub(super) fn maybe_complete(&mut self, w: u64) {
        let Some(write) = self.writes.get_mut(&w) else {
            return;
        };
        if write.local.is_none()
            || matches!(write.peer, PeerPart::Pending(_))
            || write.stage == Stage::Finishing
        {
            return;
        }
        if write.peer == PeerPart::Lost && self.io_suspended {
            // Answering now could lose the write if the peer takes over.
            self.held_writes.push(w);
            return;
        }
        if write.peer == PeerPart::Lost {
            // The peer may not have it: its marks (lose_peer_half) are
            // durable before the client hears it succeeded, and so is the
            // new generation of a Primary that lost its peer
            // (`rotate_for_lost_peer`): a crash right after the answer must
            // not leave the write under the generation the peer shares.
            write.stage = Stage::Finishing;
            let (s, e) = Bitmap::blocks_of(write.start, write.end - write.start);
            let need = if self.md_durable < self.degraded_seq {
                Need::Everything(self.degraded_seq)
            } else {
                self.pages_need(s, e)
            };
            self.wait(need, Deferred::FinishWrite { w });
            return;
        }
        self.finish_write(w);
    }

    pub(super) fn finish_write(&mut self, w: u64) {
        let Some(write) = self.writes.remove(&w) else {
            return;
        };
        if self.al_enabled() {
            self.al.put(extents_of(write.start, write.end));
        }
        if write.peer == PeerPart::Acked
            && matches!(
                self.link.as_ref().map(|l| l.phase),
                Some(Phase::SyncSource { .. })
            )
        {
            // Whole blocks now written on both are in sync.
            let (s, e) = (write.start.div_ceil(BLOCK_SIZE), write.end / BLOCK_SIZE);
            if s < e {
                let cleared = self.bitmap.clear(s, e);
                self.sync_done += cleared;
            }
        }
        if let (Op::Write { data, .. }, Some(Ok(()))) = (&write.op, &write.local) {
            self.counters.disk_written_bytes += data.len() as u64;
        }
        let result = write.local.expect("complete").map(|()| None);
        self.outputs.push_back(super::node::Output::Reply {
            token: write.token,
            result,
        });
        self.release_range(w, write.start, write.end);
        self.resume();
        self.pump();
    }

    pub(super) fn maybe_complete_flush(&mut self, f: u64) {
        let Some(flush) = self.flushes.get(&f) else {
            return;
        };
        if flush.local.is_none() || flush.peer.is_some() {
            return;
        }
        if self.replicating() || self.p.peer.is_none() {
            self.finish_flush(f);
        } else if self.io_suspended {
            self.held_flushes.push(f);
        } else {
            // Without the peer's flush, the flush stands for "durable here,
            // and every block the peer may lack is durably marked".
            let seq = self.md.sequence;
            self.wait(Need::Everything(seq), Deferred::FinishFlush { f });
        }
    }

    pub(super) fn finish_flush(&mut self, f: u64) {
        if let Some(flush) = self.flushes.remove(&f) {
            let result = flush.local.expect("complete").map(|()| None);
            self.outputs.push_back(super::node::Output::Reply {
                token: flush.token,
                result,
            });
        }
    }

    /// The peer's flush `id` finished.
    pub(super) fn peer_flush_done(&mut self, f: Option<u64>) {
        if let Some(f) = f
            && let Some(flush) = self.flushes.get_mut(&f)
        {
            flush.peer = None;
            self.maybe_complete_flush(f);
        }
    }

    /// The link is gone: a flush waiting for the peer now waits for the
    /// out-of-sync marks instead.
    pub(super) fn peer_flush_lost(&mut self, f: u64) {
        if let Some(flush) = self.flushes.get_mut(&f) {
            flush.peer = None;
            self.maybe_complete_flush(f);
        }
    }

    // ----- Secondary: applying the peer's writes ---------------------------

    /// Apply a replicated write, trim or zeroing from the Primary.
    pub(super) fn apply(&mut self, msg: Message) -> Result<(), String> {
        if self.role == Role::Primary {
            return Err("the peer sent a replicated write while this node is Primary".into());
        }
        let (peer_id, start, end, op) = match msg {
            Message::Data {
                id,
                offset,
                flags,
                data,
            } => {
                let end = offset + data.len() as u64;
                (
                    id,
                    offset,
                    end,
                    Op::Write {
                        offset,
                        data,
                        fua: flags & DATA_FLAG_FUA != 0,
                    },
                )
            }
            Message::Trim { id, offset, len } => (
                id,
                offset,
                offset + u64::from(len),
                Op::Discard {
                    offset,
                    len: len.into(),
                },
            ),
            Message::Zero {
                id,
                offset,
                len,
                flags,
            } => {
                let op = Op::WriteZeroes {
                    offset,
                    len: len.into(),
                    may_unmap: flags & ZERO_FLAG_NO_HOLE == 0,
                    fast_only: false,
                    fua: flags & ZERO_FLAG_FUA != 0,
                };
                (id, offset, offset + u64::from(len), op)
            }
            _ => unreachable!("only writes are applied"),
        };
        if end > self.size() {
            return Err(format!(
                "the peer wrote past the end ({end} > {})",
                self.size()
            ));
        }
        if matches!(self.disk, DiskState::Diskless | DiskState::Failed) {
            self.send(Message::NegAck {
                id: peer_id,
                errno: libc::EIO,
            });
            return Ok(());
        }
        self.submit(
            Device::Data,
            op,
            Purpose::Apply {
                peer_id,
                start,
                end,
            },
        );
        Ok(())
    }

    pub(super) fn apply_flush(&mut self, id: u64) {
        if matches!(self.disk, DiskState::Diskless | DiskState::Failed) {
            self.send(Message::FlushAck { id, ok: false });
            return;
        }
        self.submit(Device::Data, Op::Flush, Purpose::ApplyFlush { peer_id: id });
    }

    // ----- completions ----------------------------------------------------

    /// A storage op submitted with `Output::Submit` finished.
    pub fn handle_io_done(&mut self, id: u64, result: Result<Done, StorageError>) {
        let Some(purpose) = self.ops.remove(&id) else {
            debug_assert!(false, "completion for unknown op {id}");
            return;
        };
        match purpose {
            Purpose::Superblock { seq } => self.on_superblock_written(seq, result.map(drop)),
            Purpose::BitmapPage { page, version } => {
                self.on_page_written(page, version, result.map(drop))
            }
            Purpose::Read { token } => {
                let result = match result {
                    Ok(Done::Read(data)) => {
                        self.counters.disk_read_bytes += data.len() as u64;
                        Ok(Some(data))
                    }
                    Ok(Done::Ok) => Ok(Some(Bytes::new())),
                    Err(e) => Err(self.io_error(e)),
                };
                self.outputs
                    .push_back(super::node::Output::Reply { token, result });
            }
            Purpose::Write { w } => {
                let r = result.map(drop).map_err(|e| self.io_error(e));
                if let Some(write) = self.writes.get_mut(&w) {
                    write.local = Some(r);
                }
                self.maybe_complete(w);
            }
            Purpose::Flush { f } => {
                let r = result.map(drop).map_err(|e| self.io_error(e));
                if let Some(flush) = self.flushes.get_mut(&f) {
                    flush.local = Some(r);
                }
                self.maybe_complete_flush(f);
            }
            Purpose::Apply {
                peer_id,
                start,
                end,
            } => {
                let ok = match result {
                    Ok(_) => {
                        self.counters.disk_written_bytes += end - start;
                        true
                    }
                    Err(e) => {
                        self.io_error(e);
                        false
                    }
                };
                if self.link.is_some() {
                    let msg = if ok {
                        Message::WriteAck { id: peer_id }
                    } else {
                        Message::NegAck {
                            id: peer_id,
                            errno: libc::EIO,
                        }
                    };
                    self.send(msg);
                }
            }
            Purpose::ApplyFlush { peer_id } => {
                let ok = result.map_err(|e| self.io_error(e)).is_ok();
                if self.link.is_some() {
                    self.send(Message::FlushAck { id: peer_id, ok });
                }
            }
            Purpose::ResyncRead { owner, start, end } => {
                self.resync_read_done(owner, start, end, result)
            }
            Purpose::ResyncWrite { start, end } => self.resync_write_done(start, end, result),
            Purpose::TargetFlush { upto } => self.target_flush_done(upto, result.map(drop)),
            Purpose::TargetCheckpoint { upto } => self.checkpoint_done(upto, result),
            Purpose::AlFlush => {
                if let Err(e) = result {
                    self.io_error(e);
                }
                self.al_flushed(true);
            }
            Purpose::AlWrite { number } => self.on_al_written(number, result.map(drop)),
            Purpose::RetireFlush => {
                if let Err(e) = result {
                    self.io_error(e);
                }
                self.retire_flushed(true);
            }
            Purpose::CsumRead { owner, start, end } => {
                self.csum_read_done(owner, start, end, result)
            }
            Purpose::CsumCompare {
                start,
                end,
                alg,
                sums,
            } => self.csum_compare_done(start, end, alg, sums, result),
            Purpose::VerifyRead { owner, start, end } => {
                self.verify_read_done(owner, start, end, result)
            }
            Purpose::VerifyCompare { owner, start, end } => {
                self.verify_compare_done(owner, start, end, result)
            }
            Purpose::VerifyReread { id, start, end } => {
                self.verify_reread_done(id, start, end, result)
            }
        }
    }

    pub(super) fn io_error(&mut self, e: StorageError) -> ErrorCode {
        let code = match e {
            StorageError::NotSupported => return ErrorCode::NotSupported,
            StorageError::Shutdown => return ErrorCode::Shutdown,
            ref e => ErrorCode::from_errno(e.errno()),
        };
        error!("I/O error on the backing store: {e}");
        if self.p.on_io_error == OnIoError::Detach && self.disk != DiskState::Failed {
            error!(
                "on-io-error = detach: the disk is Failed; I/O now fails until repd is restarted with a good disk"
            );
            self.set_disk(DiskState::Failed);
            self.send_state();
        }
        code
    }
}

/// `msg` with its request id set.
fn with_id(msg: &Message, id: u64) -> Message {
    match msg.clone() {
        Message::Data {
            offset,
            flags,
            data,
            ..
        } => Message::Data {
            id,
            offset,
            flags,
            data,
        },
        Message::Trim { offset, len, .. } => Message::Trim { id, offset, len },
        Message::Zero {
            offset, len, flags, ..
        } => Message::Zero {
            id,
            offset,
            len,
            flags,
        },
        other => other,
    }
}
