//! The `handshake` target: drive a [`ServerHandshake`] with arbitrary client
//! bytes, split into arbitrary chunks, and check its output against a small
//! model of the fixed-newstyle negotiation written from the NBD specification.
//!
//! Input layout:
//!
//! ```text
//! byte 0       config: bits 0-2 catalog mode (see `Mode`), bit 3 long texts,
//!              bits 4-6 number N of chunk-size bytes, bit 7 padding
//! bytes 1..=N  chunk sizes, used in a cycle (0 = a call with no new bytes);
//!              N = 0 feeds everything in one call
//! 2 bytes      only with bit 7: a position P (u16, big-endian)
//! rest         the client's byte stream: client flags, options, and
//!              possibly bytes of the transmission phase
//! ```
//!
//! With bit 7, [`PAD`] zero bytes are inserted into the stream at P (or at
//! its end) and chunk sizes are multiplied by 257. This lets inputs within
//! libFuzzer's default 4096-byte limit carry options longer than
//! [`MAX_OPTION_DATA`], whose skipping and `NBD_REP_ERR_TOO_BIG` answer
//! would otherwise be out of reach.
//!
//! What is checked:
//! - no panic;
//! - the output is the 18-byte greeting, then only well-formed option replies
//!   (parsed with [`client::take_option_reply`]), then, after a successful
//!   `NBD_OPT_EXPORT_NAME`, the size / flags / zeroes tail and nothing else;
//! - the replies, the catalog calls, the final status and the number of input
//!   bytes consumed are exactly those the model predicts: every option gets
//!   one answer, in order, with the right option number and reply types;
//!   error messages are UTF-8 and at most 4096 bytes; unconsumed input is
//!   exactly what follows the last option;
//! - the catalog is asked `select` at most once and only when it leads to
//!   `Transmission`;
//! - feeding the same stream in chunks gives the same output, calls, status
//!   and consumption as feeding it at once;
//! - once the status is `Close` or `Transmission` it stays so: later calls
//!   return the same status, consume nothing, output nothing and do not
//!   touch the catalog.

use bytes::BytesMut;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::{
    BlockSizes, CloseReason, ExportCatalog, ExportDetails, MAX_OPTION_DATA, Negotiated, Refusal,
    RefusalKind, ServerHandshake, Status, Violation, client,
};

/// Zero bytes inserted by the padding bit: a little more than the longest
/// option data the server buffers.
pub const PAD: usize = MAX_OPTION_DATA + 64;

const EXPORT: &str = "r0";
const EXPORT_SIZE: u64 = 1 << 30;
const EXPORT_FLAGS: u16 = TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM;

/// How the catalog answers `describe` / `select` for its one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Accept,
    /// Always `Policy` (a Secondary node).
    Policy,
    /// Always `ShuttingDown`.
    Shutdown,
    /// Every other `describe`/`select` is refused with `Policy`.
    Alternate,
}

impl Mode {
    fn from_bits(b: u8) -> Mode {
        match b & 7 {
            2 => Mode::Policy,
            3 => Mode::Shutdown,
            4 | 5 => Mode::Alternate,
            _ => Mode::Accept,
        }
    }
}

/// One call the handshake made to the catalog, with the answer it got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    List(Vec<String>),
    Describe(String, Result<ExportDetails, Refusal>),
    Select(String, Result<ExportDetails, Refusal>),
}

/// A small in-memory catalog with one export, recording every call.
struct Catalog {
    mode: Mode,
    long_texts: bool,
    answered: usize,
    calls: Vec<Call>,
}

impl Catalog {
    fn new(mode: Mode, long_texts: bool) -> Self {
        Catalog {
            mode,
            long_texts,
            answered: 0,
            calls: Vec::new(),
        }
    }

    /// A text of more than 4096 bytes whose byte 4096 falls inside a
    /// two-byte character, so truncation has to back off.
    fn long(prefix: &str) -> String {
        let mut s = String::from(prefix);
        if s.len() % 2 == 0 {
            s.push('x');
        }
        while s.len() <= MAX_STRING_LEN + 8 {
            s.push('é');
        }
        s
    }

