//! Projector message JSON -> targets (`message::parse_projector`).
//! The properties are in `checks::projector_message`, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the properties
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::projector_message(data));
