//! Test fixtures for the NBD server: an in-memory [`Export`] with hooks to
//! hold requests, count what is in flight and refuse clients, and a small NBD
//! client built on tokio and `tandem_proto`'s client helpers.
//!
//! Synchronisation between a test and the server goes through the export's
//! gates and watch channels, never through sleeps; [`within`] only bounds how
//! long a test may hang before it fails.

#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Semaphore, watch};

use tandem_nbd::{
    BlockSizes, BoundAddr, ErrorCode, Export, ExportInfo, Listen, NbdServer, Refusal, RefusalKind,
    ServerLimits, ZeroFlags,
};
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::{
    Info, OptionReply, decode_greeting, decode_info, encode_info_request, encode_option,
    take_option_reply,
};
use tandem_proto::nbd::transmission::{
    REQUEST_HEADER_LEN, RequestHeader, SIMPLE_REPLY_LEN, SimpleReply,
};

/// How long any single awaited step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(20);

/// Await `f`, failing the test if it takes longer than [`STEP`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------
// The in-memory export.
// ---------------------------------------------------------------------------

pub const EXPORT_NAME: &str = "r0";
pub const DESCRIPTION: &str = "Tandem test resource r0";

/// One call the server made into the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    },
}

type Filter = Box<dyn Fn(&Op) -> bool + Send + Sync>;

/// Ways the export can break its contract, to test the server's defences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    None,
    /// Reads return one byte less than asked (or one byte for length 0).
    ShortReads,
    /// Reads return one byte more than asked.
    LongReads,
    /// Every operation panics.
    Panic,
}

/// Holds the export operations its filter matches until the test releases
/// them. Operations that arrive are counted, so a test can wait for them.
pub struct Gate {
    filter: Filter,
    permits: Semaphore,
    arrived: watch::Sender<usize>,
}

impl Gate {
    /// How many matching operations have reached the gate so far.
    pub fn arrived(&self) -> usize {
        *self.arrived.borrow()
    }

    /// Wait until at least `n` matching operations have reached the gate.
    pub async fn wait_arrived(&self, n: usize) {
        let mut rx = self.arrived.subscribe();
        within(
            &format!("{n} operations at the gate"),
            rx.wait_for(|&c| c >= n),
        )
        .await
        .expect("gate sender lives");
    }

    /// Let `n` held (or future) operations through.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }

    /// Let everything through, now and later.
    pub fn open(&self) {
        self.permits.close();
    }

    async fn pass(&self) {
        self.arrived.send_modify(|c| *c += 1);
        if let Ok(p) = self.permits.acquire().await {
            p.forget();
        }
    }
}

/// Lives as long as a client is attached.
pub struct Attached(Arc<watch::Sender<usize>>);

impl Drop for Attached {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

pub struct MemExport {
    data: Mutex<Vec<u8>>,
    info: ExportInfo,
    refusal: Mutex<Option<String>>,
    gates: Mutex<Vec<Arc<Gate>>>,
    fail: Mutex<Option<ErrorCode>>,
    misbehaviour: Mutex<Misbehaviour>,
    ops: Mutex<Vec<Op>>,
    inflight_bytes: AtomicU64,
    max_inflight_bytes: AtomicU64,
    inflight_ops: AtomicUsize,
    max_inflight_ops: AtomicUsize,
    completed: watch::Sender<u64>,
    reads_done: AtomicU64,
    attached: Arc<watch::Sender<usize>>,
    attaches: AtomicUsize,
}

pub fn default_info(size: u64) -> ExportInfo {
    ExportInfo {
        size,
        read_only: false,
        can_trim: true,
        can_write_zeroes: true,
        can_fast_zero: true,
        can_multi_conn: true,
        block_sizes: BlockSizes::TANDEM,
    }
}

impl MemExport {
    pub fn new(size: u64) -> Arc<Self> {
        Self::with_info(default_info(size))
    }

