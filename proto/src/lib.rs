//! Tandem's wire formats and protocol state machines, sans-IO.
//!
//! This crate owns every byte layout Tandem speaks: the NBD protocol towards
//! clients ([`nbd`]) and, later, the peer link between the two nodes. It turns
//! bytes into typed messages and typed decisions into bytes. It never touches a
//! socket, a thread or a clock: callers feed it input and act on what it
//! returns, which is what lets the replicator run it under a deterministic
//! simulation and lets the fuzzers drive it directly.
//!
//! Invariants kept by every decoder here:
//! - a length read from the wire is checked against a limit before anything
//!   of that length is buffered or allocated;
//! - a message is accepted only if it is consumed exactly (no trailing bytes);
//! - no input, however malformed, panics.

pub mod buf;
pub mod nbd;
pub mod peer;
pub mod reader;

pub use buf::AlignedBuf;
