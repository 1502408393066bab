//! Opening the backing store: a regular file or a block device.
//!
//! A [`Backing`] owns the one open descriptor every engine does its I/O on,
//! and the facts about it that decide how I/O must be shaped: its kind, its
//! size and its direct-I/O alignment.
//!
//! Invariants, established by [`Backing::open`] and never changed after:
//! - the descriptor is open read-write and holds an exclusive `flock`, so no
//!   second process (a second repd, say) can use the same disk; a block
//!   device is also opened `O_EXCL`, which fails while it is mounted. A
//!   lock or exclusive open held by someone else is waited for up to
//!   [`BUSY_WAIT`]: the kernel releases those of a process killed with I/O
//!   in flight only after tearing down its io_uring, a few milliseconds
//!   after the process is gone, and a restart right after a crash must not
//!   fail for that;
//! - [`Backing::is_direct`] tells whether the descriptor really has
//!   `O_DIRECT`. When it has, `dio_align()` and `mem_align()` are powers of
//!   two no larger than 4096 (the alignment of `tandem_proto::AlignedBuf`),
//!   and the size is a multiple of `dio_align()`, so an aligned span never
//!   reaches past the end. Whenever those cannot hold, the store is used
//!   buffered (with one `tracing::warn!` saying why) and both alignments are 1;
//! - the size is read once, at open.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FlockOperation, OFlags, StatxFlags};
use thiserror::Error;

use super::blkdev;

/// How long [`Backing::open`] waits for a disk locked (or a block device
/// held exclusively) by someone else before it reports it in use.
pub const BUSY_WAIT: Duration = Duration::from_secs(2);
const BUSY_POLL: Duration = Duration::from_millis(10);

/// The largest direct-I/O alignment used; above it the store is opened
/// buffered. Matches `tandem_proto::buf::PAYLOAD_ALIGN`.
pub const MAX_DIO_ALIGN: usize = tandem_proto::buf::PAYLOAD_ALIGN;

/// How to do I/O on the backing store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// `O_DIRECT`, bypassing the page cache; falls back to buffered (with a
    /// warning) where the filesystem or device cannot do it.
    #[default]
    Direct,
    /// Through the page cache.
    Buffered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    pub mode: IoMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

#[derive(Debug, Error)]
pub enum BackingError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{} is neither a regular file nor a block device; give a disk image file or a block device",
        path.display()
    )]
    UnsupportedKind { path: PathBuf },
    #[error(
        "{} is in use by another process (is another repd running on this disk?): it is locked",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "block device {} is busy: it is mounted, or in use by another process (a running repd?) \
         that opened it exclusively",
        path.display()
    )]
    DeviceBusy { path: PathBuf },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot read the size of {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("cannot read the logical block size of block device {}: {source}", path.display())]
    BlockSize { path: PathBuf, source: io::Error },
    #[error("cannot switch {} to buffered I/O: {source}", path.display())]
    SetBuffered { path: PathBuf, source: io::Error },
    #[error("{} changed type while being opened", path.display())]
    Changed { path: PathBuf },
}

/// An open backing store. See the module docs for its invariants.
#[derive(Debug)]
pub struct Backing {
    path: PathBuf,
    file: File,
    kind: BackingKind,
    size: u64,
    direct: bool,
    dio_align: usize,
    mem_align: usize,
    logical_block_size: u64,
}

impl Backing {
    /// Open `path` read-write for exclusive use. See the module docs.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Backing, BackingError> {
        let path = path.as_ref().to_path_buf();
        let kind = kind_of(&path, std::fs::metadata(&path))?;
        let want_direct = options.mode == IoMode::Direct;

        let (file, mut direct) = match open_fd(&path, kind, want_direct) {
            Err(e) if want_direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem refuses O_DIRECT; using buffered I/O (the page cache) instead"
                );
                (
                    open_fd(&path, kind, false).map_err(|e| open_error(&path, kind, e))?,
                    false,
                )
            }
            Err(e) => return Err(open_error(&path, kind, e)),
            Ok(file) => (file, want_direct),
        };
        if kind_of(&path, file.metadata())? != kind {
            return Err(BackingError::Changed { path });
        }
        lock(&path, &file)?;

        let size = match kind {
            BackingKind::File => file.metadata().map(|m| m.len()),
            BackingKind::BlockDevice => blkdev::size(&file).map_err(io::Error::from),
        }
        .map_err(|source| BackingError::Size {
            path: path.clone(),
            source,
        })?;
        let logical_block_size =
            match kind {
                BackingKind::File => 1,
                BackingKind::BlockDevice => blkdev::logical_block_size(&file)
                    .map(u64::from)
                    .map_err(|e| BackingError::BlockSize {
                        path: path.clone(),
                        source: e.into(),
                    })?,
            };

        let (mut dio_align, mut mem_align) = (1, 1);
        if direct {
            let (offset_align, memory_align) = match kind {
                BackingKind::BlockDevice => {
                    (logical_block_size as usize, logical_block_size as usize)
                }
                BackingKind::File => file_dio_alignment(&file),
            };
            match refuse_direct_reason(offset_align, memory_align, size) {
                None => (dio_align, mem_align) = (offset_align, memory_align),
                Some(reason) => {
                    tracing::warn!(path = %path.display(), "{reason}; using buffered I/O (the page cache) instead");
                    set_buffered(&path, &file)?;
                    direct = false;
                }
            }
        }

        Ok(Backing {
            path,
            file,
            kind,
            size,
            direct,
            dio_align,
            mem_align,
            logical_block_size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Size in bytes, read at open.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Alignment every offset and length must have (1 when buffered).
    pub fn dio_align(&self) -> usize {
        self.dio_align
    }

    /// Alignment every buffer address must have (1 when buffered).
    pub fn mem_align(&self) -> usize {
        self.mem_align
    }

    /// The unit of discard and zero-out: a block device's logical block size
    /// (whatever the I/O mode), 1 for a file.
    pub fn logical_block_size(&self) -> u64 {
        self.logical_block_size
    }

    /// The open file, for synchronous metadata I/O at start-up and by the
    /// offline metadata commands (whole aligned blocks only when direct).
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Backing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn kind_of(path: &Path, meta: io::Result<std::fs::Metadata>) -> Result<BackingKind, BackingError> {
    let meta = meta.map_err(|source| BackingError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        Ok(BackingKind::File)
    } else if file_type.is_block_device() {
        Ok(BackingKind::BlockDevice)
    } else {
        Err(BackingError::UnsupportedKind {
            path: path.to_path_buf(),
        })
    }
}

/// [`open_once`], waiting up to [`BUSY_WAIT`] while a block device is
/// busy (held `O_EXCL` by someone else).
fn open_fd(path: &Path, kind: BackingKind, direct: bool) -> io::Result<File> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match open_once(path, kind, direct) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(BUSY_POLL)
            }
            r => return r,
        }
    }
}

