//! The resync: the source's copy loop and the target's receiving end.
//!
//! Source: walks the bitmap from a cursor, taking runs of adjacent marked
//! blocks (at most [`CHUNK_BLOCKS`]) as chunks; each chunk holds its byte
//! range like a client write does, so a resync read never races a client
//! write to the same blocks and the target applies them in the order the
//! source decided. A chunk's marks are cleared when the target
//! acknowledged its write. At most [`MAX_CHUNK_BYTES`] bytes in at most
//! [`MAX_CHUNKS`] chunks are in flight, and never more than `max-buffers`
//! requests toward the peer.
//!
//! Target: writes what it receives and acknowledges it, but clears its own
//! marks only after a flush made the writes durable (`pending_clears`), so
//! a crash of the target cannot lose a block its bitmap says is synced.
//! The flush happens every [`CHECKPOINT_BLOCKS`] written, when the link is
//! lost, and at the end: an interrupted resync keeps its progress.

use bytes::Bytes;
use tandem_proto::peer::Message;

use super::bitmap::Bitmap;
use super::node::{Device, Node, Phase, Purpose, RangeOwner};
use super::zeros;
use crate::metadata::BLOCK_SIZE;
use crate::storage::{Done, Op, StorageError};

/// Largest resync chunk, in blocks (1 MiB).
pub const CHUNK_BLOCKS: u64 = 256;
/// Resync bytes in flight at once (8 MiB: eight whole chunks). 32 MiB made
/// a 1 GiB full sync on loopback about a fifth faster (docs/benchmarks.md),
/// but every chunk in flight when the link breaks is sent again: an
/// interrupted resync sends up to `dirty + faults × 8 MiB` (120 MiB for
/// 96 MiB and three faults; 177 with 32 MiB in flight), so it stays 8 MiB
/// until a reconnect can skip what the target wrote but had not
/// acknowledged.
pub const MAX_CHUNK_BYTES: u64 = 8 * CHUNK_BLOCKS * BLOCK_SIZE;
/// Resync chunks in flight at once. Above the eight whole chunks the byte
/// limit allows: a bitmap resync of scattered blocks makes chunks of one
/// or a few blocks, and with only eight of them in flight the copy ran at
/// queue depth 8 on both disks. The byte limit still bounds what a link
/// fault costs.
pub const MAX_CHUNKS: usize = 32;
/// The target checkpoints (flush, then clear marks) every this many blocks
/// (64 MiB).
pub const CHECKPOINT_BLOCKS: u64 = 16 * 1024;

#[derive(Debug, Default)]
pub(super) struct ResyncSource {
    /// Next block to look at.
    pub cursor: u64,
    /// Chunks waiting for their range, being read, or sent.
    pub chunks: usize,
    /// Bytes of those chunks.
    pub bytes: u64,
    /// `ResyncDone` was sent.
    pub done_sent: bool,
}

impl ResyncSource {
    fn started(&mut self, bytes: u64) {
        self.chunks += 1;
        self.bytes += bytes;
    }

