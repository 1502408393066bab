//! Peer-link messages and their bodies.
//!
//! Each message has a stable type code. Most bodies are fully decoded into
//! the enum; the two that carry block data (`Data`, `ResyncData`) have a
//! fixed-size part followed by the data, so a driver can read the data
//! straight into an aligned buffer (see `frame`). Every decoder consumes
//! its body exactly; trailing bytes are an error.

use bytes::Bytes;

use crate::reader::{Reader, Short};

/// A run of set bits in a dirty bitmap: blocks `start .. start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub count: u32,
}

/// A node's state as its peer needs it: role, disk, generations, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerState {
    /// 0 = Secondary, 1 = Primary.
    pub role: u8,
    /// The sender's disk state code (the replicator defines the codes).
    pub disk: u8,
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    /// `STATE_FLAG_*`.
    pub flags: u32,
    /// Blocks the sender has marked out of sync.
    pub dirty_blocks: u64,
}

/// The sender asks to discard its data (`connect --discard-my-data`).
pub const STATE_FLAG_DISCARD_MY_DATA: u32 = 1;
/// The sender stopped as Primary without demoting.
pub const STATE_FLAG_CRASHED_PRIMARY: u32 = 2;
/// The sender's disk is Inconsistent.
pub const STATE_FLAG_INCONSISTENT: u32 = 4;
/// The sender's operator confirmed the peer (us) was fenced.
pub const STATE_FLAG_FENCED_PEER: u32 = 8;

/// `Data` flag: the write must be durable before it is acknowledged.
pub const DATA_FLAG_FUA: u32 = 1;
/// `Zero` flags.
pub const ZERO_FLAG_NO_HOLE: u32 = 1;
pub const ZERO_FLAG_FAST: u32 = 2;
pub const ZERO_FLAG_FUA: u32 = 4;

/// The first handshake message of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    pub resource: String,
    /// The sender's node name.
    pub node: String,
    /// The node name the sender expects to be talking to.
    pub peer: String,
    /// The sender's usable data size in bytes.
    pub size: u64,
    /// Replication protocol: b'C'.
    pub protocol: u8,
    /// Whether the sender has a shared secret configured.
    pub auth: bool,
    /// The sender's challenge for the other side's HMAC response.
    pub challenge: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // --- link handshake and keepalive
    Hello(Hello),
    AuthResponse {
        mac: [u8; 32],
    },
    Ready,
    Refuse {
        reason: String,
    },
    Ping,
    PingAck,
    /// The sender closes the link on purpose (`repctl disconnect`, `down`).
    Disconnect {
        reason: String,
    },
    // --- state and generations
    State(PeerState),
    /// Part of the sender's dirty bitmap.
    Bitmap {
        extents: Vec<Extent>,
    },
    BitmapDone,
    /// The sync source's new bitmap generation; the target takes it as its
    /// current generation.
    SyncUuid {
        uuid: u64,
    },
    /// `new-current-uuid --clear-bitmap`: both take `uuid` as current.
    NewCurrentUuid {
        uuid: u64,
    },
    /// The sender wants to become Primary; the peer must grant it (two
    /// Primaries while connected are never allowed).
    PromoteRequest {
        id: u64,
    },
    PromoteReply {
        id: u64,
        granted: bool,
        reason: String,
    },
    // --- replication
    Data {
        id: u64,
        offset: u64,
        flags: u32,
        data: Bytes,
    },
    Trim {
        id: u64,
        offset: u64,
        len: u32,
    },
    Zero {
        id: u64,
        offset: u64,
        len: u32,
        flags: u32,
    },
    WriteAck {
        id: u64,
    },
    NegAck {
        id: u64,
        errno: i32,
    },
    Flush {
        id: u64,
    },
    FlushAck {
        id: u64,
        ok: bool,
    },
    // --- resync
    ResyncData {
        offset: u64,
        data: Bytes,
    },
    /// A resync range that reads as zeros on the source.
    ResyncZero {
        offset: u64,
        len: u32,
    },
    ResyncAck {
        offset: u64,
        len: u32,
        ok: bool,
    },
    /// The source has sent every out-of-sync block.
    ResyncDone,
    // --- checksums: checksum-based resync and online verify (appended)
    /// The sender's activity-log extents (4 MiB each) from a crash while
    /// Primary, sent during the bitmap exchange: the resync compares these
    /// regions by checksum before it sends data.
    CsumExtents {
        extents: Vec<u32>,
    },
    /// Sync source: the checksums (`alg`, one per 4 KiB block) of
    /// `offset .. offset + len`; the target compares its own blocks.
    CsumRequest {
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    },
    /// Sync target: which blocks of a `CsumRequest` differ (bit `i` of the
    /// bitmask = block `i`, LSB first); the others are identical and the
    /// target will clear them.
    CsumReply {
        offset: u64,
        len: u32,
        differ: Bytes,
    },
    /// `repctl verify` started on the sender (VerifySource) over
    /// `total_bytes`.
    VerifyStart {
        total_bytes: u64,
    },
    /// Verify source: the checksums of `offset .. offset + len`.
    VerifyRequest {
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    },
    /// Verify target: which blocks differ (bitmask as in `CsumReply`).
    VerifyReply {
        offset: u64,
        len: u32,
        differ: Bytes,
    },
    /// Verify source: every block was compared (`complete`), or the verify
    /// stopped early.
    VerifyDone {
        complete: bool,
    },
    /// Verify target that is Primary (protocol 2): some blocks of a request
    /// differed; here are its checksums of `offset .. offset + len`, read
    /// while it holds the range against client writes. The source reads
    /// again and answers with `VerifyRecheckReply`.
    VerifyRecheck {
        offset: u64,
        len: u32,
        alg: u8,
        sums: Bytes,
    },
    /// Verify source (protocol 2): which blocks differ on the second read
    /// (bitmask as in `CsumReply`).
    VerifyRecheckReply {
        offset: u64,
        len: u32,
        differ: Bytes,
    },
}

