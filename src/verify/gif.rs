//! GIF: the header, the logical screen, every block to the trailer, and
//! every frame's LZW data decoded (weezl) to the frame's last pixel,
//! without keeping a pixel; incremental and time-sliced.
//!
//! What refuses the picture is what giflib's `DGifSlurp` and Pillow (every
//! frame loaded) both refuse: a frame of no pixels, an LZW code size over 8,
//! an invalid LZW code or an end code before the frame's last pixel, data
//! sub-blocks that end before it, a block that is neither an extension, an
//! image nor the trailer, a file cut short inside a block. Extensions are
//! skipped by their block lengths. Bytes after the trailer are ignored (both
//! do). A file that ends right after a complete frame, without its trailer,
//! is accepted: Pillow and browsers show every frame, only giflib stops
//! (README, verification table).

use weezl::{decode::Decoder, BitOrder, LzwError, LzwStatus};

use super::{check_pixels, Clock, Kind, Limits, Progress};

/// Decoded pixels produced per call of the LZW decoder (never kept).
const OUT_BYTES: usize = 16 << 10;
/// Calls of the LZW decoder in a row that may take no byte and give no
/// pixel before it is taken to hold nothing more: each such call takes a
/// clear code (at least 2 bits) from the 64 bits it may hold.
const MAX_IDLE_CALLS: u32 = 40;
/// Largest LZW minimum code size: giflib refuses more than 8 bits per pixel.
const MAX_CODE_SIZE: u8 = 8;

/// Where the walk is.
enum At {
    /// At the byte that says what the next block is.
    Block,
    /// Inside the data sub-blocks of an extension.
    Skip,
    /// Inside the data sub-blocks of frame `frames`.
    Image(Box<Frame>),
}

/// The frame whose LZW data is being decoded.
struct Frame {
    /// The LZW decoder.
    lzw: Decoder,
    /// Pixels the frame's descriptor declares.
    pixels: u64,
    /// Pixels decoded so far (counting stops at `pixels`).
    decoded: u64,
    /// The LZW stream has ended (end code, or all pixels in).
    ended: bool,
}

/// The GIF checker's state between calls.
pub(super) struct Checker {
    /// The bomb limits.
    limits: Limits,
    /// Offset of the next byte to read.
    pos: usize,
    /// Bytes left in the current data sub-block (0: at a length byte).
    block_left: usize,
    /// What is being read.
    at: At,
    /// The logical screen, once read.
    screen: Option<(u32, u32)>,
    /// Frames seen so far.
    frames: u32,
    /// Pixels the frames seen so far declare, together.
    total_pixels: u64,
    /// Scratch output of the LZW decoder.
    out: Vec<u8>,
}

impl Checker {
    /// A checker for a body that starts with `GIF87a` or `GIF89a`.
    pub fn new(limits: Limits) -> Box<Checker> {
        Box::new(Checker {
            limits,
            pos: 6,
            block_left: 0,
            at: At::Block,
            screen: None,
            frames: 0,
            total_pixels: 0,
            out: Vec::new(),
        })
    }

    /// Bytes this checker holds.
    pub fn memory_bytes(&self) -> usize {
        let lzw = match self.at {
            // weezl's table: 4,096 entries of a few bytes, plus its buffer.
            At::Image(_) => 24 << 10,
            _ => 0,
        };
        std::mem::size_of::<Checker>() + self.out.capacity() + lzw
    }

    /// Goes on through `data` (the body so far) until the deadline, the end
    /// of what has arrived, or the verdict.
    pub fn step(&mut self, data: &[u8], complete: bool, clock: &mut Clock) -> Progress {
        loop {
            match self.next(data, complete, clock) {
                Ok(None) => {}
                Ok(Some(progress)) => return progress,
                Err(e) => return Progress::Done(Err(format!("broken GIF: {e}"))),
            }
        }
    }

    /// The verdict for a good file.
    fn kind(&self) -> Kind {
        let (width, height) = self.screen.expect("read before any frame");
        Kind::Gif {
            width,
            height,
            frames: self.frames,
        }
    }

