//! Server side of the NBD fixed-newstyle handshake, as a state machine.
//!
//! [`ServerHandshake::new`] queues the greeting. The driver then feeds every
//! byte the client sends to [`ServerHandshake::handle_input`], writes out
//! whatever [`ServerHandshake::take_output`] returns, and stops when the
//! status is [`Status::Transmission`] (start serving requests) or
//! [`Status::Close`] (flush the output, then close). Both are final: any
//! later call returns the same status again, consuming no input and queuing
//! no output.
//!
//! What is negotiated: `NBD_OPT_GO`, `NBD_OPT_INFO` (EXPORT, NAME,
//! DESCRIPTION, BLOCK_SIZE), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//! `NBD_OPT_ABORT`. Every other option, including `STRUCTURED_REPLY` and
//! `EXTENDED_HEADERS`, is answered `NBD_REP_ERR_UNSUP` and negotiation goes
//! on, so clients fall back to simple replies.
//!
//! Invariants:
//! - option data is buffered only up to [`MAX_OPTION_DATA`]; longer options
//!   are skipped byte by byte without buffering and answered with an error;
//! - the export is asked for through [`ExportCatalog`], synchronously, so the
//!   answer to `GO` reflects the node's role at that instant, and `select`
//!   (which may attach the client) is called only when the `GO` or
//!   `EXPORT_NAME` will succeed on the wire;
//! - `NBD_INFO_BLOCK_SIZE` is always sent with `INFO`/`GO` (the protocol
//!   allows it unrequested, and clients that do not know it skip it).

use bytes::{Buf, BytesMut};
use thiserror::Error;

use super::consts::*;
use crate::reader::Reader;

/// Option data longer than this is skipped, not buffered.
pub const MAX_OPTION_DATA: usize = 64 * 1024;

/// Block-size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// What Tandem advertises: 512 / 4096 / 32 MiB.
    pub const TANDEM: BlockSizes = BlockSizes {
        minimum: 512,
        preferred: 4096,
        maximum: 32 * 1024 * 1024,
    };
}

/// Everything a client learns about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDetails {
    /// The canonical export name (answered for `NBD_INFO_NAME`).
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags; `HAS_FLAGS` is added on the wire if missing.
    pub flags: u16,
    pub block_sizes: BlockSizes,
}

/// Why an export cannot be used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// No export of that name (`NBD_REP_ERR_UNKNOWN`).
    UnknownExport,
    /// It exists but may not be used now, e.g. the node is Secondary
    /// (`NBD_REP_ERR_POLICY`).
    Policy,
    /// The server is stopping (`NBD_REP_ERR_SHUTDOWN`).
    ShuttingDown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// Shown to the user by the client; at most 4096 bytes are sent.
    pub message: String,
}

/// The server's view of its exports during negotiation.
pub trait ExportCatalog {
    /// Names answered to `NBD_OPT_LIST`.
    fn list(&mut self) -> Vec<String>;
    /// Describe `name` for `NBD_OPT_INFO`; must have no side effects.
    fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal>;
    /// Choose `name` for transmission (`GO`, `EXPORT_NAME`). On success the
    /// client will be in transmission as soon as the output is written.
    fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal>;
}

/// The result of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportDetails,
    /// The client flags it sent.
    pub client_flags: u32,
}

/// A breach of the protocol that ends the session with a hard disconnect.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Violation {
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option header has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("NBD_OPT_EXPORT_NAME with an invalid or over-long name")]
    BadExportName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `NBD_OPT_ABORT`; the `ACK` is in the output.
    Aborted,
    /// `NBD_OPT_EXPORT_NAME` for an export that cannot be served: the
    /// protocol has no way to say why, so the session ends.
    Refused(Refusal),
    Violation(Violation),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Send the output, then call again with more input.
    NeedInput,
    /// Send the output; the session is in transmission from here on. Input
    /// bytes not consumed belong to the transmission phase.
    Transmission(Negotiated),
    /// Send the output, then close the connection.
    Close(CloseReason),
}

#[derive(Debug)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    Skipping {
        option: u32,
        remaining: u64,
        reply: u32,
    },
    /// Negotiation is over; the status is returned again on every call.
    Finished(Status),
}

