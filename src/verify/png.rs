//! PNG: the chunk structure and every byte of the image data, inflated and
//! checked (zlib checksum included) without unfiltering a pixel;
//! incremental and time-sliced.
//!
//! libpng's rules decide what refuses the picture: a critical chunk
//! (IHDR, PLTE, IDAT, IEND) with a wrong CRC, an invalid IHDR, a palette
//! image without PLTE, IDAT data that does not inflate to exactly the rows
//! the picture needs (each with a filter type 0-4) with a valid Adler-32,
//! an unknown critical chunk, a missing IEND. Ancillary chunks (text,
//! colour profiles, APNG animation chunks, ...) are skipped unread, even
//! with a wrong CRC, as libpng skips them: their errors never touch the
//! picture a viewer shows.
//!
//! An APNG (acTL before the first IDAT) is checked like the browsers that
//! animate it: every frame control chunk (fcTL: sequence number, a frame
//! inside the canvas) and every frame's fdAT data, inflated and walked row
//! by row like IDAT, one frame at a time; as many frames as acTL declares;
//! the frames' pixels within `download.max_animation_pixels`. Animation
//! chunks that come too late to animate (acTL after IDAT) are skipped.

use fdeflate::{DecompressionError, Decompressor};

use super::{check_pixels, Clock, Kind, Limits, Progress};

/// The PNG signature.
pub(super) const MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
/// Longest chunk the format allows (2^31 - 1 bytes).
const MAX_CHUNK_LEN: u32 = 0x7fff_ffff;
/// Inflated bytes a back-reference may reach back (deflate's window).
const WINDOW: usize = 32 << 10;
/// Inflated bytes produced per call of the inflater: small enough that a
/// call takes well under a millisecond, large enough to amortise it.
const OUT_BYTES: usize = 64 << 10;
/// Compressed bytes given to the inflater per call, for the same reason.
const IN_BYTES: usize = 64 << 10;

/// Bytes per pixel row and rows of each Adam7 pass (or of the one pass of a
/// non-interlaced picture): (x0, y0, dx, dy).
const ADAM7: [(u32, u32, u32, u32); 7] = [
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
];

/// What IHDR says.
#[derive(Debug, Clone, Copy)]
struct Header {
    /// Width in pixels.
    width: u32,
    /// Height in pixels.
    height: u32,
    /// Colour type (0, 2, 3, 4 or 6).
    color: u8,
    /// Bits per pixel: channels times bit depth.
    bits_per_pixel: u32,
    /// Adam7 interlacing.
    interlaced: bool,
}

/// Walks the inflated image data row by row: every row starts with a filter
/// type byte, and the rows of all passes add up to the expected total.
struct Rows {
    /// The header the rows follow.
    header: Header,
    /// Current pass (0 when not interlaced).
    pass: usize,
    /// Rows left in the current pass.
    rows_left: u64,
    /// Bytes per row of the current pass, filter byte included.
    row_bytes: u64,
    /// Bytes of the current row already seen.
    at: u64,
    /// All rows of all passes have been seen.
    complete: bool,
}

impl Rows {
    fn new(header: Header) -> Rows {
        let mut rows = Rows {
            header,
            pass: 0,
            rows_left: 0,
            row_bytes: 0,
            at: 0,
            complete: false,
        };
        rows.enter_pass(0);
        rows
    }

    /// Moves to pass `pass`, or the next one that has pixels, or the end.
    fn enter_pass(&mut self, mut pass: usize) {
        let h = self.header;
        let passes = if h.interlaced { 7 } else { 1 };
        while pass < passes {
            let (x0, y0, dx, dy) = if h.interlaced {
                ADAM7[pass]
            } else {
                (0, 0, 1, 1)
            };
            let cols = u64::from(h.width.saturating_sub(x0).div_ceil(dx));
            let rows = u64::from(h.height.saturating_sub(y0).div_ceil(dy));
            if cols > 0 && rows > 0 {
                self.pass = pass;
                self.rows_left = rows;
                self.row_bytes = 1 + (cols * u64::from(h.bits_per_pixel)).div_ceil(8);
                self.at = 0;
                return;
            }
            pass += 1;
        }
        self.complete = true;
    }

