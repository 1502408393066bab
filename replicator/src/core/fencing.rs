//! Fencing: making sure the peer cannot write before this node does.
//!
//! Rules (CONTRACT section 6, docs/durability.md):
//! - with `fencing` other than `dont-care`, a node that cannot see its peer
//!   becomes Primary only once the peer is known outdated or dead: the
//!   `fence-peer` handler confirmed it (exit 4 or 7, DRBD's codes), or an
//!   operator ran `repctl fence-confirm` after the peer went away; or with
//!   `--force`, which warns;
//! - with `resource-and-stonith`, a Primary that loses its peer suspends
//!   client I/O (nothing is answered) and runs `fence-peer`; it resumes
//!   only when fencing is confirmed, so no write answered to a client can
//!   be lost by a takeover on the other node. `resource-only` runs the
//!   handler without suspending;
//! - the generation rotation for losing the peer waits for the resume
//!   (DRBD's `NEW_CUR_UUID`).
//!
//! Handler exit codes (CONTRACT section 6): 4 peer outdated and 7 peer
//! fenced confirm; 6 peer is Primary (this node outdates itself); 3 peer
//! Inconsistent and 5 peer unreachable are logged with their meaning but do
//! not confirm (DRBD accepts them; the contract does not, see
//! docs/decisions.md); anything else: not confirmed.
//!
//! A Consistent disk (a Secondary restarted while its peer was away: it
//! cannot know whether the peer wrote on) is refused without asking the
//! handler, unlike DRBD's `drbd_set_role`: a confirmation says the peer
//! cannot write now, not that this copy holds the peer's last writes. The
//! operator decides with `fence-confirm` (docs/decisions.md).

use tracing::{error, info, warn};

use super::node::{CommandError, Deferred, Need, Node, Output};
use super::states::{DiskState, Role};
use crate::config::Fencing;
use crate::metadata::MdFlags;

/// Which handler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    FencePeer,
    SplitBrain,
}

/// Why a fencing run was started, and what its confirmation allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FenceFor {
    /// The Primary lost its peer (resume suspended I/O on success).
    LostPeer,
    /// `primary` on a disconnected node (promote on success).
    Promote { cmd: u64 },
}

/// What a fence-peer exit code means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The peer cannot write: outdated (exit 4) or fenced (exit 7).
    Confirmed,
    /// The peer is Primary: this node must not be.
    OutdateMyself,
    NotConfirmed,
}

/// The contract's exit-code table. Safety rule 2: only a handler that
/// says the peer is outdated (4) or fenced (7) confirms; "Inconsistent"
/// (3) and "unreachable" (5) describe a peer that may still be running
/// and reachable by clients, so they do not (DRBD treats both as
/// confirmation; docs/decisions.md).
pub fn fence_outcome(code: Option<i32>) -> FenceOutcome {
    match code {
        Some(4 | 7) => FenceOutcome::Confirmed,
        Some(6) => FenceOutcome::OutdateMyself,
        _ => FenceOutcome::NotConfirmed,
    }
}

/// What a fence-peer exit code says, for logs and refusals.
fn exit_meaning(code: Option<i32>) -> String {
    match code {
        Some(3) => "exit 3: the handler reports the peer Inconsistent, which Tandem does not accept as proof it cannot write".into(),
        Some(5) => "exit 5: the handler could not reach the peer, which does not prove it is down".into(),
        Some(c) => format!("exit {c}"),
        None => "it could not run (is `fence-peer` configured?)".into(),
    }
}

impl<T> Node<T> {
    pub(super) fn fencing_on(&self) -> bool {
        self.p.fencing != Fencing::DontCare && self.p.peer.is_some()
    }

    /// Whether the peer is known unable to write (fencing confirmed).
    pub(super) fn peer_known_outdated(&self) -> bool {
        self.md.flags.has(MdFlags::PEER_OUT_DATED)
    }

