//! JPEG: the marker structure, frame and scan headers, and a walk over every
//! entropy-coded bit of every scan (no pixels), incremental and time-sliced.
//!
//! Where T.81 leaves room, libjpeg's rules decide: bytes between segments
//! that are not a marker are skipped (libjpeg warns and goes on), an APPn or
//! COM length under 2 means no data, undefined Huffman tables 0 and 1 of a
//! sequential frame are T.81's typical tables (Motion-JPEG), reserved
//! markers and unsupported processes are refused. A Huffman scan that needs
//! bits past a marker or the end ("premature end of data segment": the rest
//! of the picture grey) is refused, as are bad codes and overflows.

use super::jpeg_arith::{self as arith, Arith, Conditioning, Qm, Stats};
use super::jpeg_huffman::{self as huff, Bits, Fault, HuffTable, Reader};
use super::{check_pixels, Clock, Kind, Progress, MAX_VERIFIER_BYTES};

/// The largest width or height libjpeg decodes (its JPEG_MAX_DIMENSION).
const MAX_DIMENSION: u16 = 65500;
/// Components a frame may have (libjpeg's MAX_COMPONENTS).
const MAX_COMPONENTS: usize = 10;
/// Components a scan may have (T.81 B.2.3).
const MAX_SCAN_COMPONENTS: usize = 4;
/// Blocks an interleaved MCU may hold (T.81 B.2.3, libjpeg's D_MAX_BLOCKS_IN_MCU).
const MAX_BLOCKS_IN_MCU: usize = 10;
/// Bytes one arithmetic-coded MCU can consume at most, with room to spare:
/// 10 blocks of at most ~2,200 decisions of at most 15 bits each, doubled
/// for 0xFF 0x00 stuffing, is under 90 KiB. Arithmetic statistics change
/// with every decision, so an MCU is not rolled back like a Huffman one:
/// while bytes are still arriving it is decoded only with this much in
/// hand (or its scan's end marker in view).
const ARITH_MCU_MARGIN: usize = 128 << 10;
/// Bytes of "already nonzero" bitmaps (progressive AC, 8 bytes per block)
/// any progressive file may have, whatever its size: 1 MiB covers 8 MP.
const FREE_BITMAP_BYTES: u64 = 1 << 20;
/// Bitmap bytes each byte read before an AC scan justifies. A real file's
/// DC scans spend at least one bit per block (Huffman codes are 1 bit or
/// longer), so it has read at least one byte per 8 blocks, which is 64
/// bitmap bytes; four times that leaves room, and a tiny file claiming a
/// huge progressive picture is refused before anything is allocated.
const BITMAP_BYTES_PER_FILE_BYTE: u64 = 256;
/// Bytes that are not a marker tolerated between two segments. libjpeg
/// skips them with a warning; a few stray ones (the corpora's valid files
/// have up to 2) are an encoder's quirk, but a longer run means a marker
/// was damaged and its segment lost: in the corpora, the header of a
/// progressive file's DC scan, leaving two thirds of the picture grey.
/// (After a scan's data, and before a restart marker, libjpeg's leniency
/// stands: an encoder's padding is common there.)
const MAX_EXTRANEOUS_BYTES: usize = 16;

/// Zero bytes an arithmetic decoder may read past the marker that ends its
/// data. A marker is a legitimate end (the encoder drops trailing zero
/// bytes, and its final flush is a few bytes), but a file cut short and
/// closed with a marker reads on at the rate of real data: tens of bytes
/// per MCU. (libjpeg's testimgari.jpg reads 1; cut 1% short, 85.)
const ARITH_ZEROS_PAST_MARKER: u64 = 32;
/// MCUs decoded past the marker that justify one more zero byte: even a
/// flat region, the cheapest content, costs under 1/10,000 of a byte per
/// MCU, so a long flat tail is covered with a wide margin.
const MCUS_PER_ZERO_BYTE: u64 = 1024;

/// Most scans a picture may have: libjpeg-turbo's `djpeg -maxscans 100`
/// refuses more. A legitimate progressive file has about 10 (jpegtran's
/// and mozjpeg's scripts, at most a few dozen with every refinement); a
/// scan that covers every block with one end-of-band run costs a few bytes
/// and a pass over every block, so without a cap a small file buys
/// unbounded work.
pub(super) const MAX_SCANS: u32 = 100;
/// [`Component::approximation`] of a coefficient no scan has coded yet.
const NOT_CODED: i8 = -1;

// Marker codes (T.81 Table B.1).
const SOF0: u8 = 0xc0;
const SOF1: u8 = 0xc1;
const SOF2: u8 = 0xc2;
const SOF3: u8 = 0xc3;
const DHT: u8 = 0xc4;
const SOF9: u8 = 0xc9;
const SOF10: u8 = 0xca;
const DAC: u8 = 0xcc;
const RST0: u8 = 0xd0;
const RST7: u8 = 0xd7;
const SOI: u8 = 0xd8;
const EOI: u8 = 0xd9;
const SOS: u8 = 0xda;
const DQT: u8 = 0xdb;
const DNL: u8 = 0xdc;
const DRI: u8 = 0xdd;
const APP0: u8 = 0xe0;
const APP15: u8 = 0xef;
const COM: u8 = 0xfe;
const TEM: u8 = 0x01;

/// The coding process of the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Process {
    /// Baseline or extended sequential DCT.
    Sequential,
    /// Progressive DCT.
    Progressive,
    /// Lossless (Huffman only: libjpeg has no arithmetic lossless).
    Lossless,
}

/// One component of the frame.
struct Component {
    /// Its identifier, as scan headers name it.
    id: u8,
    /// Horizontal sampling factor (1-4).
    h: u8,
    /// Vertical sampling factor (1-4).
    v: u8,
    /// Quantization table slot.
    tq: u8,
    /// Data units (8x8 blocks, or samples for lossless) across the component
    /// alone, as a scan of only this component covers it.
    units_w: u32,
    /// Data units down the component alone.
    units_h: u32,
    /// A scan has covered it.
    scanned: bool,
    /// Progressive only: per block, which AC coefficients are nonzero so far
    /// (bit k for coefficient k); allocated at its first AC scan.
    nonzero: Vec<u64>,
    /// Progressive only: per coefficient, the lowest bit coded so far (Al of
    /// its last scan), or [`NOT_CODED`]; libjpeg's `coef_bits`.
    approximation: [i8; 64],
}

/// The frame header (SOFn).
struct Frame {
    /// How the scans are coded.
    process: Process,
    /// Arithmetic coding (SOF9, SOF10) rather than Huffman.
    arithmetic: bool,
    /// Width in pixels.
    width: u16,
    /// Height in pixels.
    height: u16,
    /// The components, in frame order.
    comps: Vec<Component>,
    /// MCUs across an interleaved scan.
    mcus_w: u32,
    /// MCUs down an interleaved scan.
    mcus_h: u32,
}

/// What a scan codes (T.81 G.1.1 for the progressive kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanKind {
    /// Whole blocks, sequential DCT.
    Sequential,
    /// Progressive, first DC scan.
    DcFirst,
    /// Progressive, a further bit of the DC coefficients.
    DcRefine,
    /// Progressive, first scan of an AC band.
    AcFirst,
    /// Progressive, a further bit of an AC band.
    AcRefine,
    /// Lossless sample differences.
    Lossless,
}

