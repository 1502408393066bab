//! The sending side of an established peer link, shared by every thread
//! that sends on it.
//!
//! The core's messages are queued here under the core lock (so they keep
//! the core's order). Who writes them to the socket is the caller's choice
//! ([`push`](LinkOut::push) or [`kick`](LinkOut::kick); the policy is in
//! `Shared::execute_all`): for a request someone waits for alone (queue
//! depth 1), the thread that queued it writes right after it lets go of the
//! core lock, with a non-blocking `writev`, so a replicated write, a
//! FLUSH's peer half or a Secondary's acknowledgement leaves without waking
//! another thread first (each wake-up costs tens of microseconds on a
//! virtual machine; see docs/benchmarks.md); for runs of messages the
//! link's writer task writes them together. The writer task also takes
//! over when the socket is full (it waits until it is writable and carries
//! on), sends a `Ping` when nothing was queued for `ping-interval`, and on
//! an orderly close writes what is still queued (for at most a second)
//! before shutting the write side down.
//!
//! Invariants:
//! - frames reach the socket in the order their messages were queued, each
//!   exactly once, with consecutive sequence numbers: at most one thread
//!   writes at a time (`OutState::writing`), and it encodes queued messages
//!   in order, numbering them as it goes;
//! - a thread that finds another one writing only queues: the writer loops
//!   until the queue is empty, so nothing queued is left behind;
//! - after a write error nothing more is written, the writer task is told,
//!   and it ends the link with the error; messages queued after the link
//!   closed are dropped, as the core expects of a link that went away.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tandem_proto::peer::Message;
use tandem_proto::peer::frame;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most slices handed to one `writev`.
const MAX_SLICES: usize = 64;

pub struct LinkOut {
    state: Mutex<OutState>,
    /// Owned by the thread that set `OutState::writing`.
    writer: Mutex<Writer>,
    socket: OwnedWriteHalf,
    /// Tells the writer task that the socket is full or failed.
    wake: Notify,
    /// Bytes of frames encoded for the wire (the status counter).
    sent: Arc<AtomicU64>,
}

#[derive(Default)]
struct OutState {
    /// Queued, not yet encoded.
    pending: VecDeque<Message>,
    /// A thread is encoding and writing.
    writing: bool,
    /// The socket was full; the writer task waits until it is writable.
    blocked: bool,
    /// Writing failed: nothing more is written or queued.
    failed: Option<String>,
    /// The link is closing or closed: nothing more is queued.
    closed: bool,
    /// When a message was last queued (for the keepalive `Ping`).
    last_queued: Option<Instant>,
    /// How often the socket was found full (logged at the end).
    fulls: u64,
}

struct Writer {
    seq: u64,
    /// Encoded frames not yet (wholly) written; `front_written` bytes of
    /// the first are on the wire.
    chunks: VecDeque<Bytes>,
    front_written: usize,
}

enum Wrote {
    All,
    Full,
    Failed(io::Error),
}

