//! Response heads: the status line and headers, parsed by httparse (hyper's
//! and ureq's parser) and bounded in bytes and header lines (pure).
//!
//! The leniencies are those of browsers and curl: lines may end in a bare LF,
//! blank lines before the status line are skipped, a folded (obs-fold) value
//! is joined with a space, and a line that is not a header is skipped. A
//! head over the bounds is the server's fault (or an attacker's), not the
//! URL's: it fails the attempt, not the URL.

/// Largest response head (status line and headers); real servers send 1-2 KiB.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most header lines in one response head: far more than any server sends
/// (curl sets no count; the byte bound above is what bounds memory), yet a
/// fixed number of slots for httparse.
const MAX_HEADER_LINES: usize = 1000;
/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The status code.
    pub status: u16,
    /// An HTTP/1.1 (or later 1.x) response, not 1.0.
    pub version_1_1: bool,
    /// Header names and values in order (values trimmed).
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a response head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Over the byte or header-line bound.
    TooLarge(String),
    /// Not an HTTP/1.x response head.
    Malformed(String),
}

impl HeadError {
    /// What was wrong, for the log and the queue row.
    pub fn reason(&self) -> &str {
        match self {
            HeadError::TooLarge(r) | HeadError::Malformed(r) => r,
        }
    }
}

/// Parses a response head from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the head and its length.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let too_large = || HeadError::TooLarge(format!("response head is over {MAX_HEAD_BYTES} bytes"));
    let mut slots = vec![httparse::EMPTY_HEADER; MAX_HEADER_LINES];
    let mut response = httparse::Response::new(&mut slots);
    let parsed = httparse::ParserConfig::default()
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .ignore_invalid_headers_in_responses(true)
        .parse_response(&mut response, buf);
    let len = match parsed {
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => return Err(too_large()),
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooLarge(format!(
                "response has over {MAX_HEADER_LINES} header lines"
            )))
        }
        Err(e) if buf.len() > MAX_HEAD_BYTES => return Err(HeadError::TooLarge(format!("{e}"))),
        Err(httparse::Error::Version) => {
            return Err(HeadError::Malformed(format!(
                "not an HTTP/1.x response: {:?}",
                first_line(buf)
            )))
        }
        Err(e) => {
            return Err(HeadError::Malformed(format!(
                "invalid response head ({e}): {:?}",
                first_line(buf)
            )))
        }
    };
    let headers = response
        .headers
        .iter()
        .map(|h| (h.name.to_string(), unfold(h.value)))
        .collect();
    Ok(Some((
        Head {
            status: response.code.expect("a complete response has a status"),
            version_1_1: response.version != Some(0),
            headers,
        },
        len,
    )))
}

/// A header value with obs-fold line breaks joined by one space, trimmed.
fn unfold(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    let mut out = String::with_capacity(text.len());
    for piece in text.split('\n').map(|p| p.trim_matches([' ', '\t', '\r'])) {
        if piece.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(piece);
    }
    out
}

/// The first line of what the server sent, at most 80 characters, for a reason.
fn first_line(buf: &[u8]) -> String {
    let text = String::from_utf8_lossy(&buf[..buf.len().min(200)]);
    let line = text.trim_start().lines().next().unwrap_or_default();
    line.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn head_parses_with_crlf_or_bare_lf() {
        let (h, len) = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX:  y \r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.header("content-length"), Some("5"));
        assert_eq!(h.header("x"), Some("y"));
        assert_eq!(len, 46);
        let (h, _) = parse_head(b"HTTP/1.0 404 Not Found\nA: b\n\n")
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.header("a")), (404, Some("b")));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n").unwrap(), None);
    }

    #[test]
    fn head_leniencies_match_browsers() {
        let (h, len) = parse_head(
            b"\r\nHTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\n\tc\r\nnot a header\r\nY : z\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.header("x-long"), Some("a b c"));
        assert_eq!(h.header("y"), Some("z"));
        assert_eq!(h.headers.len(), 2);
        assert_eq!(len, 62);
        let (h, _) = parse_head(b"HTTP/1.1 204\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.status, 204);
    }

    #[test]
    fn head_is_bounded_however_its_lines_end() {
        // minreq 3.0.0 underflowed its limit on a long line ending in a bare LF.
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 8190));
        long.push(b'\n');
        long.extend(std::iter::repeat_n(b'b', 40_000));
        assert!(matches!(parse_head(&long), Err(HeadError::TooLarge(_))));
        let lines = |n: usize| -> String {
            std::iter::once("HTTP/1.1 200 OK\r\n".to_string())
                .chain((0..n).map(|i| format!("H{i}: v\r\n")))
                .chain(std::iter::once("\r\n".to_string()))
                .collect()
        };
        // 150 header lines are a head like any other (they failed the URL once).
        let (h, _) = parse_head(lines(150).as_bytes()).unwrap().unwrap();
        assert_eq!((h.headers.len(), h.header("h149")), (150, Some("v")));
        let err = parse_head(lines(MAX_HEADER_LINES + 1).as_bytes()).unwrap_err();
        assert!(matches!(err, HeadError::TooLarge(_)), "{err:?}");
        assert!(err.reason().contains("header lines"));
        assert!(matches!(
            parse_head(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
        let stray = parse_head(b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n").unwrap_err();
        assert!(stray.reason().contains("\"0\""), "{stray:?}");
    }
}
