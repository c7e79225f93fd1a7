//! JPEG Huffman entropy decoding without pixels: tables (T.81 Annex C), the
//! bit stream of a scan (F.2.2.5) and one MCU of each kind of scan
//! (sequential, progressive DC/AC first and refinement, lossless).
//!
//! Only what decides which bits come next is kept: no coefficient values,
//! no DC prediction, and for progressive AC refinement one "already nonzero"
//! bit per coefficient (the caller's bitmap word per block).

/// Codes of at most this many bits are decoded with one table look-up
/// (512 entries; longer codes take the per-length search of T.81 F.2.2.3).
const FAST_BITS: u32 = 9;

/// Why decoding an MCU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// The bits run past the bytes received so far and more may come: the
    /// caller rolls back to the MCU's start and waits.
    Starved,
    /// The bits needed run into a marker or the end of the file: the scan
    /// ends early (libjpeg: "premature end of data segment").
    EndsEarly,
    /// No code of the table matches the next bits.
    BadCode,
    /// A run of zeros or a coefficient goes past the end of the block or band.
    Overflow,
    /// An AC refinement symbol whose size is not 1 (T.81 G.1.2.3).
    BadRefinement,
}

/// One decoding table built from a DHT segment.
pub(super) struct HuffTable {
    /// `length << 8 | symbol` for codes of at most `FAST_BITS` bits, indexed
    /// by the next `FAST_BITS` bits; 0 where the code is longer.
    fast: [u16; 1 << FAST_BITS],
    /// Largest code of each length (index 1..=16), or -1 when none.
    max_code: [i32; 17],
    /// Per length: index in `symbols` of that length's first code, minus the code.
    offset: [i32; 17],
    /// The symbols in code order.
    symbols: [u8; 256],
    /// The largest symbol, for the DC category check.
    pub largest: u8,
}

impl HuffTable {
    /// Builds a table from DHT's 16 code counts (per length) and its
    /// symbols, refusing what libjpeg refuses: over 256 codes, or codes that
    /// do not fit their length (which includes an all-ones code).
    pub fn new(counts: &[u8; 16], symbols: &[u8]) -> Result<HuffTable, String> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total > 256 || total != symbols.len() {
            return Err(format!(
                "Huffman table with {total} codes for {} symbols",
                symbols.len()
            ));
        }
        let longest = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
        let mut table = HuffTable {
            fast: [0; 1 << FAST_BITS],
            max_code: [-1; 17],
            offset: [0; 17],
            symbols: [0; 256],
            largest: symbols.iter().copied().max().unwrap_or(0),
        };
        table.symbols[..total].copy_from_slice(symbols);
        let mut code: u32 = 0;
        let mut index: usize = 0;
        for len in 1..=16usize {
            let n = usize::from(counts[len - 1]);
            if n > 0 {
                table.offset[len] = index as i32 - code as i32;
                table.max_code[len] = (code + n as u32 - 1) as i32;
                if len as u32 <= FAST_BITS {
                    let spread = FAST_BITS - len as u32;
                    for i in 0..n {
                        let first = ((code + i as u32) << spread) as usize;
                        let entry = (len as u16) << 8 | u16::from(symbols[index + i]);
                        // A code past its length's range is refused below;
                        // `skip`/`take` keep the filling inside the table.
                        for slot in table.fast.iter_mut().skip(first).take(1 << spread) {
                            *slot = entry;
                        }
                    }
                }
            }
            code += n as u32;
            index += n;
            // The next free code must still fit in `len` bits: otherwise a
            // code overflowed, or the all-ones code (reserved) was used.
            if len <= longest && code >= 1 << len {
                return Err("bad Huffman table (its codes do not fit their lengths)".into());
            }
            code <<= 1;
        }
        Ok(table)
    }

    /// Bytes this table occupies.
    pub const BYTES: usize = std::mem::size_of::<HuffTable>();
}

