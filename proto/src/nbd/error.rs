//! NBD error values.
//!
//! The protocol allows exactly eight error values; clients treat anything
//! else as `EINVAL`, and raw `errno` values must never reach the wire. Every
//! failure inside Tandem is mapped onto one of these before it is sent.

/// An error a server may put in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `EPERM` (1): write to a read-only export.
    Perm,
    /// `EIO` (5): the storage failed.
    Io,
    /// `ENOMEM` (12): out of memory.
    NoMem,
    /// `EINVAL` (22): malformed request, read or trim past the end.
    Invalid,
    /// `ENOSPC` (28): write past the end, or no space on the backing store.
    NoSpace,
    /// `EOVERFLOW` (75): request too large to be answered.
    Overflow,
    /// `ENOTSUP` (95): e.g. a FAST_ZERO that cannot be fast.
    NotSupported,
    /// `ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::Perm,
        ErrorCode::Io,
        ErrorCode::NoMem,
        ErrorCode::Invalid,
        ErrorCode::NoSpace,
        ErrorCode::Overflow,
        ErrorCode::NotSupported,
        ErrorCode::Shutdown,
    ];

    /// The value on the wire.
    pub fn to_wire(self) -> u32 {
        match self {
            ErrorCode::Perm => 1,
            ErrorCode::Io => 5,
            ErrorCode::NoMem => 12,
            ErrorCode::Invalid => 22,
            ErrorCode::NoSpace => 28,
            ErrorCode::Overflow => 75,
            ErrorCode::NotSupported => 95,
            ErrorCode::Shutdown => 108,
        }
    }

    /// Decode a non-zero wire value. Unknown values become `Invalid`, as the
    /// protocol tells clients to treat them.
    pub fn from_wire(value: u32) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|e| e.to_wire() == value)
            .unwrap_or(ErrorCode::Invalid)
    }

    /// Map an operating-system `errno` onto an NBD error, following the
    /// protocol's advice (`EDQUOT`, `EFBIG` become `ENOSPC`).
    pub fn from_errno(errno: i32) -> ErrorCode {
        match errno {
            1 | 13 | 30 => ErrorCode::Perm,      // EPERM, EACCES, EROFS
            12 => ErrorCode::NoMem,              // ENOMEM
            22 => ErrorCode::Invalid,            // EINVAL
            27 | 28 | 122 => ErrorCode::NoSpace, // EFBIG, ENOSPC, EDQUOT
            75 => ErrorCode::Overflow,           // EOVERFLOW
            95 => ErrorCode::NotSupported,       // EOPNOTSUPP
            108 => ErrorCode::Shutdown,          // ESHUTDOWN
            _ => ErrorCode::Io,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Invalid => "EINVAL",
            ErrorCode::NoSpace => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSupported => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

impl std::error::Error for ErrorCode {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_unknown_is_einval() {
        for e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(e.to_wire()), e);
        }
        assert_eq!(ErrorCode::from_wire(2), ErrorCode::Invalid);
        assert_eq!(ErrorCode::from_errno(122), ErrorCode::NoSpace);
        assert_eq!(ErrorCode::from_errno(27), ErrorCode::NoSpace);
        assert_eq!(ErrorCode::from_errno(4), ErrorCode::Io);
    }
}
