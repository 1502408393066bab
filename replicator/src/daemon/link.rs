//! The peer link driver: sockets, the link handshake, framing, keepalive.
//!
//! One manager task owns the listening socket and decides when to dial.
//! Of the two nodes, the one whose name sorts first dials (every
//! `connect-retry`) and the other accepts, so there is never more than one
//! link. Each connection runs the `tandem_proto` link handshake (version,
//! names, size, shared secret); a refused peer is logged with the reason
//! and nothing reaches the core. An established link gets a reader task
//! (frames in, checked, handed to the core; block data read straight into
//! aligned buffers) and a sending side, [`LinkOut`] (the core's messages
//! out, written by the thread that queued them or, for runs of them and
//! when the socket is full, by its writer task; a `Ping` when idle for
//! `ping-interval`). No frame for `ping-timeout`
//! declares the peer dead. Any framing error (bad crc, sequence, length)
//! drops the link: nothing of a bad frame reaches the disk.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tandem_proto::AlignedBuf;
use tandem_proto::peer::frame::{self, CRC_LEN, Decoder, HEADER_LEN};
use tandem_proto::peer::{LinkConfig, LinkHandshake, Message, Progress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link_out::LinkOut;
use super::shared::Shared;
use crate::core::LinkCommand;

/// What the link driver needs to know.
#[derive(Clone)]
pub struct LinkSettings {
    pub listen: SocketAddr,
    pub peer_addr: SocketAddr,
    pub link: LinkConfig,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub connect_retry: Duration,
}

impl LinkSettings {
    /// Whether this node dials (its name sorts before the peer's).
    fn dials(&self) -> bool {
        self.link.node < self.link.peer
    }
}

/// Start the link manager. It follows the core's link commands.
pub async fn start(
    shared: Arc<Shared>,
    settings: LinkSettings,
    commands: mpsc::UnboundedReceiver<LinkCommand>,
    cancel: CancellationToken,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(settings.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for the peer on {}: {e}", settings.listen),
        )
    })?;
    info!(
        "peer link: listening on {}, {} {}",
        settings.listen,
        if settings.dials() {
            "dialing"
        } else {
            "waiting for"
        },
        settings.peer_addr
    );
    Ok(tokio::spawn(manage(
        shared, settings, listener, commands, cancel,
    )))
}

async fn manage(
    shared: Arc<Shared>,
    settings: LinkSettings,
    listener: TcpListener,
    mut commands: mpsc::UnboundedReceiver<LinkCommand>,
    cancel: CancellationToken,
) {
    let mut want = false;
    let mut current: Option<(u64, CancellationToken, JoinHandle<()>)> = None;
    let mut next_id = 0u64;
    // Sessions say here when they end, so the manager wakes up to redial.
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<u64>();
    let mut retry = tokio::time::interval(settings.connect_retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(id) = ended.recv() => {
                if current.as_ref().is_some_and(|(cur, _, _)| *cur == id) {
                    current = None;
                }
            }
            cmd = commands.recv() => match cmd {
                None => break,
                Some(LinkCommand::Connect) => want = true,
                Some(LinkCommand::StandAlone) => {
                    want = false;
                    close(&mut current).await;
                }
                Some(LinkCommand::Drop(reason)) => {
                    debug!("dropping the peer link: {reason}");
                    close(&mut current).await;
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    if !want || current.is_some() || settings.dials() {
                        let why = if !want { "this node is StandAlone" }
                            else if current.is_some() { "a link is already up" }
                            else { "this node dials its peer; it does not accept" };
                        debug!("refusing a peer connection from {from}: {why}");
                        tokio::spawn(refuse(stream, why));
                        continue;
                    }
                    next_id += 1;
                    current = Some(spawn_session(shared.clone(), settings.clone(), stream, next_id, ended_tx.clone()));
                }
                Err(e) => {
                    warn!("peer link accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = retry.tick(), if want && current.is_none() && settings.dials() => {
                match tokio::time::timeout(settings.ping_timeout, TcpStream::connect(settings.peer_addr)).await {
                    Ok(Ok(stream)) => {
                        next_id += 1;
                        current = Some(spawn_session(shared.clone(), settings.clone(), stream, next_id, ended_tx.clone()));
                    }
                    Ok(Err(e)) => debug!("cannot reach the peer at {}: {e}", settings.peer_addr),
                    Err(_) => debug!("connecting to the peer at {} timed out", settings.peer_addr),
                }
            }
        }
    }
    close(&mut current).await;
}

async fn close(current: &mut Option<(u64, CancellationToken, JoinHandle<()>)>) {
    if let Some((_, cancel, handle)) = current.take() {
        cancel.cancel();
        let _ = handle.await;
    }
}

/// Tell a connecting peer why we will not talk, then close.
async fn refuse(mut stream: TcpStream, why: &str) {
    let f = frame::encode(
        &Message::Refuse {
            reason: why.to_string(),
        },
        0,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&f.to_vec())).await;
}

