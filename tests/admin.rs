//! Administration of a single node with real processes: roles, `repctl`
//! exit codes and messages, metadata commands, status and events, start-up
//! errors, clean and unclean stops.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::tools::Bg;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// The lines of `text` that are not empty.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

#[test]
fn secondary_refuses_nbd_go_saying_it_is_secondary() {
    require("qemu-io");
    require("nbdinfo");
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    c.start("alpha");
    assert_eq!(c.status("alpha")["role"], "Secondary");

    // Our own client sees the server's message.
    let err = nbd::RawClient::go(c.connect("alpha"), "r0")
        .err()
        .expect("GO must be refused");
    assert!(err.contains("Secondary"), "{err}");

    // qemu prints it.
    let out = c.qemu_io("alpha", &["read 0 512"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("Secondary"), "{out:?}");

    // libnbd (1.14) keeps the server's message for its debug log.
    let out = run(Command::new("nbdinfo")
        .arg(c.uri("alpha"))
        .env("LIBNBD_DEBUG", "1"));
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("server error message") && l.contains("Secondary")),
        "{}",
        out.stderr
    );

    // A node that was Primary and was demoted says the same.
    c.repctl("alpha", &["primary", "--force"]).ok();
    c.client("alpha").disconnect();
    c.wait_clients("alpha", 0);
    c.repctl("alpha", &["secondary"]).ok();
    let err = nbd::RawClient::go(c.connect("alpha"), "")
        .err()
        .expect("GO must be refused");
    assert!(err.contains("Secondary"), "{err}");
}

#[test]
fn primary_on_an_inconsistent_disk_is_refused_with_exit_3() {
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    c.start("alpha");
    assert_eq!(c.status("alpha")["disk"], "Inconsistent");
    let out = c.repctl("alpha", &["primary"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.starts_with("refused:"), "{out:?}");
    assert!(out.stderr.contains("--force"), "names the way out: {out:?}");
    assert_eq!(c.status("alpha")["role"], "Secondary");

    let out = c.repctl("alpha", &["primary", "--force"]).ok();
    assert!(out.stdout.contains("Primary"), "{out:?}");
    let s = c.status("alpha");
    assert_eq!(s["role"], "Primary");
    assert_eq!(s["disk"], "UpToDate");
}

#[test]
fn secondary_is_refused_while_an_nbd_client_is_attached() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let mut client = c.client("alpha");
    client.write(0, &pattern(1, 4096), false).unwrap();
    c.wait_clients("alpha", 1);

    let out = c.repctl("alpha", &["secondary"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.starts_with("refused:"), "{out:?}");
    assert!(out.stderr.contains("NBD client"), "{out:?}");
    assert_eq!(c.status("alpha")["role"], "Primary");
    // The client is unaffected.
    assert_eq!(client.read(0, 4096).unwrap(), pattern(1, 4096));

    client.disconnect();
    c.wait_clients("alpha", 0);
    c.repctl("alpha", &["secondary"]).ok();
    assert_eq!(c.status("alpha")["role"], "Secondary");
    // And back: the data is UpToDate, no --force needed.
    c.repctl("alpha", &["primary"]).ok();
    assert_eq!(c.client("alpha").read(0, 4096).unwrap(), pattern(1, 4096));
}

#[test]
fn repctl_without_a_running_repd_exits_4() {
    let c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["primary"],
        &["secondary"],
        &["down"],
        &["events"],
    ] {
        let out = c.repctl("alpha", args);
        assert_eq!(out.code, 4, "repctl {args:?}: {out:?}");
        assert!(out.stderr.contains("no repd answers"), "{args:?}: {out:?}");
        assert_eq!(lines(&out.stderr).len(), 1, "{out:?}");
    }
}

