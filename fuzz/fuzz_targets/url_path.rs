//! URL -> cache path (`cache::url_segments`, `cache::local_path`).
//! The properties are in `holosync::fuzz_checks::url_path`, shared with tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holosync::fuzz_checks::url_path(data));
