//! Aligned, heap-allocated byte buffers for request payloads.
//!
//! Payloads travel from a socket to a disk opened with `O_DIRECT`, which needs
//! memory aligned to the device's direct-I/O alignment. Allocating every
//! payload aligned to [`PAYLOAD_ALIGN`] (4 KiB, the largest alignment any
//! supported device asks for) lets the storage engine use the buffer as is,
//! with no bounce copy. A filled buffer becomes an immutable, cheaply cloned
//! [`Bytes`] through [`AlignedBuf::into_bytes`] without copying, so the same
//! memory can be written locally and sent to the peer at the same time.
//!
//! Invariant: `ptr` is valid for `len` bytes and aligned to `align`; the
//! memory is freed exactly once, in `Drop`, with the layout it was allocated
//! with. The bytes are initialised (zeroed at allocation), except in a
//! buffer from [`AlignedBuf::uninit`] until its owner has written them all;
//! only then may it read them or hand the buffer on.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use bytes::Bytes;

/// The alignment of every payload buffer: enough for any `O_DIRECT` device.
pub const PAYLOAD_ALIGN: usize = 4096;

/// A zero-initialised byte buffer whose start is aligned to [`PAYLOAD_ALIGN`]
/// (or a caller-chosen power of two).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to [`PAYLOAD_ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_with_align(len, PAYLOAD_ALIGN)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `align` is not a power of two or the size overflows `isize`, or the
    /// allocator fails (as `Vec` does).
    pub fn zeroed_with_align(len: usize, align: usize) -> Self {
        // Never allocate zero bytes: the global allocator forbids it. A
        // one-byte allocation keeps the code below uniform.
        let layout = Layout::from_size_align(len.max(1), align).expect("valid buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// A buffer of `len` bytes aligned to [`PAYLOAD_ALIGN`], *not* zeroed:
    /// for a read that overwrites it completely (zeroing 1 MiB costs more
    /// than the copy into it).
    ///
    /// # Safety
    /// Until every byte has been written through [`AlignedBuf::as_mut_ptr`],
    /// the caller must not call [`AlignedBuf::as_slice`],
    /// [`AlignedBuf::as_mut_slice`] or [`AlignedBuf::into_bytes`], nor hand
    /// the buffer to code that might; dropping it is always fine.
    pub unsafe fn uninit(len: usize) -> Self {
        let layout =
            Layout::from_size_align(len.max(1), PAYLOAD_ALIGN).expect("valid buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// The first byte, for writing (e.g. by the kernel) without first
    /// making a slice of possibly uninitialised memory.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A buffer holding a copy of `data`, aligned to [`PAYLOAD_ALIGN`].
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment of the buffer's first byte.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (invariant).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len initialised bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Freeze into [`Bytes`] without copying; the alignment is kept.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed_with_align with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

/// Whether `bytes` starts at an address aligned to `align`.
pub fn is_aligned(bytes: &[u8], align: usize) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(align)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0usize, 1, 511, 4096, 65536 + 3] {
            let buf = AlignedBuf::zeroed(len);
            assert!(is_aligned(buf.as_slice(), PAYLOAD_ALIGN));
            assert_eq!(buf.len(), len);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn uninit_buffers_are_aligned_and_usable_once_written() {
        for len in [0usize, 1, 4096, (1 << 20) + 5] {
            // SAFETY: every byte is written before the slice is made.
            let mut buf = unsafe { AlignedBuf::uninit(len) };
            assert!((buf.as_mut_ptr() as usize).is_multiple_of(PAYLOAD_ALIGN));
            unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0xab, len) };
            assert_eq!(buf.len(), len);
            assert!(buf.as_slice().iter().all(|&b| b == 0xab));
        }
    }

    #[test]
    fn into_bytes_keeps_address_and_content() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[100] = 7;
        let addr = buf.as_slice().as_ptr();
        let bytes = buf.into_bytes();
        assert_eq!(bytes.as_ptr(), addr);
        assert_eq!(bytes[100], 7);
        let slice = bytes.slice(4096..);
        assert!(is_aligned(&slice, 4096));
    }
}
