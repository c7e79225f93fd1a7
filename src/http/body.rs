//! Body framing: how a response says where its body ends (length,
//! chunks, or the connection's close), and the chunked decoder (pure).
//!
//! The rules, strict where a cut picture could pass for a whole one:
//! - `Transfer-Encoding` may only be `chunked` (`identity` entries, a
//!   leftover of RFC 2616, are ignored as Python's http.client does, so
//!   `Content-Length` still counts); any other coding, or `chunked` not
//!   alone, fails the attempt: holosync never offered one (no `TE` header)
//!   and cannot tell where such a body ends.
//! - `Content-Length` is digits only (`+4222` is refused) and every copy
//!   agrees; `Transfer-Encoding: chunked` overrides it (RFC 9112, 6.3) and
//!   the connection is not reused after such a response.
//! - A chunked body is whole only with its last (zero) chunk and the blank
//!   line after its trailers; a close before that is a cut.
//! - Without either, the body ends when the connection closes. That end
//!   proves nothing on plain HTTP (a cut looks the same), so the download
//!   accepts such a body only if the file proves itself whole (see
//!   `verify::whole`); over TLS only a close_notify ends it (`conn.rs`).
//! - `Content-Encoding` other than `identity` (the request says
//!   `Accept-Encoding: identity`) fails the attempt: encoded bytes are never
//!   stored as the picture.

use super::head::Head;
use super::Failure;

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

/// The framing a head announces; errors for contradictory or invalid lengths
/// (permanent, as today's other malformed heads) and for transfer codings
/// holosync cannot decode (transient: a server or proxy setting, not the URL).
pub(super) fn framing(head: &Head) -> Result<Framing, Failure> {
    if head.status == 204 || head.status == 304 {
        return Ok(Framing::Empty);
    }
    let codings: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .collect();
    match codings[..] {
        [] => {}
        [only] if only.eq_ignore_ascii_case("chunked") => {
            return Ok(Framing::Chunked(Chunked::default()))
        }
        _ => {
            return Err(Failure::transient(format!(
                "unsupported Transfer-Encoding {:?} (only chunked is decoded; holosync offers no other)",
                codings.join(", ")
            )))
        }
    }
    let mut length = None;
    for (_, v) in head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        for part in v.split(',') {
            let part = part.trim();
            let n = Some(part)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or_else(|| Failure::Permanent(format!("invalid Content-Length {v:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Failure::Permanent(
                    "conflicting Content-Length headers".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Refuses a body in a content coding: the request accepted only `identity`,
/// and encoded bytes stored as a picture are a broken picture.
pub(super) fn check_content_coding(head: &Head) -> Result<(), Failure> {
    let codings: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .collect();
    if codings.is_empty() {
        return Ok(());
    }
    Err(Failure::transient(format!(
        "the server sent the body with Content-Encoding {:?} though only identity was accepted; encoded bytes are not stored",
        codings.join(", ")
    )))
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
        assert_eq!(
            framing(&head(&[("Content-Length", "7, 7")])),
            Ok(Framing::Length(7))
        );
        for bad in ["-1", "+7", " ", "0x7", "99999999999999999999"] {
            let f = framing(&head(&[("Content-Length", bad)]));
            assert!(matches!(f, Err(Failure::Permanent(_))), "{bad:?}: {f:?}");
        }
        let mut not_modified = head(&[("Content-Length", "7")]);
        not_modified.status = 304;
        assert_eq!(framing(&not_modified), Ok(Framing::Empty));
    }

    #[test]
    fn only_chunked_is_a_transfer_coding() {
        let head = |te: &str| Head {
            status: 200,
            version_1_1: true,
            headers: vec![
                ("Transfer-Encoding".into(), te.into()),
                ("Content-Length".into(), "2105".into()),
            ],
        };
        // identity changes nothing: the length still counts.
        assert_eq!(framing(&head("identity")), Ok(Framing::Length(2105)));
        assert_eq!(
            framing(&head("identity, Chunked")),
            Ok(Framing::Chunked(Chunked::default()))
        );
        for bad in ["chunked, gzip", "gzip, chunked", "gzip", "chunked, chunked"] {
            let f = framing(&head(bad));
            assert!(
                matches!(f, Err(Failure::Transient { .. })),
                "{bad:?}: {f:?}"
            );
        }
    }

    #[test]
    fn content_codings_are_refused() {
        let head = |ce: &[&str]| Head {
            status: 200,
            version_1_1: true,
            headers: ce
                .iter()
                .map(|v| ("Content-Encoding".to_string(), v.to_string()))
                .collect(),
        };
        assert!(check_content_coding(&head(&[])).is_ok());
        assert!(check_content_coding(&head(&["identity"])).is_ok());
        let err = check_content_coding(&head(&["gzip"])).unwrap_err();
        assert!(matches!(err, Failure::Transient { .. }));
        assert!(
            err.reason().contains("Content-Encoding \"gzip\""),
            "{err:?}"
        );
        assert!(check_content_coding(&head(&["identity", "br"])).is_err());
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