    pub fn with_info(info: ExportInfo) -> Arc<Self> {
        // A recognisable pattern, so reads of unwritten data are checkable.
        let data = (0..info.size).map(pattern_byte).collect();
        Arc::new(MemExport {
            data: Mutex::new(data),
            info,
            refusal: Mutex::new(None),
            gates: Mutex::new(Vec::new()),
            fail: Mutex::new(None),
            misbehaviour: Mutex::new(Misbehaviour::None),
            ops: Mutex::new(Vec::new()),
            inflight_bytes: AtomicU64::new(0),
            max_inflight_bytes: AtomicU64::new(0),
            inflight_ops: AtomicUsize::new(0),
            max_inflight_ops: AtomicUsize::new(0),
            completed: watch::Sender::new(0),
            reads_done: AtomicU64::new(0),
            attached: Arc::new(watch::Sender::new(0)),
            attaches: AtomicUsize::new(0),
        })
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Hold every operation `filter` matches until the gate releases it. An
    /// opened gate holds nothing any more; the newest matching gate wins.
    pub fn gate(&self, filter: impl Fn(&Op) -> bool + Send + Sync + 'static) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            filter: Box::new(filter),
            permits: Semaphore::new(0),
            arrived: watch::Sender::new(0),
        });
        self.gates.lock().unwrap().push(gate.clone());
        gate
    }

    /// Make `info` and `attach` refuse with `RefusalKind::Policy` (like a
    /// Secondary node), or accept again with `None`.
    pub fn refuse(&self, message: Option<&str>) {
        *self.refusal.lock().unwrap() = message.map(str::to_string);
    }

    /// Make every I/O operation fail with `error` (or succeed with `None`).
    pub fn fail_with(&self, error: Option<ErrorCode>) {
        *self.fail.lock().unwrap() = error;
    }

    pub fn misbehave(&self, m: Misbehaviour) {
        *self.misbehaviour.lock().unwrap() = m;
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    pub fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + len].to_vec()
    }

    pub fn max_inflight_bytes(&self) -> u64 {
        self.max_inflight_bytes.load(Ordering::SeqCst)
    }

    pub fn max_inflight_ops(&self) -> usize {
        self.max_inflight_ops.load(Ordering::SeqCst)
    }

    pub fn inflight_ops(&self) -> usize {
        self.inflight_ops.load(Ordering::SeqCst)
    }

    pub fn reads_done(&self) -> u64 {
        self.reads_done.load(Ordering::SeqCst)
    }

    pub fn completed(&self) -> u64 {
        *self.completed.borrow()
    }

    /// Clients currently attached (in transmission).
    pub fn attached(&self) -> usize {
        *self.attached.borrow()
    }

    /// Successful `attach` calls so far.
    pub fn attaches(&self) -> usize {
        self.attaches.load(Ordering::SeqCst)
    }

    pub async fn wait_attached(&self, n: usize) {
        let mut rx = self.attached.subscribe();
        within(&format!("{n} attached clients"), rx.wait_for(|&c| c == n))
            .await
            .expect("sender lives");
    }

    pub async fn wait_completed(&self, n: u64) {
        let mut rx = self.completed.subscribe();
        within(
            &format!("{n} completed operations"),
            rx.wait_for(|&c| c >= n),
        )
        .await
        .expect("sender lives");
    }

    fn refusal(&self) -> Result<(), Refusal> {
        match &*self.refusal.lock().unwrap() {
            Some(message) => Err(Refusal {
                kind: RefusalKind::Policy,
                message: message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Record `op`, count its bytes in flight, and wait at its gate.
    async fn enter(&self, op: Op, bytes: u64) -> InFlight<'_> {
        self.ops.lock().unwrap().push(op);
        let now = self.inflight_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.max_inflight_bytes.fetch_max(now, Ordering::SeqCst);
        let n = self.inflight_ops.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight_ops.fetch_max(n, Ordering::SeqCst);
        let guard = InFlight {
            export: self,
            bytes,
        };
        // The newest gate that matches and has not been opened.
        let gate = self
            .gates
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|g| !g.permits.is_closed() && (g.filter)(&op))
            .cloned();
        if let Some(gate) = gate {
            gate.pass().await;
        }
        guard
    }

    fn check_fail(&self) -> Result<(), ErrorCode> {
        if *self.misbehaviour.lock().unwrap() == Misbehaviour::Panic {
            // Unwinds like a panic, without the panic hook's noise.
            std::panic::resume_unwind(Box::new("MemExport told to panic"));
        }
        match *self.fail.lock().unwrap() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fill(&self, offset: u64, length: u32, value: Option<&[u8]>) {
        let mut data = self.data.lock().unwrap();
        let range = offset as usize..offset as usize + length as usize;
        match value {
            Some(v) => data[range].copy_from_slice(v),
            None => data[range].fill(0),
        }
    }
}

struct InFlight<'a> {
    export: &'a MemExport,
    bytes: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let e = self.export;
        e.inflight_bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        e.inflight_ops.fetch_sub(1, Ordering::SeqCst);
        e.completed.send_modify(|c| *c += 1);
    }
}

