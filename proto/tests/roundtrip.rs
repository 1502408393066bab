//! Property tests of the NBD codec: every message with both an encoder and
//! a decoder round-trips, the handshake machine agrees with the client
//! helpers on every option, and no input, in any chunking, makes the
//! decoders panic or changes what the handshake does.

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;

use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::{
    Info, OptionReply, decode_greeting, decode_info, encode_info_request, encode_option,
    take_option_reply,
};
use tandem_proto::nbd::handshake::{
    BlockSizes, CloseReason, ExportCatalog, ExportDetails, MAX_OPTION_DATA, Refusal, RefusalKind,
    ServerHandshake, Status, encode_option_reply,
};
use tandem_proto::nbd::transmission::{
    Command, Decision, Limits, REQUEST_HEADER_LEN, RequestHeader, SIMPLE_REPLY_LEN, SimpleReply,
    validate,
};

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A catalog with one export, "r0" (also reachable as ""). "refused" is
/// refused by policy, "stopping" because of shutdown, anything else is
/// unknown. Every call is logged.
#[derive(Debug, Clone)]
struct Catalog {
    details: ExportDetails,
    log: Vec<String>,
}

impl Catalog {
    fn new(details: ExportDetails) -> Catalog {
        Catalog {
            details,
            log: Vec::new(),
        }
    }

    fn lookup(&self, name: &str) -> Result<ExportDetails, Refusal> {
        let refusal = |kind, message: &str| {
            Err(Refusal {
                kind,
                message: message.to_string(),
            })
        };
        match name {
            "" | "r0" => Ok(self.details.clone()),
            "refused" => refusal(RefusalKind::Policy, "node is Secondary"),
            "stopping" => refusal(RefusalKind::ShuttingDown, "going down"),
            _ => refusal(RefusalKind::UnknownExport, "no such export"),
        }
    }
}

impl ExportCatalog for Catalog {
    fn list(&mut self) -> Vec<String> {
        self.log.push("list".into());
        vec!["r0".into(), "backup".into()]
    }

    fn describe(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        self.log.push(format!("describe {name:?}"));
        self.lookup(name)
    }

    fn select(&mut self, name: &str) -> Result<ExportDetails, Refusal> {
        self.log.push(format!("select {name:?}"));
        self.lookup(name)
    }
}

fn r0() -> ExportDetails {
    ExportDetails {
        name: "r0".into(),
        description: "Tandem resource r0".into(),
        size: 1 << 30,
        flags: TFLAG_SEND_FLUSH | TFLAG_SEND_FUA,
        block_sizes: BlockSizes::TANDEM,
    }
}

/// What one handshake did.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    /// The first status other than `NeedInput`, or `NeedInput` if the input
    /// ran out first.
    status: Status,
    output: Vec<u8>,
    /// Input bytes the machine consumed.
    consumed: usize,
    log: Vec<String>,
}

/// Run a fresh handshake over `input`, fed in chunks of the given sizes
/// (the rest in one last chunk). Checks on the way that a `NeedInput` leaves
/// less than one step's worth of input unconsumed.
fn run(input: &[u8], chunks: &[usize], details: &ExportDetails) -> Outcome {
    let mut hs = ServerHandshake::new();
    let greeting = hs.take_output();
    assert_eq!(
        decode_greeting(&greeting),
        Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
    );
    let mut catalog = Catalog::new(details.clone());
    let mut buf = BytesMut::new();
    let mut output = Vec::new();
    let mut fed = 0;
    let mut status = Status::NeedInput;
    let mut sizes = chunks.iter().copied().chain(std::iter::once(usize::MAX));
    while fed < input.len() || fed == 0 {
        let n = sizes.next().unwrap().min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        status = hs.handle_input(&mut buf, &mut catalog);
        output.extend(hs.take_output());
        if status != Status::NeedInput {
            break;
        }
        // Whatever is left cannot make progress on its own: feeding no new
        // bytes changes nothing.
        assert!(
            buf.len() < MAX_OPTION_DATA.max(16),
            "{} bytes left buffered",
            buf.len()
        );
        let before = buf.len();
        assert_eq!(hs.handle_input(&mut buf, &mut catalog), Status::NeedInput);
        assert!(hs.take_output().is_empty());
        assert_eq!(buf.len(), before);
        if fed == input.len() {
            break;
        }
    }
    Outcome {
        status,
        output,
        consumed: fed - buf.len(),
        log: catalog.log,
    }
}

