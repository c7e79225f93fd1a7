//! Whether a GIF, WebP or BMP is all there, from its own structure (pure):
//! for a body whose length the server never gave, so that only the file
//! can say whether the connection's close cut it. (JPEG and PNG need no
//! such check: their walkers already refuse a file that ends early.)

/// What the bytes say about their own end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whole {
    /// The structure is complete: a GIF's trailer, a WebP's RIFF size, a BMP's file size.
    Yes,
    /// A known kind that ends early (or is broken): why.
    Cut(String),
    /// A kind whose end cannot be told from its bytes.
    Unknown,
}

/// Whether `bytes` hold a whole GIF, WebP or BMP.
pub fn whole(bytes: &[u8]) -> Whole {
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return gif(bytes).map_or_else(Whole::Cut, |()| Whole::Yes);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        // The RIFF size counts everything after its own 8 bytes.
        let size = u64::from(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]));
        return if bytes.len() as u64 >= 8 + size {
            Whole::Yes
        } else {
            Whole::Cut(format!(
                "the WebP says {} bytes and {} came",
                8 + size,
                bytes.len()
            ))
        };
    }
    if bytes.len() >= 6 && bytes.starts_with(b"BM") {
        let size = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        // Some writers leave the size 0: then the BMP cannot tell.
        return match size {
            0 => Whole::Unknown,
            s if bytes.len() as u64 >= u64::from(s) => Whole::Yes,
            s => Whole::Cut(format!("the BMP says {s} bytes and {} came", bytes.len())),
        };
    }
    Whole::Unknown
}

/// Walks a GIF's blocks (GIF89a specification) to its trailer, without
/// decoding any image data.
fn gif(b: &[u8]) -> Result<(), String> {
    let short = || "the GIF ends before its trailer".to_string();
    let byte = |i: usize| b.get(i).copied().ok_or_else(short);
    // Header (6) and logical screen descriptor (7), then the global colour table.
    let flags = byte(10)?;
    let mut i = 13 + colour_table(flags);
    loop {
        match byte(i)? {
            // Trailer.
            0x3b => return Ok(()),
            // Extension: label, then data sub-blocks.
            0x21 => i = sub_blocks(b, i + 2).ok_or_else(short)?,
            // Image descriptor (10), local colour table, LZW code size, data sub-blocks.
            0x2c => {
                let flags = byte(i + 9)?;
                i = sub_blocks(b, i + 10 + colour_table(flags) + 1).ok_or_else(short)?;
            }
            other => {
                return Err(format!(
                    "the GIF is broken: block 0x{other:02x} at byte {i}"
                ))
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

/// The offset after the data sub-blocks starting at `i` (None: they run past the end).
fn sub_blocks(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = usize::from(*b.get(i)?);
        i += 1;
        if len == 0 {
            return Some(i);
        }
        i += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GIF89a: a global colour table, a comment, an image with a local
    /// table and `data` bytes of (unchecked) image data.
    fn gif(data: usize) -> Vec<u8> {
        let mut g = b"GIF89a\x02\x00\x02\x00\x80\x00\x00".to_vec();
        g.extend([0u8; 6]);
        g.extend(b"\x21\xfe\x03abc\x00");
        g.extend(b"\x2c\x00\x00\x00\x00\x02\x00\x02\x00\x81");
        g.extend([0u8; 12]);
        g.push(2);
        for chunk in vec![0x55u8; data].chunks(255) {
            g.push(chunk.len() as u8);
            g.extend(chunk);
        }
        g.extend(b"\x00\x3b");
        g
    }

    #[test]
    fn a_gif_is_whole_only_up_to_its_trailer() {
        let g = gif(2000);
        assert_eq!(whole(&g), Whole::Yes);
        for cut in [6, 13, 20, 30, 400, g.len() - 1] {
            assert!(matches!(whole(&g[..cut]), Whole::Cut(_)), "cut at {cut}");
        }
        let mut broken = g.clone();
        broken[19] = 0x99;
        assert!(matches!(whole(&broken), Whole::Cut(r) if r.contains("broken")));
    }

    #[test]
    fn webp_and_bmp_are_whole_by_their_size_fields() {
        let mut webp = b"RIFF\x0c\x00\x00\x00WEBPVP8L".to_vec();
        assert!(matches!(whole(&webp), Whole::Cut(_)));
        webp.extend([0; 4]);
        assert_eq!(whole(&webp), Whole::Yes);
        let bmp = b"BM\x08\x00\x00\x00\x00\x00";
        assert_eq!(whole(bmp), Whole::Yes);
        assert!(matches!(whole(&bmp[..7]), Whole::Cut(_)));
        assert_eq!(whole(b"BM\x00\x00\x00\x00\x00"), Whole::Unknown);
        assert_eq!(whole(b"plain text"), Whole::Unknown);
    }
}
