//! Inputs for verify's unit tests: generated pictures, fixtures, and byte
//! surgery on JPEG segments and PNG chunks.

use std::ops::Range;

/// libjpeg-turbo's arithmetic-coded test image (in the corpora).
pub const TESTIMGARI: &[u8] =
    include_bytes!("../../tests/corpora/libjpeg-turbo/testimages/testimgari.jpg");
/// jpegtran transcodes of libjpeg-turbo's testorig.jpg (tests/fixtures/jpeg).
pub const ARITH_PROGRESSIVE: &[u8] =
    include_bytes!("../../tests/fixtures/jpeg/testorig-arith-progressive.jpg");
pub const ARITH_PROGRESSIVE_RESTARTS: &[u8] =
    include_bytes!("../../tests/fixtures/jpeg/testorig-arith-progressive-restart2.jpg");
pub const ARITH_RESTARTS: &[u8] =
    include_bytes!("../../tests/fixtures/jpeg/testorig-arith-restart1.jpg");
pub const PROGRESSIVE_RESTARTS: &[u8] =
    include_bytes!("../../tests/fixtures/jpeg/testorig-progressive-restart1.jpg");

/// RGB pixels with detail (a gradient plus a pattern), so every block codes
/// some AC coefficients.
pub fn pixels(w: u16, h: u16) -> Vec<u8> {
    let (w, h) = (usize::from(w), usize::from(h));
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let v = (x * 255 / w.max(1)) ^ (y * 7 % 64);
            out.extend([v as u8, (y * 255 / h.max(1)) as u8, ((x * y) % 251) as u8]);
        }
    }
    out
}

/// A baseline JPEG, quality 85, 4:2:0.
pub fn jpeg(w: u16, h: u16) -> Vec<u8> {
    encode(w, h, |_| {})
}

/// A progressive JPEG (spectral selection and successive approximation).
pub fn jpeg_progressive(w: u16, h: u16) -> Vec<u8> {
    encode(w, h, |e| e.set_progressive(true))
}

/// A baseline JPEG with a restart marker every `interval` MCUs.
pub fn jpeg_restarts(w: u16, h: u16, interval: u16) -> Vec<u8> {
    encode(w, h, |e| e.set_restart_interval(interval))
}

fn encode(w: u16, h: u16, setup: impl FnOnce(&mut jpeg_encoder::Encoder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
    setup(&mut encoder);
    encoder
        .encode(&pixels(w, h), w, h, jpeg_encoder::ColorType::Rgb)
        .expect("encode a test JPEG");
    out
}

/// An RGB PNG of `pixels`.
pub fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = ::png::Encoder::new(&mut out, w, h);
    encoder.set_color(::png::ColorType::Rgb);
    let mut writer = encoder.write_header().expect("png header");
    writer
        .write_image_data(&pixels(w as u16, h as u16))
        .expect("png data");
    writer.finish().expect("png finish");
    out
}

/// Offset of the first marker `code` (0xFF then `code`).
pub fn marker(jpeg: &[u8], code: u8) -> usize {
    jpeg.windows(2)
        .position(|w| w == [0xff, code])
        .unwrap_or_else(|| panic!("no marker 0xFF{code:02X}"))
}

/// The entropy-coded data of the first scan: from after its header to the
/// next marker that is not a restart marker.
pub fn first_scan_data(jpeg: &[u8]) -> Range<usize> {
    let sos = marker(jpeg, 0xda);
    let start = sos + 2 + usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
    let end = (start..jpeg.len() - 1)
        .find(|&i| jpeg[i] == 0xff && jpeg[i + 1] != 0 && !(0xd0..=0xd7).contains(&jpeg[i + 1]))
        .expect("scan data ends at a marker");
    start..end
}

/// A PNG chunk with its CRC.
pub fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = super::crc32::Crc32::new();
    crc.update(kind);
    crc.update(data);
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}

/// The chunks of a PNG: (offset of the chunk, type, data range).
pub fn png_chunks(file: &[u8]) -> Vec<(usize, [u8; 4], Range<usize>)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= file.len() {
        let len = u32::from_be_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = file[at + 4..at + 8].try_into().unwrap();
        out.push((at, kind, at + 8..at + 8 + len));
        at += 12 + len;
    }
    out
}

/// A PNG of `w` x `h` 8-bit grey pixels made of `rows` (each with its
/// filter byte), compressed in one IDAT, with `extra` chunks after IHDR.
pub fn grey_png(w: u32, h: u32, rows: &[u8], extra: &[Vec<u8>]) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    for chunk in extra {
        out.extend(chunk);
    }
    out.extend(png_chunk(b"IDAT", &fdeflate::compress_to_vec(rows)));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// Writes bits most significant first, padding with ones (T.81 F.1.2.3).
#[derive(Default)]
pub struct BitWriter {
    /// Bytes so far, 0xFF stuffed with 0x00.
    pub bytes: Vec<u8>,
    /// Bits not yet a whole byte.
    acc: u32,
    /// Their count.
    count: u32,
}

impl BitWriter {
    pub fn put(&mut self, value: u32, bits: u32) {
        for i in (0..bits).rev() {
            self.acc = self.acc << 1 | (value >> i & 1);
            self.count += 1;
            if self.count == 8 {
                self.bytes.push(self.acc as u8);
                if self.acc == 0xff {
                    self.bytes.push(0);
                }
                self.acc = 0;
                self.count = 0;
            }
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        while self.count != 0 {
            self.put(1, 1);
        }
        self.bytes
    }
}

/// A progressive JPEG of `comps` components (all 1x1 sampled) whose only
/// scans are one AC scan per component (Ss=1, Se=63), each a chain of
/// end-of-band runs over every block: a picture of nothing but flat grey,
/// coded in a few bytes. `padding` bytes of APP15 segments come first.
pub fn ac_only_progressive(w: u16, h: u16, comps: u8, padding: usize) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    let mut left = padding;
    while left > 0 {
        let n = left.min(65533);
        out.extend([0xff, 0xef]);
        out.extend(((n + 2) as u16).to_be_bytes());
        out.extend(std::iter::repeat_n(0u8, n));
        left -= n;
    }
    out.extend([0xff, 0xdb, 0, 67, 0]);
    out.extend([1u8; 64]);
    out.extend([0xff, 0xc2]);
    out.extend((8 + 3 * u16::from(comps)).to_be_bytes());
    out.push(8);
    out.extend(h.to_be_bytes());
    out.extend(w.to_be_bytes());
    out.push(comps);
    for c in 0..comps {
        out.extend([c + 1, 0x11, 0]);
    }
    // AC table 0: EOBr for r = 0..=14 (symbol r << 4), all 4-bit codes.
    out.extend([0xff, 0xc4, 0, 19 + 15, 0x10]);
    let mut counts = [0u8; 16];
    counts[3] = 15;
    out.extend(counts);
    out.extend((0..15u8).map(|r| r << 4));
    let blocks = u32::from(w).div_ceil(8) * u32::from(h).div_ceil(8);
    for c in 0..comps {
        out.extend([0xff, 0xda, 0, 8, 1, c + 1, 0x00, 1, 63, 0]);
        let mut bits = BitWriter::default();
        let mut left = blocks;
        while left > 0 {
            // EOBr covers 2^r plus r extra bits' worth of blocks.
            let n = left.min(32767);
            let r = 31 - n.leading_zeros();
            bits.put(r, 4);
            bits.put(n - (1 << r), r);
            left -= n;
        }
        out.extend(bits.finish());
    }
    out.extend([0xff, 0xd9]);
    out
}