    /// One piece of work; `Some` when the step must return.
    fn next(
        &mut self,
        data: &[u8],
        complete: bool,
        clock: &mut Clock,
    ) -> Result<Option<Progress>, String> {
        let wait = |what: &str| {
            if complete {
                Err(format!("cut short {what}"))
            } else {
                Ok(Some(Progress::NeedMore))
            }
        };
        if self.screen.is_none() {
            let Some(screen) = data.get(6..13) else {
                return wait("in the logical screen descriptor");
            };
            let width = u32::from(u16::from_le_bytes([screen[0], screen[1]]));
            let height = u32::from(u16::from_le_bytes([screen[2], screen[3]]));
            check_pixels(width, height)?;
            self.screen = Some((width, height));
            self.pos = 13 + colour_table(screen[4]);
            return Ok(None);
        }
        match &mut self.at {
            At::Block => {
                let Some(&label) = data.get(self.pos) else {
                    if complete && self.pos == data.len() && self.frames > 0 {
                        // No trailer, but every frame is whole (see the top).
                        return Ok(Some(Progress::Done(Ok(self.kind()))));
                    }
                    return wait("before its trailer");
                };
                match label {
                    0x3b if self.frames == 0 => Err("no image before the trailer".into()),
                    0x3b => Ok(Some(Progress::Done(Ok(self.kind())))),
                    0x21 => {
                        if data.len() < self.pos + 2 {
                            return wait("in an extension");
                        }
                        self.pos += 2;
                        self.at = At::Skip;
                        Ok(None)
                    }
                    0x2c => self.image(data, complete),
                    other => Err(format!("unknown block 0x{other:02x} at byte {}", self.pos)),
                }
            }
            At::Skip => {
                if self.block_left == 0 {
                    let Some(&len) = data.get(self.pos) else {
                        return wait("in an extension");
                    };
                    self.pos += 1;
                    self.block_left = usize::from(len);
                    if len == 0 {
                        self.at = At::Block;
                    }
                    return Ok(None);
                }
                let take = self.block_left.min(data.len() - self.pos);
                if take == 0 {
                    return wait("in an extension");
                }
                self.pos += take;
                self.block_left -= take;
                Ok(None)
            }
            At::Image(frame) => {
                if self.block_left == 0 {
                    let Some(&len) = data.get(self.pos) else {
                        return wait(&format!("in frame {}", self.frames));
                    };
                    self.pos += 1;
                    self.block_left = usize::from(len);
                    if len == 0 {
                        if !frame.ended {
                            // weezl may still hold the last codes' pixels.
                            let n = self.frames;
                            frame.feed(&[], &mut self.out, n)?;
                        }
                        if frame.decoded < frame.pixels {
                            return Err(format!(
                                "frame {} ends after {} of its {} pixels",
                                self.frames, frame.decoded, frame.pixels
                            ));
                        }
                        self.at = At::Block;
                        self.out = Vec::new();
                    }
                    return Ok(None);
                }
                let take = self.block_left.min(data.len() - self.pos);
                if take == 0 {
                    return wait(&format!("in frame {}", self.frames));
                }
                let input = &data[self.pos..self.pos + take];
                let used = if frame.ended {
                    // The frame is whole: the rest is never shown.
                    take
                } else {
                    let n = self.frames;
                    frame.feed(input, &mut self.out, n)?
                };
                self.pos += used;
                self.block_left -= used;
                let units = (used / 1024) as u32 + 1;
                Ok(clock.spend(units).then_some(Progress::Paused))
            }
        }
    }

    /// An image descriptor at `pos`: its bounds, its colour table, its LZW
    /// code size, and the bomb limits.
    fn image(&mut self, data: &[u8], complete: bool) -> Result<Option<Progress>, String> {
        let Some(d) = data.get(self.pos..self.pos + 10) else {
            return if complete {
                Err("cut short in an image descriptor".into())
            } else {
                Ok(Some(Progress::NeedMore))
            };
        };
        let width = u32::from(u16::from_le_bytes([d[5], d[6]]));
        let height = u32::from(u16::from_le_bytes([d[7], d[8]]));
        let code_at = self.pos + 10 + colour_table(d[9]);
        let Some(&code_size) = data.get(code_at) else {
            return if complete {
                Err("cut short before a frame's LZW data".into())
            } else {
                Ok(Some(Progress::NeedMore))
            };
        };
        let number = self.frames + 1;
        if width == 0 || height == 0 {
            return Err(format!("frame {number} has no pixels ({width}x{height})"));
        }
        check_pixels(width, height)?;
        let pixels = u64::from(width) * u64::from(height);
        self.limits.frame(number, pixels, &mut self.total_pixels)?;
        if !(1..=MAX_CODE_SIZE).contains(&code_size) {
            return Err(format!("frame {number} has LZW code size {code_size}"));
        }
        self.frames = number;
        self.pos = code_at + 1;
        self.block_left = 0;
        self.out = vec![0; OUT_BYTES];
        self.at = At::Image(Box::new(Frame {
            lzw: Decoder::new(BitOrder::Lsb, code_size),
            pixels,
            decoded: 0,
            ended: false,
        }));
        Ok(None)
    }
}