#[test]
fn create_md_refuses_existing_metadata_and_a_disk_in_use() {
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    let first = c.dump_md("alpha");

    let out = c.repctl("alpha", &["create-md"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "{out:?}"
    );
    assert_eq!(
        c.dump_md("alpha"),
        first,
        "a refused create-md changed the metadata"
    );

    c.repctl("alpha", &["create-md", "--force"]).ok();
    assert_ne!(c.dump_md("alpha")["device_id"], first["device_id"]);

    c.start("alpha");
    for args in [&["create-md", "--force"][..], &["create-md"], &["dump-md"]] {
        let out = c.repctl("alpha", args);
        assert_eq!(out.code, 1, "{args:?} while repd runs: {out:?}");
        assert!(out.stderr.contains("in use"), "{args:?}: {out:?}");
    }
    // repd did not notice anything.
    assert_eq!(c.status("alpha")["disk"], "Inconsistent");
    assert!(c.is_running("alpha"));
}

#[test]
fn dump_md_shows_generations_flags_and_layout() {
    let mut c = Spec::single(64 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    let fresh = c.dump_md("alpha");
    assert_eq!(fresh["resource"], "r0");
    assert_eq!(fresh["node"], "alpha");
    assert_eq!(
        fresh["generation"]["current"], "0000000000000004",
        "UUID_JUST_CREATED"
    );
    assert_eq!(fresh["generation"]["bitmap"], "0000000000000000");
    assert_eq!(fresh["generation"]["history"].as_array().unwrap().len(), 2);
    assert_eq!(fresh["device_id"].as_str().unwrap().len(), 16);
    assert!(fresh["sequence"].is_u64());
    let flags = &fresh["flags"];
    for f in [
        "consistent",
        "was_up_to_date",
        "primary_indicator",
        "crashed_primary",
        "peer_outdated",
        "full_sync",
    ] {
        assert_eq!(flags[f], false, "{f} in fresh metadata: {fresh}");
    }
    assert_eq!(fresh["out_of_sync_blocks"], 0);
    assert_eq!(fresh["out_of_sync_bytes"], 0);
    let layout = &fresh["layout"];
    assert_eq!(layout["meta_disk"], "internal");
    assert_eq!(layout["block_size"], 4096);
    let size = fresh["size_bytes"].as_u64().unwrap();
    assert_eq!(
        layout["md_offset"].as_u64().unwrap(),
        size,
        "internal metadata follows the data area"
    );
    assert!(size + layout["md_size_bytes"].as_u64().unwrap() <= 64 * MIB);
    assert!(layout["activity_log_offset"].as_u64().unwrap() > size);
    assert!(
        layout["bitmap_offset"].as_u64().unwrap() > layout["activity_log_offset"].as_u64().unwrap()
    );
    assert!(layout["bitmap_size_bytes"].as_u64().unwrap() * 8 * 4096 >= size);

    c.start("alpha");
    assert_eq!(c.size("alpha"), size);
    c.repctl("alpha", &["primary", "--force"]).ok();
    let generation = c.status("alpha")["generation"].clone();
    assert_eq!(c.down("alpha"), Some(0));

    let after = c.dump_md("alpha");
    assert_eq!(after["generation"], generation, "dump-md and status agree");
    assert_ne!(after["generation"]["current"], "0000000000000004");
    assert_eq!(
        after["generation"]["bitmap"], "0000000000000004",
        "the old current became the bitmap generation"
    );
    assert!(after["sequence"].as_u64() > fresh["sequence"].as_u64());
    let flags = &after["flags"];
    assert_eq!(flags["consistent"], true, "{after}");
    assert_eq!(flags["was_up_to_date"], true, "{after}");
    assert_eq!(flags["primary_indicator"], false, "{after}");
    assert_eq!(flags["crashed_primary"], false, "{after}");
    assert_eq!(flags["al_clean"], true, "{after}");
    assert_eq!(after["device_id"], fresh["device_id"]);
}

#[test]
fn status_json_has_every_contract_field() {
    let mut c = Spec::single(32 * MIB).build();
    c.up_primary("alpha");
    let s = c.status("alpha");
    let obj = s.as_object().unwrap();
    for key in [
        "resource",
        "node",
        "role",
        "disk",
        "size_bytes",
        "nbd_clients",
        "io_suspended",
        "connection",
        "replication",
        "peer",
        "out_of_sync_bytes",
        "sync",
        "split_brain",
        "generation",
        "counters",
    ] {
        assert!(obj.contains_key(key), "status lacks {key}: {s}");
    }
    assert_eq!(s["resource"], "r0");
    assert_eq!(s["node"], "alpha");
    assert_eq!(s["role"], "Primary");
    assert_eq!(s["disk"], "UpToDate");
    assert_eq!(s["connection"], "StandAlone");
    assert_eq!(s["replication"], "Off");
    assert_eq!(s["peer"], Value::Null);
    assert_eq!(s["sync"], Value::Null);
    assert_eq!(s["split_brain"], false);
    assert_eq!(s["io_suspended"], false);
    assert_eq!(s["out_of_sync_bytes"], 0);
    assert_eq!(s["nbd_clients"], 0);
    assert!(s["size_bytes"].as_u64().unwrap() > 31 * MIB);
    let g = &s["generation"];
    assert_eq!(g["current"].as_str().unwrap().len(), 16);
    assert_eq!(g["bitmap"].as_str().unwrap().len(), 16);
    assert_eq!(g["history"].as_array().unwrap().len(), 2);
    for key in [
        "net_sent_bytes",
        "net_received_bytes",
        "disk_read_bytes",
        "disk_written_bytes",
        "resync_sent_bytes",
        "resync_received_bytes",
        "resync_zero_sent_bytes",
        "resync_zero_received_bytes",
    ] {
        assert!(s["counters"][key].is_u64(), "counters.{key}: {s}");
    }

    // The counters count client I/O.
    let mut client = c.client("alpha");
    client.write(0, &pattern(2, 8192), false).unwrap();
    client.read(0, 4096).unwrap();
    let s = c.status("alpha");
    assert_eq!(s["nbd_clients"], 1);
    assert_eq!(s["counters"]["disk_written_bytes"], 8192);
    assert_eq!(s["counters"]["disk_read_bytes"], 4096);

    // The human-readable screen.
    let out = c.repctl("alpha", &["status"]).ok();
    assert!(
        out.stdout.contains("Primary") && out.stdout.contains("UpToDate"),
        "{out:?}"
    );
    assert!(out.stdout.contains("StandAlone"), "{out:?}");
}

/// `repctl events` in the background, its lines arriving on a channel.
struct Events {
    _proc: Bg,
    rx: mpsc::Receiver<Value>,
}

impl Events {
    fn start(c: &Cluster) -> Events {
        let mut proc = Bg::spawn(
            Command::new(REPCTL)
                .arg("--config")
                .arg(&c.config)
                .args(["--node", "alpha", "events"])
                .stdout(Stdio::piped()),
        );
        let stdout = proc.child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("events line is not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Events { _proc: proc, rx }
    }

    fn next(&self) -> Value {
        self.rx
            .recv_timeout(Duration::from_secs(20))
            .expect("an event line")
    }

    /// Lines until one satisfies `f`; returns it.
    fn until(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self
                .rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no event: {what}"));
            check_event(&v);
            if f(&v) {
                return v;
            }
        }
    }
}

fn check_event(v: &Value) {
    assert!(v["event"].is_string(), "no event field: {v}");
    assert!(
        v["timestamp"].is_string() || v["timestamp"].is_number(),
        "no timestamp: {v}"
    );
    assert!(
        v["role"].is_string() && v["disk"].is_string(),
        "not a status object: {v}"
    );
}

#[test]
fn events_print_the_current_state_then_every_change() {
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    c.start("alpha");
    let events = Events::start(&c);
    let first = events.next();
    check_event(&first);
    assert_eq!(first["role"], "Secondary");
    assert_eq!(first["disk"], "Inconsistent");
    assert_eq!(first["resource"], "r0");

    c.repctl("alpha", &["primary", "--force"]).ok();
    let e = events.until("promotion", |v| v["role"] == "Primary");
    assert_eq!(e["disk"], "UpToDate");

    let client = c.client("alpha");
    events.until("a client attached", |v| v["nbd_clients"] == 1);
    client.disconnect();
    events.until("the client detached", |v| v["nbd_clients"] == 0);

    c.repctl("alpha", &["secondary"]).ok();
    events.until("demotion", |v| v["role"] == "Secondary");

    // A second reader starts with the current state.
    let late = Events::start(&c);
    let first = late.next();
    check_event(&first);
    assert_eq!(first["role"], "Secondary");
    assert_eq!(first["disk"], "UpToDate");
}

/// The cluster's config with `insert` after the resource name, saved as
/// `name`; returns its path and the line `key` is on.
fn config_with(c: &Cluster, name: &str, insert: &str, key: &str) -> (std::path::PathBuf, usize) {
    let text = std::fs::read_to_string(&c.config).unwrap();
    let bad = text.replacen("name = \"r0\"\n", &format!("name = \"r0\"\n{insert}\n"), 1);
    let path = c.path(name);
    std::fs::write(&path, &bad).unwrap();
    let line = bad.lines().position(|l| l.starts_with(key)).unwrap() + 1;
    (path, line)
}

#[test]
fn a_bad_config_is_one_line_naming_file_line_and_key() {
    let c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    let cases: [(&str, &str, &str); 3] = [
        ("unknown.toml", "bogus-key = 1", "bogus-key"),
        ("badsize.toml", "[sync]\nrate = \"12 parsecs\"", "rate"),
        (
            "badduration.toml",
            "[net]\nping-timeout = \"soon\"",
            "ping-timeout",
        ),
    ];
    for (file, insert, key) in cases {
        let (path, line) = config_with(&c, file, insert, key);
        let want = format!("{file}:{line}");

        let out = c.repd_once("alpha", &path, &[]);
        assert_ne!(out.code, 0, "repd accepted {insert}: {out:?}");
        let l = lines(&out.stderr);
        assert_eq!(
            l.len(),
            1,
            "repd should print one line for {insert}, got:\n{}",
            out.stderr
        );
        assert!(
            l[0].contains(&want) && l[0].contains(key),
            "{want} and {key} in: {}",
            l[0]
        );

        let out = run(Command::new(REPCTL)
            .arg("--config")
            .arg(&path)
            .arg("status"));
        assert_eq!(out.code, 1, "{out:?}");
        let l = lines(&out.stderr);
        assert_eq!(l.len(), 1, "{out:?}");
        assert!(l[0].contains(&want) && l[0].contains(key), "{}", l[0]);
    }
    // The same with machine logs: still one line.
    let (path, _) = config_with(&c, "json.toml", "bogus-key = 1", "bogus-key");
    let out = c.repd_once("alpha", &path, &["--log-format", "json"]);
    assert_ne!(out.code, 0);
    assert_eq!(lines(&out.stderr).len(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("bogus-key"), "{}", out.stderr);
}

#[test]
fn missing_metadata_or_disk_is_one_clear_line() {
    let c = Spec::single(16 * MIB).build();
    // No create-md.
    let out = c.repd_once("alpha", &c.config, &[]);
    assert_ne!(out.code, 0, "{out:?}");
    let l = lines(&out.stderr);
    assert_eq!(l.len(), 1, "one line, got:\n{}", out.stderr);
    assert!(
        l[0].contains("metadata") && l[0].contains("create-md"),
        "{}",
        l[0]
    );
    assert!(
        !c.node("alpha").control.exists(),
        "no control socket left behind"
    );

    // No disk at all.
    std::fs::remove_file(&c.node("alpha").disk).unwrap();
    let out = c.repd_once("alpha", &c.config, &[]);
    assert_ne!(out.code, 0, "{out:?}");
    let l = lines(&out.stderr);
    assert_eq!(l.len(), 1, "one line, got:\n{}", out.stderr);
    assert!(
        l[0].contains(&c.node("alpha").disk.display().to_string()),
        "{}",
        l[0]
    );
}

/// Keep `depth` requests in flight on `client` until the connection ends:
/// first writes, each to a block of its own in `[base, base + region)`,
/// then reads of the answered writes, checked. Every answer must be a
/// success. Returns the (offset, seed) of every answered write.
fn hammer(mut client: nbd::RawClient, base: u64, region: u64, depth: usize) -> Vec<(u64, u64)> {
    use std::collections::HashMap;
    use tandem_proto::nbd::consts::{CMD_READ, CMD_WRITE};
    const LEN: u32 = 64 * 1024;
    let blocks = region / u64::from(LEN);
    // cookie -> (is_write, offset, seed)
    let mut in_flight: HashMap<u64, (bool, u64, u64)> = HashMap::new();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let (mut written, mut reads, mut cookie) = (0u64, 0usize, 0u64);
    let mut open = true;
    loop {
        while open && in_flight.len() < depth {
            cookie += 1;
            let h = tandem_proto::nbd::transmission::RequestHeader {
                flags: 0,
                command: CMD_WRITE,
                cookie,
                offset: 0,
                length: LEN,
            };
            let (h, payload, entry) = if written < blocks {
                let offset = base + written * u64::from(LEN);
                let seed = 1000 + offset;
                written += 1;
                (
                    tandem_proto::nbd::transmission::RequestHeader { offset, ..h },
                    pattern(seed, LEN as usize),
                    (true, offset, seed),
                )
            } else if !acked.is_empty() {
                let (offset, seed) = acked[reads % acked.len()];
                reads += 1;
                (
                    tandem_proto::nbd::transmission::RequestHeader {
                        command: CMD_READ,
                        offset,
                        ..h
                    },
                    Vec::new(),
                    (false, offset, seed),
                )
            } else {
                break;
            };
            let mut msg = h.encode().to_vec();
            msg.extend_from_slice(&payload);
            // The server stops reading when it stops: then stop sending.
            if std::io::Write::write_all(&mut client.stream, &msg).is_err() {
                open = false;
                break;
            }
            in_flight.insert(h.cookie, entry);
        }
        let Ok(r) = client.try_reply() else {
            return acked;
        };
        assert_eq!(
            r.error, None,
            "a request was answered with an error during the stop"
        );
        let (is_write, offset, seed) = in_flight
            .remove(&r.cookie)
            .expect("reply to a request in flight");
        if is_write {
            acked.push((offset, seed));
        } else {
            let mut data = vec![0u8; LEN as usize];
            if std::io::Read::read_exact(&mut client.stream, &mut data).is_err() {
                panic!("the connection ended in the middle of a read reply");
            }
            assert!(
                data == pattern(seed, LEN as usize),
                "read at {offset} returned wrong data"
            );
        }
    }
}

fn stop_under_load(stop: impl FnOnce(&mut Cluster) -> Option<i32>) {
    let mut c = Spec::single(64 * MIB).build();
    c.up_primary("alpha");
    let workers: Vec<_> = (0..2u64)
        .map(|i| {
            let client = c.client("alpha");
            std::thread::spawn(move || hammer(client, i * 24 * MIB, 24 * MIB, 16))
        })
        .collect();
    // Let them get going.
    wait_for("client writes", Duration::from_secs(20), || {
        (c.status("alpha")["counters"]["disk_written_bytes"]
            .as_u64()
            .unwrap()
            > 4 * MIB)
            .then_some(())
    });
    assert_eq!(
        stop(&mut c),
        Some(0),
        "repd must exit 0:\n{}",
        c.log("alpha")
    );
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.join().expect("client thread"));
    }
    assert!(!acked.is_empty());
    // Every answered write is on the disk.
    for (offset, seed) in &acked {
        assert!(
            c.read_disk("alpha", *offset, 64 * 1024) == pattern(*seed, 64 * 1024),
            "answered write at {offset} is not on disk"
        );
    }
    let md = c.dump_md("alpha");
    assert_eq!(md["flags"]["primary_indicator"], false, "{md}");
    assert_eq!(md["flags"]["al_clean"], true, "{md}");
    assert_eq!(md["flags"]["crashed_primary"], false, "{md}");
}

#[test]
fn repctl_down_under_load_answers_in_flight_requests_and_exits_0() {
    stop_under_load(|c| c.down("alpha"));
}

#[test]
fn sigterm_under_load_answers_in_flight_requests_and_exits_0() {
    stop_under_load(|c| c.terminate("alpha"));
}

#[test]
fn repctl_down_during_a_fio_run() {
    require("fio");
    let mut c = Spec::single(64 * MIB).build();
    c.up_primary("alpha");
    let mut fio = Bg::spawn(
        Command::new("fio")
            .current_dir(c.dir.path()) // fio leaves its verify state files here
            .args([
                "--name=busy",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bs=16k",
                "--iodepth=16",
                "--size=48M",
                "--time_based",
                "--runtime=60",
                "--output-format=json",
            ])
            .arg(format!("--uri={}", c.uri("alpha")))
            .stdout(std::fs::File::create(c.path("fio.out")).unwrap())
            .stderr(std::fs::File::create(c.path("fio.err")).unwrap()),
    );
    wait_for("fio to write", Duration::from_secs(20), || {
        (c.status("alpha")["counters"]["disk_written_bytes"]
            .as_u64()
            .unwrap()
            > 4 * MIB)
            .then_some(())
    });
    assert_eq!(c.down("alpha"), Some(0), "{}", c.log("alpha"));
    // fio sees the server go away and ends; it does not hang.
    fio.wait(Duration::from_secs(30));
    let md = c.dump_md("alpha");
    assert_eq!(md["flags"]["primary_indicator"], false, "{md}");
}

#[test]
fn kill_9_of_a_primary_leaves_a_crashed_primary() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    c.client("alpha")
        .write(4096, &pattern(3, 4096), true)
        .unwrap();
    c.kill("alpha");

    let md = c.dump_md("alpha");
    assert_eq!(
        md["flags"]["primary_indicator"], true,
        "the disk still says Primary: {md}"
    );
    c.start("alpha");
    let s = c.status("alpha");
    assert_eq!(s["role"], "Secondary");
    assert_eq!(
        s["disk"], "UpToDate",
        "a single node's consistent data is UpToDate"
    );
    assert_eq!(c.down("alpha"), Some(0));
    let md = c.dump_md("alpha");
    assert_eq!(md["flags"]["crashed_primary"], true, "{md}");
    assert_eq!(md["flags"]["primary_indicator"], false, "{md}");

    // It can be promoted again, and the FUA write survived the crash.
    c.start("alpha");
    c.repctl("alpha", &["primary"]).ok();
    assert_eq!(
        c.client("alpha").read(4096, 4096).unwrap(),
        pattern(3, 4096)
    );
}

