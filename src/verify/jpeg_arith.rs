//! JPEG arithmetic entropy decoding without pixels: the QM decoder of T.81
//! Annex D and the statistical models of F.1.4.4 (sequential, progressive
//! first scans) and G.1.3.3 (progressive refinement), with the bins laid out
//! as libjpeg lays them out.
//!
//! As in libjpeg, the decoder reads zeros once it reaches a marker: a
//! legitimate encoder drops trailing zero bytes, so running into a marker
//! is not an error here (it is for Huffman coding). What refuses a scan is a
//! magnitude or run that overflows ("bad arithmetic code").

use super::jpeg_huffman::Fault;

/// T.81 Table D.2: per state, the LPS probability estimate Qe, the next
/// state after an LPS and after an MPS, and whether an LPS swaps the MPS
/// sense. Row 113 is the fixed estimate of 0.5 (T.851 Table 5) used for
/// signs and refinement bits: it never moves.
#[rustfmt::skip]
const STATES: [(u16, u8, u8, bool); 114] = [
    (0x5a1d, 1, 1, true), (0x2586, 14, 2, false), (0x1114, 16, 3, false),
    (0x080b, 18, 4, false), (0x03d8, 20, 5, false), (0x01da, 23, 6, false),
    (0x00e5, 25, 7, false), (0x006f, 28, 8, false), (0x0036, 30, 9, false),
    (0x001a, 33, 10, false), (0x000d, 35, 11, false), (0x0006, 9, 12, false),
    (0x0003, 10, 13, false), (0x0001, 12, 13, false), (0x5a7f, 15, 15, true),
    (0x3f25, 36, 16, false), (0x2cf2, 38, 17, false), (0x207c, 39, 18, false),
    (0x17b9, 40, 19, false), (0x1182, 42, 20, false), (0x0cef, 43, 21, false),
    (0x09a1, 45, 22, false), (0x072f, 46, 23, false), (0x055c, 48, 24, false),
    (0x0406, 49, 25, false), (0x0303, 51, 26, false), (0x0240, 52, 27, false),
    (0x01b1, 54, 28, false), (0x0144, 56, 29, false), (0x00f5, 57, 30, false),
    (0x00b7, 59, 31, false), (0x008a, 60, 32, false), (0x0068, 62, 33, false),
    (0x004e, 63, 34, false), (0x003b, 32, 35, false), (0x002c, 33, 9, false),
    (0x5ae1, 37, 37, true), (0x484c, 64, 38, false), (0x3a0d, 65, 39, false),
    (0x2ef1, 67, 40, false), (0x261f, 68, 41, false), (0x1f33, 69, 42, false),
    (0x19a8, 70, 43, false), (0x1518, 72, 44, false), (0x1177, 73, 45, false),
    (0x0e74, 74, 46, false), (0x0bfb, 75, 47, false), (0x09f8, 77, 48, false),
    (0x0861, 78, 49, false), (0x0706, 79, 50, false), (0x05cd, 48, 51, false),
    (0x04de, 50, 52, false), (0x040f, 50, 53, false), (0x0363, 51, 54, false),
    (0x02d4, 52, 55, false), (0x025c, 53, 56, false), (0x01f8, 54, 57, false),
    (0x01a4, 55, 58, false), (0x0160, 56, 59, false), (0x0125, 57, 60, false),
    (0x00f6, 58, 61, false), (0x00cb, 59, 62, false), (0x00ab, 61, 63, false),
    (0x008f, 61, 32, false), (0x5b12, 65, 65, true), (0x4d04, 80, 66, false),
    (0x412c, 81, 67, false), (0x37d8, 82, 68, false), (0x2fe8, 83, 69, false),
    (0x293c, 84, 70, false), (0x2379, 86, 71, false), (0x1edf, 87, 72, false),
    (0x1aa9, 87, 73, false), (0x174e, 72, 74, false), (0x1424, 72, 75, false),
    (0x119c, 74, 76, false), (0x0f6b, 74, 77, false), (0x0d51, 75, 78, false),
    (0x0bb6, 77, 79, false), (0x0a40, 77, 48, false), (0x5832, 80, 81, true),
    (0x4d1c, 88, 82, false), (0x438e, 89, 83, false), (0x3bdd, 90, 84, false),
    (0x34ee, 91, 85, false), (0x2eae, 92, 86, false), (0x299a, 93, 87, false),
    (0x2516, 86, 71, false), (0x5570, 88, 89, true), (0x4ca9, 95, 90, false),
    (0x44d9, 96, 91, false), (0x3e22, 97, 92, false), (0x3824, 99, 93, false),
    (0x32b4, 99, 94, false), (0x2e17, 93, 86, false), (0x56a8, 95, 96, true),
    (0x4f46, 101, 97, false), (0x47e5, 102, 98, false), (0x41cf, 103, 99, false),
    (0x3c3d, 104, 100, false), (0x375e, 99, 93, false), (0x5231, 105, 102, false),
    (0x4c0f, 106, 103, false), (0x4639, 107, 104, false), (0x415e, 103, 99, false),
    (0x5627, 105, 106, true), (0x50e7, 108, 107, false), (0x4b85, 109, 103, false),
    (0x5597, 110, 109, false), (0x504f, 111, 107, false), (0x5a10, 110, 111, true),
    (0x5522, 112, 109, false), (0x59eb, 112, 111, true), (0x5a1d, 113, 113, false),
];

