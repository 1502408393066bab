//! Keeping the daemon out of memory-reclaim deadlocks.
//!
//! When the Linux kernel's NBD client (or a loop device over nbdfuse) sits
//! on the same host as `repd`, the kernel may need `repd` to finish a write
//! in order to free memory, while `repd` itself waits for memory: a
//! deadlock. `PR_SET_IO_FLUSHER` (Linux 5.6) makes the kernel treat the
//! daemon as part of the I/O path (its allocations do not recurse into
//! filesystem or block I/O), and `mlockall` keeps its pages from being
//! swapped out under pressure. Both need privileges (`CAP_SYS_RESOURCE`,
//! `CAP_IPC_LOCK` or an unlimited `RLIMIT_MEMLOCK`); without them the
//! daemon runs anyway and says once what it could not do.

use tracing::{info, warn};

const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Apply both protections; returns what was achieved, for logging and tests.
pub fn protect(lock_memory: bool) -> (bool, bool) {
    // SAFETY: prctl with integer arguments only.
    let flusher = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } == 0;
    if flusher {
        info!("PR_SET_IO_FLUSHER set: memory reclaim will not wait on this daemon's own I/O");
    } else {
        warn!(
            "cannot set PR_SET_IO_FLUSHER ({}): serving a kernel NBD client on this same host may deadlock under memory pressure; run repd with CAP_SYS_RESOURCE",
            std::io::Error::last_os_error()
        );
    }
    let locked = lock_memory && lock_all();
    (flusher, locked)
}

/// Keep request payloads out of per-request `mmap`/`munmap`.
///
/// glibc serves an allocation at or above its mmap threshold (128 KiB at
/// start) with a fresh `mmap` and frees it with `munmap`. Payload buffers
/// are aligned allocations of up to 32 MiB, so every 1 MiB NBD read or
/// write paid an `mmap`, 256 page faults that each clear a page (plus the
/// memcg charge), and a `munmap`: measured at about half of repd's CPU time
/// per 1 MiB write (docs/benchmarks.md). Raising the threshold to the
/// largest payload, and the trim threshold above it, lets freed payload
/// buffers be reused from the heap. What the heap keeps is bounded by the
/// per-connection payload budget. Returns whether glibc took both settings.
pub fn tune_allocator() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit
        // (half its per-arena heap size), and the largest NBD payload.
        const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
        const TRIM_THRESHOLD: libc::c_int = 2 * MMAP_THRESHOLD;
        // SAFETY: mallopt takes integer arguments only.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        if !ok {
            warn!(
                "cannot raise the malloc mmap threshold: large requests will mmap and munmap their buffers"
            );
        }
        ok
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

fn lock_all() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // With a finite limit, MCL_FUTURE would make later allocations fail
    // once the limit is reached; only lock when nothing can run out.
    if !root && lim.rlim_cur != libc::RLIM_INFINITY {
        warn!(
            "not locking memory: RLIMIT_MEMLOCK is {} bytes; raise it to unlimited (LimitMEMLOCK=infinity) to keep repd resident under memory pressure",
            lim.rlim_cur
        );
        return false;
    }
    // MCL_ONFAULT: lock pages as they are touched, so reserved but unused
    // address space (thread stacks) is not made resident.
    // SAFETY: mlockall takes flags only.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if r == 0 {
        info!("memory locked (mlockall)");
        true
    } else {
        warn!(
            "mlockall failed ({}): repd's memory may be swapped out under pressure",
            std::io::Error::last_os_error()
        );
        false
    }
}