/// T.81 Annex K.3's typical tables, which libjpeg installs in any of DC/AC
/// slots 0 and 1 left undefined at the first scan (Motion-JPEG frames omit them).
pub(super) mod standard {
    /// Code counts per length of the luminance DC table (Table K.3).
    pub const LUMA_DC_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    /// Code counts per length of the chrominance DC table (Table K.4).
    pub const CHROMA_DC_COUNTS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    /// Code counts per length of the luminance AC table (Table K.5).
    pub const LUMA_AC_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125];
    /// Code counts per length of the chrominance AC table (Table K.6).
    pub const CHROMA_AC_COUNTS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119];
    /// Symbols of the luminance AC codes shorter than 16 bits, in code order;
    /// the 16-bit codes take every other AC symbol in ascending order.
    const LUMA_AC_SHORT: [u8; 37] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82,
    ];
    /// The same for the chrominance AC table.
    const CHROMA_AC_SHORT: [u8; 43] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1,
    ];

    /// DC symbols: the categories 0 to 11 in order.
    pub fn dc_symbols() -> Vec<u8> {
        (0..12).collect()
    }

    /// AC symbols of Table K.5 (`chroma` false) or K.6 (true), in code order.
    pub fn ac_symbols(chroma: bool) -> Vec<u8> {
        let short: &[u8] = if chroma {
            &CHROMA_AC_SHORT
        } else {
            &LUMA_AC_SHORT
        };
        // Every 8-bit AC symbol: EOB, ZRL, and run 0-15 with size 1-10.
        let all = [0x00u8, 0xf0]
            .into_iter()
            .chain((0..16u8).flat_map(|run| (1..=10u8).map(move |size| run << 4 | size)));
        let mut rest: Vec<u8> = all.filter(|s| !short.contains(s)).collect();
        rest.sort_unstable();
        short.iter().copied().chain(rest).collect()
    }
}

/// Where the bytes of the scan stopped feeding bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// Bytes are still there to read.
    Open,
    /// A marker (`0xFF` then neither `0x00` nor `0xFF`) is at `pos`.
    Marker,
    /// The body is complete and ends at `pos`.
    Eof,
    /// The bytes received so far end at `pos`; more may come.
    Starved,
}

/// The state of a scan's bit stream between calls (plain data, so an MCU
/// can be rolled back by copying it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bits {
    /// Offset of the next byte to load.
    pub pos: usize,
    /// Loaded bits; the low `count` bits are the next ones, oldest highest.
    acc: u64,
    /// Bits loaded and not yet used.
    count: u32,
    /// Why loading stopped, if it did.
    pub end: End,
}

impl Bits {
    /// A stream starting at byte `pos`.
    pub fn at(pos: usize) -> Bits {
        Bits {
            pos,
            acc: 0,
            count: 0,
            end: End::Open,
        }
    }

    /// Drops the bits loaded but not used (padding at the end of a segment,
    /// or bytes before the next marker): reading goes on at `pos`.
    pub fn drop_loaded(&mut self) {
        self.acc = 0;
        self.count = 0;
    }

    /// Called at the start of a step: bytes may have arrived since a
    /// previous step ran out of them.
    pub fn wake(&mut self) {
        if self.end == End::Starved {
            self.end = End::Open;
        }
    }
}

/// A scan's bit stream over the body received so far.
pub(super) struct Reader<'a> {
    /// The body received so far.
    data: &'a [u8],
    /// No more bytes will come.
    complete: bool,
    /// Position and loaded bits.
    pub bits: Bits,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8], complete: bool, bits: Bits) -> Reader<'a> {
        Reader {
            data,
            complete,
            bits,
        }
    }

    /// Loads whole bytes until more than 56 bits are held or the data stops
    /// (T.81 F.2.2.5: `0xFF 0x00` is a data byte `0xFF`; fill bytes `0xFF`
    /// before it are skipped, as libjpeg does).
    #[inline]
    fn refill(&mut self) {
        let b = &mut self.bits;
        while b.count <= 56 && b.end == End::Open {
            // The common case: plain bytes, eight at most per refill.
            match self.data.get(b.pos) {
                Some(&byte) if byte != 0xff => {
                    b.acc = b.acc << 8 | u64::from(byte);
                    b.count += 8;
                    b.pos += 1;
                    continue;
                }
                Some(_) => {}
                None => {
                    b.end = if self.complete {
                        End::Eof
                    } else {
                        End::Starved
                    };
                    break;
                }
            }
            let mut next = b.pos + 1;
            while self.data.get(next) == Some(&0xff) {
                next += 1;
            }
            match self.data.get(next) {
                Some(0) => {
                    b.acc = b.acc << 8 | 0xff;
                    b.count += 8;
                    b.pos = next + 1;
                }
                Some(_) => b.end = End::Marker,
                None => {
                    b.end = if self.complete {
                        End::Eof
                    } else {
                        End::Starved
                    }
                }
            }
        }
    }

    /// The fault of needing bits that are not there.
    #[inline]
    fn short(&self) -> Fault {
        if self.bits.end == End::Starved {
            Fault::Starved
        } else {
            Fault::EndsEarly
        }
    }

    /// The next 16 bits without using them, zeros past the end.
    #[inline]
    fn peek16(&mut self) -> u32 {
        if self.bits.count < 16 {
            self.refill();
        }
        let b = &self.bits;
        if b.count >= 16 {
            (b.acc >> (b.count - 16)) as u32 & 0xffff
        } else {
            (b.acc << (16 - b.count)) as u32 & 0xffff
        }
    }

    /// Uses `n` (at most 16) bits and returns them.
    #[inline]
    pub fn bits(&mut self, n: u32) -> Result<u32, Fault> {
        if self.bits.count < n {
            self.refill();
            if self.bits.count < n {
                return Err(self.short());
            }
        }
        self.bits.count -= n;
        Ok((self.bits.acc >> self.bits.count) as u32 & ((1 << n) - 1))
    }

    /// Decodes one symbol of `table`.
    #[inline]
    pub fn symbol(&mut self, table: &HuffTable) -> Result<u8, Fault> {
        let peek = self.peek16();
        let entry = table.fast[(peek >> (16 - FAST_BITS)) as usize];
        let (len, symbol) = if entry != 0 {
            (u32::from(entry >> 8), entry as u8)
        } else {
            let mut found = None;
            for len in FAST_BITS as usize + 1..=16 {
                let code = (peek >> (16 - len)) as i32;
                if code <= table.max_code[len] {
                    let at = (table.offset[len] + code) as usize;
                    found = Some((len as u32, table.symbols[at]));
                    break;
                }
            }
            match found {
                Some(hit) => hit,
                // Zeros padded past the end make a bad code too: the real
                // fault is then the missing bits.
                None if self.bits.count < 16 => return Err(self.short()),
                None => return Err(Fault::BadCode),
            }
        };
        if len > self.bits.count {
            return Err(self.short());
        }
        self.bits.count -= len;
        Ok(symbol)
    }

    /// A DC difference: its category, then that many bits.
    #[inline]
    fn dc(&mut self, table: &HuffTable) -> Result<(), Fault> {
        let size = self.symbol(table)?;
        self.bits(u32::from(size)).map(|_| ())
    }
}

