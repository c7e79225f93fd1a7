//! Sync payload bytes -> URLs (`message::parse_sync`).
//! The properties are in `checks::sync_payload`, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the properties
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::sync_payload(data));
