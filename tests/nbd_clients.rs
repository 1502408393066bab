//! Real NBD clients against a running single-node repd: qemu-io, nbdinfo,
//! nbdcopy, fio, nbd-client, and a kernel ext4 filesystem through nbdfuse
//! and a loop device. Every client's data is checked, through the export
//! and in the backing file (the data area starts at offset 0).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::tools::{LoopDev, Mount, Nbdfuse, must};
use common::*;
use serde_json::Value;
use tandem_proto::nbd::consts::{CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_WRITE};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Assert a qemu-io run succeeded and none of its checks failed (qemu-io
/// exits 0 even when `read -P` finds other data; it says "Pattern
/// verification failed").
fn qemu_ok(out: Out) -> Out {
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "{out:?}"
    );
    out
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn qemu_io_patterns_fua_zeroes_discard_and_flush() {
    require("qemu-io");
    let mut c = Spec::single(64 * MIB).build();
    c.up_primary("alpha");

    // Plain writes: no FUA, and only the FLUSH qemu sends when it closes.
    let (f0, d0) = c.syncs("alpha");
    qemu_ok(c.qemu_io("alpha", &["write -P 0xa5 0 1M", "read -P 0xa5 0 1M"]));
    let (f1, d1) = c.syncs("alpha");
    assert_eq!(d1 - d0, 0, "plain writes were written with RWF_DSYNC");
    assert_eq!(f1 - f0, 1, "one fdatasync, for qemu's closing FLUSH");
    assert!(
        c.read_disk("alpha", 0, MIB as usize)
            .iter()
            .all(|&b| b == 0xa5)
    );

    // A FUA write: exactly one RWF_DSYNC write.
    qemu_ok(c.qemu_io("alpha", &["write -f -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"]));
    let (f2, d2) = c.syncs("alpha");
    assert_eq!(d2 - d1, 1, "write -f is one FUA write");
    assert_eq!(f2 - f1, 1, "and the closing FLUSH");
    assert!(
        c.read_disk("alpha", MIB, 64 * KIB as usize)
            .iter()
            .all(|&b| b == 0x5a)
    );

    // Each FLUSH is exactly one fdatasync (plus the closing one).
    qemu_ok(c.qemu_io(
        "alpha",
        &[
            "write -P 0x01 2M 4k",
            "flush",
            "write -P 0x02 2M 4k",
            "flush",
            "flush",
        ],
    ));
    let (f3, d3) = c.syncs("alpha");
    assert_eq!(f3 - f2, 3 + 1, "three FLUSHes and the closing one");
    assert_eq!(d3 - d2, 0);

    // write -z zeroes exactly its range.
    qemu_ok(c.qemu_io(
        "alpha",
        &[
            "write -P 0x77 4M 1M",
            "write -z 4100k 64k",
            "read -P 0x77 4M 4k",
            "read -P 0 4100k 64k",
            "read -P 0x77 4164k 956k",
        ],
    ));
    let disk = c.read_disk("alpha", 4 * MIB, MIB as usize);
    let (z0, z1) = (4 * KIB as usize, 68 * KIB as usize);
    assert!(disk[..z0].iter().all(|&b| b == 0x77));
    assert!(disk[z0..z1].iter().all(|&b| b == 0));
    assert!(disk[z1..].iter().all(|&b| b == 0x77));

    // discard really releases the space (a hole in the backing file), and
    // the hole reads back as zeros.
    qemu_ok(c.qemu_io("alpha", &["write -P 0x33 8M 4M", "flush"]));
    let before = allocated_bytes(&c.node("alpha").disk);
    qemu_ok(c.qemu_io("alpha", &["discard 8M 4M"]));
    let after = allocated_bytes(&c.node("alpha").disk);
    assert!(
        before - after >= 4 * MIB - 64 * KIB,
        "discard freed only {} bytes",
        before - after
    );
    assert!(
        c.read_disk("alpha", 8 * MIB, 4 * MIB as usize)
            .iter()
            .all(|&b| b == 0)
    );
    qemu_ok(c.qemu_io("alpha", &["read -P 0 8M 4M"]));
    // Neighbours untouched.
    qemu_ok(c.qemu_io(
        "alpha",
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x5a 1M 64k",
            "read -P 0x02 2M 4k",
        ],
    ));
}

