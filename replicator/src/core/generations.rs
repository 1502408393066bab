//! Generation identifiers: the connect-time decision and the rotations.
//!
//! [`compare`] is the whole of DRBD's `drbd_uuid_compare` decision table as
//! one pure function (see REFERENCE.md, section 1.3): given both nodes'
//! generations, crashed-Primary flags and current roles, it says whether
//! to sync, in which direction, bitmap-based or full, or that the data
//! diverged (split-brain) or is unrelated, and names the rule it used. The
//! repair rules (34, 35, 51, 71) also return the corrected generations.
//! [`resolve`] then applies DRBD's post-processing: disk states,
//! `--discard-my-data`, and the refusals (an Inconsistent source, a Primary
//! as target).
//!
//! One deliberate difference from DRBD: a history slot holding 0 means "no
//! generation" and never matches, so two disks whose histories are empty
//! and otherwise share nothing are *unrelated* (DRBD's loop compares the
//! zeros and calls it split-brain).

use crate::metadata::{Generations, UUID_JUST_CREATED};

/// Added to the bitmap generation when a sync source starts a resync
/// (DRBD's `UUID_NEW_BM_OFFSET`).
pub const UUID_NEW_BM_OFFSET: u64 = 1 << 48;

/// Which end of a resync this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Source,
    Target,
}

impl Direction {
    pub fn flip(self) -> Direction {
        match self {
            Direction::Source => Direction::Target,
            Direction::Target => Direction::Source,
        }
    }
}

/// What the generations say about two disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Same data: no resync.
    NoSync,
    /// Resync the blocks marked in either bitmap (DRBD ±1).
    Bitmap(Direction),
    /// Resync every block (DRBD ±2).
    Full(Direction),
    /// Both diverged from a common generation. `auto_recoverable` is DRBD's
    /// +100 (both diverged from the *same* bitmap generation); Tandem has no
    /// automatic recovery policies, so both need an operator.
    SplitBrain { auto_recoverable: bool },
    /// No common generation at all (DRBD −1000).
    Unrelated,
}

/// One node's side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    pub gens: Generations,
    /// The node stopped as Primary without demoting.
    pub crashed_primary: bool,
    /// The node is Primary now.
    pub primary: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub outcome: Outcome,
    /// DRBD's rule number.
    pub rule: u32,
    /// Corrected generations for this node (rules 34, 71), to persist.
    pub my_fix: Option<Generations>,
    /// The peer's generations as corrected in our view (rules 35, 51).
    pub peer_fix: Option<Generations>,
}

impl Comparison {
    fn new(outcome: Outcome, rule: u32) -> Self {
        Comparison {
            outcome,
            rule,
            my_fix: None,
            peer_fix: None,
        }
    }
}

const fn m(v: u64) -> u64 {
    v & !1
}

/// A generation without its resync-start bumps (`UUID_NEW_BM_OFFSET` steps
/// live in the top 16 bits; the low 47 random bits name the ancestor).
const fn ancestor(v: u64) -> u64 {
    v & (UUID_NEW_BM_OFFSET - 1) & !1
}

