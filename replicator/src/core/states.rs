//! Roles, disk states, connection and replication states, with DRBD's names.
//!
//! The spellings are part of the user contract (status JSON, events, logs):
//! they serialise exactly as the variant names.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
    /// Only for a peer we are not connected to.
    Unknown,
}

/// Disk states in DRBD's order, lowest first; comparisons use this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskState {
    Diskless,
    Failed,
    Inconsistent,
    Outdated,
    /// Only for a peer we are not connected to.
    DUnknown,
    /// Consistent, but not known whether UpToDate or Outdated.
    Consistent,
    UpToDate,
}

impl DiskState {
    /// Every state, in the enum's order (`ALL[d as usize] == d`).
    pub const ALL: [DiskState; 7] = [
        DiskState::Diskless,
        DiskState::Failed,
        DiskState::Inconsistent,
        DiskState::Outdated,
        DiskState::DUnknown,
        DiskState::Consistent,
        DiskState::UpToDate,
    ];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    StandAlone,
    Connecting,
    Connected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplState {
    Off,
    Established,
    SyncSource,
    SyncTarget,
    VerifySource,
    VerifyTarget,
    PausedSyncSource,
    PausedSyncTarget,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Role, DiskState, ConnState, ReplState);

#[cfg(test)]
mod tests {
    use super::DiskState;

    #[test]
    fn all_lists_every_disk_state_at_its_code() {
        for (i, d) in DiskState::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
        assert_eq!(DiskState::ALL.len(), DiskState::UpToDate as usize + 1);
    }
}