/// One component of a scan.
#[derive(Clone, Copy)]
struct ScanComp {
    /// Index into the frame's components.
    comp: usize,
    /// DC (or lossless) table slot.
    dc: usize,
    /// AC table slot.
    ac: usize,
}

/// Where the entropy decoder of a scan is between calls.
enum Coder {
    /// Huffman: the bit stream and the end-of-band run.
    Huffman {
        /// Position and loaded bits.
        bits: Bits,
        /// Blocks left in the current end-of-band run (progressive AC).
        eobrun: u32,
    },
    /// Arithmetic: the decoder's registers and the DC conditioning.
    Arith {
        /// Registers and position.
        qm: Qm,
        /// INITDEC has run for the current restart interval.
        started: bool,
        /// DC context per scan component (F.1.4.4.1.2).
        contexts: [u8; MAX_SCAN_COMPONENTS],
        /// The MCU at which the decoder reached the marker, if it has.
        marker_mcu: Option<u64>,
    },
}

/// A scan in progress.
struct Scan {
    /// Its number in the file, from 1, for messages.
    number: u32,
    /// What it codes.
    kind: ScanKind,
    /// Its components, in scan order.
    comps: Vec<ScanComp>,
    /// For each block (data unit) of an MCU, the index into `comps`.
    mcu: Vec<u8>,
    /// The spectral band `Ss..=Se` (AC scans and sequential AC).
    band: (u32, u32),
    /// MCUs in the scan.
    mcus: u64,
    /// MCUs decoded.
    done: u64,
    /// MCUs per restart interval, 0 for none.
    interval: u32,
    /// MCUs left in the current interval.
    left: u32,
    /// The number (0-7) of the next restart marker.
    next_rst: u8,
    /// A restart marker must be read before the next MCU.
    restart_due: bool,
    /// The entropy decoder.
    coder: Coder,
}

/// What a piece of work ended with.
enum Flow {
    /// Go on with the next piece.
    Continue,
    /// The bytes received so far are used up.
    NeedMore,
    /// The deadline came.
    Paused,
    /// The picture is complete.
    Finished(Kind),
}

/// A Huffman table slot: empty, or built (or the reason it cannot be), as
/// libjpeg only refuses a bad table when a scan uses it.
type Slot = Option<Result<Box<HuffTable>, String>>;

/// The JPEG checker's state between calls.
pub(super) struct Checker {
    /// Offset of the next byte to look at outside a scan.
    pos: usize,
    /// The frame, once its header is read.
    frame: Option<Frame>,
    /// Quantization table slots defined so far.
    quant: [bool; 4],
    /// DC (and lossless) Huffman table slots.
    dc: [Slot; 4],
    /// AC Huffman table slots.
    ac: [Slot; 4],
    /// Arithmetic conditioning (DAC).
    conditioning: Conditioning,
    /// Arithmetic statistics bins, for an arithmetic frame.
    stats: Option<Box<Stats>>,
    /// Restart interval in MCUs (DRI), 0 for none.
    restart_interval: u16,
    /// The scan in progress.
    scan: Option<Box<Scan>>,
    /// Scans started so far.
    scans: u32,
    /// Bytes held by the components' bitmaps.
    bitmap_bytes: u64,
    /// `pos` is right after a scan's entropy-coded data.
    after_scan: bool,
    /// Extraneous bytes skipped before `pos` since the last marker (the
    /// search for the next one resumes as bytes arrive).
    skipped: usize,
}

impl Checker {
    /// A checker for a body that starts with SOI.
    pub fn new() -> Box<Checker> {
        Box::new(Checker {
            pos: 2,
            frame: None,
            quant: [false; 4],
            dc: Default::default(),
            ac: Default::default(),
            conditioning: Conditioning::default(),
            stats: None,
            restart_interval: 0,
            scan: None,
            scans: 0,
            bitmap_bytes: 0,
            after_scan: false,
            skipped: 0,
        })
    }

