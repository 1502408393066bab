//! The conformance suite on a block device: a loop device over a temporary
//! file (needs root). Every loop device is created here and detached by a
//! Drop guard, so a failing check still detaches it; only devices this test
//! created are ever detached.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::conformance::CHECKS;
use common::{EngineSel, Fixture, make_file, privileged_or_skip};
use tandem_replicator::storage::{Backing, BackingError, BackingKind, IoMode, OpenOptions};

const SIZE: u64 = 8 << 20;

/// A loop device over a file in a temporary directory; detached on drop.
struct LoopDevice {
    device: PathBuf,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn create(size: u64) -> LoopDevice {
        let dir = tempfile::tempdir_in("/tmp").expect("temp dir");
        let file = make_file(&dir.path().join("loop.img"), size);
        let out = Command::new("losetup")
            .arg("-f")
            .arg("--show")
            .arg(&file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8(out.stdout).expect("device path").trim());
        assert!(
            device.starts_with("/dev/"),
            "unexpected losetup output {device:?}"
        );
        LoopDevice {
            device,
            file,
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.device).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("could not detach {}: {other:?}", self.device.display()),
        }
    }
}

fn zero_device(device: &Path) {
    let zeros = vec![0u8; SIZE as usize];
    std::fs::write(device, zeros).expect("zero the device");
}

fn conformance_on_loop(sel: EngineSel, mode: IoMode) {
    if !privileged_or_skip("block-device conformance") {
        return;
    }
    let dev = LoopDevice::create(SIZE);
    for (name, check) in CHECKS {
        eprintln!(
            "check {name} on {} ({sel:?}, {mode:?})",
            dev.device.display()
        );
        zero_device(&dev.device);
        let fx = Fixture::open(&dev.device, &dev.file, sel, mode, true);
        assert_eq!(fx.backing.kind(), BackingKind::BlockDevice);
        assert_eq!(fx.backing.size(), SIZE);
        if mode == IoMode::Direct {
            assert_eq!(
                fx.backing.dio_align() as u64,
                fx.backing.logical_block_size()
            );
        }
        check(&fx);
    }
}

#[test]
fn loop_uring_direct() {
    conformance_on_loop(EngineSel::Uring, IoMode::Direct)
}
#[test]
fn loop_uring_buffered() {
    conformance_on_loop(EngineSel::Uring, IoMode::Buffered)
}
#[test]
fn loop_threads_direct() {
    conformance_on_loop(EngineSel::Threads, IoMode::Direct)
}
#[test]
fn loop_threads_buffered() {
    conformance_on_loop(EngineSel::Threads, IoMode::Buffered)
}

/// A block device is opened O_EXCL and locked: a second open fails saying
/// the disk is in use.
#[test]
fn a_device_in_use_is_refused() {
    if !privileged_or_skip("block-device exclusivity") {
        return;
    }
    let dev = LoopDevice::create(SIZE);
    let first = Arc::new(Backing::open(&dev.device, OpenOptions::default()).expect("first open"));
    let err =
        Backing::open(&dev.device, OpenOptions::default()).expect_err("second open must fail");
    assert!(
        matches!(
            err,
            BackingError::DeviceBusy { .. } | BackingError::InUse { .. }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&*dev.device.to_string_lossy()) && msg.contains("in use"),
        "{msg}"
    );
    drop(first);
    Backing::open(&dev.device, OpenOptions::default()).expect("open again once released");
}