/// A bin in the fixed state (row 113, MPS 0).
const FIXED: u8 = 113;

/// Statistics bins of one DC table (F.1.4.4.1: five contexts of S0, SS,
/// SP, SN from 0, X1-X15 from 20, M2-M15 14 bins further on).
pub(super) const DC_BINS: usize = 64;
/// Statistics bins of one AC table (F.1.4.4.2: SE, S0, SP/X1 per
/// coefficient from 0, then X2-X15 and M2-M15 at 189 (k <= Kx) and 217).
pub(super) const AC_BINS: usize = 256;
/// Table slots a DAC segment or a scan header can name (4 bits).
pub(super) const TABLES: usize = 16;

/// Every adaptive bin of the frame's tables; a bin is `mps << 7 | state`.
pub(super) struct Stats {
    /// DC bins per table slot.
    pub dc: [[u8; DC_BINS]; TABLES],
    /// AC bins per table slot.
    pub ac: [[u8; AC_BINS]; TABLES],
}

impl Stats {
    pub fn new() -> Box<Stats> {
        Box::new(Stats {
            dc: [[0; DC_BINS]; TABLES],
            ac: [[0; AC_BINS]; TABLES],
        })
    }
}

/// The conditioning a DAC segment sets per table slot (T.81 B.2.4.3),
/// with the defaults of an SOI.
#[derive(Clone, Copy)]
pub(super) struct Conditioning {
    /// DC: differences below `2^L / 2` count as zero ...
    pub dc_low: [u8; TABLES],
    /// ... and above `2^U / 2` as large.
    pub dc_high: [u8; TABLES],
    /// AC: coefficients up to Kx use the first set of magnitude bins.
    pub ac_kx: [u8; TABLES],
}

impl Default for Conditioning {
    fn default() -> Conditioning {
        Conditioning {
            dc_low: [0; TABLES],
            dc_high: [1; TABLES],
            ac_kx: [5; TABLES],
        }
    }
}

/// The decoder's registers between calls (plain data).
#[derive(Debug, Clone, Copy)]
pub(super) struct Qm {
    /// Offset of the next byte to read.
    pub pos: usize,
    /// Code register; its high 16 bits (Cx) are compared with `a`.
    c: u32,
    /// Interval size, kept at 0x8000 or more between decisions.
    a: u32,
    /// Shifts left before the next byte enters `c`.
    ct: u32,
    /// A marker (or the end of a complete body) was reached: zeros follow.
    pub at_marker: bool,
    /// The end of the complete body was reached without a marker: the
    /// file is cut short inside the scan (a marker would be legitimate).
    pub hit_end: bool,
    /// Bytes were needed past the ones received so far.
    pub starved: bool,
    /// Zero bytes read in place of data since the marker was reached.
    pub zeros_read: u32,
}

impl Qm {
    /// A decoder that starts (INITDEC) at the next call of [`Arith::start`].
    pub fn at(pos: usize) -> Qm {
        Qm {
            pos,
            c: 0,
            a: 0,
            ct: 0,
            at_marker: false,
            hit_end: false,
            starved: false,
            zeros_read: 0,
        }
    }
}

/// The arithmetic decoder over the body received so far.
pub(super) struct Arith<'a> {
    /// The body received so far.
    data: &'a [u8],
    /// No more bytes will come.
    complete: bool,
    /// Registers and position.
    pub qm: Qm,
}

