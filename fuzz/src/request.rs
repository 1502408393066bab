//! The `request` target: decode a 28-byte request header and validate it
//! against arbitrary negotiated [`Limits`], then check the decision against
//! the rules of the NBD specification as Tandem applies them.
//!
//! Input layout (shorter inputs are ignored, extra bytes too):
//!
//! ```text
//! bytes 0..8    export size (u64, big-endian)
//! bytes 8..12   maximum payload (u32)
//! bytes 12..14  transmission flags (u16)
//! byte  14      bit 0: overwrite the header's magic with the right one
//! bytes 15..43  the request header as it came off the wire
//! ```
//!
//! What is checked:
//! - `decode` accepts exactly the headers with `NBD_REQUEST_MAGIC`, reads
//!   every field from its place, and `encode` gives the same bytes back;
//! - `validate` is deterministic and its decision is justified:
//!   - `Close` only for a `WRITE` whose payload exceeds the maximum, and
//!     always for one;
//!   - a `Reject`'s `discard` is the header's payload length (its `length`
//!     for `WRITE`, 0 otherwise), and its error is one the rules allow for
//!     that command, with a cause present (`EPERM` only on a read-only
//!     export, `ENOSPC` only for a write or write-zeroes past the end);
//!   - `Execute` carries the header's own command, offset, length and
//!     flags, only flags the command takes and the client negotiated, a
//!     range inside the export, a read or write length within the maximum
//!     payload, and no modification of a read-only export;
//! - and conversely every request that breaks no rule is executed.

use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::transmission::{
    BadRequestMagic, CloseReason, Command, Decision, Limits, REQUEST_HEADER_LEN, RequestHeader,
    validate,
};

pub const INPUT_LEN: usize = 15 + REQUEST_HEADER_LEN;