/// Byte-granular I/O through our raw client (the server's read-modify-write
/// path) and through qemu-io, checking the neighbouring bytes through the
/// export and in the backing file.
fn byte_granular(args: &[&str], direct: bool) {
    let mut c = Spec::single(16 * MIB).repd_args(args).build();
    c.up_primary("alpha");
    assert_eq!(c.status("alpha")["engine"]["direct_io"], direct);
    let mut client = c.client("alpha");
    const SPAN: usize = 64 * 1024;
    let mut model = pattern(10, SPAN);
    client.write(0, &model, false).unwrap();

    let mut write = |client: &mut nbd::RawClient, offset: usize, data: Vec<u8>| {
        client.write(offset as u64, &data, false).unwrap();
        model[offset..offset + data.len()].copy_from_slice(&data);
    };
    write(&mut client, 5, vec![0x11; 7]);
    write(&mut client, 511, vec![0x22; 2]); // across a 512-byte boundary
    write(&mut client, 4093, vec![0x33; 7]); // across a 4 KiB boundary
    write(&mut client, 8191, vec![0x44; 1]);
    write(&mut client, 12285, pattern(11, 4096 + 6)); // unaligned at both ends, a whole block inside
    write(&mut client, 30001, pattern(12, 3)); // inside one block
    write(&mut client, SPAN - 1, vec![0x55]);

    // Many small writes sharing one block but no byte, all in flight at
    // once: every one must survive (the server's RMW locks).
    let base = 40960;
    let mut cookies = HashMap::new();
    for i in 0..64usize {
        let offset = base + i * 64 + 3;
        let data = vec![0x80 | i as u8; 7];
        cookies.insert(client.send(CMD_WRITE, 0, offset as u64, 7, &data), ());
        model[offset..offset + 7].copy_from_slice(&data);
    }
    for _ in 0..64 {
        let r = client.reply();
        assert!(cookies.remove(&r.cookie).is_some());
        assert_eq!(r.error, None);
    }

    // Byte-granular reads.
    for (offset, len) in [
        (5usize, 7usize),
        (0, 1),
        (4093, 7),
        (1, 4094),
        (12285, 4102),
        (SPAN - 1, 1),
        (base + 3, 61 * 64),
    ] {
        let got = client.read(offset as u64, len as u32).unwrap();
        assert!(
            got == model[offset..offset + len],
            "read {len} bytes at {offset}: wrong data"
        );
    }
    assert!(
        client.read(0, SPAN as u32).unwrap() == model,
        "export differs from the model"
    );
    client.flush().unwrap();
    assert!(
        c.read_disk("alpha", 0, SPAN) == model,
        "backing file differs from the model"
    );

    // The same through qemu (which aligns to the advertised 512 bytes and
    // does its own read-modify-write).
    qemu_ok(c.qemu_io(
        "alpha",
        &["write -P 0x66 100005 7", "read -P 0x66 100005 7"],
    ));
    let disk = c.read_disk("alpha", 100000, 20);
    assert_eq!(&disk[5..12], &[0x66; 7]);
    // Nothing was written around it before: zeros.
    assert!(
        disk[..5].iter().chain(&disk[12..]).all(|&b| b == 0),
        "qemu's neighbours: {disk:?}"
    );
    qemu_ok(c.qemu_io("alpha", &["write -P 0x11 5 7", "read -P 0x11 5 7"]));
    assert!(
        c.read_disk("alpha", 0, SPAN) == model,
        "qemu rewrote other bytes"
    );
    assert!(client.read(0, SPAN as u32).unwrap() == model);
}

#[test]
fn byte_granular_io_direct() {
    byte_granular(&["--io", "direct"], true);
}

