//! Tandem's on-disk metadata: where it lives, what it holds, how it is read
//! and written crash-safely.
//!
//! The metadata area sits at the end of the backing store (`meta-disk =
//! "internal"`) or at the start of a separate file or device. It holds, in
//! 4 KiB blocks:
//!
//! | block(s)        | content                                             |
//! |-----------------|-----------------------------------------------------|
//! | 0, 1            | two superblock slots (see [`superblock`])           |
//! | 2 .. 2+16       | the activity-log ring ([`activity_log`])            |
//! | then            | the dirty bitmap, 1 bit per 4 KiB data block        |
//!
//! Crash safety of the superblock: every update writes the *other* slot
//! with a higher sequence number and a crc32, durably (FUA), and the reader
//! takes the valid slot with the highest sequence. A torn or lost write
//! therefore leaves the previous superblock in force; never neither.
//!
//! The usable size excludes the metadata: with internal metadata the data
//! area is the largest multiple of 4 KiB that leaves room for the metadata
//! behind it ([`layout::Layout`]).

pub mod activity_log;
pub mod layout;
pub mod offline;
pub mod superblock;

pub use layout::{Layout, LayoutError};
pub use superblock::{Generations, MdFlags, Superblock, SuperblockError};

/// Granularity of the dirty bitmap and of every metadata structure.
pub const BLOCK_SIZE: u64 = 4096;

/// `UUID_JUST_CREATED`: the current generation of fresh metadata, as in DRBD.
pub const UUID_JUST_CREATED: u64 = 4;
