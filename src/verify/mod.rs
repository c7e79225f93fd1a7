//! Bytes to a verified image kind, before anything becomes visible (pure).
//!
//! The rule: accept exactly what a normal viewer shows completely; refuse
//! what it would show torn or not at all. PNG, JPEG, GIF and WebP
//! (recognised by their magic bytes) are checked to the end: every chunk
//! and every inflated byte of a PNG (and of every APNG frame), every
//! entropy-coded bit of every scan of a JPEG, every frame's LZW data of a
//! GIF (weezl), without making pixels; every frame of a WebP decoded by
//! image-webp, one at a time. An error confined to an ancillary part that
//! viewers skip (a PNG text or colour chunk, a JPEG comment, bytes after a
//! GIF's trailer or a WebP's RIFF end) does not refuse the picture. Files
//! that ask for far more work than their size (decompression and scan
//! bombs) are refused by [`Limits`] and the JPEG scan rules. Other files
//! only need to be non-empty (the length check against Content-Length
//! happens in `download`).
//!
//! [`Verifier`] does the work incrementally on the caller's thread: in
//! slices that end at a deadline, and while the body is still arriving.
//! [`verify`] runs it to the verdict over a whole body.

mod crc32;
mod gif;
mod jpeg;
mod jpeg_arith;
mod jpeg_huffman;
mod png;
mod webp;
mod whole;

use std::fmt;
use std::time::{Duration, Instant};

pub use webp::MAX_WEBP_FRAME_PIXELS;
pub use whole::{whole, Whole};

/// Largest picture accepted; a tiny file claiming more is a decompression bomb.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Default of [`Limits::animation_pixels`] (`download.max_animation_pixels`):
/// ten pictures of the largest size, or 480 frames of 1080p.
pub const MAX_ANIMATION_PIXELS: u64 = 1_000_000_000;

/// Limits against decompression bombs, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pixels all frames of a GIF, WebP or APNG may declare together
    /// (width x height of each frame, summed): the decoding work a file
    /// may ask for, whatever its size.
    pub animation_pixels: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            animation_pixels: MAX_ANIMATION_PIXELS,
        }
    }
}

impl Limits {
    /// Counts frame `number`'s `pixels` into `total`; refuses them past the budget.
    pub(crate) fn frame(&self, number: u32, pixels: u64, total: &mut u64) -> Result<(), String> {
        *total = total.saturating_add(pixels);
        if *total > self.animation_pixels {
            return Err(format!(
                "decompression bomb: frame {number} brings the frames' pixels to {}, over \
                 download.max_animation_pixels ({})",
                *total, self.animation_pixels
            ));
        }
        Ok(())
    }
}

/// Most memory one [`Verifier`] may hold (tables, inflater, and for a
/// progressive JPEG one bit per coefficient: 37.5 MB at 100 MP, 3 components
/// at full resolution). Anything that would need more is refused first.
pub const MAX_VERIFIER_BYTES: u64 = 64 << 20;

/// Most memory re-encoding may take for its full-size picture
/// (jpeg-decoder's output buffer and its planes).
pub const MAX_JPEG_DECODE_BYTES: u64 = 128 << 20;

/// Work units between two reads of the clock. A unit is roughly one 8x8
/// block decoded or 1 KiB inflated (0.1-2 us), so a step overshoots its
/// deadline by well under a millisecond.
const UNITS_PER_CLOCK_READ: u32 = 256;

/// How long [`verify`] lets one step run: it wants the verdict, not slices.
const NO_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// What the bytes turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JPEG whose every scan decoded completely.
    Jpeg {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A PNG whose image data inflated completely, checksums included.
    Png {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A GIF whose every frame's LZW data decoded to its last pixel.
    Gif {
        /// Width of the logical screen in pixels.
        width: u32,
        /// Height of the logical screen in pixels.
        height: u32,
        /// Frames (1 for a still picture).
        frames: u32,
    },
    /// A WebP whose every frame's bitstream decoded.
    Webp {
        /// Width in pixels (the canvas of an animation).
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Frames (1 for a still picture).
        frames: u32,
    },
    /// Another kind of file (BMP, ...), stored as received.
    Other,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Jpeg { width, height } => write!(f, "JPEG {width}x{height}"),
            Kind::Png { width, height } => write!(f, "PNG {width}x{height}"),
            Kind::Gif {
                width,
                height,
                frames,
            } => write!(f, "GIF {width}x{height}, {frames} frames"),
            Kind::Webp {
                width,
                height,
                frames,
            } => write!(f, "WebP {width}x{height}, {frames} frames"),
            Kind::Other => f.write_str("file"),
        }
    }
}