    /// Bytes this checker holds, tables and bitmaps included.
    pub fn memory_bytes(&self) -> usize {
        let tables = self
            .dc
            .iter()
            .chain(&self.ac)
            .filter(|s| matches!(s, Some(Ok(_))))
            .count();
        let frame = self.frame.as_ref().map_or(0, |f| {
            f.comps.capacity() * std::mem::size_of::<Component>()
                + f.comps
                    .iter()
                    .map(|c| c.nonzero.capacity() * 8)
                    .sum::<usize>()
        });
        let scan = self.scan.as_ref().map_or(0, |s| {
            std::mem::size_of::<Scan>()
                + s.comps.capacity() * std::mem::size_of::<ScanComp>()
                + s.mcu.capacity()
        });
        std::mem::size_of::<Checker>()
            + tables * HuffTable::BYTES
            + self
                .stats
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<Stats>())
            + frame
            + scan
    }

    /// Goes on through `data` (the body so far) until the deadline, the end
    /// of what has arrived, or the verdict.
    pub fn step(&mut self, data: &[u8], complete: bool, clock: &mut Clock) -> Progress {
        loop {
            let flow = if self.scan.is_some() {
                self.run_scan(data, complete, clock)
            } else {
                self.next_segment(data, complete)
            };
            match flow {
                Ok(Flow::Continue) => {}
                Ok(Flow::NeedMore) => return Progress::NeedMore,
                Ok(Flow::Paused) => return Progress::Paused,
                Ok(Flow::Finished(kind)) => return Progress::Done(Ok(kind)),
                Err(e) => return Progress::Done(Err(format!("broken JPEG: {e}"))),
            }
            if clock.spend(1) {
                return Progress::Paused;
            }
        }
    }

    /// Reads the next marker and its segment.
    fn next_segment(&mut self, data: &[u8], complete: bool) -> Result<Flow, String> {
        let at = match find_marker(data, self.pos) {
            Ok((at, skipped)) => {
                let skipped = std::mem::take(&mut self.skipped) + skipped;
                if skipped > MAX_EXTRANEOUS_BYTES && !self.after_scan {
                    return Err(format!(
                        "{skipped} bytes that are not a marker before marker 0xFF{:02X} at \
                         offset {at} (a damaged marker: its segment is lost)",
                        data[at]
                    ));
                }
                at
            }
            Err(resume) => {
                self.skipped += resume.min(data.len()).saturating_sub(self.pos);
                self.pos = resume;
                if !complete {
                    return Ok(Flow::NeedMore);
                }
                // A sequential picture whose scans all ended is complete
                // without EOI (libjpeg warns, Pillow shows it); a progressive
                // one may have lost scans (Pillow: "image file is truncated").
                let sequential = self
                    .frame
                    .as_ref()
                    .is_some_and(|f| f.process != Process::Progressive);
                if sequential && self.scans > 0 {
                    return self.finish().map(Flow::Finished);
                }
                return Err(self.cut_short());
            }
        };
        // Resume at this marker, not before the bytes skipped to reach it:
        // its segment may not have arrived whole.
        self.pos = at - 1;
        let code = data[at];
        let seg = at + 1;
        // Restart markers past a scan's last MCU belong to its data (a
        // header claiming fewer rows than the data holds): still no limit.
        self.after_scan &= matches!(code, RST0..=RST7);
        match code {
            EOI => return self.finish().map(Flow::Finished),
            RST0..=RST7 | TEM => {
                // Parameterless; libjpeg ignores them between segments.
                self.pos = seg;
                return Ok(Flow::Continue);
            }
            SOI => return Err("a second SOI marker inside the image".into()),
            0xc5..=0xc7 | 0xc8 | 0xcb | 0xcd..=0xcf => {
                return Err(format!(
                    "unsupported JPEG process (SOF{} marker 0xFF{code:02X}: hierarchical, \
                     arithmetic lossless or reserved), which viewers cannot show",
                    code - SOF0
                ))
            }
            SOF0 | SOF1 | SOF2 | SOF3 | SOF9 | SOF10 | DHT | DAC | SOS | DQT | DNL | DRI => {}
            APP0..=APP15 | COM => {}
            _ => return Err(format!("reserved marker 0xFF{code:02X}")),
        }
        let Some(len_bytes) = data.get(seg..seg + 2) else {
            return self.wait_or(complete, code);
        };
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if matches!(code, APP0..=APP15 | COM | DNL) {
            // libjpeg skips `len - 2` bytes, nothing when `len` is under 2
            // (a COM of length 0 is read as an empty one). The bytes need
            // not have arrived yet: the marker search waits for them.
            self.pos = seg + len.max(2);
            return Ok(Flow::Continue);
        }
        if len < 2 {
            return Err(format!("bad length {len} of marker 0xFF{code:02X}"));
        }
        let Some(body) = data.get(seg + 2..seg + len) else {
            return self.wait_or(complete, code);
        };
        match code {
            DQT => self.dqt(body)?,
            DHT => self.dht(body)?,
            DAC => self.dac(body)?,
            DRI => {
                if body.len() != 2 {
                    return Err(format!("bad DRI length {len}"));
                }
                self.restart_interval = u16::from_be_bytes([body[0], body[1]]);
            }
            SOS => self.sos(body, seg + len)?,
            _ => self.sof(code, body)?,
        }
        self.pos = seg + len;
        Ok(Flow::Continue)
    }

    /// A segment not fully received: wait for it, or refuse a complete body.
    fn wait_or(&self, complete: bool, code: u8) -> Result<Flow, String> {
        if complete {
            Err(format!(
                "cut short inside the segment of marker 0xFF{code:02X}"
            ))
        } else {
            Ok(Flow::NeedMore)
        }
    }

    /// Why a complete body that ended before EOI is refused.
    fn cut_short(&self) -> String {
        match (&self.frame, self.scans) {
            (None, _) => "no frame header (SOF) before the end of the file".into(),
            (Some(_), 0) => "no scan (SOS) before the end of the file".into(),
            (Some(_), _) => {
                "cut short: a progressive picture ends without an EOI marker (scans may be lost)"
                    .into()
            }
        }
    }

    /// EOI: the verdict on the whole picture.
    fn finish(&self) -> Result<Kind, String> {
        let frame = self
            .frame
            .as_ref()
            .ok_or("no frame header (SOF) before EOI")?;
        if self.scans == 0 {
            return Err("no scan (SOS) before EOI".into());
        }
        if let Some(c) = frame.comps.iter().find(|c| !c.scanned) {
            return Err(format!("component {} is never coded in any scan", c.id));
        }
        Ok(Kind::Jpeg {
            width: u32::from(frame.width),
            height: u32::from(frame.height),
        })
    }

    /// DQT: table slots 0-3 of 8- or 16-bit entries (zero entries are fine).
    fn dqt(&mut self, mut body: &[u8]) -> Result<(), String> {
        while let Some(&pq_tq) = body.first() {
            let slot = usize::from(pq_tq & 15);
            if slot > 3 {
                return Err(format!("quantization table slot {slot} (only 0-3 exist)"));
            }
            let entries = if pq_tq >> 4 == 0 { 64 } else { 128 };
            body = body
                .get(1 + entries..)
                .ok_or("DQT segment shorter than its tables")?;
            self.quant[slot] = true;
        }
        Ok(())
    }

    /// DHT: Huffman tables into DC/AC slots 0-3, built now, judged when used.
    fn dht(&mut self, mut body: &[u8]) -> Result<(), String> {
        while body.len() > 16 {
            let class_slot = body[0];
            let counts: [u8; 16] = body[1..17].try_into().expect("16 bytes");
            let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
            let symbols = body
                .get(17..17 + total)
                .filter(|_| total <= 256)
                .ok_or("bad Huffman table (more codes than its segment holds)")?;
            let table = HuffTable::new(&counts, symbols).map(Box::new);
            match class_slot {
                0..=3 => self.dc[usize::from(class_slot)] = Some(table),
                0x10..=0x13 => self.ac[usize::from(class_slot - 0x10)] = Some(table),
                _ => return Err(format!("Huffman table id 0x{class_slot:02X}")),
            }
            body = &body[17 + total..];
        }
        if !body.is_empty() {
            return Err("DHT segment length does not match its tables".into());
        }
        Ok(())
    }

    /// DAC: arithmetic conditioning per table slot (T.81 B.2.4.3).
    fn dac(&mut self, body: &[u8]) -> Result<(), String> {
        if !body.len().is_multiple_of(2) {
            return Err("DAC segment length is odd".into());
        }
        for pair in body.chunks_exact(2) {
            let (index, value) = (usize::from(pair[0]), pair[1]);
            match index {
                0..=15 => {
                    let (low, high) = (value & 15, value >> 4);
                    if low > high {
                        return Err(format!("bad DAC value 0x{value:02X} (L over U)"));
                    }
                    self.conditioning.dc_low[index] = low;
                    self.conditioning.dc_high[index] = high;
                }
                16..=31 => self.conditioning.ac_kx[index - 16] = value,
                _ => return Err(format!("bad DAC index {index}")),
            }
        }
        Ok(())
    }

    /// SOFn: the frame header.
    fn sof(&mut self, code: u8, body: &[u8]) -> Result<(), String> {
        if self.frame.is_some() {
            return Err("a second frame header (SOF)".into());
        }
        let (process, arithmetic) = match code {
            SOF0 | SOF1 => (Process::Sequential, false),
            SOF2 => (Process::Progressive, false),
            SOF3 => (Process::Lossless, false),
            SOF9 => (Process::Sequential, true),
            _ => (Process::Progressive, true),
        };
        if body.len() < 6 {
            return Err("frame header too short".into());
        }
        let precision = body[0];
        let height = u16::from_be_bytes([body[1], body[2]]);
        let width = u16::from_be_bytes([body[3], body[4]]);
        let count = usize::from(body[5]);
        if width == 0 || height == 0 || count == 0 {
            // A height of 0 is to be given later by DNL, which libjpeg
            // does not support either.
            return Err(format!(
                "empty picture: {width}x{height} with {count} components"
            ));
        }
        if body.len() != 6 + 3 * count {
            return Err("frame header length does not match its components".into());
        }
        if count > MAX_COMPONENTS {
            return Err(format!("{count} components (at most {MAX_COMPONENTS})"));
        }
        match (process, precision) {
            (_, 8) => {}
            (Process::Lossless, 2..=16) | (_, 12) => {
                return Err(format!(
                    "{precision}-bit samples: common viewers only show 8-bit JPEGs"
                ))
            }
            _ => return Err(format!("{precision}-bit samples")),
        }
        if width > MAX_DIMENSION || height > MAX_DIMENSION {
            return Err(format!(
                "image too large: {width}x{height} (JPEG decoders stop at {MAX_DIMENSION})"
            ));
        }
        check_pixels(u32::from(width), u32::from(height))?;
        let mut comps = Vec::with_capacity(count);
        for c in body[6..].chunks_exact(3) {
            let (h, v) = (c[1] >> 4, c[1] & 15);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return Err(format!("bogus sampling factors {h}x{v}"));
            }
            comps.push(Component {
                id: c[0],
                h,
                v,
                tq: c[2],
                units_w: 0,
                units_h: 0,
                scanned: false,
                nonzero: Vec::new(),
                approximation: [NOT_CODED; 64],
            });
        }
        let h_max = u32::from(comps.iter().map(|c| c.h).max().expect("count > 0"));
        let v_max = u32::from(comps.iter().map(|c| c.v).max().expect("count > 0"));
        let unit = if process == Process::Lossless { 1 } else { 8 };
        let (w, hgt) = (u32::from(width), u32::from(height));
        for c in &mut comps {
            // T.81 A.1.1: the component's size, then whole data units.
            let cw = (w * u32::from(c.h)).div_ceil(h_max);
            let ch = (hgt * u32::from(c.v)).div_ceil(v_max);
            c.units_w = cw.div_ceil(unit);
            c.units_h = ch.div_ceil(unit);
        }
        if arithmetic {
            self.stats = Some(Stats::new());
        }
        self.frame = Some(Frame {
            process,
            arithmetic,
            width,
            height,
            comps,
            mcus_w: w.div_ceil(unit * h_max),
            mcus_h: hgt.div_ceil(unit * v_max),
        });
        Ok(())
    }

    /// SOS: sets up the scan whose entropy-coded data starts at `data_at`.
    fn sos(&mut self, body: &[u8], data_at: usize) -> Result<(), String> {
        let Some(frame) = self.frame.as_mut() else {
            return Err("a scan (SOS) before the frame header".into());
        };
        let count = usize::from(*body.first().ok_or("empty scan header")?);
        if count == 0 || count > MAX_SCAN_COMPONENTS || body.len() != 1 + 2 * count + 3 {
            return Err("scan header length does not match its components".into());
        }
        let mut comps: Vec<ScanComp> = Vec::with_capacity(count);
        for pair in body[1..1 + 2 * count].chunks_exact(2) {
            // The first frame component of that id not already in this scan.
            let comp = (0..frame.comps.len())
                .find(|&i| frame.comps[i].id == pair[0] && !comps.iter().any(|s| s.comp == i))
                .ok_or_else(|| format!("scan names component {} not in the frame", pair[0]))?;
            comps.push(ScanComp {
                comp,
                dc: usize::from(pair[1] >> 4),
                ac: usize::from(pair[1] & 15),
            });
        }
        let params = &body[1 + 2 * count..];
        let (ss, se, ah, al) = (params[0], params[1], params[2] >> 4, params[2] & 15);
        let bad = || format!("invalid scan parameters Ss={ss} Se={se} Ah={ah} Al={al}");
        let kind = match frame.process {
            // libjpeg only warns about other values, and decodes whole blocks.
            Process::Sequential => ScanKind::Sequential,
            Process::Progressive => {
                let dc = ss == 0;
                if (dc && se != 0) || (!dc && (ss > se || se > 63 || count != 1)) {
                    return Err(bad());
                }
                if (ah != 0 && al + 1 != ah) || al > 13 {
                    return Err(bad());
                }
                match (dc, ah == 0) {
                    (true, true) => ScanKind::DcFirst,
                    (true, false) => ScanKind::DcRefine,
                    (false, true) => ScanKind::AcFirst,
                    (false, false) => ScanKind::AcRefine,
                }
            }
            Process::Lossless => {
                // Ss is the predictor; Al the point transform, below 8 bits.
                if !(1..=7).contains(&ss) || se != 0 || ah != 0 || al >= 8 {
                    return Err(bad());
                }
                ScanKind::Lossless
            }
        };
        if self.scans >= MAX_SCANS {
            return Err(format!(
                "more than {MAX_SCANS} scans (libjpeg-turbo's djpeg -maxscans {MAX_SCANS} \
                 refuses it too): a scan bomb"
            ));
        }
        if frame.process == Process::Progressive {
            progression(frame, &comps, (ss, se, ah, al), self.scans + 1)?;
        }
        let band = match kind {
            ScanKind::AcFirst | ScanKind::AcRefine => (u32::from(ss), u32::from(se)),
            _ => (1, 63),
        };
        // The blocks of one MCU: every component's h x v when interleaved.
        let mut mcu = Vec::new();
        for (i, s) in comps.iter().enumerate() {
            let c = &frame.comps[s.comp];
            let n = if count == 1 { 1 } else { c.h * c.v };
            mcu.extend(std::iter::repeat_n(i as u8, usize::from(n)));
        }
        if mcu.len() > MAX_BLOCKS_IN_MCU {
            return Err(format!(
                "{} blocks in one MCU (at most {MAX_BLOCKS_IN_MCU})",
                mcu.len()
            ));
        }
        let mcus = if count == 1 {
            let c = &frame.comps[comps[0].comp];
            u64::from(c.units_w) * u64::from(c.units_h)
        } else {
            u64::from(frame.mcus_w) * u64::from(frame.mcus_h)
        };
        // Quantization tables are taken at a component's first scan.
        if frame.process != Process::Lossless {
            for s in &comps {
                let c = &frame.comps[s.comp];
                if !c.scanned && !self.quant.get(usize::from(c.tq)).copied().unwrap_or(false) {
                    return Err(format!("quantization table {} was not defined", c.tq));
                }
            }
        }
        let coder = if frame.arithmetic {
            let stats = self
                .stats
                .as_mut()
                .expect("an arithmetic frame has its bins");
            reset_stats(stats, kind, &comps);
            Coder::Arith {
                qm: Qm::at(data_at),
                started: false,
                contexts: [0; MAX_SCAN_COMPONENTS],
                marker_mcu: None,
            }
        } else {
            if self.scans == 0 && frame.process == Process::Sequential {
                install_standard_tables(&mut self.dc, &mut self.ac);
            }
            let lossless = kind == ScanKind::Lossless;
            for s in &comps {
                let needs_dc = matches!(
                    kind,
                    ScanKind::Sequential | ScanKind::DcFirst | ScanKind::Lossless
                );
                let needs_ac = matches!(
                    kind,
                    ScanKind::Sequential | ScanKind::AcFirst | ScanKind::AcRefine
                );
                if needs_dc {
                    let table = usable(&self.dc, s.dc, "DC")?;
                    let largest = if lossless { 16 } else { 15 };
                    if table.largest > largest {
                        return Err(format!(
                            "bad Huffman table: DC table {} has category {}",
                            s.dc, table.largest
                        ));
                    }
                }
                if needs_ac {
                    usable(&self.ac, s.ac, "AC")?;
                }
            }
            Coder::Huffman {
                bits: Bits::at(data_at),
                eobrun: 0,
            }
        };
        let interval = u32::from(self.restart_interval);
        let number = self.scans + 1;
        for s in &comps {
            frame.comps[s.comp].scanned = true;
        }
        if matches!(kind, ScanKind::AcFirst | ScanKind::AcRefine) {
            self.allocate_bitmap(comps[0].comp, data_at)?;
        }
        self.scans = number;
        self.scan = Some(Box::new(Scan {
            number,
            kind,
            comps,
            mcu,
            band,
            mcus,
            done: 0,
            interval,
            left: interval,
            next_rst: 0,
            restart_due: false,
            coder,
        }));
        Ok(())
    }

    /// The "already nonzero" bitmap of a component, allocated at its first
    /// AC scan after checking the memory bound and that the bytes read so
    /// far (`read`) can justify it.
    fn allocate_bitmap(&mut self, comp: usize, read: usize) -> Result<(), String> {
        let held = self.memory_bytes() as u64;
        let frame = self.frame.as_mut().expect("a scan has a frame");
        let (width, height) = (frame.width, frame.height);
        let c = &mut frame.comps[comp];
        if !c.nonzero.is_empty() {
            return Ok(());
        }
        let words = u64::from(c.units_w) * u64::from(c.units_h);
        let bytes = words * 8;
        if held + bytes > MAX_VERIFIER_BYTES {
            return Err(format!(
                "image too large: verifying this {width}x{height} progressive JPEG needs \
                 {} MiB, over {} MiB",
                (held + bytes) >> 20,
                MAX_VERIFIER_BYTES >> 20
            ));
        }
        let total = self.bitmap_bytes + bytes;
        let justified = FREE_BITMAP_BYTES.max(BITMAP_BYTES_PER_FILE_BYTE * read as u64);
        if total > justified {
            return Err(format!(
                "{width}x{height} progressive picture cannot fit in the {read} bytes before \
                 its AC scans (truncated, or a decompression bomb)"
            ));
        }
        c.nonzero = vec![0; words as usize];
        self.bitmap_bytes = total;
        Ok(())
    }

    /// Decodes MCUs of the scan in progress.
    fn run_scan(&mut self, data: &[u8], complete: bool, clock: &mut Clock) -> Result<Flow, String> {
        let mut scan = self.scan.take().expect("run_scan has a scan");
        let frame = self.frame.as_mut().expect("a scan has a frame");
        let result = match scan.coder {
            Coder::Huffman { .. } => run_huffman(
                &mut scan,
                frame,
                (&self.dc, &self.ac),
                data,
                complete,
                clock,
            ),
            Coder::Arith { .. } => {
                let stats = self
                    .stats
                    .as_mut()
                    .expect("an arithmetic frame has its bins");
                run_arith(
                    &mut scan,
                    frame,
                    stats,
                    &self.conditioning,
                    data,
                    complete,
                    clock,
                )
            }
        };
        match result {
            Ok(ScanEnd::At(pos, limit)) => {
                self.pos = pos;
                self.after_scan = limit.is_none();
                Ok(Flow::Continue)
            }
            Ok(ScanEnd::NotYet(flow)) => {
                self.scan = Some(scan);
                Ok(flow)
            }
            Err(e) => Err(e),
        }
    }
}

