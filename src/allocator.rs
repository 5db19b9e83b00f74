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
    use std::ffi::c_long;

    /// Set in the environment of this test binary run again as a child.
    const CHILD: &str = "ALLOCATOR_TEST_CHILD";

    /// mimalloc reads its environment once per process: each case runs this test binary again,
    /// with `MIMALLOC_PURGE_DELAY` set to `env` (or unset), for
    /// [`the_purge_delay_is_tuned_unless_the_environment_sets_it`] alone. Returns the purge delay
    /// the child saw before and after [`tune`].
    fn child(env: Option<&str>) -> (c_long, c_long) {
        let test = format!(
            "{}::the_purge_delay_is_tuned_unless_the_environment_sets_it",
            module_path!()
                .split_once("::")
                .map_or(module_path!(), |(_, m)| m)
        );
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            // Both names of the option (`reset_delay` is its name from before mimalloc 2.1).
            .env_remove("MIMALLOC_PURGE_DELAY")
            .env_remove("MIMALLOC_RESET_DELAY");
        if let Some(value) = env {
            cmd.env("MIMALLOC_PURGE_DELAY", value);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = stdout
            .lines()
            .find_map(|l| l.strip_prefix("PURGE_DELAY "))
            .and_then(|l| l.split_once(' '))
            .and_then(|(b, a)| Some((b.parse().ok()?, a.parse().ok()?)));
        seen.unwrap_or_else(|| panic!("the child did not run {test}:\n{stdout}"))
    }

    #[test]
    fn the_purge_delay_is_tuned_unless_the_environment_sets_it() {
        if std::env::var_os(CHILD).is_some() {
            // SAFETY: plain getters and setters of an integer option, in a process that is this
            // test alone.
            let (before, after) = unsafe {
                let before = libmimalloc_sys::mi_option_get(PURGE_DELAY);
                tune();
                (before, libmimalloc_sys::mi_option_get(PURGE_DELAY))
            };
            // On a line of its own: the harness has written the test's name without a newline.
            println!("\nPURGE_DELAY {before} {after}");
            return;
        }
        // The linked mimalloc's default purge delay is 1000 ms, and no other option of it has that
        // default: reading it at this index shows the index names that option.
        assert_eq!(
            child(None),
            (1000, PURGE_DELAY_MS as c_long),
            "without the variable: mimalloc's default, then ours"
        );
        // The operator's value is read at this index too, and tune leaves it.
        assert_eq!(
            child(Some("2500")),
            (2500, 2500),
            "with MIMALLOC_PURGE_DELAY=2500"
        );
    }
}
