//! WebP: the RIFF framing and every chunk's size walked as bytes arrive
//! (VP8, VP8L, VP8X with ALPH, ANIM and ANMF), and every frame's bitstream
//! decoded to its end by image-rs's `image-webp`, one frame per call,
//! as soon as that frame's bytes are in.
//!
//! What refuses the picture is what libwebp (`dwebp`, `webpmux`) and Pillow
//! both refuse: a RIFF size past the end of the file, a chunk running past
//! the RIFF's end, a missing or undecodable bitstream, an animation frame
//! outside the canvas. Bytes after the RIFF's end are ignored, as Pillow
//! and `dwebp` ignore them. image-webp is not incremental: a frame is
//! handed to it whole, as a still WebP of its own chunks, and decoded to
//! pixels that are dropped at once; the pixel limits bound that call.

use std::io::Cursor;
use std::ops::Range;

use image_webp::WebPDecoder;

use super::{check_pixels, Clock, Kind, Limits, Progress};

/// Largest frame handed to image-webp (8 MiP: 4K UHD, 3840 x 2160, fits).
/// It decodes to RGBA (4 bytes a pixel) and keeps up to 7 more per pixel
/// while it works (a lossless frame's ARGB, a lossy one's YUV planes and
/// alpha), so such a frame costs at most about 92 MB, once, for the length
/// of one call; and that call cannot pause: a 1080p lossy frame takes
/// 0.2-0.27 s here (README, verification), an 8 MiP one about 1 s.
pub const MAX_WEBP_FRAME_PIXELS: u64 = 8 << 20;

/// What the first chunk said the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Not known yet.
    Unknown,
    /// A still picture: one VP8 or VP8L chunk (VP8X: after an optional ALPH).
    Still {
        /// VP8X's canvas, if there is one.
        canvas: Option<(u32, u32)>,
    },
    /// An animation (VP8X with the animation flag): ANMF chunks.
    Animated {
        /// VP8X's canvas.
        canvas: (u32, u32),
    },
}

/// The WebP checker's state between calls.
pub(super) struct Checker {
    /// The bomb limits.
    limits: Limits,
    /// Where the RIFF ends (8 + its size), once read.
    riff_end: Option<usize>,
    /// Offset of the next chunk header.
    pos: usize,
    /// What the file is.
    layout: Layout,
    /// A still picture's ALPH chunk data, if one came.
    alpha: Option<Range<usize>>,
    /// Frames decoded.
    frames: u32,
    /// Pixels the frames so far declare, together.
    total_pixels: u64,
    /// Width and height of the picture (the canvas, or the still's bitstream).
    size: Option<(u32, u32)>,
}

impl Checker {
    /// A checker for a body that starts with `RIFF....WEBP`.
    pub fn new(limits: Limits) -> Box<Checker> {
        Box::new(Checker {
            limits,
            riff_end: None,
            pos: 12,
            layout: Layout::Unknown,
            alpha: None,
            frames: 0,
            total_pixels: 0,
            size: None,
        })
    }

