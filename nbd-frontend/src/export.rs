//! The `Export` trait: what the NBD server needs from the storage side.
//!
//! The replicator implements it over its core (roles, replication,
//! storage); tests implement it over memory. Futures returned by the I/O
//! methods resolve only when the operation's NBD guarantee holds (a FUA
//! write is durable, a FLUSH covers every write answered before it, and,
//! for the replicator, the peer has it too).

use std::future::Future;

use bytes::Bytes;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::handshake::{BlockSizes, Refusal};

/// What the server advertises for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_fast_zero: bool,
    pub can_multi_conn: bool,
    pub block_sizes: BlockSizes,
}

/// Flags of `NBD_CMD_WRITE_ZEROES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// Durable before the reply.
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE`: keep the range allocated.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` rather than be slow.
    pub fast: bool,
}

pub trait Export: Send + Sync + 'static {
    /// Held for as long as a client is in transmission with this export.
    type Attachment: Send + 'static;

    /// The export name (the resource name). The empty name means it too.
    fn name(&self) -> &str;

    /// Free text shown by clients that ask for `NBD_INFO_DESCRIPTION`.
    fn description(&self) -> String;

    /// Describe the export for `NBD_OPT_INFO`; no side effects.
    fn info(&self) -> Result<ExportInfo, Refusal>;

    /// Let a client into transmission (`NBD_OPT_GO`, `NBD_OPT_EXPORT_NAME`).
    /// The attachment is dropped after the client's last reply is sent.
    fn attach(&self) -> Result<(ExportInfo, Self::Attachment), Refusal>;

    /// Read `length` bytes at `offset` (the range is within the export).
    fn read(
        &self,
        offset: u64,
        length: u32,
    ) -> impl Future<Output = Result<Bytes, ErrorCode>> + Send;

    /// Write `data` at `offset`; with `fua`, durable before resolving.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), ErrorCode>> + Send;

    /// Make every write answered before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), ErrorCode>> + Send;

    /// Discard a range (advisory).
    fn trim(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), ErrorCode>> + Send;

    /// Make a range read back as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> impl Future<Output = Result<(), ErrorCode>> + Send;
}
