//! The status object of CONTRACT section 4, shared by `repd` (which builds
//! it) and `repctl` (which prints it). Field names and state spellings are
//! fixed by the contract; fields may be added, never renamed.

use serde::{Deserialize, Serialize};

use crate::core::states::{ConnState, DiskState, ReplState, Role};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub size_bytes: u64,
    pub nbd_clients: u32,
    pub io_suspended: bool,
    pub connection: ConnState,
    pub replication: ReplState,
    /// `null` when the resource has a single node.
    pub peer: Option<PeerStatus>,
    pub out_of_sync_bytes: u64,
    pub sync: Option<SyncProgress>,
    pub split_brain: bool,
    pub generation: GenerationStatus,
    pub counters: Counters,
    /// Storage engine in use and its durability counters (Tandem extension).
    pub engine: EngineStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
    pub eta_sec: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub current: String,
    pub bitmap: String,
    pub history: [String; 2],
}

impl GenerationStatus {
    pub fn from_generations(g: &crate::metadata::Generations) -> Self {
        let hex = |v: u64| format!("{v:016x}");
        GenerationStatus {
            current: hex(g.current),
            bitmap: hex(g.bitmap),
            history: [hex(g.history[0]), hex(g.history[1])],
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub net_sent_bytes: u64,
    pub net_received_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// `io_uring` or `threads`.
    pub kind: String,
    /// Whether the backing store is opened with `O_DIRECT`.
    pub direct_io: bool,
    pub fdatasyncs: u64,
    pub dsync_writes: u64,
}
