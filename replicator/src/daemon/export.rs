//! The node as an NBD export: `tandem_nbd::Export` over the shared core.
//!
//! Each request becomes a [`ClientOp`] fed to the core with a oneshot
//! sender as its token; the future resolves when the core answers it, which
//! is exactly when the request's guarantees hold.

use std::sync::Arc;

use bytes::Bytes;
use tandem_nbd::{BlockSizes, ErrorCode, Export, ExportInfo, Refusal, RefusalKind, ZeroFlags};
use tokio::sync::oneshot;

use super::shared::Shared;
use crate::core::{ClientOp, IoResult, NbdRefusal};

pub struct NodeExport {
    shared: Arc<Shared>,
    name: String,
    description: String,
}

impl NodeExport {
    pub fn new(shared: Arc<Shared>, resource: &str, node: &str) -> Self {
        NodeExport {
            shared,
            name: resource.to_string(),
            description: format!("Tandem resource {resource} on node {node}"),
        }
    }

    fn export_info(&self, size: u64) -> ExportInfo {
        ExportInfo {
            size,
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            // FLUSH and FUA act on the whole device, whatever connection
            // they arrive on: multi-conn is safe.
            can_multi_conn: true,
            block_sizes: BlockSizes::TANDEM,
        }
    }

    async fn submit(&self, op: ClientOp) -> IoResult {
        let (tx, rx) = oneshot::channel();
        self.shared.run(|core| core.handle_client(tx, op));
        rx.await.unwrap_or(Err(ErrorCode::Shutdown))
    }
}

fn refusal(r: NbdRefusal) -> Refusal {
    match r {
        NbdRefusal::NotServing(message) => Refusal {
            kind: RefusalKind::Policy,
            message,
        },
        NbdRefusal::ShuttingDown => Refusal {
            kind: RefusalKind::ShuttingDown,
            message: "repd is shutting down".into(),
        },
    }
}

/// Detaches the client from the core when its connection is done.
pub struct Attachment(Arc<Shared>);

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.run(|core| core.nbd_detach());
    }
}

impl Export for NodeExport {
    type Attachment = Attachment;

    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn info(&self) -> Result<ExportInfo, Refusal> {
        let size = self
            .shared
            .run(|core| core.nbd_check().map(|()| core.size()))
            .map_err(refusal)?;
        Ok(self.export_info(size))
    }

    fn attach(&self) -> Result<(ExportInfo, Attachment), Refusal> {
        let size = self
            .shared
            .run(|core| core.nbd_attach().map(|()| core.size()))
            .map_err(refusal)?;
        Ok((self.export_info(size), Attachment(self.shared.clone())))
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ErrorCode> {
        self.submit(ClientOp::Read {
            offset,
            len: length,
        })
        .await
        .map(Option::unwrap_or_default)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ErrorCode> {
        self.submit(ClientOp::Write { offset, data, fua })
            .await
            .map(drop)
    }

    async fn flush(&self) -> Result<(), ErrorCode> {
        self.submit(ClientOp::Flush).await.map(drop)
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ErrorCode> {
        self.submit(ClientOp::Trim {
            offset,
            len: length,
            fua,
        })
        .await
        .map(drop)
    }

    async fn write_zeroes(&self, offset: u64, length: u32, f: ZeroFlags) -> Result<(), ErrorCode> {
        let op = ClientOp::WriteZeroes {
            offset,
            len: length,
            no_hole: f.no_hole,
            fast: f.fast,
            fua: f.fua,
        };
        self.submit(op).await.map(drop)
    }
}