/// One block of a sequential scan: DC difference and AC coefficients 1-63.
#[inline]
pub(super) fn sequential_block(
    r: &mut Reader,
    dc: &HuffTable,
    ac: &HuffTable,
) -> Result<(), Fault> {
    r.dc(dc)?;
    let mut k = 1u32;
    while k < 64 {
        let rs = r.symbol(ac)?;
        let (run, size) = (u32::from(rs >> 4), u32::from(rs & 15));
        if size == 0 {
            if run < 15 {
                return Ok(()); // end of block
            }
            k += 16; // sixteen zeros
            if k > 64 {
                return Err(Fault::Overflow);
            }
            continue;
        }
        k += run;
        if k > 63 {
            return Err(Fault::Overflow);
        }
        r.bits(size)?;
        k += 1;
    }
    Ok(())
}

/// One block of a progressive DC first scan.
#[inline]
pub(super) fn dc_first_block(r: &mut Reader, dc: &HuffTable) -> Result<(), Fault> {
    r.dc(dc)
}

/// One block of a progressive DC refinement scan: one bit.
#[inline]
pub(super) fn dc_refine_block(r: &mut Reader) -> Result<(), Fault> {
    r.bits(1).map(|_| ())
}

/// One sample of a lossless scan: a difference category (0-16), then that
/// many bits (none for 16, T.81 H.1.2.2).
#[inline]
pub(super) fn lossless_sample(r: &mut Reader, table: &HuffTable) -> Result<(), Fault> {
    let size = r.symbol(table)?;
    if size < 16 {
        r.bits(u32::from(size))?;
    }
    Ok(())
}

/// One block of a progressive AC first scan over coefficients `ss..=se`;
/// sets the bit of every coefficient it makes nonzero in `nonzero`.
/// `eobrun` counts the blocks still to skip after an end-of-band run.
#[inline]
pub(super) fn ac_first_block(
    r: &mut Reader,
    ac: &HuffTable,
    (ss, se): (u32, u32),
    eobrun: &mut u32,
    nonzero: &mut u64,
) -> Result<(), Fault> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = ss;
    while k <= se {
        let rs = r.symbol(ac)?;
        let (run, size) = (u32::from(rs >> 4), u32::from(rs & 15));
        if size == 0 {
            if run < 15 {
                // This block and the next `2^run - 1 + bits` end here.
                *eobrun = (1 << run) - 1 + r.bits(run)?;
                return Ok(());
            }
            k += 16;
            continue;
        }
        k += run;
        if k > se {
            return Err(Fault::Overflow);
        }
        r.bits(size)?;
        *nonzero |= 1 << k;
        k += 1;
    }
    // A run of zeros may end exactly at the band's end; past it is corrupt.
    if k > se + 1 {
        return Err(Fault::Overflow);
    }
    Ok(())
}