    /// Run a handler; its exit comes back through [`Node::handle_handler_exit`].
    pub(super) fn run_handler(&mut self, handler: Handler) -> u64 {
        let id = self.next_id();
        info!("running the {handler:?} handler");
        self.outputs.push_back(Output::RunHandler { id, handler });
        id
    }

    pub(super) fn start_fencing(&mut self, why: FenceFor) {
        let id = self.run_handler(Handler::FencePeer);
        self.fencing.push((id, why));
        self.event("fencing");
    }

    /// The Primary lost the peer it was replicating to.
    pub(super) fn lost_peer_as_primary(&mut self) {
        match self.p.fencing {
            Fencing::DontCare => self.rotate_for_lost_peer(),
            Fencing::ResourceOnly => {
                self.rotate_for_lost_peer();
                self.start_fencing(FenceFor::LostPeer);
            }
            Fencing::ResourceAndStonith => {
                warn!(
                    "lost the peer with fencing = resource-and-stonith: suspending I/O until fencing confirms"
                );
                self.io_suspended = true;
                self.event("io-suspended");
                self.start_fencing(FenceFor::LostPeer);
            }
        }
    }

    /// Losing the peer while Primary starts a new generation (DRBD), so
    /// the peer's copy is recognisably older; it is durable before any
    /// write the peer does not get is submitted or answered
    /// (`degraded_seq`). Also on a disk that fence-peer outdated (exit 6)
    /// before `fence-confirm` resumed its held writes: those writes are
    /// answered, the peer lacks them, and without a new generation the
    /// next handshake would take this node for merely behind and resync
    /// over them instead of reporting split-brain (simulation, seed 6548).
    pub(super) fn rotate_for_lost_peer(&mut self) {
        if self.role == Role::Primary
            && matches!(
                self.disk,
                DiskState::UpToDate | DiskState::Outdated | DiskState::Consistent
            )
            && !self.md.flags.has(MdFlags::CURRENT_UNSHARED)
        {
            self.new_current_generation();
            self.degraded_seq = self.persist();
        }
    }

    /// A handler exited (`None`: it could not run, or none is configured).
    pub fn handle_handler_exit(&mut self, id: u64, code: Option<i32>) {
        let Some(i) = self.fencing.iter().position(|(h, _)| *h == id) else {
            return; // the split-brain handler: alerting only
        };
        let (_, why) = self.fencing.remove(i);
        let outcome = fence_outcome(code);
        match outcome {
            FenceOutcome::Confirmed => {
                info!("fence-peer confirmed (exit {code:?}): the peer cannot write");
                self.peer_fenced(why);
            }
            FenceOutcome::OutdateMyself => {
                error!("fence-peer says the peer is Primary (exit 6): outdating this node's disk");
                self.md.flags.set(MdFlags::WAS_UP_TO_DATE, false);
                self.set_disk(DiskState::Outdated);
                self.persist();
                if let FenceFor::Promote { cmd } = why {
                    self.command_done(cmd, Err(CommandError::refused("the fence-peer handler reports the peer is Primary (exit 6); this node's disk is now Outdated")));
                }
            }
            FenceOutcome::NotConfirmed => {
                let what = exit_meaning(code);
                match why {
                    FenceFor::LostPeer if self.io_suspended => error!(
                        "fence-peer did not confirm ({what}): I/O stays suspended; once the peer is powered off, run `repctl fence-confirm`"
                    ),
                    FenceFor::LostPeer => warn!("fence-peer did not confirm ({what})"),
                    FenceFor::Promote { cmd } => self.command_done(
                        cmd,
                        Err(CommandError::refused(format!(
                            "fencing is not confirmed: the fence-peer handler did not confirm the peer is outdated or dead ({what}); \
                             power the peer off and run `repctl fence-confirm`, or use `repctl primary --force` (risks split-brain)"
                        ))),
                    ),
                }
            }
        }
        self.event("fencing");
    }

