//! One NBD client connection: handshake, request loop, reply writer.
//!
//! The reader reads a header, validates it with `tandem_proto`, charges the
//! request's payload (or, for a read, its answer's data) against the
//! connection's byte budget *before* buffering it, reads the payload into
//! an aligned buffer, and spawns the request. Each request task sends its
//! reply to the writer task, which batches replies into as few socket
//! writes as possible. Replies go out in completion order; the cookie
//! matches them to requests. A reply carries its budget until it has been
//! written (or dropped): a client that does not read its answers stops the
//! reader once the budget is spent, instead of making answers pile up.
//!
//! Ending a session (DISC, EOF, violation, server shutdown) stops the
//! reader only. The writer ends when the last request task has sent its
//! reply, then the write side is shut down and the export attachment is
//! dropped: no request that was read goes unanswered while the socket lives.
//!
//! Server shutdown must not wait on a client: the reader stops at once,
//! whatever it was waiting for (a header, the rest of a payload, budget);
//! the writer gives the client [`ServerLimits::shutdown_grace`] to take its
//! answers, then drops them. Either way the writer waits for every request
//! task to finish, so the export is idle when the connection ends.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use tandem_proto::AlignedBuf;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::{
    CloseReason, ExportCatalog, ExportDetails, Refusal, RefusalKind, ServerHandshake, Status,
};
use tandem_proto::nbd::transmission::{
    Command, Decision, Limits, REQUEST_HEADER_LEN, RequestHeader, SimpleReply, validate,
};

use crate::export::{Export, ExportInfo, ZeroFlags};
use crate::server::ServerLimits;

/// Budget charged per request on top of its payload, bounding the number of
/// requests a connection can have in flight.
const PER_REQUEST_CHARGE: u32 = 4096;

struct Reply {
    header: [u8; 16],
    data: Option<Bytes>,
    /// The request's share of the connection's budget, given back when
    /// the reply is written or dropped.
    budget: Option<OwnedSemaphorePermit>,
}

/// Serve one client until it leaves or the server shuts down.
pub(crate) async fn serve<R, W, E>(
    reader: R,
    mut writer: W,
    export: Arc<E>,
    limits: ServerLimits,
    cancel: CancellationToken,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    E: Export,
{
    let mut reader = reader;
    let mut input = BytesMut::with_capacity(4096);
    let negotiated = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(
            limits.handshake_timeout,
            negotiate(&mut reader, &mut writer, &mut input, &*export, &peer),
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

    let (tx, rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_replies(
        writer,
        rx,
        peer.clone(),
        cancel.clone(),
        limits.shutdown_grace,
    ));
    // Bytes the client sent after its last option belong to transmission.
    let chained = std::io::Cursor::new(input.freeze()).chain(reader);
    let mut reader = BufReader::with_capacity(256 * 1024, chained);
    let budget = Arc::new(Semaphore::new(limits.max_buffered_bytes as usize));

    let end = loop {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break "server shutting down",
            r = reader.read_exact(&mut raw) => if r.is_err() { break "client closed the connection" },
        }
        let header = match RequestHeader::decode(&raw) {
            Ok(h) => h,
            Err(e) => {
                info!("NBD client {peer}: {e}; closing");
                break "protocol violation";
            }
        };
        let decision = validate(&header, &proto_limits);
        let command = match decision {
            Decision::Execute(Command::Disconnect) => break "client sent NBD_CMD_DISC",
            Decision::Execute(c) => c,
            Decision::Close(reason) => {
                info!("NBD client {peer}: {reason}; closing");
                break "protocol violation";
            }
            Decision::Reject { error, discard } => {
                debug!("NBD client {peer}: rejecting {header:?} with {error}");
                let mut skip = (&mut reader).take(discard.into());
                let mut sink = tokio::io::sink();
                let skipped = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break "server shutting down",
                    r = tokio::io::copy(&mut skip, &mut sink) => r,
                };
                if !matches!(skipped, Ok(n) if n == u64::from(discard)) {
                    break "client closed the connection";
                }
                // An error answer waits for the client like any other.
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break "server shutting down",
                    p = budget.clone().acquire_many_owned(PER_REQUEST_CHARGE) => match p {
                        Ok(p) => p,
                        Err(_) => break "budget closed",
                    },
                };
                let _ = tx.send(Reply {
                    header: SimpleReply::err(header.cookie, error).encode(),
                    data: None,
                    budget: Some(permit),
                });
                continue;
            }
        };
        // Charge the budget before buffering the payload (or the read data).
        let size = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => length,
            _ => 0,
        };
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break "server shutting down",
            p = budget
                .clone()
                .acquire_many_owned(size.saturating_add(PER_REQUEST_CHARGE)) => match p {
                Ok(p) => p,
                Err(_) => break "budget closed",
            },
        };
        let payload = if let Command::Write { length, .. } = command {
            let mut buf = AlignedBuf::zeroed(length as usize);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break "server shutting down mid-payload",
                r = reader.read_exact(buf.as_mut_slice()) => if r.is_err() {
                    break "client closed the connection mid-payload";
                },
            }
            Some(buf.into_bytes())
        } else {
            None
        };
        let (export, tx) = (export.clone(), tx.clone());
        tokio::spawn(async move {
            let mut reply = execute(&*export, header.cookie, command, payload).await;
            // Let go of the export before the writer can see this task
            // done: when a connection ends, nothing of it holds the export.
            drop(export);
            reply.budget = Some(permit);
            let _ = tx.send(reply);
        });
    };
    debug!("NBD client {peer}: {end}; finishing requests in flight");
    drop(tx);
    let _ = writer_task.await;
    drop(attachment);
    debug!("NBD client {peer}: closed");
}