/// Flags each known command may carry.
fn allowed_flags(command: u16) -> Option<u16> {
    match command {
        CMD_WRITE_ZEROES => Some(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => Some(CMD_FLAG_FUA),
        _ => None,
    }
}

/// The transmission flag a command needs to have been advertised, if any.
fn needed_tflag(command: u16) -> Option<u16> {
    match command {
        CMD_FLUSH => Some(TFLAG_SEND_FLUSH),
        CMD_TRIM => Some(TFLAG_SEND_TRIM),
        CMD_CACHE => Some(TFLAG_SEND_CACHE),
        CMD_WRITE_ZEROES => Some(TFLAG_SEND_WRITE_ZEROES),
        _ => None,
    }
}

fn modifies(command: u16) -> bool {
    matches!(command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES)
}

fn has_range(command: u16) -> bool {
    matches!(
        command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES
    )
}

/// The reasons the specification gives for refusing `h`, as errors.
fn causes(h: &RequestHeader, l: &Limits) -> Vec<ErrorCode> {
    let mut causes = Vec::new();
    let negotiated = |f: u16| l.flags & f != 0;
    let Some(allowed) = allowed_flags(h.command) else {
        return vec![ErrorCode::Invalid];
    };
    if h.flags & !allowed != 0 {
        causes.push(ErrorCode::Invalid);
    }
    if h.flags & CMD_FLAG_FUA != 0 && !negotiated(TFLAG_SEND_FUA) {
        causes.push(ErrorCode::Invalid);
    }
    if h.flags & CMD_FLAG_FAST_ZERO != 0 && !negotiated(TFLAG_SEND_FAST_ZERO) {
        causes.push(ErrorCode::Invalid);
    }
    if let Some(f) = needed_tflag(h.command)
        && !negotiated(f)
    {
        causes.push(ErrorCode::Invalid);
    }
    if modifies(h.command) && negotiated(TFLAG_READ_ONLY) {
        causes.push(ErrorCode::Perm);
    }
    let in_export = u128::from(h.offset) + u128::from(h.length) <= u128::from(l.export_size);
    if has_range(h.command) && !in_export {
        causes.push(match h.command {
            CMD_WRITE | CMD_WRITE_ZEROES => ErrorCode::NoSpace,
            _ => ErrorCode::Invalid,
        });
    }
    if h.command == CMD_READ && h.length > l.max_payload {
        causes.push(ErrorCode::Invalid);
    }
    causes
}

/// The fuzz target. Returns the decision, for tests.
pub fn check(data: &[u8]) -> Option<Decision> {
    if data.len() < INPUT_LEN {
        return None;
    }
    let limits = Limits {
        export_size: u64::from_be_bytes(data[0..8].try_into().unwrap()),
        max_payload: u32::from_be_bytes(data[8..12].try_into().unwrap()),
        flags: u16::from_be_bytes(data[12..14].try_into().unwrap()),
    };
    let mut raw: [u8; REQUEST_HEADER_LEN] = data[15..INPUT_LEN].try_into().unwrap();
    if data[14] & 1 != 0 {
        raw[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }

    let magic = u32::from_be_bytes(raw[0..4].try_into().unwrap());
    let h = match RequestHeader::decode(&raw) {
        Err(e) => {
            assert_ne!(magic, REQUEST_MAGIC, "good magic rejected");
            assert_eq!(e, BadRequestMagic(magic));
            return None;
        }
        Ok(h) => h,
    };
    assert_eq!(magic, REQUEST_MAGIC, "bad magic accepted");
    assert_eq!(h.flags, u16::from_be_bytes(raw[4..6].try_into().unwrap()));
    assert_eq!(h.command, u16::from_be_bytes(raw[6..8].try_into().unwrap()));
    assert_eq!(h.cookie, u64::from_be_bytes(raw[8..16].try_into().unwrap()));
    assert_eq!(
        h.offset,
        u64::from_be_bytes(raw[16..24].try_into().unwrap())
    );
    assert_eq!(
        h.length,
        u32::from_be_bytes(raw[24..28].try_into().unwrap())
    );
    assert_eq!(h.encode(), raw, "encode does not give the header back");

    let payload = if h.command == CMD_WRITE { h.length } else { 0 };
    assert_eq!(h.payload_len(), payload);

    let d = validate(&h, &limits);
    assert_eq!(validate(&h, &limits), d, "validate is not deterministic");
    let causes = causes(&h, &limits);
    let too_big = h.command == CMD_WRITE && h.length > limits.max_payload;
    match d {
        Decision::Close(CloseReason::PayloadTooLarge(len, max)) => {
            assert!(too_big, "{h:?} closed under {limits:?}");
            assert_eq!((len, max), (h.length, limits.max_payload));
        }
        Decision::Reject { error, discard } => {
            assert!(!too_big, "oversized write payload {h:?} not closed");
            assert_eq!(discard, payload, "{h:?} rejected, discarding {discard}");
            assert!(
                causes.contains(&error),
                "{h:?} rejected with {error} under {limits:?}; causes {causes:?}"
            );
        }
        Decision::Execute(c) => {
            assert!(!too_big, "oversized write payload {h:?} not closed");
            assert!(
                causes.is_empty(),
                "{h:?} executed as {c:?} under {limits:?} despite {causes:?}"
            );
            let fua = h.flags & CMD_FLAG_FUA != 0;
            let (offset, length) = (h.offset, h.length);
            let expected = match h.command {
                CMD_READ => Command::Read { offset, length },
                CMD_WRITE => Command::Write {
                    offset,
                    length,
                    fua,
                },
                CMD_DISC => Command::Disconnect,
                CMD_FLUSH => Command::Flush,
                CMD_TRIM => Command::Trim {
                    offset,
                    length,
                    fua,
                },
                CMD_CACHE => Command::Cache { offset, length },
                CMD_WRITE_ZEROES => Command::WriteZeroes {
                    offset,
                    length,
                    fua,
                    no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                    fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
                },
                other => panic!("unknown command {other} executed as {c:?}"),
            };
            assert_eq!(c, expected, "{h:?} executed as something else");
            if let Command::Read { offset, length }
            | Command::Write { offset, length, .. }
            | Command::Trim { offset, length, .. }
            | Command::Cache { offset, length }
            | Command::WriteZeroes { offset, length, .. } = c
            {
                assert!(
                    offset
                        .checked_add(length.into())
                        .is_some_and(|e| e <= limits.export_size),
                    "{c:?} outside an export of {} bytes",
                    limits.export_size
                );
            }
            if let Command::Read { length, .. } | Command::Write { length, .. } = c {
                assert!(
                    length <= limits.max_payload,
                    "{c:?} beyond the maximum payload"
                );
            }
        }
    }
    if !too_big && causes.is_empty() {
        assert!(
            matches!(d, Decision::Execute(_)),
            "valid {h:?} under {limits:?} not executed: {d:?}"
        );
    }
    Some(d)
}
