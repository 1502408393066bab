//! One NBD client connection: handshake, then the request loop.
//!
//! The connection task reads a header, validates it with `tandem_proto`,
//! charges the request's payload against the connection's byte budget
//! *before* buffering it, reads the payload into an aligned buffer, and
//! starts the request: no task per request, and the thread that completes a
//! request writes its reply (see `reply`). Replies go out in completion
//! order; the cookie matches them to requests. A request's budget is given
//! back only when its reply has been written, so read data waiting for a
//! slow client counts too.
//!
//! Ending a session (DISC, EOF, violation, server shutdown) stops the
//! reader only. The connection's flusher ends when every request read has
//! been answered and its reply written; then the write side is shut down
//! and the export attachment is dropped: no request that was read goes
//! unanswered while the socket lives. Shutdown also abandons a request the
//! client has only half sent: it was never read, so it is never executed or
//! answered.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use tandem_proto::AlignedBuf;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::{
    BlockSizes, CloseReason, ExportCatalog, ExportDetails, Refusal, RefusalKind, ServerHandshake,
    Status,
};
use tandem_proto::nbd::transmission::{
    Command, Decision, Limits, REQUEST_HEADER_LEN, RequestHeader, SimpleReply, validate,
};

use crate::export::{Export, ExportInfo, ZeroFlags};
use crate::reply::{Outbox, Outcome, Reply, ReplySink, Request};
use crate::server::ServerLimits;

/// Budget charged per request on top of its payload, bounding the number of
/// requests a connection can have in flight.
const PER_REQUEST_CHARGE: u32 = 4096;

/// How the server tells connections to stop.
#[derive(Clone, Default)]
pub(crate) struct Stop {
    /// Stop reading requests; answer those already read.
    pub drain: CancellationToken,
    /// Give up on replies a client is not reading (after the grace period).
    pub abandon: CancellationToken,
}

/// Serve one client until it leaves or the server shuts down.
pub(crate) async fn serve<R, W, E>(
    reader: R,
    mut writer: W,
    export: Arc<E>,
    limits: ServerLimits,
    stop: Stop,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + ReplySink + Unpin,
    E: Export,
{
    let mut reader = reader;
    let mut input = BytesMut::with_capacity(4096);
    let negotiated = tokio::select! {
        _ = stop.drain.cancelled() => return,
        r = tokio::time::timeout(
            limits.handshake_timeout,
            negotiate(&mut reader, &mut writer, &mut input, &*export, limits.max_payload, &peer),
        ) => match r {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(_) => {
                info!("NBD client {peer}: handshake not finished in {:?}, closing", limits.handshake_timeout);
                return;
            }
        },
    };
    let (info, attachment) = negotiated;
    debug!("NBD client {peer}: in transmission");
    let flags = transmission_flags(&info);
    let proto_limits = Limits {
        export_size: info.size,
        max_payload: limits.max_payload,
        flags,
    };

    let outbox = Outbox::new(Arc::new(writer), peer.clone());
    let flusher = tokio::spawn(outbox.clone().flush_until_done(stop.abandon.clone()));
    // Bytes the client sent after its last option belong to transmission.
    let chained = std::io::Cursor::new(input.freeze()).chain(reader);
    let mut reader = BufReader::with_capacity(256 * 1024, chained);
    let budget = Budget::new(limits.max_buffered_bytes);

    // While the next request is already whole in the buffer (and its budget
    // is there), a request is started with its reply deferred: the replies
    // of a run of buffered requests that complete here go out together, in
    // one `writev`, once the run ends, before anything that can block (a
    // socket read, a wait for budget, the end of the session).
    let mut deferred = false;
    // The whole request (header, budget, payload) is read under the
    // cancellation: a client that stops mid-request cannot hold up shutdown.
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = stop.drain.cancelled() => break "server shutting down",
            next = read_request(&mut reader, &proto_limits, &budget, &peer) => next,
        };
        match next {
            Next::End(why) => break why,
            Next::Answer(reply) => outbox.send(reply, false),
            Next::Run {
                cookie,
                command,
                payload,
                budget: permit,
            } => {
                let export = export.clone();
                let future = async move { execute(&*export, command, payload).await };
                // Nothing more to read yet: the client is waiting for this
                // answer, so the storage may do the I/O on this thread.
                if reader.buffer().is_empty() {
                    crate::inline::allow(|| Request::start(cookie, future, permit, &outbox));
                } else if next_request_ready(reader.buffer(), &budget) {
                    crate::reply::defer_replies(|| Request::start(cookie, future, permit, &outbox));
                    deferred = true;
                    continue;
                } else {
                    Request::start(cookie, future, permit, &outbox);
                }
            }
        }
        if deferred {
            outbox.release();
            deferred = false;
        }
    };
    if deferred {
        outbox.release();
    }
    debug!("NBD client {peer}: {end}; finishing requests in flight");
    outbox.finish_reading();
    let _ = flusher.await;
    drop(attachment);
    debug!("NBD client {peer}: closed");
}

