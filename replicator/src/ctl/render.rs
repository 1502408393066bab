//! The human-readable `repctl status` screen.

use std::fmt::Write;

use crate::status::Status;

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
        let pct = if sync.total_bytes == 0 {
            100.0
        } else {
            100.0 * sync.done_bytes as f64 / sync.total_bytes as f64
        };
        let eta = sync
            .eta_sec
            .map_or("unknown".to_string(), |e| format!("{e}s"));
        let _ = writeln!(
            out,
            "  sync {pct:.1}% ({} of {}), {}/s, ETA {eta}",
            size(sync.done_bytes),
            size(sync.total_bytes),
            size(sync.bytes_per_sec)
        );
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
        "  disk read {} written {}, net sent {} received {}, resync sent {} received {}",
        size(c.disk_read_bytes),
        size(c.disk_written_bytes),
        size(c.net_sent_bytes),
        size(c.net_received_bytes),
        size(c.resync_sent_bytes),
        size(c.resync_received_bytes)
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
}
