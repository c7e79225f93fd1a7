//! Projector message JSON -> targets (`message::parse_projector`).
//! The properties are in `holosync::fuzz_checks::projector_message`, shared with tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holosync::fuzz_checks::projector_message(data));
