//! CRC-32 as PNG uses it (ISO-HDLC: polynomial 0xEDB88320 reflected, start
//! and end inverted), slicing by four bytes. Pure. Ours rather than the
//! crc32fast crate: its tables and SIMD paths cost about 20 KB of exe, and a
//! PNG's chunk CRC is a small part of checking it (the inflating dominates).

/// Four 256-entry tables: `TABLES[0]` is the byte-at-a-time table, `TABLES[k]`
/// advances a byte that is `k` bytes further from the end.
static TABLES: [[u32; 256]; 4] = tables();

const fn tables() -> [[u32; 256]; 4] {
    let mut t = [[0u32; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 4 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

/// A running CRC-32.
#[derive(Debug, Clone)]
pub struct Crc32 {
    /// The register, inverted.
    state: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        Crc32::new()
    }
}

impl Crc32 {
    /// The CRC of nothing so far.
    pub fn new() -> Crc32 {
        Crc32 { state: !0 }
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.state;
        let mut words = bytes.chunks_exact(4);
        for w in &mut words {
            c ^= u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            c = TABLES[3][(c & 0xff) as usize]
                ^ TABLES[2][((c >> 8) & 0xff) as usize]
                ^ TABLES[1][((c >> 16) & 0xff) as usize]
                ^ TABLES[0][(c >> 24) as usize];
        }
        for &b in words.remainder() {
            c = (c >> 8) ^ TABLES[0][((c ^ u32::from(b)) & 0xff) as usize];
        }
        self.state = c;
    }

    /// The CRC of everything added.
    pub fn finalize(&self) -> u32 {
        !self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc(bytes: &[u8]) -> u32 {
        let mut c = Crc32::new();
        c.update(bytes);
        c.finalize()
    }

    #[test]
    fn known_values() {
        assert_eq!(crc(b""), 0);
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc(b"123456789"), 0xCBF4_3926);
        // The IEND chunk every PNG ends with: type only, CRC AE 42 60 82.
        assert_eq!(crc(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn pieces_of_any_size_give_the_whole_crc() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = crc(&data);
        // Bit by bit, the definition itself.
        let mut slow = !0u32;
        for &b in &data {
            slow ^= u32::from(b);
            for _ in 0..8 {
                slow = if slow & 1 != 0 {
                    0xEDB8_8320 ^ (slow >> 1)
                } else {
                    slow >> 1
                };
            }
        }
        assert_eq!(whole, !slow);
        for step in [1, 3, 4, 5, 64, 999] {
            let mut c = Crc32::new();
            for piece in data.chunks(step) {
                c.update(piece);
            }
            assert_eq!(c.finalize(), whole, "pieces of {step}");
        }
    }
}