    /// Checks a run of inflated bytes.
    fn feed(&mut self, mut out: &[u8]) -> Result<(), String> {
        while !out.is_empty() {
            if self.complete {
                return Err("more image data than the picture's rows hold".into());
            }
            if self.at == 0 && out[0] > 4 {
                return Err(format!(
                    "row filter type {} (only 0-4 exist) in pass {}, {} rows before its end",
                    out[0],
                    self.pass + 1,
                    self.rows_left
                ));
            }
            let take = (self.row_bytes - self.at).min(out.len() as u64);
            self.at += take;
            out = &out[take as usize..];
            if self.at == self.row_bytes {
                self.at = 0;
                self.rows_left -= 1;
                if self.rows_left == 0 {
                    self.enter_pass(self.pass + 1);
                }
            }
        }
        Ok(())
    }
}

/// The chunk being read.
struct Chunk {
    /// Its type.
    kind: [u8; 4],
    /// Offset of its data in the body.
    start: usize,
    /// Length of its data.
    len: usize,
    /// Bytes of its data checked so far (CRC, and inflated for IDAT).
    done: usize,
    /// CRC of its type and the data checked so far.
    crc: super::crc32::Crc32,
}

/// The PNG checker's state between calls.
pub(super) struct Checker {
    /// Offset of the next chunk header.
    pos: usize,
    /// The chunk being read.
    chunk: Option<Chunk>,
    /// IHDR, once read.
    header: Option<Header>,
    /// A PLTE chunk was read.
    palette: bool,
    /// Where the IDAT chunks are: none yet, in the first run, or past it.
    idat: Idat,
    /// The inflater of the image data, from the first IDAT.
    inflater: Option<Inflater>,
    /// The row walker, from the first IDAT.
    rows: Option<Rows>,
    /// The zlib stream ended (its Adler-32 checked).
    zlib_done: bool,
    /// The bomb limits.
    limits: Limits,
    /// The animation, when acTL came before the first IDAT.
    anim: Option<Anim>,
}

/// An APNG's animation state.
struct Anim {
    /// Frames acTL declares.
    declared: u32,
    /// Frame control chunks (fcTL) read.
    frames: u32,
    /// The next sequence number (fcTL and fdAT share one sequence).
    next_seq: u32,
    /// The frame whose fdAT data is being read (after IDAT), if any.
    in_frame: bool,
    /// Pixels the frames so far declare, together.
    total_pixels: u64,
}

/// Where the checker is relative to the IDAT chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Idat {
    /// No IDAT yet.
    None,
    /// Inside the first run of consecutive IDAT chunks.
    Run,
    /// Past it; a later IDAT is ignored, as libpng ignores it.
    After,
}

impl Checker {
    /// A checker for a body that starts with the PNG signature.
    pub fn new(limits: Limits) -> Box<Checker> {
        Box::new(Checker {
            limits,
            anim: None,
            pos: MAGIC.len(),
            chunk: None,
            header: None,
            palette: false,
            idat: Idat::None,
            inflater: None,
            rows: None,
            zlib_done: false,
        })
    }

