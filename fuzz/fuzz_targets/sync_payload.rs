//! Sync payload bytes -> URLs (`message::parse_sync`).
//! The properties are in `holosync::fuzz_checks::sync_payload`, shared with tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holosync::fuzz_checks::sync_payload(data));