/// Checks that a progressive scan adds information to every coefficient
/// it codes, and records what it codes (libjpeg's `coef_bits`, where these
/// are only warnings: "bogus progression"). A first scan (`Ah` 0) of a
/// coefficient already coded, or a refinement whose `Ah` is not the bit
/// the coefficient was last coded to, decodes to nothing new: no encoder
/// writes one, and repeated ones are a scan bomb (each costs a few bytes
/// and a pass over every block).
fn progression(
    frame: &mut Frame,
    comps: &[ScanComp],
    (ss, se, ah, al): (u8, u8, u8, u8),
    number: u32,
) -> Result<(), String> {
    for s in comps {
        let c = &mut frame.comps[s.comp];
        for k in ss..=se {
            let was = c.approximation[usize::from(k)];
            if ah == 0 && was != NOT_CODED {
                return Err(format!(
                    "scan {number} codes coefficient {k} of component {} a second time \
                     (Ah=0; it was coded down to bit {was}): a band coded twice adds nothing",
                    c.id
                ));
            }
            if ah != 0 && i16::from(was) != i16::from(ah) {
                return Err(format!(
                    "scan {number} refines coefficient {k} of component {} from bit {ah}, \
                     but it {}: a refinement of bits already refined (or never coded)",
                    c.id,
                    if was == NOT_CODED {
                        "was never coded".to_owned()
                    } else {
                        format!("is coded down to bit {was}")
                    }
                ));
            }
            c.approximation[usize::from(k)] = al as i8;
        }
    }
    Ok(())
}