#[test]
fn a_clean_stop_keeps_the_data_uptodate_for_primary_without_force() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let mut client = c.client("alpha");
    client.write(0, &pattern(4, 65536), false).unwrap();
    client.flush().unwrap();
    client.disconnect();
    assert_eq!(c.down("alpha"), Some(0));
    assert!(!c.node("alpha").control.exists(), "control socket removed");
    c.start("alpha");
    let s = c.status("alpha");
    assert_eq!(
        (s["role"].as_str(), s["disk"].as_str()),
        (Some("Secondary"), Some("UpToDate"))
    );
    c.repctl("alpha", &["primary"]).ok();
    assert_eq!(c.client("alpha").read(0, 65536).unwrap(), pattern(4, 65536));
    assert_eq!(c.terminate("alpha"), Some(0));
}

#[test]
fn help_and_version_list_every_subcommand_and_option() {
    let out = run(Command::new(REPCTL).arg("--help")).ok();
    for sub in [
        "create-md",
        "dump-md",
        "status",
        "events",
        "primary",
        "secondary",
        "down",
    ] {
        assert!(
            out.stdout.contains(sub),
            "repctl --help lacks {sub}:\n{}",
            out.stdout
        );
    }
    let out = run(Command::new(REPD).arg("--help")).ok();
    for opt in [
        "--config",
        "--node",
        "--log-format",
        "--engine",
        "--io",
        "--no-mlock",
    ] {
        assert!(
            out.stdout.contains(opt),
            "repd --help lacks {opt}:\n{}",
            out.stdout
        );
    }
    for bin in [REPD, REPCTL] {
        let out = run(Command::new(bin).arg("--version")).ok();
        assert!(out.stdout.contains(env!("CARGO_PKG_VERSION")), "{out:?}");
    }
}