/// Split server output into option replies; everything must parse.
fn replies(output: &[u8]) -> Vec<OptionReply> {
    let mut buf = BytesMut::from(output);
    let mut v = Vec::new();
    while let Some(r) = take_option_reply(&mut buf).expect("reply magic") {
        v.push(r);
    }
    assert!(buf.is_empty(), "{} stray bytes", buf.len());
    v
}

/// A protocol string as the server sends it: at most 4096 bytes, cut at a
/// character boundary.
fn truncated(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > MAX_STRING_LEN {
            break;
        }
        out.push(c);
    }
    out
}

const CLIENT: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

fn with_flags(flags: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

// ---------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

fn header() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        prop_oneof![0u16..10, any::<u16>()],
        any::<u64>(),
        prop_oneof![0u64..(1 << 21), any::<u64>(), Just(u64::MAX)],
        prop_oneof![0u32..(1 << 21), any::<u32>()],
    )
        .prop_map(|(flags, command, cookie, offset, length)| RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop_oneof![0u64..(1 << 22), any::<u64>()],
        prop_oneof![0u32..(1 << 22), any::<u32>()],
        any::<u16>(),
    )
        .prop_map(|(export_size, max_payload, flags)| Limits {
            export_size,
            max_payload,
            flags,
        })
}

/// Strings of any characters, some longer than the protocol's 4096 bytes.
fn long_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,20}",
        vec(any::<char>(), 0..40).prop_map(String::from_iter),
        (1000usize..1400, any::<char>())
            .prop_map(|(n, c)| std::iter::repeat_n(c, n).collect::<String>()),
        (4090usize..4100, vec(any::<char>(), 0..3))
            .prop_map(|(n, tail)| { "a".repeat(n) + &String::from_iter(tail) }),
    ]
}

fn details() -> impl Strategy<Value = ExportDetails> {
    (
        long_string(),
        long_string(),
        any::<u64>(),
        any::<u16>(),
        any::<(u32, u32, u32)>(),
    )
        .prop_map(
            |(name, description, size, flags, (a, b, c))| ExportDetails {
                name,
                description,
                size,
                flags,
                block_sizes: BlockSizes {
                    minimum: a,
                    preferred: b,
                    maximum: c,
                },
            },
        )
}

/// Export names a client might ask for, valid or not.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("r0".to_string()),
        Just(String::new()),
        Just("refused".to_string()),
        Just("stopping".to_string()),
        "[a-z0-9\\x00]{0,8}",
        long_string(),
    ]
}

fn option_code() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(OPT_LIST),
        Just(OPT_INFO),
        Just(OPT_GO),
        Just(OPT_ABORT),
        Just(OPT_EXPORT_NAME),
        Just(OPT_STRUCTURED_REPLY),
        Just(OPT_EXTENDED_HEADERS),
        0u32..16,
        any::<u32>(),
    ]
}

/// One piece of client input: mostly well-formed options, sometimes not.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (option_code(), vec(any::<u8>(), 0..48))
            .prop_map(|(o, d)| encode_option(o, &d)),
        3 => (
            prop_oneof![Just(OPT_INFO), Just(OPT_GO)],
            name(),
            vec(prop_oneof![0u16..5, any::<u16>()], 0..5),
        )
            .prop_map(|(o, n, r)| encode_option(o, &encode_info_request(&n, &r))),
        1 => name().prop_map(|n| encode_option(OPT_EXPORT_NAME, n.as_bytes())),
        1 => Just(encode_option(OPT_LIST, &[])),
        1 => vec(any::<u8>(), 0..24),
        // An option header claiming any length, with little data after it.
        1 => (option_code(), prop_oneof![any::<u32>(), (MAX_OPTION_DATA as u32 - 2)..(MAX_OPTION_DATA as u32 + 2)])
            .prop_map(|(o, len)| {
                let mut v = IHAVEOPT.to_be_bytes().to_vec();
                v.extend_from_slice(&o.to_be_bytes());
                v.extend_from_slice(&len.to_be_bytes());
                v
            }),
    ]
}

