//! Body framing: how a response says where its body ends (length,
//! chunks, or the connection's close), and the chunked decoder (pure).

use super::head::Head;

/// Longest chunk-size line in a chunked body (hex size plus extensions).
const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// Most bytes of trailer lines after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// How the body of a response is delimited.
#[derive(Debug, PartialEq)]
pub(super) enum Framing {
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunked),
    /// Until the server closes the connection.
    UntilClose,
    /// No body at all (204, 304).
    Empty,
}

/// The framing a head announces; errors for contradictory lengths.
pub(super) fn framing(head: &Head) -> Result<Framing, String> {
    if head.status == 204 || head.status == 304 {
        return Ok(Framing::Empty);
    }
    if let Some(te) = head.header("transfer-encoding") {
        let last = te.rsplit(',').next().unwrap_or_default().trim();
        return Ok(if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for (_, v) in head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        for part in v.split(',') {
            let n = part
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("invalid Content-Length {v:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length headers".into());
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Where a chunked body's decoder is.
#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until a blank one.
    Trailers,
    /// The whole body is in.
    Done,
}

/// A chunked transfer-coding decoder (pure; fed any slicing of the bytes).
#[derive(Debug, Default, PartialEq)]
pub struct Chunked {
    /// Where the decoder is.
    state: ChunkState,
    /// The current size, CRLF or trailer line so far.
    line: Vec<u8>,
    /// Trailer bytes seen.
    trailer_bytes: usize,
}

impl Chunked {
    /// Decodes `input` into `out`; returns the bytes consumed (all of them
    /// unless the body ended inside `input`).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let n = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[i..i + n]);
                    i += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailers => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        self.line.push(b);
                        let cap = if self.state == ChunkState::Trailers {
                            MAX_TRAILER_BYTES
                        } else {
                            MAX_CHUNK_LINE_BYTES
                        };
                        if self.line.len() > cap {
                            return Err("chunked body: overlong size or trailer line".into());
                        }
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    self.state = match self.state {
                        ChunkState::Size => {
                            let text = String::from_utf8_lossy(line);
                            let hex = text.split(';').next().unwrap_or_default().trim();
                            let size = u64::from_str_radix(hex, 16)
                                .map_err(|_| format!("chunked body: invalid chunk size {hex:?}"))?;
                            if hex.starts_with(['+', '-']) {
                                return Err(format!("chunked body: invalid chunk size {hex:?}"));
                            }
                            if size == 0 {
                                ChunkState::Trailers
                            } else {
                                ChunkState::Data(size)
                            }
                        }
                        ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                        ChunkState::DataEnd => {
                            return Err("chunked body: chunk data longer than its size".into())
                        }
                        ChunkState::Trailers if line.is_empty() => ChunkState::Done,
                        ChunkState::Trailers => {
                            self.trailer_bytes += line.len();
                            if self.trailer_bytes > MAX_TRAILER_BYTES {
                                return Err("chunked body: trailers too long".into());
                            }
                            ChunkState::Trailers
                        }
                        ChunkState::Data(_) | ChunkState::Done => unreachable!("handled above"),
                    };
                }
            }
        }
        Ok(i)
    }

    /// Whether the last chunk and the trailers are in.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn framing_follows_the_rfc_order() {
        let head = |h: &[(&str, &str)]| Head {
            status: 200,
            version_1_1: true,
            headers: h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            framing(&head(&[("Content-Length", "7")])),
            Ok(Framing::Length(7))
        );
        assert_eq!(
            framing(&head(&[
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "7")
            ])),
            Ok(Framing::Chunked(Chunked::default()))
        );
        assert_eq!(framing(&head(&[])), Ok(Framing::UntilClose));
        assert!(framing(&head(&[("Content-Length", "7"), ("Content-Length", "8")])).is_err());
        assert!(framing(&head(&[("Content-Length", "-1")])).is_err());
        let mut not_modified = head(&[("Content-Length", "7")]);
        not_modified.status = 304;
        assert_eq!(framing(&not_modified), Ok(Framing::Empty));
    }

    #[test]
    fn chunked_bodies_decode_in_any_slicing() {
        let wire = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nT: x\r\n\r\n";
        for split in 1..wire.len() {
            let mut c = Chunked::default();
            let mut out = Vec::new();
            let a = c.feed(&wire[..split], &mut out).unwrap();
            assert_eq!(a, split);
            c.feed(&wire[split..], &mut out).unwrap();
            assert!(c.is_done());
            assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
        }
        let mut c = Chunked::default();
        assert!(c.feed(b"zz\r\n", &mut Vec::new()).is_err());
        let mut c = Chunked::default();
        assert!(c.feed(b"2\r\nabc\r\n", &mut Vec::new()).is_err());
        let mut c = Chunked::default();
        assert!(c.feed(&[b'1'; 2000], &mut Vec::new()).is_err());
    }
}
