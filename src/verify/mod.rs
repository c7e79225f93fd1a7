//! Bytes to a verified image kind, before anything becomes visible (pure).
//!
//! PNG and JPEG are recognised by their magic bytes and must decode
//! completely; their dimensions are checked before any pixel buffer is
//! allocated. Other files only need to be non-empty (the length check against
//! Content-Length happens in `download`).

use std::fmt;

/// Largest picture accepted; a tiny file claiming more is a decompression bomb.
pub const MAX_PIXELS: u64 = 100_000_000;

/// Pixels a JPEG byte can plausibly hold; far above what any real encoder reaches.
const MAX_PIXELS_PER_BYTE: u64 = 1024;

/// Most memory a JPEG decode may need for buffers that cannot be scaled down.
pub const MAX_JPEG_DECODE_BYTES: u64 = 128 << 20;

/// What the bytes turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JPEG that decoded completely.
    Jpeg {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A PNG that decoded completely, CRCs included.
    Png {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// Another kind of file (GIF, WebP, ...), stored as received.
    Other,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Jpeg { width, height } => write!(f, "JPEG {width}x{height}"),
            Kind::Png { width, height } => write!(f, "PNG {width}x{height}"),
            Kind::Other => f.write_str("file"),
        }
    }
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff";

/// Checks `bytes` fetched for `url` (whose server said `content_type`).
pub fn verify(bytes: &[u8], url: &str, content_type: Option<&str>) -> Result<Kind, String> {
    if bytes.is_empty() {
        return Err("empty body".into());
    }
    if bytes.starts_with(PNG_MAGIC) {
        return verify_png(bytes);
    }
    if bytes.starts_with(JPEG_MAGIC) {
        return verify_jpeg(bytes);
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

fn verify_png(bytes: &[u8]) -> Result<Kind, String> {
    let bad = |e: png::DecodingError| format!("broken PNG: {e}");
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_limits(png::Limits { bytes: 64 << 20 });
    let mut reader = decoder.read_info().map_err(bad)?;
    let (width, height) = (reader.info().width, reader.info().height);
    check_pixels(width, height)?;
    // Row by row: memory stays at one row, whatever the picture's size.
    let mut rows = 0u32;
    while reader.next_row().map_err(bad)?.is_some() {
        rows += 1;
    }
    if rows == 0 {
        return Err("broken PNG: no image rows".into());
    }
    reader.finish().map_err(bad)?;
    Ok(Kind::Png { width, height })
}

fn verify_jpeg(bytes: &[u8]) -> Result<Kind, String> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .read_info()
        .map_err(|e| format!("broken JPEG header: {e}"))?;
    let info = decoder.info().ok_or("broken JPEG: no frame header")?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_pixels(width, height)?;
    // Even a flat picture costs a few bits per 8x8 block (about one byte per
    // 170-340 pixels); a file claiming over 1024 pixels per byte is cut short
    // or a bomb, which jpeg-decoder would quietly fill with zeros.
    if u64::from(width) * u64::from(height) > bytes.len() as u64 * MAX_PIXELS_PER_BYTE {
        return Err(format!(
            "broken JPEG: {width}x{height} cannot fit in {} bytes (truncated, or a decompression bomb)",
            bytes.len()
        ));
    }
    // jpeg-decoder keeps whole-picture buffers. Progressive and lossless files
    // need some at full size (16-bit coefficients or samples), so bound those;
    // everything is decoded at 1/8 scale, which still reads and checks every
    // entropy-coded bit but needs 1/64 of the pixel memory (and IDCT time).
    let components: u64 = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::L16 => 1,
        jpeg_decoder::PixelFormat::RGB24 => 3,
        jpeg_decoder::PixelFormat::CMYK32 => 4,
    };
    let full_size_bytes_per_sample = match info.coding_process {
        jpeg_decoder::CodingProcess::DctSequential => 0,
        jpeg_decoder::CodingProcess::DctProgressive => 2,
        jpeg_decoder::CodingProcess::Lossless => 4,
    };
    let needed = u64::from(width) * u64::from(height) * components * full_size_bytes_per_sample;
    if needed > MAX_JPEG_DECODE_BYTES {
        return Err(format!(
            "image too large: decoding this {width}x{height} JPEG needs over {} MiB",
            MAX_JPEG_DECODE_BYTES >> 20
        ));
    }
    decoder
        .scale(1, 1)
        .map_err(|e| format!("broken JPEG: {e}"))?;
    decoder.decode().map_err(|e| format!("broken JPEG: {e}"))?;
    Ok(Kind::Jpeg { width, height })
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
/// default is to store the bytes unchanged).
pub fn reencode_jpeg(bytes: &[u8], quality: u8) -> Result<Vec<u8>, String> {
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    decoder
        .read_info()
        .map_err(|e| format!("broken JPEG header: {e}"))?;
    let info = decoder.info().ok_or("broken JPEG: no frame header")?;
    // Re-encoding needs the full-size pixels: bound them like verify does.
    let full = u64::from(info.width) * u64::from(info.height) * 4;
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
mod tests {
    use super::*;

    fn jpeg(w: u16, h: u16) -> Vec<u8> {
        let pixels: Vec<u8> = (0..usize::from(w) * usize::from(h) * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 85)
            .encode(&pixels, w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        let mut writer = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h * 3).map(|i| (i % 256) as u8).collect();
        writer.write_image_data(&data).unwrap();
        writer.finish().unwrap();
        out
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
    fn truncated_jpeg_fails() {
        let j = jpeg(128, 128);
        for cut in [j.len() / 2, j.len() - 2, 200] {
            assert!(
                verify(&j[..cut], "http://h/a.jpg", None).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn truncated_or_corrupt_png_fails() {
        let p = png(64, 64);
        assert!(verify(&p[..p.len() - 20], "http://h/a.png", None).is_err());
        let mut bad = p.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        assert!(verify(&bad, "http://h/a.png", None).is_err());
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
        assert_eq!(
            verify(b"GIF89a....", "http://h/a.gif", None),
            Ok(Kind::Other)
        );
        assert_eq!(
            verify(b"GIF89a....", "http://h/a.jpg", None),
            Ok(Kind::Other)
        );
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
    fn png_bomb_is_rejected_before_decoding() {
        // A real 1x1 PNG whose IHDR is patched to claim 60000x60000.
        let mut file = png(1, 1);
        let ihdr = PNG_MAGIC.len() + 4;
        file[ihdr + 4..ihdr + 8].copy_from_slice(&60000u32.to_be_bytes());
        file[ihdr + 8..ihdr + 12].copy_from_slice(&60000u32.to_be_bytes());
        let crc = crc32(&file[ihdr..ihdr + 17]);
        file[ihdr + 17..ihdr + 21].copy_from_slice(&crc.to_be_bytes());
        let err = verify(&file, "http://h/bomb.png", None).unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn jpeg_bomb_is_rejected_before_decoding() {
        let mut j = jpeg(16, 16);
        // Patch the SOF0 frame header's height and width to 60000.
        let sof = j.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        j[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
        j[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
        let err = verify(&j, "http://h/bomb.jpg", None).unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn small_jpeg_with_a_patched_big_header_is_refused() {
        let mut j = jpeg(8, 8);
        let sof = j.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        j[sof + 5..sof + 7].copy_from_slice(&10000u16.to_be_bytes());
        j[sof + 7..sof + 9].copy_from_slice(&10000u16.to_be_bytes());
        let err = verify(&j, "http://h/a.jpg", None).unwrap_err();
        assert!(err.contains("cannot fit"), "{err}");
        assert!(reencode_jpeg(&j, 80).is_err());
    }

    #[test]
    fn flat_picture_stays_within_the_bytes_per_pixel_floor() {
        // The most compressible real content: one colour, 1024x1024.
        let pixels = vec![128u8; 1024 * 1024 * 3];
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 50)
            .encode(&pixels, 1024, 1024, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        assert!(
            matches!(
                verify(&out, "http://h/flat.jpg", None),
                Ok(Kind::Jpeg { .. })
            ),
            "{} bytes",
            out.len()
        );
    }

    #[test]
    fn reencode_gives_a_valid_jpeg() {
        let out = reencode_jpeg(&jpeg(32, 32), 50).unwrap();
        assert!(matches!(
            verify(&out, "http://h/a.jpg", None),
            Ok(Kind::Jpeg { .. })
        ));
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