/// How far a [`Verifier::step`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Every byte given so far is checked; call again when more have arrived.
    NeedMore,
    /// The deadline came first; call again (same or more data) to go on.
    Paused,
    /// The verdict.
    Done(Result<Kind, String>),
}

/// Counts work between reads of the clock.
pub(crate) struct Clock {
    /// When the step must return.
    deadline: Instant,
    /// Units left before the next read.
    budget: u32,
}

impl Clock {
    fn new(deadline: Instant) -> Clock {
        Clock {
            deadline,
            budget: UNITS_PER_CLOCK_READ,
        }
    }

    /// Charges `units` of work; true once the deadline has passed. Work is
    /// always done before the first read, so every step makes progress.
    #[inline]
    pub(crate) fn spend(&mut self, units: u32) -> bool {
        match self.budget.checked_sub(units) {
            Some(left) if left > 0 => {
                self.budget = left;
                false
            }
            _ => {
                self.budget = UNITS_PER_CLOCK_READ;
                Instant::now() >= self.deadline
            }
        }
    }
}

/// Checks one body, a slice at a time, as its bytes arrive.
pub struct Verifier {
    /// The URL, for the "no image at an image URL" rule.
    url: String,
    /// The server's Content-Type, for the HTML rule.
    content_type: Option<String>,
    /// The bomb limits.
    limits: Limits,
    /// How far the check is.
    state: State,
}

/// The format being checked, once the first bytes say which.
enum State {
    /// Too few bytes to tell yet (or not PNG/JPEG: judged when complete).
    Sniffing,
    /// A JPEG.
    Jpeg(Box<jpeg::Checker>),
    /// A PNG.
    Png(Box<png::Checker>),
    /// A GIF.
    Gif(Box<gif::Checker>),
    /// A WebP.
    Webp(Box<webp::Checker>),
    /// The verdict, repeated to later calls.
    Done(Result<Kind, String>),
}

const JPEG_SOI: &[u8] = b"\xff\xd8";

impl Verifier {
    /// A verifier for the body fetched from `url`, whose server said `content_type`.
    pub fn new(url: &str, content_type: Option<&str>) -> Verifier {
        Verifier::with_limits(url, content_type, Limits::default())
    }

    /// The same, with the config's bomb limits.
    pub fn with_limits(url: &str, content_type: Option<&str>, limits: Limits) -> Verifier {
        Verifier {
            url: url.to_owned(),
            content_type: content_type.map(str::to_owned),
            limits,
            state: State::Sniffing,
        }
    }

    /// `data` is the whole body received so far (it only grows between
    /// calls, the prefix never changes); `complete` says no more bytes will
    /// come. Works until `deadline`, or until it needs bytes past `data`.
    /// With `complete` true it never returns NeedMore: a body that ends too
    /// early is Done(Err(..)).
    pub fn step(&mut self, data: &[u8], complete: bool, deadline: Instant) -> Progress {
        let mut clock = Clock::new(deadline);
        if let State::Sniffing = self.state {
            match self.sniff(data, complete) {
                Some(state) => self.state = state,
                None => return Progress::NeedMore,
            }
        }
        let progress = match &mut self.state {
            State::Sniffing => unreachable!("sniffing ended above"),
            State::Jpeg(c) => c.step(data, complete, &mut clock),
            State::Png(c) => c.step(data, complete, &mut clock),
            State::Gif(c) => c.step(data, complete, &mut clock),
            State::Webp(c) => c.step(data, complete, &mut clock),
            State::Done(result) => return Progress::Done(result.clone()),
        };
        match progress {
            Progress::Done(result) => {
                self.state = State::Done(result.clone());
                Progress::Done(result)
            }
            Progress::NeedMore if complete => {
                // A checker must not wait for bytes that will never come.
                let result = Err("internal error: verifier waited past the end".to_owned());
                self.state = State::Done(result.clone());
                Progress::Done(result)
            }
            other => other,
        }
    }