/// Whether `buffered` holds the whole next request and its budget charge
/// is available now: reading it then needs neither the socket nor a wait.
/// Only a hint for batching replies; a header that turns out to be bad is
/// rejected by [`read_request`] as usual.
fn next_request_ready(buffered: &[u8], budget: &Budget) -> bool {
    let Some(raw) = buffered.first_chunk::<REQUEST_HEADER_LEN>() else {
        return false;
    };
    let Ok(header) = RequestHeader::decode(raw) else {
        return false;
    };
    let (payload, charged) = match header.command {
        CMD_WRITE => (header.length as usize, header.length),
        CMD_READ => (0, header.length),
        _ => (0, 0),
    };
    buffered.len() - REQUEST_HEADER_LEN >= payload && budget.available(charged)
}

/// A connection's byte budget.
struct Budget {
    permits: Arc<Semaphore>,
    total: u32,
}

impl Budget {
    fn new(max_buffered_bytes: u32) -> Budget {
        let total = max_buffered_bytes.max(1);
        Budget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    fn charge_for(&self, bytes: u32) -> u32 {
        bytes.saturating_add(PER_REQUEST_CHARGE).min(self.total)
    }

    /// Whether [`charge`](Self::charge) for `bytes` would not wait now.
    /// Only this connection's reader takes from the budget, so it stays
    /// true until the reader charges.
    fn available(&self, bytes: u32) -> bool {
        self.permits.available_permits() >= self.charge_for(bytes) as usize
    }

    /// Wait until `bytes` plus the per-request charge are available. A
    /// request larger than the whole budget is charged the whole budget:
    /// it runs alone instead of waiting forever.
    async fn charge(&self, bytes: u32) -> Option<OwnedSemaphorePermit> {
        let charge = self.charge_for(bytes);
        self.permits.clone().acquire_many_owned(charge).await.ok()
    }
}

/// What reading the next request gave.
enum Next {
    /// Execute this request: its payload is read and its budget charged.
    Run {
        cookie: u64,
        command: Command,
        payload: Option<Bytes>,
        budget: OwnedSemaphorePermit,
    },
    /// Send this reply at once (a rejected request).
    Answer(Reply),
    /// Stop reading: the session is over.
    End(&'static str),
}

/// Read one whole request: its header, then (after charging the budget,
/// before buffering anything) its payload. Not cancel-safe; it is only
/// cancelled when the session ends anyway.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    limits: &Limits,
    budget: &Budget,
    peer: &str,
) -> Next {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    if reader.read_exact(&mut raw).await.is_err() {
        return Next::End("client closed the connection");
    }
    let header = match RequestHeader::decode(&raw) {
        Ok(h) => h,
        Err(e) => {
            info!("NBD client {peer}: {e}; closing");
            return Next::End("protocol violation");
        }
    };
    let command = match validate(&header, limits) {
        Decision::Execute(Command::Disconnect) => return Next::End("client sent NBD_CMD_DISC"),
        Decision::Execute(c) => c,
        Decision::Close(reason) => {
            info!("NBD client {peer}: {reason}; closing");
            return Next::End("protocol violation");
        }
        Decision::Reject { error, discard } => {
            debug!("NBD client {peer}: rejecting {header:?} with {error}");
            let skipped =
                tokio::io::copy(&mut reader.take(discard.into()), &mut tokio::io::sink()).await;
            if !matches!(skipped, Ok(n) if n == u64::from(discard)) {
                return Next::End("client closed the connection");
            }
            // Error replies are charged too, so a client that sends bad
            // requests without reading replies cannot queue unbounded
            // replies.
            let Some(permit) = budget.charge(0).await else {
                return Next::End("budget closed");
            };
            return Next::Answer(Reply {
                header: SimpleReply::err(header.cookie, error).encode(),
                data: None,
                _budget: permit,
            });
        }
    };
    // Charge the budget before buffering the payload (or the read data).
    let size = match command {
        Command::Read { length, .. } | Command::Write { length, .. } => length,
        _ => 0,
    };
    let Some(permit) = budget.charge(size).await else {
        return Next::End("budget closed");
    };
    let payload = if let Command::Write { length, .. } = command {
        match read_payload(reader, length as usize).await {
            Some(buf) => Some(buf.into_bytes()),
            None => return Next::End("client closed the connection mid-payload"),
        }
    } else {
        None
    };
    Next::Run {
        cookie: header.cookie,
        command,
        payload,
        budget: permit,
    }
}

/// Read exactly `len` bytes into a new aligned buffer without zeroing it
/// first (zeroing costs about as much as the copy from the socket): the
/// bytes are read straight into the uninitialised memory through
/// [`ReadBuf::uninit`], which tracks how much has been filled. `None` if the
/// stream ends or fails first; the partly filled buffer is then dropped
/// unread.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Option<AlignedBuf> {
    // SAFETY: nothing reads the buffer until the loop below has filled all
    // `len` bytes; on an early return it is only dropped.
    let mut buf = unsafe { AlignedBuf::uninit(len) };
    // SAFETY: the buffer owns `len` writable bytes at this address, and the
    // slice (of `MaybeUninit`, which has no validity requirement) is the only
    // reference to them while it lives.
    let memory =
        unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<MaybeUninit<u8>>(), len) };
    let mut window = ReadBuf::uninit(memory);
    while window.remaining() > 0 {
        let before = window.filled().len();
        let read = poll_fn(|cx| Pin::new(&mut *reader).poll_read(cx, &mut window)).await;
        if read.is_err() || window.filled().len() == before {
            return None;
        }
    }
    // `ReadBuf` only counts bytes as filled once it has written them.
    debug_assert_eq!(window.filled().len(), len);
    Some(buf)
}