/// The byte at `offset` of a fresh export.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 9)) as u8
}

impl Export for MemExport {
    type Attachment = Attached;

    fn name(&self) -> &str {
        EXPORT_NAME
    }

    fn description(&self) -> String {
        DESCRIPTION.to_string()
    }

    fn info(&self) -> Result<ExportInfo, Refusal> {
        self.refusal()?;
        Ok(self.info)
    }

    fn attach(&self) -> Result<(ExportInfo, Attached), Refusal> {
        self.refusal()?;
        self.attaches.fetch_add(1, Ordering::SeqCst);
        self.attached.send_modify(|n| *n += 1);
        Ok((self.info, Attached(self.attached.clone())))
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, ErrorCode> {
        let op = Op::Read { offset, length };
        let _g = self.enter(op, length.into()).await;
        self.check_fail()?;
        assert!(offset + u64::from(length) <= self.info.size, "{op:?}");
        let mut out = {
            let data = self.data.lock().unwrap();
            data[offset as usize..][..length as usize].to_vec()
        };
        match *self.misbehaviour.lock().unwrap() {
            Misbehaviour::ShortReads if out.is_empty() => out.push(0),
            Misbehaviour::ShortReads => {
                out.pop();
            }
            Misbehaviour::LongReads => out.push(0xee),
            _ => {}
        }
        self.reads_done.fetch_add(1, Ordering::SeqCst);
        Ok(Bytes::from(out))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ErrorCode> {
        let length = data.len() as u32;
        let op = Op::Write {
            offset,
            length,
            fua,
        };
        let _g = self.enter(op, length.into()).await;
        self.check_fail()?;
        assert!(offset + u64::from(length) <= self.info.size, "{op:?}");
        self.fill(offset, length, Some(&data));
        Ok(())
    }

    async fn flush(&self) -> Result<(), ErrorCode> {
        let _g = self.enter(Op::Flush, 0).await;
        self.check_fail()
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), ErrorCode> {
        let op = Op::Trim {
            offset,
            length,
            fua,
        };
        let _g = self.enter(op, 0).await;
        self.check_fail()?;
        assert!(offset + u64::from(length) <= self.info.size, "{op:?}");
        self.fill(offset, length, None);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    ) -> Result<(), ErrorCode> {
        let op = Op::WriteZeroes {
            offset,
            length,
            flags,
        };
        let _g = self.enter(op, 0).await;
        self.check_fail()?;
        assert!(offset + u64::from(length) <= self.info.size, "{op:?}");
        self.fill(offset, length, None);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// A server on real sockets.
// ---------------------------------------------------------------------------

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tandem-nbd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestServer {
    pub server: NbdServer,
    pub export: Arc<MemExport>,
    pub tcp: BoundAddr,
    pub unix: BoundAddr,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start(export: Arc<MemExport>, limits: ServerLimits) -> TestServer {
        let dir = TempDir::new();
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::start(
            export.clone(),
            &[
                Listen::Tcp("127.0.0.1:0".parse().unwrap()),
                Listen::Unix(sock.clone()),
            ],
            limits,
        )
        .await
        .expect("server starts");
        let bound = server.bound().to_vec();
        assert_eq!(bound.len(), 2);
        assert!(matches!(&bound[0], BoundAddr::Tcp(a) if a.port() != 0));
        assert_eq!(bound[1], BoundAddr::Unix(sock));
        TestServer {
            server,
            export,
            tcp: bound[0].clone(),
            unix: bound[1].clone(),
            dir,
        }
    }

    /// A server over a fresh 4 MiB export with default limits.
    pub async fn default() -> TestServer {
        Self::start(MemExport::new(4 << 20), ServerLimits::default()).await
    }

    /// Both addresses, for tests that run over each transport.
    pub fn addrs(&self) -> [BoundAddr; 2] {
        [self.tcp.clone(), self.unix.clone()]
    }

    pub fn unix_path(&self) -> PathBuf {
        match &self.unix {
            BoundAddr::Unix(p) => p.clone(),
            BoundAddr::Tcp(_) => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

pub type BoxStream = Box<dyn Stream>;

/// A raw connection to `addr`.
pub async fn connect(addr: &BoundAddr) -> BoxStream {
    within("connect", async {
        match addr {
            BoundAddr::Tcp(a) => {
                let s = TcpStream::connect(a).await.expect("tcp connect");
                s.set_nodelay(true).unwrap();
                Box::new(s) as BoxStream
            }
            BoundAddr::Unix(p) => Box::new(UnixStream::connect(p).await.expect("unix connect")),
        }
    })
    .await
}

/// Read until the peer closes; returns what arrived before. Fails if the
/// peer neither closes nor errors within [`STEP`].
pub async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    within("the server to close the connection", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

/// The client during option negotiation.
pub struct Handshake {
    pub s: BoxStream,
    buf: BytesMut,
    pub server_flags: u16,
}

pub const CLIENT_FLAGS: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

impl Handshake {
    /// Connect, read the greeting, and send `client_flags`.
    pub async fn start_with(addr: &BoundAddr, client_flags: u32) -> Handshake {
        let mut s = connect(addr).await;
        let mut greeting = [0u8; 18];
        within("greeting", s.read_exact(&mut greeting))
            .await
            .expect("greeting");
        let server_flags = decode_greeting(&greeting).expect("valid greeting");
        assert_eq!(server_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        Handshake {
            s,
            buf: BytesMut::new(),
            server_flags,
        }
    }

    pub async fn start(addr: &BoundAddr) -> Handshake {
        Self::start_with(addr, CLIENT_FLAGS).await
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        self.s
            .write_all(&encode_option(option, data))
            .await
            .expect("send option");
    }

    /// The next option reply.
    pub async fn reply(&mut self) -> OptionReply {
        within("an option reply", async {
            loop {
                if let Some(r) = take_option_reply(&mut self.buf).expect("reply magic") {
                    return r;
                }
                let n = self.s.read_buf(&mut self.buf).await.expect("read reply");
                assert!(n > 0, "server closed during negotiation");
            }
        })
        .await
    }

    /// Send `NBD_OPT_INFO`/`NBD_OPT_GO` and collect the infos up to the ACK,
    /// or return the error reply.
    pub async fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        requests: &[u16],
    ) -> Result<Vec<Info>, OptionReply> {
        self.send_option(option, &encode_info_request(name, requests))
            .await;
        let mut infos = Vec::new();
        loop {
            let r = self.reply().await;
            assert_eq!(r.option, option);
            match r.reply_type {
                REP_INFO => infos.push(decode_info(&r.body).expect("valid info")),
                REP_ACK => {
                    assert!(r.body.is_empty());
                    return Ok(infos);
                }
                _ => return Err(r),
            }
        }
    }

    /// `NBD_OPT_GO`; on success the client is in transmission.
    pub async fn go(
        mut self,
        name: &str,
        requests: &[u16],
    ) -> Result<(Client, Vec<Info>), OptionReply> {
        let infos = self.info_or_go(OPT_GO, name, requests).await?;
        let (size, flags) = infos
            .iter()
            .find_map(|i| match i {
                Info::Export { size, flags } => Some((*size, *flags)),
                _ => None,
            })
            .expect("GO sends NBD_INFO_EXPORT");
        Ok((self.into_client(size, flags), infos))
    }

    /// `NBD_OPT_EXPORT_NAME`, with the client flags given at start. Returns
    /// the raw bytes the server answered (size, flags, maybe zeroes).
    pub async fn export_name(mut self, name: &str, zeroes: bool) -> (Client, Vec<u8>) {
        self.send_option(OPT_EXPORT_NAME, name.as_bytes()).await;
        let want = if zeroes { 8 + 2 + 124 } else { 8 + 2 };
        let mut raw = vec![0u8; want];
        let have = self.buf.len().min(want);
        raw[..have].copy_from_slice(&self.buf.split_to(have));
        within("EXPORT_NAME answer", self.s.read_exact(&mut raw[have..]))
            .await
            .expect("EXPORT_NAME answer");
        let size = u64::from_be_bytes(raw[0..8].try_into().unwrap());
        let flags = u16::from_be_bytes(raw[8..10].try_into().unwrap());
        (self.into_client(size, flags), raw)
    }

    /// Bytes already read from the server and not yet consumed.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        self.buf.split().to_vec()
    }

    fn into_client(self, size: u64, flags: u16) -> Client {
        assert!(
            self.buf.is_empty(),
            "server sent bytes after the end of negotiation"
        );
        Client::new(self.s, size, flags)
    }
}

/// Connect and `GO` on the real export name; returns a client in
/// transmission.
pub async fn client(addr: &BoundAddr) -> Client {
    let hs = Handshake::start(addr).await;
    hs.go(EXPORT_NAME, &[]).await.expect("GO accepted").0
}

/// One reply as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    pub error: Option<ErrorCode>,
    /// The data of a successful read.
    pub data: Option<Bytes>,
}

impl Reply {
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.error, None, "request {} failed", self.cookie);
        self
    }
}

/// Cookies sent and not yet answered, with the data length a read expects.
type Pending = Arc<Mutex<HashMap<u64, Option<u32>>>>;

pub struct ClientTx {
    w: WriteHalf<BoxStream>,
    next_cookie: u64,
    pending: Pending,
}

pub struct ClientRx {
    r: BufReader<ReadHalf<BoxStream>>,
    pending: Pending,
}

/// A client in transmission. `tx` and `rx` can be moved to different tasks.
pub struct Client {
    pub tx: ClientTx,
    pub rx: ClientRx,
    pub size: u64,
    pub flags: u16,
}

impl Client {
    pub fn new(s: BoxStream, size: u64, flags: u16) -> Client {
        let (r, w) = tokio::io::split(s);
        let pending = Pending::default();
        Client {
            tx: ClientTx {
                w,
                next_cookie: 1,
                pending: pending.clone(),
            },
            rx: ClientRx {
                r: BufReader::new(r),
                pending,
            },
            size,
            flags,
        }
    }

    /// Write `data` at `offset` and wait for the (successful) reply.
    pub async fn write(&mut self, offset: u64, data: &[u8]) {
        let c = self.tx.write(offset, data, 0).await;
        let r = self.rx.reply().await;
        assert_eq!(r.cookie, c);
        r.ok();
    }

    /// Read and wait for the (successful) data.
    pub async fn read(&mut self, offset: u64, length: u32) -> Bytes {
        let c = self.tx.read(offset, length).await;
        let r = self.rx.reply().await;
        assert_eq!(r.cookie, c);
        r.ok();
        r.data.unwrap()
    }

    /// Send one command and wait for its reply.
    pub async fn call(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> Reply {
        let c = self.tx.command(command, flags, offset, length).await;
        let r = self.rx.reply().await;
        assert_eq!(r.cookie, c);
        r
    }

    /// `NBD_CMD_DISC`, then check the server closes without sending more.
    pub async fn disconnect(mut self) {
        self.tx.disc().await;
        let rest = self.rx.read_to_close().await;
        assert!(
            rest.is_empty(),
            "server sent {} bytes after DISC",
            rest.len()
        );
        assert!(self.rx.pending.lock().unwrap().is_empty());
    }
}

impl ClientTx {
    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        // Spread cookies over all 64 bits.
        self.next_cookie += 1;
        c.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// Send a request with the given header fields and, for a write, the
    /// payload. Returns the cookie.
    pub async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.cookie();
        let expect = (command == CMD_READ).then_some(length);
        if command != CMD_DISC {
            let old = self.pending.lock().unwrap().insert(cookie, expect);
            assert!(old.is_none());
        }
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut msg = Vec::with_capacity(REQUEST_HEADER_LEN + payload.len());
        msg.extend_from_slice(&h.encode());
        msg.extend_from_slice(payload);
        self.w.write_all(&msg).await.expect("send request");
        cookie
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> u64 {
        self.send(CMD_READ, 0, offset, length, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u64 {
        self.send(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await
    }

    pub async fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u64 {
        self.send(command, flags, offset, length, &[]).await
    }

    pub async fn disc(&mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]).await;
    }

    pub async fn raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("send raw bytes");
    }

    /// Half-close: the server sees end of input.
    pub async fn shutdown(&mut self) {
        let _ = self.w.shutdown().await;
    }
}

impl ClientRx {
    /// The next reply. Panics on a wrong magic or a cookie that was never
    /// sent or was already answered.
    pub async fn reply(&mut self) -> Reply {
        within("a reply", self.try_reply())
            .await
            .expect("connection open")
    }

    /// The next reply, or `None` if the connection ended first.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut raw = [0u8; SIMPLE_REPLY_LEN];
        self.r.read_exact(&mut raw).await.ok()?;
        let h = SimpleReply::decode(&raw).expect("simple reply magic");
        let expect = self
            .pending
            .lock()
            .unwrap()
            .remove(&h.cookie)
            .unwrap_or_else(|| panic!("reply for unknown cookie {:#x}", h.cookie));
        let data = match (h.error, expect) {
            (None, Some(len)) => {
                let mut data = vec![0u8; len as usize];
                self.r.read_exact(&mut data).await.ok()?;
                Some(Bytes::from(data))
            }
            _ => None,
        };
        Some(Reply {
            cookie: h.cookie,
            error: h.error,
            data,
        })
    }

    /// Read until the server closes; returns stray bytes.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        read_to_close(&mut self.r).await
    }

    /// Requests sent and not answered yet.
    pub fn pending(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

/// The transmission flags every Tandem export advertises with the default
/// test export.
pub const EXPECTED_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN
    | TFLAG_SEND_CACHE
    | TFLAG_SEND_FAST_ZERO;

/// Deterministic data for a write: depends on `seed` and position.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small deterministic PRNG (xorshift64*), so randomised tests repeat.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Connect as a fresh client and check the server serves it normally: a
/// verified write and read-back at a spot chosen by `seed`, then DISC.
pub async fn check_serving(addr: &BoundAddr, seed: u64) {
    let mut c = client(addr).await;
    // Export sizes in these tests are at least 1 MiB.
    let offset = (seed % 256) * 4096;
    let d = data(seed, 4096);
    c.write(offset, &d).await;
    assert_eq!(&c.read(offset, 4096).await[..], &d[..]);
    c.disconnect().await;
}