/// Requests the server has read are answered before a clean stop, even
/// when the client is slow to take the answers: 48 reads of 1 MiB are sent,
/// executed (the disk read counter shows it) and left unread in the socket;
/// only then does `repctl down` start, and the client reads every answer.
#[test]
fn repctl_down_waits_for_a_slow_client_to_take_its_answers() {
    let mut c = Spec::single(64 * MIB).build();
    c.up_primary("alpha");
    let mut client = c.client("alpha");
    client.write(0, &pattern(5, 1 << 20), false).unwrap();
    let before = c.status("alpha")["counters"]["disk_read_bytes"]
        .as_u64()
        .unwrap();
    const N: u64 = 48;
    for _ in 0..N {
        client.send(tandem_proto::nbd::consts::CMD_READ, 0, 0, 1 << 20, &[]);
    }
    wait_for("the reads to be executed", Duration::from_secs(20), || {
        let read = c.status("alpha")["counters"]["disk_read_bytes"]
            .as_u64()
            .unwrap();
        (read - before == N * MIB).then_some(())
    });
    let down = {
        let config = c.config.clone();
        std::thread::spawn(move || {
            run(Command::new(REPCTL)
                .arg("--config")
                .arg(config)
                .args(["--node", "alpha", "down"]))
        })
    };
    let expected = pattern(5, 1 << 20);
    for i in 0..N {
        let r = client
            .try_reply()
            .unwrap_or_else(|e| panic!("answer {i} of {N} lost: {e}"));
        assert_eq!(r.error, None);
        assert!(
            client.read_data(1 << 20) == expected,
            "answer {i} has wrong data"
        );
    }
    nbd::expect_closed(client.stream);
    let out = down.join().unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(c.wait_exit("alpha"), Some(0));
}

