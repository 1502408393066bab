//! Bad NBD input never takes repd down (CONTRACT section 5): malformed
//! handshakes and requests, requests past the end, oversized payloads,
//! requests cut off, clients vanishing with requests in flight. After each,
//! the daemon serves another client (a verified write and read) and the
//! bad session no longer counts as attached. Then a seeded mix of 1000 such
//! sessions, several at once, against one repd while a well-behaved client
//! keeps doing verified I/O.
//!
//! The clients use TCP: a client that closes with unread answers makes the
//! kernel reset the connection, the harshest way to vanish.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use common::nbd::{RawClient, expect_closed, greet, option};
use common::*;
use tandem_proto::nbd::ErrorCode;
use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::encode_option;
use tandem_proto::nbd::transmission::RequestHeader;

const MIB: u64 = 1 << 20;
const MAX_PAYLOAD: u32 = 32 << 20;

fn serving_unix() -> Cluster {
    let mut c = Spec::single(64 * MIB).build();
    c.up_primary("alpha");
    c
}

fn serving() -> Cluster {
    let mut c = Spec::single(64 * MIB).nbd(NbdKind::Tcp).build();
    c.up_primary("alpha");
    c
}

fn header(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// repd is alive, logged no panic, has no bad session still attached, and
/// serves a new client: a byte-granular write read back.
fn assert_serves(c: &mut Cluster, seed: u64) {
    assert!(c.is_running("alpha"), "repd died:\n{}", c.log("alpha"));
    assert!(
        !c.log("alpha").contains("panicked"),
        "repd panicked:\n{}",
        c.log("alpha")
    );
    c.wait_clients("alpha", 0);
    let mut client = c.client("alpha");
    let offset = 40 * MIB + (seed % 512) * 4096 + 7;
    let data = pattern(seed, 5000);
    client.write(offset, &data, false).unwrap();
    assert!(client.read(offset, 5000).unwrap() == data);
    client.disconnect();
}

#[test]
fn bad_request_magic_closes_that_connection() {
    let mut c = serving();
    let mut client = c.client("alpha");
    let mut h = header(CMD_READ, 0, 1, 0, 512);
    h[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    client.stream.write_all(&h).unwrap();
    client.expect_closed();
    assert_serves(&mut c, 1);
}

#[test]
fn garbage_instead_of_the_handshake_closes_that_connection() {
    let mut c = serving();
    let mut rng = Rng::new(2);
    // Garbage as the client flags (unknown flag bits).
    let mut s = c.connect("alpha");
    let mut g = rng.bytes(300);
    g[0] |= 0x80;
    s.write_all(&g).unwrap();
    expect_closed(s);
    // Valid flags, then garbage where an option should be (bad magic).
    let mut s = c.connect("alpha");
    greet(&mut *s);
    s.write_all(&rng.bytes(300)).unwrap();
    expect_closed(s);
    // An HTTP request, a classic wrong client.
    let mut s = c.connect("alpha");
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    expect_closed(s);
    assert_serves(&mut c, 2);
}

#[test]
fn unknown_options_are_unsupported_and_the_session_goes_on() {
    let mut c = serving();
    let mut s = c.connect("alpha");
    greet(&mut *s);
    for (opt, data) in [
        (0x4242_u32, &b"hello"[..]),
        (OPT_STRUCTURED_REPLY, &[]),
        (OPT_EXTENDED_HEADERS, &[]),
        (OPT_STARTTLS, &[]),
    ] {
        let replies = option(&mut *s, opt, data).unwrap();
        assert_eq!(replies.len(), 1, "{replies:?}");
        assert_eq!(replies[0].option, opt);
        assert_eq!(
            replies[0].reply_type, REP_ERR_UNSUP,
            "option {opt:#x}: {replies:?}"
        );
    }
    // An option too long to buffer is refused, and negotiation goes on.
    let big = vec![0u8; 100 * 1024];
    let replies = option(&mut *s, OPT_LIST, &big).unwrap();
    assert!(replies[0].reply_type & (1 << 31) != 0, "{replies:?}");
    // LIST names the export.
    let replies = option(&mut *s, OPT_LIST, &[]).unwrap();
    assert!(
        replies
            .iter()
            .any(|r| r.reply_type == REP_SERVER && r.body.ends_with(b"r0")),
        "{replies:?}"
    );
    // And GO works on the same session.
    let mut client = RawClient::go_greeted(s, "r0").expect("GO after unknown options");
    client.write(4097, &pattern(3, 3000), false).unwrap();
    assert!(client.read(4097, 3000).unwrap() == pattern(3, 3000));
    client.disconnect();
    assert_serves(&mut c, 3);
}

#[test]
fn unknown_commands_and_flags_are_einval_and_the_session_goes_on() {
    let mut c = serving();
    let mut client = c.client("alpha");
    for (command, flags, length) in [
        (99u16, 0u16, 0u32),
        (CMD_BLOCK_STATUS, 0, 4096),
        (CMD_RESIZE, 0, 0),
        (CMD_READ, 1 << 9, 512),
    ] {
        let cookie = client.send(command, flags, 0, length, &[]);
        let r = client.reply();
        assert_eq!(
            (r.cookie, r.error),
            (cookie, Some(ErrorCode::Invalid)),
            "command {command} flags {flags:#x}"
        );
    }
    // A WRITE with a flag it does not take: EINVAL, and its payload is skipped.
    let cookie = client.send(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096, &[0xee; 4096]);
    let r = client.reply();
    assert_eq!((r.cookie, r.error), (cookie, Some(ErrorCode::Invalid)));
    assert!(
        client.read(0, 4096).unwrap().iter().all(|&b| b == 0),
        "the rejected write was executed"
    );
    client.write(10, &pattern(4, 100), false).unwrap();
    assert!(client.read(10, 100).unwrap() == pattern(4, 100));
    client.disconnect();
    assert_serves(&mut c, 4);
}

#[test]
fn requests_past_the_end_are_einval_and_enospc() {
    let mut c = serving();
    let size = c.size("alpha");
    let mut client = c.client("alpha");
    assert_eq!(client.size, size);
    let tail = pattern(5, 4096);
    client.write(size - 4096, &tail, false).unwrap();

    assert_eq!(client.read(size - 512, 1024), Err(ErrorCode::Invalid));
    assert_eq!(client.read(size, 1), Err(ErrorCode::Invalid));
    assert_eq!(
        client.read(u64::MAX - 10, 512),
        Err(ErrorCode::Invalid),
        "offset + length overflows"
    );
    assert_eq!(
        client.read(0, MAX_PAYLOAD + 1),
        Err(ErrorCode::Invalid),
        "a read over the maximum"
    );
    // A write past the end: ENOSPC, its payload skipped (the session stays
    // in sync), and nothing of it written.
    assert_eq!(
        client.write(size - 100, &[0xaa; 200], false),
        Err(ErrorCode::NoSpace)
    );
    assert_eq!(
        client.write(u64::MAX - 10, &[0xaa; 200], true),
        Err(ErrorCode::NoSpace)
    );
    assert_eq!(
        client.write_zeroes(size - 100, 200, 0),
        Err(ErrorCode::NoSpace)
    );
    assert_eq!(client.trim(size - 100, 200, false), Err(ErrorCode::Invalid));
    assert!(
        client.read(size - 4096, 4096).unwrap() == tail,
        "a refused write changed the last block"
    );
    // The session goes on.
    client.write(size - 5, &[1, 2, 3, 4, 5], true).unwrap();
    assert_eq!(client.read(size - 5, 5).unwrap(), vec![1, 2, 3, 4, 5]);
    client.disconnect();
    assert_serves(&mut c, 5);
}

#[test]
fn a_write_payload_over_32_mib_closes_the_connection() {
    let mut c = serving();
    let mut client = c.client("alpha");
    client
        .stream
        .write_all(&header(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1))
        .unwrap();
    // Start sending the payload, as a real client would; the server may
    // reset the connection under us.
    let _ = client.stream.write_all(&[0x5a; 64 * 1024]);
    client.expect_closed();
    assert!(
        c.client("alpha")
            .read(0, 65536)
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "part of the payload was written"
    );
    assert_serves(&mut c, 6);
}

#[test]
fn requests_cut_off_leave_nothing_behind() {
    let mut c = serving();
    // A header cut off in the middle.
    let mut client = c.client("alpha");
    client
        .stream
        .write_all(&header(CMD_WRITE, 0, 1, 0, 4096)[..13])
        .unwrap();
    drop(client);
    c.wait_clients("alpha", 0);
    // A payload cut off: the write is not executed.
    let mut client = c.client("alpha");
    client
        .stream
        .write_all(&header(CMD_WRITE, 0, 1, 8192, 65536))
        .unwrap();
    client.stream.write_all(&[0x77; 1000]).unwrap();
    drop(client);
    c.wait_clients("alpha", 0);
    assert!(
        c.client("alpha")
            .read(8192, 65536)
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "a cut-off write was executed"
    );
    // The same during negotiation.
    let mut s = c.connect("alpha");
    greet(&mut *s);
    s.write_all(&encode_option(OPT_GO, &[0, 0, 0, 2, b'r'])[..20])
        .unwrap();
    drop(s);
    assert_serves(&mut c, 7);
}

/// Send `n` requests and vanish without reading an answer.
fn vanish(c: &Cluster, command: u16, n: u64, len: u32, base: u64) {
    let mut client = c.client("alpha");
    let payload = if command == CMD_WRITE {
        pattern(base, len as usize)
    } else {
        Vec::new()
    };
    for i in 0..n {
        client.send(command, 0, base + i * u64::from(len), len, &payload);
    }
    drop(client);
}

#[test]
fn clients_vanishing_with_32_requests_in_flight() {
    let mut c = serving();
    // nbdkit 1.32 aborts about once in ten such runs: repeat.
    const ROUNDS: u64 = 25;
    const LEN: u32 = 16 * 1024;
    let base = |round: u64| 16 * MIB + round * 32 * u64::from(LEN);
    for round in 0..ROUNDS {
        vanish(&c, CMD_READ, 32, 256 * 1024, 0);
        vanish(&c, CMD_WRITE, 32, LEN, base(round));
        vanish(&c, CMD_FLUSH, 32, 0, 0);
    }
    assert_serves(&mut c, 8);
    // The answers were lost, but a write the server had read ran to
    // completion: each block holds nothing or the whole write.
    let mut client = c.client("alpha");
    for round in 0..ROUNDS {
        for i in 0..32u64 {
            let got = client.read(base(round) + i * u64::from(LEN), LEN).unwrap();
            assert!(
                got.iter().all(|&b| b == 0) || got == pattern(base(round), LEN as usize),
                "round {round} block {i} is torn"
            );
        }
    }
}

/// One bad session of a random kind. Bad writes go to `[bad, bad + 16 MiB)`.
fn bad_session(c: &Cluster, rng: &mut Rng, size: u64, bad: u64) {
    let kind = rng.below(17);
    let offset = bad + rng.below(16 * MIB / 4096 - 64) * 4096 + rng.below(4096);
    match kind {
        0 => {
            // Garbage instead of the handshake.
            let mut s = c.connect("alpha");
            let mut g = [rng.bytes(8), rng.bytes_below(500)].concat();
            g[0] |= 0x80; // unknown client flags, never a valid greeting
            let _ = s.write_all(&g);
            expect_closed(s);
        }
        1 => {
            // Client flags cut off.
            let mut s = c.connect("alpha");
            let mut greeting = [0u8; 18];
            s.read_exact(&mut greeting).unwrap();
            s.write_all(&[0, 0]).unwrap();
        }
        2 => {
            // Unknown option, then gone (or ABORT).
            let mut s = c.connect("alpha");
            greet(&mut *s);
            let opt = 100 + rng.below(1000) as u32;
            let data = rng.bytes_below(100);
            let r = option(&mut *s, opt, &data).unwrap();
            assert_eq!(r[0].reply_type, REP_ERR_UNSUP);
            if rng.below(2) == 0 {
                let _ = option(&mut *s, OPT_ABORT, &[]);
            }
        }
        3 => {
            // Bad request magic.
            let mut client = c.client("alpha");
            let mut h = rng.bytes(28);
            h[0] ^= 0x25 ^ 0x80; // never the request magic
            client.stream.write_all(&h).unwrap();
            client.expect_closed();
        }
        4 => {
            // Unknown command, gone without the answer.
            let mut client = c.client("alpha");
            client.send(9 + rng.below(100) as u16, 0, offset, 512, &[]);
        }
        5 => {
            // Read past the end.
            let mut client = c.client("alpha");
            let cookie = client.send(CMD_READ, 0, size - 100, 4096, &[]);
            if rng.below(2) == 0 {
                let r = client.reply();
                assert_eq!((r.cookie, r.error), (cookie, Some(ErrorCode::Invalid)));
            }
        }
        6 => {
            // Write past the end, with its payload.
            let mut client = c.client("alpha");
            assert_eq!(
                client.write(size - 10, &rng.bytes(4096), false),
                Err(ErrorCode::NoSpace)
            );
        }
        7 => {
            // Oversized write.
            let mut client = c.client("alpha");
            let len = MAX_PAYLOAD + 1 + rng.below(u64::from(u32::MAX - MAX_PAYLOAD - 1)) as u32;
            client
                .stream
                .write_all(&header(CMD_WRITE, 0, 1, offset, len))
                .unwrap();
            client.expect_closed();
        }
        8 => {
            // Header cut off.
            let mut client = c.client("alpha");
            let h = header(CMD_WRITE, 0, 1, offset, 4096);
            client
                .stream
                .write_all(&h[..1 + rng.below(27) as usize])
                .unwrap();
        }
        9 => {
            // Payload cut off.
            let mut client = c.client("alpha");
            client
                .stream
                .write_all(&header(CMD_WRITE, 0, 1, offset, 65536))
                .unwrap();
            client.stream.write_all(&rng.bytes_below(65536)).unwrap();
        }
        10 => vanish(c, CMD_READ, 32, 4096 * (1 + rng.below(16) as u32), bad),
        11 => vanish(
            c,
            CMD_WRITE,
            32,
            4096 * (1 + rng.below(4) as u32),
            bad + rng.below(64) * 4096,
        ),
        12 => drop(c.connect("alpha")),
        13 => {
            // A polite session.
            let mut client = c.client("alpha");
            client
                .write(offset, &rng.bytes(1000), rng.below(2) == 0)
                .unwrap();
            client.disconnect();
        }
        14 => {
            // The wrong export.
            let err = RawClient::go(c.connect("alpha"), "nope")
                .err()
                .expect("unknown export refused");
            assert!(err.contains("nope"), "{err}");
        }
        15 => {
            // An option claiming more data than it sends.
            let mut s = c.connect("alpha");
            greet(&mut *s);
            let mut o = encode_option(OPT_GO, &[]);
            o[12..16].copy_from_slice(&(1u32 << 20).to_be_bytes());
            s.write_all(&o).unwrap();
            s.write_all(&rng.bytes_below(2000)).unwrap();
        }
        _ => {
            // Old-style EXPORT_NAME, then gone in transmission.
            let mut s = c.connect("alpha");
            greet(&mut *s);
            s.write_all(&encode_option(OPT_EXPORT_NAME, b"r0")).unwrap();
            let mut info = [0u8; 10];
            s.read_exact(&mut info).unwrap();
        }
    }
}

/// A well-behaved client: random byte-granular writes and checked reads in
/// `[0, region)` until `stop`; returns the expected content and its op count.
fn good_client(c: &Cluster, seed: u64, region: usize, stop: &AtomicBool) -> (Vec<u8>, u64) {
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; region];
    let mut client = c.client("alpha");
    let mut ops = 0;
    while !stop.load(Ordering::Relaxed) || ops < 100 {
        let len = 1 + rng.below(64 * 1024) as usize;
        let offset = rng.below((region - len) as u64) as usize;
        let data = rng.bytes(len);
        client
            .write(offset as u64, &data, rng.below(8) == 0)
            .unwrap();
        model[offset..offset + len].copy_from_slice(&data);
        let len = 1 + rng.below(128 * 1024) as usize;
        let offset = rng.below((region - len) as u64) as usize;
        let got = client.read(offset as u64, len as u32).unwrap();
        assert!(
            got == model[offset..offset + len],
            "good client: read {len} at {offset} is wrong"
        );
        if rng.below(16) == 0 {
            client.flush().unwrap();
        }
        ops += 1;
    }
    client.disconnect();
    (model, ops)
}

#[test]
fn a_thousand_bad_sessions_while_a_good_client_works() {
    let mut c = serving();
    let size = c.size("alpha");
    let seed = Rng::seed_from_env(20_261_122);
    const REGION: usize = 8 << 20;
    const WORKERS: u64 = 4;
    const SESSIONS: u64 = 400;
    let bad = 32 * MIB;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (model, ops) = std::thread::scope(|s| {
        let good = s.spawn(|| good_client(&c, seed, REGION, &stop));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let c = &c;
                s.spawn(move || {
                    let mut rng = Rng::new(seed ^ ((w + 1) * 0x1000_0001));
                    for _ in 0..SESSIONS {
                        bad_session(c, &mut rng, size, bad);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a bad-session worker failed");
        }
        stop.store(true, Ordering::Relaxed);
        good.join().expect("the good client failed")
    });
    eprintln!(
        "{} bad sessions and {ops} good operations in {:?}",
        WORKERS * SESSIONS,
        started.elapsed()
    );

    assert!(c.is_running("alpha"), "repd died:\n{}", c.log("alpha"));
    assert!(!c.log("alpha").contains("panicked"), "{}", c.log("alpha"));
    c.wait_clients("alpha", 0);
    let s = c.status("alpha");
    assert_eq!(
        (s["role"].as_str(), s["disk"].as_str()),
        (Some("Primary"), Some("UpToDate"))
    );
    // The good client's data, through the export and on the disk.
    let mut client = c.client("alpha");
    for chunk in 0..REGION / (1 << 20) {
        let got = client.read((chunk << 20) as u64, 1 << 20).unwrap();
        assert!(
            got == model[chunk << 20..(chunk + 1) << 20],
            "MiB {chunk} of the good client's data differs"
        );
    }
    client.flush().unwrap();
    client.disconnect();
    assert!(
        c.read_disk("alpha", 0, REGION) == model,
        "the disk differs from the good client's data"
    );
    // No session is left attached: demotion is allowed.
    c.repctl("alpha", &["secondary"]).ok();
    assert_eq!(c.down("alpha"), Some(0));
}

/// repd's resident memory in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// A client that asks for data and never reads it cannot make repd buffer
/// more than a connection's budget (256 MiB): 40 reads of 32 MiB (1.25 GiB)
/// stay unread in the socket.
#[test]
fn unread_answers_are_bounded_by_the_connection_budget() {
    let mut c = Spec::single(64 * MIB)
        .nbd(NbdKind::Tcp)
        .repd_args(&["--no-mlock"])
        .build();
    c.up_primary("alpha");
    let pid = c.pid("alpha");
    let base = rss(pid);
    let mut client = c.client("alpha");
    let before = c.status("alpha")["counters"]["disk_read_bytes"]
        .as_u64()
        .unwrap();
    for _ in 0..40 {
        client.send(CMD_READ, 0, 0, MAX_PAYLOAD, &[]);
    }
    // Wait until repd has read what its budget allows, and a little longer
    // for anything it should not have done.
    let read = wait_for(
        "repd to execute reads",
        std::time::Duration::from_secs(30),
        || {
            let read = c.status("alpha")["counters"]["disk_read_bytes"]
                .as_u64()
                .unwrap()
                - before;
            (read >= 7 * u64::from(MAX_PAYLOAD)).then_some(read)
        },
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(1);
    let mut peak = 0;
    while Instant::now() < deadline {
        peak = peak.max(rss(pid));
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let read_now = c.status("alpha")["counters"]["disk_read_bytes"]
        .as_u64()
        .unwrap()
        - before;
    eprintln!("read {read} then {read_now} bytes; rss {base} -> {peak}");
    assert!(
        read_now <= 9 * u64::from(MAX_PAYLOAD),
        "repd executed {read_now} bytes of reads nobody takes"
    );
    assert!(
        peak - base < 400 * MIB,
        "repd grew by {} MiB for one connection",
        (peak - base) / MIB
    );
    drop(client);
    assert_serves(&mut c, 9);
}

/// Requests that are refused (here an unknown command) take budget too
/// until their answers are taken: a client that sends them without reading
/// is stopped, rather than making repd queue answers without bound.
#[test]
fn unread_refusals_are_bounded_too() {
    use std::os::unix::net::UnixStream;
    let mut c = serving_unix();
    let s = UnixStream::connect(&c.node("alpha").nbd_socket).unwrap();
    s.set_write_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let raw = RawClient::go(Box::new(s.try_clone().unwrap()), "r0").unwrap();
    let batch: Vec<u8> = (0..1024u64).flat_map(|i| header(99, 0, i, 0, 0)).collect();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut w = &s;
    let blocked = loop {
        if sent >= 1 << 20 {
            break false;
        }
        match w.write_all(&batch) {
            Ok(()) => sent += 1024,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break true;
            }
            Err(e) => panic!("{e}"),
        }
    };
    eprintln!(
        "sent {sent} refused requests in {:?}; blocked: {blocked}",
        started.elapsed()
    );
    assert!(
        blocked,
        "repd read {sent} requests whose answers nobody reads"
    );
    drop((raw, s));
    assert_serves(&mut c, 10);
}

/// Zero-length requests, also at the very end, are answered (success or
/// EINVAL), change nothing and do not fail the disk; the session goes on.
fn zero_length_requests(io: &str) {
    let mut c = Spec::single(64 * MIB).repd_args(&["--io", io]).build();
    c.up_primary("alpha");
    let size = c.size("alpha");
    let mut client = c.client("alpha");
    client.write(0, &pattern(11, 8192), false).unwrap();
    for offset in [0, 4095, size - 1, size] {
        for (command, flags) in [
            (CMD_READ, 0),
            (CMD_WRITE, 0),
            (CMD_WRITE, CMD_FLAG_FUA),
            (CMD_TRIM, 0),
            (CMD_WRITE_ZEROES, 0),
            (CMD_CACHE, 0),
        ] {
            let cookie = client.send(command, flags, offset, 0, &[]);
            let r = client.reply();
            assert_eq!(r.cookie, cookie);
            assert!(
                matches!(r.error, None | Some(ErrorCode::Invalid)),
                "command {command} at {offset}: {:?}",
                r.error
            );
        }
    }
    assert!(client.read(0, 8192).unwrap() == pattern(11, 8192));
    client.disconnect();
    assert_eq!(c.status("alpha")["disk"], "UpToDate");
    assert_serves(&mut c, 11);
}

#[test]
fn zero_length_requests_are_answered_direct() {
    zero_length_requests("direct");
}

#[test]
fn zero_length_requests_are_answered_buffered() {
    zero_length_requests("buffered");
}

/// NBD_CMD_DISC right behind a burst of writes: every write is answered
/// before the connection closes.
#[test]
fn a_disconnect_behind_requests_in_flight_answers_them_first() {
    let mut c = serving();
    for round in 0..10u64 {
        let mut client = c.client("alpha");
        let mut cookies = std::collections::HashSet::new();
        for i in 0..32u64 {
            cookies.insert(client.send(
                CMD_WRITE,
                0,
                (round * 32 + i) * 65536,
                65536,
                &pattern(round * 32 + i, 65536),
            ));
        }
        client.send(CMD_DISC, 0, 0, 0, &[]);
        for _ in 0..32 {
            let r = client
                .try_reply()
                .expect("an answer to a write sent before NBD_CMD_DISC");
            assert_eq!(r.error, None);
            assert!(cookies.remove(&r.cookie));
        }
        client.expect_closed();
    }
    let mut client = c.client("alpha");
    for b in 0..320u64 {
        assert!(
            client.read(b * 65536, 65536).unwrap() == pattern(b, 65536),
            "block {b}"
        );
    }
    client.disconnect();
    assert_serves(&mut c, 12);
}