/// The server side of one handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    state: State,
    out: Vec<u8>,
    client_flags: u32,
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerHandshake {
    /// A new handshake with the greeting already queued.
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(18);
        out.extend_from_slice(&NBDMAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        ServerHandshake {
            state: State::ClientFlags,
            out,
            client_flags: 0,
        }
    }

    /// Bytes to send to the client, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Consume as much of `input` as possible.
    pub fn handle_input(
        &mut self,
        input: &mut BytesMut,
        catalog: &mut dyn ExportCatalog,
    ) -> Status {
        loop {
            match self.state {
                State::Finished(ref status) => return status.clone(),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Status::NeedInput;
                    }
                    let flags = input.get_u32();
                    // The server MUST drop the connection on unknown flags.
                    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                        return self
                            .close(CloseReason::Violation(Violation::UnknownClientFlags(flags)));
                    }
                    self.client_flags = flags;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    if input.len() < 16 {
                        return Status::NeedInput;
                    }
                    let magic = input.get_u64();
                    let option = input.get_u32();
                    let len = input.get_u32();
                    if magic != IHAVEOPT {
                        return self
                            .close(CloseReason::Violation(Violation::BadOptionMagic(magic)));
                    }
                    self.state = if !is_known_option(option) {
                        State::Skipping {
                            option,
                            remaining: len.into(),
                            reply: REP_ERR_UNSUP,
                        }
                    } else if len as usize > MAX_OPTION_DATA {
                        if option == OPT_EXPORT_NAME {
                            // No error reply exists for EXPORT_NAME.
                            return self.close(CloseReason::Violation(Violation::BadExportName));
                        }
                        State::Skipping {
                            option,
                            remaining: len.into(),
                            reply: REP_ERR_TOO_BIG,
                        }
                    } else {
                        State::OptionData {
                            option,
                            len: len as usize,
                        }
                    };
                }
                State::Skipping {
                    option,
                    remaining,
                    reply,
                } => {
                    let n = remaining.min(input.len() as u64);
                    input.advance(n as usize);
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.state = State::Skipping {
                            option,
                            remaining,
                            reply,
                        };
                        return Status::NeedInput;
                    }
                    let message = if reply == REP_ERR_UNSUP {
                        format!("option {option} is not supported by this server")
                    } else {
                        format!("option {option} data is longer than {MAX_OPTION_DATA} bytes")
                    };
                    self.reply_error(option, reply, &message);
                    self.state = State::OptionHeader;
                }
                State::OptionData { option, len } => {
                    if input.len() < len {
                        return Status::NeedInput;
                    }
                    let data = input.split_to(len);
                    self.state = State::OptionHeader;
                    if let Some(status) = self.handle_option(option, &data, catalog) {
                        return status;
                    }
                }
            }
        }
    }

    fn close(&mut self, reason: CloseReason) -> Status {
        let status = Status::Close(reason);
        self.state = State::Finished(status.clone());
        status
    }

    /// Handle one complete option; `Some` ends the negotiation.
    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &mut dyn ExportCatalog,
    ) -> Option<Status> {
        match option {
            OPT_EXPORT_NAME => {
                let Some(name) = valid_string(data) else {
                    return Some(self.close(CloseReason::Violation(Violation::BadExportName)));
                };
                match catalog.select(name) {
                    Ok(export) => {
                        self.out.extend_from_slice(&export.size.to_be_bytes());
                        self.out
                            .extend_from_slice(&wire_flags(export.flags).to_be_bytes());
                        if self.client_flags & CLIENT_NO_ZEROES == 0 {
                            self.out.extend_from_slice(&[0u8; 124]);
                        }
                        Some(self.finish(export))
                    }
                    Err(refusal) => Some(self.close(CloseReason::Refused(refusal))),
                }
            }
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                Some(self.close(CloseReason::Aborted))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return None;
                }
                for name in catalog.list() {
                    let mut body = Vec::with_capacity(4 + name.len());
                    body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    body.extend_from_slice(name.as_bytes());
                    self.reply(option, REP_SERVER, &body);
                }
                self.reply(option, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(data) else {
                    self.reply_error(
                        option,
                        REP_ERR_INVALID,
                        "malformed NBD_OPT_INFO/NBD_OPT_GO data",
                    );
                    return None;
                };
                let result = if option == OPT_GO {
                    catalog.select(name)
                } else {
                    catalog.describe(name)
                };
                match result {
                    Ok(export) => {
                        self.send_infos(option, &export, &requests);
                        self.reply(option, REP_ACK, &[]);
                        if option == OPT_GO {
                            Some(self.finish(export))
                        } else {
                            None
                        }
                    }
                    Err(refusal) => {
                        let code = match refusal.kind {
                            RefusalKind::UnknownExport => REP_ERR_UNKNOWN,
                            RefusalKind::Policy => REP_ERR_POLICY,
                            RefusalKind::ShuttingDown => REP_ERR_SHUTDOWN,
                        };
                        self.reply_error(option, code, &refusal.message);
                        None
                    }
                }
            }
            _ => unreachable!("only known options reach handle_option"),
        }
    }

    fn finish(&mut self, export: ExportDetails) -> Status {
        let status = Status::Transmission(Negotiated {
            export,
            client_flags: self.client_flags,
        });
        self.state = State::Finished(status.clone());
        status
    }

    fn send_infos(&mut self, option: u32, export: &ExportDetails, requests: &[u16]) {
        let mut body = Vec::with_capacity(12);
        body.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        body.extend_from_slice(&export.size.to_be_bytes());
        body.extend_from_slice(&wire_flags(export.flags).to_be_bytes());
        self.reply(option, REP_INFO, &body);
        if requests.contains(&INFO_NAME) {
            let mut body = INFO_NAME.to_be_bytes().to_vec();
            body.extend_from_slice(truncate_str(&export.name).as_bytes());
            self.reply(option, REP_INFO, &body);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut body = INFO_DESCRIPTION.to_be_bytes().to_vec();
            body.extend_from_slice(truncate_str(&export.description).as_bytes());
            self.reply(option, REP_INFO, &body);
        }
        let b = export.block_sizes;
        let mut body = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [b.minimum, b.preferred, b.maximum] {
            body.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, REP_INFO, &body);
    }

    fn reply(&mut self, option: u32, reply_type: u32, body: &[u8]) {
        self.out
            .extend_from_slice(&encode_option_reply(option, reply_type, body));
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        self.reply(option, reply_type, truncate_str(message).as_bytes());
    }
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        OPT_EXPORT_NAME | OPT_ABORT | OPT_LIST | OPT_INFO | OPT_GO
    )
}

