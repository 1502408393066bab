//! What must be durable before what: superblock writes, bitmap page writes,
//! and the continuations that wait for them.
//!
//! Invariants:
//! - at most one superblock write is in flight, so the two slots are never
//!   both being written (a crash leaves one intact);
//! - at most one write per bitmap page is in flight; a page changed while
//!   being written is written again if anyone needs the newer version;
//! - a continuation runs only once everything it needs is durable; if a
//!   metadata write fails the disk is Failed and waiting commands fail.

use bytes::Bytes;
use tandem_proto::peer::Message;
use tracing::{error, warn};

use super::activity::AlStage;
use super::node::{CommandError, Deferred, Device, Need, Node, PeerReq, Purpose, Retiring};
use super::states::DiskState;
use super::states::Role;
use crate::metadata::activity_log::AL_EXTENT_SIZE;
use crate::metadata::{BLOCK_SIZE, MdFlags};
use crate::storage::{Op, StorageError};

impl<T> Node<T> {
    /// Queue a durable write of `self.md` with a new sequence number.
    pub(super) fn persist(&mut self) -> u64 {
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
        let op = Op::Write {
            offset,
            data: Bytes::from(self.md.encode()),
            fua: true,
        };
        self.submit(Device::Meta, op, Purpose::Superblock { seq });
    }

    /// Make bitmap page `page` durable in its current version (one write
    /// per page in flight).
    pub(super) fn write_page(&mut self, page: usize) {
        if self.page_writes.contains_key(&page) || self.bitmap.is_page_durable(page) {
            return;
        }
        let version = self.bitmap.page_version(page);
        self.page_writes.insert(page, version);
        let offset = self.md.layout.bitmap_offset() + page as u64 * BLOCK_SIZE;
        let op = Op::Write {
            offset,
            data: Bytes::from(self.bitmap.page_bytes(page)),
            fua: true,
        };
        self.submit(Device::Meta, op, Purpose::BitmapPage { page, version });
    }

    /// Run `then` once `need` holds, issuing the writes it needs.
    pub(super) fn wait(&mut self, need: Need, then: Deferred) {
        match &need {
            Need::Md(_) => {}
            Need::Pages(pages) => {
                for &(p, _) in pages {
                    self.write_page(p);
                }
            }
            Need::Everything(_) => {
                let dirty: Vec<usize> = self.bitmap.dirty_pages().collect();
                for p in dirty {
                    self.write_page(p);
                }
            }
        }
        if self.met(&need) {
            self.run_deferred(then, Ok(()));
        } else {
            self.waits.push((need, then));
        }
    }

    fn met(&self, need: &Need) -> bool {
        let pages_ok = |pages: &[(usize, u64)]| {
            pages
                .iter()
                .all(|&(p, v)| self.bitmap.durable_version(p) >= v)
        };
        match need {
            Need::Md(seq) => self.md_durable >= *seq,
            Need::Pages(pages) => pages_ok(pages),
            Need::Everything(seq) => {
                self.md_durable >= *seq && self.bitmap.dirty_pages().next().is_none()
            }
        }
    }

    /// Every dirty bitmap page at its current version.
    pub(super) fn all_dirty_pages(&self) -> Need {
        let pages = self
            .bitmap
            .dirty_pages()
            .map(|p| (p, self.bitmap.page_version(p)))
            .collect();
        Need::Pages(pages)
    }

    /// The bitmap pages covering blocks `[start, end)`, at their current
    /// versions: what a write to those blocks must wait for.
    pub(super) fn pages_need(&self, start: u64, end: u64) -> Need {
        let pages = super::bitmap::Bitmap::pages_of(start, end)
            .map(|p| (p, self.bitmap.page_version(p)))
            .collect();
        Need::Pages(pages)
    }

    pub(super) fn on_superblock_written(&mut self, seq: u64, result: Result<(), StorageError>) {
        debug_assert_eq!(self.md_in_flight, Some(seq));
        self.md_in_flight = None;
        match result {
            Ok(()) => {
                self.md_durable = seq;
                if self.md.sequence > seq {
                    self.write_md();
                }
            }
            Err(e) => self.metadata_failed(&e),
        }
        self.check_waits();
    }

