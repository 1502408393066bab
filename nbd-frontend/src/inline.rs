//! A hint from the connection to the export's storage: "this thread may
//! do this request's I/O itself".
//!
//! When a connection reads a request and has no further request buffered
//! (the client is waiting for this answer, as at queue depth 1), handing
//! the request to another thread only adds a thread wake-up to its latency:
//! on a virtual machine that costs tens of microseconds, more than a 4 KiB
//! page-cache write. nbdkit avoids it by doing every request on the thread
//! that read it. The connection therefore starts such a request inside
//! [`allow`]; a storage engine that sees [`take`] return `true` (only the
//! first time, and only on this thread, while the request's future is
//! first polled) may do the I/O with blocking syscalls right there and
//! complete the op before `submit` returns. It is only a hint: an engine
//! may ignore it, and nothing about durability depends on it.

use std::cell::Cell;

thread_local! {
    static ALLOWED: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` with the hint set on this thread; it is cleared afterwards
/// whether or not anything took it.
pub fn allow<R>(f: impl FnOnce() -> R) -> R {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            ALLOWED.with(|a| a.set(false));
        }
    }
    ALLOWED.with(|a| a.set(true));
    let _clear = Clear;
    f()
}

/// Whether the hint is set on this thread; clears it, so it is taken once.
pub fn take() -> bool {
    ALLOWED.with(|a| a.replace(false))
}

/// Whether the hint is set on this thread, leaving it set.
pub fn allowed() -> bool {
    ALLOWED.with(|a| a.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_is_taken_once_and_only_inside_allow() {
        assert!(!take());
        allow(|| {
            assert!(allowed());
            assert!(take());
            assert!(!allowed());
            assert!(!take());
        });
        allow(|| {});
        assert!(!allowed());
        assert!(!take());
    }
}
