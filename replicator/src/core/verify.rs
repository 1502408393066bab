//! Online verify (`repctl verify`, DRBD's `drbdadm verify`): compare every
//! block with the peer by checksum; report the blocks that differ and mark
//! them out of sync on both nodes. Nothing is copied: as in DRBD, the
//! marked blocks are resynced by the next resync, which an operator starts
//! with `repctl disconnect` + `repctl connect` (the Primary is then the
//! sync source; docs/decisions.md).
//!
//! The node where the command runs is VerifySource, its peer
//! VerifyTarget; both stay Established (client writes replicate as
//! always). Protocol:
//! 1. the source sends `VerifyStart`;
//! 2. the source walks the device in chunks of [`CHUNK_BLOCKS`], at most
//!    [`MAX_CHUNKS`] at a time; each chunk takes its byte range like a
//!    client write, is read, and its per-block digests (`verify-alg`) go
//!    out as `VerifyRequest`;
//! 3. the target takes the same range, reads, compares, marks the blocks
//!    that differ and answers `VerifyReply` with their bitmask;
//! 4. the source marks the same blocks and releases the chunk's range;
//! 5. after the last chunk the source sends `VerifyDone`; both report
//!    (log, `status.verify`, a `verify-finished` event) and write the
//!    marks durably; the command is answered with the result.
//!
//! Exactness (docs/durability.md, invariant 27): when the source is
//! Primary it holds the chunk's range from before its read until the
//! reply, so no client write can land between the two reads (a write in
//! flight before finished on both disks: protocol C). When the target is
//! Primary it takes the range when the request arrives, so a client write
//! between the source's read and that moment can make a block look
//! different. With a protocol 2 peer the target then keeps the range,
//! sends its own digests (`VerifyRecheck`), and the source reads the chunk
//! again and answers which blocks still differ (`VerifyRecheckReply`):
//! with the range held, both disks have every client write to it and no
//! new one starts, so a block counts only if it differed both times. A
//! real difference is never missed, because replication writes every
//! block to both nodes. (A protocol 1 peer gets no recheck: false
//! positives are possible there, as DRBD's man page warns.)

use std::collections::HashMap;

use bytes::Bytes;
use tandem_proto::peer::Message;
use tracing::{info, warn};

use super::csum::{Alg, block_sums, differing, runs};
use super::node::{Deferred, Device, Need, Node, Phase, Purpose, RangeOwner};
use super::states::DiskState;
use crate::metadata::BLOCK_SIZE;
use crate::status::{VerifyRange, VerifyStatus};
use crate::storage::{Done, Op, StorageError};

/// Blocks per verify chunk (1 MiB).
pub const CHUNK_BLOCKS: u64 = 256;
/// Verify chunks in flight at once.
pub const MAX_CHUNKS: usize = 8;
/// Ranges listed in the report (the count is always exact).
pub const MAX_REPORTED_RANGES: usize = 64;

/// A verify in progress on this link.
#[derive(Debug)]
pub(super) struct VerifyRun {
    /// VerifySource (this node ran the command) or VerifyTarget.
    pub source: bool,
    pub alg: Alg,
    /// Source: the command to answer.
    pub cmd: Option<u64>,
    pub total_blocks: u64,
    pub done_blocks: u64,
    /// Source: next block to take.
    pub cursor: u64,
    /// Source: chunks waiting for their range or their read, by owner.
    pub reading: HashMap<u64, (u64, u64)>,
    /// Source: requests sent, by offset: (owner, end).
    pub sent: HashMap<u64, (u64, u64)>,
    /// Target: requests waiting for their range or read, by owner.
    pub compares: HashMap<u64, (Alg, Bytes)>,
    /// Target (Primary): chunks whose blocks differed on the first compare,
    /// held against client writes until the source's second read answers,
    /// by offset: (owner, end, first bitmask).
    pub rechecks: HashMap<u64, (u64, u64, Vec<u8>)>,
    /// Source: chunks being read again for a recheck, by offset: the
    /// read's id and the target's checksums.
    pub rereads: HashMap<u64, (u64, Alg, Bytes)>,
    /// Differing block runs found so far (merged).
    pub found: Vec<(u64, u64)>,
    pub found_blocks: u64,
}