/// Checksum algorithm codes in `CsumRequest` / `VerifyRequest`.
pub const CSUM_ALG_CRC32: u8 = 1;
pub const CSUM_ALG_SHA256: u8 = 2;
/// Most bytes of checksums (or bitmask) in one request or reply: 8192
/// blocks of SHA-256.
pub const MAX_SUMS: usize = 8192 * 32;
/// Most extents in one `CsumExtents` message.
pub const MAX_CSUM_EXTENTS: usize = 64 * 1024;

/// Type codes (stable across versions).
pub mod code {
    pub const HELLO: u16 = 1;
    pub const AUTH_RESPONSE: u16 = 2;
    pub const READY: u16 = 3;
    pub const REFUSE: u16 = 4;
    pub const PING: u16 = 5;
    pub const PING_ACK: u16 = 6;
    pub const DISCONNECT: u16 = 7;
    pub const STATE: u16 = 16;
    pub const BITMAP: u16 = 17;
    pub const BITMAP_DONE: u16 = 18;
    pub const SYNC_UUID: u16 = 19;
    pub const NEW_CURRENT_UUID: u16 = 20;
    pub const PROMOTE_REQUEST: u16 = 21;
    pub const PROMOTE_REPLY: u16 = 22;
    pub const DATA: u16 = 32;
    pub const TRIM: u16 = 33;
    pub const ZERO: u16 = 34;
    pub const WRITE_ACK: u16 = 35;
    pub const NEG_ACK: u16 = 36;
    pub const FLUSH: u16 = 37;
    pub const FLUSH_ACK: u16 = 38;
    pub const RESYNC_DATA: u16 = 48;
    pub const RESYNC_ZERO: u16 = 49;
    pub const RESYNC_ACK: u16 = 50;
    pub const RESYNC_DONE: u16 = 51;
    pub const CSUM_EXTENTS: u16 = 64;
    pub const CSUM_REQUEST: u16 = 65;
    pub const CSUM_REPLY: u16 = 66;
    pub const VERIFY_START: u16 = 67;
    pub const VERIFY_REQUEST: u16 = 68;
    pub const VERIFY_REPLY: u16 = 69;
    pub const VERIFY_DONE: u16 = 70;
    /// Protocol 2.
    pub const VERIFY_RECHECK: u16 = 71;
    pub const VERIFY_RECHECK_REPLY: u16 = 72;
}

