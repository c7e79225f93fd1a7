//! URL -> cache path (`cache::url_segments`, `cache::local_path`).
//! The properties are in `checks::url_path`, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the properties
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::url_path(data));