/// A whole client stream: flags, then segments.
fn client_input() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            4 => Just(CLIENT),
            2 => Just(CLIENT_FIXED_NEWSTYLE),
            1 => Just(0u32),
            1 => any::<u32>(),
        ],
        vec(segment(), 0..8),
    )
        .prop_map(|(flags, segs)| with_flags(flags, &segs.concat()))
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1usize..4, 1usize..64, 0usize..600], 0..40)
}

// ---------------------------------------------------------------------------
// Transmission messages.
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn request_header_round_trips(h in header()) {
        let raw = h.encode();
        prop_assert_eq!(raw.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(RequestHeader::decode(&raw), Ok(h));
    }

    #[test]
    fn request_header_decode_never_panics(raw in any::<[u8; REQUEST_HEADER_LEN]>()) {
        let magic = u32::from_be_bytes(raw[0..4].try_into().unwrap());
        match RequestHeader::decode(&raw) {
            Ok(h) => {
                prop_assert_eq!(magic, REQUEST_MAGIC);
                prop_assert_eq!(h.encode(), raw);
            }
            Err(e) => {
                prop_assert_ne!(magic, REQUEST_MAGIC);
                prop_assert_eq!(e.0, magic);
            }
        }
    }

    #[test]
    fn simple_reply_round_trips(cookie in any::<u64>(), error in proptest::option::of(error_code())) {
        let r = SimpleReply { cookie, error };
        let raw = r.encode();
        prop_assert_eq!(raw.len(), SIMPLE_REPLY_LEN);
        prop_assert_eq!(SimpleReply::decode(&raw), Ok(r));
    }

    #[test]
    fn simple_reply_decode_never_panics(raw in any::<[u8; SIMPLE_REPLY_LEN]>()) {
        let magic = u32::from_be_bytes(raw[0..4].try_into().unwrap());
        match SimpleReply::decode(&raw) {
            Ok(r) => {
                prop_assert_eq!(magic, SIMPLE_REPLY_MAGIC);
                prop_assert_eq!(r.cookie, u64::from_be_bytes(raw[8..16].try_into().unwrap()));
                let wire = u32::from_be_bytes(raw[4..8].try_into().unwrap());
                prop_assert_eq!(r.error.is_none(), wire == 0);
            }
            Err(m) => prop_assert_eq!(m, magic),
        }
    }

    /// `validate` never panics, and whatever it decides is consistent with
    /// the header, the limits and the rules in the module docs.
    #[test]
    fn validate_never_panics_and_keeps_its_rules(h in header(), l in limits()) {
        let decision = validate(&h, &l);
        let negotiated = |f: u16| l.flags & f != 0;
        let in_range = h.offset.checked_add(h.length.into()).is_some_and(|e| e <= l.export_size);
        match decision {
            Decision::Close(_) => {
                prop_assert_eq!(h.command, CMD_WRITE);
                prop_assert!(h.length > l.max_payload);
            }
            Decision::Reject { discard, .. } => {
                prop_assert_eq!(discard, h.payload_len());
                prop_assert!(discard <= l.max_payload);
            }
            Decision::Execute(c) => {
                prop_assert!(h.command <= CMD_WRITE_ZEROES);
                prop_assert!(h.flags & CMD_FLAG_FUA == 0 || negotiated(TFLAG_SEND_FUA));
                let fua = h.flags & CMD_FLAG_FUA != 0;
                let (offset, length) = (h.offset, h.length);
                let writes = matches!(c, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                prop_assert!(!(writes && negotiated(TFLAG_READ_ONLY)));
                match c {
                    Command::Read { .. } => {
                        prop_assert_eq!(c, Command::Read { offset, length });
                        prop_assert!(in_range && length <= l.max_payload);
                    }
                    Command::Write { .. } => {
                        prop_assert_eq!(c, Command::Write { offset, length, fua });
                        prop_assert!(in_range && length <= l.max_payload);
                    }
                    Command::Disconnect => prop_assert_eq!(h.command, CMD_DISC),
                    Command::Flush => {
                        prop_assert_eq!(h.command, CMD_FLUSH);
                        prop_assert!(negotiated(TFLAG_SEND_FLUSH));
                    }
                    Command::Trim { .. } => {
                        prop_assert_eq!(c, Command::Trim { offset, length, fua });
                        prop_assert!(in_range && negotiated(TFLAG_SEND_TRIM));
                    }
                    Command::Cache { .. } => {
                        prop_assert_eq!(c, Command::Cache { offset, length });
                        prop_assert!(in_range && negotiated(TFLAG_SEND_CACHE));
                    }
                    Command::WriteZeroes { .. } => {
                        let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
                        let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
                        prop_assert_eq!(c, Command::WriteZeroes { offset, length, fua, no_hole, fast });
                        prop_assert!(in_range && negotiated(TFLAG_SEND_WRITE_ZEROES));
                        prop_assert!(!fast || negotiated(TFLAG_SEND_FAST_ZERO));
                        prop_assert_eq!(h.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO), 0);
                    }
                }
                if !matches!(c, Command::WriteZeroes { .. }) {
                    prop_assert_eq!(h.flags & !CMD_FLAG_FUA, 0);
                }
            }
        }
    }

    /// Decoding the bytes of a valid header and validating it agrees with
    /// validating the header itself: the wire adds nothing.
    #[test]
    fn decode_then_validate_matches(h in header(), l in limits()) {
        let decoded = RequestHeader::decode(&h.encode()).unwrap();
        prop_assert_eq!(validate(&decoded, &l), validate(&h, &l));
    }
}

