//! Integration tests of the NBD server over real TCP and unix sockets.
//!
//! Every test drives the server with the client in `common`, synchronises
//! with it through the in-memory export's gates (never sleeps), and bounds
//! every wait with a timeout so a hang fails instead of stalling the suite.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tandem_nbd::{BlockSizes, BoundAddr, ErrorCode, Listen, NbdServer, ServerLimits, ZeroFlags};
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::{Info, encode_info_request, encode_option};
use tandem_proto::nbd::transmission::RequestHeader;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use common::*;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Handshake.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_with_info_requests_describes_the_export() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        let hs = Handshake::start(&addr).await;
        let (mut c, infos) = hs
            .go(EXPORT_NAME, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])
            .await
            .expect("GO accepted");
        assert_eq!(
            infos,
            vec![
                Info::Export {
                    size: 4 * MIB,
                    flags: EXPECTED_FLAGS
                },
                Info::Name(EXPORT_NAME.into()),
                Info::Description(DESCRIPTION.into()),
                Info::BlockSize(BlockSizes {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 32 << 20
                }),
            ]
        );
        assert_eq!((c.size, c.flags), (4 * MIB, EXPECTED_FLAGS));
        let got = c.read(1000, 3000).await;
        assert_eq!(&got[..], &ts.export.contents(1000, 3000)[..]);
        c.disconnect().await;
    }
    ts.export.wait_attached(0).await;
    assert_eq!(ts.export.attaches(), 2);
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_is_sent_even_when_not_requested() {
    let ts = TestServer::default().await;
    let hs = Handshake::start(&ts.tcp).await;
    let (c, infos) = hs.go("", &[]).await.unwrap();
    assert_eq!(
        infos,
        vec![
            Info::Export {
                size: 4 * MIB,
                flags: EXPECTED_FLAGS
            },
            Info::BlockSize(BlockSizes::TANDEM),
        ]
    );
    // Unknown info requests are ignored.
    let hs = Handshake::start(&ts.unix).await;
    let (c2, infos) = hs.go("", &[INFO_NAME, 77, 0xffff]).await.unwrap();
    assert_eq!(infos.len(), 3);
    assert!(infos.contains(&Info::Name(EXPORT_NAME.into())));
    c.disconnect().await;
    c2.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_then_go() {
    let ts = TestServer::default().await;
    let mut hs = Handshake::start(&ts.tcp).await;
    let infos = hs
        .info_or_go(OPT_INFO, "", &[INFO_NAME, INFO_DESCRIPTION])
        .await
        .expect("INFO answered");
    assert_eq!(
        infos,
        vec![
            Info::Export {
                size: 4 * MIB,
                flags: EXPECTED_FLAGS
            },
            Info::Name(EXPORT_NAME.into()),
            Info::Description(DESCRIPTION.into()),
            Info::BlockSize(BlockSizes::TANDEM),
        ]
    );
    // INFO has no side effect: nobody is attached.
    assert_eq!(ts.export.attaches(), 0);
    // INFO twice is fine too.
    hs.info_or_go(OPT_INFO, EXPORT_NAME, &[]).await.unwrap();
    let (mut c, _) = hs.go(EXPORT_NAME, &[]).await.expect("GO accepted");
    assert_eq!(ts.export.attached(), 1);
    c.write(0, &data(1, 512)).await;
    c.disconnect().await;
    ts.export.wait_attached(0).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_with_and_without_no_zeroes() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        for zeroes in [true, false] {
            let flags = if zeroes {
                CLIENT_FIXED_NEWSTYLE
            } else {
                CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES
            };
            let hs = Handshake::start_with(&addr, flags).await;
            let (mut c, raw) = hs.export_name(EXPORT_NAME, zeroes).await;
            assert_eq!(raw.len(), if zeroes { 134 } else { 10 });
            assert_eq!((c.size, c.flags), (4 * MIB, EXPECTED_FLAGS));
            assert!(raw[10..].iter().all(|&b| b == 0));
            // The next bytes are a well-framed reply: nothing extra was sent.
            let d = data(2, 4096);
            c.write(8192, &d).await;
            assert_eq!(&c.read(8192, 4096).await[..], &d[..]);
            c.disconnect().await;
        }
    }
    // The empty name means the export too.
    let hs = Handshake::start(&ts.tcp).await;
    let (c, _) = hs.export_name("", false).await;
    assert_eq!(c.size, 4 * MIB);
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_names_the_export_and_negotiation_continues() {
    let ts = TestServer::default().await;
    let mut hs = Handshake::start(&ts.unix).await;
    hs.send_option(OPT_LIST, &[]).await;
    let r = hs.reply().await;
    assert_eq!((r.option, r.reply_type), (OPT_LIST, REP_SERVER));
    let mut want = 2u32.to_be_bytes().to_vec();
    want.extend_from_slice(EXPORT_NAME.as_bytes());
    assert_eq!(r.body, want);
    let r = hs.reply().await;
    assert_eq!((r.option, r.reply_type), (OPT_LIST, REP_ACK));
    // LIST with data is invalid, and negotiation still goes on.
    hs.send_option(OPT_LIST, b"x").await;
    assert_eq!(hs.reply().await.reply_type, REP_ERR_INVALID);
    let (c, _) = hs.go(EXPORT_NAME, &[]).await.unwrap();
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_acknowledged_then_closed() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        let mut hs = Handshake::start(&addr).await;
        hs.send_option(OPT_ABORT, &[]).await;
        let r = hs.reply().await;
        assert_eq!((r.option, r.reply_type), (OPT_ABORT, REP_ACK));
        assert!(read_to_close(&mut hs.s).await.is_empty());
    }
    assert_eq!(ts.export.attaches(), 0);
    check_serving(&ts.tcp, 1).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_unsupported_and_negotiation_continues() {
    let ts = TestServer::default().await;
    let mut hs = Handshake::start(&ts.tcp).await;
    let options = [
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_EXTENDED_HEADERS, vec![]),
        (OPT_STARTTLS, vec![]),
        (OPT_LIST_META_CONTEXT, encode_info_request("r0", &[])),
        (OPT_SET_META_CONTEXT, vec![1, 2, 3]),
        (4242, vec![9; 1000]),
        (u32::MAX, vec![]),
    ];
    for (option, body) in &options {
        hs.send_option(*option, body).await;
        let r = hs.reply().await;
        assert_eq!((r.option, r.reply_type), (*option, REP_ERR_UNSUP));
        assert!(std::str::from_utf8(&r.body).is_ok());
    }
    // Structured replies were refused, so transmission uses simple replies
    // (the client checks the magic of every reply).
    let (mut c, _) = hs.go(EXPORT_NAME, &[]).await.unwrap();
    let d = data(3, 4096);
    c.write(0, &d).await;
    assert_eq!(&c.read(0, 4096).await[..], &d[..]);
    assert!(c.call(CMD_READ, 0, 5 * MIB, 512).await.error.is_some());
    c.disconnect().await;
    still_serving(&ts, 110).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_is_err_policy_with_the_message() {
    let ts = TestServer::default().await;
    let msg = "node beta is Secondary; connect to alpha";
    ts.export.refuse(Some(msg));
    let mut hs = Handshake::start(&ts.unix).await;
    for option in [OPT_INFO, OPT_GO] {
        let err = hs
            .info_or_go(option, EXPORT_NAME, &[INFO_NAME])
            .await
            .expect_err("refused");
        assert_eq!(err.reply_type, REP_ERR_POLICY);
        assert_eq!(err.body, msg.as_bytes());
    }
    assert_eq!(ts.export.attaches(), 0);
    // The refusal lifts (the node became Primary): same session goes on.
    ts.export.refuse(None);
    let (mut c, _) = hs.go(EXPORT_NAME, &[]).await.expect("GO accepted");
    c.write(0, &data(4, 512)).await;
    c.disconnect().await;

    // EXPORT_NAME has no way to carry the refusal: the server just closes.
    ts.export.refuse(Some(msg));
    for addr in ts.addrs() {
        let mut hs = Handshake::start(&addr).await;
        hs.send_option(OPT_EXPORT_NAME, EXPORT_NAME.as_bytes())
            .await;
        assert!(read_to_close(&mut hs.s).await.is_empty());
    }
    assert_eq!(ts.export.attaches(), 1);
    ts.export.refuse(None);
    check_serving(&ts.tcp, 2).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_names_empty_real_and_wrong() {
    let ts = TestServer::default().await;
    for name in ["", EXPORT_NAME] {
        let mut hs = Handshake::start(&ts.tcp).await;
        let infos = hs.info_or_go(OPT_INFO, name, &[INFO_NAME]).await.unwrap();
        assert!(infos.contains(&Info::Name(EXPORT_NAME.into())));
        let (c, _) = hs.go(name, &[]).await.expect("GO accepted");
        c.disconnect().await;
    }
    let mut hs = Handshake::start(&ts.tcp).await;
    for option in [OPT_INFO, OPT_GO] {
        let err = hs.info_or_go(option, "r1", &[]).await.unwrap_err();
        assert_eq!(err.reply_type, REP_ERR_UNKNOWN);
        assert!(String::from_utf8(err.body).unwrap().contains("r1"));
    }
    // Malformed info requests are invalid, and the session continues.
    let mut bad = encode_info_request(EXPORT_NAME, &[INFO_NAME]);
    bad.push(0);
    hs.send_option(OPT_GO, &bad).await;
    assert_eq!(hs.reply().await.reply_type, REP_ERR_INVALID);
    hs.send_option(OPT_GO, &[0, 0]).await;
    assert_eq!(hs.reply().await.reply_type, REP_ERR_INVALID);
    let (c, _) = hs.go(EXPORT_NAME, &[]).await.unwrap();
    c.disconnect().await;
    // A wrong name with EXPORT_NAME ends the session.
    let mut hs = Handshake::start(&ts.unix).await;
    hs.send_option(OPT_EXPORT_NAME, b"r1").await;
    assert!(read_to_close(&mut hs.s).await.is_empty());
    assert_eq!(ts.export.attaches(), 3);
    check_serving(&ts.unix, 3).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_with_go_in_one_write_are_served() {
    let ts = TestServer::default().await;
    let mut hs = Handshake::start(&ts.tcp).await;
    let d = data(5, 4096);
    let header = |command, cookie, offset, length| {
        RequestHeader {
            flags: 0,
            command,
            cookie,
            offset,
            length,
        }
        .encode()
    };
    let mut msg = encode_option(OPT_GO, &encode_info_request("", &[]));
    msg.extend_from_slice(&header(CMD_WRITE, 1, 4096, 4096));
    msg.extend_from_slice(&d);
    msg.extend_from_slice(&header(CMD_READ, 2, 65536, 4096));
    msg.extend_from_slice(&header(CMD_DISC, 3, 0, 0));
    hs.s.write_all(&msg).await.unwrap();
    loop {
        let r = hs.reply().await;
        if r.reply_type == REP_ACK {
            break;
        }
        assert_eq!(r.reply_type, REP_INFO);
    }
    let mut rest = hs.take_buffered();
    rest.extend(read_to_close(&mut hs.s).await);
    // The write's reply (16 bytes) and the read's (16 + 4096), in
    // completion order.
    assert_eq!(rest.len(), 16 + 16 + 4096);
    let first = u64::from_be_bytes(rest[8..16].try_into().unwrap());
    let read_at = if first == 1 { 16 } else { 0 };
    let write_at = if read_at == 0 { 16 + 4096 } else { 0 };
    let cookie = |at: usize| u64::from_be_bytes(rest[at + 8..at + 16].try_into().unwrap());
    assert_eq!((cookie(read_at), cookie(write_at)), (2, 1));
    assert_eq!(
        &rest[read_at + 16..read_at + 16 + 4096],
        &ts.export.contents(65536, 4096)[..]
    );
    assert_eq!(ts.export.contents(4096, 4096), d);
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertised_maximum_block_size_is_accepted() {
    // A server configured with a smaller payload limit than the export's
    // block sizes must not advertise more than it accepts.
    let limits = ServerLimits {
        max_payload: MIB as u32,
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(8 * MIB), limits).await;
    let hs = Handshake::start(&ts.tcp).await;
    let (mut c, infos) = hs.go(EXPORT_NAME, &[INFO_BLOCK_SIZE]).await.unwrap();
    let b = infos
        .iter()
        .find_map(|i| match i {
            Info::BlockSize(b) => Some(*b),
            _ => None,
        })
        .unwrap();
    assert!(b.maximum <= MIB as u32, "advertised {b:?}");
    assert!(
        b.minimum <= b.preferred && b.preferred <= b.maximum,
        "{b:?}"
    );
    let d = data(6, b.maximum as usize);
    c.write(0, &d).await;
    assert_eq!(&c.read(0, b.maximum).await[..], &d[..]);
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_files_on_start_and_failed_start() {
    let dir = TempDir::new();
    let sock = dir.path().join("r0.sock");
    let export = MemExport::new(MIB);
    let unix = |p: &std::path::Path| Listen::Unix(p.to_path_buf());

    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = NbdServer::start(export.clone(), &[unix(&sock)], ServerLimits::default())
        .await
        .expect("stale socket replaced");
    check_serving(&BoundAddr::Unix(sock.clone()), 1).await;
    server.shutdown().await;
    assert!(!sock.exists());

    // A socket a live server accepts on is never taken over: the first
    // server keeps serving.
    let first = NbdServer::start(export.clone(), &[unix(&sock)], ServerLimits::default())
        .await
        .expect("first server");
    let err = NbdServer::start(export.clone(), &[unix(&sock)], ServerLimits::default())
        .await
        .err()
        .expect("second server refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains("another server"), "{err}");
    check_serving(&BoundAddr::Unix(sock.clone()), 1).await;
    first.shutdown().await;
    assert!(!sock.exists());

    // Any other file is refused and left alone.
    let file = dir.path().join("data");
    std::fs::write(&file, b"keep me").unwrap();
    let err = NbdServer::start(export.clone(), &[unix(&file)], ServerLimits::default())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A failure on a later endpoint binds nothing: the unix socket bound
    // before it is not left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = NbdServer::start(
        export.clone(),
        &[unix(&sock), Listen::Tcp(addr)],
        ServerLimits::default(),
    )
    .await
    .err()
    .expect("address in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(!sock.exists(), "socket file left by a failed start");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
}

// ---------------------------------------------------------------------------
// Commands.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command() {
    let ts = TestServer::default().await;
    let e = ts.export.clone();
    let mut c = client(&ts.unix).await;

    // READ of untouched data, WRITE, READ back.
    assert_eq!(&c.read(0, 4096).await[..], &e.contents(0, 4096)[..]);
    let d = data(7, 8192);
    c.write(4096, &d).await;
    assert_eq!(&c.read(4096, 8192).await[..], &d[..]);
    assert_eq!(
        e.ops().last(),
        Some(&Op::Read {
            offset: 4096,
            length: 8192
        })
    );

    // FUA is passed through on writes.
    for (flags, fua) in [(0, false), (CMD_FLAG_FUA, true)] {
        let cookie = c.tx.write(65536, &d[..512], flags).await;
        let r = c.rx.reply().await;
        assert_eq!(r.cookie, cookie);
        r.ok();
        assert_eq!(
            e.ops().last(),
            Some(&Op::Write {
                offset: 65536,
                length: 512,
                fua
            })
        );
    }

    // FLUSH (FUA is allowed on any command once negotiated).
    for flags in [0, CMD_FLAG_FUA] {
        c.call(CMD_FLUSH, flags, 0, 0).await.ok();
        assert_eq!(e.ops().last(), Some(&Op::Flush));
    }

    // TRIM, with and without FUA.
    for (flags, fua) in [(0, false), (CMD_FLAG_FUA, true)] {
        c.call(CMD_TRIM, flags, 4096, 4096).await.ok();
        assert_eq!(
            e.ops().last(),
            Some(&Op::Trim {
                offset: 4096,
                length: 4096,
                fua
            })
        );
    }
    assert_eq!(&c.read(4096, 4096).await[..], &[0u8; 4096][..]);

    // WRITE_ZEROES: every flag combination reaches the export.
    for bits in 0..8u16 {
        let fua = bits & 1 != 0;
        let no_hole = bits & 2 != 0;
        let fast = bits & 4 != 0;
        let mut flags = 0;
        if fua {
            flags |= CMD_FLAG_FUA;
        }
        if no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if fast {
            flags |= CMD_FLAG_FAST_ZERO;
        }
        c.write(8192, &d[..4096]).await;
        c.call(CMD_WRITE_ZEROES, flags, 8192, 4096).await.ok();
        assert_eq!(
            e.ops().last(),
            Some(&Op::WriteZeroes {
                offset: 8192,
                length: 4096,
                flags: ZeroFlags { fua, no_hole, fast }
            })
        );
        assert_eq!(&c.read(8192, 4096).await[..], &[0u8; 4096][..]);
    }

    // CACHE is answered without touching the export.
    let before = e.ops().len();
    c.call(CMD_CACHE, 0, 0, 65536).await.ok();
    c.call(CMD_CACHE, CMD_FLAG_FUA, 4 * MIB - 512, 512)
        .await
        .ok();
    assert_eq!(e.ops().len(), before);

    // Zero-length reads and writes, including at the very end.
    for offset in [0, 12345, 4 * MIB] {
        let r = c.call(CMD_READ, 0, offset, 0).await;
        assert_eq!(r.ok().data.as_deref(), Some(&[][..]));
        c.write(offset, &[]).await;
    }
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_errors_are_sent_as_nbd_errors() {
    let ts = TestServer::default().await;
    let mut c = client(&ts.tcp).await;
    for error in ErrorCode::ALL {
        ts.export.fail_with(Some(error));
        assert_eq!(c.call(CMD_READ, 0, 0, 4096).await.error, Some(error));
        let cookie = c.tx.write(0, &data(8, 4096), 0).await;
        let r = c.rx.reply().await;
        assert_eq!((r.cookie, r.error), (cookie, Some(error)));
        assert_eq!(c.call(CMD_FLUSH, 0, 0, 0).await.error, Some(error));
        assert_eq!(c.call(CMD_TRIM, 0, 0, 512).await.error, Some(error));
        assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 512).await.error, Some(error));
    }
    ts.export.fail_with(None);
    c.write(0, &data(9, 4096)).await;
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_limited_exports() {
    let mut info = default_info(MIB);
    info.read_only = true;
    let ts = TestServer::start(MemExport::with_info(info), ServerLimits::default()).await;
    let mut c = client(&ts.tcp).await;
    assert_eq!(c.flags, EXPECTED_FLAGS | TFLAG_READ_ONLY);
    let cookie = c.tx.write(0, &data(10, 4096), 0).await;
    let r = c.rx.reply().await;
    assert_eq!((r.cookie, r.error), (cookie, Some(ErrorCode::Perm)));
    assert_eq!(
        c.call(CMD_TRIM, 0, 0, 512).await.error,
        Some(ErrorCode::Perm)
    );
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, 0, 0, 512).await.error,
        Some(ErrorCode::Perm)
    );
    // The refused payload was skipped: the stream is still in sync.
    assert_eq!(&c.read(0, 512).await[..], &ts.export.contents(0, 512)[..]);
    assert!(
        ts.export
            .ops()
            .iter()
            .all(|op| matches!(op, Op::Read { .. }))
    );
    c.disconnect().await;
    ts.server.shutdown().await;

    let mut info = default_info(MIB);
    info.can_trim = false;
    info.can_fast_zero = false;
    let ts = TestServer::start(MemExport::with_info(info), ServerLimits::default()).await;
    let mut c = client(&ts.unix).await;
    assert_eq!(
        c.flags,
        EXPECTED_FLAGS & !(TFLAG_SEND_TRIM | TFLAG_SEND_FAST_ZERO)
    );
    assert_eq!(
        c.call(CMD_TRIM, 0, 0, 512).await.error,
        Some(ErrorCode::Invalid)
    );
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512)
            .await
            .error,
        Some(ErrorCode::Invalid)
    );
    c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512)
        .await
        .ok();
    c.disconnect().await;

    let mut info = default_info(MIB);
    info.can_write_zeroes = false;
    info.can_multi_conn = false;
    let ts2 = TestServer::start(MemExport::with_info(info), ServerLimits::default()).await;
    let mut c = client(&ts2.tcp).await;
    assert_eq!(
        c.flags,
        EXPECTED_FLAGS & !(TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO | TFLAG_CAN_MULTI_CONN)
    );
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, 0, 0, 512).await.error,
        Some(ErrorCode::Invalid)
    );
    c.disconnect().await;
    ts.server.shutdown().await;
    ts2.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_data_of_the_wrong_length_is_eio_and_the_stream_stays_in_sync() {
    let ts = TestServer::default().await;
    let mut c = client(&ts.unix).await;
    for m in [Misbehaviour::ShortReads, Misbehaviour::LongReads] {
        ts.export.misbehave(m);
        for length in [0, 1, 4096] {
            let r = c.call(CMD_READ, 0, 8192, length).await;
            assert_eq!(r.error, Some(ErrorCode::Io), "{m:?} {length}");
        }
        ts.export.misbehave(Misbehaviour::None);
        let d = data(16, 4096);
        c.write(8192, &d).await;
        assert_eq!(&c.read(8192, 4096).await[..], &d[..]);
    }
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_export_operation_is_answered_with_eio() {
    let ts = TestServer::default().await;
    let mut c = client(&ts.tcp).await;
    ts.export.misbehave(Misbehaviour::Panic);
    let mut cookies = vec![
        c.tx.read(0, 4096).await,
        c.tx.write(0, &data(17, 4096), 0).await,
        c.tx.command(CMD_FLUSH, 0, 0, 0).await,
        c.tx.command(CMD_TRIM, 0, 0, 4096).await,
        c.tx.command(CMD_WRITE_ZEROES, 0, 0, 4096).await,
    ];
    let mut got = Vec::new();
    for _ in 0..cookies.len() {
        let r = c.rx.reply().await;
        assert_eq!(r.error, Some(ErrorCode::Io));
        got.push(r.cookie);
    }
    got.sort();
    cookies.sort();
    assert_eq!(got, cookies);
    ts.export.misbehave(Misbehaviour::None);
    let d = data(18, 4096);
    c.write(0, &d).await;
    assert_eq!(&c.read(0, 4096).await[..], &d[..]);
    c.disconnect().await;
    still_serving(&ts, 100).await;
    ts.server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Concurrency.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_in_completion_order() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        let gate = ts
            .export
            .gate(|op| matches!(op, Op::Read { offset: 0, .. } | Op::Write { offset: 0, .. }));
        let mut c = client(&addr).await;
        // A read held at the gate, then a read that completes at once.
        let a = c.tx.read(0, 4096).await;
        gate.wait_arrived(1).await;
        let b = c.tx.read(8192, 4096).await;
        let rb = c.rx.reply().await;
        assert_eq!(rb.cookie, b);
        assert_eq!(&rb.data.unwrap()[..], &ts.export.contents(8192, 4096)[..]);
        // Same with a held write and a later flush.
        let d = data(11, 4096);
        let w = c.tx.write(0, &d, 0).await;
        gate.wait_arrived(2).await;
        let f = c.tx.command(CMD_FLUSH, 0, 0, 0).await;
        assert_eq!(c.rx.reply().await.cookie, f);
        gate.open();
        let mut rest = [c.rx.reply().await, c.rx.reply().await];
        rest.sort_by_key(|r| r.cookie != a);
        assert_eq!(rest[0].cookie, a);
        assert_eq!(rest[1].cookie, w);
        rest[1].ok();
        c.disconnect().await;
    }
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let ts = TestServer::default().await;
    let gate = ts.export.gate(|_| true);
    let Client { mut tx, mut rx, .. } = client(&ts.unix).await;
    let mut expect = std::collections::HashMap::new();
    for i in 0..256u64 {
        if i % 2 == 0 {
            let d = data(i, 4096);
            let c = tx.write(i * 4096, &d, 0).await;
            expect.insert(c, None);
        } else {
            // Odd blocks are never written: they read back as the pattern.
            let c = tx.read(i * 4096, 4096).await;
            expect.insert(c, Some(ts.export.contents(i * 4096, 4096)));
        }
    }
    // All 256 are at the export at once before any completes.
    gate.wait_arrived(256).await;
    assert_eq!(ts.export.inflight_ops(), 256);
    gate.open();
    for _ in 0..256 {
        let r = rx.reply().await;
        let want = expect.remove(&r.cookie).expect("each cookie answered once");
        r.ok();
        assert_eq!(r.data.map(|d| d.to_vec()), want);
    }
    assert!(expect.is_empty());
    assert_eq!(rx.pending(), 0);
    for i in (0..256u64).step_by(2) {
        assert_eq!(ts.export.contents(i * 4096, 4096), data(i, 4096));
    }
    let c = Client {
        tx,
        rx,
        size: 0,
        flags: 0,
    };
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once() {
    let ts = TestServer::start(MemExport::new(16 * MIB), ServerLimits::default()).await;
    const CONNS: u64 = 32;
    const PER: u64 = 64;
    // The first write of every connection is held, so all connections are
    // in transmission with a request in flight at the same time.
    let gate = ts
        .export
        .gate(|op| matches!(op, Op::Write { offset, .. } if offset % (PER * 4096) == 0));
    let mut set = JoinSet::new();
    for n in 0..CONNS {
        let addr = if n % 2 == 0 {
            ts.tcp.clone()
        } else {
            ts.unix.clone()
        };
        set.spawn(async move {
            let Client { mut tx, mut rx, .. } = client(&addr).await;
            let base = n * PER * 4096;
            let sender = tokio::spawn(async move {
                let mut cookies = Vec::new();
                for i in 0..PER {
                    cookies.push(tx.write(base + i * 4096, &data(base + i, 4096), 0).await);
                }
                (tx, cookies)
            });
            let mut got = Vec::new();
            for _ in 0..PER {
                let r = rx.reply().await;
                r.ok();
                got.push(r.cookie);
            }
            let (tx, mut cookies) = sender.await.unwrap();
            cookies.sort();
            got.sort();
            assert_eq!(got, cookies);
            let mut c = Client {
                tx,
                rx,
                size: 0,
                flags: 0,
            };
            for i in 0..PER {
                let back = c.read(base + i * 4096, 4096).await;
                assert_eq!(&back[..], &data(base + i, 4096)[..]);
            }
            c.disconnect().await;
        });
    }
    gate.wait_arrived(CONNS as usize).await;
    gate.open();
    while let Some(r) = within("connections", set.join_next()).await {
        r.unwrap();
    }
    ts.export.wait_attached(0).await;
    assert_eq!(ts.export.attaches(), CONNS as usize);
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_answers_every_request_in_flight_then_closes() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        let gate = ts.export.gate(|_| true);
        let mut c = client(&addr).await;
        let mut cookies = Vec::new();
        for i in 0..8u64 {
            cookies.push(
                c.tx.write(i * 4096, &data(100 + i, 4096), CMD_FLAG_FUA)
                    .await,
            );
            cookies.push(c.tx.read(MIB + i * 4096, 4096).await);
        }
        gate.wait_arrived(16).await;
        c.tx.disc().await;
        // Anything after DISC is ignored.
        c.tx.raw(b"trailing garbage after DISC").await;
        gate.open();
        let mut got = Vec::new();
        for _ in 0..16 {
            let r = c.rx.reply().await;
            r.ok();
            got.push(r.cookie);
        }
        got.sort();
        cookies.sort();
        assert_eq!(got, cookies);
        assert!(c.rx.read_to_close().await.is_empty());
        ts.export.wait_attached(0).await;
        for i in 0..8u64 {
            assert_eq!(ts.export.contents(i * 4096, 4096), data(100 + i, 4096));
        }
    }
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight_then_closes() {
    let ts = TestServer::default().await;
    let gate = ts.export.gate(|op| matches!(op, Op::Read { .. }));
    let mut a = client(&ts.tcp).await;
    let mut b = client(&ts.unix).await;
    let idle = client(&ts.tcp).await;
    let mut negotiating = Handshake::start(&ts.unix).await;
    let mut cookies = Vec::new();
    for i in 0..4u64 {
        cookies.push((0, a.tx.read(i * 4096, 4096).await));
        cookies.push((1, b.tx.read(MIB + i * 4096, 4096).await));
    }
    gate.wait_arrived(8).await;
    let path = ts.unix_path();
    assert!(path.exists());
    let shutdown = tokio::spawn(ts.server.shutdown());
    // Connections with nothing in flight close right away.
    let Client { mut rx, .. } = idle;
    assert!(rx.read_to_close().await.is_empty());
    assert!(read_to_close(&mut negotiating.s).await.is_empty());
    // The others wait for their requests.
    assert!(!shutdown.is_finished());
    gate.open();
    for _ in 0..4 {
        for c in [&mut a, &mut b] {
            let r = c.rx.reply().await;
            r.ok();
            assert_eq!(r.data.unwrap().len(), 4096);
        }
    }
    assert!(a.rx.read_to_close().await.is_empty());
    assert!(b.rx.read_to_close().await.is_empty());
    within("shutdown", shutdown).await.unwrap();
    assert!(!path.exists(), "unix socket file left behind");
    assert_eq!(ts.export.attached(), 0);
    // Nothing listens any more.
    let BoundAddr::Tcp(addr) = &ts.tcp else {
        unreachable!()
    };
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_half_sent_requests() {
    let ts = TestServer::default().await;
    let mut a = client(&ts.tcp).await;
    let mut b = client(&ts.unix).await;
    // A complete read, then a write whose payload never finishes.
    let r = a.tx.read(0, 512).await;
    let mut h = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        cookie: 99,
        offset: 0,
        length: 65536,
    }
    .encode()
    .to_vec();
    h.extend_from_slice(&[1u8; 1000]);
    a.tx.raw(&h).await;
    assert_eq!(a.rx.reply().await.cookie, r);
    // Half a header on the other.
    b.tx.raw(&h[..10]).await;
    within("shutdown", ts.server.shutdown()).await;
    assert!(a.rx.read_to_close().await.is_empty());
    assert!(b.rx.read_to_close().await.is_empty());
    assert!(
        !ts.export
            .ops()
            .iter()
            .any(|op| matches!(op, Op::Write { .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_a_client_that_never_reads_its_replies() {
    let limits = ServerLimits {
        shutdown_grace: Duration::from_millis(200),
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(4 << 20), limits).await;
    let mut stuck = client(&ts.tcp).await;
    // 64 MiB of read replies: far more than the socket buffers hold.
    for i in 0..64u64 {
        stuck.tx.read((i % 4) * MIB, MIB as u32).await;
    }
    ts.export.wait_completed(64).await;
    // Without the grace period this would wait for the client forever.
    within("shutdown", ts.server.shutdown()).await;
    assert_eq!(ts.export.attached(), 0);
    // The connection is closed and the replies it never read are gone.
    let got = stuck.rx.read_to_close().await;
    assert!(
        got.len() < 64 * (MIB as usize + 16),
        "every reply was delivered?"
    );
}

// ---------------------------------------------------------------------------
// Bad input. After each, fresh clients on both transports are served.
// ---------------------------------------------------------------------------

async fn still_serving(ts: &TestServer, seed: u64) {
    check_serving(&ts.tcp, seed).await;
    check_serving(&ts.unix, seed + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_after_answering_requests_in_flight() {
    let ts = TestServer::default().await;
    let gate = ts.export.gate(|op| matches!(op, Op::Read { .. }));
    let mut c = client(&ts.tcp).await;
    let r = c.tx.read(0, 4096).await;
    gate.wait_arrived(1).await;
    let mut bad = RequestHeader {
        flags: 0,
        command: CMD_READ,
        cookie: 5,
        offset: 0,
        length: 512,
    }
    .encode();
    bad[0] ^= 0x80;
    c.tx.raw(&bad).await;
    gate.open();
    let reply = c.rx.reply().await;
    assert_eq!(reply.cookie, r);
    assert!(c.rx.read_to_close().await.is_empty());
    still_serving(&ts, 10).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_flags_are_einval_and_the_session_continues() {
    let ts = TestServer::default().await;
    let mut c = client(&ts.unix).await;
    for (command, flags) in [
        (99, 0),
        (CMD_BLOCK_STATUS, 0),
        (CMD_RESIZE, 0),
        (u16::MAX, 0),
        (CMD_READ, CMD_FLAG_NO_HOLE),
        (CMD_READ, CMD_FLAG_DF),
        (CMD_READ, CMD_FLAG_PAYLOAD_LEN),
        (CMD_FLUSH, 1 << 15),
    ] {
        let r = c.call(command, flags, 0, 512).await;
        assert_eq!(r.error, Some(ErrorCode::Invalid), "{command} {flags:#x}");
    }
    // A write with a bad flag: EINVAL, and its payload is skipped.
    let cookie = c.tx.write(0, &data(12, 4096), CMD_FLAG_NO_HOLE).await;
    let r = c.rx.reply().await;
    assert_eq!((r.cookie, r.error), (cookie, Some(ErrorCode::Invalid)));
    assert_eq!(&c.read(0, 4096).await[..], &ts.export.contents(0, 4096)[..]);
    c.disconnect().await;
    still_serving(&ts, 20).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests() {
    let ts = TestServer::default().await;
    let size = 4 * MIB;
    let mut c = client(&ts.tcp).await;
    for (offset, length) in [
        (size - 512, 1024),
        (size, 1),
        (size + 4096, 0),
        (u64::MAX, 1),
        (u64::MAX - 100, 4096),
    ] {
        assert_eq!(
            c.call(CMD_READ, 0, offset, length).await.error,
            Some(ErrorCode::Invalid)
        );
        assert_eq!(
            c.call(CMD_TRIM, 0, offset, length).await.error,
            Some(ErrorCode::Invalid)
        );
        assert_eq!(
            c.call(CMD_CACHE, 0, offset, length).await.error,
            Some(ErrorCode::Invalid)
        );
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, 0, offset, length).await.error,
            Some(ErrorCode::NoSpace)
        );
        // A write past the end: ENOSPC, payload read and discarded.
        let d = data(offset, length as usize);
        let cookie = c.tx.write(offset, &d, 0).await;
        let r = c.rx.reply().await;
        assert_eq!((r.cookie, r.error), (cookie, Some(ErrorCode::NoSpace)));
        let d = data(13, 4096);
        c.write(0, &d).await;
        assert_eq!(&c.read(0, 4096).await[..], &d[..]);
    }
    // A read longer than the maximum payload: EINVAL, no data follows.
    assert_eq!(
        c.call(CMD_READ, 0, 0, (32 << 20) + 1).await.error,
        Some(ErrorCode::Invalid)
    );
    assert_eq!(&c.read(0, 512).await[..], &data(13, 512)[..]);
    assert!(ts.export.ops().iter().all(|op| match *op {
        Op::Read { offset, length }
        | Op::Write { offset, length, .. }
        | Op::Trim { offset, length, .. }
        | Op::WriteZeroes { offset, length, .. } => offset + u64::from(length) <= size,
        Op::Flush => true,
    }));
    c.disconnect().await;
    still_serving(&ts, 30).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_payload_closes_the_connection() {
    let ts = TestServer::default().await;
    let gate = ts.export.gate(|op| matches!(op, Op::Write { .. }));
    let mut c = client(&ts.unix).await;
    let w = c.tx.write(0, &data(14, 4096), 0).await;
    gate.wait_arrived(1).await;
    let h = RequestHeader {
        flags: 0,
        command: CMD_WRITE,
        cookie: 7,
        offset: 0,
        length: (32 << 20) + 1,
    };
    c.tx.raw(&h.encode()).await;
    // Some of the payload; the server must not wait for the rest.
    c.tx.raw(&[0u8; 65536]).await;
    gate.open();
    assert_eq!(c.rx.reply().await.cookie, w);
    assert!(c.rx.read_to_close().await.is_empty());
    still_serving(&ts, 40).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_cut_off_mid_header_or_mid_payload() {
    let ts = TestServer::default().await;
    for cut_payload in [false, true] {
        for addr in ts.addrs() {
            let mut c = client(&addr).await;
            // One complete request first, answered before the close.
            let r = c.tx.read(0, 4096).await;
            let mut h = RequestHeader {
                flags: 0,
                command: CMD_WRITE,
                cookie: 8,
                offset: 2 * MIB,
                length: 8192,
            }
            .encode()
            .to_vec();
            if cut_payload {
                h.extend_from_slice(&[0xaa; 5000]);
            } else {
                h.truncate(17);
            }
            c.tx.raw(&h).await;
            c.tx.shutdown().await;
            assert_eq!(c.rx.reply().await.cookie, r);
            assert!(c.rx.read_to_close().await.is_empty());
        }
    }
    ts.export.wait_attached(0).await;
    assert!(
        !ts.export
            .ops()
            .iter()
            .any(|op| matches!(op, Op::Write { .. }))
    );
    still_serving(&ts, 50).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_with_requests_in_flight() {
    let ts = TestServer::default().await;
    for (round, addr) in ts.addrs().into_iter().enumerate() {
        let gate = ts.export.gate(|op| matches!(op, Op::Read { .. }));
        let mut c = client(&addr).await;
        for i in 0..32u64 {
            c.tx.read(i * 65536, 65536).await;
        }
        gate.wait_arrived(32).await;
        drop(c);
        let done = ts.export.completed();
        gate.open();
        ts.export.wait_completed(done + 32).await;
        // The server noticed and released the connection.
        ts.export.wait_attached(0).await;
        still_serving(&ts, 60 + 2 * round as u64).await;
    }
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_the_handshake() {
    let ts = TestServer::default().await;
    for addr in ts.addrs() {
        // Not even reading the greeting.
        let mut s = connect(&addr).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let got = read_to_close(&mut s).await;
        assert_eq!(got.len(), 18, "only the greeting");
        // Valid flags, then garbage instead of an option.
        let mut s = connect(&addr).await;
        let mut msg = CLIENT_FLAGS.to_be_bytes().to_vec();
        msg.extend_from_slice(&[0x5a; 64]);
        s.write_all(&msg).await.unwrap();
        assert_eq!(read_to_close(&mut s).await.len(), 18);
        // An over-long EXPORT_NAME.
        let mut s = connect(&addr).await;
        let mut msg = CLIENT_FLAGS.to_be_bytes().to_vec();
        msg.extend_from_slice(&encode_option(OPT_EXPORT_NAME, &[b'a'; 5000]));
        s.write_all(&msg).await.unwrap();
        assert_eq!(read_to_close(&mut s).await.len(), 18);
    }
    assert_eq!(ts.export.attaches(), 0);
    still_serving(&ts, 70).await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout() {
    // Long enough that the well-behaved clients below finish negotiating
    // in time even on a loaded machine.
    let timeout = Duration::from_secs(1);
    let limits = ServerLimits {
        handshake_timeout: timeout,
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(4 * MIB), limits).await;
    // A client in transmission is not subject to the timeout.
    let mut early = client(&ts.unix).await;
    let started = tokio::time::Instant::now();
    let mut silent = connect(&ts.tcp).await;
    let mut partial = Handshake::start(&ts.unix).await;
    partial
        .s
        .write_all(&encode_option(OPT_GO, &[])[..10])
        .await
        .unwrap();
    let mut listing = Handshake::start(&ts.tcp).await;
    listing.send_option(OPT_LIST, &[]).await;
    assert_eq!(listing.reply().await.reply_type, REP_SERVER);
    assert_eq!(listing.reply().await.reply_type, REP_ACK);
    assert_eq!(read_to_close(&mut silent).await.len(), 18);
    assert!(read_to_close(&mut partial.s).await.is_empty());
    assert!(read_to_close(&mut listing.s).await.is_empty());
    assert!(started.elapsed() >= timeout);
    // Well past the handshake timeout, the early client still works.
    let d = data(15, 4096);
    early.write(0, &d).await;
    assert_eq!(&early.read(0, 4096).await[..], &d[..]);
    early.disconnect().await;
    assert_eq!(ts.export.attaches(), 1);
    still_serving(&ts, 80).await;
    ts.server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Many malformed and vanishing sessions, with a live client alongside.
// ---------------------------------------------------------------------------

/// One misbehaving session, chosen by `seed`. Its unverified writes go to
/// `[1 MiB, 2 MiB)`; the one it verifies goes to its own 512 bytes at
/// `index * 512` (so at most 2048 sessions).
async fn bad_session(ts_tcp: BoundAddr, ts_unix: BoundAddr, index: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let addr = if rng.below(2) == 0 { ts_tcp } else { ts_unix };
    let scratch = |rng: &mut Rng| MIB + rng.below(256) * 4096;
    let case = rng.below(16);
    // Cases before 4 end during the handshake.
    if case < 4 {
        let mut s = connect(&addr).await;
        match case {
            0 => {
                // Garbage before or instead of the handshake.
                let n = rng.below(64) as usize;
                let _ = s.write_all(&rng.bytes(n)).await;
            }
            1 => {
                // Valid flags, then random option traffic.
                let mut msg = CLIENT_FLAGS.to_be_bytes().to_vec();
                for _ in 0..rng.below(4) {
                    let option = match rng.below(4) {
                        0 => rng.next() as u32,
                        1 => OPT_LIST,
                        2 => OPT_INFO,
                        _ => OPT_STRUCTURED_REPLY,
                    };
                    let n = rng.below(40) as usize;
                    msg.extend_from_slice(&encode_option(option, &rng.bytes(n)));
                }
                let cut = rng.below(msg.len() as u64 + 1) as usize;
                let _ = s.write_all(&msg[..cut]).await;
            }
            2 => {
                // ABORT or a wrong EXPORT_NAME, reading to the end.
                let mut msg = CLIENT_FLAGS.to_be_bytes().to_vec();
                if rng.below(2) == 0 {
                    msg.extend_from_slice(&encode_option(OPT_ABORT, &[]));
                } else {
                    msg.extend_from_slice(&encode_option(OPT_EXPORT_NAME, b"nope"));
                }
                let _ = s.write_all(&msg).await;
                read_to_close(&mut s).await;
            }
            _ => {
                // Vanish right after connecting.
            }
        }
        if rng.below(2) == 0 {
            // End our side: the server sees end of input mid-handshake and
            // must close (not wait for the handshake timeout).
            let _ = s.shutdown().await;
            read_to_close(&mut s).await;
        }
        return;
    }
    let mut c = client(&addr).await;
    // Some valid requests in flight first.
    for _ in 0..rng.below(8) {
        match rng.below(3) {
            0 => {
                c.tx.read(rng.below(4 * MIB / 4096) * 4096, 4096).await;
            }
            1 => {
                let off = scratch(&mut rng);
                c.tx.write(off, &rng.bytes(4096), 0).await;
            }
            _ => {
                c.tx.command(CMD_FLUSH, 0, 0, 0).await;
            }
        }
    }
    let header = |command, offset, length| {
        RequestHeader {
            flags: 0,
            command,
            cookie: 0xbad,
            offset,
            length,
        }
        .encode()
    };
    let mut expect_close = true;
    match case {
        4 => {
            let mut h = header(CMD_READ, 0, 512);
            h[rng.below(4) as usize] ^= 1 << rng.below(8);
            c.tx.raw(&h).await;
        }
        5 => {
            let command = rng.below(100) as u16 + 9;
            c.tx.command(command, 0, 0, 512).await;
            expect_close = false;
        }
        6 => {
            let n = 1024 + rng.below(8192) as u32;
            c.tx.read(4 * MIB - 512, n).await;
            expect_close = false;
        }
        7 => {
            // Always past the end, so nothing is written.
            let n = 101 + rng.below(8000) as usize;
            c.tx.write(4 * MIB - 100, &rng.bytes(n), 0).await;
            expect_close = false;
        }
        8 => {
            let n = (32 << 20) + 1 + rng.below(1000) as u32;
            c.tx.raw(&header(CMD_WRITE, 0, n)).await;
        }
        9 => {
            let h = header(CMD_READ, 0, 512);
            c.tx.raw(&h[..rng.below(28) as usize]).await;
            c.tx.shutdown().await;
        }
        10 => {
            let mut h = header(CMD_WRITE, scratch(&mut rng), 4096).to_vec();
            let n = rng.below(4096) as usize;
            h.extend_from_slice(&rng.bytes(n));
            c.tx.raw(&h).await;
            c.tx.shutdown().await;
        }
        11 => {
            // Many reads, then vanish without reading a reply.
            for _ in 0..32 {
                c.tx.read(rng.below(60) * 65536, 65536).await;
            }
            drop(c);
            return;
        }
        12 => {
            let n = rng.below(200) as usize;
            c.tx.raw(&rng.bytes(n)).await;
            c.tx.shutdown().await;
        }
        13 => {
            c.tx.disc().await;
        }
        _ => {
            // Vanish at once.
            drop(c);
            return;
        }
    }
    if rng.below(4) == 0 {
        // Vanish without reading anything.
        return;
    }
    if expect_close {
        // Every reply the server sends is well formed and expected; then
        // the connection ends.
        while c.rx.try_reply().await.is_some() {}
    } else {
        // The session goes on: every request gets its reply.
        while c.rx.pending() > 0 {
            c.rx.reply().await;
        }
        let d = rng.bytes(512);
        let off = index * 512;
        c.write(off, &d).await;
        assert_eq!(&c.read(off, 512).await[..], &d[..]);
        c.disconnect().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_bad_sessions_with_a_live_client() {
    let limits = ServerLimits {
        handshake_timeout: Duration::from_secs(5),
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(4 * MIB), limits).await;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let live = {
        let (addr, stop, rounds) = (ts.tcp.clone(), stop.clone(), rounds.clone());
        tokio::spawn(async move {
            let mut c = client(&addr).await;
            let mut rng = Rng::new(7);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let off = 2 * MIB + rng.below(511) * 4096;
                let d = data(i, 4096);
                c.write(off, &d).await;
                assert_eq!(&c.read(off, 4096).await[..], &d[..], "live client data");
                i += 1;
                rounds.store(i, Ordering::SeqCst);
            }
            c.disconnect().await;
        })
    };
    // Each session verifies 512 bytes of its own in the first MiB.
    const SESSIONS: u64 = 2000;
    const PARALLEL: usize = 12;
    let mut set = JoinSet::new();
    let mut master = Rng::new(0x7a4d_3e11);
    for index in 0..SESSIONS {
        if set.len() >= PARALLEL {
            within("bad sessions", set.join_next())
                .await
                .unwrap()
                .unwrap();
        }
        let seed = master.next();
        set.spawn(bad_session(ts.tcp.clone(), ts.unix.clone(), index, seed));
    }
    while let Some(r) = within("bad sessions", set.join_next()).await {
        r.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    within("the live client", live).await.unwrap();
    assert!(rounds.load(Ordering::SeqCst) > 0);
    still_serving(&ts, 90).await;
    // Every bad session is over: nobody is left attached, and shutdown
    // finds nothing to wait for.
    ts.export.wait_attached(0).await;
    within("shutdown", ts.server.shutdown()).await;
}

// ---------------------------------------------------------------------------
// The byte budget.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_bounds_payload_in_flight() {
    const BUDGET: u32 = 256 * 1024;
    let limits = ServerLimits {
        max_buffered_bytes: BUDGET,
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(8 * MIB), limits).await;
    let e = ts.export.clone();
    let Client { mut tx, mut rx, .. } = client(&ts.tcp).await;
    const N: u64 = 64;
    const LEN: u64 = 64 * 1024;

    for phase in 0..2 {
        let gate = if phase == 0 {
            e.gate(|op| matches!(op, Op::Write { .. }))
        } else {
            e.gate(|op| matches!(op, Op::Read { .. }))
        };
        let sender = tokio::spawn(async move {
            for i in 0..N {
                if phase == 0 {
                    tx.write(i * LEN, &data(i, LEN as usize), 0).await;
                } else {
                    tx.read(i * LEN, LEN as u32).await;
                }
            }
            tx
        });
        let receiver = tokio::spawn(async move {
            for _ in 0..N {
                let r = rx.reply().await;
                r.ok();
                if let Some(d) = r.data {
                    assert_eq!(d.len(), LEN as usize);
                }
            }
            rx
        });
        // Let the requests through one at a time; at every step the export
        // holds no more than the budget.
        for i in 0..N as usize {
            gate.wait_arrived(i + 1).await;
            assert!(
                e.max_inflight_bytes() <= u64::from(BUDGET),
                "{} bytes in flight",
                e.max_inflight_bytes()
            );
            gate.release(1);
        }
        tx = within("sender", sender).await.unwrap();
        rx = within("receiver", receiver).await.unwrap();
        gate.open();
    }
    assert!(e.max_inflight_bytes() <= u64::from(BUDGET));
    assert!(e.max_inflight_ops() >= 2, "requests did overlap");
    for i in 0..N {
        assert_eq!(e.contents(i * LEN, LEN as usize), data(i, LEN as usize));
    }
    let c = Client {
        tx,
        rx,
        size: 0,
        flags: 0,
    };
    c.disconnect().await;
    ts.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_budget_still_complete() {
    // A budget smaller than one request (or than the per-request charge)
    // must not stall the connection: such a request runs alone.
    for budget in [256 * 1024, 1000, 0] {
        let limits = ServerLimits {
            max_buffered_bytes: budget,
            ..ServerLimits::default()
        };
        let ts = TestServer::start(MemExport::new(4 * MIB), limits).await;
        let mut c = client(&ts.tcp).await;
        let big = data(77, 2 * MIB as usize);
        c.write(MIB, &big).await;
        assert_eq!(&c.read(MIB, 2 * MIB as u32).await[..], &big[..]);
        // Pipelined requests of every size, including zero-length ones.
        let mut cookies = Vec::new();
        for i in 0..8u64 {
            cookies.push(c.tx.write(i * 4096, &data(i, 4096), 0).await);
            cookies.push(c.tx.read(MIB, (MIB as u32) >> i).await);
            cookies.push(c.tx.command(CMD_FLUSH, 0, 0, 0).await);
        }
        for _ in 0..cookies.len() {
            c.rx.reply().await.ok();
        }
        assert!(
            ts.export.max_inflight_bytes() <= u64::from(budget).max(2 * MIB),
            "budget {budget}"
        );
        c.disconnect().await;
        ts.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_covers_read_data_not_yet_sent() {
    // A client that asks for lots of data and reads it slowly must not make
    // the server queue the data in memory: read data counts against the
    // budget until it is written to the socket.
    const BUDGET: u64 = MIB;
    const LEN: u64 = 256 * 1024;
    const N: u64 = 128;
    let limits = ServerLimits {
        max_buffered_bytes: BUDGET as u32,
        ..ServerLimits::default()
    };
    let ts = TestServer::start(MemExport::new(4 * MIB), limits).await;
    let e = ts.export.clone();
    let mut c = client(&ts.unix).await;
    for i in 0..N {
        c.tx.read((i % 16) * LEN, LEN as u32).await;
    }
    // Completed reads not yet received by the client: those holding budget,
    // plus what the kernel's socket buffers hold (a few hundred KiB for a
    // unix socket; allow 4 MiB), plus the one being received.
    let bound = BUDGET / LEN + 4 * MIB / LEN + 1;
    for received in 0..N {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let done = e.reads_done();
        assert!(
            done <= received + bound,
            "{done} reads done, {received} received: read data is queued beyond the budget"
        );
        let r = c.rx.reply().await;
        r.ok();
    }
    c.disconnect().await;
    ts.server.shutdown().await;
}
