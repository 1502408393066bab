//! `repctl wait-connect` and `repctl wait-sync`: block on the events stream
//! until a condition holds.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Failure, connect, render, send};
use crate::control::Request;
use crate::status::{Status, SyncProgress};

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

/// How `wait-sync` shows the resync's progress.
pub enum Progress {
    /// Nothing (`wait-connect`).
    Quiet,
    /// A progress bar on stderr, which is a terminal.
    Bar(Option<indicatif::ProgressBar>),
    /// One plain line on stdout when a resync is first seen, then one every
    /// `every` (logs, pipes, scripts).
    Lines {
        every: Duration,
        last: Option<Instant>,
        shown: bool,
    },
}

/// Plain progress lines come this often.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// A bar when stderr is a terminal, else plain lines.
    pub fn for_terminal() -> Progress {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            Progress::Bar(None)
        } else {
            Progress::Lines {
                every: LINE_EVERY,
                last: None,
                shown: false,
            }
        }
    }

    /// Show `status` (at `now`) if it carries resync progress.
    pub fn update(&mut self, status: &Status, now: Instant) {
        let Some(sync) = &status.sync else { return };
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => {
                let bar = bar.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(sync.total_bytes);
                    b.set_style(bar_style());
                    b
                });
                bar.set_prefix(status.replication.to_string());
                bar.set_length(sync.total_bytes);
                bar.set_position(sync.done_bytes);
                bar.set_message(bar_message(sync));
            }
            Progress::Lines { every, last, shown } => {
                if last.is_none_or(|t| now.duration_since(t) >= *every) {
                    *last = Some(now);
                    *shown = true;
                    println!("{}", line(status, sync));
                }
            }
        }
    }

    /// The wait is over: clear the bar, or say so after progress lines.
    pub fn finish(self, done: bool) {
        match self {
            Progress::Quiet => {}
            Progress::Bar(bar) => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
            }
            Progress::Lines { shown, .. } => {
                if shown && done {
                    println!("in sync: both disks UpToDate");
                }
            }
        }
    }
}

/// The bar: `SyncTarget [=====>      ]  42% 431.0 MiB of 1.0 GiB, 20.0 MiB/s, ETA 29s`.
pub fn bar_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {percent:>3}% {msg}")
        .expect("valid template")
        .progress_chars("=> ")
}

/// The text after the bar: sizes, the daemon's rate and ETA.
pub fn bar_message(sync: &SyncProgress) -> String {
    format!(
        "{} of {}, {}",
        render::size(sync.done_bytes),
        render::size(sync.total_bytes),
        render::rate_eta(sync)
    )
}

/// A plain progress line: `SyncTarget 42.1% (431.0 MiB of 1.0 GiB), 20.0 MiB/s, ETA 29s`.
pub fn line(status: &Status, sync: &SyncProgress) -> String {
    format!("{} {}", status.replication, render::sync_line(sync))
}

/// Wait until `until` holds, or `timeout` passes (exit status 1).
pub fn wait_for(control: &Path, until: Until, timeout: Option<Duration>) -> Result<(), Failure> {
    let progress = match until {
        Until::Connected => Progress::Quiet,
        Until::Synced => Progress::for_terminal(),
    };
    wait_showing(control, until, timeout, progress)
}

/// [`wait_for`], showing the progress on `progress`.
pub fn wait_showing(
    control: &Path,
    until: Until,
    timeout: Option<Duration>,
    mut progress: Progress,
) -> Result<(), Failure> {
    let r = wait_loop(control, until, timeout, &mut progress);
    progress.finish(r.is_ok());
    r
}

fn wait_loop(
    control: &Path,
    until: Until,
    timeout: Option<Duration>,
    progress: &mut Progress,
) -> Result<(), Failure> {
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
                progress.update(&status, Instant::now());
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
