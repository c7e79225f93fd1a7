//! PJLink greeting and replies from a projector (`projector::pjlink_exchange`, `describe_reply`).
//! The properties are in `holosync::fuzz_checks::pjlink_reply`, shared with tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holosync::fuzz_checks::pjlink_reply(data));