    fn details(&self) -> ExportDetails {
        ExportDetails {
            name: EXPORT.into(),
            description: if self.long_texts {
                Self::long("Tandem resource r0 ")
            } else {
                "Tandem resource r0".into()
            },
            size: EXPORT_SIZE,
            flags: EXPORT_FLAGS,
            block_sizes: BlockSizes::TANDEM,
        }
    }

    fn answer(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        if !name.is_empty() && name != EXPORT {
            return Err(Refusal {
                kind: RefusalKind::UnknownExport,
                message: format!("no export named {name:?}; this server exports {EXPORT:?}"),
            });
        }
        self.answered += 1;
        let refuse = match self.mode {
            Mode::Accept => None,
            Mode::Policy => Some(RefusalKind::Policy),
            Mode::Shutdown => Some(RefusalKind::ShuttingDown),
            Mode::Alternate => (self.answered % 2 == 1).then_some(RefusalKind::Policy),
        };
        match refuse {
            None => Ok(self.details()),
            Some(kind) => Err(Refusal {
                kind,
                message: if self.long_texts {
                    Self::long("node beta is Secondary: ")
                } else {
                    "node beta is Secondary".into()
                },
            }),
        }
    }
}

impl ExportCatalog for Catalog {
    fn list(&mut self) -> Vec<String> {
        let names = vec![EXPORT.to_string()];
        self.calls.push(Call::List(names.clone()));
        names
    }
    fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        let r = self.answer(name);
        self.calls.push(Call::Describe(name.into(), r.clone()));
        r
    }
    fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        let r = self.answer(name);
        self.calls.push(Call::Select(name.into(), r.clone()));
        r
    }
}

/// An option reply the model expects.
#[derive(Debug)]
struct Expected {
    option: u32,
    reply_type: u32,
    /// `None`: any UTF-8 message of at most 4096 bytes (the server's own
    /// wording of an error).
    body: Option<Vec<u8>>,
}

/// What the model predicts for a whole stream fed at once.
#[derive(Debug)]
struct Prediction {
    replies: Vec<Expected>,
    /// Bytes after the last reply (the `EXPORT_NAME` answer).
    tail: Vec<u8>,
    status: Status,
    consumed: usize,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn protocol_string(b: &[u8]) -> Option<&str> {
    if b.len() > MAX_STRING_LEN || b.contains(&0) {
        return None;
    }
    std::str::from_utf8(b).ok()
}

/// The longest prefix of `s` of at most 4096 bytes that is valid UTF-8.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(MAX_STRING_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: u32 name length, name, u16 count,
/// count × u16 info types, and nothing more.
fn info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    if data.len() < 4 {
        return None;
    }
    let name_len = be_u32(data) as usize;
    let rest = &data[4..];
    if rest.len() < name_len + 2 {
        return None;
    }
    let name = protocol_string(&rest[..name_len])?;
    let rest = &rest[name_len..];
    let count = be_u16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != 2 * count {
        return None;
    }
    Some((name, rest.chunks(2).map(be_u16).collect()))
}

fn info_body(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(payload);
    b
}

