//! The peer link: how two nodes of a resource talk, sans-IO.
//!
//! - [`frame`]: framing. Every message travels in a frame with a header
//!   (magic, type, sequence number, length) and a crc32 over header and
//!   body. A frame whose magic, type, length, sequence or crc is wrong is a
//!   [`frame::FrameError`]: the link is dropped and nothing in the frame
//!   reaches the disk.
//! - [`message`]: the typed messages and their encodings.
//! - [`handshake`]: the link handshake that runs first on every connection:
//!   protocol version range, resource, node names, size and protocol
//!   checks, and the optional HMAC-SHA256 challenge-response in both
//!   directions.
//!
//! Everything after the handshake (states, bitmaps, replicated writes,
//! resync) is decided by the replicator's core; this module only encodes
//! and decodes it.

pub mod frame;
pub mod handshake;
pub mod message;

pub use frame::{Decoder, EncodedFrame, FrameError, FrameHeader};
pub use handshake::{LinkConfig, LinkHandshake, LinkRefusal, Progress};
pub use message::{Extent, Message, PeerState};

/// Oldest peer-link protocol version this build speaks.
pub const PROTOCOL_MIN: u16 = 1;
/// Newest peer-link protocol version this build speaks. Version 2 adds
/// `VerifyRecheck` / `VerifyRecheckReply` (exact online verify from the
/// Secondary); a version 1 peer never receives them.
pub const PROTOCOL_MAX: u16 = 2;
