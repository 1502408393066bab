//! The NBD transmission phase: request headers, their validation, replies.
//!
//! A driver reads [`REQUEST_HEADER_LEN`] bytes, decodes them with
//! [`RequestHeader::decode`] (a bad magic ends the session), and asks
//! [`validate`] what to do. The answer says exactly how many payload bytes
//! follow, so the driver can check that length before buffering anything,
//! and whether the request is executed, answered with an error, or ends the
//! connection. Replies are simple replies ([`SimpleReply`]); structured
//! replies are never negotiated.
//!
//! Rules applied by [`validate`] (from the NBD specification):
//! - unknown commands and flags, and flags on commands they do not apply to,
//!   get `EINVAL`;
//! - a read, trim or cache past the end gets `EINVAL`; a write or
//!   write-zeroes past the end gets `ENOSPC`;
//! - a read longer than the maximum payload gets `EINVAL`; a write payload
//!   longer than it ends the connection (it cannot be skipped cheaply and no
//!   conforming client sends one);
//! - `BLOCK_STATUS` without a negotiated metadata context gets `EINVAL`.

use thiserror::Error;

use super::ErrorCode;
use super::consts::*;
use crate::reader::{Reader, Short};

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A decoded request header, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("request header has bad magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

impl RequestHeader {
    pub fn decode(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadRequestMagic> {
        let mut r = Reader::new(buf);
        let read = |r: &mut Reader| -> Result<_, Short> {
            Ok((r.u32()?, r.u16()?, r.u16()?, r.u64()?, r.u64()?, r.u32()?))
        };
        let (magic, flags, command, cookie, offset, length) =
            read(&mut r).expect("header is 28 bytes");
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Bytes of payload that follow this header on the wire, whatever the
    /// request's fate: only `WRITE` carries one.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    /// The `length` payload bytes follow the header.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// Soft disconnect: finish in-flight requests, then close. No reply.
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    /// Advisory prefetch; Tandem answers it without doing anything.
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
}

/// What the session has negotiated, as far as validation needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub export_size: u64,
    pub max_payload: u32,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Execute it (reading `payload_len` bytes first for a write).
    Execute(Command),
    /// Read and discard `discard` payload bytes, then reply with `error`.
    Reject { error: ErrorCode, discard: u32 },
    /// The request cannot be answered or skipped safely: close.
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CloseReason {
    #[error("write payload of {0} bytes exceeds the {1}-byte maximum")]
    PayloadTooLarge(u32, u32),
}

/// Decide what a request header asks for.
pub fn validate(h: &RequestHeader, limits: &Limits) -> Decision {
    let discard = h.payload_len();
    if discard > limits.max_payload {
        return Decision::Close(CloseReason::PayloadTooLarge(discard, limits.max_payload));
    }
    let reject = |error| Decision::Reject { error, discard };
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let allowed = match h.command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        _ => return reject(ErrorCode::Invalid),
    };
    if h.flags & !allowed != 0 {
        return reject(ErrorCode::Invalid);
    }
    let negotiated = |flag: u16| limits.flags & flag != 0;
    if fua && !negotiated(TFLAG_SEND_FUA) {
        return reject(ErrorCode::Invalid);
    }
    // End of the range, or None if it overflows or passes the export's end.
    let end = h
        .offset
        .checked_add(h.length.into())
        .filter(|&e| e <= limits.export_size);
    let read_only = negotiated(TFLAG_READ_ONLY);
    let (offset, length) = (h.offset, h.length);
    let command = match h.command {
        CMD_READ => {
            if length > limits.max_payload || end.is_none() {
                return reject(ErrorCode::Invalid);
            }
            Command::Read { offset, length }
        }
        CMD_WRITE => {
            if read_only {
                return reject(ErrorCode::Perm);
            }
            if end.is_none() {
                return reject(ErrorCode::NoSpace);
            }
            Command::Write {
                offset,
                length,
                fua,
            }
        }
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => {
            if !negotiated(TFLAG_SEND_FLUSH) {
                return reject(ErrorCode::Invalid);
            }
            Command::Flush
        }
        CMD_TRIM => {
            if !negotiated(TFLAG_SEND_TRIM) {
                return reject(ErrorCode::Invalid);
            }
            if read_only {
                return reject(ErrorCode::Perm);
            }
            if end.is_none() {
                return reject(ErrorCode::Invalid);
            }
            Command::Trim {
                offset,
                length,
                fua,
            }
        }
        CMD_CACHE => {
            if !negotiated(TFLAG_SEND_CACHE) || end.is_none() {
                return reject(ErrorCode::Invalid);
            }
            Command::Cache { offset, length }
        }
        CMD_WRITE_ZEROES => {
            if !negotiated(TFLAG_SEND_WRITE_ZEROES) {
                return reject(ErrorCode::Invalid);
            }
            let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
            if fast && !negotiated(TFLAG_SEND_FAST_ZERO) {
                return reject(ErrorCode::Invalid);
            }
            if read_only {
                return reject(ErrorCode::Perm);
            }
            if end.is_none() {
                return reject(ErrorCode::NoSpace);
            }
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                fast,
            }
        }
        _ => unreachable!("unknown commands were rejected above"),
    };
    Decision::Execute(command)
}

/// A simple reply header; a successful read is followed by its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub cookie: u64,
    pub error: Option<ErrorCode>,
}

