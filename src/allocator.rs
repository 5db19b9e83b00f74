//! Tuning of the binary's allocator (mimalloc, declared in `main.rs`).
//!
//! mimalloc hands memory that has been free for `purge_delay` back to the OS (1 s by default in
//! the version linked here); memory handed back and used again is faulted in and zeroed by the
//! kernel page by page. The daemon's intake allocates and frees a few MiB per trigger (the body,
//! its users, their stored form and the recipients), so under a steady stream of triggers memory
//! went back and forth. In `benches/dispatch.rs`, a daemon with a purge delay of 10 s (or none)
//! against one with the default, in the same rounds: 5 to 16% more recipients per second and 1 to
//! 12% less CPU per recipient, over five runs (benches/README.md, "The allocator's purge delay").
//!
//! mimalloc looks for memory past its delay only on some of its allocation paths, so a daemon
//! held freed memory long after the delay: 140 MiB for 45 s after a load, then 70 MiB. The daemon
//! calls [`release_unused`] every [`RELEASE_EVERY`]: 12 s after a load it then held 74 to
//! 102 MiB in one day's runs, 76 to 163 MiB in the next day's (the collect reaches the calling
//! thread's free pages and the shared pool, not the pages other threads hold; README,
//! Performance). Idle RSS at start is unchanged.

/// mimalloc's option index of `purge_delay` (`mi_option_purge_delay` in `mimalloc.h`, the same
/// in mimalloc 2 and 3; `libmimalloc-sys` exposes no constant for it).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before it goes back to the OS.
pub const PURGE_DELAY_MS: i64 = 10_000;

/// Sets the purge delay to [`PURGE_DELAY_MS`], unless `MIMALLOC_PURGE_DELAY` is set (mimalloc
/// then has the operator's value from the environment). Call it first thing in `main`, before any
/// other thread starts: mimalloc's options are not thread-safe to set.
pub fn tune() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of an integer option, called before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, PURGE_DELAY_MS as std::ffi::c_long) }
    }
}

/// How often the daemon hands back memory free for longer than the purge delay.
pub const RELEASE_EVERY: std::time::Duration =
    std::time::Duration::from_millis(PURGE_DELAY_MS as u64 / 2);

/// Hands memory that has been free for longer than the purge delay back to the OS (mimalloc's
/// `mi_collect`, not forced: memory freed more recently stays for reuse). Any thread, any time.
pub fn release_unused() {
    // SAFETY: `mi_collect` may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // The linked mimalloc's default purge delay is 1000 ms, and no other option of it has that
        // default: reading it at this index shows the index names that option.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: plain getters and setters of an integer option.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(PURGE_DELAY), 1000);
            tune();
            assert_eq!(
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
                PURGE_DELAY_MS as std::ffi::c_long
            );
            libmimalloc_sys::mi_option_set(PURGE_DELAY, 1000);
        }
    }
}