/// How decoding a scan's MCUs stopped.
enum ScanEnd {
    /// All MCUs are decoded; the bytes after them start here, and so many
    /// of them may come before the next marker (`None`: any number).
    At(usize, Option<usize>),
    /// Not finished: waiting for bytes or paused.
    NotYet(Flow),
}

/// Huffman table `slot` of `slots`, defined and valid, or why not.
fn usable<'a>(slots: &'a [Slot; 4], slot: usize, class: &str) -> Result<&'a HuffTable, String> {
    match slots.get(slot) {
        Some(Some(Ok(table))) => Ok(table),
        Some(Some(Err(e))) => Err(e.clone()),
        _ => Err(format!("{class} Huffman table {slot} was not defined")),
    }
}

/// libjpeg's Motion-JPEG rule: undefined DC/AC slots 0 and 1 get T.81's
/// typical tables at the first scan.
fn install_standard_tables(dc: &mut [Slot; 4], ac: &mut [Slot; 4]) {
    use huff::standard::*;
    let build =
        |counts: &[u8; 16], symbols: Vec<u8>| Some(HuffTable::new(counts, &symbols).map(Box::new));
    if dc[0].is_none() {
        dc[0] = build(&LUMA_DC_COUNTS, dc_symbols());
    }
    if dc[1].is_none() {
        dc[1] = build(&CHROMA_DC_COUNTS, dc_symbols());
    }
    if ac[0].is_none() {
        ac[0] = build(&LUMA_AC_COUNTS, ac_symbols(false));
    }
    if ac[1].is_none() {
        ac[1] = build(&CHROMA_AC_COUNTS, ac_symbols(true));
    }
}

/// Clears the arithmetic bins a scan (or its restart interval) starts from.
fn reset_stats(stats: &mut Stats, kind: ScanKind, comps: &[ScanComp]) {
    for s in comps {
        if matches!(kind, ScanKind::Sequential | ScanKind::DcFirst) {
            stats.dc[s.dc] = [0; arith::DC_BINS];
        }
        if matches!(
            kind,
            ScanKind::Sequential | ScanKind::AcFirst | ScanKind::AcRefine
        ) {
            stats.ac[s.ac] = [0; arith::AC_BINS];
        }
    }
}

/// From `from`, the next marker as libjpeg finds one: other bytes and
/// `0xFF 0x00` pairs are skipped (extraneous data, which libjpeg only warns
/// about) and fill bytes `0xFF` swallowed. `Ok` is the offset of the marker
/// code and the count of bytes skipped before its fill bytes; `Err` the
/// offset to search again from once more bytes arrive.
fn find_marker(data: &[u8], from: usize) -> Result<(usize, usize), usize> {
    let mut i = from;
    loop {
        match data
            .get(i..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xff))
        {
            Some(off) => i += off,
            // Nothing but extraneous bytes up to the end (or `i` is past it).
            None => return Err(i.max(data.len())),
        }
        let mut j = i + 1;
        while data.get(j) == Some(&0xff) {
            j += 1;
        }
        match data.get(j) {
            None => return Err(i),
            Some(0) => i = j + 1,
            Some(_) => return Ok((j, i.saturating_sub(from))),
        }
    }
}