// ---------------------------------------------------------------------------
// Option replies and info bodies.
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn option_replies_round_trip_in_any_chunking(
        msgs in vec((any::<u32>(), any::<u32>(), vec(any::<u8>(), 0..300)), 0..6),
        cuts in chunks(),
    ) {
        let wire: Vec<u8> = msgs.iter().flat_map(|(o, t, b)| encode_option_reply(*o, *t, b)).collect();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut fed = 0;
        let mut sizes = cuts.iter().copied().chain(std::iter::repeat(usize::MAX));
        while fed < wire.len() {
            let n = sizes.next().unwrap().min(wire.len() - fed);
            buf.extend_from_slice(&wire[fed..fed + n]);
            fed += n;
            while let Some(r) = take_option_reply(&mut buf).unwrap() {
                got.push(r);
            }
        }
        prop_assert!(buf.is_empty());
        let want: Vec<OptionReply> = msgs
            .into_iter()
            .map(|(option, reply_type, body)| OptionReply { option, reply_type, body })
            .collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn take_option_reply_never_panics(bytes in vec(any::<u8>(), 0..100)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = take_option_reply(&mut buf) {}
    }

    #[test]
    fn decode_info_and_greeting_never_panic(bytes in vec(any::<u8>(), 0..40)) {
        let _ = decode_info(&bytes);
        let _ = decode_greeting(&bytes);
    }

    /// Every info the server sends for any export decodes to the export's
    /// details (strings cut to 4096 bytes at a character boundary).
    #[test]
    fn info_bodies_round_trip(
        d in details(),
        go in any::<bool>(),
        requests in vec(prop_oneof![0u16..4, any::<u16>()], 0..6),
    ) {
        let option = if go { OPT_GO } else { OPT_INFO };
        let input = with_flags(CLIENT, &encode_option(option, &encode_info_request("r0", &requests)));
        let out = run(&input, &[], &d);
        let r = replies(&out.output);
        let (last, infos) = r.split_last().unwrap();
        prop_assert_eq!((last.option, last.reply_type), (option, REP_ACK));
        let infos: Vec<Info> = infos
            .iter()
            .map(|r| {
                assert_eq!((r.option, r.reply_type), (option, REP_INFO));
                decode_info(&r.body).expect("info decodes")
            })
            .collect();
        let mut want = vec![Info::Export { size: d.size, flags: d.flags | TFLAG_HAS_FLAGS }];
        if requests.contains(&INFO_NAME) {
            want.push(Info::Name(truncated(&d.name)));
        }
        if requests.contains(&INFO_DESCRIPTION) {
            want.push(Info::Description(truncated(&d.description)));
        }
        want.push(Info::BlockSize(d.block_sizes));
        prop_assert_eq!(infos, want);
        if go {
            prop_assert_eq!(out.status, Status::Transmission(tandem_proto::nbd::handshake::Negotiated {
                export: d,
                client_flags: CLIENT,
            }));
            prop_assert_eq!(out.log, vec!["select \"r0\"".to_string()]);
        } else {
            prop_assert_eq!(out.status, Status::NeedInput);
            prop_assert_eq!(out.log, vec!["describe \"r0\"".to_string()]);
        }
        prop_assert_eq!(out.consumed, input.len());
    }
}