    pub(super) fn on_page_written(
        &mut self,
        page: usize,
        version: u64,
        result: Result<(), StorageError>,
    ) {
        self.page_writes.remove(&page);
        match result {
            Ok(()) => {
                self.bitmap.mark_durable(page, version);
                // Someone may need a version written since.
                let needed = self.waits.iter().any(|(n, _)| match n {
                    Need::Pages(ps) => ps.iter().any(|&(p, _)| p == page),
                    Need::Everything(_) => true,
                    Need::Md(_) => false,
                });
                if needed && !self.bitmap.is_page_durable(page) {
                    self.write_page(page);
                }
            }
            Err(e) => self.metadata_failed(&e),
        }
        self.check_waits();
    }

    pub(super) fn metadata_failed(&mut self, e: &StorageError) {
        error!("metadata write failed: {e}; the disk is Failed");
        self.set_disk(DiskState::Failed);
        // Nothing waiting on metadata can succeed now.
        let waits = std::mem::take(&mut self.waits);
        for (_, then) in waits {
            self.run_deferred(then, Err(format!("writing metadata failed: {e}")));
        }
    }

    fn check_waits(&mut self) {
        loop {
            let Some(i) = self.waits.iter().position(|(n, _)| self.met(n)) else {
                return;
            };
            let (_, then) = self.waits.remove(i);
            self.run_deferred(then, Ok(()));
        }
    }

    fn run_deferred(&mut self, then: Deferred, result: Result<(), String>) {
        let err = |m: String| Err(super::node::CommandError::failed(m));
        match then {
            Deferred::CommandOk { cmd, message } => {
                let r = result.map(|()| message.to_string()).or_else(err);
                self.command_done(cmd, r);
            }
            Deferred::BecomePrimary { cmd, connected } => {
                self.became_primary(cmd, connected, result)
            }
            Deferred::Resume => {
                self.resume_pending = false;
                self.resume();
            }
            Deferred::FinishWrite { w } => self.finish_write(w),
            Deferred::FinishFlush { f } => self.finish_flush(f),
            Deferred::SyncStarting => self.sync_starting_durable(),
            Deferred::TargetReady => self.target_ready(),
            Deferred::TargetFinished => self.target_finished(),
            Deferred::SourceFinished => self.source_finished(),
            Deferred::SendState => self.send_state(),
            Deferred::PromoteFenced { cmd } => {
                let ok = result.and_then(|()| self.check_promotable(false).map_err(|e| e.message));
                match ok {
                    Ok(()) if self.role != Role::Primary && self.link.is_none() => {
                        self.do_promote(cmd, false, false)
                    }
                    Ok(()) => self.command_done(
                        cmd,
                        Err(CommandError::failed(
                            "the situation changed while fencing ran; retry",
                        )),
                    ),
                    Err(m) => self.command_done(cmd, Err(CommandError::failed(m))),
                }
            }
            Deferred::Goodbye => {
                if self.link.is_some() {
                    let reason = format!("node {} is stopping", self.p.node);
                    self.send(Message::Disconnect { reason });
                }
            }
            // The log is marked clean only while nobody writes through it: a
            // promotion that came in meanwhile made it live again. The test
            // is PRIMARY_IND, not the role: a promotion sets it before it
            // waits for the superblock, while the role changes only after.
            Deferred::AlApplied => {
                if !self.md.flags.has(MdFlags::PRIMARY_IND) {
                    self.md.flags.set(MdFlags::AL_CLEAN, true);
                    self.persist();
                }
            }
            Deferred::AlWrite => self.al_write(),
            Deferred::VerifyAnswered { cmd, result: r } => {
                let r = result.and(r).map_err(CommandError::failed);
                self.command_done(cmd, r);
            }
            Deferred::Retired { then } => {
                if self.al_enabled() && !self.md.flags.has(MdFlags::PRIMARY_IND) {
                    self.md.flags.set(MdFlags::AL_CLEAN, true);
                }
                let seq = self.persist();
                for then in then {
                    self.wait(Need::Everything(seq), then);
                }
            }
        }
    }

    // ----- activity log -----------------------------------------------------

    /// Whether writes go through the activity log (a resource with a peer;
    /// a single node has nobody to differ from).
    pub(super) fn al_enabled(&self) -> bool {
        self.p.peer.is_some()
    }

    /// After a crash while the log was live: mark every extent it lists out
    /// of sync (durably), then record that it was applied.
    pub(super) fn apply_al(&mut self) {
        let extents: Vec<u32> = self.al.durable_extents().collect();
        let blocks = self.bitmap.blocks();
        let per = AL_EXTENT_SIZE / BLOCK_SIZE;
        for &e in &extents {
            let start = u64::from(e) * per;
            if start < blocks {
                self.bitmap.set(start, (start + per).min(blocks));
            }
        }
        warn!(
            "the activity log was live when {} stopped: marking its {} extents ({} MiB) out of sync",
            self.p.node,
            extents.len(),
            (extents.len() as u64 * AL_EXTENT_SIZE) >> 20
        );
        let seq = self.md.sequence;
        self.wait(Need::Everything(seq), Deferred::AlApplied);
    }

