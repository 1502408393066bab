//! The control socket protocol between `repctl` and `repd`.
//!
//! A unix stream socket at the node's `control` path (mode 0600). The
//! client sends one JSON request line; the daemon answers with one JSON
//! response line, or, for `events`, with one status object per line until
//! the client goes away.

use serde::{Deserialize, Serialize};

use crate::status::Status;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Primary {
        #[serde(default)]
        force: bool,
    },
    Secondary,
    Down,
    Events,
    Connect {
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect,
    Invalidate,
    NewCurrentUuid {
        #[serde(default)]
        clear_bitmap: bool,
    },
    FenceConfirm,
    Verify,
    /// New values for the settings repd applies while running.
    Adjust {
        resync_rate: u64,
        max_buffers: u32,
    },
}

/// The answer to a request. `refused` marks a safety rule (exit 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub refused: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            refused: false,
            message: message.into(),
            status: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            refused: false,
            message: message.into(),
            status: None,
        }
    }

    pub fn refused(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            refused: true,
            message: message.into(),
            status: None,
        }
    }
}

/// Longest request line the daemon reads.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
