//! Safety drills (CONTRACT section 6) with real `repd` processes: a
//! split-brain that touches neither disk until an operator discards one
//! side, promotion refused under a connected Primary, the fence-peer
//! handler's exit codes with both fencing modes, a Primary killed under
//! load that loses no answered write and resyncs only its activity log
//! (by checksum: only the differing blocks travel), and online verify
//! finding blocks changed behind Tandem's back.
//!
//! Run just these with `cargo nextest run --workspace -E 'binary(safety)'`.

mod common;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tools::Bg;
use common::*;
use serde_json::Value;
use tandem_proto::nbd::consts::{CMD_FLUSH, CMD_WRITE};
use tandem_proto::nbd::transmission::{RequestHeader, SimpleReply};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const T: Duration = Duration::from_secs(20);
const NET: &str = "[net]\nconnect-retry = \"200ms\"\n";

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Bytes the node sent as resync source: data plus zero ranges.
fn resynced(status: &Value) -> u64 {
    u(&status["counters"]["resync_sent_bytes"]) + u(&status["counters"]["resync_zero_sent_bytes"])
}

/// The first `size` bytes of `node`'s backing file (its data area).
fn data_area(c: &Cluster, node: &str, size: u64) -> Vec<u8> {
    read_file_range(&c.node(node).disk, 0, size as usize)
}

