//! Protocol C replication between two real `repd` processes on loopback:
//! identical data after real clients write, answers held until the peer
//! has the write, a killed Secondary resyncing only what changed, link
//! faults injected by the in-tree proxy, refused peers, and a switch-over
//! with a kernel filesystem on the export.

mod common;

use std::process::Command;
use std::time::Duration;

use common::proxy::{Dir, Mode};
use common::tools::{Bg, LoopDev, Mount, Nbdfuse, must};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Bytes the node sent as resync source: data plus zero ranges.
fn resynced(status: &Value) -> u64 {
    u(&status["counters"]["resync_sent_bytes"]) + u(&status["counters"]["resync_zero_sent_bytes"])
}

/// Wait until both disks are UpToDate and in sync.
fn wait_synced(c: &Cluster) {
    let out = c.repctl("beta", &["wait-sync", "--timeout", "120s"]);
    assert_eq!(out.code, 0, "wait-sync: {out:?}\n{}", c.log("beta"));
}

#[test]
fn real_clients_leave_identical_disks() {
    for tool in ["qemu-io", "nbdcopy", "fio"] {
        require(tool);
    }
    let mut c = Spec::pair(160 * MIB).build();
    c.up_pair();
    assert!(c.data_identical(), "initial sync left differences");
    // qemu-io: patterns, FUA, write-zeroes, discard, flush, byte-granular.
    let out = c.qemu_io(
        "alpha",
        &[
            "write -P 0x5a 0 8M",
            "write -f -P 0x11 1M 64k",
            "write -z 2M 1M",
            "discard 4M 1M",
            "write -P 0x22 5 7",
            "flush",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    // nbdcopy of random data.
    let src = c.path("random.bin");
    std::fs::write(&src, pattern(7, (32 * MIB) as usize)).unwrap();
    must(Command::new("nbdcopy").arg(&src).arg(c.uri("alpha")));
    // fio: random writes with periodic flushes, then verify.
    let out = run(Command::new("fio")
        .current_dir(c.dir.path())
        .args([
            "--ioengine=nbd",
            "--name=w",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--offset=64M",
            "--size=32M",
            "--fsync=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--randseed=7",
        ])
        .arg(format!("--uri={}", c.uri("alpha"))));
    assert_eq!(out.code, 0, "fio: {}", out.stderr);
    // Protocol C: every answered write is already on both disks.
    assert!(c.data_identical(), "the data areas differ");
    let s = c.status("alpha");
    assert_eq!(s["replication"], "Established");
    assert_eq!(u(&s["out_of_sync_bytes"]), 0);
    assert!(u(&s["counters"]["net_sent_bytes"]) > 64 * MIB);
}

#[test]
fn a_write_is_answered_only_once_the_peer_has_it() {
    // A long ping-timeout, so the stall is not taken for a dead peer.
    let mut c = Spec::pair(32 * MIB)
        .with_proxy()
        .sections("[net]\nping-timeout = \"60s\"\n")
        .build();
    c.up_pair();
    let sock = std::os::unix::net::UnixStream::connect(&c.node("alpha").nbd_socket).unwrap();
    let timeouts = sock.try_clone().unwrap();
    let mut client = nbd::RawClient::go(Box::new(sock), "r0").unwrap();
    // A FUA write is RWF_DSYNC or write + fdatasync (engine.fua): either
    // counter moves when the local half is durable.
    let syncs = |c: &Cluster| {
        u(&c.field("alpha", &["engine", "dsync_writes"]))
            + u(&c.field("alpha", &["engine", "fdatasyncs"]))
    };
    let before = syncs(&c);
    c.proxy().set(Mode::Stall);
    let cookie = client.send(
        tandem_proto::nbd::consts::CMD_WRITE,
        tandem_proto::nbd::consts::CMD_FLAG_FUA,
        8192,
        4096,
        &[0x77; 4096],
    );
    // The local FUA write completes...
    wait_for("the local write", Duration::from_secs(10), || {
        (syncs(&c) > before).then_some(())
    });
    // ...but the client hears nothing while the peer cannot have it.
    timeouts
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let answered = client.try_reply();
    assert!(
        answered.is_err(),
        "answered before the peer had the write: {answered:?}"
    );
    assert!(c.read_disk("beta", 8192, 4096) != vec![0x77; 4096]);
    c.proxy().set(Mode::Pass);
    timeouts
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let reply = client
        .try_reply()
        .expect("answered after the peer acknowledged");
    assert_eq!(reply.cookie, cookie);
    assert!(reply.error.is_none());
    assert!(
        c.read_disk("beta", 8192, 4096) == vec![0x77; 4096],
        "peer disk lacks the acknowledged write"
    );
}

#[test]
fn killed_secondary_resyncs_only_what_changed() {
    require("fio");
    let mut c = Spec::pair(256 * MIB).build();
    c.up_pair();
    let fio = |runtime: &str| {
        Bg::spawn(
            Command::new("fio")
                .current_dir(c.dir.path())
                .args([
                    "--ioengine=nbd",
                    "--name=w",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=8",
                ])
                .args(["--offset=0", "--size=64M", "--time_based", "--randseed=3"])
                .arg(format!("--runtime={runtime}"))
                .arg(format!("--uri={}", c.uri("alpha")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
    };
    let mut load = fio("4");
    // Let the load run, then kill the Secondary under it.
    wait_for("writes to flow", LONG, || {
        (u(&c.field("alpha", &["counters", "net_sent_bytes"])) > 8 * MIB).then_some(())
    });
    c.kill("beta");
    let status = load.wait(LONG);
    assert!(
        status.success(),
        "fio failed while the Secondary died: {status:?}"
    );
    let s = c.status("alpha");
    assert_eq!(s["role"], "Primary");
    let dirty = u(&s["out_of_sync_bytes"]);
    assert!(dirty > 0, "no blocks marked while the peer was away");
    assert!(dirty <= 64 * MIB, "marked more than was written: {dirty}");
    let sent_before = resynced(&s);
    c.start("beta");
    wait_synced(&c);
    let sent = resynced(&c.status("alpha")) - sent_before;
    assert!(sent >= dirty, "resynced {sent} < {dirty} dirty bytes");
    assert!(
        sent <= dirty + dirty / 20 + MIB,
        "resynced {sent} bytes for {dirty} dirty bytes"
    );
    assert!(sent < 100 * MIB, "looks like a full resync: {sent}");
    assert!(c.data_identical(), "the data areas differ after the resync");
}

/// A pair where beta missed `dirty` bytes of writes and is reconnecting.
fn pair_behind(dirty_mib: u64) -> Cluster {
    let mut c = Spec::pair(256 * MIB)
        .with_proxy()
        .sections(
            "[net]\nping-interval = \"200ms\"\nping-timeout = \"2s\"\nconnect-retry = \"200ms\"\n",
        )
        .build();
    c.up_pair();
    c.repctl("alpha", &["disconnect"]).ok();
    let mut client = c.client("alpha");
    for i in 0..dirty_mib {
        client
            .write(i * MIB, &pattern(i, MIB as usize), false)
            .unwrap();
    }
    client.flush().unwrap();
    assert_eq!(
        u(&c.field("alpha", &["out_of_sync_bytes"])),
        dirty_mib * MIB
    );
    c
}

#[test]
fn a_resync_survives_link_resets_stalls_and_drops() {
    let c = pair_behind(96);
    let baseline = resynced(&c.status("alpha"));
    for fault in ["reset", "stall", "drop"] {
        c.proxy().set(Mode::Pass);
        c.repctl("alpha", &["connect"]).ok();
        // Wait until the resync is under way and has made progress.
        let started = c.wait_status("alpha", "resync progress", LONG, |s| {
            s["replication"] == "SyncSource" && s["sync"]["done_bytes"].as_u64().unwrap_or(0) > 0
        });
        let done_before = u(&started["sync"]["done_bytes"]);
        match fault {
            "reset" => c.proxy().reset(),
            "stall" => c.proxy().set(Mode::Stall),
            _ => c.proxy().set(Mode::Drop),
        }
        if fault != "reset" {
            // The keepalive notices (ping-timeout) and the link drops.
            c.wait_status("alpha", "the link to drop", LONG, |s| {
                s["connection"] != "Connected"
            });
        }
        c.proxy().set(Mode::Pass);
        let s = c.status("alpha");
        if s["replication"] == "Established" {
            break; // it finished before the fault hit; nothing more to show
        }
        assert!(
            u(&s["out_of_sync_bytes"]) < 96 * MIB || done_before == 0,
            "{fault}: no progress kept"
        );
        c.repctl("alpha", &["disconnect"]).ok();
    }
    c.proxy().set(Mode::Pass);
    c.repctl("alpha", &["connect"]).ok();
    wait_synced(&c);
    assert!(
        c.data_identical(),
        "the data areas differ after the interrupted resync"
    );
    // Resumed, not restarted: little more than the dirty data was sent.
    let sent = resynced(&c.status("alpha")) - baseline;
    eprintln!("resynced {sent} bytes for 96 MiB out of sync, across the faults");
    assert!(sent >= 96 * MIB, "sent {sent} for 96 MiB out of sync");
    assert!(
        sent < 96 * MIB + 96 * MIB / 2,
        "resync restarted from scratch? sent {sent}"
    );
}

#[test]
fn a_corrupted_frame_drops_the_link_and_never_reaches_the_disk() {
    let mut c = Spec::pair(32 * MIB)
        .with_proxy()
        .sections("[net]\nconnect-retry = \"200ms\"\n")
        .build();
    c.up_pair();
    let mut client = c.client("alpha");
    c.proxy().corrupt_next(Dir::Forward);
    // The next frame alpha sends is corrupted in flight.
    client.write(0, &[0x33; 65536], false).unwrap();
    wait_for("beta to detect the bad frame", LONG, || {
        c.log("beta").contains("crc mismatch").then_some(())
    });
    // It reconnects; the write is resynced and both disks agree.
    wait_synced(&c);
    assert!(c.read_disk("beta", 0, 65536) == vec![0x33; 65536]);
    assert!(c.data_identical());
}

fn refused(spec: Spec, reason: &str) {
    let mut c = spec.sections("[net]\nconnect-retry = \"200ms\"\n").build();
    for n in ["alpha", "beta"] {
        c.repctl(n, &["create-md"]).ok();
    }
    c.start("alpha");
    c.repctl("alpha", &["primary", "--force"]).ok();
    let mut client = c.client("alpha");
    client.write(0, &[0x44; 4096], true).unwrap();
    drop(client);
    c.start("beta");
    for n in ["alpha", "beta"] {
        let s = c.wait_status(n, "the refusal in status", LONG, |s| {
            s["last_error"].as_str().is_some_and(|e| e.contains(reason))
        });
        assert_eq!(s["connection"], "Connecting", "{n}: {s}");
    }
    assert!(c.log("alpha").contains(reason) || c.log("beta").contains(reason));
    // Nothing reached beta.
    assert_eq!(c.read_disk("beta", 0, 4096), vec![0u8; 4096]);
    assert_eq!(c.field("beta", &["disk"]), "Inconsistent");
}

#[test]
fn a_wrong_shared_secret_is_refused() {
    refused(
        Spec::pair(32 * MIB)
            .resource("shared-secret = \"one\"")
            .resource_for("beta", "shared-secret = \"two\""),
        "shared-secret",
    );
}

#[test]
fn a_wrong_resource_name_is_refused() {
    refused(
        Spec::pair(32 * MIB).resource_name_for("beta", "r1"),
        "resource name mismatch",
    );
}

#[test]
fn a_different_size_is_refused() {
    refused(
        Spec::pair(32 * MIB).size_for("beta", 40 * MIB),
        "size mismatch",
    );
}

#[test]
fn switch_over_keeps_an_ext4_filesystem() {
    for tool in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fusermount3",
    ] {
        require(tool);
    }
    let mut c = Spec::pair(128 * MIB)
        .resource("fencing = \"dont-care\"")
        .build();
    c.up_pair();
    let files: Vec<(String, Vec<u8>)> = (0..5u64)
        .map(|i| {
            (
                format!("d{}/f{i}", i % 2),
                pattern(50 + i, ((i + 1) * 300 * 1024) as usize),
            )
        })
        .collect();
    {
        let fuse = Nbdfuse::start(&c.path("fuse-a"), &c.uri("alpha"));
        let dev = LoopDev::attach(&fuse.file());
        must(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.path));
        let mount = Mount::new(&dev.path, &c.path("mnt-a"));
        for (name, data) in &files {
            let p = mount.dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
        }
        mount.unmount();
        drop(dev);
        fuse.stop();
    }
    c.wait_clients("alpha", 0);
    c.repctl("alpha", &["secondary"]).ok();
    c.repctl("beta", &["primary"]).ok();
    let fuse = Nbdfuse::start(&c.path("fuse-b"), &c.uri("beta"));
    let dev = LoopDev::attach(&fuse.file());
    let fsck = run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&dev.path));
    assert_eq!(fsck.code, 0, "fsck on the new Primary: {fsck:?}");
    let mount = Mount::new(&dev.path, &c.path("mnt-b"));
    for (name, data) in &files {
        assert!(
            &std::fs::read(mount.dir.join(name)).unwrap() == data,
            "{name} differs after the switch-over"
        );
    }
    mount.unmount();
    drop(dev);
    fuse.stop();
}
