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
use crate::core::activity::MAX_REQUEST_EXTENTS;
use crate::core::{ClientOp, IoResult, NbdRefusal};
use crate::metadata::activity_log::AL_EXTENT_SIZE;

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

    /// A TRIM or WRITE_ZEROES of up to 4 GiB, in pieces of at most
    /// [`MAX_REQUEST_EXTENTS`] activity-log extents (so one request never
    /// needs a log transaction wider than that), all in flight at once. The
    /// answer waits for every piece; the first error wins.
    async fn submit_split(
        &self,
        offset: u64,
        len: u32,
        op: impl Fn(u64, u32) -> ClientOp,
    ) -> IoResult {
        let pieces = split_at_extents(offset, len);
        if pieces.len() == 1 {
            return self.submit(op(offset, len)).await;
        }
        let receivers: Vec<_> = pieces
            .into_iter()
            .map(|(o, l)| {
                let (tx, rx) = oneshot::channel();
                let piece = op(o, l);
                self.shared.run(|core| core.handle_client(tx, piece));
                rx
            })
            .collect();
        let mut result = Ok(None);
        for rx in receivers {
            let r = rx.await.unwrap_or(Err(ErrorCode::Shutdown));
            if result.is_ok() && r.is_err() {
                result = r;
            }
        }
        result
    }
}

/// `[offset, offset + len)` cut at activity-log extent boundaries into
/// pieces of at most [`MAX_REQUEST_EXTENTS`] extents.
fn split_at_extents(offset: u64, len: u32) -> Vec<(u64, u32)> {
    let step = MAX_REQUEST_EXTENTS as u64 * AL_EXTENT_SIZE;
    let end = offset + u64::from(len);
    let mut pieces = Vec::new();
    let mut at = offset;
    loop {
        let next = ((at / step + 1) * step).min(end);
        pieces.push((at, (next - at) as u32));
        if next >= end {
            return pieces;
        }
        at = next;
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
        self.submit_split(offset, length, |offset, len| ClientOp::Trim {
            offset,
            len,
            fua,
        })
        .await
        .map(drop)
    }

    async fn write_zeroes(&self, offset: u64, length: u32, f: ZeroFlags) -> Result<(), ErrorCode> {
        let op = |offset, len| ClientOp::WriteZeroes {
            offset,
            len,
            no_hole: f.no_hole,
            fast: f.fast,
            fua: f.fua,
        };
        self.submit_split(offset, length, op).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: u64 = MAX_REQUEST_EXTENTS as u64 * AL_EXTENT_SIZE;

    #[test]
    fn small_requests_stay_whole() {
        assert_eq!(split_at_extents(4096, 8192), vec![(4096, 8192)]);
        assert_eq!(split_at_extents(0, STEP as u32), vec![(0, STEP as u32)]);
    }

    #[test]
    fn large_requests_are_cut_at_extent_boundaries() {
        let pieces = split_at_extents(STEP - 4096, u32::MAX);
        let end = STEP - 4096 + u64::from(u32::MAX);
        // Contiguous, covering the request exactly.
        assert_eq!(pieces[0], (STEP - 4096, 4096));
        let mut at = STEP - 4096;
        for &(o, l) in &pieces {
            assert_eq!(o, at);
            assert!(l > 0);
            // Never more than MAX_REQUEST_EXTENTS extents, never across
            // a piece boundary.
            assert_eq!(o / STEP, (o + u64::from(l) - 1) / STEP);
            at += u64::from(l);
        }
        assert_eq!(at, end);
        assert_eq!(pieces.len(), 17);
    }
}