/// The message for an entropy decoding fault in `scan`.
fn describe(fault: Fault, scan: &Scan, arithmetic: bool) -> String {
    let at = format!(
        "scan {} at MCU {} of {}",
        scan.number,
        scan.done + 1,
        scan.mcus
    );
    match fault {
        Fault::EndsEarly => format!(
            "{at}: the data ends early (premature end of data segment; the rest would show grey)"
        ),
        Fault::BadCode => format!("{at}: bad Huffman code"),
        Fault::Overflow if arithmetic => format!("{at}: bad arithmetic code"),
        Fault::Overflow => format!("{at}: coefficient index overflow"),
        Fault::BadRefinement => format!("{at}: bad AC refinement code"),
        Fault::Starved => format!("{at}: more bytes needed"),
    }
}

/// Reads the restart marker due at `pos` (after skipping extraneous bytes,
/// as libjpeg does): `Ok(Some(next))` is where the next interval starts,
/// `Ok(None)` means the bytes have not arrived yet.
fn read_restart(
    scan: &mut Scan,
    data: &[u8],
    complete: bool,
    pos: usize,
    limit: Option<usize>,
) -> Result<Option<usize>, String> {
    match find_marker(data, pos) {
        Ok((at, skipped)) if limit.is_some_and(|l| skipped > l) => Err(format!(
            "scan {}: {skipped} bytes of data past MCU {} of {}, before marker 0xFF{:02X} \
             (corrupt data)",
            scan.number, scan.done, scan.mcus, data[at]
        )),
        Ok((at, _)) if data[at] == RST0 + scan.next_rst => {
            scan.next_rst = (scan.next_rst + 1) & 7;
            scan.left = scan.interval;
            scan.restart_due = false;
            Ok(Some(at + 1))
        }
        Ok((at, _)) => Err(format!(
            "scan {}: found marker 0xFF{:02X} instead of RST{} after MCU {} of {}",
            scan.number, data[at], scan.next_rst, scan.done, scan.mcus
        )),
        Err(_) if complete => Err(format!(
            "scan {}: the file ends where RST{} should follow MCU {} of {}",
            scan.number, scan.next_rst, scan.done, scan.mcus
        )),
        Err(_) => Ok(None),
    }
}

/// Counts one decoded MCU against the scan and its restart interval.
fn count_mcu(scan: &mut Scan) {
    scan.done += 1;
    if scan.interval > 0 {
        scan.left -= 1;
        if scan.left == 0 && scan.done < scan.mcus {
            scan.restart_due = true;
        }
    }
}

/// Decodes a Huffman scan's MCUs until its end, the deadline or the bytes
/// received so far run out (then the unfinished MCU is rolled back).
fn run_huffman(
    scan: &mut Scan,
    frame: &mut Frame,
    (dc_slots, ac_slots): (&[Slot; 4], &[Slot; 4]),
    data: &[u8],
    complete: bool,
    clock: &mut Clock,
) -> Result<ScanEnd, String> {
    let Coder::Huffman {
        mut bits,
        mut eobrun,
    } = scan.coder
    else {
        unreachable!("run_huffman is called for Huffman scans");
    };
    // The tables of each block of an MCU, looked up once per call.
    let mut dc: [Option<&HuffTable>; MAX_BLOCKS_IN_MCU] = [None; MAX_BLOCKS_IN_MCU];
    let mut ac: [Option<&HuffTable>; MAX_BLOCKS_IN_MCU] = [None; MAX_BLOCKS_IN_MCU];
    for (b, &i) in scan.mcu.iter().enumerate() {
        let s = scan.comps[usize::from(i)];
        dc[b] = usable(dc_slots, s.dc, "DC").ok();
        ac[b] = usable(ac_slots, s.ac, "AC").ok();
    }
    let blocks = scan.mcu.len();
    let units = blocks as u32;
    bits.wake();
    let mut r = Reader::new(data, complete, bits);
    let save =
        |scan: &mut Scan, bits: Bits, eobrun: u32| scan.coder = Coder::Huffman { bits, eobrun };
    while scan.done < scan.mcus {
        if scan.restart_due {
            r.bits.drop_loaded();
            match read_restart(scan, data, complete, r.bits.pos, None)? {
                Some(next) => {
                    r.bits = Bits::at(next);
                    eobrun = 0;
                }
                None => {
                    save(scan, r.bits, eobrun);
                    return Ok(ScanEnd::NotYet(Flow::NeedMore));
                }
            }
        }
        let (saved_bits, saved_eobrun) = (r.bits, eobrun);
        let result = match scan.kind {
            ScanKind::Sequential => (0..blocks).try_for_each(|b| {
                let (d, a) = (
                    dc[b].expect("checked at SOS"),
                    ac[b].expect("checked at SOS"),
                );
                huff::sequential_block(&mut r, d, a)
            }),
            ScanKind::DcFirst => (0..blocks)
                .try_for_each(|b| huff::dc_first_block(&mut r, dc[b].expect("checked at SOS"))),
            ScanKind::DcRefine => (0..blocks).try_for_each(|_| huff::dc_refine_block(&mut r)),
            ScanKind::Lossless => (0..blocks)
                .try_for_each(|b| huff::lossless_sample(&mut r, dc[b].expect("checked at SOS"))),
            ScanKind::AcFirst | ScanKind::AcRefine => {
                let word = &mut frame.comps[scan.comps[0].comp].nonzero[scan.done as usize];
                let before = *word;
                let table = ac[0].expect("checked at SOS");
                let result = if scan.kind == ScanKind::AcFirst {
                    huff::ac_first_block(&mut r, table, scan.band, &mut eobrun, word)
                } else {
                    huff::ac_refine_block(&mut r, table, scan.band, &mut eobrun, word)
                };
                if result.is_err() {
                    *word = before;
                }
                result
            }
        };
        match result {
            Ok(()) => {}
            Err(Fault::Starved) => {
                save(scan, saved_bits, saved_eobrun);
                return Ok(ScanEnd::NotYet(Flow::NeedMore));
            }
            Err(fault) => return Err(describe(fault, scan, false)),
        }
        count_mcu(scan);
        if clock.spend(units) && scan.done < scan.mcus {
            save(scan, r.bits, eobrun);
            return Ok(ScanEnd::NotYet(Flow::Paused));
        }
    }
    // Bits left in the last byte are padding; what follows up to the next
    // marker is extraneous (libjpeg warns and skips it).
    Ok(ScanEnd::At(r.bits.pos, None))
}