    /// Bytes of memory this verifier holds now (the checkers' tables,
    /// inflater and bitmaps; the body itself is the caller's).
    pub fn memory_bytes(&self) -> usize {
        let own = std::mem::size_of::<Verifier>()
            + self.url.capacity()
            + self.content_type.as_ref().map_or(0, String::capacity);
        own + match &self.state {
            State::Jpeg(c) => c.memory_bytes(),
            State::Png(c) => c.memory_bytes(),
            State::Gif(c) => c.memory_bytes(),
            State::Webp(c) => c.memory_bytes(),
            State::Sniffing | State::Done(_) => 0,
        }
    }

    /// Which checker the first bytes call for; `None` to wait for more.
    fn sniff(&self, data: &[u8], complete: bool) -> Option<State> {
        if data.starts_with(png::MAGIC) {
            return Some(State::Png(png::Checker::new(self.limits)));
        }
        if data.starts_with(JPEG_SOI) {
            return match data.get(2) {
                Some(0xff) => Some(State::Jpeg(jpeg::Checker::new())),
                // libjpeg would hunt for a marker, but Pillow and browsers
                // do not take this for a JPEG at all.
                Some(b) => Some(State::Done(Err(format!(
                    "broken JPEG: the first marker is damaged (0x{b:02X} after SOI)"
                )))),
                None if complete => {
                    Some(State::Done(Err("broken JPEG: cut short after SOI".into())))
                }
                None => None,
            };
        }
        if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
            return Some(State::Gif(gif::Checker::new(self.limits)));
        }
        if data.len() >= 12 && data.starts_with(b"RIFF") && &data[8..12] == b"WEBP" {
            return Some(State::Webp(webp::Checker::new(self.limits)));
        }
        if !complete {
            // Other files are judged whole (HTML, emptiness, the URL rule).
            return None;
        }
        Some(State::Done(other(
            data,
            &self.url,
            self.content_type.as_deref(),
        )))
    }
}

/// Checks `bytes` fetched for `url` (whose server said `content_type`): the
/// whole body at once, to the verdict.
pub fn verify(bytes: &[u8], url: &str, content_type: Option<&str>) -> Result<Kind, String> {
    verify_with(bytes, url, content_type, Limits::default())
}

/// [`verify`] with the config's bomb limits.
pub fn verify_with(
    bytes: &[u8],
    url: &str,
    content_type: Option<&str>,
    limits: Limits,
) -> Result<Kind, String> {
    let mut verifier = Verifier::with_limits(url, content_type, limits);
    loop {
        match verifier.step(bytes, true, Instant::now() + NO_DEADLINE) {
            Progress::Done(result) => return result,
            Progress::Paused => {}
            Progress::NeedMore => unreachable!("a complete body never needs more"),
        }
    }
}

/// A body that is neither PNG nor JPEG.
fn other(bytes: &[u8], url: &str, content_type: Option<&str>) -> Result<Kind, String> {
    if bytes.is_empty() {
        return Err("empty body".into());
    }
    let html_type = content_type.is_some_and(|t| {
        t.trim_start()
            .get(..9)
            .is_some_and(|p| p.eq_ignore_ascii_case("text/html"))
    });
    if html_type || looks_like_html(bytes) {
        return Err("server sent an HTML page, not an image".into());
    }
    if expects_jpeg_or_png(url) && !is_other_image(bytes) {
        return Err("not an image (no PNG, JPEG, GIF, WebP or BMP signature)".into());
    }
    Ok(Kind::Other)
}

fn check_pixels(width: u32, height: u32) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image has no pixels ({width}x{height})"));
    }
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(format!(
            "image too large: {width}x{height} is over {} megapixels",
            MAX_PIXELS / 1_000_000
        ));
    }
    Ok(())
}

