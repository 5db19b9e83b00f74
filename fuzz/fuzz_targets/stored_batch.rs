//! A stored batch's bytes (as read from a segment file or the queue file) through its decoder
//! (see `src/lib.rs` for what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| touchctl_fuzz::check_stored(data));
