//! A touchpoint file's bytes through the loader (see `src/lib.rs` for what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| touchctl_fuzz::check_toml(data));