/// Run one command against the export: the result, and a read's data.
async fn execute<E: Export>(export: &E, command: Command, payload: Option<Bytes>) -> Outcome {
    let result = match command {
        Command::Read { offset, length } => match export.read(offset, length).await {
            Ok(data) if data.len() == length as usize => return (Ok(()), Some(data)),
            Ok(data) => {
                // Sending it would desynchronise the stream: the client
                // reads exactly `length` bytes after the header.
                error!(
                    "export returned {} bytes for a {length}-byte read at {offset}; answering EIO",
                    data.len()
                );
                Err(ErrorCode::Io)
            }
            Err(e) => Err(e),
        },
        Command::Write { offset, fua, .. } => {
            export.write(offset, payload.unwrap_or_default(), fua).await
        }
        Command::Flush => export.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => export.trim(offset, length, fua).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => {
            export
                .write_zeroes(offset, length, ZeroFlags { fua, no_hole, fast })
                .await
        }
        // Advisory; Tandem keeps no cache of its own to warm.
        Command::Cache { .. } => Ok(()),
        Command::Disconnect => unreachable!("handled by the reader"),
    };
    (result, None)
}

/// Run the handshake; `None` if the session ended during it.
async fn negotiate<R, W, E>(
    reader: &mut R,
    writer: &mut W,
    input: &mut BytesMut,
    export: &E,
    max_payload: u32,
    peer: &str,
) -> Option<(ExportInfo, E::Attachment)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    E: Export,
{
    let mut hs = ServerHandshake::new();
    let mut catalog = Catalog {
        export,
        max_payload,
        selected: None,
    };
    let mut status = Status::NeedInput;
    loop {
        let out = hs.take_output();
        if !out.is_empty() && writer.write_all(&out).await.is_err() {
            return None;
        }
        match status {
            Status::NeedInput => {}
            Status::Transmission(_) => return catalog.selected.take(),
            Status::Close(reason) => {
                match reason {
                    CloseReason::Aborted => debug!("NBD client {peer}: aborted negotiation"),
                    CloseReason::Refused(r) => info!("NBD client {peer}: refused: {}", r.message),
                    CloseReason::Violation(v) => info!("NBD client {peer}: {v}; closing"),
                }
                let _ = writer.shutdown().await;
                return None;
            }
        }
        match reader.read_buf(input).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        status = hs.handle_input(input, &mut catalog);
    }
}