    /// Bytes this checker holds between calls (a frame's decode, within
    /// one call, is bounded by [`MAX_WEBP_FRAME_PIXELS`]).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Checker>()
    }

    /// Goes on through `data` (the body so far) until the deadline, the end
    /// of what has arrived, or the verdict.
    pub fn step(&mut self, data: &[u8], complete: bool, clock: &mut Clock) -> Progress {
        loop {
            match self.next(data, complete, clock) {
                Ok(None) => {}
                Ok(Some(progress)) => return progress,
                Err(e) => return Progress::Done(Err(format!("broken WebP: {e}"))),
            }
        }
    }

    /// One chunk; `Some` when the step must return.
    fn next(
        &mut self,
        data: &[u8],
        complete: bool,
        clock: &mut Clock,
    ) -> Result<Option<Progress>, String> {
        let riff_end = match self.riff_end {
            Some(end) => end,
            None => {
                let size = u32::from_le_bytes(data[4..8].try_into().expect("sniffed 12 bytes"));
                let end = 8 + size as usize;
                self.riff_end = Some(end);
                end
            }
        };
        if complete && data.len() < riff_end {
            return Err(format!(
                "the RIFF header says {riff_end} bytes and the file has {}",
                data.len()
            ));
        }
        if self.pos + 8 > riff_end {
            return match self.size {
                Some((width, height)) if self.frames > 0 && self.layout_done() => {
                    Ok(Some(Progress::Done(Ok(Kind::Webp {
                        width,
                        height,
                        frames: self.frames,
                    }))))
                }
                _ => Err("no complete image before the RIFF's end".into()),
            };
        }
        let Some(head) = data.get(self.pos..self.pos + 8) else {
            return Ok(Some(Progress::NeedMore));
        };
        let fourcc: [u8; 4] = head[..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
        let start = self.pos + 8;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= riff_end)
            .ok_or_else(|| {
                format!(
                    "chunk {} of {len} bytes runs past the RIFF's end",
                    name(&fourcc)
                )
            })?;
        if data.len() < end {
            return Ok(Some(Progress::NeedMore));
        }
        let body = &data[start..end];
        self.pos = end + (len & 1);
        match (self.layout, &fourcc) {
            (Layout::Unknown, b"VP8 " | b"VP8L") => {
                self.layout = Layout::Still { canvas: None };
                self.frame(&fourcc, body, None, None)?;
            }
            (Layout::Unknown, b"VP8X") => self.vp8x(body)?,
            (Layout::Unknown, _) => {
                return Err(format!(
                    "first chunk {} is not VP8, VP8L or VP8X",
                    name(&fourcc)
                ))
            }
            (Layout::Still { canvas }, b"ALPH") if self.frames == 0 && canvas.is_some() => {
                self.alpha = Some(start..end);
            }
            (Layout::Still { canvas }, b"VP8 " | b"VP8L") if self.frames == 0 => {
                let alpha = self.alpha.clone().map(|r| &data[r]);
                self.frame(&fourcc, body, alpha, canvas)?;
            }
            (Layout::Animated { canvas }, b"ANMF") => self.anmf(body, canvas)?,
            (Layout::Animated { .. }, b"VP8 " | b"VP8L" | b"ALPH") => {
                return Err(format!(
                    "an animation has a {} chunk outside its frames",
                    name(&fourcc)
                ))
            }
            // Metadata (ICCP, EXIF, XMP, ANIM) and unknown chunks: skipped.
            _ => {}
        }
        let units = (len / 1024) as u32 + 1;
        Ok(clock.spend(units).then_some(Progress::Paused))
    }

    /// Whether the picture's image chunks are all in.
    fn layout_done(&self) -> bool {
        match self.layout {
            Layout::Unknown => false,
            Layout::Still { .. } | Layout::Animated { .. } => self.frames > 0,
        }
    }

    /// VP8X: the flags and the canvas.
    fn vp8x(&mut self, body: &[u8]) -> Result<(), String> {
        if body.len() < 10 {
            return Err(format!("VP8X chunk of {} bytes", body.len()));
        }
        let width = u24(&body[4..7]) + 1;
        let height = u24(&body[7..10]) + 1;
        check_pixels(width, height)?;
        self.size = Some((width, height));
        self.layout = if body[0] & 0x02 != 0 {
            Layout::Animated {
                canvas: (width, height),
            }
        } else {
            Layout::Still {
                canvas: Some((width, height)),
            }
        };
        Ok(())
    }

    /// ANMF: the frame's place on the canvas, then its ALPH and VP8 or VP8L.
    fn anmf(&mut self, body: &[u8], canvas: (u32, u32)) -> Result<(), String> {
        let number = self.frames + 1;
        if body.len() < 16 {
            return Err(format!(
                "frame {number}: ANMF chunk of {} bytes",
                body.len()
            ));
        }
        let x = u24(&body[0..3]) * 2;
        let y = u24(&body[3..6]) * 2;
        let width = u24(&body[6..9]) + 1;
        let height = u24(&body[9..12]) + 1;
        if x + width > canvas.0 || y + height > canvas.1 {
            return Err(format!(
                "frame {number} ({width}x{height} at {x},{y}) lies outside the {}x{} canvas",
                canvas.0, canvas.1
            ));
        }
        let mut alpha = None;
        let mut at = 16;
        while at + 8 <= body.len() {
            let fourcc: [u8; 4] = body[at..at + 4].try_into().expect("4 bytes");
            let len =
                u32::from_le_bytes(body[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
            let start = at + 8;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= body.len())
                .ok_or_else(|| {
                    format!("frame {number}: chunk {} runs past its ANMF", name(&fourcc))
                })?;
            match &fourcc {
                b"ALPH" => alpha = Some(&body[start..end]),
                b"VP8 " | b"VP8L" => {
                    return self.frame(&fourcc, &body[start..end], alpha, Some((width, height)));
                }
                _ => {}
            }
            at = end + (len & 1);
        }
        Err(format!("frame {number} has no VP8 or VP8L bitstream"))
    }

    /// Decodes one frame (or the still picture): `fourcc`'s bitstream
    /// `body`, with its `alpha` chunk data, of the `size` its container
    /// declares (`None`: the bitstream's own).
    fn frame(
        &mut self,
        fourcc: &[u8; 4],
        body: &[u8],
        alpha: Option<&[u8]>,
        size: Option<(u32, u32)>,
    ) -> Result<(), String> {
        let number = self.frames + 1;
        let (width, height) = match size {
            Some(s) => s,
            None => bitstream_size(fourcc, body)?,
        };
        check_pixels(width, height)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > MAX_WEBP_FRAME_PIXELS {
            return Err(format!(
                "image too large: frame {number} of {width}x{height} is over the {} pixels a \
                 WebP frame may have to be verified (MAX_WEBP_FRAME_PIXELS)",
                MAX_WEBP_FRAME_PIXELS
            ));
        }
        self.limits.frame(number, pixels, &mut self.total_pixels)?;
        let still = still_webp(fourcc, body, alpha, (width, height));
        let mut decoder =
            WebPDecoder::new(Cursor::new(still)).map_err(|e| format!("frame {number}: {e}"))?;
        if decoder.dimensions() != (width, height) {
            let (w, h) = decoder.dimensions();
            return Err(format!(
                "frame {number}: the bitstream is {w}x{h}, its container says {width}x{height}"
            ));
        }
        let bytes = decoder
            .output_buffer_size()
            .ok_or_else(|| format!("frame {number} is too large"))?;
        let mut pixels = vec![0; bytes];
        decoder
            .read_image(&mut pixels)
            .map_err(|e| format!("frame {number}: {e}"))?;
        self.frames = number;
        if self.size.is_none() {
            self.size = Some((width, height));
        }
        Ok(())
    }
}