impl VerifyRun {
    fn new(source: bool, alg: Alg, cmd: Option<u64>, total_blocks: u64) -> Self {
        VerifyRun {
            source,
            alg,
            cmd,
            total_blocks,
            done_blocks: 0,
            cursor: 0,
            reading: HashMap::new(),
            sent: HashMap::new(),
            compares: HashMap::new(),
            rechecks: HashMap::new(),
            rereads: HashMap::new(),
            found: Vec::new(),
            found_blocks: 0,
        }
    }

    fn record(&mut self, a: u64, b: u64) {
        self.found_blocks += b - a;
        match self.found.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => self.found.push((a, b)),
        }
    }

    fn status(&self, running: bool, complete: bool) -> VerifyStatus {
        VerifyStatus {
            role: if self.source {
                "VerifySource"
            } else {
                "VerifyTarget"
            }
            .into(),
            alg: self.alg.name().into(),
            running,
            complete,
            done_bytes: self.done_blocks * BLOCK_SIZE,
            total_bytes: self.total_blocks * BLOCK_SIZE,
            out_of_sync_blocks: self.found_blocks,
            out_of_sync_bytes: self.found_blocks * BLOCK_SIZE,
            ranges: self
                .found
                .iter()
                .take(MAX_REPORTED_RANGES)
                .map(|&(a, b)| VerifyRange {
                    offset: a * BLOCK_SIZE,
                    len: (b - a) * BLOCK_SIZE,
                })
                .collect(),
        }
    }
}

/// `offset+len, …` of the first reported ranges.
fn describe_ranges(s: &VerifyStatus) -> String {
    let mut out: Vec<String> = s
        .ranges
        .iter()
        .map(|r| format!("{}+{}", r.offset, r.len))
        .collect();
    let listed: u64 = s.ranges.iter().map(|r| r.len).sum();
    if listed < s.out_of_sync_bytes {
        out.push("…".into());
    }
    out.join(", ")
}

impl<T> Node<T> {
    /// Give a chunk's range back and start the client writes that waited
    /// for it.
    fn free_range(&mut self, owner: u64, start: u64, end: u64) {
        self.release_range(owner, start, end);
        self.resume();
    }

    /// Whether a verify runs on the current link (source or target).
    pub(super) fn verify_running(&self) -> Option<bool> {
        self.link.as_ref()?.verify.as_ref().map(|v| v.source)
    }

    /// Verify progress in bytes: (done, total).
    pub(super) fn verify_progress(&self) -> Option<(u64, u64)> {
        let v = self.link.as_ref()?.verify.as_ref()?;
        Some((v.done_blocks * BLOCK_SIZE, v.total_blocks * BLOCK_SIZE))
    }

    /// `repctl verify`: this node becomes VerifySource.
    pub(super) fn verify(&mut self, cmd: u64) -> Result<(), super::node::CommandError> {
        use super::node::CommandError;
        if self.p.peer.is_none() {
            return Err(CommandError::failed(
                "a single-node resource has no peer to verify against",
            ));
        }
        if self.stopping {
            return Err(CommandError::failed("repd is stopping"));
        }
        let Some(link) = self.link.as_ref() else {
            return Err(CommandError::failed(
                "verify needs a Connected peer; the link is down (`repctl connect`, `repctl wait-connect`)",
            ));
        };
        if link.verify.is_some() {
            return Err(CommandError::failed(
                "an online verify is already running on this link",
            ));
        }
        let peer_disk = link.peer.map(|p| p.disk);
        if link.phase != Phase::Established
            || self.disk != DiskState::UpToDate
            || peer_disk != Some(DiskState::UpToDate)
        {
            return Err(CommandError::failed(format!(
                "verify needs both disks UpToDate and no resync running \
                 (replication is {}, this disk {}, the peer's {}); wait for the resync (`repctl wait-sync`)",
                self.replication(),
                self.disk,
                peer_disk.unwrap_or(DiskState::DUnknown)
            )));
        }
        let total = self.bitmap.blocks();
        let alg = self.verify_alg;
        info!(
            "online verify started as VerifySource: {} bytes by {}",
            total * BLOCK_SIZE,
            alg.name()
        );
        let run = VerifyRun::new(true, alg, Some(cmd), total);
        self.last_verify = Some(run.status(true, false));
        self.link.as_mut().expect("link").verify = Some(run);
        self.send(Message::VerifyStart {
            total_bytes: total * BLOCK_SIZE,
        });
        self.event("replication");
        self.verify_pump();
        Ok(())
    }

