//! A `POST /v1/dispatch` body as NDJSON through the intake's parser and checks (see `src/lib.rs`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(trigger) = touchctl::dispatch::trigger::RawTrigger::from_ndjson(data) {
        touchctl_fuzz::check_trigger(&trigger);
    }
});
