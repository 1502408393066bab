//! The NBD protocol, server side, sans-IO.
//!
//! - [`consts`]: magic numbers, option, reply, info, flag and command codes.
//! - [`handshake`]: the fixed-newstyle option negotiation as a state machine
//!   that consumes client bytes and produces server bytes.
//! - [`transmission`]: request headers, their validation against the
//!   negotiated export, and simple replies.
//! - [`ErrorCode`]: the only error values NBD allows on the wire.
//!
//! Both directions of every message are encoded and decoded here, so tests
//! and fuzzers can play the client with the same code.

pub mod consts;
pub mod handshake;
pub mod transmission;

mod error;
pub use error::ErrorCode;
