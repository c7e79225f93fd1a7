//! Response heads: the status line and headers, bounded in bytes and lines (pure).

/// Largest response head (status line and headers); real servers send 1-2 KiB.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most header lines in one response head.
const MAX_HEADER_LINES: usize = 100;

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

/// Parses a response head from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the head and its length. Lines may end in CRLF or a bare
/// LF; the head is bounded in bytes and lines whatever the line endings.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let mut lines = Vec::new();
    let mut start = 0;
    let end = loop {
        let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') else {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(format!("response head is over {MAX_HEAD_BYTES} bytes"));
            }
            return Ok(None);
        };
        let line_end = start + nl;
        if line_end + 1 > MAX_HEAD_BYTES {
            return Err(format!("response head is over {MAX_HEAD_BYTES} bytes"));
        }
        let line = &buf[start..line_end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = line_end + 1;
        if line.is_empty() {
            if lines.is_empty() {
                // Stray blank lines before a status line are tolerated (RFC 9112, 2.2).
                continue;
            }
            break start;
        }
        if lines.len() > MAX_HEADER_LINES {
            return Err(format!("response has over {MAX_HEADER_LINES} header lines"));
        }
        lines.push(line);
    };
    let status_line = String::from_utf8_lossy(lines[0]);
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "not an HTTP/1.x response: {:?}",
            status_line.chars().take(80).collect::<String>()
        ));
    }
    let status = match code.parse::<u16>() {
        Ok(c) if code.len() == 3 && (100..=999).contains(&c) => c,
        _ => return Err(format!("invalid status code {code:?}")),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in &lines[1..] {
        let text = String::from_utf8_lossy(line);
        if text.starts_with([' ', '\t']) {
            // An obsolete folded continuation line: part of the previous value.
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(text.trim());
            }
            continue;
        }
        // A line without a colon is not a header; browsers skip it, so do we.
        if let Some((k, v)) = text.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let version_1_1 = version != "HTTP/1.0";
    Ok(Some((
        Head {
            status,
            version_1_1,
            headers,
        },
        end,
    )))
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
    fn head_is_bounded_however_its_lines_end() {
        // minreq 3.0.0 underflowed its limit on a long line ending in a bare LF.
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 8190));
        long.push(b'\n');
        long.extend(std::iter::repeat_n(b'b', 40_000));
        assert!(parse_head(&long).unwrap_err().contains("over"));
        let many: String = std::iter::once("HTTP/1.1 200 OK\r\n".to_string())
            .chain((0..200).map(|i| format!("H{i}: v\r\n")))
            .collect();
        assert!(parse_head(many.as_bytes())
            .unwrap_err()
            .contains("header lines"));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }
}