fn spawn_session(
    shared: Arc<Shared>,
    settings: LinkSettings,
    stream: TcpStream,
    id: u64,
    ended: mpsc::UnboundedSender<u64>,
) -> (u64, CancellationToken, JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let handle = tokio::spawn(async move {
        let reason = session(&shared, &settings, stream, id, &c).await;
        shared.link_down(id, &reason);
        let _ = ended.send(id);
    });
    (id, cancel, handle)
}

fn random_challenge() -> [u8; 32] {
    let mut c = [0u8; 32];
    if let Err(e) = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut c))
    {
        warn!("no /dev/urandom ({e}); the link challenge is weaker");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        c[..16].copy_from_slice(&t.to_le_bytes());
    }
    c
}

/// One connection from handshake to end; returns why it ended.
async fn session(
    shared: &Arc<Shared>,
    settings: &LinkSettings,
    stream: TcpStream,
    id: u64,
    cancel: &CancellationToken,
) -> String {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (r, w) = stream.into_split();
    let mut reader = FrameReader {
        r: BufReader::with_capacity(256 * 1024, r),
        decoder: Decoder::new(),
        shared,
    };
    let mut writer = FrameWriter {
        w: BufWriter::with_capacity(256 * 1024, w),
        seq: 0,
        shared: shared.clone(),
    };

    // The link handshake, bounded by ping-timeout.
    let mut hs = LinkHandshake::new(settings.link.clone(), random_challenge());
    let handshake = async {
        loop {
            while let Some(m) = hs.poll_send() {
                writer
                    .send(&m)
                    .await
                    .map_err(|e| format!("sending the handshake: {e}"))?;
            }
            writer
                .flush()
                .await
                .map_err(|e| format!("sending the handshake: {e}"))?;
            let msg = reader.next().await?;
            match hs.handle(msg) {
                Ok(Progress::Continue) => {}
                Ok(Progress::Established { version }) => {
                    while let Some(m) = hs.poll_send() {
                        writer.send(&m).await.map_err(|e| e.to_string())?;
                    }
                    writer.flush().await.map_err(|e| e.to_string())?;
                    return Ok(version);
                }
                Err(refusal) => {
                    while let Some(m) = hs.poll_send() {
                        let _ = writer.send(&m).await;
                    }
                    let _ = writer.flush().await;
                    return Err(refusal.to_string());
                }
            }
        }
    };
    let version = tokio::select! {
        _ = cancel.cancelled() => return "link closed".into(),
        r = tokio::time::timeout(settings.ping_timeout, handshake) => match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                if shared.link_refused(&e) {
                    warn!("peer link with {peer}: {e}");
                } else {
                    debug!("peer link with {peer}: {e}");
                }
                return e;
            }
            Err(_) => {
                let e = "the link handshake timed out".to_string();
                if shared.link_refused(&e) {
                    warn!("peer link with {peer}: {e}");
                }
                return e;
            }
        },
    };
    info!("peer link with {peer} established (protocol version {version})");

    let out = LinkOut::new(writer.w.into_inner(), writer.seq, shared.net.sent.clone());
    shared.link_up(id, out.clone(), version);
    // The writer task only steps in when the socket is full, for the
    // keepalive, and to close in order: every thread that queues a message
    // writes it itself (`link_out`).
    let mut write_task = {
        let out = out.clone();
        let closing = cancel.clone();
        let ping_interval = settings.ping_interval;
        tokio::spawn(async move { out.run(ping_interval, closing).await })
    };
    let timeout = settings.ping_timeout;
    let read_loop = async {
        loop {
            let msg = match tokio::time::timeout(timeout, reader.next()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return e,
                Err(_) => {
                    return format!("no sign of life from the peer for {timeout:?} (ping-timeout)");
                }
            };
            match msg {
                Message::Ping => out.send(Message::PingAck),
                Message::PingAck => {}
                // Nothing more buffered: the Primary waits for this
                // message's answer (a replicated write or FLUSH at queue
                // depth 1). As for an NBD client's request, the storage may
                // then do the I/O on this thread instead of waking its own
                // (`tandem_nbd::inline`; only a hint, durability is the
                // same), and the acknowledgement is written from here too:
                // it leaves without a thread hand-off. With more buffered,
                // the engine's threads take it and this task reads on.
                m if reader.r.buffer().is_empty() => {
                    tandem_nbd::inline::allow(|| shared.peer_message(id, m))
                }
                m => shared.peer_message(id, m),
            }
        }
    };
    let reason = tokio::select! {
        r = &mut write_task => r.unwrap_or_else(|e| format!("the link writer failed: {e}")),
        r = read_loop => {
            write_task.abort();
            let _ = write_task.await;
            r
        }
    };
    info!("peer link with {peer} ended: {reason}");
    reason
}