/// Compare this node's generations with the peer's. `i_win_ties` breaks the
/// one symmetric case (both crashed as Primary, both Secondary now); the two
/// nodes must pass opposite values.
pub fn compare(me: &Side, peer: &Side, i_win_ties: bool) -> Comparison {
    use Direction::*;
    use Outcome::*;
    let (s, p) = (&me.gens, &peer.gens);
    let self_cur = m(s.current);
    let peer_cur = m(p.current);
    let fresh = |v: u64| v == UUID_JUST_CREATED || v == 0;

    if self_cur == UUID_JUST_CREATED && peer_cur == UUID_JUST_CREATED {
        return Comparison::new(NoSync, 10);
    }
    if fresh(self_cur) && peer_cur != UUID_JUST_CREATED {
        return Comparison::new(Full(Target), 20);
    }
    if self_cur != UUID_JUST_CREATED && fresh(peer_cur) {
        return Comparison::new(Full(Source), 30);
    }

    if self_cur == peer_cur {
        let (sb, pb) = (m(s.bitmap), m(p.bitmap));
        if pb == 0 && sb != 0 {
            // I was sync source and did not see "resync finished".
            if sb == m(p.history[0]) && m(s.history[0]) == m(p.history[1]) {
                let fixed = Generations {
                    bitmap: 0,
                    history: [s.bitmap, s.history[0]],
                    ..*s
                };
                return Comparison {
                    my_fix: Some(fixed),
                    ..Comparison::new(Bitmap(Source), 34)
                };
            }
            return Comparison::new(Bitmap(Source), 36);
        }
        if sb == 0 && pb != 0 {
            if m(s.history[0]) == pb && m(s.history[1]) == m(p.history[0]) {
                let fixed = Generations {
                    bitmap: 0,
                    history: [p.bitmap, p.history[0]],
                    ..*p
                };
                return Comparison {
                    peer_fix: Some(fixed),
                    ..Comparison::new(Bitmap(Target), 35)
                };
            }
            return Comparison::new(Bitmap(Target), 37);
        }
        // Same generation: only the link failed, unless someone crashed
        // while Primary (its last writes may be on its disk only).
        if !me.crashed_primary && !peer.crashed_primary {
            return Comparison::new(NoSync, 40);
        }
        if me.primary || peer.primary {
            if me.primary && peer.primary {
                return Comparison::new(
                    SplitBrain {
                        auto_recoverable: false,
                    },
                    41,
                );
            }
            return Comparison::new(Bitmap(if me.primary { Source } else { Target }), 41);
        }
        let dir = match (me.crashed_primary, peer.crashed_primary) {
            (true, false) => Source,
            (false, true) => Target,
            _ if i_win_ties => Source,
            _ => Target,
        };
        return Comparison::new(Bitmap(dir), 40);
    }

    if self_cur == m(p.bitmap) {
        return Comparison::new(Bitmap(Target), 50);
    }
    if self_cur == m(p.history[0]) && self_cur.wrapping_add(UUID_NEW_BM_OFFSET) == m(p.bitmap) {
        // The peer started a resync as source, but its SyncUuid never
        // reached us: undo that start in our view of the peer.
        let fixed = Generations {
            bitmap: p.history[0],
            history: [p.history[1], 0],
            ..*p
        };
        return Comparison {
            peer_fix: Some(fixed),
            ..Comparison::new(Bitmap(Target), 51)
        };
    }
    // Tandem's rule 52 (and 72 below): the peer's bitmap generation is our
    // current one plus resync-start bumps whose SyncUuid never reached us,
    // and its history no longer shows the step (a later rotation pushed
    // it out). We have not written since (a write without the peer would
    // have rotated our current), and the peer's bitmap holds every block
    // changed since: a bitmap resync from the peer (docs/decisions.md).
    if self_cur != 0 && p.bitmap != 0 && ancestor(self_cur) == ancestor(p.bitmap) {
        return Comparison::new(Bitmap(Target), 52);
    }
    if p.history.iter().any(|&h| h != 0 && m(h) == self_cur) {
        return Comparison::new(Full(Target), 60);
    }
    if m(s.bitmap) == peer_cur {
        return Comparison::new(Bitmap(Source), 70);
    }
    if m(s.history[0]) == peer_cur
        && m(s.history[0]).wrapping_add(UUID_NEW_BM_OFFSET) == m(s.bitmap)
    {
        let fixed = Generations {
            bitmap: s.history[0],
            history: [s.history[1], 0],
            ..*s
        };
        return Comparison {
            my_fix: Some(fixed),
            ..Comparison::new(Bitmap(Source), 71)
        };
    }
    if peer_cur != 0 && s.bitmap != 0 && ancestor(peer_cur) == ancestor(s.bitmap) {
        return Comparison::new(Bitmap(Source), 72);
    }
    if s.history.iter().any(|&h| h != 0 && m(h) == peer_cur) {
        return Comparison::new(Full(Source), 80);
    }
    if m(s.bitmap) == m(p.bitmap) && m(s.bitmap) != 0 {
        return Comparison::new(
            SplitBrain {
                auto_recoverable: true,
            },
            90,
        );
    }
    // DRBD compares history with history. Tandem compares every older
    // generation (bitmap and history) of one side with every older one of
    // the other, ignoring resync-start bumps (UUID_NEW_BM_OFFSET steps in
    // the top 16 bits; the low 47 random bits identify the ancestor): a
    // resync start the target never adopted, followed by promotions on
    // both sides, leaves exactly such shapes, and those disks are related
    // and diverged (split-brain), not unrelated (docs/decisions.md).

    let older = |g: &Generations| [g.bitmap, g.history[0], g.history[1]];
    let shared = older(s)
        .iter()
        .any(|&a| ancestor(a) != 0 && older(p).iter().any(|&b| ancestor(a) == ancestor(b)));
    if shared {
        return Comparison::new(
            SplitBrain {
                auto_recoverable: false,
            },
            100,
        );
    }
    Comparison::new(Unrelated, 0)
}