/// Decodes an arithmetic scan's MCUs until its end, the deadline, or too
/// few bytes in hand to be sure an MCU is complete.
fn run_arith(
    scan: &mut Scan,
    frame: &mut Frame,
    stats: &mut Stats,
    cond: &Conditioning,
    data: &[u8],
    complete: bool,
    clock: &mut Clock,
) -> Result<ScanEnd, String> {
    let Coder::Arith {
        qm,
        mut started,
        mut contexts,
        mut marker_mcu,
    } = scan.coder
    else {
        unreachable!("run_arith is called for arithmetic scans");
    };
    let mut r = Arith::new(data, complete, qm);
    let units = scan.mcu.len() as u32 * 4;
    let mut flow = None;
    while scan.done < scan.mcus {
        if scan.restart_due {
            match read_restart(scan, data, complete, r.qm.pos, Some(MAX_EXTRANEOUS_BYTES))? {
                Some(next) => {
                    r.qm = Qm::at(next);
                    started = false;
                    marker_mcu = None;
                    contexts = [0; MAX_SCAN_COMPONENTS];
                    reset_stats(stats, scan.kind, &scan.comps);
                }
                None => {
                    flow = Some(Flow::NeedMore);
                    break;
                }
            }
        }
        if !complete && !r.qm.at_marker && data.len().saturating_sub(r.qm.pos) < ARITH_MCU_MARGIN {
            flow = Some(Flow::NeedMore);
            break;
        }
        if !started {
            r.start();
            started = true;
        }
        let result = arith_mcu(scan, frame, stats, cond, &mut contexts, &mut r);
        if r.qm.starved {
            return Err(format!(
                "scan {}: an arithmetic-coded MCU runs over {} KiB (fill bytes?)",
                scan.number,
                ARITH_MCU_MARGIN >> 10
            ));
        }
        if let Err(fault) = result {
            return Err(describe(fault, scan, true));
        }
        if r.qm.hit_end {
            return Err(describe(Fault::EndsEarly, scan, true));
        }
        if r.qm.at_marker {
            let since = *marker_mcu.get_or_insert(scan.done);
            let allowed = ARITH_ZEROS_PAST_MARKER + (scan.done - since) / MCUS_PER_ZERO_BYTE;
            if u64::from(r.qm.zeros_read) > allowed {
                return Err(format!(
                    "scan {} at MCU {} of {}: the data ends early ({} zero bytes decoded past \
                     the marker: the rest would show garbage)",
                    scan.number,
                    scan.done + 1,
                    scan.mcus,
                    r.qm.zeros_read
                ));
            }
        }
        count_mcu(scan);
        if clock.spend(units) && scan.done < scan.mcus {
            flow = Some(Flow::Paused);
            break;
        }
    }
    match flow {
        Some(flow) => {
            scan.coder = Coder::Arith {
                qm: r.qm,
                started,
                contexts,
                marker_mcu,
            };
            Ok(ScanEnd::NotYet(flow))
        }
        // Bytes the decoder did not need before the next marker are the
        // encoder's flush; the marker search skips them.
        // Bytes the decoder did not need before the next marker: an
        // arithmetic decoder uses its data exactly (0 left in every scan of
        // libjpeg's files), so more than a few mean it lost its way.
        None => Ok(ScanEnd::At(r.qm.pos, Some(MAX_EXTRANEOUS_BYTES))),
    }
}