/// Clients that stall (mid-handshake, mid-header, mid-payload, or never
/// reading their answers) cannot keep repd from stopping.
#[test]
fn stalled_clients_do_not_block_a_clean_stop() {
    use std::io::Write;
    let mut c = Spec::single(64 * MIB).nbd(NbdKind::Tcp).build();
    c.up_primary("alpha");
    // Connected, never negotiates.
    let silent = c.connect("alpha");
    // Half a request header.
    let mut half = c.client("alpha");
    half.stream
        .write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1, 0, 0])
        .unwrap();
    // A write header and part of its payload.
    let mut partial = c.client("alpha");
    let h = tandem_proto::nbd::transmission::RequestHeader {
        flags: 0,
        command: tandem_proto::nbd::consts::CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 1 << 20,
    };
    partial.stream.write_all(&h.encode()).unwrap();
    partial.stream.write_all(&[7u8; 1000]).unwrap();
    // Reads whose answers (64 MiB) it never takes.
    let mut deaf = c.client("alpha");
    for _ in 0..64 {
        deaf.send(tandem_proto::nbd::consts::CMD_READ, 0, 0, 1 << 20, &[]);
    }
    c.wait_clients("alpha", 3);
    wait_for(
        "the deaf client's reads to start",
        Duration::from_secs(20),
        || {
            (c.status("alpha")["counters"]["disk_read_bytes"]
                .as_u64()
                .unwrap()
                >= 8 * MIB)
                .then_some(())
        },
    );

    let down = {
        let config = c.config.clone();
        std::thread::spawn(move || {
            run(Command::new(REPCTL)
                .arg("--config")
                .arg(config)
                .args(["--node", "alpha", "down"]))
        })
    };
    let exit = c.wait_exit("alpha");
    assert_eq!(exit, Some(0), "{}", c.log("alpha"));
    assert_eq!(down.join().unwrap().code, 0);
    let md = c.dump_md("alpha");
    assert_eq!(md["flags"]["primary_indicator"], false, "{md}");
    drop((silent, half, partial, deaf));
}