/// Disk facts the post-processing needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disks {
    /// My disk is Inconsistent.
    pub me_inconsistent: bool,
    pub peer_inconsistent: bool,
    /// I asked to discard my data (`connect --discard-my-data`).
    pub me_discard: bool,
    pub peer_discard: bool,
    /// I am Primary now.
    pub me_primary: bool,
    /// The peer is Primary now.
    pub peer_primary: bool,
    /// My bitmap has marked blocks.
    pub me_dirty: bool,
    pub peer_dirty: bool,
}

/// What to do after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    NoSync,
    Sync {
        direction: Direction,
        full: bool,
    },
    /// Do not connect; both keep their data untouched.
    SplitBrain,
    /// Do not connect.
    Refuse(String),
}

/// DRBD's `drbd_sync_handshake` post-processing of a [`Comparison`].
pub fn resolve(c: &Comparison, d: &Disks) -> Decision {
    use Outcome::*;
    let mut outcome = c.outcome;
    if outcome == Unrelated {
        return Decision::Refuse(
                        "unrelated data: the two disks share no generation (were they created for this resource?). \
             To replace one node's data with the other's: on that node `repctl down`, \
             `repctl create-md --force`, start repd again, and `repctl connect` on the other node (full resync)"
                .into(),
        );
    }
    // An Inconsistent disk against a consistent one is the target, whatever
    // the generations say; full when they said full or split-brain.
    if d.me_inconsistent != d.peer_inconsistent {
        let dir = if d.me_inconsistent {
            Direction::Target
        } else {
            Direction::Source
        };
        let full = matches!(outcome, Full(_) | SplitBrain { .. });
        outcome = if full { Full(dir) } else { Bitmap(dir) };
    }
    if let SplitBrain { .. } = outcome {
        // Resolved only by an operator discarding one side.
        outcome = match (d.me_discard, d.peer_discard) {
            (true, false) => Bitmap(Direction::Target),
            (false, true) => Bitmap(Direction::Source),
            _ => return Decision::SplitBrain,
        };
    }
    if d.me_primary && d.peer_primary {
        // Never two Primaries while connected (DRBD's SS_TWO_PRIMARIES).
        return Decision::Refuse(
            "both nodes are Primary; demote one (`repctl secondary`) and connect again".into(),
        );
    }
    if outcome == NoSync && (d.me_dirty || d.peer_dirty) {
        // Equal generations, yet blocks are marked: a Primary whose I/O was
        // frozen by fencing keeps its generation (DRBD's NEW_CUR_UUID), so
        // the writes the peer lost with the link are known only by marks.
        // DRBD resends its transfer log; here the Primary's marks are
        // resynced from it (docs/decisions.md).
        outcome = match (d.me_primary, d.peer_primary, d.me_dirty, d.peer_dirty) {
            (true, _, _, _) => Bitmap(Direction::Source),
            (_, true, _, _) => Bitmap(Direction::Target),
            (_, _, true, false) => Bitmap(Direction::Source),
            (_, _, false, true) => Bitmap(Direction::Target),
            _ => NoSync,
        };
    }
    let (direction, full) = match outcome {
        NoSync => return Decision::NoSync,
        Bitmap(dir) => (dir, false),
        Full(dir) => (dir, true),
        SplitBrain { .. } | Unrelated => unreachable!("handled above"),
    };
    if direction == Direction::Source && d.me_inconsistent {
        return Decision::Refuse(
            "this node should be sync source, but its disk is Inconsistent".into(),
        );
    }
    if direction == Direction::Target && d.me_primary {
        return Decision::Refuse(
            "this node is Primary but its data is older than the peer's (a Primary cannot be sync target); \
             demote it (`repctl secondary`) and reconnect"
                .into(),
        );
    }
    Decision::Sync { direction, full }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::*;
    use Outcome::*;

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> Generations {
        Generations {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    fn side(gens: Generations) -> Side {
        Side {
            gens,
            crashed_primary: false,
            primary: false,
        }
    }

    fn cmp(a: Generations, b: Generations) -> (Outcome, u32) {
        let c = compare(&side(a), &side(b), true);
        (c.outcome, c.rule)
    }

    const J: u64 = UUID_JUST_CREATED;

    #[test]
    fn fresh_disks() {
        assert_eq!(cmp(g(J, 0, 0, 0), g(J, 0, 0, 0)), (NoSync, 10));
        assert_eq!(cmp(g(J, 0, 0, 0), g(0xa0, J, 0, 0)), (Full(Target), 20));
        assert_eq!(cmp(g(0, 0, 0, 0), g(0xa0, J, 0, 0)), (Full(Target), 20));
        assert_eq!(cmp(g(0xa0, J, 0, 0), g(J, 0, 0, 0)), (Full(Source), 30));
    }

    #[test]
    fn equal_generations() {
        assert_eq!(cmp(g(0xa0, 0, 0xb0, 0), g(0xa0, 0, 0xb0, 0)), (NoSync, 40));
        // Missed "resync finished" (rule 34 repairs me, 35 repairs the peer).
        let src = g(0xa0, 0xb0, 0xc0, 0);
        let tgt = g(0xa0, 0, 0xb0, 0xc0);
        let c = compare(&side(src), &side(tgt), true);
        assert_eq!((c.outcome, c.rule), (Bitmap(Source), 34));
        assert_eq!(c.my_fix, Some(tgt));
        let c = compare(&side(tgt), &side(src), true);
        assert_eq!((c.outcome, c.rule), (Bitmap(Target), 35));
        assert_eq!(c.peer_fix, Some(tgt));
        // Without the history pattern: rules 36 / 37.
        assert_eq!(
            cmp(g(0xa0, 0xb0, 0, 0), g(0xa0, 0, 0, 0)),
            (Bitmap(Source), 36)
        );
        assert_eq!(
            cmp(g(0xa0, 0, 0, 0), g(0xa0, 0xb0, 0, 0)),
            (Bitmap(Target), 37)
        );
    }

    #[test]
    fn crashed_primaries() {
        let same = g(0xa0, 0, 0xb0, 0);
        let crashed = Side {
            crashed_primary: true,
            ..side(same)
        };
        let primary = Side {
            primary: true,
            ..side(same)
        };
        assert_eq!(
            compare(&crashed, &side(same), false).outcome,
            Bitmap(Source)
        );
        assert_eq!(compare(&side(same), &crashed, true).outcome, Bitmap(Target));
        // The current Primary wins (rule 41).
        let c = compare(&crashed, &primary, true);
        assert_eq!((c.outcome, c.rule), (Bitmap(Target), 41));
        let both_primary = Side {
            crashed_primary: true,
            primary: true,
            ..side(same)
        };
        assert_eq!(
            compare(&both_primary, &primary, true).outcome,
            SplitBrain {
                auto_recoverable: false
            }
        );
        // Both crashed, both Secondary: the tie-break decides, consistently.
        assert_eq!(compare(&crashed, &crashed, true).outcome, Bitmap(Source));
        assert_eq!(compare(&crashed, &crashed, false).outcome, Bitmap(Target));
    }

    #[test]
    fn diverged_generations() {
        // The peer went on without me (promoted while I was away).
        assert_eq!(
            cmp(g(0xa0, 0, 0, 0), g(0xb0, 0xa0, 0, 0)),
            (Bitmap(Target), 50)
        );
        assert_eq!(
            cmp(g(0xb0, 0xa0, 0, 0), g(0xa0, 0, 0, 0)),
            (Bitmap(Source), 70)
        );
        // Far behind: full sync.
        assert_eq!(
            cmp(g(0xa0, 0, 0, 0), g(0xc0, 0, 0xa0, 0)),
            (Full(Target), 60)
        );
        assert_eq!(
            cmp(g(0xc0, 0, 0, 0xa0), g(0xa0, 0, 0, 0)),
            (Full(Source), 80)
        );
        // Split-brain: same bitmap generation (90) or shared history (100).
        assert_eq!(
            cmp(g(0xb0, 0xa0, 0, 0), g(0xc0, 0xa0, 0, 0)),
            (
                SplitBrain {
                    auto_recoverable: true
                },
                90
            )
        );
        assert_eq!(
            cmp(g(0xb0, 0xd0, 0xa0, 0), g(0xc0, 0xe0, 0xa0, 0)),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                100
            )
        );
        // A bitmap generation in the peer's history is a shared ancestor.
        assert_eq!(
            cmp(g(0xb0, 0xa4, 0xa2, 0xa0), g(0xc0, 0xa2, 0xd0, 0)),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                100
            )
        );
        // So is one that differs only by resync-start bumps.
        assert_eq!(
            cmp(
                g(0xb0, UUID_NEW_BM_OFFSET + 0xa2, 0xd2, 0),
                g(0xc0, 0xa2, 0xe2, 0)
            ),
            (
                SplitBrain {
                    auto_recoverable: false
                },
                100
            )
        );
        // A bumped bitmap generation whose step left the history (52, 72).
        let bumped = 2 * UUID_NEW_BM_OFFSET + 0xa2;
        assert_eq!(
            cmp(g(0xa2, 0, 0xd0, 0), g(0xc0, bumped, 0xe0, 0xe2)),
            (Bitmap(Target), 52)
        );
        assert_eq!(
            cmp(g(0xc0, bumped, 0xe0, 0xe2), g(0xa2, 0, 0xd0, 0)),
            (Bitmap(Source), 72)
        );
        // Nothing shared, zero histories included.
        assert_eq!(cmp(g(0xb0, 0, 0, 0), g(0xc0, 0, 0, 0)), (Unrelated, 0));
    }

    #[test]
    fn lost_sync_uuid_is_undone() {
        // The peer (source) rotated its bitmap generation for a resync, but
        // its SyncUuid never arrived: rule 51 here, rule 71 there.
        let me = g(0xa0, 0, 0, 0);
        let peer = g(0xb0, 0xa0 + UUID_NEW_BM_OFFSET, 0xa0, 0);
        let c = compare(&side(me), &side(peer), true);
        assert_eq!((c.outcome, c.rule), (Bitmap(Target), 51));
        assert_eq!(c.peer_fix, Some(g(0xb0, 0xa0, 0, 0)));
        let c = compare(&side(peer), &side(me), true);
        assert_eq!((c.outcome, c.rule), (Bitmap(Source), 71));
        assert_eq!(c.my_fix, Some(g(0xb0, 0xa0, 0, 0)));
    }

    #[test]
    fn post_processing() {
        let disks = Disks {
            me_inconsistent: false,
            peer_inconsistent: false,
            me_discard: false,
            peer_discard: false,
            me_primary: false,
            peer_primary: false,
            me_dirty: false,
            peer_dirty: false,
        };
        let c = |outcome| Comparison::new(outcome, 0);
        assert_eq!(
            resolve(
                &c(SplitBrain {
                    auto_recoverable: true
                }),
                &disks
            ),
            Decision::SplitBrain
        );
        let discard = Disks {
            me_discard: true,
            ..disks
        };
        assert_eq!(
            resolve(
                &c(SplitBrain {
                    auto_recoverable: false
                }),
                &discard
            ),
            Decision::Sync {
                direction: Target,
                full: false
            }
        );
        let peer_discard = Disks {
            peer_discard: true,
            ..disks
        };
        assert_eq!(
            resolve(
                &c(SplitBrain {
                    auto_recoverable: false
                }),
                &peer_discard
            ),
            Decision::Sync {
                direction: Source,
                full: false
            }
        );
        // Inconsistent against consistent: target, full if it was full.
        let inc = Disks {
            me_inconsistent: true,
            ..disks
        };
        assert_eq!(
            resolve(&c(NoSync), &inc),
            Decision::Sync {
                direction: Target,
                full: false
            }
        );
        assert_eq!(
            resolve(&c(Full(Source)), &inc),
            Decision::Sync {
                direction: Target,
                full: true
            }
        );
        assert!(matches!(
            resolve(&c(Unrelated), &disks),
            Decision::Refuse(_)
        ));
        let primary = Disks {
            me_primary: true,
            ..disks
        };
        let both = Disks {
            me_primary: true,
            peer_primary: true,
            ..disks
        };
        assert!(matches!(resolve(&c(NoSync), &both), Decision::Refuse(_)));
        assert!(matches!(
            resolve(&c(Bitmap(Target)), &primary),
            Decision::Refuse(_)
        ));
        let both_inc = Disks {
            me_inconsistent: true,
            peer_inconsistent: true,
            ..disks
        };
        assert!(matches!(
            resolve(&c(Bitmap(Source)), &both_inc),
            Decision::Refuse(_)
        ));
        assert_eq!(resolve(&c(NoSync), &both_inc), Decision::NoSync);
        // Equal generations but marked blocks (a frozen Primary kept its
        // generation): the Primary's marks are resynced from it.
        let frozen = Disks {
            me_primary: true,
            me_dirty: true,
            ..disks
        };
        let sync = |direction| Decision::Sync {
            direction,
            full: false,
        };
        assert_eq!(resolve(&c(NoSync), &frozen), sync(Source));
        let peer_frozen = Disks {
            peer_primary: true,
            peer_dirty: true,
            ..disks
        };
        assert_eq!(resolve(&c(NoSync), &peer_frozen), sync(Target));
        let only_mine = Disks {
            me_dirty: true,
            ..disks
        };
        assert_eq!(resolve(&c(NoSync), &only_mine), sync(Source));
        let both_dirty = Disks {
            me_dirty: true,
            peer_dirty: true,
            ..disks
        };
        assert_eq!(resolve(&c(NoSync), &both_dirty), Decision::NoSync);
    }
}
