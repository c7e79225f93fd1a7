//! Downloaded bytes -> verified image (`verify::verify`). Run with
//! `-rss_limit_mb=512 -malloc_limit_mb=256` so a large allocation is a finding.
//! The properties are in `checks::image`, shared with tests/fuzz_corpus.rs.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one of the properties
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::image(data));