/// Each `nbd-client` event is one client arriving or leaving, so in a
/// stream delivered in order the count moves by exactly one per event, and
/// the state before a later change (a demotion) shows no client.
#[test]
fn events_arrive_in_the_order_of_the_changes() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let events = Events::start(&c);
    let first = events.next();
    assert_eq!(first["nbd_clients"], 0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..40 {
                    c.client("alpha").disconnect();
                }
            });
        }
    });
    c.wait_clients("alpha", 0);
    c.repctl("alpha", &["secondary"]).ok();
    let mut last = 0i64;
    let mut seen = 0;
    loop {
        let v = events.next();
        check_event(&v);
        if v["event"] == "lagged" {
            panic!("the reader fell behind; cannot check the order");
        }
        if v["role"] == "Secondary" {
            assert_eq!(v["nbd_clients"], 0);
            break;
        }
        if v["event"] == "nbd-client" {
            let n = v["nbd_clients"].as_i64().unwrap();
            assert_eq!(
                (n - last).abs(),
                1,
                "event {seen}: nbd_clients went from {last} to {n}: out of order"
            );
            last = n;
            seen += 1;
        }
    }
    assert_eq!(seen, 8 * 40 * 2);
    assert_eq!(last, 0, "the last client event must show no client");
}

/// When `repctl down` returns, the disk is free: a script can go on with
/// the metadata commands (or a new repd) at once, as after `drbdadm down`.
#[test]
fn repctl_down_returns_with_the_disk_released() {
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    for round in 0..30 {
        c.start("alpha");
        c.repctl("alpha", &["primary", "--force"]).ok();
        c.client("alpha")
            .write(0, &pattern(round, 4096), true)
            .unwrap();
        // Control clients that stay: one that never sends its request, and
        // an events reader.
        let silent = std::os::unix::net::UnixStream::connect(&c.node("alpha").control).unwrap();
        let events = Events::start(&c);
        events.next();
        c.repctl("alpha", &["down"]).ok();
        // No waiting for the process.
        let out = c.repctl("alpha", &["dump-md"]);
        assert_eq!(
            out.code, 0,
            "round {round}: dump-md right after down: {out:?}"
        );
        assert_eq!(c.wait_exit("alpha"), Some(0));
        drop((silent, events));
    }
    assert!(
        !c.log("alpha").contains("still in use"),
        "{}",
        c.log("alpha")
    );
}

/// Whether nobody holds `path` locked exclusively (as repd does).
fn disk_unlocked(path: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
}