struct Catalog<'a, E: Export> {
    export: &'a E,
    /// `ServerLimits::max_payload`: the advertised maximum block size.
    max_payload: u32,
    selected: Option<(ExportInfo, E::Attachment)>,
}

impl<E: Export> Catalog<'_, E> {
    fn check_name(&self, name: &str) -> Result<(), Refusal> {
        if name.is_empty() || name == self.export.name() {
            Ok(())
        } else {
            Err(Refusal {
                kind: RefusalKind::UnknownExport,
                message: format!(
                    "no export named {name:?}; this server exports {:?}",
                    self.export.name()
                ),
            })
        }
    }

    fn details(&self, info: &ExportInfo) -> ExportDetails {
        ExportDetails {
            name: self.export.name().to_string(),
            description: self.export.description(),
            size: info.size,
            flags: transmission_flags(info),
            block_sizes: advertised_block_sizes(info.block_sizes, self.max_payload),
        }
    }
}

/// The export's block sizes, with the maximum lowered to what this server
/// accepts: a client keeping to the advertised maximum must never send a
/// write that closes the connection or a read that gets `EINVAL`. The
/// maximum stays a multiple of the minimum, as the protocol requires.
fn advertised_block_sizes(b: BlockSizes, max_payload: u32) -> BlockSizes {
    if b.maximum <= max_payload {
        return b;
    }
    let minimum = b.minimum.max(1);
    let maximum = (max_payload / minimum * minimum).max(minimum);
    BlockSizes {
        minimum: b.minimum,
        preferred: b.preferred.min(maximum),
        maximum,
    }
}

impl<E: Export> ExportCatalog for Catalog<'_, E> {
    fn list(&mut self) -> Vec<String> {
        vec![self.export.name().to_string()]
    }

    fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        self.check_name(name)?;
        let info = self.export.info()?;
        Ok(self.details(&info))
    }

    fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        self.check_name(name)?;
        let (info, attachment) = self.export.attach()?;
        let details = self.details(&info);
        self.selected = Some((info, attachment));
        Ok(details)
    }
}

fn transmission_flags(info: &ExportInfo) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    let mut set = |cond: bool, flag: u16| {
        if cond {
            flags |= flag;
        }
    };
    set(info.read_only, TFLAG_READ_ONLY);
    set(info.can_trim, TFLAG_SEND_TRIM);
    set(info.can_write_zeroes, TFLAG_SEND_WRITE_ZEROES);
    set(
        info.can_write_zeroes && info.can_fast_zero,
        TFLAG_SEND_FAST_ZERO,
    );
    set(info.can_multi_conn, TFLAG_CAN_MULTI_CONN);
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_maximum_never_exceeds_max_payload() {
        let t = BlockSizes::TANDEM;
        assert_eq!(advertised_block_sizes(t, 32 << 20), t);
        assert_eq!(advertised_block_sizes(t, u32::MAX), t);
        let b = advertised_block_sizes(t, 1_000_000);
        assert_eq!((b.minimum, b.preferred, b.maximum), (512, 4096, 999_936));
        let b = advertised_block_sizes(t, 2048);
        assert_eq!((b.minimum, b.preferred, b.maximum), (512, 2048, 2048));
        // A limit below the minimum block size cannot be honoured; the
        // sizes stay consistent.
        let b = advertised_block_sizes(t, 100);
        assert_eq!((b.minimum, b.preferred, b.maximum), (512, 512, 512));
    }
}
