//! Builds an animated WebP from a still one, for tests and benchmarks (the
//! verifier's unit tests, `tests/bombs.rs`, `bench/verify.rs` include this
//! file with `#[path]`): the still's bitstream repeated in ANMF frames under
//! a VP8X header with the animation flag.

/// `frames` copies of `still`'s bitstream (a simple-format WebP of `w`x`h`:
/// its chunk after the 12-byte RIFF header) in ANMF chunks, each shown for
/// `duration_ms`.
pub fn animated_webp(still: &[u8], w: u32, h: u32, frames: usize, duration_ms: u32) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, fourcc: &[u8], data: &[u8]| {
        out.extend(fourcc);
        out.extend((data.len() as u32).to_le_bytes());
        out.extend(data);
        if data.len() % 2 == 1 {
            out.push(0);
        }
    };
    let mut vp8x = vec![0x02, 0, 0, 0];
    vp8x.extend(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend(&(h - 1).to_le_bytes()[..3]);
    let mut out = b"RIFF\0\0\0\0WEBP".to_vec();
    chunk(&mut out, b"VP8X", &vp8x);
    chunk(&mut out, b"ANIM", &[0, 0, 0, 0, 0, 0]);
    for _ in 0..frames {
        let mut anmf = vec![0; 6];
        anmf.extend(&(w - 1).to_le_bytes()[..3]);
        anmf.extend(&(h - 1).to_le_bytes()[..3]);
        anmf.extend(&duration_ms.to_le_bytes()[..3]);
        anmf.push(0);
        anmf.extend(&still[12..]);
        chunk(&mut out, b"ANMF", &anmf);
    }
    let riff = (out.len() - 8) as u32;
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    out
}
