//! Block checksums, and the checksum-based resync of activity-log regions
//! after a Primary crash.
//!
//! The pure part (no node state): per-4 KiB-block digests ([`block_sums`]),
//! the comparison that yields a bitmask of differing blocks
//! ([`differing`]), and runs of a bitmask ([`runs`]). Online verify
//! (`verify.rs`) uses them too.
//!
//! Checksum-based resync (DRBD's `csums-alg`, limited to the crashed
//! Primary's activity-log regions like `csums-after-crash-only`): after a
//! Primary crash every extent of its activity log is marked out of sync,
//! but almost all of those blocks reached the peer. So:
//! 1. during the bitmap exchange each node whose metadata says it crashed
//!    as Primary sends its activity-log extents (`CsumExtents`); both sides
//!    keep the union for this link (`CsumLink::extents`);
//! 2. the sync source cuts its chunks at the edges of those extents
//!    (`split_at_eligibility`); a chunk inside them is read under its range
//!    lock like any resync chunk, and instead of the data the source sends
//!    one digest per block (`CsumRequest`, with the `verify-alg` in use);
//! 3. the target reads the same range, compares, and answers with a
//!    bitmask of the blocks that differ (`CsumReply`); the blocks that
//!    match are treated like blocks it wrote: their marks go after its next
//!    checkpoint flush (docs/durability.md, invariant 26);
//! 4. the source clears its marks of the matching blocks, sends the
//!    differing runs as ordinary `ResyncData` (the target writes and
//!    acknowledges them as always), and releases the chunk's range once
//!    every run is acknowledged.
//!
//! Only the amount of data sent depends on the eligible set: the result is
//! correct for any set, since a block is skipped only when the target
//! found it identical.

use std::collections::{BTreeSet, HashMap, HashSet};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tandem_proto::peer::Message;
use tandem_proto::peer::message::{CSUM_ALG_CRC32, CSUM_ALG_SHA256};
use tracing::info;

use super::bitmap::Bitmap;
use super::node::{Device, LinkCommand, Node, Output, Phase, Purpose};
use crate::config::VerifyAlg;
use crate::metadata::activity_log::AL_EXTENT_SIZE;
use crate::metadata::{BLOCK_SIZE, MdFlags};
use crate::storage::{Done, Op, StorageError};

/// A block checksum algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Crc32,
    Sha256,
}

impl Alg {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Alg::Crc32 => CSUM_ALG_CRC32,
            Alg::Sha256 => CSUM_ALG_SHA256,
        }
    }

    pub fn from_code(code: u8) -> Option<Alg> {
        match code {
            CSUM_ALG_CRC32 => Some(Alg::Crc32),
            CSUM_ALG_SHA256 => Some(Alg::Sha256),
            _ => None,
        }
    }

    /// Bytes per block digest.
    pub fn digest_len(self) -> usize {
        match self {
            Alg::Crc32 => 4,
            Alg::Sha256 => 32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Alg::Crc32 => "crc32",
            Alg::Sha256 => "sha256",
        }
    }
}

impl From<VerifyAlg> for Alg {
    fn from(a: VerifyAlg) -> Alg {
        match a {
            VerifyAlg::Crc32 => Alg::Crc32,
            VerifyAlg::Sha256 => Alg::Sha256,
        }
    }
}

/// Append the digest of one block to `out`.
fn digest_into(alg: Alg, block: &[u8], out: &mut Vec<u8>) {
    match alg {
        Alg::Crc32 => out.extend_from_slice(&crc32fast::hash(block).to_be_bytes()),
        Alg::Sha256 => out.extend_from_slice(&Sha256::digest(block)),
    }
}

/// One digest per 4 KiB block of `data` (the last block may be short).
pub fn block_sums(alg: Alg, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(BLOCK_SIZE as usize) * alg.digest_len());
    for block in data.chunks(BLOCK_SIZE as usize) {
        digest_into(alg, block, &mut out);
    }
    out
}