/// Predict the server's behaviour on `stream`, given the answers its
/// catalog gave (`calls`); panics if the calls are not the ones the
/// protocol requires, in order.
fn predict(stream: &[u8], calls: &[Call]) -> Prediction {
    let mut calls = calls.iter();
    let mut replies = Vec::new();
    let done = |replies, tail, status, consumed, mut calls: std::slice::Iter<Call>| {
        assert!(
            calls.next().is_none(),
            "the catalog was called more than the protocol needs"
        );
        Prediction {
            replies,
            tail,
            status,
            consumed,
        }
    };
    if stream.len() < 4 {
        return done(replies, vec![], Status::NeedInput, 0, calls);
    }
    let client_flags = be_u32(stream);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        let v = Violation::UnknownClientFlags(client_flags);
        return done(
            replies,
            vec![],
            Status::Close(CloseReason::Violation(v)),
            4,
            calls,
        );
    }
    let mut pos = 4;
    loop {
        if stream.len() - pos < 16 {
            return done(replies, vec![], Status::NeedInput, pos, calls);
        }
        let magic = be_u64(&stream[pos..]);
        let option = be_u32(&stream[pos + 8..]);
        let len = be_u32(&stream[pos + 12..]) as usize;
        let header_end = pos + 16;
        if magic != IHAVEOPT {
            let v = Violation::BadOptionMagic(magic);
            let s = Status::Close(CloseReason::Violation(v));
            return done(replies, vec![], s, header_end, calls);
        }
        let available = stream.len() - header_end;
        let known = matches!(
            option,
            OPT_EXPORT_NAME | OPT_ABORT | OPT_LIST | OPT_INFO | OPT_GO
        );
        if known && option == OPT_EXPORT_NAME && len > MAX_OPTION_DATA {
            let s = Status::Close(CloseReason::Violation(Violation::BadExportName));
            return done(replies, vec![], s, header_end, calls);
        }
        if !known || len > MAX_OPTION_DATA {
            // Skipped as it arrives, without buffering.
            if available < len {
                return done(replies, vec![], Status::NeedInput, stream.len(), calls);
            }
            replies.push(Expected {
                option,
                reply_type: if known {
                    REP_ERR_TOO_BIG
                } else {
                    REP_ERR_UNSUP
                },
                body: None,
            });
            pos = header_end + len;
            continue;
        }
        if available < len {
            return done(replies, vec![], Status::NeedInput, header_end, calls);
        }
        let data = &stream[header_end..header_end + len];
        pos = header_end + len;
        let ack = Expected {
            option,
            reply_type: REP_ACK,
            body: Some(vec![]),
        };
        match option {
            OPT_EXPORT_NAME => {
                let Some(name) = protocol_string(data) else {
                    let s = Status::Close(CloseReason::Violation(Violation::BadExportName));
                    return done(replies, vec![], s, pos, calls);
                };
                let Some(Call::Select(asked, answer)) = calls.next() else {
                    panic!("EXPORT_NAME {name:?} did not select the export");
                };
                assert_eq!(asked, name, "EXPORT_NAME selected another name");
                return match answer {
                    Ok(export) => {
                        let mut tail = export.size.to_be_bytes().to_vec();
                        tail.extend_from_slice(&(export.flags | TFLAG_HAS_FLAGS).to_be_bytes());
                        if client_flags & CLIENT_NO_ZEROES == 0 {
                            tail.extend_from_slice(&[0; 124]);
                        }
                        let n = Negotiated {
                            export: export.clone(),
                            client_flags,
                        };
                        done(replies, tail, Status::Transmission(n), pos, calls)
                    }
                    Err(r) => {
                        let s = Status::Close(CloseReason::Refused(r.clone()));
                        done(replies, vec![], s, pos, calls)
                    }
                };
            }
            OPT_ABORT => {
                replies.push(ack);
                return done(
                    replies,
                    vec![],
                    Status::Close(CloseReason::Aborted),
                    pos,
                    calls,
                );
            }
            OPT_LIST => {
                if !data.is_empty() {
                    replies.push(Expected {
                        option,
                        reply_type: REP_ERR_INVALID,
                        body: None,
                    });
                    continue;
                }
                let Some(Call::List(names)) = calls.next() else {
                    panic!("LIST did not list the exports");
                };
                for name in names {
                    let mut body = (name.len() as u32).to_be_bytes().to_vec();
                    body.extend_from_slice(name.as_bytes());
                    replies.push(Expected {
                        option,
                        reply_type: REP_SERVER,
                        body: Some(body),
                    });
                }
                replies.push(ack);
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = info_request(data) else {
                    replies.push(Expected {
                        option,
                        reply_type: REP_ERR_INVALID,
                        body: None,
                    });
                    continue;
                };
                let answer = match (option, calls.next()) {
                    (OPT_GO, Some(Call::Select(asked, answer)))
                    | (OPT_INFO, Some(Call::Describe(asked, answer))) => {
                        assert_eq!(asked, name, "INFO/GO asked about another name");
                        answer
                    }
                    (_, call) => panic!("option {option} for {name:?} made call {call:?}"),
                };
                let export = match answer {
                    Ok(export) => export,
                    Err(r) => {
                        let reply_type = match r.kind {
                            RefusalKind::UnknownExport => REP_ERR_UNKNOWN,
                            RefusalKind::Policy => REP_ERR_POLICY,
                            RefusalKind::ShuttingDown => REP_ERR_SHUTDOWN,
                        };
                        replies.push(Expected {
                            option,
                            reply_type,
                            body: Some(truncated(&r.message).as_bytes().to_vec()),
                        });
                        continue;
                    }
                };
                let info = |body| Expected {
                    option,
                    reply_type: REP_INFO,
                    body: Some(body),
                };
                let mut p = export.size.to_be_bytes().to_vec();
                p.extend_from_slice(&(export.flags | TFLAG_HAS_FLAGS).to_be_bytes());
                replies.push(info(info_body(INFO_EXPORT, &p)));
                if requests.contains(&INFO_NAME) {
                    let p = truncated(&export.name).as_bytes();
                    replies.push(info(info_body(INFO_NAME, p)));
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let p = truncated(&export.description).as_bytes();
                    replies.push(info(info_body(INFO_DESCRIPTION, p)));
                }
                let b = export.block_sizes;
                let mut p = Vec::new();
                for v in [b.minimum, b.preferred, b.maximum] {
                    p.extend_from_slice(&v.to_be_bytes());
                }
                replies.push(info(info_body(INFO_BLOCK_SIZE, &p)));
                replies.push(ack);
                if option == OPT_GO {
                    let n = Negotiated {
                        export: export.clone(),
                        client_flags,
                    };
                    return done(replies, vec![], Status::Transmission(n), pos, calls);
                }
            }
            _ => unreachable!(),
        }
    }
}

