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
    /// Why the last connection attempt was refused or dropped, if it was.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The generation rule that decided the last connection (DRBD's
    /// `uuid_compare` rule number and outcome).
    #[serde(default)]
    pub generation_rule: Option<String>,
    /// The running or last online verify on this node (`repctl verify`,
    /// either side), `null` if none ran since `repd` started.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
}

/// An online verify: progress and the blocks found out of sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// `VerifySource` (the node that ran `repctl verify`) or `VerifyTarget`.
    pub role: String,
    /// `crc32` or `sha256`.
    pub alg: String,
    pub running: bool,
    /// Every block was compared (false while running, or if it stopped).
    pub complete: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Blocks found different, marked out of sync on both nodes.
    pub out_of_sync_blocks: u64,
    pub out_of_sync_bytes: u64,
    /// The first differing byte ranges (at most 64; the counts are exact).
    pub ranges: Vec<VerifyRange>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRange {
    pub offset: u64,
    pub len: u64,
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
    /// Resync data sent on the wire (`ResyncData` payloads); ranges that
    /// travel as zero ranges are counted in `resync_zero_sent_bytes`.
    pub resync_sent_bytes: u64,
    /// Resync data received (`ResyncData` payloads).
    pub resync_received_bytes: u64,
    /// Resynced bytes that read as zeros on the source and were sent as a
    /// zero-range instruction (no data on the wire).
    #[serde(default)]
    pub resync_zero_sent_bytes: u64,
    /// Resynced bytes received as zero ranges (written as zeros).
    #[serde(default)]
    pub resync_zero_received_bytes: u64,
    /// Sync source: bytes a checksum comparison found identical on the
    /// target, so they were not sent (checksum-based resync).
    #[serde(default)]
    pub resync_same_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// `io_uring` or `threads`.
    pub kind: String,
    /// Whether the backing store is opened with `O_DIRECT`.
    pub direct_io: bool,
    /// How FUA writes are made durable: `rwf_dsync` (each write carries
    /// `RWF_DSYNC`) or `write_fdatasync` (plain writes, then one
    /// `fdatasync`, counted in `fdatasyncs`).
    pub fua: String,
    /// `fdatasync` calls: FLUSHes, FUA writes in `write_fdatasync` mode, FUA
    /// zeroes.
    pub fdatasyncs: u64,
    /// FUA writes made durable with `RWF_DSYNC`.
    pub dsync_writes: u64,
}

impl EngineStatus {
    /// The engine of a node without real storage (tests, simulation):
    /// `kind`, zero counters.
    pub fn idle(kind: &str) -> Self {
        EngineStatus {
            kind: kind.into(),
            direct_io: false,
            fua: "rwf_dsync".into(),
            fdatasyncs: 0,
            dsync_writes: 0,
        }
    }
}

/// `2026-11-22T04:25:03.982Z`: an RFC 3339 UTC timestamp with milliseconds.
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day), 2026-11-22T04:25:03.982Z.
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
        let t = UNIX_EPOCH + Duration::from_millis(1_795_321_503_982);
        assert_eq!(rfc3339_utc(t), "2026-11-22T04:25:03.982Z");
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(4_102_444_799)),
            "2099-12-31T23:59:59.000Z"
        );
    }
}
