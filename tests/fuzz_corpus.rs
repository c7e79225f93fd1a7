//! Replays every file in `fuzz/corpus/<target>/` through the property check
//! its fuzz target runs (`fuzz/checks.rs`), so the seeds and every
//! input the fuzzers found stay checked on stable Rust without cargo-fuzz.
//! Run alone with `cargo test --test fuzz_corpus`.
//!
//! The `regression_*` tests below are the fuzzers' findings, one each, named
//! after what they found.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use holosync::{cache, projector, verify};

/// The fuzz targets' properties, shared with them (test support, not product code).
#[path = "../fuzz/checks.rs"]
mod fuzz_checks;

/// Largest heap one image check may hold at once, like the image fuzz
/// target's `-malloc_limit_mb=256`: a decompression bomb must be refused (or
/// decoded small) before a large allocation.
const MAX_IMAGE_HEAP_BYTES: usize = 256 << 20;

/// Counts live heap bytes (all threads: jpeg-decoder decodes on worker threads).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn add(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is passed to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            add(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Image checks run one at a time, so one's heap peak is not another's.
static IMAGE_LOCK: Mutex<()> = Mutex::new(());

/// `fuzz_checks::image`, failing also when the heap grew by more than
/// `MAX_IMAGE_HEAP_BYTES` during the check. Other tests of this file run
/// meanwhile, but their few kilobytes do not matter at this scale.
fn image_within_heap_limit(data: &[u8]) {
    let _one_at_a_time = IMAGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    fuzz_checks::image(data);
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    assert!(
        grew <= MAX_IMAGE_HEAP_BYTES,
        "checking a {}-byte file held {} MiB of heap",
        data.len(),
        grew >> 20
    );
}

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
    replay("image", image_within_heap_limit);
}

// ---------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------

/// Found by `url_path` (corpus `url_path/crash-segment-86-cjk-chars`) and
/// `sync_payload`: `cache::check_segment` limited a segment to 255
/// *characters*, so 86 CJK characters (258 UTF-8 bytes) passed, although
/// Linux and the BSDs allow 255 bytes per name (ENAMETOOLONG at write time).
#[test]
fn regression_segment_over_255_bytes_is_rejected() {
    let name = "\u{4e2d}".repeat(86);
    assert!(cache::check_segment(&name).is_err(), "{} bytes", name.len());
    fuzz_checks::url_path(name.as_bytes());
}

/// Found by `sync_payload` (corpus `sync_payload/crash-segment-128-emoji`):
/// 128 emoji are 128 characters but 256 UTF-16 code units, over the 255
/// Windows (NTFS) allows for one name, and the check counted characters.
#[test]
fn regression_segment_over_255_utf16_units_is_rejected() {
    let url = format!("http://h.com/{}", "\u{1f600}".repeat(128));
    assert!(cache::url_segments(&url).is_err());
    fuzz_checks::sync_payload(url.as_bytes());
}

/// Found by `pjlink_reply` (corpus `pjlink_reply/crash-pjlink-line-multibyte`):
/// `projector::pjlink_line` sliced `line[2..6]` as a `str`, which panics when
/// byte 6 falls inside a multi-byte character, so a projector message with
/// the command `%1AAAé` (PJLink protocol) panicked the agent.
#[test]
fn regression_pjlink_line_with_multibyte_char_is_an_error() {
    assert!(projector::pjlink_line("%1AAA\u{e9}").is_err());
    assert!(projector::pjlink_line("%1POW\u{e9} 1").is_err());
    fuzz_checks::pjlink_reply("%1AAA\u{e9}\nPJLINK 0\r".as_bytes());
}

/// Found by `projector_message` with its dictionary (corpus
/// `projector_message/crash-raw-hex-multibyte`): `projector::raw_payload`
/// sliced the `hex:` digits two bytes at a time as a `str`, which panics on a
/// multi-byte character, so the raw command `hex:aéb` panicked the agent.
#[test]
fn regression_raw_hex_command_with_multibyte_char_is_an_error() {
    assert!(projector::raw_payload("hex:a\u{e9}b", "\r").is_err());
    fuzz_checks::projector_message(r#"{"command":"hex:a\u00e9b","projectors":["a"]}"#.as_bytes());
}

/// Found by `image` as an out-of-memory (corpus `image/oom-jpeg-510x65473`,
/// the fuzzer's input minimized): a 708-byte JPEG whose frame header claims
/// 510x65473 pixels (33 megapixels, under `MAX_PIXELS`) made jpeg-decoder
/// allocate the whole picture (a 100 MB output buffer plus a plane per
/// component: about 300 MB of heap, 670 MB RSS under the fuzzer) before
/// finding there is almost no data.
#[test]
fn regression_tiny_jpeg_claiming_33_megapixels_stays_small() {
    image_within_heap_limit(include_bytes!("../fuzz/corpus/image/oom-jpeg-510x65473"));
}

/// Found by the `image` target's seed `bomb-jpeg-progressive-6000x6000.jpg`
/// (over 512 MB RSS under the fuzzer): jpeg-decoder kept 16-bit
/// coefficients for every sample (216 MB for 6000x6000 RGB, under
/// `MAX_PIXELS`). The verifier now keeps one bit per coefficient, allocated
/// at a component's first AC scan and only as far as the bytes read so far
/// justify; this file's DC scan runs out of data first.
#[test]
fn regression_tiny_progressive_jpeg_claiming_36_megapixels_is_refused() {
    let mut file = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut file, 85);
    encoder.set_progressive(true);
    encoder
        .encode(&[128; 16 * 16 * 3], 16, 16, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let sof = file.windows(2).position(|w| w == [0xff, 0xc2]).unwrap();
    file[sof + 5..sof + 7].copy_from_slice(&6000u16.to_be_bytes());
    file[sof + 7..sof + 9].copy_from_slice(&6000u16.to_be_bytes());
    let err = verify::verify(&file, "http://h.com/bomb.jpg", None).unwrap_err();
    assert!(err.contains("ends early"), "{err}");
    image_within_heap_limit(&file);
}

/// Found by `image` once it compared sliced and whole verdicts (corpus
/// `image/crash-sliced-segment-after-scan-leftover`): bytes left after a
/// scan's last MCU are tolerated, but when the DHT segment after them had
/// not fully arrived, the next step searched again from before those bytes
/// with the "after a scan" allowance already spent, and refused a JPEG that
/// verify() accepts whole.
#[test]
fn regression_segment_after_scan_leftovers_arriving_in_slices_is_read_once() {
    let file = include_bytes!("../fuzz/corpus/image/crash-sliced-segment-after-scan-leftover");
    assert!(verify::verify(file, "http://h.com/a.jpg", None).is_ok());
    fuzz_checks::image(file);
}