impl<'a> Arith<'a> {
    pub fn new(data: &'a [u8], complete: bool, qm: Qm) -> Arith<'a> {
        Arith { data, complete, qm }
    }

    /// INITDEC (T.81 D.2.7): the first two bytes into Cx, A = 1.0.
    pub fn start(&mut self) {
        self.qm.a = 0x1_0000;
        self.qm.c = 0;
        self.byte_in();
        self.qm.c <<= 8;
        self.byte_in();
        self.qm.c <<= 8;
        self.qm.ct = 0;
    }

    /// BYTE_IN (D.2.6): the next data byte into C, `0xFF 0x00` being a data
    /// `0xFF`; zeros from a marker (or the end of a complete body) on.
    fn byte_in(&mut self) {
        let q = &mut self.qm;
        let byte = if q.at_marker {
            q.zeros_read = q.zeros_read.saturating_add(1);
            0
        } else {
            match self.data.get(q.pos) {
                Some(&b) if b != 0xff => {
                    q.pos += 1;
                    b
                }
                Some(_) => {
                    let mut next = q.pos + 1;
                    while self.data.get(next) == Some(&0xff) {
                        next += 1;
                    }
                    match self.data.get(next) {
                        Some(0) => {
                            q.pos = next + 1;
                            0xff
                        }
                        Some(_) => {
                            q.at_marker = true;
                            0
                        }
                        None if self.complete => {
                            q.at_marker = true;
                            q.hit_end = true;
                            0
                        }
                        None => {
                            q.starved = true;
                            0
                        }
                    }
                }
                None if self.complete => {
                    q.at_marker = true;
                    q.hit_end = true;
                    0
                }
                None => {
                    q.starved = true;
                    0
                }
            }
        };
        q.c += u32::from(byte) << 8;
    }

    /// DECODE (D.2.3-D.2.5) with the estimate in `bin`, which it updates.
    #[inline]
    pub fn decide(&mut self, bin: &mut u8) -> bool {
        let (qe, next_lps, next_mps, switch) = STATES[usize::from(*bin & 0x7f)];
        let qe = u32::from(qe);
        let mps = *bin & 0x80;
        let q = &mut self.qm;
        q.a -= qe;
        // The MPS sub-interval is the lower one; the invariant Cx < A keeps
        // C within 32 bits through the shifts below.
        let lower = q.c >> 16 < q.a;
        if lower && q.a >= 0x8000 {
            return mps != 0;
        }
        if !lower {
            q.c -= q.a << 16;
        }
        // Conditional exchange: the smaller sub-interval is the LPS.
        let lps = (q.a < qe) == lower;
        if !lower {
            q.a = qe;
        }
        let decision = if lps {
            let new_mps = if switch { mps ^ 0x80 } else { mps };
            *bin = new_mps | next_lps;
            mps ^ 0x80
        } else {
            *bin = mps | next_mps;
            mps
        };
        // RENORM_D (D.2.6)
        loop {
            if self.qm.ct == 0 {
                self.byte_in();
                self.qm.ct = 8;
            }
            let q = &mut self.qm;
            q.a <<= 1;
            q.c <<= 1;
            q.ct -= 1;
            if q.a >= 0x8000 {
                break;
            }
        }
        decision != 0
    }

    /// A decision at the fixed probability of 0.5.
    #[inline]
    pub fn decide_fixed(&mut self) -> bool {
        let mut bin = FIXED;
        self.decide(&mut bin)
    }
}

/// One DC difference (F.1.4.4.1) with `context` (0, 4, 8, 12 or 16) the
/// conditioning left by the previous difference; `low`/`high` are the
/// table's L and U.
pub(super) fn dc_diff(
    r: &mut Arith,
    bins: &mut [u8; DC_BINS],
    context: &mut u8,
    (low, high): (u8, u8),
) -> Result<(), Fault> {
    let base = usize::from(*context);
    if !r.decide(&mut bins[base]) {
        *context = 0;
        return Ok(());
    }
    let negative = r.decide(&mut bins[base + 1]);
    let mut bin = base + 2 + usize::from(negative);
    let mut magnitude: u32 = 0;
    if r.decide(&mut bins[bin]) {
        magnitude = 1;
        bin = 20;
        while r.decide(&mut bins[bin]) {
            magnitude <<= 1;
            if magnitude == 0x8000 {
                return Err(Fault::Overflow);
            }
            bin += 1;
        }
    }
    let sign_step = 4 * u8::from(negative);
    *context = if magnitude < (1u32 << low) >> 1 {
        0
    } else if magnitude > (1u32 << high) >> 1 {
        12 + sign_step
    } else {
        4 + sign_step
    };
    bits_below(r, bins, bin + 14, magnitude);
    Ok(())
}

/// The magnitude bits below the top one, all in bin `at`.
#[inline]
fn bits_below(r: &mut Arith, bins: &mut [u8], at: usize, magnitude: u32) {
    let mut bit = magnitude >> 1;
    while bit != 0 {
        r.decide(&mut bins[at]);
        bit >>= 1;
    }
}

/// AC coefficients `ss..=se` of one block, sequential or progressive first
/// scan (F.1.4.4.2); sets the bit of every nonzero one in `nonzero`.
pub(super) fn ac_first(
    r: &mut Arith,
    bins: &mut [u8; AC_BINS],
    (ss, se): (u32, u32),
    kx: u8,
    nonzero: &mut u64,
) -> Result<(), Fault> {
    let mut k = ss;
    while k <= se {
        let mut bin = 3 * (k as usize - 1);
        if r.decide(&mut bins[bin]) {
            break; // end of block
        }
        while !r.decide(&mut bins[bin + 1]) {
            bin += 3;
            k += 1;
            if k > se {
                return Err(Fault::Overflow);
            }
        }
        r.decide_fixed(); // sign
        bin += 2;
        let mut magnitude: u32 = 0;
        if r.decide(&mut bins[bin]) {
            magnitude = 1;
            if r.decide(&mut bins[bin]) {
                magnitude = 2;
                bin = if k <= u32::from(kx) { 189 } else { 217 };
                while r.decide(&mut bins[bin]) {
                    magnitude <<= 1;
                    if magnitude == 0x8000 {
                        return Err(Fault::Overflow);
                    }
                    bin += 1;
                }
            }
        }
        bits_below(r, bins, bin + 14, magnitude);
        *nonzero |= 1 << k;
        k += 1;
    }
    Ok(())
}

/// One block of a progressive AC refinement scan (G.1.3.3): a correction
/// for each coefficient already nonzero, newly nonzero ones with a sign.
pub(super) fn ac_refine(
    r: &mut Arith,
    bins: &mut [u8; AC_BINS],
    (ss, se): (u32, u32),
    nonzero: &mut u64,
) -> Result<(), Fault> {
    // EOBx: the last coefficient of the band's block made nonzero before.
    let through_se = if se >= 63 {
        u64::MAX
    } else {
        (1u64 << (se + 1)) - 1
    };
    let before = *nonzero & through_se & !1;
    let eobx = if before == 0 {
        0
    } else {
        63 - before.leading_zeros()
    };
    let mut k = ss;
    while k <= se {
        let mut bin = 3 * (k as usize - 1);
        if k > eobx && r.decide(&mut bins[bin]) {
            break; // end of band
        }
        loop {
            if *nonzero & 1 << k != 0 {
                r.decide(&mut bins[bin + 2]); // correction bit
                break;
            }
            if r.decide(&mut bins[bin + 1]) {
                r.decide_fixed(); // sign of a newly nonzero coefficient
                *nonzero |= 1 << k;
                break;
            }
            bin += 3;
            k += 1;
            if k > se {
                return Err(Fault::Overflow);
            }
        }
        k += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_table_links_stay_inside_it() {
        for (i, &(qe, lps, mps, _)) in STATES.iter().enumerate() {
            assert!(qe > 0 && qe < 0x8000, "row {i}");
            assert!(usize::from(lps) < STATES.len() && usize::from(mps) < STATES.len());
        }
        assert_eq!(STATES[usize::from(FIXED)], (0x5a1d, FIXED, FIXED, false));
    }

    #[test]
    fn decoder_reads_zeros_after_a_marker_and_never_panics() {
        let data = [0x12, 0x34, 0xff, 0x00, 0x56, 0xff, 0xd9];
        let mut r = Arith::new(&data, true, Qm::at(0));
        r.start();
        let mut bins = [0u8; 4];
        for i in 0..10_000 {
            r.decide(&mut bins[i % 4]);
            r.decide_fixed();
        }
        assert!(r.qm.at_marker);
        assert_eq!(r.qm.pos, 5, "stops at the marker");
        assert!(!r.qm.starved);
    }

    #[test]
    fn decoder_notices_bytes_not_received_yet() {
        let data = [0x12, 0x34];
        let mut r = Arith::new(&data, false, Qm::at(0));
        r.start();
        let mut bin = 0u8;
        for _ in 0..64 {
            r.decide(&mut bin);
        }
        assert!(r.qm.starved);
    }
}