fn is_final(s: &Status) -> bool {
    !matches!(s, Status::NeedInput)
}

/// Check the whole output of a session against the prediction.
fn check_output(out: &[u8], p: &Prediction) {
    assert!(out.len() >= 18, "no greeting");
    assert_eq!(
        client::decode_greeting(&out[..18]),
        Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
        "bad greeting"
    );
    let body = &out[18..];
    assert!(
        body.ends_with(&p.tail),
        "output does not end with the expected EXPORT_NAME answer"
    );
    let mut buf = BytesMut::from(&body[..body.len() - p.tail.len()]);
    let mut got = Vec::new();
    loop {
        match client::take_option_reply(&mut buf) {
            Ok(Some(r)) => got.push(r),
            Ok(None) => break,
            Err(magic) => panic!("option reply with bad magic {magic:#x} after {got:?}"),
        }
    }
    assert!(
        buf.is_empty(),
        "{} bytes after the last option reply are not a whole reply",
        buf.len()
    );
    assert_eq!(
        got.len(),
        p.replies.len(),
        "got replies {got:?}, expected {:?}",
        p.replies
    );
    for (g, e) in got.iter().zip(&p.replies) {
        assert_eq!(
            (g.option, g.reply_type),
            (e.option, e.reply_type),
            "reply {g:?}, expected {e:?}"
        );
        match &e.body {
            Some(body) => assert_eq!(&g.body, body, "reply body differs: {g:?} vs {e:?}"),
            None => {
                assert!(
                    g.reply_type & (1 << 31) != 0,
                    "free text in a non-error reply"
                );
                assert!(g.body.len() <= MAX_STRING_LEN, "error message too long");
                assert!(
                    std::str::from_utf8(&g.body).is_ok(),
                    "error message not UTF-8"
                );
            }
        }
        if g.reply_type == REP_INFO {
            assert!(client::decode_info(&g.body).is_ok(), "bad info {g:?}");
        }
    }
}