/// One block of a progressive AC refinement scan (T.81 G.1.2.3): a
/// correction bit for each coefficient already nonzero in `ss..=se`, and new
/// coefficients of size 1 placed by counting the still-zero ones.
#[inline]
pub(super) fn ac_refine_block(
    r: &mut Reader,
    ac: &HuffTable,
    (ss, se): (u32, u32),
    eobrun: &mut u32,
    nonzero: &mut u64,
) -> Result<(), Fault> {
    let mut k = ss;
    if *eobrun == 0 {
        while k <= se {
            let rs = r.symbol(ac)?;
            let (mut run, size) = (u32::from(rs >> 4), u32::from(rs & 15));
            let new_coefficient = match size {
                0 if run < 15 => {
                    *eobrun = (1 << run) + r.bits(run)?;
                    break;
                }
                0 => false, // sixteen still-zero coefficients to pass
                1 => {
                    r.bits(1)?; // its sign
                    true
                }
                _ => return Err(Fault::BadRefinement),
            };
            // Pass `run` still-zero coefficients, correcting nonzero ones,
            // and stop on the still-zero one the new coefficient takes.
            while k <= se {
                if *nonzero & 1 << k != 0 {
                    r.bits(1)?;
                } else if run == 0 {
                    break;
                } else {
                    run -= 1;
                }
                k += 1;
            }
            if new_coefficient {
                if k > se {
                    return Err(Fault::Overflow);
                }
                *nonzero |= 1 << k;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        // Inside an end-of-band run: only correction bits remain.
        while k <= se {
            if *nonzero & 1 << k != 0 {
                r.bits(1)?;
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(data: &[u8], complete: bool) -> Reader<'_> {
        Reader::new(data, complete, Bits::at(0))
    }

    #[test]
    fn standard_tables_are_complete_and_valid() {
        for chroma in [false, true] {
            let symbols = standard::ac_symbols(chroma);
            assert_eq!(symbols.len(), 162);
            let counts = if chroma {
                standard::CHROMA_AC_COUNTS
            } else {
                standard::LUMA_AC_COUNTS
            };
            HuffTable::new(&counts, &symbols).unwrap();
        }
        HuffTable::new(&standard::LUMA_DC_COUNTS, &standard::dc_symbols()).unwrap();
        HuffTable::new(&standard::CHROMA_DC_COUNTS, &standard::dc_symbols()).unwrap();
    }

    #[test]
    fn table_with_an_all_ones_code_is_refused() {
        // Two 1-bit codes: 0 and 1, the second all ones.
        let mut counts = [0u8; 16];
        counts[0] = 2;
        assert!(HuffTable::new(&counts, &[1, 2]).is_err());
        counts[0] = 1;
        counts[1] = 1;
        HuffTable::new(&counts, &[1, 2]).unwrap();
    }

    #[test]
    fn stuffed_ff_is_a_data_byte_and_a_marker_ends_the_bits() {
        let mut r = reader(&[0xff, 0x00, 0xab, 0xff, 0xd9], true);
        assert_eq!(r.bits(8), Ok(0xff));
        assert_eq!(r.bits(8), Ok(0xab));
        assert_eq!(r.bits(1), Err(Fault::EndsEarly));
        assert_eq!(r.bits.end, End::Marker);
        assert_eq!(r.bits.pos, 3);
    }

    #[test]
    fn running_out_of_received_bytes_is_starved_not_an_error() {
        let mut r = reader(&[0x12], false);
        assert_eq!(r.bits(8), Ok(0x12));
        assert_eq!(r.bits(1), Err(Fault::Starved));
        let mut r = reader(&[0x12], true);
        r.bits(8).unwrap();
        assert_eq!(r.bits(1), Err(Fault::EndsEarly));
    }

    #[test]
    fn long_codes_decode_through_the_slow_path() {
        // Lengths 1, 2, ..., 12: codes 0, 10, 110, ... 111111111110.
        let counts = [1u8, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0];
        let symbols: Vec<u8> = (0..12).collect();
        let table = HuffTable::new(&counts, &symbols).unwrap();
        // 1111 1111 1110 then 0: symbols 11 and 0.
        let data = [0xff, 0x00, 0xe0];
        let mut r = reader(&data, true);
        assert_eq!(r.symbol(&table), Ok(11));
        assert_eq!(r.symbol(&table), Ok(0));
    }
}
