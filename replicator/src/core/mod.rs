//! The node's pure core: roles, disk states, promotion rules, metadata
//! updates and the life of every client request.
//!
//! The core does no I/O and reads no clock. Drivers feed it inputs
//! (`handle_*` methods: a client request, a storage completion, a metadata
//! write completion, an administrator command) and then drain its outputs
//! with [`Node::poll_output`] and carry them out (submit to storage, write
//! metadata, answer the client, answer the command, publish an event). The
//! same core runs under the daemon's tokio drivers and under deterministic
//! simulation.
//!
//! Invariants it enforces (each is restated at the code that enforces it):
//! - only a Primary with usable data accepts NBD clients and client I/O;
//! - a role or generation change takes effect only after the superblock that
//!   records it is durable (see `Deferred`);
//! - at most one superblock write is in flight, so the two slots are never
//!   both being written (a crash leaves one intact);
//! - a client request is answered exactly once.

pub mod activity;
pub mod bitmap;
pub mod csum;
mod epochs;
pub mod fencing;
pub mod generations;
mod io;
mod link;
mod meta;
mod node;
pub mod pace;
mod ranges;
mod resync;
pub(crate) mod rng;
pub mod states;
#[cfg(test)]
mod tests;
mod verify;
pub mod zeros;

pub use node::{
    ClientOp, Command, CommandError, Device, IoResult, LinkCommand, NbdRefusal, Node, NodeParams,
    Output,
};