/// Compare `data` block by block with the peer's digests `sums`: a bitmask
/// (bit `i` of byte `i / 8`, LSB first) of the blocks whose digests
/// differ. `None` if `sums` does not hold one digest per block.
pub fn differing(alg: Alg, data: &[u8], sums: &[u8]) -> Option<Vec<u8>> {
    let n = data.len().div_ceil(BLOCK_SIZE as usize);
    let d = alg.digest_len();
    if sums.len() != n * d {
        return None;
    }
    let mut mask = vec![0u8; n.div_ceil(8)];
    let mut mine = Vec::with_capacity(d);
    for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
        mine.clear();
        digest_into(alg, block, &mut mine);
        if mine[..] != sums[i * d..(i + 1) * d] {
            mask[i / 8] |= 1 << (i % 8);
        }
    }
    Some(mask)
}

/// A bitmask with every one of `n` blocks marked as differing.
pub fn all_differ(n: u64) -> Vec<u8> {
    let mut mask = vec![0u8; (n as usize).div_ceil(8)];
    for i in 0..n as usize {
        mask[i / 8] |= 1 << (i % 8);
    }
    mask
}

/// Runs `[a, b)` of blocks `0..n` whose bit in `mask` equals `set`.
pub fn runs(mask: &[u8], n: u64, set: bool) -> Vec<(u64, u64)> {
    let bit = |i: u64| mask[(i / 8) as usize] & (1 << (i % 8)) != 0;
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if bit(i) != set {
            i += 1;
            continue;
        }
        let a = i;
        while i < n && bit(i) == set {
            i += 1;
        }
        out.push((a, i));
    }
    out
}

/// Blocks per activity-log extent.
const EXTENT_BLOCKS: u64 = AL_EXTENT_SIZE / BLOCK_SIZE;

/// Cut the chunk `[s, e)` (blocks) so that it lies entirely inside or
/// entirely outside the eligible extents: the new end.
pub fn split_at_eligibility(extents: &BTreeSet<u32>, s: u64, e: u64) -> u64 {
    if extents.is_empty() {
        return e;
    }
    let inside = |b: u64| extents.contains(&((b / EXTENT_BLOCKS) as u32));
    let first = inside(s);
    let mut x = (s / EXTENT_BLOCKS + 1) * EXTENT_BLOCKS;
    while x < e {
        if inside(x) != first {
            return x;
        }
        x += EXTENT_BLOCKS;
    }
    e
}

/// A checksum chunk on the source, from `CsumRequest` until every
/// differing run is acknowledged.
#[derive(Debug)]
pub(super) struct CsumChunk {
    pub owner: u64,
    pub end: u64,
    /// The chunk's data as read (the differing runs are sent from it).
    pub data: Bytes,
    /// `CsumReply` received.
    pub replied: bool,
    /// Differing runs sent and not acknowledged.
    pub pending: u32,
}

/// Checksum-resync state of one link.
#[derive(Debug, Default)]
pub(super) struct CsumLink {
    /// Activity-log extents of a crashed Primary (either node's): chunks
    /// inside them are compared by checksum first.
    pub extents: BTreeSet<u32>,
    /// Source: chunk owners whose read is in flight.
    pub reading: HashSet<u64>,
    /// Source: chunks by start offset, after their checksums were sent.
    pub chunks: HashMap<u64, CsumChunk>,
    /// Source: differing runs sent as `ResyncData`, by offset → chunk start.
    pub sent: HashMap<u64, u64>,
}

impl<T> Node<T> {
    /// This node's activity-log extents if it crashed as Primary: the
    /// regions a checksum resync compares. While `CRASHED_PRIMARY` is set
    /// the node has not been Primary since (promotion clears the flag), so
    /// the newest durable transaction is still the crashed one.
    pub(super) fn crash_extents(&self) -> Vec<u32> {
        if self.md.flags.has(MdFlags::CRASHED_PRIMARY) && self.al_enabled() {
            self.al.durable_extents().collect()
        } else {
            Vec::new()
        }
    }

    /// During the bitmap exchange: tell the peer which regions to compare
    /// by checksum.
    pub(super) fn send_csum_extents(&mut self) {
        let extents = self.crash_extents();
        if extents.is_empty() {
            return;
        }
        info!(
            "activity-log regions of the crash ({} extents, {} MiB) will be compared by checksum before resyncing",
            extents.len(),
            (extents.len() as u64 * AL_EXTENT_SIZE) >> 20
        );
        if let Some(link) = self.link.as_mut() {
            link.csum.extents.extend(extents.iter().copied());
        }
        self.send(Message::CsumExtents { extents });
    }

