//! `repctl`: the administrator's tool.
//!
//! Talks to the running `repd` over the node's control socket, except for
//! the metadata commands (`create-md`, `dump-md`), which work directly on
//! the disk and only while no `repd` holds it (the backing store's lock
//! enforces that).
//!
//! Exit status (CONTRACT section 3): 0 done; 1 error; 3 refused by a
//! safety rule (the message starts with `refused:`); 4 no `repd` answers.

mod metadata;
mod render;
mod wait;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::control::{Request, Response};

/// Default configuration when neither `--config` nor `$TANDEM_CONFIG` is set.
pub const DEFAULT_CONFIG: &str = "/etc/tandem/r0.toml";

#[derive(Debug, Parser)]
#[command(
    name = "repctl",
    version,
    about = "Administer a Tandem resource on this node"
)]
pub struct Cli {
    /// The resource's configuration file [default: $TANDEM_CONFIG, then /etc/tandem/r0.toml]
    #[arg(long, global = true, value_name = "FILE", env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Which [[node]] this is (default: the host name, or the only node).
    #[arg(long, global = true, value_name = "NAME")]
    pub node: Option<String>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Write fresh metadata (new generation, disk Inconsistent).
    CreateMd {
        /// Overwrite existing metadata (its generation history is lost).
        #[arg(long)]
        force: bool,
    },
    /// Print the metadata (generations, flags, out-of-sync count) as JSON.
    DumpMd,
    /// Show the resource's state.
    Status {
        /// Print the status object as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print one JSON object per state change, starting with the current state.
    Events,
    /// Promote this node to Primary.
    Primary {
        /// Promote even without UpToDate data or fencing confirmation (risks split-brain).
        #[arg(long)]
        force: bool,
    },
    /// Demote this node to Secondary (refused while an NBD client is attached).
    Secondary,
    /// (Re)enable the link to the peer.
    Connect {
        /// Resolve a split-brain by making this node the sync target: its
        /// changes since the split are discarded.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Drop the link and stay StandAlone until `connect`.
    Disconnect,
    /// Mark all local data out of sync: full resync from the peer.
    Invalidate,
    /// Start a new data generation; with --clear-bitmap, skip the initial
    /// sync of a brand-new pair whose disks are both zeroed.
    NewCurrentUuid {
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// State that the disconnected peer is powered off, so this node may
    /// become Primary (and a suspended Primary resumes I/O). A disk that is
    /// not UpToDate may lack the peer's last writes: it still needs
    /// `primary --force`.
    FenceConfirm,
    /// Online verify: compare every block with the peer by checksum
    /// (`verify-alg`), report and mark the blocks that differ; waits until
    /// the verify ends. `disconnect` + `connect` then resyncs them.
    Verify,
    /// Apply the config file's `[sync] rate` and `[net] max-buffers` to the
    /// running repd, at once (a running resync changes speed). Other keys
    /// take effect when repd restarts.
    Adjust,
    /// Wait until the link to the peer is Connected.
    WaitConnect {
        /// Give up after this long (e.g. 30s, 2m) with exit status 1.
        #[arg(long, value_name = "D")]
        timeout: Option<String>,
    },
    /// Wait until both disks are UpToDate.
    WaitSync {
        /// Give up after this long (e.g. 30s, 2m) with exit status 1.
        #[arg(long, value_name = "D")]
        timeout: Option<String>,
    },
    /// Stop repd cleanly.
    Down,
}

/// A failure with its exit status.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn error(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::error(e.to_string())
    }
}

/// Entry point of the `repctl` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if f.message.starts_with("refused:") {
                eprintln!("{}", f.message);
            } else {
                eprintln!("repctl: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = Config::load(&config_path)?;
    let node = config.node(cli.node.as_deref())?.clone();
    match cli.command {
        Cmd::CreateMd { force } => metadata::create_md(&config, &node, force),
        Cmd::DumpMd => metadata::dump_md(&config, &node),
        Cmd::Status { json } => {
            let response = call(&node.control, &Request::Status)?;
            let status = response
                .status
                .ok_or_else(|| Failure::error("repd sent no status"))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&status).expect("status serialises")
                );
            } else {
                print!("{}", render::status(&status));
            }
            Ok(())
        }
        Cmd::Events => events(&node.control),
        Cmd::Primary { force } => simple(&node.control, &Request::Primary { force }),
        Cmd::Secondary => simple(&node.control, &Request::Secondary),
        Cmd::Down => simple(&node.control, &Request::Down),
        Cmd::Connect { discard_my_data } => {
            simple(&node.control, &Request::Connect { discard_my_data })
        }
        Cmd::Disconnect => simple(&node.control, &Request::Disconnect),
        Cmd::Invalidate => simple(&node.control, &Request::Invalidate),
        Cmd::FenceConfirm => simple(&node.control, &Request::FenceConfirm),
        Cmd::Verify => simple(&node.control, &Request::Verify),
        Cmd::Adjust => simple(
            &node.control,
            &Request::Adjust {
                resync_rate: config.sync.rate,
                max_buffers: config.net.max_buffers,
            },
        ),
        Cmd::NewCurrentUuid { clear_bitmap } => {
            simple(&node.control, &Request::NewCurrentUuid { clear_bitmap })
        }
        Cmd::WaitConnect { timeout } => wait::wait_for(
            &node.control,
            wait::Until::Connected,
            parse_timeout(timeout)?,
        ),
        Cmd::WaitSync { timeout } => {
            wait::wait_for(&node.control, wait::Until::Synced, parse_timeout(timeout)?)
        }
    }
}

fn parse_timeout(t: Option<String>) -> Result<Option<std::time::Duration>, Failure> {
    t.map(|t| {
        crate::config::units::parse_duration(&t)
            .map_err(|e| Failure::error(format!("--timeout {t:?}: {e} (use e.g. 30s, 500ms, 2m)")))
    })
    .transpose()
}

pub(super) fn connect(path: &Path) -> Result<UnixStream, Failure> {
    UnixStream::connect(path).map_err(|e| Failure {
        code: 4,
        message: format!(
            "no repd answers on {} ({e}); is repd running for this node?",
            path.display()
        ),
    })
}

pub(super) fn send(stream: &mut UnixStream, request: &Request) -> Result<(), Failure> {
    let mut line = serde_json::to_string(request).expect("request serialises");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(|e| Failure {
        code: 4,
        message: format!("repd went away: {e}"),
    })
}

/// One request, one response; errors become failures with the right code.
fn call(path: &Path, request: &Request) -> Result<Response, Failure> {
    let mut stream = connect(path)?;
    send(&mut stream, request)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| Failure {
            code: 4,
            message: format!("repd went away: {e}"),
        })?;
    if line.is_empty() {
        return Err(Failure {
            code: 4,
            message: "repd closed the control connection without answering".into(),
        });
    }
    let response: Response = serde_json::from_str(&line)
        .map_err(|e| Failure::error(format!("unreadable answer from repd: {e}")))?;
    if response.ok {
        Ok(response)
    } else if response.refused {
        Err(Failure {
            code: 3,
            message: response.message,
        })
    } else {
        Err(Failure::error(response.message))
    }
}

fn simple(path: &Path, request: &Request) -> Result<(), Failure> {
    let response = call(path, request)?;
    if !response.message.is_empty() {
        println!("{}", response.message);
    }
    Ok(())
}

fn events(path: &Path) -> Result<(), Failure> {
    let mut stream = connect(path)?;
    send(&mut stream, &Request::Events)?;
    let stdout = std::io::stdout();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| Failure {
            code: 4,
            message: format!("repd went away: {e}"),
        })?;
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(()); // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}