/// Several `repctl down` at once: each gets the answer, after the disk is
/// released.
#[test]
fn concurrent_repctl_downs_all_return_with_the_disk_released() {
    let mut c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    for round in 0..10 {
        c.start("alpha");
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    let out = c.repctl("alpha", &["down"]);
                    // A down that connects while repd is already closing its
                    // control socket finds no repd to answer it.
                    if out.code == 4 {
                        return;
                    }
                    assert_eq!(out.code, 0, "round {round}: {out:?}");
                    // dump-md would take the lock exclusively and race the
                    // other threads' checks: take it shared.
                    assert!(
                        disk_unlocked(&c.node("alpha").disk),
                        "round {round}: down returned, the disk is locked"
                    );
                });
            }
        });
        assert_eq!(c.wait_exit("alpha"), Some(0));
    }
}

/// A second repd for the same disk refuses to start, in one line, and the
/// first one goes on serving (its sockets untouched).
#[test]
fn a_second_repd_on_the_same_disk_refuses_to_start() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let out = c.repd_once("alpha", &c.config, &[]);
    assert_ne!(out.code, 0, "{out:?}");
    let l = lines(&out.stderr);
    assert_eq!(l.len(), 1, "{}", out.stderr);
    assert!(l[0].contains("in use"), "{}", l[0]);
    assert_eq!(c.status("alpha")["role"], "Primary");
    let mut client = c.client("alpha");
    client.write(0, &pattern(9, 4096), false).unwrap();
    assert_eq!(client.read(0, 4096).unwrap(), pattern(9, 4096));
}