#[test]
fn byte_granular_io_buffered() {
    byte_granular(&["--io", "buffered"], false);
}

#[test]
fn byte_granular_io_direct_threads_engine() {
    byte_granular(&["--io", "direct", "--engine", "threads"], true);
}

#[test]
fn nbdinfo_json_describes_the_export() {
    require("nbdinfo");
    let mut c = Spec::single(48 * MIB).build();
    c.up_primary("alpha");
    let out = run(Command::new("nbdinfo").arg("--json").arg(c.uri("alpha"))).ok();
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{}", out.stdout));
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "r0");
    assert_eq!(e["export-size"].as_u64(), Some(c.size("alpha")));
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 33554432);
    assert!(e["description"].as_str().unwrap().contains("alpha"), "{e}");
    c.wait_clients("alpha", 0);
}

#[test]
fn export_names_and_the_largest_request() {
    let mut c = Spec::single(80 * MIB).build();
    c.up_primary("alpha");
    // The empty name means the resource too; another name is refused.
    let mut client = nbd::RawClient::go(c.connect("alpha"), "").expect("the empty export name");
    assert_eq!(client.size, c.size("alpha"));
    let err = nbd::RawClient::go(c.connect("alpha"), "r1")
        .err()
        .expect("an unknown export");
    assert!(err.contains("r1"), "{err}");
    // 32 MiB, the advertised maximum, in one request each way.
    let big = pattern(13, 32 << 20);
    client.write(MIB, &big, false).unwrap();
    assert!(client.read(MIB, 32 << 20).unwrap() == big);
    client.flush().unwrap();
    assert!(c.read_disk("alpha", MIB, 32 << 20) == big);
}

#[test]
fn nbdcopy_round_trip_of_256_mib() {
    require("nbdcopy");
    require("cmp");
    let mut c = Spec::single(258 * MIB).build();
    c.up_primary("alpha");
    let size = c.size("alpha");
    assert!(size >= 256 * MIB);
    let src = c.path("src.img");
    let dst = c.path("dst.img");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let mut random = std::fs::File::open("/dev/urandom").unwrap();
        let copied = std::io::copy(&mut std::io::Read::take(&mut random, size), &mut f).unwrap();
        assert_eq!(copied, size);
    }
    must(Command::new("nbdcopy").arg(&src).arg(c.uri("alpha")));
    must(Command::new("nbdcopy").arg(c.uri("alpha")).arg(&dst));
    must(Command::new("cmp").arg(&src).arg(&dst));
    // The data area of the backing file holds exactly the source.
    must(
        Command::new("cmp")
            .arg("-n")
            .arg(size.to_string())
            .arg(&src)
            .arg(&c.node("alpha").disk),
    );
    c.wait_clients("alpha", 0);
}