async fn execute<E: Export>(
    export: &E,
    cookie: u64,
    command: Command,
    payload: Option<Bytes>,
) -> Reply {
    let result = match command {
        Command::Read { offset, length } => match export.read(offset, length).await {
            Ok(data) => {
                debug_assert_eq!(data.len(), length as usize);
                return Reply {
                    header: SimpleReply::ok(cookie).encode(),
                    data: Some(data),
                    budget: None,
                };
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
    let header = match result {
        Ok(()) => SimpleReply::ok(cookie),
        Err(e) => SimpleReply::err(cookie, e),
    };
    Reply {
        header: header.encode(),
        data: None,
        budget: None,
    }
}

/// Write replies as they come, batching whatever is queued into one flush.
/// Ends when every request task has sent its reply. Once the server shuts
/// down, a client that has not taken its replies within `grace` loses them.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    peer: String,
    cancel: CancellationToken,
    grace: std::time::Duration,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, writer);
    let mut broken = false;
    let give_up = async {
        cancel.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(give_up);
    while let Some(first) = rx.recv().await {
        if broken {
            continue; // keep draining so request tasks never block
        }
        let sent = tokio::select! {
            r = write_batch(&mut w, first, &mut rx) => r,
            () = &mut give_up => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not take its replies within {grace:?} of the shutdown"),
            )),
        };
        match sent {
            Ok(()) => {}
            // A client that vanished is routine; one that stalls a stop is not.
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                info!("NBD client {peer}: {e}; dropping them");
                broken = true;
            }
            Err(e) => {
                debug!("NBD client {peer}: cannot send replies: {e}");
                broken = true;
            }
        }
    }
    if !broken {
        let _ = w.shutdown().await;
    }
}

/// Write `first` and whatever else is queued, then flush.
async fn write_batch<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    first: Reply,
    rx: &mut mpsc::UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut next = Some(first);
    while let Some(reply) = next {
        write_reply(w, &reply).await?;
        next = rx.try_recv().ok();
    }
    w.flush().await
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    reply: &Reply,
) -> std::io::Result<()> {
    w.write_all(&reply.header).await?;
    if let Some(data) = &reply.data {
        w.write_all(data).await?;
    }
    Ok(())
}

/// Run the handshake; `None` if the session ended during it.
async fn negotiate<R, W, E>(
    reader: &mut R,
    writer: &mut W,
    input: &mut BytesMut,
    export: &E,
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
            block_sizes: info.block_sizes,
        }
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