/// Decodes a verified JPEG and encodes it again at `quality` (opt-in; the
/// default is to store the bytes unchanged). This is the one place
/// jpeg-decoder still runs: it decodes pictures over 128 pixels wide on one
/// worker thread per colour component (its own choice, with no option to
/// turn it off), and it has no arithmetic decoding.
pub fn reencode_jpeg(bytes: &[u8], quality: u8) -> Result<Vec<u8>, String> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .read_info()
        .map_err(|e| format!("broken JPEG header: {e}"))?;
    let info = decoder.info().ok_or("broken JPEG: no frame header")?;
    // jpeg-decoder keeps the full-size output, and a plane per component of
    // 16-bit coefficients (progressive) or samples (lossless): bound them
    // all before it allocates.
    let components: u64 = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::L16 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        jpeg_decoder::PixelFormat::CMYK32 => 4,
    };
    let planes_per_sample = match info.coding_process {
        jpeg_decoder::CodingProcess::DctSequential => 0,
        jpeg_decoder::CodingProcess::DctProgressive => 2,
        jpeg_decoder::CodingProcess::Lossless => 4,
    };
    let full =
        u64::from(info.width) * u64::from(info.height) * (4 + components * planes_per_sample);
    if full > MAX_JPEG_DECODE_BYTES {
        return Err(format!(
            "image too large to re-encode: {}x{} needs over {} MiB",
            info.width,
            info.height,
            MAX_JPEG_DECODE_BYTES >> 20
        ));
    }
    let pixels = decoder.decode().map_err(|e| format!("broken JPEG: {e}"))?;
    let color = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => jpeg_encoder::ColorType::Rgb,
        jpeg_decoder::PixelFormat::L8 => jpeg_encoder::ColorType::Luma,
        other => return Err(format!("cannot re-encode {other:?} JPEGs")),
    };
    let mut out = Vec::with_capacity(bytes.len());
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(&pixels, info.width, info.height, color)
        .map_err(|e| format!("re-encoding failed: {e}"))?;
    Ok(out)
}

/// True for `<!DOCTYPE html`, `<html`, `<head` or `<body` after blanks or a BOM.
fn looks_like_html(bytes: &[u8]) -> bool {
    let start = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let start = start.trim_ascii_start();
    let head = &start[..start.len().min(14)];
    [&b"<!doctype html"[..], b"<html", b"<head", b"<body"]
        .iter()
        .any(|p| head.len() >= p.len() && head[..p.len()].eq_ignore_ascii_case(p))
}

/// The URL's file name (before any `!style`) ends in .jpg, .jpeg or .png.
fn expects_jpeg_or_png(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or(path);
    let name = name.split('!').next().unwrap_or(name).to_ascii_lowercase();
    [".jpg", ".jpeg", ".png"].iter().any(|e| name.ends_with(e))
}

