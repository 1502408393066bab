//! Block-device ioctls: size, logical block size, discard and zero-out.
//!
//! Owns nothing but the ioctl encodings; each call is one blocking syscall on
//! a descriptor the caller keeps open. Ranges passed to [`discard`] and
//! [`zero_out`] must be multiples of the device's logical block size (the
//! kernel answers `EINVAL` otherwise); callers trim them first.

use std::os::fd::AsFd;

use rustix::ioctl::{self, Getter, Opcode, Setter, opcode};

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: Opcode = opcode::read::<usize>(0x12, 114);
/// `BLKDISCARD`: `_IO(0x12, 119)`, argument `u64[2] = {start, len}`.
const BLKDISCARD: Opcode = opcode::none(0x12, 119);
/// `BLKZEROOUT`: `_IO(0x12, 127)`, argument `u64[2] = {start, len}`.
const BLKZEROOUT: Opcode = opcode::none(0x12, 127);

/// The device's size in bytes.
pub(crate) fn size(fd: impl AsFd) -> rustix::io::Result<u64> {
    // SAFETY: BLKGETSIZE64 writes one size_t (usize here) through the pointer
    // the Getter provides, which points at a usize it owns.
    let bytes = unsafe { ioctl::ioctl(fd, Getter::<BLKGETSIZE64, usize>::new()) }?;
    Ok(bytes as u64)
}

/// The device's logical block size: the unit of direct I/O, discard and
/// zero-out.
pub(crate) fn logical_block_size(fd: impl AsFd) -> rustix::io::Result<u32> {
    rustix::fs::ioctl_blksszget(fd)
}

/// `BLKDISCARD` of `[offset, offset + len)`.
pub(crate) fn discard(fd: impl AsFd, offset: u64, len: u64) -> rustix::io::Result<()> {
    // SAFETY: BLKDISCARD reads a `u64[2]` range through the pointer; the
    // Setter passes a pointer to the array it owns for the duration of the call.
    unsafe { ioctl::ioctl(fd, Setter::<BLKDISCARD, [u64; 2]>::new([offset, len])) }
}

/// `BLKZEROOUT` of `[offset, offset + len)`: the range reads back as zeros;
/// the kernel may unmap it or write zeros, whichever the device offers.
pub(crate) fn zero_out(fd: impl AsFd, offset: u64, len: u64) -> rustix::io::Result<()> {
    // SAFETY: as for `discard`: BLKZEROOUT only reads a `u64[2]` range.
    unsafe { ioctl::ioctl(fd, Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len])) }
}