    /// A chunk of `bytes` is done or abandoned.
    pub(super) fn finished(&mut self, bytes: u64) {
        self.chunks = self.chunks.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

impl<T> Node<T> {
    /// Source: start as many chunks as allowed.
    pub(super) fn pump(&mut self) {
        loop {
            let max_buffers = self.p.max_buffers as usize;
            let in_flight = self.peer_in_flight();
            let Some(link) = self.link.as_mut() else {
                return;
            };
            if link.phase != (Phase::SyncSource { ready: true }) {
                return;
            }
            let Some(rs) = link.resync.as_mut() else {
                return;
            };
            if rs.done_sent
                || rs.chunks >= MAX_CHUNKS
                || rs.bytes >= MAX_CHUNK_BYTES
                || in_flight >= max_buffers
            {
                return;
            }
            // `[sync] rate`: a chunk starts only with credit (pace.rs).
            if !self.pace.may_start() {
                return;
            }
            match self.bitmap.next_set(rs.cursor) {
                Some(s) => {
                    let limit =
                        self.pace.chunk_limit(BLOCK_SIZE, CHUNK_BLOCKS * BLOCK_SIZE) / BLOCK_SIZE;
                    let e = self.bitmap.next_clear_before(s, s + limit);
                    // Chunks lie wholly inside or outside the regions
                    // compared by checksum (`csum`).
                    let e = super::csum::split_at_eligibility(&link.csum.extents, s, e);
                    rs.cursor = e;
                    let start = s * BLOCK_SIZE;
                    let end = (e * BLOCK_SIZE).min(self.md.layout.data_size);
                    rs.started(end - start);
                    self.pace.take(end - start);
                    let owner = self.next_id();
                    self.range_owner
                        .insert(owner, RangeOwner::Resync { start, end });
                    if self.ranges.admit(owner, start, end) {
                        self.start_resync_read(owner, start, end);
                    }
                }
                None if rs.chunks > 0 => return,
                None if self.bitmap.count() > 0 => rs.cursor = 0,
                None => {
                    rs.done_sent = true;
                    self.send(Message::ResyncDone);
                    return;
                }
            }
        }
    }

    pub(super) fn start_resync_read(&mut self, owner: u64, start: u64, end: u64) {
        if self.csum_eligible(start) {
            return self.start_csum_read(owner, start, end);
        }
        let op = Op::Read {
            offset: start,
            len: (end - start) as usize,
        };
        self.submit(Device::Data, op, Purpose::ResyncRead { owner, start, end });
    }

    fn chunk_finished(&mut self, owner: u64, start: u64, end: u64) {
        if let Some(rs) = self.link.as_mut().and_then(|l| l.resync.as_mut()) {
            rs.finished(end - start);
        }
        self.release_range(owner, start, end);
    }

    pub(super) fn resync_read_done(
        &mut self,
        owner: u64,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        let syncing = self
            .link
            .as_ref()
            .is_some_and(|l| matches!(l.phase, Phase::SyncSource { .. }));
        match result {
            Ok(Done::Read(data)) if syncing => {
                self.counters.disk_read_bytes += data.len() as u64;
                self.link
                    .as_mut()
                    .expect("syncing")
                    .resync_sent
                    .insert(start, owner);
                // A chunk that reads as zeros needs no data on the wire:
                // the target writes zeros over the range (ResyncZero). The
                // read ran under the chunk's range lock, so the zeros are
                // what the blocks hold (docs/durability.md, invariant 24).
                if zeros::is_zero(&data) {
                    self.counters.resync_zero_sent_bytes += data.len() as u64;
                    self.send(Message::ResyncZero {
                        offset: start,
                        len: data.len() as u32,
                    });
                } else {
                    self.counters.resync_sent_bytes += data.len() as u64;
                    self.send(Message::ResyncData {
                        offset: start,
                        data,
                    });
                }
            }
            Ok(_) => self.chunk_finished(owner, start, end),
            Err(e) => {
                let code = self.io_error(e);
                self.chunk_finished(owner, start, end);
                if syncing {
                    self.stop_link_for(format!("resync read failed on this node ({code})"));
                }
            }
        }
        self.resume();
    }

    /// Source: the target wrote a chunk (or failed to).
    pub(super) fn resync_acked(&mut self, offset: u64, len: u32, ok: bool) -> Result<(), String> {
        let link = self.link.as_mut().expect("link");
        let owner = link
            .resync_sent
            .remove(&offset)
            .ok_or_else(|| format!("ResyncAck for unknown offset {offset}"))?;
        let Some(RangeOwner::Resync { start, end }) = self.range_owner.get(&owner).copied() else {
            return Err("ResyncAck for a chunk that is not in flight".into());
        };
        if end - start != u64::from(len) {
            return Err(format!(
                "ResyncAck length {len} does not match the chunk ({} bytes)",
                end - start
            ));
        }
        if !ok {
            self.chunk_finished(owner, start, end);
            return Err("the peer failed to write resync data".into());
        }
        let (s, e) = Bitmap::blocks_of(start, end - start);
        self.bitmap.clear(s, e);
        self.sync_done = (self.sync_done + (e - s)).min(self.sync_total);
        self.chunk_finished(owner, start, end);
        self.pump();
        self.resume();
        Ok(())
    }

    /// Target: write received resync data (or zeros).
    pub(super) fn resync_receive(
        &mut self,
        phase: Phase,
        offset: u64,
        data: Option<Bytes>,
        zero_len: u32,
    ) -> Result<(), String> {
        if phase != Phase::SyncTarget {
            return Err("resync data while not sync target".into());
        }
        let len = data
            .as_ref()
            .map_or(u64::from(zero_len), |d| d.len() as u64);
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or("resync data past the end")?;
        let op = match data {
            Some(data) => {
                self.counters.resync_received_bytes += len;
                Op::Write {
                    offset,
                    data,
                    fua: false,
                }
            }
            // Zeros must really be there afterwards, whatever the target
            // held: WriteZeroes reads back as zeros (a hole is allowed), a
            // discard would not (docs/durability.md, invariant 24). Its
            // marks go after a flush, like data (invariant 15).
            None => {
                self.counters.resync_zero_received_bytes += len;
                Op::WriteZeroes {
                    offset,
                    len,
                    may_unmap: true,
                    fast_only: false,
                    fua: false,
                }
            }
        };
        self.submit(
            Device::Data,
            op,
            Purpose::ResyncWrite { start: offset, end },
        );
        Ok(())
    }

    pub(super) fn resync_write_done(
        &mut self,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        let ok = match result {
            Ok(_) => true,
            Err(e) => {
                self.io_error(e);
                false
            }
        };
        if ok {
            self.counters.disk_written_bytes += end - start;
            // Cleared only after a flush (see the module doc).
            let seq = self.next_clear_seq;
            self.next_clear_seq += 1;
            self.pending_clears
                .push_back((seq, Bitmap::blocks_of(start, end - start)));
            self.sync_done =
                (self.sync_done + (end - start).div_ceil(BLOCK_SIZE)).min(self.sync_total);
            let pending: u64 = self.pending_clears.iter().map(|(_, (s, e))| e - s).sum();
            if pending >= CHECKPOINT_BLOCKS {
                self.checkpoint();
            }
        }
        if self.link.is_some() {
            self.send(Message::ResyncAck {
                offset: start,
                len: (end - start) as u32,
                ok,
            });
        }
    }

    /// Target: flush, then clear the marks of every resync write completed
    /// before the flush was submitted.
    pub(super) fn checkpoint(&mut self) {
        if self.checkpointing || self.pending_clears.is_empty() {
            return;
        }
        self.checkpointing = true;
        let upto = self.next_clear_seq;
        self.submit(Device::Data, Op::Flush, Purpose::TargetCheckpoint { upto });
    }

    /// A flush covering the resync writes before `upto` completed.
    pub(super) fn apply_clears(&mut self, upto: u64) {
        while let Some(&(seq, (s, e))) = self.pending_clears.front() {
            if seq >= upto {
                break;
            }
            self.bitmap.clear(s, e);
            self.pending_clears.pop_front();
        }
    }

    pub(super) fn checkpoint_done(&mut self, upto: u64, result: Result<Done, StorageError>) {
        self.checkpointing = false;
        match result {
            Ok(_) => {
                self.apply_clears(upto);
                // Keep the progress across a crash too (lazily: nothing
                // waits for these pages).
                let dirty: Vec<usize> = self.bitmap.dirty_pages().collect();
                for p in dirty {
                    self.write_page(p);
                }
            }
            Err(e) => {
                self.io_error(e);
            }
        }
    }

    fn stop_link_for(&mut self, reason: String) {
        self.outputs
            .push_back(super::node::Output::Link(super::node::LinkCommand::Drop(
                reason.clone(),
            )));
        self.link_lost(&reason);
    }
}