impl SimpleReply {
    pub fn ok(cookie: u64) -> Self {
        SimpleReply {
            cookie,
            error: None,
        }
    }

    pub fn err(cookie: u64, error: ErrorCode) -> Self {
        SimpleReply {
            cookie,
            error: Some(error),
        }
    }

    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.map_or(0, ErrorCode::to_wire).to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    /// Decode a reply header (client side). `Err` carries a wrong magic.
    pub fn decode(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<Self, u32> {
        let magic = u32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(magic);
        }
        let error = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        Ok(SimpleReply {
            cookie,
            error: (error != 0).then(|| ErrorCode::from_wire(error)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_FLAGS: u16 = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;

    fn limits() -> Limits {
        Limits {
            export_size: 1 << 20,
            max_payload: 32 << 20,
            flags: ALL_FLAGS,
        }
    }

    fn hdr(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 42,
            offset,
            length,
        }
    }

    #[test]
    fn bounds_give_einval_for_reads_and_enospc_for_writes() {
        let l = limits();
        let past = |c| validate(&hdr(c, 0, (1 << 20) - 512, 1024), &l);
        assert_eq!(
            past(CMD_READ),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
        assert_eq!(
            past(CMD_WRITE),
            Decision::Reject {
                error: ErrorCode::NoSpace,
                discard: 1024
            }
        );
        assert_eq!(
            past(CMD_TRIM),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
        assert_eq!(
            past(CMD_WRITE_ZEROES),
            Decision::Reject {
                error: ErrorCode::NoSpace,
                discard: 0
            }
        );
        let overflow = validate(&hdr(CMD_READ, 0, u64::MAX, 2), &l);
        assert_eq!(
            overflow,
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
        assert_eq!(
            validate(&hdr(CMD_READ, 0, (1 << 20) - 512, 512), &l),
            Decision::Execute(Command::Read {
                offset: (1 << 20) - 512,
                length: 512
            })
        );
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let l = limits();
        assert_eq!(
            validate(&hdr(99, 0, 0, 0), &l),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
        assert_eq!(
            validate(&hdr(CMD_BLOCK_STATUS, 0, 0, 512), &l),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
        assert_eq!(
            validate(&hdr(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &l),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 512
            }
        );
        assert_eq!(
            validate(&hdr(CMD_READ, 1 << 9, 0, 512), &l),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
    }

    #[test]
    fn oversized_payloads_close_and_oversized_reads_are_einval() {
        let l = limits();
        let big = (32 << 20) + 1;
        assert!(matches!(
            validate(&hdr(CMD_WRITE, 0, 0, big), &l),
            Decision::Close(_)
        ));
        assert_eq!(
            validate(&hdr(CMD_READ, 0, 0, big), &l),
            Decision::Reject {
                error: ErrorCode::Invalid,
                discard: 0
            }
        );
    }

    #[test]
    fn write_zeroes_flags_are_decoded() {
        let l = limits();
        let d = validate(
            &hdr(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FUA | CMD_FLAG_FAST_ZERO,
                4096,
                4096,
            ),
            &l,
        );
        assert_eq!(
            d,
            Decision::Execute(Command::WriteZeroes {
                offset: 4096,
                length: 4096,
                fua: true,
                no_hole: true,
                fast: true
            })
        );
    }

    #[test]
    fn headers_and_replies_round_trip() {
        let h = hdr(CMD_WRITE, CMD_FLAG_FUA, 123, 456);
        assert_eq!(RequestHeader::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::decode(&bad).is_err());
        for r in [SimpleReply::ok(7), SimpleReply::err(8, ErrorCode::NoSpace)] {
            assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
        }
    }
}
