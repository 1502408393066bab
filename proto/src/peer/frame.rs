//! Peer-link framing.
//!
//! ```text
//! 0   magic   u32  0x54414e44 ("TAND")
//! 4   type    u16
//! 6   flags   u16  (0 in version 1)
//! 8   seq     u64  frames sent on this connection before this one
//! 16  len     u32  body length (fixed part + block data)
//! 20  body
//! ..  crc32   u32  over the header and the body (crc32fast)
//! ```
//!
//! Invariants: the body length is checked against the type's shape before
//! anything is buffered; a frame is handed on only after its crc matched
//! and its sequence number is the next expected one, so a corrupted,
//! duplicated or lost frame drops the link instead of reaching the disk.
//!
//! Drivers that want block data in an aligned buffer use
//! [`Decoder::header`], read the fixed part and the data themselves, and
//! finish with [`Decoder::finish`]; others use [`Decoder::decode`].

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use super::message::{BodyError, BodyShape, MAX_DATA, Message, body_shape};

pub const MAGIC: u32 = 0x5441_4e44;
pub const HEADER_LEN: usize = 20;
pub const CRC_LEN: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub flags: u16,
    pub seq: u64,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("frame flags {0:#06x} are not defined")]
    BadFlags(u16),
    #[error("message type {kind} with a body of {len} bytes is malformed")]
    BadLength { kind: u16, len: u32 },
    #[error("frame sequence {got}, expected {expected} (lost or duplicated frame)")]
    BadSequence { expected: u64, got: u64 },
    #[error(
        "frame crc mismatch (sent {sent:#010x}, computed {computed:#010x}): corrupted on the link"
    )]
    BadCrc { sent: u32, computed: u32 },
    #[error("malformed message body: {0}")]
    Body(#[from] BodyError),
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.kind.to_be_bytes());
        out[6..8].copy_from_slice(&self.flags.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Bytes of the body decoded as message fields.
    pub fn fixed_len(&self) -> usize {
        match body_shape(self.kind) {
            Some(BodyShape::WithData(fixed)) => fixed,
            _ => self.len as usize,
        }
    }

    /// Bytes of block data after the fixed part.
    pub fn data_len(&self) -> usize {
        self.len as usize - self.fixed_len()
    }
}

/// A frame ready to write: `head` (header and fixed part), then `data`,
/// then `crc`. Kept apart so block data is written without copying.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub head: Vec<u8>,
    pub data: Bytes,
    pub crc: [u8; CRC_LEN],
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + CRC_LEN
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole frame in one buffer (tests, small frames).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.data);
        v.extend_from_slice(&self.crc);
        v
    }
}

/// Encode `msg` as the frame with sequence number `seq`.
pub fn encode(msg: &Message, seq: u64) -> EncodedFrame {
    let (fixed, data) = msg.encode_body();
    let header = FrameHeader {
        kind: msg.code(),
        flags: 0,
        seq,
        len: (fixed.len() + data.len()) as u32,
    };
    let mut head = Vec::with_capacity(HEADER_LEN + fixed.len());
    head.extend_from_slice(&header.encode());
    head.extend_from_slice(&fixed);
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&data);
    EncodedFrame {
        head,
        data,
        crc: h.finalize().to_be_bytes(),
    }
}

/// Decodes the frames of one direction of one connection.
#[derive(Debug, Default)]
pub struct Decoder {
    expected_seq: u64,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Check a frame header: magic, type, flags, length for the type,
    /// sequence number. Nothing of the body is buffered before this.
    pub fn header(&self, raw: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(raw[r].try_into().expect("4 bytes"));
        let magic = be32(0..4);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let h = FrameHeader {
            kind: u16::from_be_bytes([raw[4], raw[5]]),
            flags: u16::from_be_bytes([raw[6], raw[7]]),
            seq: u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes")),
            len: be32(16..20),
        };
        let shape = body_shape(h.kind).ok_or(FrameError::UnknownType(h.kind))?;
        if h.flags != 0 {
            return Err(FrameError::BadFlags(h.flags));
        }
        let len = h.len as usize;
        let ok = match shape {
            BodyShape::Fixed(n) => len == n,
            BodyShape::Variable(max) => len <= max,
            BodyShape::WithData(fixed) => len >= fixed && len - fixed <= MAX_DATA,
        };
        if !ok {
            return Err(FrameError::BadLength {
                kind: h.kind,
                len: h.len,
            });
        }
        if h.seq != self.expected_seq {
            return Err(FrameError::BadSequence {
                expected: self.expected_seq,
                got: h.seq,
            });
        }
        Ok(h)
    }

    /// Verify the crc of a frame read in pieces and decode its message.
    pub fn finish(
        &mut self,
        raw_header: &[u8; HEADER_LEN],
        header: &FrameHeader,
        fixed: &[u8],
        data: Bytes,
        crc: [u8; CRC_LEN],
    ) -> Result<Message, FrameError> {
        debug_assert_eq!(fixed.len() + data.len(), header.len as usize);
        let mut h = crc32fast::Hasher::new();
        h.update(raw_header);
        h.update(fixed);
        h.update(&data);
        let computed = h.finalize();
        let sent = u32::from_be_bytes(crc);
        if sent != computed {
            return Err(FrameError::BadCrc { sent, computed });
        }
        let msg = Message::decode_body(header.kind, fixed, data)?;
        self.expected_seq += 1;
        Ok(msg)
    }

