//! Errors of the backing store: a disk on a filesystem that fills up
//! (a small tmpfs under a larger sparse file) fails writes with ENOSPC.
//! With `on-io-error = "detach"` the disk becomes Failed and every client
//! is refused; with `"pass-on"` the error reaches the client and the disk
//! stays in service. Either way the daemon stays up and stops cleanly.

mod common;

use common::tools::Mount;
use common::*;
use tandem_proto::nbd::ErrorCode;

const MIB: u64 = 1 << 20;

/// A cluster whose disk is a 64 MiB sparse file on an 8 MiB tmpfs. Fields
/// drop in order: repd is stopped before the unmount, the unmount happens
/// before the mount point is removed.
struct Small {
    c: Cluster,
    _mount: Mount,
    _dir: tempfile::TempDir,
}

fn on_small_tmpfs(on_io_error: &str) -> Small {
    let dir = tempfile::Builder::new()
        .prefix("tandem-tmpfs-")
        .tempdir()
        .unwrap();
    let mount = Mount::tmpfs(dir.path(), "8m");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let mut spec = Spec::single(0).disk("alpha", &disk);
    spec.extra_sections = format!("\n[disk]\non-io-error = \"{on_io_error}\"\n");
    let mut c = spec.build();
    c.up_primary("alpha");
    Small {
        c,
        _mount: mount,
        _dir: dir,
    }
}

/// Write 4 MiB pieces until the small filesystem is full: the first error.
fn fill_until_error(client: &mut nbd::RawClient) -> Option<ErrorCode> {
    (1..16u64).find_map(|i| client.write(i * 4 * MIB, &pattern(i, 4 << 20), false).err())
}

#[test]
fn detach_fails_the_disk_and_keeps_the_daemon() {
    let mut small = on_small_tmpfs("detach");
    let c = &mut small.c;
    let mut client = c.client("alpha");
    client.write(0, &pattern(1, 1 << 20), false).unwrap();
    let failed = fill_until_error(&mut client);
    assert_eq!(
        failed,
        Some(ErrorCode::NoSpace),
        "the full filesystem's ENOSPC reaches the client"
    );
    let s = c.status("alpha");
    assert_eq!(s["disk"], "Failed", "{s}");
    assert!(c.log("alpha").contains("on-io-error"), "the log says why");
    // No more I/O on a Failed disk, but answers, not a hang.
    assert_eq!(client.read(0, 4096), Err(ErrorCode::Io));
    assert_eq!(client.flush(), Err(ErrorCode::Io));
    client.disconnect();
    let err = nbd::RawClient::go(c.connect("alpha"), "r0")
        .err()
        .expect("a Failed disk serves no client");
    assert!(err.contains("Failed"), "{err}");
    // The daemon answers and stops cleanly.
    assert!(c.is_running("alpha"));
    assert_eq!(c.down("alpha"), Some(0));
}

#[test]
fn pass_on_returns_the_error_and_keeps_the_disk() {
    let mut small = on_small_tmpfs("pass-on");
    let c = &mut small.c;
    let mut client = c.client("alpha");
    client.write(0, &pattern(1, 1 << 20), false).unwrap();
    let failed = fill_until_error(&mut client);
    assert_eq!(failed, Some(ErrorCode::NoSpace));
    assert_eq!(c.status("alpha")["disk"], "UpToDate");
    // What was written before is still served, and space freed by a
    // discard can be written again.
    assert!(client.read(0, 1 << 20).unwrap() == pattern(1, 1 << 20));
    client.trim(4 * MIB, 4 << 20, false).unwrap();
    client.write(4 * MIB, &pattern(2, 1 << 20), true).unwrap();
    assert!(client.read(4 * MIB, 1 << 20).unwrap() == pattern(2, 1 << 20));
    client.disconnect();
    assert_eq!(c.down("alpha"), Some(0));
}