// ---------------------------------------------------------------------------
// Option requests: client encoder → server parser.
// ---------------------------------------------------------------------------

/// What a valid name is on the wire: UTF-8 (always, from a `&str`), no NUL,
/// at most 4096 bytes.
fn valid_name(n: &str) -> bool {
    n.len() <= MAX_STRING_LEN && !n.contains('\0')
}

proptest! {
    /// `encode_info_request` → the server's parser: the catalog sees exactly
    /// the name sent, and the server answers exactly the infos requested.
    #[test]
    fn info_requests_reach_the_catalog_intact(
        n in name(),
        requests in vec(prop_oneof![0u16..4, any::<u16>()], 0..6),
        go in any::<bool>(),
    ) {
        let option = if go { OPT_GO } else { OPT_INFO };
        let input = with_flags(CLIENT, &encode_option(option, &encode_info_request(&n, &requests)));
        let out = run(&input, &[], &r0());
        prop_assert_eq!(out.consumed, input.len());
        let r = replies(&out.output);
        if !valid_name(&n) {
            prop_assert!(out.log.is_empty());
            prop_assert_eq!(r.len(), 1);
            prop_assert_eq!((r[0].option, r[0].reply_type), (option, REP_ERR_INVALID));
            prop_assert_eq!(out.status, Status::NeedInput);
            return Ok(());
        }
        let verb = if go { "select" } else { "describe" };
        prop_assert_eq!(out.log, vec![format!("{verb} {n:?}")]);
        let last = r.last().unwrap();
        prop_assert_eq!(last.option, option);
        let want_type = match n.as_str() {
            "" | "r0" => REP_ACK,
            "refused" => REP_ERR_POLICY,
            "stopping" => REP_ERR_SHUTDOWN,
            _ => REP_ERR_UNKNOWN,
        };
        prop_assert_eq!(last.reply_type, want_type);
        if want_type == REP_ACK {
            let names = r.iter().filter(|r| decode_info(&r.body).ok() == Some(Info::Name("r0".into()))).count();
            prop_assert_eq!(names, usize::from(requests.contains(&INFO_NAME)));
            prop_assert_eq!(out.status != Status::NeedInput, go);
        } else {
            prop_assert_eq!(r.len(), 1);
            prop_assert_eq!(out.status, Status::NeedInput);
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: the catalog sees exactly the name; the answer
    /// is size, flags and 124 zeroes unless NO_ZEROES was agreed.
    #[test]
    fn export_name_reaches_the_catalog_intact(n in name(), no_zeroes in any::<bool>(), d in details()) {
        let flags = if no_zeroes { CLIENT } else { CLIENT_FIXED_NEWSTYLE };
        let input = with_flags(flags, &encode_option(OPT_EXPORT_NAME, n.as_bytes()));
        let out = run(&input, &[], &d);
        if !valid_name(&n) {
            prop_assert!(matches!(out.status, Status::Close(CloseReason::Violation(_))));
            prop_assert!(out.output.is_empty());
            prop_assert!(out.log.is_empty());
            return Ok(());
        }
        prop_assert_eq!(&out.log, &vec![format!("select {n:?}")]);
        if n.is_empty() || n == "r0" {
            let mut want = d.size.to_be_bytes().to_vec();
            want.extend_from_slice(&(d.flags | TFLAG_HAS_FLAGS).to_be_bytes());
            if !no_zeroes {
                want.extend_from_slice(&[0; 124]);
            }
            prop_assert_eq!(out.output, want);
            prop_assert!(matches!(out.status, Status::Transmission(_)));
        } else {
            prop_assert!(out.output.is_empty());
            prop_assert!(matches!(out.status, Status::Close(CloseReason::Refused(_))));
        }
    }

    /// Options the server does not know, with any data, are answered
    /// ERR_UNSUP and negotiation goes on; LIST names every export.
    #[test]
    fn unknown_options_and_list(options in vec((any::<u32>(), vec(any::<u8>(), 0..64)), 0..6)) {
        let known = [OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO];
        let options: Vec<_> = options.into_iter().filter(|(o, _)| !known.contains(o)).collect();
        let mut input = with_flags(CLIENT, &[]);
        for (o, d) in &options {
            input.extend(encode_option(*o, d));
        }
        input.extend(encode_option(OPT_LIST, &[]));
        let out = run(&input, &[], &r0());
        prop_assert_eq!(out.status, Status::NeedInput);
        prop_assert_eq!(out.consumed, input.len());
        let r = replies(&out.output);
        prop_assert_eq!(r.len(), options.len() + 3);
        for ((o, _), reply) in options.iter().zip(&r) {
            prop_assert_eq!((reply.option, reply.reply_type), (*o, REP_ERR_UNSUP));
            prop_assert!(std::str::from_utf8(&reply.body).is_ok());
        }
        let list = &r[options.len()..];
        let entry = |n: &str| {
            let mut b = (n.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(n.as_bytes());
            b
        };
        prop_assert_eq!(&list[0], &OptionReply { option: OPT_LIST, reply_type: REP_SERVER, body: entry("r0") });
        prop_assert_eq!(&list[1], &OptionReply { option: OPT_LIST, reply_type: REP_SERVER, body: entry("backup") });
        prop_assert_eq!(&list[2], &OptionReply { option: OPT_LIST, reply_type: REP_ACK, body: vec![] });
    }
}

// ---------------------------------------------------------------------------
// Arbitrary input and chunking.
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random bytes (in random chunks) never panic the handshake, and every
    /// byte it sends is a well-formed option reply or an EXPORT_NAME answer.
    #[test]
    fn handshake_survives_random_bytes(bytes in vec(any::<u8>(), 0..200), cuts in chunks()) {
        let out = run(&bytes, &cuts, &r0());
        prop_assert!(out.consumed <= bytes.len());
        if !matches!(out.status, Status::Transmission(_)) {
            replies(&out.output);
        }
    }

    /// Mostly well-formed client streams, fed whole and in random chunks:
    /// same status, same output, same bytes consumed, same catalog calls.
    #[test]
    fn chunking_never_changes_a_handshake(input in client_input(), cuts in chunks()) {
        let whole = run(&input, &[], &r0());
        let bytewise = run(&input, &vec![1; input.len()], &r0());
        let chunked = run(&input, &cuts, &r0());
        prop_assert_eq!(&chunked, &whole);
        prop_assert_eq!(&bytewise, &whole);
        // Unless EXPORT_NAME ended it (its answer is not an option reply),
        // everything sent is a well-formed option reply.
        if !matches!(whole.status, Status::Transmission(_)) {
            replies(&whole.output);
        }
        prop_assert!(whole.consumed <= input.len());
    }

    /// Over-long options are skipped however they are chunked, without
    /// leaving more than one option's worth of input buffered.
    #[test]
    fn oversized_options_are_skipped(
        extra in 1usize..5000,
        option in prop_oneof![Just(OPT_GO), Just(OPT_INFO), Just(OPT_LIST), any::<u32>()],
        cuts in vec(1usize..20_000, 0..10),
    ) {
        prop_assume!(option != OPT_EXPORT_NAME && option != OPT_ABORT);
        let len = MAX_OPTION_DATA + extra;
        let mut input = with_flags(CLIENT, &encode_option(option, &vec![0x41; len]));
        input.extend(encode_option(OPT_ABORT, &[]));
        let whole = run(&input, &[], &r0());
        prop_assert_eq!(&run(&input, &cuts, &r0()), &whole);
        prop_assert_eq!(&whole.status, &Status::Close(CloseReason::Aborted));
        let r = replies(&whole.output);
        prop_assert_eq!(r.len(), 2);
        prop_assert_eq!(r[0].option, option);
        prop_assert!(r[0].reply_type == REP_ERR_TOO_BIG || r[0].reply_type == REP_ERR_UNSUP);
        prop_assert_eq!((r[1].option, r[1].reply_type), (OPT_ABORT, REP_ACK));
    }
}