/// One session fed according to `sizes` (empty: everything at once).
/// Returns (output, status, calls, bytes consumed by the final call or end).
fn run(
    stream: &[u8],
    sizes: &[usize],
    mode: Mode,
    long: bool,
) -> (Vec<u8>, Status, Vec<Call>, usize) {
    let mut catalog = Catalog::new(mode, long);
    let mut hs = ServerHandshake::new();
    let mut out = hs.take_output();
    assert_eq!(out.len(), 18, "greeting");
    let mut input = BytesMut::new();
    let mut fed = 0;
    let mut sizes = sizes.iter().copied().cycle();
    let mut status = Status::NeedInput;
    let mut consumed = 0;
    loop {
        let n = if is_final(&status) || fed == stream.len() {
            // After the end: one more call with nothing new, or with the
            // rest once final (transmission bytes may well follow).
            stream.len() - fed
        } else {
            sizes.next().unwrap_or(stream.len()).min(stream.len() - fed)
        };
        input.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let before = input.len();
        let calls_before = catalog.calls.len();
        let s = hs.handle_input(&mut input, &mut catalog);
        let o = hs.take_output();
        if is_final(&status) {
            assert_eq!(s, status, "status changed after it was final");
            assert!(o.is_empty(), "output after the final status");
            assert_eq!(input.len(), before, "input consumed after the final status");
            assert_eq!(
                catalog.calls.len(),
                calls_before,
                "catalog used after the final status"
            );
            if fed == stream.len() {
                return (out, status, catalog.calls, consumed);
            }
            continue;
        }
        out.extend(o);
        status = s;
        consumed = fed - input.len();
        if is_final(&status) {
            assert!(
                catalog
                    .calls
                    .iter()
                    .filter(|c| matches!(c, Call::Select(_, Ok(_))))
                    .count()
                    == usize::from(matches!(status, Status::Transmission(_))),
                "select succeeded {:?} without leading to transmission",
                catalog.calls
            );
            continue;
        }
        if fed == stream.len() && n == 0 {
            return (out, status, catalog.calls, consumed);
        }
    }
}

/// The fuzz target. Returns the final status, for tests.
pub fn check(data: &[u8]) -> Option<Status> {
    let (&config, rest) = data.split_first()?;
    let n_sizes = usize::from((config >> 4) & 7);
    if rest.len() < n_sizes {
        return None;
    }
    let (sizes, rest) = rest.split_at(n_sizes);
    let padded = config & 0x80 != 0;
    let scale = if padded { 257 } else { 1 };
    let mut sizes: Vec<usize> = sizes.iter().map(|&b| usize::from(b) * scale).collect();
    if !sizes.is_empty() && sizes.iter().all(|&s| s == 0) {
        sizes = vec![scale];
    }
    let mode = Mode::from_bits(config);
    let long = config & 8 != 0;
    let mut owned;
    let stream = if padded {
        if rest.len() < 2 {
            return None;
        }
        let (at, rest) = rest.split_at(2);
        let at = usize::from(u16::from_be_bytes([at[0], at[1]])).min(rest.len());
        owned = Vec::with_capacity(rest.len() + PAD);
        owned.extend_from_slice(&rest[..at]);
        owned.resize(at + PAD, 0);
        owned.extend_from_slice(&rest[at..]);
        &owned[..]
    } else {
        rest
    };

    let (out, status, calls, consumed) = run(stream, &[], mode, long);
    let p = predict(stream, &calls);
    assert_eq!(status, p.status, "status");
    assert_eq!(consumed, p.consumed, "bytes consumed");
    check_output(&out, &p);

    if !sizes.is_empty() {
        let (out_c, status_c, calls_c, consumed_c) = run(stream, &sizes, mode, long);
        assert_eq!(status_c, status, "chunked status differs");
        assert_eq!(calls_c, calls, "chunked catalog calls differ");
        assert_eq!(consumed_c, consumed, "chunked consumption differs");
        assert!(out_c == out, "chunked output differs");
    }
    Some(status)
}