    /// Bytes this checker holds.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Checker>() + self.inflater.as_ref().map_or(0, Inflater::memory_bytes)
    }

    /// Goes on through `data` (the body so far) until the deadline, the end
    /// of what has arrived, or the verdict.
    pub fn step(&mut self, data: &[u8], complete: bool, clock: &mut Clock) -> Progress {
        loop {
            match self.next(data, complete, clock) {
                Ok(None) => {}
                Ok(Some(progress)) => return progress,
                Err(e) => return Progress::Done(Err(format!("broken PNG: {e}"))),
            }
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
        let Some(chunk) = self.chunk.as_mut() else {
            let Some(head) = data.get(self.pos..self.pos + 8) else {
                return wait(if self.header.is_none() {
                    "before IHDR"
                } else {
                    "before IEND"
                });
            };
            let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
            let kind: [u8; 4] = head[4..].try_into().expect("4 bytes");
            if !kind.iter().all(u8::is_ascii_alphabetic) {
                return Err(format!(
                    "invalid chunk type {:?}",
                    String::from_utf8_lossy(&kind)
                ));
            }
            if len > MAX_CHUNK_LEN {
                return Err(format!("chunk {} claims {len} bytes", name(&kind)));
            }
            self.begin_chunk(kind)?;
            let mut crc = super::crc32::Crc32::new();
            crc.update(&kind);
            self.chunk = Some(Chunk {
                kind,
                start: self.pos + 8,
                len: len as usize,
                done: 0,
                crc,
            });
            return Ok(None);
        };
        // The chunk's data, as far as it has arrived.
        let available = data.len().saturating_sub(chunk.start).min(chunk.len);
        let in_frame = self.anim.as_ref().is_some_and(|a| a.in_frame);
        let is_fdat = &chunk.kind == b"fdAT" && in_frame;
        if is_fdat && chunk.done < 4 {
            // The sequence number, then the frame's zlib data.
            if available < 4 {
                return wait("inside chunk fdAT");
            }
            let seq = &data[chunk.start..chunk.start + 4];
            chunk.crc.update(seq);
            chunk.done = 4;
            let seq = u32::from_be_bytes(seq.try_into().expect("4 bytes"));
            let anim = self.anim.as_mut().expect("in a frame");
            anim.sequence(seq, "fdAT")?;
            return Ok(None);
        }
        if chunk.done < available {
            let is_idat = (&chunk.kind == b"IDAT" && self.idat == Idat::Run) || is_fdat;
            let end = available.min(chunk.done + IN_BYTES);
            let piece = &data[chunk.start + chunk.done..chunk.start + end];
            let used = if is_idat && !self.zlib_done {
                let inflater = self.inflater.as_mut().expect("set at the first IDAT");
                let rows = self.rows.as_mut().expect("set at the first IDAT");
                let (used, ended) = inflater.feed(piece, rows)?;
                self.zlib_done = ended;
                used
            } else {
                piece.len()
            };
            chunk.crc.update(&piece[..used]);
            chunk.done += used;
            let units = (used / 1024) as u32 + 1;
            return Ok(clock.spend(units).then_some(Progress::Paused));
        }
        if chunk.done < chunk.len {
            return wait(&format!("inside chunk {}", name(&chunk.kind)));
        }
        // An IDAT's (or fdAT's) inflater may still hold output for a full buffer.
        if ((&chunk.kind == b"IDAT" && self.idat == Idat::Run) || is_fdat) && !self.zlib_done {
            let inflater = self.inflater.as_mut().expect("set at the first IDAT");
            let rows = self.rows.as_mut().expect("set at the first IDAT");
            let (_, ended) = inflater.feed(&[], rows)?;
            self.zlib_done = ended;
        }
        let crc_at = chunk.start + chunk.len;
        let Some(stored) = data.get(crc_at..crc_at + 4) else {
            return wait(&format!("before the CRC of chunk {}", name(&chunk.kind)));
        };
        let stored = u32::from_be_bytes(stored.try_into().expect("4 bytes"));
        let chunk = self.chunk.take().expect("checked above");
        self.pos = crc_at + 4;
        let critical = chunk.kind[0].is_ascii_uppercase();
        let animating = self.anim.is_some() && matches!(&chunk.kind, b"fcTL" | b"fdAT");
        if chunk.crc.finalize() != stored {
            if critical || animating {
                return Err(format!("CRC error in chunk {}", name(&chunk.kind)));
            }
            // libpng discards an ancillary chunk with a bad CRC.
            return Ok(None);
        }
        let body = &data[chunk.start..crc_at];
        match &chunk.kind {
            b"IHDR" => self.header = Some(parse_ihdr(body)?),
            b"PLTE" => self.palette(body)?,
            b"IEND" => return self.finish().map(|k| Some(Progress::Done(Ok(k)))),
            b"IDAT" => {}
            b"acTL" if self.idat == Idat::None && self.anim.is_none() => self.actl(body)?,
            b"fcTL" if self.anim.is_some() => self.fctl(body)?,
            b"fdAT" if self.anim.is_some() && !in_frame => {
                return Err("fdAT without a frame control chunk (fcTL) before it".into());
            }
            _ if critical => {
                return Err(format!("unknown critical chunk {}", name(&chunk.kind)));
            }
            _ => {}
        }
        Ok(clock.spend(1).then_some(Progress::Paused))
    }

    /// Checks that a chunk of `kind` may start here, and what it starts.
    fn begin_chunk(&mut self, kind: [u8; 4]) -> Result<(), String> {
        let Some(header) = self.header else {
            return if &kind == b"IHDR" {
                Ok(())
            } else {
                Err(format!("chunk {} before IHDR", name(&kind)))
            };
        };
        match &kind {
            b"IHDR" => return Err("a second IHDR".into()),
            b"IDAT" => match self.idat {
                Idat::None => {
                    if header.color == 3 && !self.palette {
                        return Err("palette picture without PLTE before IDAT".into());
                    }
                    self.idat = Idat::Run;
                    self.inflater = Some(Inflater::new());
                    self.rows = Some(Rows::new(header));
                }
                Idat::Run | Idat::After => {}
            },
            _ => {
                if self.idat == Idat::Run {
                    self.end_idat_run()?;
                }
            }
        }
        Ok(())
    }

    /// The first run of IDAT chunks is over: the image data must be complete.
    fn end_idat_run(&mut self) -> Result<(), String> {
        self.idat = Idat::After;
        let rows = self.rows.as_ref().expect("set at the first IDAT");
        if !rows.complete {
            return Err(format!(
                "not enough image data: the IDAT chunks end {} rows before the end of pass {}",
                rows.rows_left,
                rows.pass + 1
            ));
        }
        if !self.zlib_done {
            return Err("the image data's zlib stream does not end (no Adler-32)".into());
        }
        // Done with the inflater: give its memory back.
        self.inflater = None;
        Ok(())
    }

    /// acTL: the number of frames.
    fn actl(&mut self, body: &[u8]) -> Result<(), String> {
        if body.len() != 8 {
            return Err(format!("acTL of {} bytes", body.len()));
        }
        let declared = u32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
        if declared == 0 {
            return Err("acTL declares 0 frames".into());
        }
        self.anim = Some(Anim {
            declared,
            frames: 0,
            next_seq: 0,
            in_frame: false,
            total_pixels: 0,
        });
        Ok(())
    }

    /// fcTL: ends the frame before it, and starts the next one (whose data
    /// is the IDAT when it comes before IDAT, else the fdAT chunks after it).
    fn fctl(&mut self, body: &[u8]) -> Result<(), String> {
        let header = self.header.expect("IHDR comes first");
        if body.len() != 26 {
            return Err(format!("fcTL of {} bytes", body.len()));
        }
        let field = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
        let (seq, width, height, x, y) = (field(0), field(4), field(8), field(12), field(16));
        self.end_frame()?;
        let anim = self.anim.as_mut().expect("checked by the caller");
        anim.sequence(seq, "fcTL")?;
        let number = anim.frames + 1;
        if number > anim.declared {
            return Err(format!(
                "more frames than the {} acTL declares",
                anim.declared
            ));
        }
        if width == 0
            || height == 0
            || u64::from(x) + u64::from(width) > u64::from(header.width)
            || u64::from(y) + u64::from(height) > u64::from(header.height)
        {
            return Err(format!(
                "frame {number} ({width}x{height} at {x},{y}) lies outside the {}x{} canvas",
                header.width, header.height
            ));
        }
        let before_idat = self.idat == Idat::None;
        if before_idat && (width, height, x, y) != (header.width, header.height, 0, 0) {
            return Err(format!(
                "frame 1 is the default image but is {width}x{height} at {x},{y}"
            ));
        }
        self.limits.frame(
            number,
            u64::from(width) * u64::from(height),
            &mut anim.total_pixels,
        )?;
        anim.frames = number;
        if !before_idat {
            // (The IDAT run ended when this chunk began: `begin_chunk`.)
            anim.in_frame = true;
            self.inflater = Some(Inflater::new());
            self.rows = Some(Rows::new(Header {
                width,
                height,
                ..header
            }));
            self.zlib_done = false;
        }
        Ok(())
    }

    /// The fdAT frame being read (if any) is over: its data must be complete.
    fn end_frame(&mut self) -> Result<(), String> {
        let Some(anim) = self.anim.as_mut().filter(|a| a.in_frame) else {
            return Ok(());
        };
        anim.in_frame = false;
        let frame = anim.frames;
        let rows = self.rows.as_ref().expect("set at the frame's fcTL");
        if !rows.complete {
            return Err(format!(
                "frame {frame}'s image data (fdAT) ends {} rows before the end of pass {}",
                rows.rows_left,
                rows.pass + 1
            ));
        }
        if !self.zlib_done {
            return Err(format!(
                "frame {frame}'s zlib stream does not end (no Adler-32)"
            ));
        }
        self.inflater = None;
        Ok(())
    }

    /// PLTE: entries of 3 bytes, 1 to 256 of them; only a palette picture
    /// (colour type 3) depends on it, and libpng ignores it elsewhere.
    fn palette(&mut self, body: &[u8]) -> Result<(), String> {
        let header = self.header.expect("IHDR comes first");
        if header.color != 3 {
            return Ok(());
        }
        if self.idat != Idat::None {
            return Err("PLTE after IDAT".into());
        }
        if self.palette {
            return Err("a second PLTE".into());
        }
        if body.is_empty() || !body.len().is_multiple_of(3) || body.len() > 3 * 256 {
            return Err(format!("PLTE of {} bytes", body.len()));
        }
        self.palette = true;
        Ok(())
    }

    /// IEND: the verdict.
    fn finish(&mut self) -> Result<Kind, String> {
        match self.idat {
            Idat::None => return Err("no image data (IDAT) before IEND".into()),
            Idat::Run => self.end_idat_run()?,
            Idat::After => {}
        }
        self.end_frame()?;
        if let Some(anim) = &self.anim {
            if anim.frames != anim.declared {
                return Err(format!(
                    "acTL declares {} frames and {} came",
                    anim.declared, anim.frames
                ));
            }
        }
        let header = self.header.expect("IHDR comes first");
        Ok(Kind::Png {
            width: header.width,
            height: header.height,
        })
    }
}