#[test]
fn fio_random_writes_verify_with_crc32c() {
    require("fio");
    let mut c = Spec::single(80 * MIB).build();
    c.up_primary("alpha");
    let fio = |extra: &[&str]| {
        // Global options first: fio applies options to the job named last.
        let out = run(Command::new("fio")
            .current_dir(c.dir.path()) // fio leaves its verify state files here
            .args([
                "--ioengine=nbd",
                "--rw=randwrite",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--output-format=json",
                "--randseed=4242",
            ])
            .arg(format!("--uri={}", c.uri("alpha")))
            .args(extra)
            .args([
                "--name=small",
                "--bs=4k",
                "--iodepth=32",
                "--offset=0",
                "--size=24M",
                "--name=large",
                "--bs=64k",
                "--iodepth=8",
                "--offset=32M",
                "--size=32M",
            ]));
        assert_eq!(out.code, 0, "fio failed: {}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout[out.stdout.find('{').unwrap()..]).unwrap();
        for job in v["jobs"].as_array().unwrap() {
            assert_eq!(job["error"], 0, "{job}");
        }
        v
    };
    // Write with verification reads at the end of the job.
    let v = fio(&["--do_verify=1"]);
    let written: u64 = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["write"]["io_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(written, 56 * MIB);
    // A separate read-only pass in new connections verifies it again.
    let v = fio(&["--verify_only=1"]);
    let read: u64 = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["read"]["io_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(read, 56 * MIB, "the verify pass read everything back");
    c.wait_clients("alpha", 0);
}

#[test]
fn nbd_client_lists_the_export() {
    require("nbd-client");
    let mut c = Spec::single(16 * MIB).nbd(NbdKind::Tcp).build();
    c.up_primary("alpha");
    let port = c.node("alpha").nbd_port.to_string();
    let out = run(Command::new("nbd-client").args(["-l", "127.0.0.1", &port])).ok();
    assert!(out.stdout.lines().any(|l| l.trim() == "r0"), "{out:?}");
    // It lists a Secondary's export too (listing is not I/O).
    c.repctl("alpha", &["secondary"]).ok();
    let out = run(Command::new("nbd-client").args(["-l", "127.0.0.1", &port])).ok();
    assert!(out.stdout.lines().any(|l| l.trim() == "r0"), "{out:?}");
}

/// One round of the ext4 test: the export through nbdfuse and a loop
/// device, with `f` given the device and the mount point.
fn with_ext4(c: &Cluster, mkfs: bool, f: impl FnOnce(&Path)) {
    let fuse = Nbdfuse::start(&c.path("fuse"), &c.uri("alpha"));
    let dev = LoopDev::attach(&fuse.file());
    if mkfs {
        must(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev.path));
    }
    // A clean filesystem before mounting, and after.
    must(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&dev.path));
    let mount = Mount::new(&dev.path, &c.path("mnt"));
    f(&mount.dir);
    mount.unmount();
    let fsck = run(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&dev.path));
    assert_eq!(fsck.code, 0, "fsck after umount: {fsck:?}");
    drop(dev);
    fuse.stop();
}

#[test]
fn ext4_on_the_export_survives_a_clean_restart() {
    for tool in [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "fusermount3",
    ] {
        require(tool);
    }
    let mut c = Spec::single(128 * MIB).build();
    c.up_primary("alpha");
    let files: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| {
            (
                format!("dir{}/file{i}", i % 2),
                pattern(100 + i, ((i + 1) * 700 * KIB) as usize),
            )
        })
        .collect();
    with_ext4(&c, true, |mnt| {
        for (name, data) in &files {
            let path = mnt.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data).unwrap();
        }
    });
    c.wait_clients("alpha", 0);
    assert_eq!(c.down("alpha"), Some(0));

    c.start("alpha");
    let out = c.repctl("alpha", &["primary"]);
    assert_eq!(
        out.code, 0,
        "a cleanly stopped disk is UpToDate, no --force needed: {out:?}"
    );
    with_ext4(&c, false, |mnt| {
        for (name, data) in &files {
            let got = std::fs::read(mnt.join(name)).unwrap();
            assert!(&got == data, "{name} changed");
        }
    });
    c.wait_clients("alpha", 0);
    assert_eq!(c.down("alpha"), Some(0));
}

#[test]
fn write_zeroes_and_trim_flags_through_the_raw_client() {
    let mut c = Spec::single(16 * MIB).build();
    c.up_primary("alpha");
    let mut client = c.client("alpha");
    client.write(0, &pattern(20, 256 * 1024), false).unwrap();
    let mut model = pattern(20, 256 * 1024);
    // Unaligned, NO_HOLE, FUA: the edges are read-modify-written.
    client
        .write_zeroes(1000, 70000, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA)
        .unwrap();
    model[1000..71000].fill(0);
    client.write_zeroes(131072, 65536, 0).unwrap();
    model[131072..196608].fill(0);
    assert!(client.read(0, 256 * 1024).unwrap() == model);
    // TRIM is advisory; it must not touch bytes outside its range.
    client.trim(200_001, 20_000, true).unwrap();
    let got = client.read(0, 256 * 1024).unwrap();
    assert!(got[..200_001] == model[..200_001] && got[220_001..] == model[220_001..]);
}
