//! Replays every file in `fuzz/corpus/<target>/` through the property check
//! its fuzz target runs (`holosync::fuzz_checks`), so the seeds and every
//! input the fuzzers found stay checked on stable Rust without cargo-fuzz.
//! Run alone with `cargo test --test fuzz_corpus`.

use std::panic;
use std::path::Path;

use holosync::fuzz_checks;

/// Runs `check` on each corpus file of `target`; fails listing every file that panicked.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        // Dot files are libFuzzer's scratch files (ignored by git).
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read corpus file");
        if panic::catch_unwind(|| check(&data)).is_err() {
            failed.push(file.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} corpus files fail: {failed:?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn corpus_sync_payload() {
    replay("sync_payload", fuzz_checks::sync_payload);
}

#[test]
fn corpus_url_path() {
    replay("url_path", fuzz_checks::url_path);
}

#[test]
fn corpus_projector_message() {
    replay("projector_message", fuzz_checks::projector_message);
}

#[test]
fn corpus_pjlink_reply() {
    replay("pjlink_reply", fuzz_checks::pjlink_reply);
}

#[test]
fn corpus_image() {
    replay("image", fuzz_checks::image);
}
