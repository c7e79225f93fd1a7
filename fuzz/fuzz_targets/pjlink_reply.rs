//! PJLink greeting and replies from a projector (`projector::pjlink_exchange`, `describe_reply`).
//! The properties are in `checks::pjlink_reply`, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the properties
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::pjlink_reply(data));