struct FrameReader<'a, R> {
    r: BufReader<R>,
    decoder: Decoder,
    shared: &'a Shared,
}

impl<R: AsyncRead + Unpin> FrameReader<'_, R> {
    /// The next checked message. Lengths are checked before buffering; block
    /// data goes into an aligned buffer for the storage engine.
    async fn next(&mut self) -> Result<Message, String> {
        let mut raw = [0u8; HEADER_LEN];
        self.r
            .read_exact(&mut raw)
            .await
            .map_err(|e| format!("the peer closed the link ({e})"))?;
        let header = self.decoder.header(&raw).map_err(bad_frame)?;
        let mut fixed = vec![0u8; header.fixed_len()];
        self.r
            .read_exact(&mut fixed)
            .await
            .map_err(|e| format!("the peer closed the link mid-frame ({e})"))?;
        let data = if header.data_len() > 0 {
            let mut buf = AlignedBuf::zeroed(header.data_len());
            self.r
                .read_exact(buf.as_mut_slice())
                .await
                .map_err(|e| format!("the peer closed the link mid-frame ({e})"))?;
            buf.into_bytes()
        } else {
            bytes::Bytes::new()
        };
        let mut crc = [0u8; CRC_LEN];
        self.r
            .read_exact(&mut crc)
            .await
            .map_err(|e| format!("the peer closed the link mid-frame ({e})"))?;
        let n = HEADER_LEN + header.len as usize + CRC_LEN;
        self.shared
            .net
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        self.decoder
            .finish(&raw, &header, &fixed, data, crc)
            .map_err(bad_frame)
    }
}

/// A frame failed its checks: nothing of it is used, the link is dropped.
fn bad_frame(e: frame::FrameError) -> String {
    let reason = format!("bad frame from the peer: {e}");
    warn!("peer link: {reason}; dropping the link (nothing of the frame reaches the disk)");
    reason
}

struct FrameWriter<W: AsyncWrite> {
    w: BufWriter<W>,
    seq: u64,
    shared: Arc<Shared>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        let f = frame::encode(msg, self.seq);
        self.seq += 1;
        self.w.write_all(&f.head).await?;
        self.w.write_all(&f.data).await?;
        self.w.write_all(&f.crc).await?;
        self.shared
            .net
            .sent
            .fetch_add(f.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush().await
    }
}
