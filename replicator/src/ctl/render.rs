//! The human-readable `repctl status` screen.

use std::fmt::Write;

use crate::status::{Status, SyncProgress};

/// `1073741824` → `1.0 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Seconds as `42s`, `12m05s`, `3h07m`.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Percent done, 100 for an empty resync.
pub fn percent(sync: &SyncProgress) -> f64 {
    if sync.total_bytes == 0 {
        100.0
    } else {
        100.0 * sync.done_bytes as f64 / sync.total_bytes as f64
    }
}

/// `42.1% (431.0 MiB of 1.0 GiB), 20.0 MiB/s, ETA 29s`.
pub fn sync_line(sync: &SyncProgress) -> String {
    format!(
        "{:.1}% ({} of {}), {}",
        percent(sync),
        size(sync.done_bytes),
        size(sync.total_bytes),
        rate_eta(sync)
    )
}

/// `20.0 MiB/s, ETA 29s` (`ETA unknown` until a rate is measured).
pub fn rate_eta(sync: &SyncProgress) -> String {
    let eta = sync.eta_sec.map_or("unknown".to_string(), duration);
    format!("{}/s, ETA {eta}", size(sync.bytes_per_sec))
}

pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} on {}: {}, disk {}, {}",
        s.resource,
        s.node,
        s.role,
        s.disk,
        size(s.size_bytes)
    );
    let _ = writeln!(
        out,
        "  connection {}, replication {}",
        s.connection, s.replication
    );
    match &s.peer {
        Some(p) => {
            let _ = writeln!(out, "  peer {}: {}, disk {}", p.node, p.role, p.disk);
        }
        None => {
            let _ = writeln!(out, "  no peer (single-node resource)");
        }
    }
    let _ = writeln!(
        out,
        "  NBD clients {}, I/O suspended {}, out of sync {}",
        s.nbd_clients,
        if s.io_suspended { "YES" } else { "no" },
        size(s.out_of_sync_bytes)
    );
    if let Some(sync) = &s.sync {
        let _ = writeln!(out, "  sync {}", sync_line(sync));
    }
    if let Some(v) = &s.verify {
        let state = if v.running {
            "running"
        } else if v.complete {
            "finished"
        } else {
            "stopped"
        };
        let ranges: Vec<String> = v
            .ranges
            .iter()
            .take(8)
            .map(|r| format!("{}+{}", r.offset, r.len))
            .collect();
        let _ = writeln!(
            out,
            "  verify ({}, {}) {state}: {} of {} compared, {} blocks out of sync{}{}",
            v.role,
            v.alg,
            size(v.done_bytes),
            size(v.total_bytes),
            v.out_of_sync_blocks,
            if ranges.is_empty() { "" } else { " at " },
            ranges.join(", ")
        );
    }
    if s.split_brain {
        let _ = writeln!(
            out,
            "  SPLIT-BRAIN detected: resolve with `repctl connect --discard-my-data` on the node whose changes to drop"
        );
    }
    let g = &s.generation;
    let _ = writeln!(
        out,
        "  generation {}:{}:{}:{}",
        g.current, g.bitmap, g.history[0], g.history[1]
    );
    let c = &s.counters;
    let _ = writeln!(
        out,
        "  disk read {} written {}, net sent {} received {}, resync sent {} received {} (zero ranges sent {} received {})",
        size(c.disk_read_bytes),
        size(c.disk_written_bytes),
        size(c.net_sent_bytes),
        size(c.net_received_bytes),
        size(c.resync_sent_bytes),
        size(c.resync_received_bytes),
        size(c.resync_zero_sent_bytes),
        size(c.resync_zero_received_bytes)
    );
    let e = &s.engine;
    let _ = writeln!(
        out,
        "  engine {} ({}, FUA by {}), fdatasync {}, RWF_DSYNC writes {}",
        e.kind,
        if e.direct_io { "O_DIRECT" } else { "buffered" },
        e.fua,
        e.fdatasyncs,
        e.dsync_writes
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::size(0), "0 B");
        assert_eq!(super::size(1023), "1023 B");
        assert_eq!(super::size(1 << 30), "1.0 GiB");
        assert_eq!(super::size(1536), "1.5 KiB");
    }

    #[test]
    fn durations_and_sync_lines() {
        use super::*;
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(65), "1m05s");
        assert_eq!(duration(3599), "59m59s");
        assert_eq!(duration(3 * 3600 + 7 * 60 + 59), "3h07m");
        let mut sync = SyncProgress {
            done_bytes: 256 << 20,
            total_bytes: 1 << 30,
            bytes_per_sec: 20 << 20,
            eta_sec: Some(39),
        };
        assert_eq!(
            sync_line(&sync),
            "25.0% (256.0 MiB of 1.0 GiB), 20.0 MiB/s, ETA 39s"
        );
        sync.bytes_per_sec = 0;
        sync.eta_sec = None;
        assert_eq!(
            sync_line(&sync),
            "25.0% (256.0 MiB of 1.0 GiB), 0 B/s, ETA unknown"
        );
        sync.total_bytes = 0;
        sync.done_bytes = 0;
        assert_eq!(percent(&sync), 100.0);
    }
}