impl LinkOut {
    /// The sending side over `socket`, whose next frame is number `seq`
    /// (the handshake used those before it); frame bytes are counted in
    /// `sent`.
    pub fn new(socket: OwnedWriteHalf, seq: u64, sent: Arc<AtomicU64>) -> Arc<LinkOut> {
        Arc::new(LinkOut {
            state: Mutex::new(OutState {
                last_queued: Some(Instant::now()),
                ..OutState::default()
            }),
            writer: Mutex::new(Writer {
                seq,
                chunks: VecDeque::new(),
                front_written: 0,
            }),
            socket,
            wake: Notify::new(),
            sent,
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        // Only short sections without panics hold it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `msg` behind everything queued before. Call [`push`](Self::push)
    /// afterwards (the core does, once its lock is released).
    pub fn queue(&self, msg: Message) {
        let mut st = self.lock();
        if st.closed || st.failed.is_some() {
            return;
        }
        st.pending.push_back(msg);
        st.last_queued = Some(Instant::now());
    }

    /// Have the writer task write what is queued.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Queue `msg` and write it now.
    pub fn send(&self, msg: Message) {
        self.queue(msg);
        self.push();
    }

    /// Write what is queued, on this thread, without blocking: unless
    /// another thread is writing (it picks this up), or the socket is full
    /// (the writer task carries on when it drains).
    pub fn push(&self) {
        let mut st = self.lock();
        if st.writing || st.blocked || st.failed.is_some() {
            return;
        }
        st.writing = true;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let batch: Vec<Message> = st.pending.drain(..).collect();
            if batch.is_empty() && w.chunks.is_empty() {
                st.writing = false;
                return;
            }
            drop(st);
            for msg in &batch {
                self.encode(&mut w, msg);
            }
            let wrote = self.write_some(&mut w);
            st = self.lock();
            match wrote {
                Wrote::All => {}
                Wrote::Full => {
                    st.writing = false;
                    st.blocked = true;
                    st.fulls += 1;
                    drop((st, w));
                    self.wake.notify_one();
                    return;
                }
                Wrote::Failed(e) => {
                    st.writing = false;
                    st.failed = Some(e.to_string());
                    st.pending.clear();
                    drop((st, w));
                    self.wake.notify_one();
                    return;
                }
            }
        }
    }

    fn encode(&self, w: &mut Writer, msg: &Message) {
        let f = frame::encode(msg, w.seq);
        w.seq += 1;
        self.sent.fetch_add(f.len() as u64, Ordering::Relaxed);
        if f.data.is_empty() {
            let mut head = f.head;
            head.extend_from_slice(&f.crc);
            w.chunks.push_back(Bytes::from(head));
        } else {
            w.chunks.push_back(Bytes::from(f.head));
            w.chunks.push_back(f.data);
            w.chunks.push_back(Bytes::copy_from_slice(&f.crc));
        }
    }

    /// `writev` until every chunk is written, the socket is full, or it fails.
    fn write_some(&self, w: &mut Writer) -> Wrote {
        while !w.chunks.is_empty() {
            let n = {
                let mut slices = Vec::with_capacity(w.chunks.len().min(MAX_SLICES));
                for (i, chunk) in w.chunks.iter().take(MAX_SLICES).enumerate() {
                    let skip = if i == 0 { w.front_written } else { 0 };
                    slices.push(IoSlice::new(&chunk[skip..]));
                }
                match self.socket.try_write_vectored(&slices) {
                    Ok(0) => return Wrote::Failed(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Wrote::Full,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Wrote::Failed(e),
                }
            };
            let mut left = n;
            while left > 0 {
                let front = w.chunks.front().expect("written bytes come from chunks");
                let rest = front.len() - w.front_written;
                if left >= rest {
                    left -= rest;
                    w.chunks.pop_front();
                    w.front_written = 0;
                } else {
                    w.front_written += left;
                    left = 0;
                }
            }
        }
        Wrote::All
    }

    /// Whether everything queued is on the wire.
    fn drained(&self) -> bool {
        let st = self.lock();
        st.pending.is_empty()
            && !st.writing
            && self
                .writer
                .try_lock()
                .map(|w| w.chunks.is_empty())
                .unwrap_or(false)
    }

    /// Wait until the socket drains, then write on.
    async fn unblock(&self) -> io::Result<()> {
        self.socket.writable().await?;
        self.lock().blocked = false;
        self.push();
        Ok(())
    }

    /// The writer task of the link: carries on writing when the socket was
    /// full, sends a `Ping` after `ping_interval` without anything queued,
    /// and on `closing` writes what is queued (for at most a second) and
    /// shuts the write side down. Returns why the link ended.
    pub async fn run(&self, ping_interval: Duration, closing: CancellationToken) -> String {
        loop {
            if let Some(e) = self.lock().failed.clone() {
                return format!("sending to the peer failed: {e}");
            }
            let ping_at = self.lock().last_queued.unwrap_or_else(Instant::now) + ping_interval;
            tokio::select! {
                _ = closing.cancelled() => {
                    self.close().await;
                    return "link closed".to_string();
                }
                _ = self.wake.notified() => {
                    let blocked = self.lock().blocked;
                    if !blocked {
                        self.push();
                    } else if let Err(e) = self.unblock().await {
                        return format!("sending to the peer failed: {e}");
                    }
                }
                _ = tokio::time::sleep_until(ping_at) => {
                    let idle = self.lock().last_queued.is_none_or(|t| t + ping_interval <= Instant::now());
                    if idle {
                        self.send(Message::Ping);
                    }
                }
            }
        }
    }

    /// An orderly close: what the core queued before (a final state, a
    /// Disconnect with the reason) still reaches the peer before the FIN.
    async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.push();
            while !self.drained() && self.lock().failed.is_none() {
                if self.lock().blocked {
                    if self.unblock().await.is_err() {
                        break;
                    }
                } else {
                    // Another thread is writing: give it a moment.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
        .await;
        let fulls = {
            let mut st = self.lock();
            st.closed = true;
            st.fulls
        };
        tracing::debug!("peer link closing; its socket was full {fulls} times");
        let _ = rustix::net::shutdown(self.socket.as_ref().as_fd(), rustix::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use tandem_proto::peer::frame::{CRC_LEN, Decoder, HEADER_LEN};

    use super::*;

    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 500;

    /// Read frames until EOF; the decoder refuses any frame out of
    /// sequence or with a bad crc.
    fn read_frames(mut socket: std::net::TcpStream) -> Result<Vec<Message>, String> {
        let mut decoder = Decoder::new();
        let mut out = Vec::new();
        loop {
            let mut raw = [0u8; HEADER_LEN];
            match socket.read_exact(&mut raw) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(out),
                Err(e) => return Err(e.to_string()),
            }
            let header = decoder.header(&raw).map_err(|e| e.to_string())?;
            let mut fixed = vec![0u8; header.fixed_len()];
            socket.read_exact(&mut fixed).map_err(|e| e.to_string())?;
            let mut data = vec![0u8; header.data_len()];
            socket.read_exact(&mut data).map_err(|e| e.to_string())?;
            let mut crc = [0u8; CRC_LEN];
            socket.read_exact(&mut crc).map_err(|e| e.to_string())?;
            let msg = decoder
                .finish(&raw, &header, &fixed, Bytes::from(data), crc)
                .map_err(|e| e.to_string())?;
            out.push(msg);
        }
    }

    fn data(thread: u64, i: u64) -> Message {
        Message::Data {
            id: thread << 32 | i,
            offset: i * 4096,
            flags: 0,
            data: Bytes::from(vec![(thread * 31 + i) as u8; 4096]),
        }
    }

    /// Several threads queue and write at once, through a socket that
    /// fills up (a tiny send buffer, a reader that starts late): every
    /// frame arrives once, numbered in sequence, each thread's in its order,
    /// and an orderly close delivers what was queued before it.
    #[test]
    fn concurrent_senders_keep_order_through_a_full_socket() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = runtime
            .block_on(tokio::net::TcpStream::connect(addr))
            .unwrap();
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&stream, 64 * 1024);
        let (accepted, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            // Start late, so the senders find the socket full.
            std::thread::sleep(Duration::from_millis(200));
            read_frames(accepted)
        });
        let (_read_half, write_half) = stream.into_split();
        let sent = Arc::new(AtomicU64::new(0));
        let out = LinkOut::new(write_half, 0, sent.clone());
        let closing = CancellationToken::new();
        let writer = {
            let out = out.clone();
            let closing = closing.clone();
            runtime.spawn(async move { out.run(Duration::from_secs(60), closing).await })
        };
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let out = out.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        out.queue(data(t, i));
                        // Both ways of getting it written: this thread, or
                        // the writer task.
                        if i % 3 == 0 { out.kick() } else { out.push() }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        assert!(out.lock().fulls > 0, "the socket never filled up");
        closing.cancel();
        let why = runtime.block_on(writer).unwrap();
        assert_eq!(why, "link closed");
        let frames = reader
            .join()
            .unwrap()
            .expect("every frame is well formed and in sequence");
        assert_eq!(frames.len() as u64, THREADS * PER_THREAD);
        let mut next = vec![0u64; THREADS as usize];
        for m in &frames {
            let Message::Data { id, data: d, .. } = m else {
                panic!("unexpected message {m:?}");
            };
            let (t, i) = (id >> 32, id & 0xffff_ffff);
            assert_eq!(i, next[t as usize], "thread {t}'s messages in order");
            next[t as usize] += 1;
            assert!(d.iter().all(|&b| b == (t * 31 + i) as u8), "payload intact");
        }
        let expected: u64 = frames
            .iter()
            .map(|m| frame::encode(m, 0).len() as u64)
            .sum();
        assert_eq!(sent.load(Ordering::Relaxed), expected);
    }

    /// A peer that is gone: the write error ends the writer task with the
    /// reason, and later messages are dropped rather than queued forever.
    #[test]
    fn a_write_error_ends_the_link() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = runtime
            .block_on(tokio::net::TcpStream::connect(addr))
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // Writes to a closed socket are answered with RST; the next fails.
        drop(accepted);
        let (_read_half, write_half) = stream.into_split();
        let out = LinkOut::new(write_half, 0, Arc::new(AtomicU64::new(0)));
        let closing = CancellationToken::new();
        let writer = {
            let out = out.clone();
            runtime.spawn(async move { out.run(Duration::from_secs(60), closing).await })
        };
        let why = runtime.block_on(async {
            let mut writer = writer;
            for i in 0..10_000 {
                out.send(data(0, i));
                if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), &mut writer).await {
                    return r.unwrap();
                }
            }
            panic!("writing to a closed peer never failed");
        });
        assert!(why.starts_with("sending to the peer failed"), "{why}");
        out.queue(data(0, 0));
        assert!(
            out.lock().pending.is_empty(),
            "nothing queued after a failure"
        );
    }
}