fn wire_flags(flags: u16) -> u16 {
    flags | TFLAG_HAS_FLAGS
}

/// A protocol string: UTF-8, no NUL, at most 4096 bytes.
fn valid_string(data: &[u8]) -> Option<&str> {
    if data.len() > MAX_STRING_LEN || data.contains(&0) {
        return None;
    }
    std::str::from_utf8(data).ok()
}

fn truncate_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `u32 name length, name, u16 count, count × u16`, consumed exactly.
fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut r = Reader::new(data);
    let name_len = r.u32().ok()? as usize;
    let name = valid_string(r.bytes(name_len).ok()?)?;
    let count = r.u16().ok()? as usize;
    let mut requests = Vec::with_capacity(count.min(16));
    let mut list = r.sub(count.checked_mul(2)?).ok()?;
    for _ in 0..count {
        requests.push(list.u16().ok()?);
    }
    r.finish().ok()?;
    Some((name, requests))
}

/// Encode one option reply: magic, option, type, length, body.
pub fn encode_option_reply(option: u32, reply_type: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + body.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The client's side of the handshake messages, for tests, fuzzers and
/// tools that play an NBD client.
pub mod client {
    use super::*;
    use crate::reader::Short;

    /// Encode a client option: `IHAVEOPT`, option, length, data.
    pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`.
    pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    /// The server greeting: returns the handshake flags.
    pub fn decode_greeting(buf: &[u8]) -> Result<u16, Short> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        let opt = r.u64()?;
        let flags = r.u16()?;
        r.finish()?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(Short::Trailing(0));
        }
        Ok(flags)
    }

    /// A decoded option reply.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct OptionReply {
        pub option: u32,
        pub reply_type: u32,
        pub body: Vec<u8>,
    }

    /// Take one option reply off the front of `buf`, if it is complete.
    /// `Err` means the magic is wrong.
    pub fn take_option_reply(buf: &mut BytesMut) -> Result<Option<OptionReply>, u64> {
        if buf.len() < 20 {
            return Ok(None);
        }
        let magic = u64::from_be_bytes(buf[0..8].try_into().expect("8 bytes"));
        if magic != OPTION_REPLY_MAGIC {
            return Err(magic);
        }
        let len = u32::from_be_bytes(buf[16..20].try_into().expect("4 bytes")) as usize;
        if buf.len() < 20 + len {
            return Ok(None);
        }
        let option = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
        let reply_type = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
        buf.advance(20);
        let body = buf.split_to(len).to_vec();
        Ok(Some(OptionReply {
            option,
            reply_type,
            body,
        }))
    }

    /// A decoded `NBD_REP_INFO` body.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Info {
        Export { size: u64, flags: u16 },
        Name(String),
        Description(String),
        BlockSize(BlockSizes),
        Other(u16),
    }

    pub fn decode_info(body: &[u8]) -> Result<Info, Short> {
        let mut r = Reader::new(body);
        let kind = r.u16()?;
        let info = match kind {
            INFO_EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            INFO_NAME => Info::Name(String::from_utf8_lossy(r.rest()).into_owned()),
            INFO_DESCRIPTION => Info::Description(String::from_utf8_lossy(r.rest()).into_owned()),
            INFO_BLOCK_SIZE => Info::BlockSize(BlockSizes {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            }),
            other => {
                r.rest();
                Info::Other(other)
            }
        };
        r.finish()?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;

    struct OneExport {
        refuse: Option<Refusal>,
        selected: usize,
    }

    fn details() -> ExportDetails {
        ExportDetails {
            name: "r0".into(),
            description: "Tandem resource r0".into(),
            size: 1 << 30,
            flags: TFLAG_SEND_FLUSH | TFLAG_SEND_FUA,
            block_sizes: BlockSizes::TANDEM,
        }
    }

    impl ExportCatalog for OneExport {
        fn list(&mut self) -> Vec<String> {
            vec!["r0".into()]
        }
        fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
            if name != "r0" && !name.is_empty() {
                return Err(Refusal {
                    kind: RefusalKind::UnknownExport,
                    message: format!("no export {name}"),
                });
            }
            match &self.refuse {
                Some(r) => Err(r.clone()),
                None => Ok(details()),
            }
        }
        fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
            let d = self.describe(name)?;
            self.selected += 1;
            Ok(d)
        }
    }

    fn start(flags: u32) -> (ServerHandshake, BytesMut) {
        let mut hs = ServerHandshake::new();
        let greeting = hs.take_output();
        assert_eq!(
            decode_greeting(&greeting).unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        let mut input = BytesMut::new();
        input.extend_from_slice(&flags.to_be_bytes());
        (hs, input)
    }

    fn replies(out: Vec<u8>) -> Vec<OptionReply> {
        let mut buf = BytesMut::from(&out[..]);
        let mut v = Vec::new();
        while let Some(r) = take_option_reply(&mut buf).unwrap() {
            v.push(r);
        }
        assert!(buf.is_empty());
        v
    }

    #[test]
    fn unknown_options_are_unsupported_and_negotiation_continues() {
        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        input.extend_from_slice(&encode_option(OPT_EXTENDED_HEADERS, &[]));
        input.extend_from_slice(&encode_option(OPT_STRUCTURED_REPLY, &[]));
        input.extend_from_slice(&encode_option(9999, &[1, 2, 3]));
        input.extend_from_slice(&encode_option(
            OPT_GO,
            &encode_info_request("r0", &[INFO_BLOCK_SIZE, INFO_NAME]),
        ));
        let status = hs.handle_input(&mut input, &mut cat);
        let Status::Transmission(n) = status else {
            panic!("{status:?}")
        };
        assert_eq!(n.export.size, 1 << 30);
        let r = replies(hs.take_output());
        assert_eq!(r[0].reply_type, REP_ERR_UNSUP);
        assert_eq!(r[1].reply_type, REP_ERR_UNSUP);
        assert_eq!(r[2].reply_type, REP_ERR_UNSUP);
        assert_eq!(
            decode_info(&r[3].body).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA
            }
        );
        assert_eq!(decode_info(&r[4].body).unwrap(), Info::Name("r0".into()));
        assert_eq!(
            decode_info(&r[5].body).unwrap(),
            Info::BlockSize(BlockSizes::TANDEM)
        );
        assert_eq!(r[6].reply_type, REP_ACK);
        assert_eq!(r.len(), 7);
        assert_eq!(cat.selected, 1);
    }

    #[test]
    fn byte_at_a_time_input_gives_the_same_result() {
        let (mut hs, first) = start(CLIENT_FIXED_NEWSTYLE);
        let mut all = first.to_vec();
        all.extend_from_slice(&encode_option(77, &[5u8; 100]));
        all.extend_from_slice(&encode_option(OPT_LIST, &[]));
        all.extend_from_slice(&encode_option(OPT_EXPORT_NAME, b"r0"));
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut last = Status::NeedInput;
        for b in all {
            input.extend_from_slice(&[b]);
            last = hs.handle_input(&mut input, &mut cat);
            out.extend(hs.take_output());
        }
        assert!(matches!(last, Status::Transmission(_)));
        // UNSUP, SERVER, ACK, then size + flags + 124 zeroes.
        let tail = &out[out.len() - (8 + 2 + 124)..];
        assert_eq!(u64::from_be_bytes(tail[0..8].try_into().unwrap()), 1 << 30);
    }

    #[test]
    fn refused_go_keeps_negotiating_and_export_name_refusal_closes() {
        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        let refusal = Refusal {
            kind: RefusalKind::Policy,
            message: "node beta is Secondary".into(),
        };
        let mut cat = OneExport {
            refuse: Some(refusal.clone()),
            selected: 0,
        };
        input.extend_from_slice(&encode_option(OPT_GO, &encode_info_request("", &[])));
        assert_eq!(hs.handle_input(&mut input, &mut cat), Status::NeedInput);
        let r = replies(hs.take_output());
        assert_eq!(r[0].reply_type, REP_ERR_POLICY);
        assert_eq!(r[0].body, b"node beta is Secondary");
        input.extend_from_slice(&encode_option(OPT_EXPORT_NAME, b""));
        assert_eq!(
            hs.handle_input(&mut input, &mut cat),
            Status::Close(CloseReason::Refused(refusal))
        );
        assert_eq!(cat.selected, 0);
    }

    #[test]
    fn malformed_info_request_is_invalid() {
        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE);
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        let mut data = encode_info_request("r0", &[1]);
        data.push(0); // trailing byte
        input.extend_from_slice(&encode_option(OPT_INFO, &data));
        input.extend_from_slice(&encode_option(OPT_LIST, &[1]));
        assert_eq!(hs.handle_input(&mut input, &mut cat), Status::NeedInput);
        let r = replies(hs.take_output());
        assert_eq!(r[0].reply_type, REP_ERR_INVALID);
        assert_eq!(r[1].reply_type, REP_ERR_INVALID);
    }

    #[test]
    fn oversized_options_are_skipped_without_buffering() {
        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE);
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        let len = (MAX_OPTION_DATA + 10) as u32;
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&OPT_GO.to_be_bytes());
        input.extend_from_slice(&len.to_be_bytes());
        assert_eq!(hs.handle_input(&mut input, &mut cat), Status::NeedInput);
        input.extend_from_slice(&vec![0u8; len as usize]);
        assert_eq!(hs.handle_input(&mut input, &mut cat), Status::NeedInput);
        assert!(input.is_empty());
        let r = replies(hs.take_output());
        assert_eq!(r[0].reply_type, REP_ERR_TOO_BIG);
    }

    /// Found by the `handshake` fuzz target (minimised input: client flags
    /// with unknown bits): a second call after `Close` or `Transmission`
    /// returned `NeedInput`, telling a driver to wait for more input on a
    /// session that is over.
    #[test]
    fn final_status_stays_final() {
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        let mut sessions = Vec::new();
        // Unknown client flags.
        sessions.push(start(0xa4_91_e6_a4));
        // ABORT.
        let (hs, mut input) = start(CLIENT_FIXED_NEWSTYLE);
        input.extend_from_slice(&encode_option(OPT_ABORT, &[]));
        sessions.push((hs, input));
        // GO, followed by the first transmission bytes.
        let (hs, mut input) = start(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        input.extend_from_slice(&encode_option(OPT_GO, &encode_info_request("r0", &[])));
        input.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        sessions.push((hs, input));
        for (mut hs, mut input) in sessions {
            let first = hs.handle_input(&mut input, &mut cat);
            assert_ne!(first, Status::NeedInput);
            hs.take_output();
            let left = input.len();
            for more in [&[][..], &[1, 2, 3][..]] {
                input.extend_from_slice(more);
                let before = input.len();
                assert_eq!(hs.handle_input(&mut input, &mut cat), first);
                assert_eq!(input.len(), before, "input consumed after {first:?}");
                assert!(hs.take_output().is_empty(), "output after {first:?}");
            }
            assert!(left <= 4);
        }
        assert_eq!(cat.selected, 1);
    }

    #[test]
    fn abort_bad_magic_and_bad_flags() {
        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE);
        let mut cat = OneExport {
            refuse: None,
            selected: 0,
        };
        input.extend_from_slice(&encode_option(OPT_ABORT, &[]));
        assert_eq!(
            hs.handle_input(&mut input, &mut cat),
            Status::Close(CloseReason::Aborted)
        );
        assert_eq!(replies(hs.take_output())[0].reply_type, REP_ACK);

        let (mut hs, mut input) = start(CLIENT_FIXED_NEWSTYLE);
        input.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            hs.handle_input(&mut input, &mut cat),
            Status::Close(CloseReason::Violation(Violation::BadOptionMagic(0)))
        ));

        let (mut hs, mut input) = start(1 << 7);
        assert!(matches!(
            hs.handle_input(&mut input, &mut cat),
            Status::Close(CloseReason::Violation(Violation::UnknownClientFlags(_)))
        ));
    }
}