impl Anim {
    /// Checks and takes the sequence number `seq` of a `chunk`.
    fn sequence(&mut self, seq: u32, chunk: &str) -> Result<(), String> {
        if seq != self.next_seq {
            return Err(format!(
                "{chunk} has sequence number {seq}, expected {}",
                self.next_seq
            ));
        }
        self.next_seq += 1;
        Ok(())
    }
}

/// The zlib inflater of the image data and its output window.
struct Inflater {
    /// The decompressor (checks the zlib header and the Adler-32).
    decompressor: Box<Decompressor>,
    /// Output: the last `WINDOW` bytes (for back-references), then new ones.
    buf: Vec<u8>,
    /// End of the output in `buf`.
    at: usize,
}

impl Inflater {
    fn new() -> Inflater {
        Inflater {
            decompressor: Box::new(Decompressor::new()),
            buf: vec![0; WINDOW + OUT_BYTES],
            at: 0,
        }
    }

    fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Decompressor>() + self.buf.capacity()
    }

    /// Inflates from `input` (possibly empty, to drain pending output) into
    /// `rows` until the input is used up and the output stops; returns the
    /// bytes used and whether the zlib stream ended.
    fn feed(&mut self, input: &[u8], rows: &mut Rows) -> Result<(usize, bool), String> {
        let mut used = 0;
        loop {
            if self.at == self.buf.len() {
                self.buf.copy_within(self.at - WINDOW.., 0);
                self.at = WINDOW;
            }
            let (consumed, produced) = self
                .decompressor
                .read(&input[used..], &mut self.buf, self.at, false)
                .map_err(|e| match e {
                    DecompressionError::WrongChecksum => {
                        "the image data's Adler-32 checksum is wrong".to_owned()
                    }
                    e => format!("corrupt image data (deflate stream error: {e:?})"),
                })?;
            rows.feed(&self.buf[self.at..self.at + produced])?;
            self.at += produced;
            used += consumed;
            if self.decompressor.is_done() {
                if !rows.complete {
                    return Err(format!(
                        "not enough image data: the zlib stream ends {} rows before the end \
                         of pass {}",
                        rows.rows_left,
                        rows.pass + 1
                    ));
                }
                return Ok((input.len(), true));
            }
            let blocked = self.at == self.buf.len();
            if !blocked && used == input.len() {
                return Ok((used, false));
            }
            if !blocked && consumed == 0 && produced == 0 {
                // fdeflate promises progress; never spin on a stuck stream.
                return Err("corrupt image data (the inflater made no progress)".into());
            }
        }
    }
}