    /// Take one whole frame off the front of `buf`, if it is there.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let raw: [u8; HEADER_LEN] = buf[..HEADER_LEN].try_into().expect("header");
        let header = self.header(&raw)?;
        let total = HEADER_LEN + header.len as usize + CRC_LEN;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let fixed = buf.split_to(header.fixed_len());
        let data = buf.split_to(header.data_len()).freeze();
        let crc: [u8; CRC_LEN] = buf[..CRC_LEN].try_into().expect("crc");
        buf.advance(CRC_LEN);
        self.finish(&raw, &header, &fixed, data, crc).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::*;
    use super::*;

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                version_min: 1,
                version_max: 3,
                resource: "r0".into(),
                node: "alpha".into(),
                peer: "beta".into(),
                size: 1 << 30,
                protocol: b'C',
                auth: true,
                challenge: [7; 32],
            }),
            Message::AuthResponse { mac: [9; 32] },
            Message::Ready,
            Message::Refuse {
                reason: "size mismatch".into(),
            },
            Message::Ping,
            Message::PingAck,
            Message::Disconnect {
                reason: "operator".into(),
            },
            Message::State(PeerState {
                role: 1,
                disk: 6,
                current: 0xabc,
                bitmap: 4,
                history: [1, 2],
                flags: STATE_FLAG_CRASHED_PRIMARY,
                dirty_blocks: 12,
            }),
            Message::Bitmap {
                extents: vec![
                    Extent { start: 0, count: 3 },
                    Extent {
                        start: 100,
                        count: 1,
                    },
                ],
            },
            Message::BitmapDone,
            Message::SyncUuid { uuid: 42 },
            Message::NewCurrentUuid { uuid: 43 },
            Message::PromoteRequest { id: 5 },
            Message::PromoteReply {
                id: 5,
                granted: false,
                reason: "beta is Primary".into(),
            },
            Message::Data {
                id: 1,
                offset: 4096,
                flags: DATA_FLAG_FUA,
                data: Bytes::from(vec![5u8; 4096]),
            },
            Message::Trim {
                id: 2,
                offset: 0,
                len: 512,
            },
            Message::Zero {
                id: 3,
                offset: 8192,
                len: 4096,
                flags: ZERO_FLAG_NO_HOLE,
            },
            Message::WriteAck { id: 1 },
            Message::NegAck { id: 1, errno: 5 },
            Message::Flush { id: 4 },
            Message::FlushAck { id: 4, ok: true },
            Message::ResyncData {
                offset: 1 << 20,
                data: Bytes::from(vec![1u8; 65536]),
            },
            Message::ResyncZero {
                offset: 0,
                len: 1 << 20,
            },
            Message::ResyncAck {
                offset: 0,
                len: 1 << 20,
                ok: false,
            },
            Message::ResyncDone,
            Message::CsumExtents {
                extents: vec![0, 7, 255],
            },
            Message::CsumRequest {
                offset: 1 << 22,
                len: 8192,
                alg: CSUM_ALG_CRC32,
                sums: Bytes::from(vec![9u8; 8]),
            },
            Message::CsumReply {
                offset: 1 << 22,
                len: 8192,
                differ: Bytes::from(vec![2u8]),
            },
            Message::VerifyStart {
                total_bytes: 1 << 30,
            },
            Message::VerifyRequest {
                offset: 0,
                len: 4096,
                alg: CSUM_ALG_SHA256,
                sums: Bytes::from(vec![1u8; 32]),
            },
            Message::VerifyReply {
                offset: 0,
                len: 4096,
                differ: Bytes::from(vec![1u8]),
            },
            Message::VerifyDone { complete: true },
            Message::VerifyRecheck {
                offset: 1 << 20,
                len: 8192,
                alg: CSUM_ALG_CRC32,
                sums: Bytes::from(vec![7u8; 8]),
            },
            Message::VerifyRecheckReply {
                offset: 1 << 20,
                len: 8192,
                differ: Bytes::from(vec![2u8]),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_in_sequence() {
        let mut buf = BytesMut::new();
        let msgs = samples();
        for (i, m) in msgs.iter().enumerate() {
            buf.extend_from_slice(&encode(m, i as u64).to_vec());
        }
        let mut d = Decoder::new();
        for m in &msgs {
            assert_eq!(d.decode(&mut buf).unwrap().as_ref(), Some(m));
        }
        assert!(buf.is_empty());
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn corrupted_frames_are_rejected() {
        let frame = encode(
            &Message::Data {
                id: 1,
                offset: 0,
                flags: 0,
                data: Bytes::from(vec![3u8; 512]),
            },
            0,
        )
        .to_vec();
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let r = Decoder::new().decode(&mut BytesMut::from(&bad[..]));
            assert!(
                !matches!(r, Ok(Some(_))),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn out_of_sequence_frames_are_rejected() {
        let mut buf = BytesMut::from(&encode(&Message::Ping, 1).to_vec()[..]);
        assert_eq!(
            Decoder::new().decode(&mut buf),
            Err(FrameError::BadSequence {
                expected: 0,
                got: 1
            })
        );
    }

    #[test]
    fn lengths_are_checked_before_buffering() {
        let h = FrameHeader {
            kind: code::DATA,
            flags: 0,
            seq: 0,
            len: (MAX_DATA + 21) as u32,
        };
        assert!(matches!(
            Decoder::new().header(&h.encode()),
            Err(FrameError::BadLength { .. })
        ));
        let h = FrameHeader {
            kind: code::PING,
            flags: 0,
            seq: 0,
            len: 1,
        };
        assert!(matches!(
            Decoder::new().header(&h.encode()),
            Err(FrameError::BadLength { .. })
        ));
        let h = FrameHeader {
            kind: 999,
            flags: 0,
            seq: 0,
            len: 0,
        };
        assert_eq!(
            Decoder::new().header(&h.encode()),
            Err(FrameError::UnknownType(999))
        );
    }
}