    /// Fencing is confirmed: record that the peer is outdated, then do
    /// what waited for it.
    fn peer_fenced(&mut self, why: FenceFor) {
        // Invariant 28 (docs/durability.md): fencing proves only that the
        // peer cannot write now. The peer's copy is outdated only relative
        // to UpToDate data here. A Consistent disk (this node restarted
        // while the peer was away) may lack the peer's last writes, so it
        // stays Consistent and nothing is recorded about the peer: DRBD
        // makes it UpToDate here, and the simulation lost flushed writes
        // that way (seed 941 through the handler, seed 60380 through
        // `fence-confirm`). Only `primary --force` declares it the good copy.
        if self.disk == DiskState::UpToDate {
            self.md.flags.set(MdFlags::PEER_OUT_DATED, true);
        }
        let seq = self.persist();
        match why {
            FenceFor::LostPeer => self.resume_io(true),
            FenceFor::Promote { cmd } => self.wait(Need::Md(seq), Deferred::PromoteFenced { cmd }),
        }
    }

    /// Resume suspended I/O. After fencing confirmed (`without_peer`), the
    /// generation rotates first and the held requests go on in degraded
    /// mode; when the peer came back and gets our data, they go on as they
    /// are (their blocks are marked and resynced).
    pub(super) fn resume_io(&mut self, without_peer: bool) {
        if !self.io_suspended {
            return;
        }
        info!(
            "resuming I/O ({})",
            if without_peer {
                "fencing confirmed"
            } else {
                "the peer is back"
            }
        );
        self.io_suspended = false;
        if without_peer {
            self.rotate_for_lost_peer();
        }
        self.event("io-suspended");
        self.resume();
        for w in std::mem::take(&mut self.held_writes) {
            self.maybe_complete(w);
        }
        for f in std::mem::take(&mut self.held_flushes) {
            self.maybe_complete_flush(f);
        }
        for (token, op) in std::mem::take(&mut self.frozen) {
            self.handle_client(token, op);
        }
    }

    /// `repctl fence-confirm`: the operator states the peer is powered off.
    pub(super) fn fence_confirm(&mut self, cmd: u64) -> Result<(), CommandError> {
        if self.p.peer.is_none() {
            return Err(CommandError::failed(
                "a single-node resource has no peer to fence",
            ));
        }
        if self.link.is_some() {
            return Err(CommandError::refused(
                "the peer is connected; fence-confirm is for a peer that went away and is powered off",
            ));
        }
        warn!("fence-confirm: the operator states that the peer is powered off");
        for (_, why) in std::mem::take(&mut self.fencing) {
            if let FenceFor::Promote { cmd } = why {
                self.command_done(
                    cmd,
                    Err(CommandError::failed(
                        "superseded by fence-confirm; run `repctl primary` again",
                    )),
                );
            }
        }
        self.peer_fenced(FenceFor::LostPeer);
        let seq = self.md.sequence;
        let message = if self.disk == DiskState::UpToDate {
            "peer fencing confirmed by the operator"
        } else {
            "peer fencing confirmed by the operator, but this disk is not UpToDate and may lack \
             the peer's last writes: it stays as it is until a resync from the peer, or \
             `repctl primary --force` declares it the good copy"
        };
        self.wait(Need::Md(seq), Deferred::CommandOk { cmd, message });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_exit_codes() {
        use FenceOutcome::*;
        for code in -1..=255 {
            let want = match code {
                4 | 7 => Confirmed,
                6 => OutdateMyself,
                _ => NotConfirmed,
            };
            assert_eq!(fence_outcome(Some(code)), want, "exit {code}");
        }
        assert_eq!(fence_outcome(None), NotConfirmed);
        assert!(exit_meaning(Some(3)).contains("Inconsistent"));
        assert!(exit_meaning(Some(5)).contains("could not reach"));
    }
}
