//! [`ConfigError`]: why a config cannot be used, as one line a person can act
//! on.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a config could not be loaded, or no node could be chosen from it.
///
/// `Display` is one line that starts with the file path as given, e.g.
/// `/etc/tandem/r0.toml:12: unknown key `foo` in [net] (expected one of: ...)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {}", .path.display(), IoMessage(.cause))]
    Read {
        /// The file, as given.
        path: PathBuf,
        /// What the operating system said.
        cause: io::Error,
    },
    /// The file is not a valid config.
    #[error("{}{}: {message}", .path.display(), LineSuffix(*.line))]
    Invalid {
        /// The file, as given.
        path: PathBuf,
        /// The 1-based line the problem is on, when it has one.
        line: Option<usize>,
        /// What is wrong and how to put it right, starting with the section
        /// and key.
        message: String,
    },
    /// `--node` names no node of the config.
    #[error("{}: no node named {requested:?} (nodes: {})", .path.display(), .names.join(", "))]
    UnknownNode {
        /// The file, as given.
        path: PathBuf,
        /// The name asked for.
        requested: String,
        /// The nodes the file has.
        names: Vec<String>,
    },
    /// No `--node` was given and the host name does not pick one.
    #[error(
        "{}: {}; pass --node NAME (nodes: {})",
        .path.display(),
        HostProblem(.host.as_deref()),
        .names.join(", ")
    )]
    NoNodeForHost {
        /// The file, as given.
        path: PathBuf,
        /// This machine's host name, if it could be read.
        host: Option<String>,
        /// The nodes the file has.
        names: Vec<String>,
    },
}

impl ConfigError {
    /// Builds a [`ConfigError::Invalid`], keeping the message on one line.
    pub(super) fn invalid(path: &Path, line: Option<usize>, message: &str) -> Self {
        Self::Invalid {
            path: path.to_owned(),
            line,
            message: message.replace(['\r', '\n'], " "),
        }
    }

    /// The config file the error is about, as given.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. }
            | Self::Invalid { path, .. }
            | Self::UnknownNode { path, .. }
            | Self::NoNodeForHost { path, .. } => path,
        }
    }

    /// The 1-based line of the file the error points at, if any.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}

/// `:12` for a known line, nothing otherwise.
struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

/// An I/O error without the `(os error N)` tail: `No such file or directory`.
struct IoMessage<'a>(&'a io::Error);

impl fmt::Display for IoMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        let text = match (self.0.raw_os_error(), text.rfind(" (os error ")) {
            (Some(_), Some(tail)) => &text[..tail],
            _ => &text,
        };
        f.write_str(text)
    }
}

struct HostProblem<'a>(Option<&'a str>);

impl fmt::Display for HostProblem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(host) => write!(f, "no node is named after this host ({host:?})"),
            None => f.write_str("cannot tell which node this is (the host name is unreadable)"),
        }
    }
}