/// A still WebP holding one bitstream (and its alpha), for image-webp.
fn still_webp(fourcc: &[u8; 4], body: &[u8], alpha: Option<&[u8]>, size: (u32, u32)) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, fourcc: &[u8], data: &[u8]| {
        out.extend(fourcc);
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        if data.len() % 2 == 1 {
            out.push(0);
        }
    };
    let mut out = Vec::with_capacity(body.len() + alpha.map_or(0, <[u8]>::len) + 64);
    out.extend(b"RIFF\0\0\0\0WEBP");
    match alpha {
        Some(a) if fourcc == b"VP8 " => {
            let mut vp8x = vec![0x10, 0, 0, 0];
            vp8x.extend(&(size.0 - 1).to_le_bytes()[..3]);
            vp8x.extend(&(size.1 - 1).to_le_bytes()[..3]);
            chunk(&mut out, b"VP8X", &vp8x);
            chunk(&mut out, b"ALPH", a);
        }
        _ => {}
    }
    chunk(&mut out, fourcc, body);
    let riff = (out.len() - 8) as u32;
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    out
}

/// The width and height a bare VP8 or VP8L bitstream declares.
fn bitstream_size(fourcc: &[u8; 4], body: &[u8]) -> Result<(u32, u32), String> {
    if fourcc == b"VP8L" {
        let header = body.get(1..5).ok_or("VP8L bitstream cut short")?;
        let bits = u32::from_le_bytes(header.try_into().expect("4 bytes"));
        return Ok(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1));
    }
    let header = body.get(6..10).ok_or("VP8 bitstream cut short")?;
    let width = u32::from(u16::from_le_bytes([header[0], header[1]]) & 0x3fff);
    let height = u32::from(u16::from_le_bytes([header[2], header[3]]) & 0x3fff);
    Ok((width, height))
}