    pub(super) fn on_csum_extents(&mut self, extents: Vec<u32>) -> Result<(), String> {
        let link = self.link.as_mut().expect("link");
        if !matches!(link.phase, Phase::Bitmaps { .. }) {
            return Err("checksum extents outside of a bitmap exchange".into());
        }
        link.csum.extents.extend(extents);
        Ok(())
    }

    /// Source: whether the chunk starting at byte `start` is compared by
    /// checksum (chunks are cut at the extents' edges).
    pub(super) fn csum_eligible(&self, start: u64) -> bool {
        self.link.as_ref().is_some_and(|l| {
            matches!(l.phase, Phase::SyncSource { .. })
                && l.csum.extents.contains(&((start / AL_EXTENT_SIZE) as u32))
        })
    }

    /// Source: read a checksum chunk (its range is held).
    pub(super) fn start_csum_read(&mut self, owner: u64, start: u64, end: u64) {
        self.link
            .as_mut()
            .expect("syncing")
            .csum
            .reading
            .insert(owner);
        let op = Op::Read {
            offset: start,
            len: (end - start) as usize,
        };
        self.submit(Device::Data, op, Purpose::CsumRead { owner, start, end });
    }

    /// Source: a chunk is done (or abandoned): free its slot and range.
    fn csum_chunk_finished(&mut self, owner: u64, start: u64, end: u64) {
        if let Some(rs) = self.link.as_mut().and_then(|l| l.resync.as_mut()) {
            rs.finished(end - start);
        }
        self.release_range(owner, start, end);
        self.pump();
        self.resume();
    }

    pub(super) fn csum_read_done(
        &mut self,
        owner: u64,
        start: u64,
        end: u64,
        result: Result<Done, StorageError>,
    ) {
        // The chunk belongs to this link only if the link still knows it: a
        // read that outlived its link just gives its range back.
        let ours = self.link.as_mut().is_some_and(|l| {
            matches!(l.phase, Phase::SyncSource { .. }) && l.csum.reading.remove(&owner)
        });
        if !ours {
            self.release_range(owner, start, end);
            self.resume();
            return;
        }
        match result {
            Ok(Done::Read(data)) => {
                let alg = self.verify_alg;
                let sums = Bytes::from(block_sums(alg, &data));
                let link = self.link.as_mut().expect("ours");
                link.csum.chunks.insert(
                    start,
                    CsumChunk {
                        owner,
                        end,
                        data,
                        replied: false,
                        pending: 0,
                    },
                );
                self.send(Message::CsumRequest {
                    offset: start,
                    len: (end - start) as u32,
                    alg: alg.code(),
                    sums,
                });
            }
            Ok(_) => self.csum_chunk_finished(owner, start, end),
            Err(e) => {
                let code = self.io_error(e);
                self.csum_chunk_finished(owner, start, end);
                let reason = format!("resync read failed on this node ({code})");
                self.outputs
                    .push_back(Output::Link(LinkCommand::Drop(reason.clone())));
                self.link_lost(&reason);
            }
        }
    }