    /// Source: start as many chunks as allowed; finish when all replied.
    pub(super) fn verify_pump(&mut self) {
        loop {
            let blocks = self.bitmap.blocks();
            let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
                return;
            };
            if !v.source {
                return;
            }
            let in_flight = v.reading.len() + v.sent.len();
            if v.cursor >= blocks {
                if in_flight == 0 {
                    return self.verify_finished();
                }
                return;
            }
            if in_flight >= MAX_CHUNKS {
                return;
            }
            // `[sync] rate` caps verify too (as DRBD's resync controller
            // paces `drbdadm verify`): it reads both disks end to end, and
            // an administrator who capped the resync to spare the
            // application wants the same from a verify.
            if !self.pace.may_start() {
                return;
            }
            let limit = self.pace.chunk_limit(BLOCK_SIZE, CHUNK_BLOCKS * BLOCK_SIZE) / BLOCK_SIZE;
            let s = v.cursor;
            let e = (s + limit).min(blocks);
            v.cursor = e;
            let (start, end) = (s * BLOCK_SIZE, e * BLOCK_SIZE);
            self.pace.take(end - start);
            let owner = self.next_id;
            self.next_id += 1;
            let v = self
                .link
                .as_mut()
                .and_then(|l| l.verify.as_mut())
                .expect("verify");
            v.reading.insert(owner, (start, end));
            self.range_owner
                .insert(owner, RangeOwner::Verify { start, end });
            if self.ranges.admit(owner, start, end) {
                self.verify_admitted(owner, start, end);
            }
        }
    }

    /// A verify chunk (either side) holds its range: read it, unless its
    /// verify is gone.
    pub(super) fn verify_admitted(&mut self, owner: u64, start: u64, end: u64) {
        let known = self.link.as_ref().and_then(|l| l.verify.as_ref()).map(|v| {
            (
                v.reading.contains_key(&owner),
                v.compares.contains_key(&owner),
            )
        });
        let op = Op::Read {
            offset: start,
            len: (end - start) as usize,
        };
        match known {
            Some((true, _)) => {
                self.submit(Device::Data, op, Purpose::VerifyRead { owner, start, end })
            }
            Some((_, true)) => self.submit(
                Device::Data,
                op,
                Purpose::VerifyCompare { owner, start, end },
            ),
            _ => self.free_range(owner, start, end),
        }
    }

    /// Source: our side of a chunk was read; send its digests.
    pub(super) fn verify_read_done(
        &mut self,
        owner: u64,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        let known = self
            .link
            .as_mut()
            .and_then(|l| l.verify.as_mut())
            .is_some_and(|v| v.reading.remove(&owner).is_some());
        if !known {
            return self.free_range(owner, start, end);
        }
        let v = self
            .link
            .as_mut()
            .and_then(|l| l.verify.as_mut())
            .expect("known");
        let alg = v.alg;
        match result {
            Ok(Done::Read(data)) => {
                v.sent.insert(start, (owner, end));
                let sums = Bytes::from(block_sums(alg, &data));
                self.send(Message::VerifyRequest {
                    offset: start,
                    len: (end - start) as u32,
                    alg: alg.code(),
                    sums,
                });
            }
            other => {
                let why = match other {
                    Err(e) => format!("reading this node's disk failed ({})", self.io_error(e)),
                    _ => "reading this node's disk returned no data".into(),
                };
                self.free_range(owner, start, end);
                self.verify_abort(&why, true);
            }
        }
    }

    /// Target: the peer started a verify.
    pub(super) fn on_verify_start(&mut self, phase: Phase, total_bytes: u64) -> Result<(), String> {
        if phase != Phase::Established || self.verify_running().is_some() {
            // A resync is starting here (or a verify already runs): the
            // peer stops its verify.
            warn!("refusing the peer's online verify: not Established here");
            self.send(Message::VerifyDone { complete: false });
            return Ok(());
        }
        if total_bytes != self.size() {
            return Err("verify of a device of another size".into());
        }
        let alg = self.verify_alg;
        info!(
            "online verify started by {} (VerifyTarget): {total_bytes} bytes",
            self.p.peer.as_deref().unwrap_or("the peer")
        );
        let run = VerifyRun::new(false, alg, None, self.bitmap.blocks());
        self.last_verify = Some(run.status(true, false));
        self.link.as_mut().expect("link").verify = Some(run);
        self.event("replication");
        Ok(())
    }

    /// Target: compare a chunk with the source's digests.
    pub(super) fn on_verify_request(
        &mut self,
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    ) -> Result<(), String> {
        let alg = Alg::from_code(alg).ok_or("unknown checksum algorithm")?;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= self.size() && len > 0 && offset.is_multiple_of(BLOCK_SIZE))
            .ok_or("verify request outside the device")?;
        if sums.len() as u64 != u64::from(len).div_ceil(BLOCK_SIZE) * alg.digest_len() as u64 {
            return Err("verify request with the wrong number of checksums".into());
        }
        let owner = self.next_id;
        self.next_id += 1;
        let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
            return Ok(()); // stopped here; the source hears VerifyDone
        };
        if v.source {
            return Err("verify request while this node is VerifySource".into());
        }
        v.alg = alg;
        v.compares.insert(owner, (alg, sums));
        // The range is held like a client write's, so on a Primary no
        // client write runs through the compare.
        self.range_owner
            .insert(owner, RangeOwner::Verify { start: offset, end });
        if self.ranges.admit(owner, offset, end) {
            self.verify_admitted(owner, offset, end);
        }
        Ok(())
    }

    /// Target: our side of a chunk was read; compare, mark, answer.
    pub(super) fn verify_compare_done(
        &mut self,
        owner: u64,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        let Some((alg, sums)) = self
            .link
            .as_mut()
            .and_then(|l| l.verify.as_mut())
            .and_then(|v| v.compares.remove(&owner))
        else {
            return self.free_range(owner, start, end);
        };
        let n = (end - start).div_ceil(BLOCK_SIZE);
        let (mask, data) = match result {
            Ok(Done::Read(data)) => (differing(alg, &data, &sums), data),
            Ok(_) => (None, Bytes::new()),
            Err(e) => {
                self.free_range(owner, start, end);
                let code = self.io_error(e);
                return self
                    .verify_abort(&format!("reading this node's disk failed ({code})"), true);
            }
        };
        let Some(mask) = mask else {
            self.free_range(owner, start, end);
            return self.verify_abort("this node read a chunk of the wrong size", true);
        };
        // Exactness from the Secondary (docs/durability.md, invariant 27):
        // a client write can have reached this Primary's disk and not yet
        // the source's when it read, so a difference is only a candidate.
        // This node keeps the range (every earlier client write to it has
        // completed on both disks, protocol C, and no new one starts) and
        // has the source read again against its checksums.
        let recheck = mask.iter().any(|&b| b != 0)
            && self.role == super::states::Role::Primary
            && self.link.as_ref().is_some_and(|l| l.version >= 2);
        if recheck {
            let v = self
                .link
                .as_mut()
                .and_then(|l| l.verify.as_mut())
                .expect("compares belong to a verify");
            v.rechecks.insert(start, (owner, end, mask));
            self.send(Message::VerifyRecheck {
                offset: start,
                len: (end - start) as u32,
                alg: alg.code(),
                sums: Bytes::from(block_sums(alg, &data)),
            });
            return;
        }
        self.free_range(owner, start, end);
        self.verify_mark(start, n, &mask);
        self.send(Message::VerifyReply {
            offset: start,
            len: (end - start) as u32,
            differ: Bytes::from(mask),
        });
    }

    /// Mark (in memory; made durable when the verify ends) and record the
    /// differing blocks of the chunk at `start`.
    fn verify_mark(&mut self, start: u64, n: u64, mask: &[u8]) {
        let first = start / BLOCK_SIZE;
        let differ = runs(mask, n, true);
        for &(a, b) in &differ {
            warn!(
                "online verify: blocks {}..{} (bytes {}+{}) differ from the peer; marked out of sync",
                first + a,
                first + b,
                (first + a) * BLOCK_SIZE,
                (b - a) * BLOCK_SIZE
            );
            self.bitmap.set(first + a, first + b);
        }
        if let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) {
            for &(a, b) in &differ {
                v.record(first + a, first + b);
            }
            v.done_blocks = (v.done_blocks + n).min(v.total_blocks);
            self.last_verify = Some(v.status(true, false));
            if !differ.is_empty() {
                self.event("verify");
            }
        }
    }

    /// Source: the target (Primary) holds the chunk and wants it compared
    /// again against its checksums; read it once more.
    pub(super) fn on_verify_recheck(
        &mut self,
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    ) -> Result<(), String> {
        let alg = Alg::from_code(alg).ok_or("unknown checksum algorithm")?;
        let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
            return Ok(()); // stopped here already; the target hears VerifyDone
        };
        if !v.source {
            return Err("verify recheck while this node is VerifyTarget".into());
        }
        let Some(&(_, end)) = v.sent.get(&offset) else {
            return Err(format!("verify recheck for unknown offset {offset}"));
        };
        let n = u64::from(len).div_ceil(BLOCK_SIZE);
        if end - offset != u64::from(len)
            || sums.len() as u64 != n * alg.digest_len() as u64
            || v.rereads.contains_key(&offset)
        {
            return Err("verify recheck does not match its request".into());
        }
        let id = self.next_id;
        self.next_id += 1;
        let v = self
            .link
            .as_mut()
            .and_then(|l| l.verify.as_mut())
            .expect("checked above");
        v.rereads.insert(offset, (id, alg, sums));
        self.submit(
            Device::Data,
            Op::Read {
                offset,
                len: len as usize,
            },
            Purpose::VerifyReread {
                id,
                start: offset,
                end,
            },
        );
        Ok(())
    }

    /// Source: the second read of a chunk is done; tell the target which
    /// blocks still differ.
    pub(super) fn verify_reread_done(
        &mut self,
        id: u64,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
            return; // the verify ended meanwhile
        };
        if v.rereads.get(&start).is_none_or(|r| r.0 != id) {
            return; // a read for a verify that ended
        }
        let (_, alg, sums) = v.rereads.remove(&start).expect("checked");
        let mask = match result {
            Ok(Done::Read(data)) => differing(alg, &data, &sums),
            Ok(_) => None,
            Err(e) => {
                let code = self.io_error(e);
                return self
                    .verify_abort(&format!("reading this node's disk failed ({code})"), true);
            }
        };
        let Some(mask) = mask else {
            return self.verify_abort("this node read a chunk of the wrong size", true);
        };
        self.send(Message::VerifyRecheckReply {
            offset: start,
            len: (end - start) as u32,
            differ: Bytes::from(mask),
        });
    }

    /// Target: the source's second read answered. A block differs only if
    /// it differed both times; mark, release the chunk, answer.
    pub(super) fn on_verify_recheck_reply(
        &mut self,
        offset: u64,
        len: u32,
        differ: Bytes,
    ) -> Result<(), String> {
        let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
            return Ok(());
        };
        let Some((owner, end, first)) = v.rechecks.remove(&offset) else {
            return Err(format!("verify recheck reply for unknown offset {offset}"));
        };
        let n = u64::from(len).div_ceil(BLOCK_SIZE);
        if end - offset != u64::from(len) || differ.len() != first.len() {
            self.free_range(owner, offset, end);
            return Err("verify recheck reply does not match its request".into());
        }
        let mask: Vec<u8> = first
            .iter()
            .zip(differ.iter())
            .map(|(a, b)| a & b)
            .collect();
        self.free_range(owner, offset, end);
        self.verify_mark(offset, n, &mask);
        self.send(Message::VerifyReply {
            offset,
            len,
            differ: Bytes::from(mask),
        });
        Ok(())
    }

    /// Source: the target compared a chunk.
    pub(super) fn on_verify_reply(
        &mut self,
        offset: u64,
        len: u32,
        differ: Bytes,
    ) -> Result<(), String> {
        let Some(v) = self.link.as_mut().and_then(|l| l.verify.as_mut()) else {
            return Ok(()); // stopped here already
        };
        let Some(&(owner, end)) = v.sent.get(&offset) else {
            return Err(format!("verify reply for unknown offset {offset}"));
        };
        let n = u64::from(len).div_ceil(BLOCK_SIZE);
        if end - offset != u64::from(len) || differ.len() as u64 != n.div_ceil(8) {
            return Err("verify reply does not match its request".into());
        }
        v.sent.remove(&offset);
        self.free_range(owner, offset, end);
        self.verify_mark(offset, n, &differ);
        self.verify_pump();
        Ok(())
    }

    /// The peer finished or stopped the verify.
    pub(super) fn on_verify_done(&mut self, complete: bool) -> Result<(), String> {
        match self.verify_running() {
            None => Ok(()),
            Some(false) if complete => {
                self.verify_report(true, None);
                Ok(())
            }
            Some(_) => {
                self.verify_abort("the peer stopped the verify", false);
                Ok(())
            }
        }
    }

    /// Source: every chunk was compared.
    fn verify_finished(&mut self) {
        self.send(Message::VerifyDone { complete: true });
        self.verify_report(true, None);
    }

    /// Stop the verify on this link (a read failed, a resync starts, the
    /// peer stopped it); tell the peer if it does not know.
    pub(super) fn verify_abort(&mut self, reason: &str, tell_peer: bool) {
        if self.verify_running().is_none() {
            return;
        }
        if tell_peer {
            self.send(Message::VerifyDone { complete: false });
        }
        self.verify_report(false, Some(reason.to_string()));
    }

    /// The verify on this link ended (the link may be gone: `run` given).
    fn verify_report(&mut self, complete: bool, reason: Option<String>) {
        let Some(run) = self.link.as_mut().and_then(|l| l.verify.take()) else {
            return;
        };
        self.verify_ended(run, complete, reason);
    }

    /// Report a verify that ended; release the ranges of requests that
    /// will get no answer.
    pub(super) fn verify_ended(&mut self, run: VerifyRun, complete: bool, reason: Option<String>) {
        // In key order, so a simulation seed replays (see `link_lost`).
        let mut held: Vec<(u64, u64, u64)> = run
            .sent
            .iter()
            .map(|(&offset, &(owner, end))| (offset, owner, end))
            .chain(
                run.rechecks
                    .iter()
                    .map(|(&offset, &(owner, end, _))| (offset, owner, end)),
            )
            .collect();
        held.sort_unstable();
        for (offset, owner, end) in held {
            self.free_range(owner, offset, end);
        }
        let status = run.status(false, complete);
        let found = format!(
            "{} blocks ({} bytes) out of sync{}",
            status.out_of_sync_blocks,
            status.out_of_sync_bytes,
            if status.ranges.is_empty() {
                String::new()
            } else {
                format!(": {}", describe_ranges(&status))
            }
        );
        let message = match &reason {
            None => {
                let next = if status.out_of_sync_blocks > 0 {
                    "; they are marked: `repctl disconnect` then `repctl connect` resyncs them from the Primary"
                } else {
                    ""
                };
                let m = format!(
                    "online verify finished ({}, {} bytes compared): {found}{next}",
                    status.alg, status.done_bytes
                );
                if status.out_of_sync_blocks > 0 {
                    warn!("{m}");
                } else {
                    info!("{m}");
                }
                m
            }
            Some(why) => {
                let m = format!(
                    "online verify stopped after {} of {} bytes: {why}; found so far: {found} (marked)",
                    status.done_bytes, status.total_bytes
                );
                warn!("{m}");
                m
            }
        };
        self.last_verify = Some(status);
        self.event("verify-finished");
        self.event("replication");
        // Invariant 27 (docs/durability.md): verify only marks, and the
        // marks are durable before the result is answered.
        let seq = self.md.sequence;
        match run.cmd {
            Some(cmd) => self.wait(
                Need::Everything(seq),
                Deferred::VerifyAnswered {
                    cmd,
                    result: if reason.is_none() {
                        Ok(message)
                    } else {
                        Err(message)
                    },
                },
            ),
            None => {
                let dirty: Vec<usize> = self.bitmap.dirty_pages().collect();
                for p in dirty {
                    self.write_page(p);
                }
            }
        }
    }
}