fn u24(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16
}

/// A chunk's FourCC for messages.
fn name(fourcc: &[u8; 4]) -> String {
    String::from_utf8_lossy(fourcc).trim_end().to_owned()
}

/// The animated WebP builder shared with tests/bombs.rs and bench/verify.rs.
#[cfg(test)]
#[path = "../../tests/support/webp_animation.rs"]
mod webp_animation;

#[cfg(test)]
pub(super) mod tests {
    use super::super::{verify, verify_with, Kind, Limits};

    /// A lossless still WebP of `w`x`h` (image-webp's encoder).
    pub(crate) fn still(w: u32, h: u32) -> Vec<u8> {
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut out = Vec::new();
        image_webp::WebPEncoder::new(&mut out)
            .encode(&pixels, w, h, image_webp::ColorType::Rgb8)
            .expect("encode a test WebP");
        out
    }

    /// An animated WebP of `frames` lossless frames of `w`x`h`.
    pub(crate) fn animated(w: u32, h: u32, frames: usize) -> Vec<u8> {
        super::webp_animation::animated_webp(&still(w, h), w, h, frames, 100)
    }

    #[test]
    fn still_and_animated_webps_are_accepted() {
        assert_eq!(
            verify(&still(30, 20), "http://h/a.webp", None),
            Ok(Kind::Webp {
                width: 30,
                height: 20,
                frames: 1
            })
        );
        assert_eq!(
            verify(&animated(30, 20, 4), "http://h/a.webp", None),
            Ok(Kind::Webp {
                width: 30,
                height: 20,
                frames: 4
            })
        );
    }

    #[test]
    fn every_cut_is_refused_and_bytes_after_the_riff_are_ignored() {
        let file = animated(16, 8, 2);
        for cut in 12..file.len() {
            assert!(
                verify(&file[..cut], "http://h/a.webp", None).is_err(),
                "cut at {cut}"
            );
        }
        let mut more = file.clone();
        more.extend([0x55; 64]);
        assert!(verify(&more, "http://h/a.webp", None).is_ok());
    }

    #[test]
    fn a_riff_size_past_the_end_and_a_frame_off_the_canvas_are_refused() {
        let mut big = still(8, 8);
        let size = u32::from_le_bytes(big[4..8].try_into().unwrap()) + 4096;
        big[4..8].copy_from_slice(&size.to_le_bytes());
        let err = verify(&big, "http://h/a.webp", None).unwrap_err();
        assert!(err.contains("RIFF"), "{err}");
        let mut off = animated(16, 8, 1);
        let anmf = off.windows(4).position(|w| w == b"ANMF").unwrap() + 8;
        off[anmf] = 4; // x offset 8: the 16-wide frame sticks out
        let err = verify(&off, "http://h/a.webp", None).unwrap_err();
        assert!(err.contains("outside"), "{err}");
    }

    #[test]
    fn a_corrupt_lossless_bitstream_is_refused() {
        let mut file = still(64, 64);
        let mid = file.len() / 2;
        for b in &mut file[mid..mid + 16] {
            *b = !*b;
        }
        assert!(verify(&file, "http://h/a.webp", None).is_err());
    }

    #[test]
    fn frames_over_the_pixel_budget_are_refused_naming_the_limit() {
        let limits = Limits {
            animation_pixels: 1000,
        };
        let err = verify_with(&animated(20, 20, 3), "http://h/a.webp", None, limits).unwrap_err();
        assert!(err.contains("download.max_animation_pixels"), "{err}");
        assert!(err.contains("frame 3"), "{err}");
    }
}