/// IHDR: 13 bytes, sizes 1 to 2^31-1, a valid colour type and bit depth,
/// compression and filter method 0, interlace 0 or 1.
fn parse_ihdr(body: &[u8]) -> Result<Header, String> {
    if body.len() != 13 {
        return Err(format!("IHDR of {} bytes", body.len()));
    }
    let width = u32::from_be_bytes(body[0..4].try_into().expect("4 bytes"));
    let height = u32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
    let (depth, color) = (body[8], body[9]);
    if width > MAX_CHUNK_LEN || height > MAX_CHUNK_LEN {
        return Err(format!("{width}x{height} is out of range"));
    }
    check_pixels(width, height)?;
    let channels = match (color, depth) {
        (0, 1 | 2 | 4 | 8 | 16) => 1,
        (3, 1 | 2 | 4 | 8) => 1,
        (2 | 6 | 4, 8 | 16) => [0, 0, 3, 0, 2, 0, 4][usize::from(color)],
        _ => return Err(format!("colour type {color} with bit depth {depth}")),
    };
    if body[10] != 0 || body[11] != 0 {
        return Err(format!(
            "compression method {} / filter method {}",
            body[10], body[11]
        ));
    }
    if body[12] > 1 {
        return Err(format!("interlace method {}", body[12]));
    }
    Ok(Header {
        width,
        height,
        color,
        bits_per_pixel: channels * u32::from(depth),
        interlaced: body[12] == 1,
    })
}