    /// Target: compare our blocks with the source's checksums.
    pub(super) fn on_csum_request(
        &mut self,
        phase: Phase,
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    ) -> Result<(), String> {
        if phase != Phase::SyncTarget {
            return Err("checksum request while not sync target".into());
        }
        let alg = Alg::from_code(alg).ok_or("unknown checksum algorithm")?;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|&e| e <= self.size() && len > 0 && offset.is_multiple_of(BLOCK_SIZE))
            .ok_or("checksum request outside the device")?;
        let blocks = u64::from(len).div_ceil(BLOCK_SIZE);
        if sums.len() as u64 != blocks * alg.digest_len() as u64 {
            return Err("checksum request with the wrong number of checksums".into());
        }
        let op = Op::Read {
            offset,
            len: len as usize,
        };
        self.submit(
            Device::Data,
            op,
            Purpose::CsumCompare {
                start: offset,
                end,
                alg,
                sums,
            },
        );
        Ok(())
    }

    /// Target: our side of a checksum chunk was read.
    pub(super) fn csum_compare_done(
        &mut self,
        start: u64,
        end: u64,
        alg: Alg,
        sums: Bytes,
        result: Result<Done, StorageError>,
    ) {
        let n = (end - start).div_ceil(BLOCK_SIZE);
        let mask = match result {
            Ok(Done::Read(data)) => differing(alg, &data, &sums).unwrap_or_else(|| all_differ(n)),
            Ok(_) => all_differ(n),
            Err(e) => {
                // Unreadable here: ask for the data.
                self.io_error(e);
                all_differ(n)
            }
        };
        let first = start / BLOCK_SIZE;
        let mut same = 0;
        for (a, b) in runs(&mask, n, false) {
            // Invariant 26 (docs/durability.md): a block found identical is
            // cleared only like a block this target wrote: after a flush
            // submitted after the read that compared it. The data the read
            // saw may still be only in a volatile cache (a replicated or
            // resync write not yet flushed, or pages a killed repd left
            // dirty); the checkpoint flush makes exactly that durable.
            let seq = self.next_clear_seq;
            self.next_clear_seq += 1;
            self.pending_clears.push_back((seq, (first + a, first + b)));
            same += b - a;
        }
        self.sync_done = (self.sync_done + same).min(self.sync_total);
        let pending: u64 = self.pending_clears.iter().map(|(_, (s, e))| e - s).sum();
        if pending >= super::resync::CHECKPOINT_BLOCKS {
            self.checkpoint();
        }
        if self.link.is_some() {
            self.send(Message::CsumReply {
                offset: start,
                len: (end - start) as u32,
                differ: Bytes::from(mask),
            });
        }
    }

    /// Source: the target compared a chunk.
    pub(super) fn on_csum_reply(
        &mut self,
        offset: u64,
        len: u32,
        differ: Bytes,
    ) -> Result<(), String> {
        let link = self.link.as_mut().expect("link");
        let Some(chunk) = link.csum.chunks.get_mut(&offset) else {
            return Err(format!("checksum reply for unknown offset {offset}"));
        };
        if chunk.replied || chunk.end - offset != u64::from(len) {
            return Err("checksum reply does not match its request".into());
        }
        let n = u64::from(len).div_ceil(BLOCK_SIZE);
        if differ.len() as u64 != n.div_ceil(8) {
            return Err("checksum reply with a bitmask of the wrong size".into());
        }
        chunk.replied = true;
        let (owner, end, data) = (chunk.owner, chunk.end, chunk.data.clone());
        let first = offset / BLOCK_SIZE;
        let mut same = 0;
        for (a, b) in runs(&differ, n, false) {
            // The target clears these after its next flush; a crash of the
            // target before it keeps its marks, and the next bitmap
            // exchange brings them back here.
            self.bitmap.clear(first + a, first + b);
            same += b - a;
        }
        self.sync_done = (self.sync_done + same).min(self.sync_total);
        self.counters.resync_same_bytes += (same * BLOCK_SIZE).min(u64::from(len));
        let differing = runs(&differ, n, true);
        for &(a, b) in &differing {
            let lo = (a * BLOCK_SIZE) as usize;
            let hi = ((b * BLOCK_SIZE) as usize).min(data.len());
            let run_offset = offset + lo as u64;
            self.counters.resync_sent_bytes += (hi - lo) as u64;
            let link = self.link.as_mut().expect("link");
            link.csum.sent.insert(run_offset, offset);
            if let Some(c) = link.csum.chunks.get_mut(&offset) {
                c.pending += 1;
            }
            self.send(Message::ResyncData {
                offset: run_offset,
                data: data.slice(lo..hi),
            });
        }
        if differing.is_empty() {
            self.link
                .as_mut()
                .expect("link")
                .csum
                .chunks
                .remove(&offset);
            self.csum_chunk_finished(owner, offset, end);
        }
        Ok(())
    }

    /// Source: whether a `ResyncAck` at `offset` is for a differing run of
    /// a checksum chunk.
    pub(super) fn csum_owns_ack(&self, offset: u64) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.csum.sent.contains_key(&offset))
    }

    /// Source: the target wrote a differing run (or failed to).
    pub(super) fn csum_run_acked(&mut self, offset: u64, len: u32, ok: bool) -> Result<(), String> {
        let link = self.link.as_mut().expect("link");
        let chunk_start = link.csum.sent.remove(&offset).expect("owned");
        if !ok {
            // Losing the link releases the chunk (csum_link_lost).
            return Err("the peer failed to write resync data".into());
        }
        let Some(chunk) = link.csum.chunks.get_mut(&chunk_start) else {
            return Err("ResyncAck for a checksum chunk that is not in flight".into());
        };
        if offset + u64::from(len) > chunk.end {
            return Err("ResyncAck past the end of its checksum chunk".into());
        }
        chunk.pending -= 1;
        let done = chunk.pending == 0;
        let (owner, end) = (chunk.owner, chunk.end);
        let (s, e) = Bitmap::blocks_of(offset, u64::from(len));
        self.bitmap.clear(s, e);
        self.sync_done = (self.sync_done + (e - s)).min(self.sync_total);
        if done {
            self.link
                .as_mut()
                .expect("link")
                .csum
                .chunks
                .remove(&chunk_start);
            self.csum_chunk_finished(owner, chunk_start, end);
        }
        Ok(())
    }

    /// The link is gone: chunks waiting for the peer give their ranges
    /// back and keep their marks (reads in flight release theirs when they
    /// complete).
    pub(super) fn csum_link_lost(&mut self, csum: CsumLink) {
        for (start, chunk) in super::link::sorted(csum.chunks) {
            self.release_range(chunk.owner, start, chunk.end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_blocks_compare_equal_and_changed_ones_differ() {
        for alg in [Alg::Crc32, Alg::Sha256] {
            let mut data = vec![0u8; 10 * 4096];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            let sums = block_sums(alg, &data);
            assert_eq!(sums.len(), 10 * alg.digest_len());
            assert_eq!(differing(alg, &data, &sums).unwrap(), vec![0, 0]);
            let mut other = data.clone();
            other[3 * 4096 + 17] ^= 1;
            other[9 * 4096] ^= 0x80;
            let mask = differing(alg, &other, &sums).unwrap();
            assert_eq!(mask, vec![1 << 3, 1 << 1]);
            assert_eq!(runs(&mask, 10, true), vec![(3, 4), (9, 10)]);
            assert_eq!(runs(&mask, 10, false), vec![(0, 3), (4, 9)]);
            // A wrong number of checksums is refused, not guessed at.
            assert_eq!(differing(alg, &other, &sums[1..]), None);
        }
    }

    #[test]
    fn crc32_and_sha256_are_the_standard_functions() {
        let block = vec![0u8; 4096];
        assert_eq!(
            block_sums(Alg::Crc32, &block),
            crc32fast::hash(&block).to_be_bytes().to_vec()
        );
        // sha256 of 4096 zero bytes.
        let s = block_sums(Alg::Sha256, &block);
        assert_eq!(
            s[..4],
            [0xad, 0x7f, 0xac, 0xb2],
            "sha256(4096 zeros) = ad7facb2…"
        );
    }

    #[test]
    fn all_differ_and_runs_cover_partial_bytes() {
        let m = all_differ(11);
        assert_eq!(m, vec![0xff, 0x07]);
        assert_eq!(runs(&m, 11, true), vec![(0, 11)]);
        assert!(runs(&m, 11, false).is_empty());
    }

    #[test]
    fn chunks_are_cut_at_the_edges_of_eligible_extents() {
        let e: BTreeSet<u32> = [1, 2, 5].into_iter().collect();
        let x = EXTENT_BLOCKS;
        // Outside, running into extent 1: cut at its start.
        assert_eq!(split_at_eligibility(&e, x - 10, x + 200), x);
        // Inside extents 1-2 (contiguous): not cut between them.
        assert_eq!(split_at_eligibility(&e, x + 5, 3 * x - 1), 3 * x - 1);
        // Inside extent 2, running into 3 (not eligible): cut.
        assert_eq!(split_at_eligibility(&e, 3 * x - 8, 3 * x + 8), 3 * x);
        // No eligible extents: unchanged.
        assert_eq!(split_at_eligibility(&BTreeSet::new(), 0, 256), 256);
    }
}
