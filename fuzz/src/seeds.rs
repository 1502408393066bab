//! Seed corpora, built from valid sessions of the NBD clients Tandem meets.
//!
//! `cargo test --release write_seed_corpora` (in `fuzz/`) writes them to
//! `corpus/handshake/` and `corpus/request/`, which cargo-fuzz reads by
//! default; nothing binary is committed.

use tandem_proto::nbd::consts::*;
use tandem_proto::nbd::handshake::client::{encode_info_request, encode_option};
use tandem_proto::nbd::transmission::RequestHeader;

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (export.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

fn read_request(cookie: u64) -> Vec<u8> {
    RequestHeader {
        flags: 0,
        command: CMD_READ,
        cookie,
        offset: 0,
        length: 512,
    }
    .encode()
    .to_vec()
}

/// Client byte streams of whole handshakes: (name, stream).
pub fn sessions() -> Vec<(&'static str, Vec<u8>)> {
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let session = |options: &[Vec<u8>], after: &[u8]| {
        let mut s = flags.clone();
        for o in options {
            s.extend_from_slice(o);
        }
        s.extend_from_slice(after);
        s
    };
    let base_allocation = meta_context("r0", &["base:allocation"]);
    let mut v = vec![
        (
            // qemu-nbd / qemu block driver: extended headers, structured
            // replies and a meta context, then GO; all but GO are refused
            // and it falls back to simple replies.
            "qemu",
            session(
                &[
                    encode_option(OPT_EXTENDED_HEADERS, &[]),
                    encode_option(OPT_STRUCTURED_REPLY, &[]),
                    encode_option(OPT_SET_META_CONTEXT, &base_allocation),
                    encode_option(OPT_GO, &encode_info_request("r0", &[INFO_BLOCK_SIZE])),
                ],
                &read_request(1),
            ),
        ),
        (
            // libnbd (nbdinfo, nbdcopy): INFO first, then the contexts.
            "libnbd",
            session(
                &[
                    encode_option(OPT_STRUCTURED_REPLY, &[]),
                    encode_option(
                        OPT_INFO,
                        &encode_info_request("r0", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
                    ),
                    encode_option(OPT_LIST_META_CONTEXT, &base_allocation),
                    encode_option(
                        OPT_GO,
                        &encode_info_request("r0", &[INFO_NAME, INFO_BLOCK_SIZE]),
                    ),
                ],
                &read_request(2),
            ),
        ),
        (
            // nbd-client (the kernel's helper): GO only, default export.
            "nbd-client",
            session(
                &[encode_option(
                    OPT_GO,
                    &encode_info_request("", &[INFO_BLOCK_SIZE]),
                )],
                &[],
            ),
        ),
        (
            // `nbd-client -l` / `nbdinfo --list`: LIST, then ABORT.
            "list-abort",
            session(
                &[encode_option(OPT_LIST, &[]), encode_option(OPT_ABORT, &[])],
                &[],
            ),
        ),
        (
            // An unknown export asked for, then the right one with GO.
            "unknown-then-go",
            session(
                &[
                    encode_option(OPT_INFO, &encode_info_request("nope", &[INFO_NAME])),
                    encode_option(OPT_STARTTLS, &[]),
                    encode_option(OPT_GO, &encode_info_request("r0", &[])),
                ],
                &[],
            ),
        ),
    ];
    // Old clients: EXPORT_NAME without NO_ZEROES, so the 124 zeroes follow.
    let mut old = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    old.extend_from_slice(&encode_option(OPT_EXPORT_NAME, b"r0"));
    old.extend_from_slice(&read_request(3));
    v.push(("export-name", old));
    v
}

/// Handshake target inputs: each session under a few configurations
/// (see `handshake.rs` for the layout of the first bytes).
pub fn handshake() -> Vec<(String, Vec<u8>)> {
    // (name, config byte, chunk sizes)
    let configs: [(&str, u8, &[u8]); 5] = [
        ("whole", 0x00, &[]),
        ("bytewise", 0x10, &[1]),
        ("chunks", 0x30, &[3, 0, 17]),
        ("refusing", 0x24, &[5, 40]),
        ("secondary-long", 0x1a, &[7]),
    ];
    let mut v = Vec::new();
    // An option too long to buffer, then GO: the padding bit (0x80) puts
    // crate::handshake::PAD zero bytes at position 20, right after the
    // long option's header, as its data.
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
    for (name, option) in [("too-big", OPT_GO), ("unknown-long", 99)] {
        let mut input = vec![0x90, 5, 0, 20];
        input.extend_from_slice(&flags);
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&option.to_be_bytes());
        input.extend_from_slice(&(crate::handshake::PAD as u32).to_be_bytes());
        input.extend_from_slice(&encode_option(OPT_GO, &encode_info_request("r0", &[])));
        v.push((name.to_string(), input));
    }
    for (session, stream) in sessions() {
        for (name, config, sizes) in configs {
            let mut input = vec![config];
            input.extend_from_slice(sizes);
            input.extend_from_slice(&stream);
            v.push((format!("{session}-{name}"), input));
        }
    }
    v
}

/// Request target inputs: typical requests under typical limits.
pub fn request() -> Vec<(String, Vec<u8>)> {
    let all = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    let limits: [(&str, u64, u32, u16); 3] = [
        ("rw", 1 << 30, 32 << 20, all),
        (
            "ro",
            1 << 20,
            32 << 20,
            TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH,
        ),
        ("small", 4096, 512, TFLAG_HAS_FLAGS),
    ];
    let requests: [(&str, u16, u16, u64, u32); 10] = [
        ("read", CMD_READ, 0, 4096, 4096),
        ("write-fua", CMD_WRITE, CMD_FLAG_FUA, 0, 512),
        ("disc", CMD_DISC, 0, 0, 0),
        ("flush", CMD_FLUSH, 0, 0, 0),
        ("trim", CMD_TRIM, 0, 1 << 19, 1 << 12),
        ("cache", CMD_CACHE, 0, 0, 1 << 16),
        (
            "zeroes",
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            8192,
            8192,
        ),
        ("block-status", CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096),
        ("read-at-end", CMD_READ, 0, (1 << 20) - 512, 512),
        ("big-write", CMD_WRITE, 0, 0, (32 << 20) + 1),
    ];
    let mut v = Vec::new();
    for (lname, size, max, flags) in limits {
        for (i, (rname, command, cflags, offset, length)) in requests.iter().enumerate() {
            let mut input = size.to_be_bytes().to_vec();
            input.extend_from_slice(&max.to_be_bytes());
            input.extend_from_slice(&flags.to_be_bytes());
            input.push(0);
            let h = RequestHeader {
                flags: *cflags,
                command: *command,
                cookie: i as u64 + 1,
                offset: *offset,
                length: *length,
            };
            input.extend_from_slice(&h.encode());
            v.push((format!("{lname}-{rname}"), input));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tandem_proto::nbd::handshake::{CloseReason, Status};
    use tandem_proto::nbd::transmission::{Command, Decision};

    use super::*;

    /// Every seed passes its target's checks, the sessions end as the real
    /// clients expect, and the corpora are written for cargo-fuzz.
    #[test]
    fn write_seed_corpora() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, seeds) in [("handshake", handshake()), ("request", request())] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, input) in seeds {
                match target {
                    "handshake" => {
                        let status = crate::handshake::check(&input).expect("seed too short");
                        let accepting = input[0] & 7 == 0;
                        match name.split('-').next().unwrap() {
                            "list" => assert_eq!(status, Status::Close(CloseReason::Aborted)),
                            _ if accepting => {
                                assert!(matches!(status, Status::Transmission(_)), "{name}")
                            }
                            _ => {}
                        }
                    }
                    _ => {
                        crate::request::check(&input).expect("seed too short");
                    }
                }
                std::fs::write(dir.join(format!("seed-{name}")), input).unwrap();
            }
        }
        let rw_read = request()
            .into_iter()
            .find(|(n, _)| n == "rw-read")
            .unwrap()
            .1;
        assert_eq!(
            crate::request::check(&rw_read),
            Some(Decision::Execute(Command::Read {
                offset: 4096,
                length: 4096
            }))
        );
    }

    /// Replays every file under `artifacts/` (crashes found by cargo-fuzz)
    /// through its target, so a fix can be checked with `cargo test`.
    #[test]
    fn replay_artifacts() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
        for (target, check) in [
            (
                "handshake",
                (|d: &[u8]| _ = crate::handshake::check(d)) as fn(&[u8]),
            ),
            ("request", |d: &[u8]| _ = crate::request::check(d)),
        ] {
            let Ok(dir) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            for entry in dir {
                let path = entry.unwrap().path();
                eprintln!("replaying {}", path.display());
                check(&std::fs::read(&path).unwrap());
            }
        }
    }
}
