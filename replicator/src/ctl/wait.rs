//! `repctl wait-connect` and `repctl wait-sync`: block on the events stream
//! until a condition holds.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Failure, connect, send};
use crate::control::Request;
use crate::status::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The link to the peer is Connected.
    Connected,
    /// Connected, and both disks UpToDate (no resync running).
    Synced,
}

impl Until {
    fn holds(self, s: &Status) -> bool {
        use crate::core::states::{ConnState, DiskState, ReplState};
        let connected = s.connection == ConnState::Connected;
        match self {
            Until::Connected => connected,
            Until::Synced => {
                connected
                    && s.replication == ReplState::Established
                    && s.disk == DiskState::UpToDate
                    && s.peer
                        .as_ref()
                        .is_some_and(|p| p.disk == DiskState::UpToDate)
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Until::Connected => "the link to be Connected",
            Until::Synced => "both disks to be UpToDate",
        }
    }
}

/// Wait until `until` holds, or `timeout` passes (exit status 1).
pub fn wait_for(control: &Path, until: Until, timeout: Option<Duration>) -> Result<(), Failure> {
    let mut stream = connect(control)?;
    if let Some(t) = timeout {
        // Reads wake up at least this often to check the deadline.
        stream
            .set_read_timeout(Some(t.min(Duration::from_millis(500))))
            .map_err(Failure::from)?;
    }
    send(&mut stream, &Request::Events)?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        if let Some(d) = deadline
            && Instant::now() >= d
        {
            return Err(Failure::error(format!(
                "timed out after {} waiting for {}",
                crate::config::units::format_duration(timeout.unwrap_or_default()),
                until.describe()
            )));
        }
        // A read that times out keeps what it read of the line so far.
        match reader.read_line(&mut line) {
            Ok(0) => {
                return Err(Failure {
                    code: 4,
                    message: "repd went away".into(),
                });
            }
            Ok(_) => {
                let status: Status = serde_json::from_str(&line)
                    .map_err(|e| Failure::error(format!("unreadable event from repd: {e}")))?;
                if until.holds(&status) {
                    return Ok(());
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return Err(Failure {
                    code: 4,
                    message: format!("repd went away: {e}"),
                });
            }
        }
    }
}