/// Logs that go to a file or the journal carry no terminal colour codes,
/// and `--log-format json` gives one JSON object per line.
#[test]
fn logs_are_plain_text_or_json_lines() {
    let c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    for (format, json) in [("human", false), ("json", true)] {
        let log = c.path(&format!("{format}.log"));
        let mut repd = common::tools::Bg::spawn(
            Command::new(REPD)
                .arg("--config")
                .arg(&c.config)
                .args(["--node", "alpha", "--log-format", format])
                .env_remove("NO_COLOR")
                .env("TANDEM_LOG", "info")
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        wait_for("repd to answer", Duration::from_secs(20), || {
            (c.repctl("alpha", &["status"]).code == 0).then_some(())
        });
        c.repctl("alpha", &["primary", "--force"]).ok();
        c.repctl("alpha", &["down"]).ok();
        assert!(repd.wait(Duration::from_secs(20)).success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("Primary"), "{text}");
        assert!(
            !text.contains('\u{1b}'),
            "{format} log has terminal escape codes:\n{text:?}"
        );
        if json {
            for line in lines(&text) {
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
            }
        }
    }
}

/// `meta-disk` as a separate file: create-md creates it, the whole disk is
/// data (to its last byte), dump-md shows the external layout.
#[test]
fn external_metadata_leaves_the_whole_disk_to_data() {
    let mut c = Spec::single(32 * MIB)
        .node_toml("alpha", "meta-disk = \"{dir}/alpha.md\"")
        .build();
    c.repctl("alpha", &["create-md"]).ok();
    let md_file = c.path("alpha.md");
    assert!(md_file.exists(), "create-md creates the metadata file");
    let md = c.dump_md("alpha");
    assert_eq!(md["layout"]["meta_disk"], "external", "{md}");
    assert_eq!(md["size_bytes"].as_u64(), Some(32 * MIB), "{md}");
    c.start("alpha");
    c.repctl("alpha", &["primary", "--force"]).ok();
    assert_eq!(c.size("alpha"), 32 * MIB);
    let mut client = c.client("alpha");
    let tail = pattern(21, 4096 + 3);
    client
        .write(32 * MIB - tail.len() as u64, &tail, true)
        .unwrap();
    assert_eq!(
        client
            .read(32 * MIB - tail.len() as u64, tail.len() as u32)
            .unwrap(),
        tail
    );
    assert_eq!(
        client.read(32 * MIB - 1, 2),
        Err(tandem_proto::nbd::ErrorCode::Invalid)
    );
    client.disconnect();
    assert_eq!(c.down("alpha"), Some(0));
    assert_eq!(
        c.read_disk("alpha", 32 * MIB - tail.len() as u64, tail.len()),
        tail
    );
    let md = c.dump_md("alpha");
    assert_eq!(
        md["flags"]["consistent"], true,
        "the metadata went to the external file: {md}"
    );
    // Without its metadata file, repd says so in one line.
    std::fs::remove_file(&md_file).unwrap();
    let out = c.repd_once("alpha", &c.config, &[]);
    assert_ne!(out.code, 0);
    assert_eq!(lines(&out.stderr).len(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("alpha.md"), "{}", out.stderr);
}

/// `--config` defaults to `$TANDEM_CONFIG`; `--node` to the only node.
#[test]
fn config_from_the_environment_and_the_only_node_by_default() {
    let c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    let mut repd = common::tools::Bg::spawn(
        Command::new(REPD)
            .arg("--config")
            .arg(&c.config)
            .stderr(Stdio::null()),
    );
    let status = || {
        run(Command::new(REPCTL)
            .env("TANDEM_CONFIG", &c.config)
            .args(["status", "--json"]))
    };
    wait_for("repd without --node", Duration::from_secs(20), || {
        (status().code == 0).then_some(())
    });
    let v: Value = serde_json::from_str(&status().stdout).unwrap();
    assert_eq!(v["node"], "alpha");
    run(Command::new(REPCTL)
        .env("TANDEM_CONFIG", &c.config)
        .arg("down"))
    .ok();
    assert!(repd.wait(Duration::from_secs(20)).success());
}

/// Metadata that belongs to another resource, and a disk too small for
/// any: one line each, naming the problem and the way out.
#[test]
fn foreign_metadata_and_a_tiny_disk_are_one_line_each() {
    let c = Spec::single(16 * MIB).build();
    c.repctl("alpha", &["create-md"]).ok();
    let text = std::fs::read_to_string(&c.config).unwrap();
    let other = c.path("r1.toml");
    std::fs::write(&other, text.replacen("name = \"r0\"", "name = \"r1\"", 1)).unwrap();
    let out = c.repd_once("alpha", &other, &[]);
    assert_ne!(out.code, 0);
    let l = lines(&out.stderr);
    assert_eq!(l.len(), 1, "{}", out.stderr);
    assert!(
        l[0].contains("\"r0\"") && l[0].contains("\"r1\"") && l[0].contains("create-md --force"),
        "{}",
        l[0]
    );

    let tiny = Spec::single(512 * 1024).build();
    let out = tiny.repctl("alpha", &["create-md"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(lines(&out.stderr).len(), 1, "{out:?}");
    assert!(out.stderr.contains("too small"), "{out:?}");
}

/// A crash (kill -9) in the middle of a write storm loses no answered
/// write: after the restart every one reads back, through the export.
fn crash_under_load(io: &str) {
    let mut c = Spec::single(64 * MIB).repd_args(&["--io", io]).build();
    c.up_primary("alpha");
    let workers: Vec<_> = (0..2u64)
        .map(|i| {
            let client = c.client("alpha");
            std::thread::spawn(move || hammer(client, i * 24 * MIB, 24 * MIB, 16))
        })
        .collect();
    wait_for("client writes", Duration::from_secs(20), || {
        (c.status("alpha")["counters"]["disk_written_bytes"]
            .as_u64()
            .unwrap()
            > 4 * MIB)
            .then_some(())
    });
    c.kill("alpha");
    let mut acked = Vec::new();
    for w in workers {
        acked.extend(w.join().expect("client thread"));
    }
    assert!(!acked.is_empty());
    // Right after the crash: the kernel may still be tearing down repd's
    // io_uring, with the disk's lock, for a few milliseconds.
    assert_eq!(c.dump_md("alpha")["flags"]["primary_indicator"], true);
    c.start("alpha");
    c.repctl("alpha", &["primary"]).ok();
    let mut client = c.client("alpha");
    for (offset, seed) in &acked {
        assert!(
            client.read(*offset, 64 * 1024).unwrap() == pattern(*seed, 64 * 1024),
            "answered write at {offset} lost in the crash"
        );
    }
}

#[test]
fn kill_9_under_load_loses_no_answered_write_direct() {
    crash_under_load("direct");
}

#[test]
fn kill_9_under_load_loses_no_answered_write_buffered() {
    crash_under_load("buffered");
}

/// Role changes racing client attachment (invariants 8 and 9): a client
/// that got in is never served by a Secondary, so all its I/O succeeds;
/// demotion is refused while it is attached, and GO while Secondary.
#[test]
fn role_changes_racing_clients_never_fail_attached_io() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (served, refused) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..2u64)
            .map(|t| {
                let (c, done) = (&c, &done);
                s.spawn(move || {
                    let (mut served, mut refused) = (0u64, 0u64);
                    let mut i = 0u64;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        match nbd::RawClient::go(c.connect("alpha"), "r0") {
                            Ok(mut client) => {
                                let offset = t * MIB + (i % 64) * 4096;
                                let data = pattern(i, 4096);
                                client
                                    .write(offset, &data, false)
                                    .expect("a write of an attached client");
                                assert_eq!(
                                    client
                                        .read(offset, 4096)
                                        .expect("a read of an attached client"),
                                    data
                                );
                                client.disconnect();
                                served += 1;
                                // Jitter (not synchronisation): leave moments
                                // with no client, when demotion is allowed.
                                std::thread::sleep(Duration::from_micros(
                                    pattern(i, 1)[0] as u64 * 8,
                                ));
                            }
                            Err(e) => {
                                assert!(e.contains("Secondary"), "{e}");
                                refused += 1;
                            }
                        }
                    }
                    (served, refused)
                })
            })
            .collect();
        let mut demoted = 0;
        for _ in 0..100 {
            let out = c.repctl("alpha", &["secondary"]);
            match out.code {
                0 => demoted += 1,
                3 => assert!(out.stderr.contains("NBD client"), "{out:?}"),
                _ => panic!("{out:?}"),
            }
            c.repctl("alpha", &["primary"]).ok();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(demoted > 0, "never demoted");
        clients
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    eprintln!("{served} clients served, {refused} refused");
    assert!(served > 0);
}