/// A chunk type for messages.
fn name(kind: &[u8; 4]) -> String {
    String::from_utf8_lossy(kind).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{verify, Kind};

    fn accept(file: &[u8]) {
        let kind = verify(file, "http://h/a.png", None).unwrap_or_else(|e| panic!("refused: {e}"));
        assert!(matches!(kind, Kind::Png { .. }));
    }

    fn refuse(file: &[u8], needle: &str) {
        let err = verify(file, "http://h/a.png", None).expect_err("accepted");
        assert!(err.contains(needle), "{err}");
    }

    /// Rows of a 4x3 grey picture, filter type 0.
    fn rows() -> Vec<u8> {
        (0..3).flat_map(|y| [0, y, y + 1, y + 2, y + 3]).collect()
    }

    /// `file` with the data of its first chunk `kind` replaced by `data`.
    fn replace_chunk(file: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let (at, _, range) = png_chunks(file)
            .into_iter()
            .find(|(_, k, _)| k == kind)
            .expect("chunk present");
        let mut out = file[..at].to_vec();
        out.extend(png_chunk(kind, data));
        out.extend(&file[range.end + 4..]);
        out
    }

    /// `file` with `chunk` inserted before its first chunk `before`.
    fn insert_before(file: &[u8], before: &[u8; 4], chunk: &[u8]) -> Vec<u8> {
        let (at, _, _) = png_chunks(file)
            .into_iter()
            .find(|(_, k, _)| k == before)
            .expect("chunk present");
        let mut out = file[..at].to_vec();
        out.extend(chunk);
        out.extend(&file[at..]);
        out
    }

    fn idat(file: &[u8]) -> Vec<u8> {
        let (_, _, range) = png_chunks(file)
            .into_iter()
            .find(|(_, k, _)| k == b"IDAT")
            .unwrap();
        file[range].to_vec()
    }

    #[test]
    fn built_picture_is_accepted() {
        accept(&grey_png(4, 3, &rows(), &[]));
        accept(&png(37, 21));
    }

    #[test]
    fn every_cut_is_refused() {
        let file = png(16, 12);
        for cut in 8..file.len() {
            assert!(
                verify(&file[..cut], "http://h/a.png", None).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn corrupt_deflate_data_with_good_crcs_is_refused() {
        let file = grey_png(4, 3, &rows(), &[]);
        let mut data = idat(&file);
        data[2] ^= 0xff; // the first deflate block header
        let err = verify(
            &replace_chunk(&file, b"IDAT", &data),
            "http://h/a.png",
            None,
        )
        .unwrap_err();
        assert!(
            err.contains("corrupt image data") || err.contains("not enough"),
            "{err}"
        );
    }

    #[test]
    fn bad_adler32_with_good_crcs_is_refused() {
        let file = grey_png(4, 3, &rows(), &[]);
        let mut data = idat(&file);
        let last = data.len() - 1;
        data[last] ^= 1;
        refuse(&replace_chunk(&file, b"IDAT", &data), "Adler-32");
    }

    #[test]
    fn bad_filter_type_is_refused() {
        let mut bad = rows();
        bad[5] = 5;
        refuse(&grey_png(4, 3, &bad, &[]), "filter type 5");
    }

    #[test]
    fn image_data_must_fill_the_rows_exactly() {
        refuse(&grey_png(4, 3, &rows()[..14], &[]), "not enough image data");
        let mut more = rows();
        more.extend([0, 1, 2, 3, 4]);
        refuse(&grey_png(4, 3, &more, &[]), "more image data");
    }

    #[test]
    fn text_chunk_without_its_null_separator_is_ignored() {
        let text = png_chunk(b"tEXt", b"no separator here");
        accept(&grey_png(4, 3, &rows(), &[text]));
    }

    #[test]
    fn animation_control_after_idat_is_ignored() {
        let file = grey_png(4, 3, &rows(), &[]);
        let actl = png_chunk(b"acTL", &[0, 0, 0, 1, 0, 0, 0, 0]);
        accept(&insert_before(&file, b"IEND", &actl));
    }

    #[test]
    fn ancillary_chunk_with_a_bad_crc_is_skipped_but_a_critical_one_is_refused() {
        let mut gama = png_chunk(b"gAMA", &[0, 1, 0x86, 0xa0]);
        let last = gama.len() - 1;
        gama[last] ^= 1;
        accept(&grey_png(4, 3, &rows(), &[gama]));
        let mut file = grey_png(4, 3, &rows(), &[]);
        let (_, _, range) = png_chunks(&file)
            .into_iter()
            .find(|(_, k, _)| k == b"IDAT")
            .unwrap();
        file[range.end] ^= 1;
        refuse(&file, "CRC error in chunk IDAT");
    }

    #[test]
    fn unknown_critical_chunk_and_missing_iend_are_refused() {
        let file = grey_png(4, 3, &rows(), &[png_chunk(b"ABCD", &[])]);
        refuse(&file, "unknown critical chunk ABCD");
        let file = grey_png(4, 3, &rows(), &[]);
        refuse(&file[..file.len() - 12], "cut short");
    }

    #[test]
    fn palette_picture_needs_its_palette() {
        let mut ihdr = Vec::new();
        ihdr.extend(4u32.to_be_bytes());
        ihdr.extend(3u32.to_be_bytes());
        ihdr.extend([8, 3, 0, 0, 0]);
        let file = grey_png(4, 3, &rows(), &[]);
        let paletted = replace_chunk(&file, b"IHDR", &ihdr);
        refuse(&paletted, "without PLTE");
        accept(&insert_before(
            &paletted,
            b"IDAT",
            &png_chunk(b"PLTE", &[0; 12]),
        ));
    }

    /// An APNG of 8x6 grey: the default image is frame 1, then `frames - 1`
    /// frames of 4x3 at (2,1), each in two fdAT chunks.
    fn apng(frames: u32) -> Vec<u8> {
        let rows = |w: u8, h: u8| -> Vec<u8> {
            (0..h)
                .flat_map(|y| std::iter::once(0).chain((0..w).map(move |x| x ^ y)))
                .collect()
        };
        let fctl = |seq: u32, w: u32, h: u32, x: u32, y: u32| {
            let mut b = Vec::new();
            for v in [seq, w, h, x, y] {
                b.extend(v.to_be_bytes());
            }
            b.extend([0, 1, 0, 10, 0, 0]);
            png_chunk(b"fcTL", &b)
        };
        let mut actl = frames.to_be_bytes().to_vec();
        actl.extend([0, 0, 0, 0]);
        let file = grey_png(
            8,
            6,
            &rows(8, 6),
            &[png_chunk(b"acTL", &actl), fctl(0, 8, 6, 0, 0)],
        );
        let (iend, _, _) = *png_chunks(&file).last().unwrap();
        let mut out = file[..iend].to_vec();
        let mut seq = 1;
        for _ in 1..frames {
            out.extend(fctl(seq, 4, 3, 2, 1));
            seq += 1;
            let z = fdeflate::compress_to_vec(&rows(4, 3));
            for half in [&z[..z.len() / 2], &z[z.len() / 2..]] {
                let mut d = seq.to_be_bytes().to_vec();
                d.extend(half);
                out.extend(png_chunk(b"fdAT", &d));
                seq += 1;
            }
        }
        out.extend(png_chunk(b"IEND", &[]));
        out
    }

    #[test]
    fn an_apng_is_accepted_and_its_frames_checked() {
        accept(&apng(1));
        accept(&apng(4));
    }

    #[test]
    fn an_apng_whose_last_fdat_is_cut_short_is_refused() {
        let file = apng(3);
        let (at, _, range) = png_chunks(&file)
            .into_iter()
            .rev()
            .find(|(_, k, _)| k == b"fdAT")
            .unwrap();
        let data = &file[range.start..range.end - 3];
        let mut cut = file[..at].to_vec();
        cut.extend(png_chunk(b"fdAT", data));
        cut.extend(png_chunk(b"IEND", &[]));
        refuse(&cut, "frame 3");
    }

    #[test]
    fn apng_sequence_canvas_and_frame_count_are_checked() {
        let file = apng(3);
        // The second fcTL (sequence 1) claims sequence 7.
        let (_, _, range) = png_chunks(&file)
            .into_iter()
            .filter(|(_, k, _)| k == b"fcTL")
            .nth(1)
            .unwrap();
        let mut body = file[range.clone()].to_vec();
        body[3] = 7;
        let mut bad = file[..range.start - 8].to_vec();
        bad.extend(png_chunk(b"fcTL", &body));
        bad.extend(&file[range.end + 4..]);
        refuse(&bad, "sequence number 7");
        // The same frame 4 pixels further right sticks out of the 8-wide canvas.
        body[3] = 1;
        body[15] = 6;
        let mut out = file[..range.start - 8].to_vec();
        out.extend(png_chunk(b"fcTL", &body));
        out.extend(&file[range.end + 4..]);
        refuse(&out, "outside the 8x6 canvas");
        // acTL declares 4 frames; 3 came.
        let mut actl = 4u32.to_be_bytes().to_vec();
        actl.extend([0, 0, 0, 0]);
        refuse(
            &replace_chunk(&file, b"acTL", &actl),
            "declares 4 frames and 3 came",
        );
    }

    #[test]
    fn apng_frames_over_the_pixel_budget_are_refused_naming_the_limit() {
        let limits = super::super::Limits {
            animation_pixels: 55,
        };
        let err = super::super::verify_with(&apng(3), "http://h/a.png", None, limits).unwrap_err();
        assert!(err.contains("download.max_animation_pixels"), "{err}");
        assert!(err.contains("frame 2"), "{err}");
    }

    #[test]
    fn bomb_is_refused_before_inflating() {
        let mut ihdr = Vec::new();
        ihdr.extend(60000u32.to_be_bytes());
        ihdr.extend(60000u32.to_be_bytes());
        ihdr.extend([8, 0, 0, 0, 0]);
        refuse(&replace_chunk(&png(1, 1), b"IHDR", &ihdr), "too large");
    }
}
