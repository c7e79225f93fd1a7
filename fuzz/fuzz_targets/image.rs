//! Downloaded bytes -> verified image (`verify::verify`). Run with
//! `-rss_limit_mb=512 -malloc_limit_mb=256` so a large allocation is a finding.
//! The properties are in `holosync::fuzz_checks::image`, shared with tests/fuzz_corpus.rs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holosync::fuzz_checks::image(data));
