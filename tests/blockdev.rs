//! A block device as the disk: a loop device over a file, with 512-byte
//! and 4 KiB logical blocks. create-md, serving, patterns, byte-granular
//! writes (read-modify-write at the device's block size), discard and
//! write-zeroes (BLKDISCARD / BLKZEROOUT), and the exclusive open.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::tools::{LoopDev, must};
use common::*;
use tandem_proto::nbd::consts::{CMD_FLAG_FAST_ZERO, CMD_FLAG_NO_HOLE};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn qemu_ok(out: Out) {
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "{out:?}"
    );
}

fn loop_device_backing(sector_size: &str) {
    require("losetup");
    require("qemu-io");
    let dir = tempfile::Builder::new()
        .prefix("tandem-loop-")
        .tempdir()
        .unwrap();
    let file = dir.path().join("backing.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let dev = LoopDev::attach_with(&file, &["--sector-size", sector_size]);
    let mut c = Spec::single(0).disk("alpha", &dev.path).build();
    c.up_primary("alpha");
    let s = c.status("alpha");
    assert_eq!(
        s["engine"]["direct_io"], true,
        "O_DIRECT on a block device: {s}"
    );
    let size = s["size_bytes"].as_u64().unwrap();
    assert!(size > 62 * MIB && size < 64 * MIB, "{size}");

    // The device is held exclusively.
    let out = c.repctl("alpha", &["create-md", "--force"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("busy") || out.stderr.contains("in use"),
        "{out:?}"
    );

    // Patterns.
    qemu_ok(c.qemu_io(
        "alpha",
        &[
            "write -P 0xa5 0 4M",
            "read -P 0xa5 0 4M",
            "write -f -P 0x5a 4M 1M",
            "read -P 0x5a 4M 1M",
        ],
    ));
    // write -z, with and without unmapping.
    qemu_ok(c.qemu_io(
        "alpha",
        &[
            "write -z 256k 64k",
            "write -z -u 1M 1M",
            "read -P 0 256k 64k",
            "read -P 0 1M 1M",
            "read -P 0xa5 0 256k",
            "read -P 0xa5 320k 704k",
        ],
    ));
    // discard goes down to the file under the loop device as a hole.
    qemu_ok(c.qemu_io("alpha", &["flush"]));
    let before = std::fs::metadata(&file).unwrap().blocks() * 512;
    qemu_ok(c.qemu_io("alpha", &["discard 2M 2M"]));
    let after = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(
        before - after >= 2 * MIB - 64 * KIB,
        "discard freed {} bytes",
        before - after
    );
    qemu_ok(c.qemu_io("alpha", &["read -P 0 2M 2M", "read -P 0x5a 4M 1M"]));

    // Byte-granular writes: read-modify-write at the device's block size.
    let mut client = c.client("alpha");
    let mut model = pattern(1, 64 * 1024);
    client.write(8 * MIB, &model, false).unwrap();
    for (i, (offset, len)) in [
        (5usize, 7usize),
        (511, 2),
        (4093, 7),
        (9000, 10000),
        (65535, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(10 + i as u64, len);
        client
            .write(8 * MIB + offset as u64, &data, i % 2 == 0)
            .unwrap();
        model[offset..offset + len].copy_from_slice(&data);
    }
    // Unaligned zeroes, fast zeroes (which may be refused as not fast).
    client
        .write_zeroes(8 * MIB + 20001, 3000, CMD_FLAG_NO_HOLE)
        .unwrap();
    model[20001..23001].fill(0);
    match client.write_zeroes(12 * MIB, 64 * 1024, CMD_FLAG_FAST_ZERO) {
        Ok(()) => assert!(
            client
                .read(12 * MIB, 65536)
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        ),
        Err(e) => assert_eq!(e, tandem_proto::nbd::ErrorCode::NotSupported),
    }
    assert!(client.read(8 * MIB, 65536).unwrap() == model);
    client.flush().unwrap();
    client.disconnect();
    // The data area starts at offset 0 of the device, hence of the file.
    assert!(read_file_range(&file, 8 * MIB, 65536) == model);
    assert!(
        read_file_range(&file, 0, 256 * 1024)
            .iter()
            .all(|&b| b == 0xa5)
    );

    assert_eq!(c.down("alpha"), Some(0));
    let md = c.dump_md("alpha");
    assert_eq!(md["size_bytes"].as_u64(), Some(size));
    assert_eq!(md["flags"]["primary_indicator"], false);
    // The device is free again.
    must(Command::new("blockdev").arg("--getsize64").arg(&dev.path));
    c.start("alpha");
    c.repctl("alpha", &["primary"]).ok();
    assert!(c.client("alpha").read(8 * MIB, 65536).unwrap() == model);
    assert_eq!(c.down("alpha"), Some(0));
}

#[test]
fn loop_device_with_512_byte_blocks() {
    loop_device_backing("512");
}

#[test]
fn loop_device_with_4k_blocks() {
    loop_device_backing("4096");
}