    /// Start the next activity-log transaction if one is needed. One that
    /// drops extents first flushes this node and, while replicating, the
    /// peer: the writes to a dropped extent must be durable on both, or a
    /// crash could hide a difference the log no longer covers.
    pub(super) fn al_pump(&mut self) {
        if self.al_pending.is_some() {
            return;
        }
        let Some((t, evicts)) = self.al.next_transaction() else {
            return;
        };
        self.al_pending = Some(t);
        if !evicts {
            return self.al_write();
        }
        let peer = if self.replicating() {
            let link = self.link.as_mut().expect("replicating");
            let id = link.req(PeerReq::AlBarrier);
            link.tl.close(id);
            self.send(Message::Flush { id });
            Some(id)
        } else {
            None
        };
        if let Some(stage) = self.al.stage_mut() {
            *stage = AlStage::Flushing { local: true, peer };
        }
        self.submit(Device::Data, Op::Flush, Purpose::AlFlush);
    }

    fn al_write(&mut self) {
        let Some(t) = self.al_pending.as_ref() else {
            return;
        };
        let number = t.number;
        let offset = self.md.layout.al_offset() + t.slot() * BLOCK_SIZE;
        let data = Bytes::from(t.encode());
        if let Some(stage) = self.al.stage_mut() {
            *stage = AlStage::Writing;
        }
        self.submit(
            Device::Meta,
            Op::Write {
                offset,
                data,
                fua: true,
            },
            Purpose::AlWrite { number },
        );
    }

    /// One of the flushes before an eviction finished (`local`: ours;
    /// otherwise the peer's, or the link went).
    pub(super) fn al_flushed(&mut self, local: bool) {
        let Some(AlStage::Flushing { local: l, peer }) = self.al.stage_mut() else {
            return;
        };
        if local {
            *l = false;
        } else {
            *peer = None;
        }
        if !*l && peer.is_none() {
            // The evicted extents leave the log: their marks in memory (the
            // transfer log's, after a lost link) go to disk first
            // (docs/durability.md).
            if let Some(stage) = self.al.stage_mut() {
                *stage = AlStage::Writing;
            }
            let pages = self.all_dirty_pages();
            self.wait(pages, Deferred::AlWrite);
        }
    }

    pub(super) fn on_al_written(&mut self, number: u64, result: Result<(), StorageError>) {
        match result {
            Ok(()) => self.al.written(number),
            Err(e) => self.metadata_failed(&e),
        }
        self.al_pending = None;
        self.resume();
        self.al_pump();
    }

    // ----- retiring the log (clean stop, demotion) ---------------------------

    /// Flush this node and, while replicating, the peer; then mark the log
    /// clean (it need not be applied after a crash) and run `then` once
    /// that and every bitmap page are durable.
    pub(super) fn retire(&mut self, then: Deferred) {
        if let Some(r) = self.retiring.as_mut() {
            r.then.push(then);
            return;
        }
        let peer = if self.link.as_ref().is_some_and(|l| l.peer.is_some()) {
            let link = self.link.as_mut().expect("link");
            let id = link.req(PeerReq::Retire);
            link.tl.close(id);
            self.send(Message::Flush { id });
            Some(id)
        } else {
            None
        };
        self.retiring = Some(Retiring {
            local: true,
            peer,
            then: vec![then],
        });
        self.submit(Device::Data, Op::Flush, Purpose::RetireFlush);
    }

    /// One of the retirement flushes finished (or the link went).
    pub(super) fn retire_flushed(&mut self, local: bool) {
        let Some(r) = self.retiring.as_mut() else {
            return;
        };
        if local {
            r.local = false;
        } else {
            r.peer = None;
        }
        if r.local || r.peer.is_some() {
            return;
        }
        let r = self.retiring.take().expect("retiring");
        // The log stops protecting its extents once marked clean: every
        // mark in memory (the transfer log's, after a lost link) must be on
        // disk first, or a crash in between forgets both (docs/durability.md).
        let pages = self.all_dirty_pages();
        self.wait(pages, Deferred::Retired { then: r.then });
    }
}