fn open_once(path: &Path, kind: BackingKind, direct: bool) -> io::Result<File> {
    let mut flags = 0;
    if direct {
        flags |= libc::O_DIRECT;
    }
    if kind == BackingKind::BlockDevice {
        // Without O_CREAT, O_EXCL on a block device means "fail with EBUSY if
        // it is mounted or opened O_EXCL by anyone else".
        flags |= libc::O_EXCL;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
}

fn open_error(path: &Path, kind: BackingKind, source: io::Error) -> BackingError {
    if kind == BackingKind::BlockDevice && source.raw_os_error() == Some(libc::EBUSY) {
        BackingError::DeviceBusy {
            path: path.to_path_buf(),
        }
    } else {
        BackingError::Open {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Take the exclusive lock, waiting up to [`BUSY_WAIT`] for another holder.
fn lock(path: &Path, file: &File) -> Result<(), BackingError> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(BUSY_POLL)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(BackingError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(BackingError::Lock {
                    path: path.to_path_buf(),
                    source: e.into(),
                });
            }
        }
    }
}

/// A file's (offset, memory) direct-I/O alignment from `statx(STATX_DIOALIGN)`;
/// (0, 0) when the filesystem says the file cannot do direct I/O; 4096 when
/// it does not say (older kernels, filesystems that do not report it).
fn file_dio_alignment(file: &File) -> (usize, usize) {
    match rustix::fs::statx(file, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(stx) if StatxFlags::from_bits_retain(stx.stx_mask).contains(StatxFlags::DIOALIGN) => {
            let offset = stx.stx_dio_offset_align as usize;
            let memory = stx.stx_dio_mem_align as usize;
            (offset, if memory == 0 { offset } else { memory })
        }
        _ => (MAX_DIO_ALIGN, MAX_DIO_ALIGN),
    }
}

/// Why direct I/O with these alignments cannot be used, if it cannot.
fn refuse_direct_reason(offset_align: usize, mem_align: usize, size: u64) -> Option<String> {
    if offset_align == 0 {
        return Some("the filesystem does not support direct I/O on this file".into());
    }
    if !offset_align.is_power_of_two() || !mem_align.is_power_of_two() {
        return Some(format!(
            "unusual direct-I/O alignment (offset {offset_align}, memory {mem_align})"
        ));
    }
    if offset_align > MAX_DIO_ALIGN || mem_align > MAX_DIO_ALIGN {
        return Some(format!(
            "direct-I/O alignment (offset {offset_align}, memory {mem_align}) is above {MAX_DIO_ALIGN}"
        ));
    }
    if !size.is_multiple_of(offset_align as u64) {
        return Some(format!(
            "the size ({size} bytes) is not a multiple of the direct-I/O alignment ({offset_align})"
        ));
    }
    None
}

/// Clear `O_DIRECT` on an open descriptor (keeps the lock and `O_EXCL`).
fn set_buffered(path: &Path, file: &File) -> Result<(), BackingError> {
    let to_io = |e: rustix::io::Errno| BackingError::SetBuffered {
        path: path.to_path_buf(),
        source: e.into(),
    };
    let flags = rustix::fs::fcntl_getfl(file).map_err(to_io)?;
    rustix::fs::fcntl_setfl(file, flags - OFlags::DIRECT).map_err(to_io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_is_refused_for_unusable_alignments() {
        assert!(refuse_direct_reason(512, 512, 1 << 20).is_none());
        assert!(refuse_direct_reason(4096, 8, 1 << 20).is_none());
        assert!(refuse_direct_reason(0, 0, 1 << 20).is_some());
        assert!(refuse_direct_reason(8192, 8192, 1 << 20).is_some());
        assert!(refuse_direct_reason(512, 8192, 1 << 20).is_some());
        assert!(refuse_direct_reason(768, 512, 3 << 20).is_some());
        assert!(refuse_direct_reason(512, 512, (1 << 20) + 100).is_some());
    }
}