/// GIF, WebP or BMP: image CDNs may serve these under a .jpg style URL.
fn is_other_image(b: &[u8]) -> bool {
    b.starts_with(b"GIF87a")
        || b.starts_with(b"GIF89a")
        || (b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP")
        || b.starts_with(b"BM")
}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    /// Steps `v` over `data` with a deadline `slice` from now until it
    /// stops pausing; returns what it ended with and the longest step.
    fn run(v: &mut Verifier, data: &[u8], complete: bool, slice: Duration) -> (Progress, Duration) {
        let mut longest = Duration::ZERO;
        loop {
            let start = Instant::now();
            let progress = v.step(data, complete, start + slice);
            longest = longest.max(start.elapsed());
            if progress != Progress::Paused {
                return (progress, longest);
            }
        }
    }

    #[test]
    fn good_jpeg_and_png_verify() {
        assert_eq!(
            verify(&jpeg(64, 48), "http://h/a.jpg!preview", None),
            Ok(Kind::Jpeg {
                width: 64,
                height: 48
            })
        );
        assert_eq!(
            verify(&png(10, 20), "http://h/a.png", Some("image/png")),
            Ok(Kind::Png {
                width: 10,
                height: 20
            })
        );
    }

    #[test]
    fn kind_comes_from_magic_bytes_not_the_name() {
        assert!(matches!(
            verify(&png(4, 4), "http://h/really.jpg", None),
            Ok(Kind::Png { .. })
        ));
    }

    #[test]
    fn html_error_page_is_not_an_image() {
        let html = b"  <!DOCTYPE html><html><body>Not found</body></html>";
        assert!(verify(html, "http://h/a.jpg", None)
            .unwrap_err()
            .contains("HTML"));
        assert!(verify(b"oops", "http://h/a.gif", Some("text/html; charset=utf-8")).is_err());
    }

    #[test]
    fn other_files_only_need_bytes() {
        assert_eq!(verify(b"BM......", "http://h/a.bmp", None), Ok(Kind::Other));
        assert_eq!(verify(b"BM......", "http://h/a.jpg", None), Ok(Kind::Other));
        assert_eq!(
            verify(b"plain", "http://h/readme.txt", None),
            Ok(Kind::Other)
        );
        assert!(verify(b"plain", "http://h/a.JPG!x", None).is_err());
        assert_eq!(
            verify(b"", "http://h/a.txt", None),
            Err("empty body".into())
        );
    }

    #[test]
    fn a_broken_gif_or_webp_is_refused_whatever_the_url() {
        for (body, url) in [
            (&b"GIF89a...."[..], "http://h/a.gif"),
            (b"GIF89a....", "http://h/a.jpg"),
            (b"RIFF\x04\x00\x00\x00WEBP", "http://h/a.webp"),
        ] {
            assert!(verify(body, url, None).is_err(), "{url}");
        }
    }

    #[test]
    fn jpeg_whose_first_marker_is_damaged_is_broken_whatever_the_url() {
        let mut j = jpeg(8, 8);
        j[2] = 0xfe;
        let err = verify(&j, "http://h/a.gif", None).unwrap_err();
        assert!(err.contains("first marker is damaged"), "{err}");
    }

    #[test]
    fn prefixes_of_a_good_file_need_more_and_the_whole_is_done() {
        for file in [
            jpeg(64, 64),
            jpeg_progressive(64, 64),
            png(40, 30),
            ARITH_PROGRESSIVE.to_vec(),
            gif::tests::gif(50, 40, 3),
        ] {
            let mut v = Verifier::new("http://h/a.jpg", None);
            for len in (0..file.len()).step_by(97) {
                let (progress, _) = run(&mut v, &file[..len], false, Duration::ZERO);
                assert_eq!(progress, Progress::NeedMore, "prefix of {len} bytes");
            }
            let (progress, _) = run(&mut v, &file, true, Duration::ZERO);
            assert!(matches!(progress, Progress::Done(Ok(_))), "{progress:?}");
            // The verdict stays.
            assert_eq!(v.step(&file, true, Instant::now()), progress);
        }
    }

    #[test]
    fn a_complete_body_never_needs_more() {
        for file in [
            jpeg(16, 16),
            png(4, 4),
            gif::tests::gif(5, 4, 2),
            b"BM".to_vec(),
        ] {
            for len in 0..file.len() {
                let (progress, _) = run(
                    &mut Verifier::new("http://h/a", None),
                    &file[..len],
                    true,
                    Duration::ZERO,
                );
                assert!(matches!(progress, Progress::Done(_)), "{len}: {progress:?}");
            }
        }
    }

    #[test]
    fn a_step_returns_soon_after_its_deadline() {
        // 2.6 MP: far more work than one slice. Unoptimised test builds
        // are slow, so the bound is loose; the benchmark measures release.
        let file = jpeg(2000, 1300);
        let mut v = Verifier::new("http://h/a.jpg", None);
        let (progress, longest) = run(&mut v, &file, true, Duration::from_millis(2));
        assert!(matches!(progress, Progress::Done(Ok(_))), "{progress:?}");
        assert!(
            longest < Duration::from_millis(100),
            "a step took {longest:?}"
        );
    }

    #[test]
    fn memory_is_reported_and_stays_small_for_sequential_pictures() {
        let file = jpeg(1024, 768);
        let mut v = Verifier::new("http://h/a.jpg", None);
        let half = &file[..file.len() / 2];
        assert_eq!(
            run(&mut v, half, false, Duration::ZERO).0,
            Progress::NeedMore
        );
        let held = v.memory_bytes();
        assert!(held > 1000 && held < 64 << 10, "{held} bytes");
    }
}