/// One MCU of an arithmetic scan.
fn arith_mcu(
    scan: &Scan,
    frame: &mut Frame,
    stats: &mut Stats,
    cond: &Conditioning,
    contexts: &mut [u8; MAX_SCAN_COMPONENTS],
    r: &mut Arith,
) -> Result<(), Fault> {
    for &i in &scan.mcu {
        let s = scan.comps[usize::from(i)];
        let dc_cond = (cond.dc_low[s.dc], cond.dc_high[s.dc]);
        let context = &mut contexts[usize::from(i)];
        match scan.kind {
            ScanKind::Sequential => {
                arith::dc_diff(r, &mut stats.dc[s.dc], context, dc_cond)?;
                let mut unused = 0;
                arith::ac_first(
                    r,
                    &mut stats.ac[s.ac],
                    (1, 63),
                    cond.ac_kx[s.ac],
                    &mut unused,
                )?;
            }
            ScanKind::DcFirst => arith::dc_diff(r, &mut stats.dc[s.dc], context, dc_cond)?,
            ScanKind::DcRefine => {
                r.decide_fixed();
            }
            ScanKind::AcFirst | ScanKind::AcRefine => {
                let word = &mut frame.comps[s.comp].nonzero[scan.done as usize];
                let bins = &mut stats.ac[s.ac];
                if scan.kind == ScanKind::AcFirst {
                    arith::ac_first(r, bins, scan.band, cond.ac_kx[s.ac], word)?;
                } else {
                    arith::ac_refine(r, bins, scan.band, word)?;
                }
            }
            ScanKind::Lossless => unreachable!("arithmetic lossless frames are refused at SOF"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{verify, Kind, Progress, Verifier};
    use std::time::Instant;

    fn accept(file: &[u8]) -> Kind {
        verify(file, "http://h/a.jpg", None).unwrap_or_else(|e| panic!("refused: {e}"))
    }

    fn refuse(file: &[u8], needle: &str) {
        let err = verify(file, "http://h/a.jpg", None).expect_err("accepted");
        assert!(err.contains(needle), "{err}");
    }

    /// Sets the frame header's height and width.
    fn patch_size(file: &mut [u8], sof: u8, width: u16, height: u16) {
        let at = marker(file, sof);
        file[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
        file[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
    }

    /// Every kind of scan the tests have a file for.
    fn all_kinds() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("baseline", jpeg(48, 40)),
            ("progressive", jpeg_progressive(48, 40)),
            ("baseline with restarts", jpeg_restarts(48, 40, 2)),
            ("progressive with restarts", PROGRESSIVE_RESTARTS.to_vec()),
            ("arithmetic", TESTIMGARI.to_vec()),
            ("arithmetic with restarts", ARITH_RESTARTS.to_vec()),
            ("arithmetic progressive", ARITH_PROGRESSIVE.to_vec()),
            (
                "arithmetic progressive with restarts",
                ARITH_PROGRESSIVE_RESTARTS.to_vec(),
            ),
        ]
    }

    #[test]
    fn every_kind_of_scan_is_accepted() {
        for (name, file) in all_kinds() {
            assert!(matches!(accept(&file), Kind::Jpeg { .. }), "{name}");
        }
    }

    #[test]
    fn every_cut_from_the_first_scan_on_is_refused() {
        for (name, file) in all_kinds() {
            let sos = marker(&file, 0xda);
            // Every 5th cut, and each of the last 40 (unoptimised builds
            // are slow; each cut is verified from scratch).
            let cuts = (sos..file.len() - 2).filter(|c| c % 5 == 0 || c + 42 > file.len());
            for cut in cuts {
                assert!(
                    verify(&file[..cut], "http://h/a.jpg", None).is_err(),
                    "{name} cut at {cut} of {}",
                    file.len()
                );
            }
        }
    }

    #[test]
    fn sequential_picture_without_eoi_is_complete_but_progressive_is_not() {
        let baseline = jpeg(32, 32);
        accept(&baseline[..baseline.len() - 2]);
        let progressive = jpeg_progressive(32, 32);
        refuse(&progressive[..progressive.len() - 2], "without an EOI");
    }

    #[test]
    fn scan_cut_short_and_closed_with_eoi_is_refused() {
        for (name, file) in all_kinds() {
            let data = first_scan_data(&file);
            for tenth in 1..10 {
                let cut = data.start + data.len() * tenth / 10;
                let mut short = file[..cut].to_vec();
                short.extend([0xff, 0xd9]);
                let err = verify(&short, "http://h/a.jpg", None).expect_err(name);
                assert!(
                    err.contains("ends early") || err.contains("instead of RST"),
                    "{name} cut at {tenth}/10: {err}"
                );
            }
        }
    }

    #[test]
    fn header_claiming_more_rows_than_the_data_holds_is_refused() {
        let mut file = jpeg(64, 64);
        patch_size(&mut file, 0xc0, 64, 128);
        refuse(&file, "ends early");
    }

    #[test]
    fn damaged_entropy_bytes_are_refused() {
        // 0xFF 0x00 pairs are data bytes of ones: no Huffman code is 16 ones.
        let mut file = jpeg(64, 64);
        let data = first_scan_data(&file);
        let mid = data.start + data.len() / 2;
        file.splice(mid..mid + 8, [0xff, 0, 0xff, 0, 0xff, 0, 0xff, 0]);
        refuse(&file, "bad Huffman code");
    }

    #[test]
    fn coefficient_index_overflow_is_refused() {
        // 8x8 grey, one component: DC category 0, then three ZRL (k = 49)
        // and a run of 15 zeros before a coefficient: index 64.
        let mut file = vec![0xff, 0xd8, 0xff, 0xdb, 0, 67, 0];
        file.extend([1u8; 64]);
        file.extend([0xff, 0xc0, 0, 11, 8, 0, 8, 0, 8, 1, 1, 0x11, 0]);
        // DC table 0: symbol 0 as code "0". AC table 0: EOB, ZRL, 0xF1 as 2-bit codes.
        file.extend([
            0xff, 0xc4, 0, 20, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        file.extend([
            0xff, 0xc4, 0, 22, 0x10, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        file.extend([0x00, 0xf0, 0xf1]);
        file.extend([0xff, 0xda, 0, 8, 1, 1, 0x00, 0, 63, 0]);
        let mut bits = BitWriter::default();
        bits.put(0, 1); // DC: category 0
        for _ in 0..3 {
            bits.put(0b01, 2); // ZRL
        }
        bits.put(0b10, 2); // run 15, size 1
        bits.put(1, 1);
        file.extend(bits.finish());
        file.extend([0xff, 0xd9]);
        refuse(&file, "coefficient index overflow");
        // The same block ending with EOB after the ZRLs is fine.
        let mut good = file[..file.len() - 4].to_vec();
        let mut bits = BitWriter::default();
        bits.put(0, 1);
        for _ in 0..3 {
            bits.put(0b01, 2);
        }
        bits.put(0b00, 2);
        good.truncate(marker(&good, 0xda) + 10);
        good.extend(bits.finish());
        good.extend([0xff, 0xd9]);
        accept(&good);
    }

    #[test]
    fn zero_in_a_quantization_table_is_accepted() {
        let mut file = jpeg(32, 32);
        let dqt = marker(&file, 0xdb);
        file[dqt + 5 + 10] = 0;
        accept(&file);
    }

    #[test]
    fn comments_of_length_0_and_1_are_read_as_empty() {
        for len in [0u8, 1] {
            let mut file = jpeg(16, 16);
            file.splice(2..2, [0xff, 0xfe, 0, len]);
            accept(&file);
        }
    }

    #[test]
    fn a_few_stray_bytes_between_segments_pass_but_a_lost_segment_does_not() {
        let mut file = jpeg(16, 16);
        let dqt = marker(&file, 0xdb);
        file.splice(dqt..dqt, [0, 0]);
        accept(&file);
        // A damaged marker: the whole DQT segment becomes extraneous bytes.
        let mut file = jpeg(16, 16);
        let dqt = marker(&file, 0xdb);
        file[dqt] = 0x7f;
        refuse(&file, "a damaged marker");
    }

    #[test]
    fn sequential_frame_without_huffman_tables_uses_the_standard_ones() {
        // jpeg-encoder writes T.81's typical tables; Motion-JPEG drops them.
        let mut file = jpeg(32, 32);
        while let Some(dht) = file.windows(2).position(|w| w == [0xff, 0xc4]) {
            let len = usize::from(u16::from_be_bytes([file[dht + 2], file[dht + 3]]));
            file.drain(dht..dht + 2 + len);
        }
        accept(&file);
    }

    #[test]
    fn wrong_restart_marker_is_refused() {
        let mut file = jpeg_restarts(64, 64, 1);
        let rst = marker(&file, 0xd0);
        file[rst + 1] = 0xd3;
        refuse(&file, "instead of RST0");
    }

    #[test]
    fn twelve_bit_and_hierarchical_jpegs_are_refused() {
        let mut file = jpeg(16, 16);
        let sof = marker(&file, 0xc0);
        file[sof + 4] = 12;
        refuse(&file, "12-bit");
        let mut file = jpeg(16, 16);
        file[sof + 1] = 0xc5;
        refuse(&file, "unsupported JPEG process");
    }

    #[test]
    fn bomb_over_max_pixels_is_refused_before_decoding() {
        let mut file = jpeg(16, 16);
        patch_size(&mut file, 0xc0, 60000, 60000);
        refuse(&file, "too large");
    }

    #[test]
    fn tiny_file_claiming_100_megapixels_runs_out_of_bits_without_allocating() {
        for mut file in [jpeg(8, 8), jpeg_progressive(8, 8)] {
            let sof = if file.windows(2).any(|w| w == [0xff, 0xc2]) {
                0xc2
            } else {
                0xc0
            };
            patch_size(&mut file, sof, 10000, 10000);
            let mut v = Verifier::new("http://h/a.jpg", None);
            let mut most = 0;
            let verdict = loop {
                match v.step(&file, true, Instant::now()) {
                    Progress::Done(r) => break r,
                    _ => most = most.max(v.memory_bytes()),
                }
            };
            assert!(verdict.unwrap_err().contains("ends early"));
            assert!(most < 64 << 10, "{most} bytes");
        }
    }

    #[test]
    fn progressive_memory_is_one_bit_per_coefficient() {
        // 2000x2000, 3 components at full resolution: 187,500 blocks.
        let file = ac_only_progressive(2000, 2000, 3, 8 << 10);
        let mut v = Verifier::new("http://h/a.jpg", None);
        let mut most = 0;
        let verdict = loop {
            match v.step(&file, true, Instant::now()) {
                Progress::Done(r) => break r,
                _ => most = most.max(v.memory_bytes()),
            }
        };
        assert_eq!(
            verdict,
            Ok(Kind::Jpeg {
                width: 2000,
                height: 2000
            })
        );
        let bitmaps = 3 * 250 * 250 * 8;
        assert!(
            most >= bitmaps && most < bitmaps + (64 << 10),
            "{most} bytes"
        );
    }

    #[test]
    fn progressive_bitmap_must_be_justified_by_the_bytes_read() {
        refuse(&ac_only_progressive(10000, 10000, 1, 0), "cannot fit");
    }

    #[test]
    fn progressive_picture_over_the_memory_bound_is_refused() {
        // Six full-resolution components of 100 MP need 75 MB of bitmaps;
        // the padding justifies them, the bound does not.
        refuse(
            &ac_only_progressive(10000, 10000, 6, 300 << 10),
            "too large",
        );
        accept(&ac_only_progressive(10000, 10000, 3, 300 << 10));
    }
}