impl Frame {
    /// Decodes `input` (part of one sub-block); returns the bytes used.
    fn feed(&mut self, input: &[u8], out: &mut [u8], number: u32) -> Result<usize, String> {
        let mut used = 0;
        let mut idle = 0;
        loop {
            let r = self.lzw.decode_bytes(&input[used..], out);
            used += r.consumed_in;
            self.decoded = (self.decoded + r.consumed_out as u64).min(self.pixels);
            if self.decoded == self.pixels {
                self.ended = true;
                return Ok(input.len());
            }
            match r.status {
                Ok(LzwStatus::Done) => {
                    return Err(format!(
                        "frame {number}'s LZW data ends after {} of its {} pixels",
                        self.decoded, self.pixels
                    ))
                }
                // weezl has taken in all it can: the input is used up.
                Ok(LzwStatus::NoProgress) => return Ok(input.len()),
                Ok(LzwStatus::Ok) => {
                    // A call may only take in a clear code from the bits
                    // weezl already holds (at most 64): that is progress too.
                    idle = if r.consumed_in == 0 && r.consumed_out == 0 {
                        idle + 1
                    } else {
                        0
                    };
                    if idle > MAX_IDLE_CALLS {
                        if used == input.len() {
                            return Ok(used);
                        }
                        return Err(format!("frame {number}'s LZW decoder made no progress"));
                    }
                }
                Err(LzwError::InvalidCode) => {
                    return Err(format!(
                        "invalid LZW code in frame {number} after {} of its {} pixels",
                        self.decoded, self.pixels
                    ))
                }
            }
        }
    }
}

/// Bytes of the colour table a GIF descriptor's `flags` announce.
fn colour_table(flags: u8) -> usize {
    if flags & 0x80 == 0 {
        0
    } else {
        3 << ((flags & 7) + 1)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{verify, Kind};
    use super::*;

    /// A GIF89a of `frames` frames of `w`x`h`, each LZW-coded from `pixel`
    /// values (code size 2: values 0-3), with a comment and a trailer.
    pub(crate) fn gif(w: u16, h: u16, frames: usize) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend(w.to_le_bytes());
        g.extend(h.to_le_bytes());
        g.extend([0x81, 0, 0]);
        g.extend([0u8; 12]);
        g.extend(b"\x21\xfe\x03abc\x00");
        for f in 0..frames {
            g.extend(b"\x21\xf9\x04\x00\x05\x00\x00\x00");
            g.push(0x2c);
            g.extend([0, 0, 0, 0]);
            g.extend(w.to_le_bytes());
            g.extend(h.to_le_bytes());
            g.push(0);
            g.push(2);
            let pixels: Vec<u8> = (0..usize::from(w) * usize::from(h))
                .map(|i| ((i / 7 + f) % 4) as u8)
                .collect();
            let lzw = weezl::encode::Encoder::new(BitOrder::Lsb, 2)
                .encode(&pixels)
                .expect("LZW-encode test pixels");
            for block in lzw.chunks(255) {
                g.push(block.len() as u8);
                g.extend(block);
            }
            g.push(0);
        }
        g.push(0x3b);
        g
    }

    #[test]
    fn a_built_gif_is_accepted_with_its_frames() {
        assert_eq!(
            verify(&gif(40, 30, 3), "http://h/a.gif", None),
            Ok(Kind::Gif {
                width: 40,
                height: 30,
                frames: 3
            })
        );
    }

    #[test]
    fn every_cut_is_refused_except_after_a_whole_frame() {
        let g = gif(20, 10, 2);
        // Frame 1 ends where a one-frame file's trailer is, frame 2's
        // control extension 8 bytes later, frame 2 before the trailer.
        let one = gif(20, 10, 1).len() - 1;
        let ends = [one, one + 8, g.len() - 1];
        for cut in 6..g.len() {
            let verdict = verify(&g[..cut], "http://h/a.gif", None);
            assert_eq!(
                verdict.is_ok(),
                ends.contains(&cut),
                "cut at {cut}: {verdict:?}"
            );
        }
    }

    #[test]
    fn a_frame_short_of_pixels_is_refused() {
        let mut g = gif(20, 10, 1);
        // The frame claims one more row than its data holds.
        let at = g.iter().position(|&b| b == 0x2c).unwrap();
        g[at + 7] = 11;
        let err = verify(&g, "http://h/a.gif", None).unwrap_err();
        assert!(err.contains("of its 220 pixels"), "{err}");
    }

    #[test]
    fn an_invalid_lzw_code_is_refused() {
        let mut g = gif(64, 64, 1);
        let at = g.iter().position(|&b| b == 0x2c).unwrap() + 13;
        for b in &mut g[at..at + 40] {
            *b = 0xff;
        }
        let err = verify(&g, "http://h/a.gif", None).unwrap_err();
        assert!(err.contains("LZW"), "{err}");
    }

    #[test]
    fn too_many_pixels_over_all_frames_are_refused_naming_the_limit() {
        let g = gif(100, 100, 5);
        let limits = Limits {
            animation_pixels: 30_000,
        };
        let err = super::super::verify_with(&g, "http://h/a.gif", None, limits).unwrap_err();
        assert!(err.contains("download.max_animation_pixels"), "{err}");
    }
}