fn digest(data: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

/// `repctl events` for `node`, its lines collected in a file.
struct Events {
    _bg: Bg,
    path: std::path::PathBuf,
}

impl Events {
    fn start(c: &Cluster, node: &str) -> Events {
        let path = c.path(&format!("events-{node}.jsonl"));
        let out = std::fs::File::create(&path).unwrap();
        let bg = Bg::spawn(
            Command::new(REPCTL)
                .arg("--config")
                .arg(c.config_of(node))
                .args(["--node", node, "events"])
                .stdout(out)
                .stderr(Stdio::null()),
        );
        // The first line is the current state: the stream is live.
        wait_for("the events stream", T, || {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|s| s.contains('\n'))
                .map(|_| ())
        });
        Events { _bg: bg, path }
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// A raw NBD client on `node` and a handle on its socket to change the
/// read timeout.
fn client_with_timeout(c: &Cluster, node: &str) -> (nbd::RawClient, UnixStream) {
    let sock = UnixStream::connect(&c.node(node).nbd_socket).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let handle = sock.try_clone().unwrap();
    let client = nbd::RawClient::go(Box::new(sock), "r0").expect("NBD GO");
    (client, handle)
}

/// The reply to an already sent request, if one arrives within `wait`.
fn reply_within(
    client: &mut nbd::RawClient,
    sock: &UnixStream,
    wait: Duration,
) -> Option<SimpleReply> {
    sock.set_read_timeout(Some(wait)).unwrap();
    let r = client.try_reply().ok();
    sock.set_read_timeout(Some(T)).unwrap();
    r
}

// ----- 1. split-brain ----------------------------------------------------

#[test]
fn split_brain_touches_neither_disk_until_discard_my_data() {
    let mut c = Spec::pair(16 * MIB).sections(NET).build();
    c.up_pair();
    let size = c.size("alpha");
    for n in ["alpha", "beta"] {
        c.repctl(n, &["disconnect"]).ok();
    }
    for n in ["alpha", "beta"] {
        c.wait_status(n, "StandAlone", T, |s| s["connection"] == "StandAlone");
        // alpha is Primary already ("already Primary"); beta is forced.
        c.repctl(n, &["primary", "--force"]).ok();
        assert_eq!(c.field(n, &["role"]), "Primary");
    }
    // Each side writes its own data, partly over the same range.
    for (n, seed) in [("alpha", 1u64), ("beta", 2u64)] {
        let mut client = c.client(n);
        client
            .write(0, &pattern(seed, MIB as usize), false)
            .unwrap();
        client
            .write((2 + seed) * MIB, &pattern(seed + 10, MIB as usize), false)
            .unwrap();
        client.flush().unwrap();
        client.disconnect();
        c.wait_clients(n, 0);
    }
    let before_a = data_area(&c, "alpha", size);
    let before_b = data_area(&c, "beta", size);
    assert_ne!(digest(&before_a), digest(&before_b));

    // Both Primaries (no client attached) reconnect: split-brain.
    for n in ["alpha", "beta"] {
        c.repctl(n, &["connect"]).ok();
    }
    for n in ["alpha", "beta"] {
        let s = c.wait_status(n, "split-brain detected", T, |s| {
            s["split_brain"] == true && s["connection"] == "StandAlone"
        });
        let rule = s["generation_rule"].as_str().unwrap_or_default();
        assert!(rule.starts_with("rule "), "{n}: no rule named: {s}");
        let err = s["last_error"].as_str().unwrap_or_default();
        assert!(
            err.contains("split-brain") && err.contains("rule"),
            "{n}: last_error does not name the rule: {s}"
        );
        assert_eq!(s["role"], "Primary", "{n}: {s}");
    }
    // It stays that way: no retry and no resync behind the operator's back.
    std::thread::sleep(Duration::from_millis(600));
    for n in ["alpha", "beta"] {
        let s = c.status(n);
        assert_eq!(s["connection"], "StandAlone", "{n}: {s}");
        assert_eq!(s["split_brain"], true, "{n}: {s}");
    }
    assert_eq!(
        digest(&data_area(&c, "alpha", size)),
        digest(&before_a),
        "split-brain detection changed alpha's data"
    );
    assert_eq!(
        digest(&data_area(&c, "beta", size)),
        digest(&before_b),
        "split-brain detection changed beta's data"
    );

    // Resolve: beta's changes are dropped, alpha's kept.
    let events = Events::start(&c, "beta");
    let sent_before = resynced(&c.status("alpha"));
    c.repctl("beta", &["connect", "--discard-my-data"]).ok();
    c.repctl("alpha", &["connect"]).ok();
    let out = c.repctl("beta", &["wait-sync", "--timeout", "20s"]);
    assert_eq!(out.code, 0, "wait-sync: {out:?}");
    assert!(
        events
            .lines()
            .iter()
            .any(|e| e["replication"] == "SyncTarget"),
        "beta never became SyncTarget: {:?}",
        events.lines()
    );
    for (n, role) in [("alpha", "Primary"), ("beta", "Secondary")] {
        let s = c.status(n);
        assert_eq!(s["role"], role, "{n}: {s}");
        assert_eq!(s["split_brain"], false, "{n}: {s}");
        assert_eq!(s["disk"], "UpToDate", "{n}: {s}");
        assert_eq!(s["connection"], "Connected", "{n}: {s}");
    }
    assert!(c.data_identical(), "the data areas differ after resolution");
    assert_eq!(
        digest(&data_area(&c, "beta", size)),
        digest(&before_a),
        "beta does not hold the kept node's (alpha's) data"
    );
    // Only what either side changed was resynced, not the whole disk.
    let sent = resynced(&c.status("alpha")) - sent_before;
    assert!(sent >= 3 * MIB, "resynced {sent} bytes for 3 MiB changed");
    assert!(sent < size / 2, "looks like a full resync: {sent}");
}

// ----- 2. no second Primary while connected ------------------------------

#[test]
fn promotion_is_refused_while_the_connected_peer_is_primary() {
    let mut c = Spec::pair(8 * MIB).build();
    c.up_pair();
    for args in [&["primary"][..], &["primary", "--force"][..]] {
        let out = c.repctl("beta", args);
        assert_eq!(out.code, 3, "{args:?} was not refused: {out:?}");
        assert!(
            out.stderr.starts_with("refused:"),
            "{args:?}: message does not start with `refused:`: {out:?}"
        );
        assert!(
            out.stderr.contains("Primary") && out.stderr.contains("secondary"),
            "{args:?}: message names neither the rule nor the way out: {out:?}"
        );
    }
    assert_eq!(c.field("beta", &["role"]), "Secondary");
    let s = c.status("alpha");
    assert_eq!(s["role"], "Primary");
    assert_eq!(s["connection"], "Connected");
    // The way out works: demote alpha, then beta may be promoted.
    c.repctl("alpha", &["secondary"]).ok();
    c.repctl("beta", &["primary"]).ok();
    assert_eq!(c.field("beta", &["role"]), "Primary");
    assert_eq!(c.field("alpha", &["role"]), "Secondary");
}

// ----- 3. fencing ---------------------------------------------------------

/// A pair with `fencing = mode` and a scripted fence-peer handler that
/// appends its environment to `fence-calls`, waits until the file
/// `fence-release` exists (so the test sees the state while it runs; at
/// most 20 s, or until the cluster's directory is removed, so a failing
/// test leaves no handler behind) and exits with the number in `fence-exit`.
fn fenced_pair(mode: &str, exit: i32) -> Cluster {
    let mut c = Spec::pair(8 * MIB)
        .resource(&format!("fencing = \"{mode}\""))
        .sections(&format!(
            "{NET}\n[handlers]\nfence-peer = \"fence-peer.sh\"\n"
        ))
        .build();
    let script = c.path("fence-peer.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n\
         dir=$(dirname \"$0\")\n\
         echo \"$TANDEM_RESOURCE $TANDEM_NODE $TANDEM_PEER $TANDEM_PEER_ADDRESS\" >> \"$dir/fence-calls\"\n\
         i=0\n\
         while [ -d \"$dir\" ] && [ ! -e \"$dir/fence-release\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done\n\
         exit $(cat \"$dir/fence-exit\")\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(c.path("fence-exit"), exit.to_string()).unwrap();
    c.up_pair();
    c
}

/// Let the running (or next) handler exit.
fn release_handler(c: &Cluster) {
    std::fs::write(c.path("fence-release"), "").unwrap();
}

fn fence_calls(c: &Cluster) -> Vec<String> {
    std::fs::read_to_string(c.path("fence-calls"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Wait until the handler has been called `n` times in all; returns the
/// last call's line.
fn wait_fence_call(c: &Cluster, n: usize) -> String {
    wait_for("the fence-peer handler to run", T, || {
        let calls = fence_calls(c);
        (calls.len() >= n).then(|| calls[n - 1].clone())
    })
}

/// Wait until `node`'s core has acted on the handler's `n`th exit: it logs
/// the outcome ("fence-peer confirmed", "fence-peer says ...", "fence-peer
/// did not confirm") while it applies it, so status read afterwards shows
/// the result.
fn wait_handler_exit(c: &Cluster, node: &str, n: usize) {
    wait_for("the core to act on the fence-peer exit", T, || {
        let log = c.log(node);
        let outcomes = [
            "fence-peer confirmed (",
            "fence-peer says ",
            "fence-peer did not confirm (",
        ]
        .iter()
        .map(|m| log.matches(m).count())
        .sum::<usize>();
        (outcomes >= n).then_some(())
    });
}

/// What the code does with each exit code (`fence_outcome`); see the
/// module comment of `replicator/src/core/fencing.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Confirmed,
    OutdateMyself,
    NotConfirmed,
}

fn expect(code: i32) -> Expect {
    match code {
        // CONTRACT section 6: only "outdated" and "fenced" confirm; 3 (peer
        // Inconsistent) and 5 (unreachable) do not, unlike DRBD.
        4 | 7 => Expect::Confirmed,
        6 => Expect::OutdateMyself,
        _ => Expect::NotConfirmed,
    }
}

/// The Primary loses its peer (killed): the handler runs with the
/// contract's environment; with resource-and-stonith a write sent while it
/// runs is held (`io_suspended`) and answered only once fencing confirms;
/// with resource-only I/O never stops.
fn lost_peer_drill(mode: &str, code: i32) {
    let stonith = mode == "resource-and-stonith";
    let mut c = fenced_pair(mode, code);
    let (mut client, sock) = client_with_timeout(&c, "alpha");
    client.write(0, &[0x11; 4096], false).unwrap();
    assert!(fence_calls(&c).is_empty(), "handler ran while connected");

    c.kill("beta");
    let call = wait_fence_call(&c, 1);
    let beta_addr = format!("127.0.0.1:{}", c.node("beta").link_port);
    assert_eq!(call, format!("r0 alpha beta {beta_addr}"), "handler env");
    // The handler is running (held until released): suspended only with
    // stonith.
    let s = c.status("alpha");
    assert_eq!(s["io_suspended"], stonith, "while the handler runs: {s}");
    assert_eq!(s["role"], "Primary");
    let cookie = client.send(CMD_WRITE, 0, 8192, 4096, &[0x22; 4096]);
    let early = reply_within(&mut client, &sock, Duration::from_millis(300));
    if stonith {
        assert!(early.is_none(), "answered while suspended: {early:?}");
    } else {
        let r = early.expect("resource-only must not hold writes");
        assert_eq!(r.cookie, cookie);
        assert!(r.error.is_none(), "{r:?}");
    }
    release_handler(&c);
    wait_handler_exit(&c, "alpha", 1);
    let s = match expect(code) {
        Expect::Confirmed if stonith => {
            c.wait_status("alpha", "I/O to resume", T, |s| s["io_suspended"] == false)
        }
        Expect::OutdateMyself => c.wait_status("alpha", "alpha to outdate itself", T, |s| {
            s["disk"] == "Outdated"
        }),
        _ => c.status("alpha"),
    };
    match expect(code) {
        Expect::Confirmed => {
            assert_eq!(s["io_suspended"], false, "exit {code}: {s}");
            assert_eq!(s["disk"], "UpToDate", "exit {code}: {s}");
            if stonith {
                let r = reply_within(&mut client, &sock, T).expect("answered after confirmation");
                assert_eq!(r.cookie, cookie);
                assert!(r.error.is_none(), "{r:?}");
            }
            // Serving alone, marking what beta lacks.
            client.write(16384, &[0x33; 4096], false).unwrap();
            assert!(u(&c.field("alpha", &["out_of_sync_bytes"])) >= 3 * BLOCK);
        }
        Expect::OutdateMyself => {
            assert_eq!(s["disk"], "Outdated", "exit 6 must outdate this node: {s}");
            assert_eq!(s["io_suspended"], stonith, "exit 6: {s}");
            if !stonith {
                // Still Primary, but an Outdated disk serves no I/O
                // (durability.md, invariant 8).
                let r = client.write(16384, &[0x33; 4096], false);
                assert!(r.is_err(), "exit 6: an Outdated Primary wrote: {r:?}");
            }
            if stonith {
                let r = reply_within(&mut client, &sock, Duration::from_millis(500));
                assert!(r.is_none(), "exit 6: a held write was answered: {r:?}");
            }
        }
        Expect::NotConfirmed => {
            assert_eq!(s["io_suspended"], stonith, "exit {code}: {s}");
            assert_eq!(s["disk"], "UpToDate", "exit {code}: {s}");
            if stonith {
                let r = reply_within(&mut client, &sock, Duration::from_millis(500));
                assert!(r.is_none(), "exit {code}: answered unconfirmed: {r:?}");
                // The operator states the peer is off: I/O resumes.
                c.repctl("alpha", &["fence-confirm"]).ok();
                let r = reply_within(&mut client, &sock, T).expect("answered after fence-confirm");
                assert_eq!(r.cookie, cookie);
                assert!(r.error.is_none(), "{r:?}");
                assert_eq!(c.field("alpha", &["io_suspended"]), false);
            } else {
                client.write(16384, &[0x33; 4096], false).unwrap();
            }
        }
    }
    // The handler ran once, on alpha only.
    assert_eq!(fence_calls(&c).len(), 1, "{:?}", fence_calls(&c));
}

/// A Secondary whose Primary died is promoted only when the handler
/// confirms, or after `fence-confirm`.
fn promote_drill(mode: &str, code: i32) {
    let mut c = fenced_pair(mode, code);
    release_handler(&c);
    c.kill("alpha");
    c.wait_status("beta", "beta to lose alpha", T, |s| {
        s["connection"] != "Connected"
    });
    assert!(fence_calls(&c).is_empty(), "a Secondary ran the handler");
    let out = c.repctl("beta", &["primary"]);
    let call = wait_fence_call(&c, 1);
    let alpha_addr = format!("127.0.0.1:{}", c.node("alpha").link_port);
    assert_eq!(call, format!("r0 beta alpha {alpha_addr}"), "handler env");
    let s = c.status("beta");
    match expect(code) {
        Expect::Confirmed => {
            assert_eq!(out.code, 0, "exit {code} must grant promotion: {out:?}");
            assert_eq!(s["role"], "Primary", "{s}");
            assert_eq!(s["io_suspended"], false, "{s}");
            let mut client = c.client("beta");
            client.write(0, &[0x44; 4096], false).unwrap();
        }
        Expect::OutdateMyself => {
            assert_eq!(out.code, 3, "exit 6 must refuse promotion: {out:?}");
            assert!(out.stderr.starts_with("refused:"), "{out:?}");
            assert_eq!(s["role"], "Secondary", "{s}");
            assert_eq!(s["disk"], "Outdated", "{s}");
        }
        Expect::NotConfirmed => {
            assert_eq!(out.code, 3, "exit {code} must refuse promotion: {out:?}");
            assert!(
                out.stderr.starts_with("refused:") && out.stderr.contains("fence-confirm"),
                "the refusal names neither the rule nor the way out: {out:?}"
            );
            assert_eq!(s["role"], "Secondary", "{s}");
            c.repctl("beta", &["fence-confirm"]).ok();
            c.repctl("beta", &["primary"]).ok();
            assert_eq!(c.field("beta", &["role"]), "Primary");
            // Confirmed by the operator: no second handler run.
            assert_eq!(fence_calls(&c).len(), 1, "{:?}", fence_calls(&c));
        }
    }
}

/// A Secondary restarted while its Primary is gone has Consistent, not
/// UpToDate, data (it cannot know whether the Primary wrote on): `primary`
/// is refused without asking the handler (whose confirmation would prove
/// only that the peer cannot write now, not that this copy has its last
/// writes; docs/decisions.md). `fence-confirm` states the same thing and
/// does not change it either (docs/durability.md, invariant 28), not even
/// after another restart; only `primary --force` declares this copy the
/// good one.
#[test]
fn a_restarted_secondary_is_promoted_only_with_force() {
    let mut c = fenced_pair("resource-only", 4);
    release_handler(&c);
    c.kill("alpha");
    c.kill("beta");
    c.start("beta");
    assert_eq!(c.field("beta", &["disk"]), "Consistent");
    let out = c.repctl("beta", &["primary"]);
    assert_eq!(out.code, 3, "a Consistent disk was promoted: {out:?}");
    assert!(out.stderr.starts_with("refused:"), "{out:?}");
    assert!(fence_calls(&c).is_empty(), "{:?}", fence_calls(&c));
    assert_eq!(c.field("beta", &["role"]), "Secondary");
    let out = c.repctl("beta", &["fence-confirm"]).ok();
    assert!(out.stdout.contains("not UpToDate"), "{out:?}");
    for restart in [false, true] {
        if restart {
            c.kill("beta");
            c.start("beta");
        }
        assert_eq!(c.field("beta", &["disk"]), "Consistent");
        let out = c.repctl("beta", &["primary"]);
        assert_eq!(out.code, 3, "promoted after fence-confirm: {out:?}");
        assert!(out.stderr.contains("--force"), "{out:?}");
    }
    c.repctl("beta", &["primary", "--force"]).ok();
    assert_eq!(c.field("beta", &["role"]), "Primary");
    assert_eq!(c.field("beta", &["disk"]), "UpToDate");
}

macro_rules! fencing_drills {
    ($($name:ident: $drill:ident($mode:expr, $code:expr);)*) => {
        $(
            #[test]
            fn $name() {
                $drill($mode, $code);
            }
        )*
    };
}

fencing_drills! {
    stonith_lost_peer_exit_3_peer_inconsistent: lost_peer_drill("resource-and-stonith", 3);
    stonith_lost_peer_exit_4_peer_outdated: lost_peer_drill("resource-and-stonith", 4);
    stonith_lost_peer_exit_5_peer_unreachable: lost_peer_drill("resource-and-stonith", 5);
    stonith_lost_peer_exit_6_peer_primary: lost_peer_drill("resource-and-stonith", 6);
    stonith_lost_peer_exit_7_peer_fenced: lost_peer_drill("resource-and-stonith", 7);
    stonith_lost_peer_exit_1_not_confirmed: lost_peer_drill("resource-and-stonith", 1);
    resource_only_lost_peer_exit_3: lost_peer_drill("resource-only", 3);
    resource_only_lost_peer_exit_4: lost_peer_drill("resource-only", 4);
    resource_only_lost_peer_exit_5: lost_peer_drill("resource-only", 5);
    resource_only_lost_peer_exit_6: lost_peer_drill("resource-only", 6);
    resource_only_lost_peer_exit_7: lost_peer_drill("resource-only", 7);
    resource_only_lost_peer_exit_1: lost_peer_drill("resource-only", 1);
    promote_disconnected_exit_3: promote_drill("resource-only", 3);
    promote_disconnected_exit_4: promote_drill("resource-only", 4);
    promote_disconnected_exit_5: promote_drill("resource-only", 5);
    promote_disconnected_exit_6: promote_drill("resource-only", 6);
    promote_disconnected_exit_7: promote_drill("resource-and-stonith", 7);
        promote_disconnected_exit_1: promote_drill("resource-and-stonith", 1);

}

// ----- 4. Primary crash under load ---------------------------------------

/// The blocks the writer uses: 1024 blocks in each of three 4 MiB
/// activity-log extents, interleaved, each block written once.
fn crash_block_offset(i: u64) -> u64 {
    const BASES: [u64; 3] = [0, 60 * MIB, 120 * MIB];
    let region = (i % 3) as usize;
    let j = i / 3;
    BASES[region] + ((j * 389) % 1024) * BLOCK
}
const CRASH_BLOCKS: u64 = 3 * 1024;

#[derive(Default)]
struct WriteLog {
    /// Block numbers whose write was answered successfully, in order.
    answered: Vec<u64>,
    /// How many of `answered` a later FLUSH covered.
    flushed: usize,
    done: bool,
    /// Every block was written (nothing left in flight for the crash).
    completed: bool,
}

fn send_req(
    stream: &mut dyn nbd::Stream,
    command: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let h = RequestHeader {
        flags: 0,
        command,
        cookie,
        offset,
        length: data.len() as u32,
    };
    let mut msg = h.encode().to_vec();
    msg.extend_from_slice(data);
    stream.write_all(&msg)
}

fn read_reply(stream: &mut dyn nbd::Stream) -> std::io::Result<SimpleReply> {
    let mut raw = [0u8; 16];
    stream.read_exact(&mut raw)?;
    Ok(SimpleReply::decode(&raw).expect("reply magic"))
}

/// Write every crash block once with a unique pattern, 8 in flight, a
/// FLUSH after every 32 answered; stop at the first error (the server
/// died). Every answer and flush is recorded.
fn writer(mut client: nbd::RawClient, log: Arc<Mutex<WriteLog>>, stop: Arc<AtomicBool>) {
    let s = &mut *client.stream;
    let mut next = 0u64;
    let cookie = 1000u64;
    'outer: while next < CRASH_BLOCKS && !stop.load(Ordering::Relaxed) {
        for _ in 0..4 {
            let batch: Vec<u64> = (next..(next + 8).min(CRASH_BLOCKS)).collect();
            if batch.is_empty() {
                break;
            }
            for &b in &batch {
                let data = pattern(1000 + b, BLOCK as usize);
                if send_req(s, CMD_WRITE, cookie + b, crash_block_offset(b), &data).is_err() {
                    break 'outer;
                }
            }
            for _ in &batch {
                match read_reply(s) {
                    Ok(r) if r.error.is_none() => {
                        log.lock().unwrap().answered.push(r.cookie - cookie)
                    }
                    _ => break 'outer,
                }
            }
            next += batch.len() as u64;
            // Paced, so the crash finds the writer busy.
            std::thread::sleep(Duration::from_millis(2));
        }
        let covered = log.lock().unwrap().answered.len();
        if send_req(s, CMD_FLUSH, 1, 0, &[]).is_err() {
            break;
        }
        match read_reply(s) {
            Ok(r) if r.error.is_none() && r.cookie == 1 => log.lock().unwrap().flushed = covered,
            _ => break,
        }
    }
    let mut l = log.lock().unwrap();
    l.done = true;
    l.completed = next >= CRASH_BLOCKS;
}

#[test]
fn a_primary_killed_under_load_loses_no_answered_write_and_resyncs_its_activity_log() {
    let mut c = Spec::pair(128 * MIB)
        .resource("fencing = \"resource-only\"")
        .sections(NET)
        .build();
    c.up_pair();
    let size = c.size("alpha");
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (client, log, stop) = (c.client("alpha"), log.clone(), stop.clone());
        std::thread::spawn(move || writer(client, log, stop))
    };
    wait_for("flushed writes", T, || {
        let l = log.lock().unwrap();
        assert!(!l.done || l.flushed >= 256, "the writer stopped early");
        (l.flushed >= 256).then_some(())
    });
    // Crash the Primary while writes are in flight.
    c.kill("alpha");
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    assert!(
        !log.lock().unwrap().completed,
        "the writer finished before the crash"
    );
    let (answered, flushed) = {
        let l = log.lock().unwrap();
        (l.answered.clone(), l.flushed)
    };
    eprintln!(
        "{} writes answered, {flushed} covered by a flush",
        answered.len()
    );

    // beta: not without fencing, then fence-confirm and promote.
    c.wait_status("beta", "beta to lose alpha", T, |s| {
        s["connection"] != "Connected"
    });
    let out = c.repctl("beta", &["primary"]);
    assert_eq!(out.code, 3, "promoted without fencing: {out:?}");
    c.repctl("beta", &["fence-confirm"]).ok();
    c.repctl("beta", &["primary"]).ok();
    // Every answered write (protocol C) and so every flushed one is on
    // the new Primary.
    let mut client = c.client("beta");
    for (k, &b) in answered.iter().enumerate() {
        let got = client.read(crash_block_offset(b), BLOCK as u32).unwrap();
        assert!(
            got == pattern(1000 + b, BLOCK as usize),
            "block {b} ({}, answered{}) is missing on the new Primary",
            crash_block_offset(b),
            if k < flushed { " and flushed" } else { "" }
        );
    }
    client.disconnect();

    // The old Primary returns: sync target of its activity log only.
    let events = Events::start(&c, "beta");
    let sent_before = resynced(&c.status("beta"));
    let same_before = u(&c.field("beta", &["counters", "resync_same_bytes"]));
    c.start("alpha");
    let out = c.repctl("alpha", &["wait-sync", "--timeout", "20s"]);
    assert_eq!(out.code, 0, "wait-sync: {out:?}");
    let lines = events.lines();
    assert!(
        lines.iter().any(|e| e["replication"] == "SyncSource"),
        "the new Primary never was SyncSource"
    );
    let total = lines
        .iter()
        .filter_map(|e| e["sync"]["total_bytes"].as_u64())
        .max()
        .unwrap_or(0);
    let sent = resynced(&c.status("beta")) - sent_before;
    let same = u(&c.field("beta", &["counters", "resync_same_bytes"])) - same_before;
    eprintln!(
        "resync: total {total} bytes, sent {sent} bytes, {same} bytes found identical by checksum, of {size}"
    );
    assert!(
        sent + same > 0,
        "nothing resynced after a crash with writes in flight"
    );
    // Checksum-based resync: every marked byte of the log's regions was
    // compared, and only the differing blocks (at most the writes in
    // flight at the crash) were sent.
    assert_eq!(sent + same, total, "marked bytes neither sent nor compared");
    assert!(
        sent <= total / 16,
        "checksum resync sent {sent} of {total} activity-log bytes"
    );
    assert!(
        c.log("beta").contains("compared by checksum")
            || c.log("alpha").contains("compared by checksum"),
        "no log line about the checksum resync"
    );
    // Three extents were written: at most 12 MiB are marked.
    assert!(
        sent <= 12 * MIB,
        "resynced {sent}: more than the activity log"
    );
    assert!(
        total <= 12 * MIB,
        "resync total {total}: more than the activity log"
    );
    assert!(sent < size / 8, "looks like a full resync: {sent}");
    let s = c.status("alpha");
    assert_eq!(s["role"], "Secondary");
    assert_eq!(s["disk"], "UpToDate");
    assert!(c.data_identical(), "the data areas differ after the resync");
}

/// Overwrite bytes of `node`'s backing file directly, behind repd's back.
fn corrupt(c: &Cluster, node: &str, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&c.node(node).disk)
        .unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn verify_finds_blocks_changed_behind_tandems_back_and_reconnecting_resyncs_exactly_them() {
    let mut c = Spec::pair(64 * MIB).sections(NET).build();
    c.up_pair();
    c.qemu_io("alpha", &["write -P 0x5a 0 8M", "flush"]).ok();
    // Four blocks of beta's data area change while both run, connected
    // (two adjacent ones form one range).
    let bad = [5 * BLOCK, 6 * BLOCK, 3000 * BLOCK, 16000 * BLOCK];
    for &off in &bad {
        corrupt(&c, "beta", off + 1024, &[0xc3; 512]);
    }
    assert!(!c.data_identical());
    let ev_a = Events::start(&c, "alpha");
    let ev_b = Events::start(&c, "beta");
    let out = c.repctl("alpha", &["verify"]).ok();
    eprintln!("repctl verify: {}", out.stdout.trim());
    for want in [
        "4 blocks (16384 bytes) out of sync",
        "20480+8192",
        "12288000+4096",
        "65536000+4096",
        "repctl disconnect",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} not in {:?}",
            out.stdout
        );
    }
    for (node, role) in [("alpha", "VerifySource"), ("beta", "VerifyTarget")] {
        let s = c.status(node);
        let v = &s["verify"];
        assert_eq!(v["role"], role, "{node}: {v}");
        assert_eq!(v["complete"], true, "{node}: {v}");
        assert_eq!(u(&v["out_of_sync_blocks"]), 4, "{node}: {v}");
        assert_eq!(u(&v["done_bytes"]), u(&v["total_bytes"]));
        assert_eq!(u(&v["ranges"][0]["offset"]), 5 * BLOCK);
        assert_eq!(u(&v["ranges"][0]["len"]), 2 * BLOCK);
        assert_eq!(u(&s["out_of_sync_bytes"]), 4 * BLOCK, "{node}");
        assert_eq!(s["replication"], "Established");
        assert!(
            c.log(node).contains("online verify finished"),
            "{node}: no verify result in the log"
        );
        assert!(c.log(node).contains("differ from the peer"));
    }
    let la = ev_a.lines();
    assert!(
        la.iter()
            .any(|e| e["replication"] == "VerifySource" && e["sync"]["total_bytes"].is_u64()),
        "alpha never showed VerifySource with progress"
    );
    assert!(
        la.iter()
            .any(|e| e["event"] == "verify-finished" && e["verify"]["out_of_sync_blocks"] == 4),
        "no verify-finished event with the count on alpha"
    );
    assert!(
        ev_b.lines()
            .iter()
            .any(|e| e["replication"] == "VerifyTarget"),
        "beta never showed VerifyTarget"
    );
    // The verify copies nothing.
    assert!(!c.data_identical());

    // The next resync (DRBD's way): disconnect and connect; the Primary
    // is the source and sends exactly the marked blocks.
    // Data or zero ranges (alpha's blocks may read as zeros).
    let received = |s: &Value| {
        u(&s["counters"]["resync_received_bytes"]) + u(&s["counters"]["resync_zero_received_bytes"])
    };
    let sent0 = resynced(&c.status("alpha"));
    let recv0 = received(&c.status("beta"));
    c.repctl("alpha", &["disconnect"]).ok();
    c.repctl("alpha", &["connect"]).ok();
    c.repctl("beta", &["wait-sync", "--timeout", "20s"]).ok();
    c.wait_status("alpha", "alpha to finish the resync", T, |s| {
        s["replication"] == "Established" && s["peer"]["disk"] == "UpToDate"
    });
    let sent = resynced(&c.status("alpha")) - sent0;
    let recv = received(&c.status("beta")) - recv0;
    assert_eq!(sent, 4 * BLOCK, "resync sent {sent} bytes");
    assert_eq!(recv, 4 * BLOCK, "resync received {recv} bytes");
    assert!(c.data_identical(), "the data areas differ after the resync");
    assert_eq!(u(&c.field("beta", &["out_of_sync_bytes"])), 0);
}
