//! Tandem's NBD server.
//!
//! Serves one [`Export`] to any number of NBD clients over TCP and unix
//! sockets. It owns the network side only: accepting connections, running
//! the handshake machine from `tandem_proto::nbd::handshake`, reading
//! requests (payload length checked before anything is buffered), running
//! them concurrently and writing replies in completion order. Storage,
//! roles and replication are behind the [`Export`] trait, which the
//! replicator implements; this crate never depends on the replicator.
//!
//! Invariants:
//! - a request is answered only after the export's future for it resolved,
//!   so the export alone decides when a write is durable/replicated; every
//!   request read is answered exactly once (`EIO` if the export's future
//!   panics or returns read data of the wrong length);
//! - `NBD_CMD_DISC`, end of input, a protocol violation and server shutdown
//!   all stop reading new requests but let every request already read run to
//!   completion and send its reply before the connection closes;
//! - a connection's buffered payloads and unsent read data are bounded by
//!   [`ServerLimits::max_buffered_bytes`]; a client that sends faster than
//!   it takes its answers waits.

mod connection;
mod export;
pub mod inline;
mod reply;
mod server;

pub use export::{Export, ExportInfo, ZeroFlags};
pub use reply::batch_replies;
pub use server::{BoundAddr, Listen, NbdServer, ServerLimits};
pub use tandem_proto::nbd::ErrorCode;
pub use tandem_proto::nbd::handshake::{BlockSizes, Refusal, RefusalKind};