/// Longest string field (reasons, names).
pub const MAX_STRING: usize = 4096;
/// Most extents in one `Bitmap` message.
pub const MAX_EXTENTS: usize = 64 * 1024;
/// Largest data part of `Data` / `ResyncData`.
pub const MAX_DATA: usize = 32 * 1024 * 1024;

/// How a type's body is laid out, for length checks before buffering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyShape {
    /// Exactly this many bytes.
    Fixed(usize),
    /// Up to this many bytes, all decoded.
    Variable(usize),
    /// A fixed part of this many bytes, then up to `MAX_DATA` of block data.
    WithData(usize),
}

/// The body shape of a type code, or `None` for an unknown code.
pub fn body_shape(kind: u16) -> Option<BodyShape> {
    use BodyShape::*;
    use code::*;
    Some(match kind {
        HELLO => Variable(4 + 3 * (2 + 255) + 8 + 1 + 1 + 32),
        AUTH_RESPONSE => Fixed(32),
        READY | PING | PING_ACK | BITMAP_DONE | RESYNC_DONE => Fixed(0),
        REFUSE | DISCONNECT => Variable(2 + MAX_STRING),
        STATE => Fixed(1 + 1 + 8 * 4 + 4 + 8),
        BITMAP => Variable(4 + MAX_EXTENTS * 12),
        SYNC_UUID | NEW_CURRENT_UUID | PROMOTE_REQUEST => Fixed(8),
        PROMOTE_REPLY => Variable(8 + 1 + 2 + MAX_STRING),
        DATA => WithData(8 + 8 + 4),
        TRIM => Fixed(8 + 8 + 4),
        ZERO => Fixed(8 + 8 + 4 + 4),
        WRITE_ACK => Fixed(8),
        NEG_ACK => Fixed(8 + 4),
        FLUSH => Fixed(8),
        FLUSH_ACK => Fixed(8 + 1),
        RESYNC_DATA => WithData(8),
        RESYNC_ZERO => Fixed(8 + 4),
        RESYNC_ACK => Fixed(8 + 4 + 1),
        CSUM_EXTENTS => Variable(4 + MAX_CSUM_EXTENTS * 4),
        CSUM_REQUEST | VERIFY_REQUEST | VERIFY_RECHECK => Variable(8 + 4 + 1 + 4 + MAX_SUMS),
        CSUM_REPLY | VERIFY_REPLY | VERIFY_RECHECK_REPLY => Variable(8 + 4 + 4 + MAX_SUMS),
        VERIFY_START => Fixed(8),
        VERIFY_DONE => Fixed(1),
        _ => return None,
    })
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Short(#[from] Short),
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = &s.as_bytes()[..s.len().min(max)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

fn get_str(r: &mut Reader, max: usize) -> Result<String, BodyError> {
    let len = r.u16()? as usize;
    if len > max {
        return Err(BodyError::Invalid("string too long"));
    }
    String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| BodyError::Invalid("string is not UTF-8"))
}

fn get_bool(r: &mut Reader) -> Result<bool, BodyError> {
    match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(BodyError::Invalid("boolean")),
    }
}

/// A length-prefixed byte string of at most [`MAX_SUMS`] bytes.
fn get_blob(r: &mut Reader) -> Result<Bytes, BodyError> {
    let n = r.u32()? as usize;
    if n > MAX_SUMS {
        return Err(BodyError::Invalid("checksum list too long"));
    }
    Ok(Bytes::copy_from_slice(r.bytes(n)?))
}

impl Message {
    pub fn code(&self) -> u16 {
        use code::*;
        match self {
            Message::Hello(_) => HELLO,
            Message::AuthResponse { .. } => AUTH_RESPONSE,
            Message::Ready => READY,
            Message::Refuse { .. } => REFUSE,
            Message::Ping => PING,
            Message::PingAck => PING_ACK,
            Message::Disconnect { .. } => DISCONNECT,
            Message::State(_) => STATE,
            Message::Bitmap { .. } => BITMAP,
            Message::BitmapDone => BITMAP_DONE,
            Message::SyncUuid { .. } => SYNC_UUID,
            Message::NewCurrentUuid { .. } => NEW_CURRENT_UUID,
            Message::PromoteRequest { .. } => PROMOTE_REQUEST,
            Message::PromoteReply { .. } => PROMOTE_REPLY,
            Message::Data { .. } => DATA,
            Message::Trim { .. } => TRIM,
            Message::Zero { .. } => ZERO,
            Message::WriteAck { .. } => WRITE_ACK,
            Message::NegAck { .. } => NEG_ACK,
            Message::Flush { .. } => FLUSH,
            Message::FlushAck { .. } => FLUSH_ACK,
            Message::ResyncData { .. } => RESYNC_DATA,
            Message::ResyncZero { .. } => RESYNC_ZERO,
            Message::ResyncAck { .. } => RESYNC_ACK,
            Message::ResyncDone => RESYNC_DONE,
            Message::CsumExtents { .. } => CSUM_EXTENTS,
            Message::CsumRequest { .. } => CSUM_REQUEST,
            Message::CsumReply { .. } => CSUM_REPLY,
            Message::VerifyStart { .. } => VERIFY_START,
            Message::VerifyRequest { .. } => VERIFY_REQUEST,
            Message::VerifyReply { .. } => VERIFY_REPLY,
            Message::VerifyDone { .. } => VERIFY_DONE,
            Message::VerifyRecheck { .. } => VERIFY_RECHECK,
            Message::VerifyRecheckReply { .. } => VERIFY_RECHECK_REPLY,
        }
    }

    /// The encoded body: the fixed (or whole) part, and the block data.
    pub fn encode_body(&self) -> (Vec<u8>, Bytes) {
        let mut b = Vec::new();
        let mut data = Bytes::new();
        match self {
            Message::Hello(h) => {
                b.extend_from_slice(&h.version_min.to_be_bytes());
                b.extend_from_slice(&h.version_max.to_be_bytes());
                for s in [&h.resource, &h.node, &h.peer] {
                    put_str(&mut b, s, 255);
                }
                b.extend_from_slice(&h.size.to_be_bytes());
                b.push(h.protocol);
                b.push(u8::from(h.auth));
                b.extend_from_slice(&h.challenge);
            }
            Message::AuthResponse { mac } => b.extend_from_slice(mac),
            Message::Ready
            | Message::Ping
            | Message::PingAck
            | Message::BitmapDone
            | Message::ResyncDone => {}
            Message::Refuse { reason } | Message::Disconnect { reason } => {
                put_str(&mut b, reason, MAX_STRING)
            }
            Message::State(s) => {
                b.push(s.role);
                b.push(s.disk);
                for v in [s.current, s.bitmap, s.history[0], s.history[1]] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                b.extend_from_slice(&s.flags.to_be_bytes());
                b.extend_from_slice(&s.dirty_blocks.to_be_bytes());
            }
            Message::Bitmap { extents } => {
                let n = extents.len().min(MAX_EXTENTS);
                b.extend_from_slice(&(n as u32).to_be_bytes());
                for e in &extents[..n] {
                    b.extend_from_slice(&e.start.to_be_bytes());
                    b.extend_from_slice(&e.count.to_be_bytes());
                }
            }
            Message::SyncUuid { uuid } | Message::NewCurrentUuid { uuid } => {
                b.extend_from_slice(&uuid.to_be_bytes())
            }
            Message::Data {
                id,
                offset,
                flags,
                data: d,
            } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
                data = d.clone();
            }
            Message::Trim { id, offset, len } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
            }
            Message::Zero {
                id,
                offset,
                len,
                flags,
            } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
            Message::WriteAck { id } | Message::Flush { id } | Message::PromoteRequest { id } => {
                b.extend_from_slice(&id.to_be_bytes())
            }
            Message::PromoteReply {
                id,
                granted,
                reason,
            } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.push(u8::from(*granted));
                put_str(&mut b, reason, MAX_STRING);
            }
            Message::NegAck { id, errno } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.extend_from_slice(&errno.to_be_bytes());
            }
            Message::FlushAck { id, ok } => {
                b.extend_from_slice(&id.to_be_bytes());
                b.push(u8::from(*ok));
            }
            Message::ResyncData { offset, data: d } => {
                b.extend_from_slice(&offset.to_be_bytes());
                data = d.clone();
            }
            Message::ResyncZero { offset, len } => {
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
            }
            Message::ResyncAck { offset, len, ok } => {
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.push(u8::from(*ok));
            }
            Message::CsumExtents { extents } => {
                let n = extents.len().min(MAX_CSUM_EXTENTS);
                b.extend_from_slice(&(n as u32).to_be_bytes());
                for e in &extents[..n] {
                    b.extend_from_slice(&e.to_be_bytes());
                }
            }
            Message::CsumRequest {
                offset,
                len,
                alg,
                sums,
            }
            | Message::VerifyRequest {
                offset,
                len,
                alg,
                sums,
            }
            | Message::VerifyRecheck {
                offset,
                len,
                alg,
                sums,
            } => {
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                b.push(*alg);
                let n = sums.len().min(MAX_SUMS);
                b.extend_from_slice(&(n as u32).to_be_bytes());
                b.extend_from_slice(&sums[..n]);
            }
            Message::CsumReply {
                offset,
                len,
                differ,
            }
            | Message::VerifyReply {
                offset,
                len,
                differ,
            }
            | Message::VerifyRecheckReply {
                offset,
                len,
                differ,
            } => {
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                let n = differ.len().min(MAX_SUMS);
                b.extend_from_slice(&(n as u32).to_be_bytes());
                b.extend_from_slice(&differ[..n]);
            }
            Message::VerifyStart { total_bytes } => b.extend_from_slice(&total_bytes.to_be_bytes()),
            Message::VerifyDone { complete } => b.push(u8::from(*complete)),
        }
        (b, data)
    }

    /// Decode a body of type `kind`: `fixed` is the fixed (or whole) part,
    /// `data` the block data (empty for types without data).
    pub fn decode_body(kind: u16, fixed: &[u8], data: Bytes) -> Result<Message, BodyError> {
        use code::*;
        let mut r = Reader::new(fixed);
        let msg = match kind {
            HELLO => {
                let version_min = r.u16()?;
                let version_max = r.u16()?;
                let resource = get_str(&mut r, 255)?;
                let node = get_str(&mut r, 255)?;
                let peer = get_str(&mut r, 255)?;
                let size = r.u64()?;
                let protocol = r.u8()?;
                let auth = get_bool(&mut r)?;
                let challenge = r.array()?;
                Message::Hello(Hello {
                    version_min,
                    version_max,
                    resource,
                    node,
                    peer,
                    size,
                    protocol,
                    auth,
                    challenge,
                })
            }
            AUTH_RESPONSE => Message::AuthResponse { mac: r.array()? },
            READY => Message::Ready,
            REFUSE => Message::Refuse {
                reason: get_str(&mut r, MAX_STRING)?,
            },
            PING => Message::Ping,
            PING_ACK => Message::PingAck,
            DISCONNECT => Message::Disconnect {
                reason: get_str(&mut r, MAX_STRING)?,
            },
            STATE => Message::State(PeerState {
                role: r.u8()?,
                disk: r.u8()?,
                current: r.u64()?,
                bitmap: r.u64()?,
                history: [r.u64()?, r.u64()?],
                flags: r.u32()?,
                dirty_blocks: r.u64()?,
            }),
            BITMAP => {
                let n = r.u32()? as usize;
                if n > MAX_EXTENTS {
                    return Err(BodyError::Invalid("too many extents"));
                }
                let mut list = r.sub(n * 12)?;
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    let start = list.u64()?;
                    let count = list.u32()?;
                    if count == 0 || start.checked_add(count.into()).is_none() {
                        return Err(BodyError::Invalid("extent"));
                    }
                    extents.push(Extent { start, count });
                }
                Message::Bitmap { extents }
            }
            BITMAP_DONE => Message::BitmapDone,
            SYNC_UUID => Message::SyncUuid { uuid: r.u64()? },
            NEW_CURRENT_UUID => Message::NewCurrentUuid { uuid: r.u64()? },
            PROMOTE_REQUEST => Message::PromoteRequest { id: r.u64()? },
            PROMOTE_REPLY => Message::PromoteReply {
                id: r.u64()?,
                granted: get_bool(&mut r)?,
                reason: get_str(&mut r, MAX_STRING)?,
            },
            DATA => Message::Data {
                id: r.u64()?,
                offset: r.u64()?,
                flags: r.u32()?,
                data: data.clone(),
            },
            TRIM => Message::Trim {
                id: r.u64()?,
                offset: r.u64()?,
                len: r.u32()?,
            },
            ZERO => Message::Zero {
                id: r.u64()?,
                offset: r.u64()?,
                len: r.u32()?,
                flags: r.u32()?,
            },
            WRITE_ACK => Message::WriteAck { id: r.u64()? },
            NEG_ACK => Message::NegAck {
                id: r.u64()?,
                errno: r.u32()? as i32,
            },
            FLUSH => Message::Flush { id: r.u64()? },
            FLUSH_ACK => Message::FlushAck {
                id: r.u64()?,
                ok: get_bool(&mut r)?,
            },
            RESYNC_DATA => Message::ResyncData {
                offset: r.u64()?,
                data: data.clone(),
            },
            RESYNC_ZERO => Message::ResyncZero {
                offset: r.u64()?,
                len: r.u32()?,
            },
            RESYNC_ACK => Message::ResyncAck {
                offset: r.u64()?,
                len: r.u32()?,
                ok: get_bool(&mut r)?,
            },
            RESYNC_DONE => Message::ResyncDone,
            CSUM_EXTENTS => {
                let n = r.u32()? as usize;
                if n > MAX_CSUM_EXTENTS {
                    return Err(BodyError::Invalid("too many extents"));
                }
                let mut list = r.sub(n * 4)?;
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push(list.u32()?);
                }
                Message::CsumExtents { extents }
            }
            CSUM_REQUEST | VERIFY_REQUEST | VERIFY_RECHECK => {
                let offset = r.u64()?;
                let len = r.u32()?;
                let alg = r.u8()?;
                let sums = get_blob(&mut r)?;
                match kind {
                    CSUM_REQUEST => Message::CsumRequest {
                        offset,
                        len,
                        alg,
                        sums,
                    },
                    VERIFY_REQUEST => Message::VerifyRequest {
                        offset,
                        len,
                        alg,
                        sums,
                    },
                    _ => Message::VerifyRecheck {
                        offset,
                        len,
                        alg,
                        sums,
                    },
                }
            }
            CSUM_REPLY | VERIFY_REPLY | VERIFY_RECHECK_REPLY => {
                let offset = r.u64()?;
                let len = r.u32()?;
                let differ = get_blob(&mut r)?;
                match kind {
                    CSUM_REPLY => Message::CsumReply {
                        offset,
                        len,
                        differ,
                    },
                    VERIFY_REPLY => Message::VerifyReply {
                        offset,
                        len,
                        differ,
                    },
                    _ => Message::VerifyRecheckReply {
                        offset,
                        len,
                        differ,
                    },
                }
            }
            VERIFY_START => Message::VerifyStart {
                total_bytes: r.u64()?,
            },
            VERIFY_DONE => Message::VerifyDone {
                complete: get_bool(&mut r)?,
            },
            _ => return Err(BodyError::Invalid("unknown message type")),
        };
        r.finish()?;
        let carries_data = matches!(kind, DATA | RESYNC_DATA);
        if !carries_data && !data.is_empty() {
            return Err(BodyError::Invalid("data on a message that carries none"));
        }
        Ok(msg)
    }
}
