//! A small HTTP/1.1 GET client made for the one loop: every call to
//! [`Get::step`] does a bounded piece of work (dial, TLS handshake, send,
//! read) and returns by the deadline it is given, so the loop can poll MQTT
//! between slices of even a very long download.
//!
//! Responses are bounded everywhere: the head in bytes and lines, the body by
//! the caller's byte cap, the whole attempt by a stall limit (no byte for
//! that long) and an overall cap. Redirects are followed up to
//! [`MAX_REDIRECTS`]; an `https` page is never redirected to `http`.
//! Parsing (URLs, response heads, chunked bodies) is pure and unit-tested.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::dial::Dial;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// Largest response head (status line and headers); real servers send 1-2 KiB.
const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most header lines in one response head.
const MAX_HEADER_LINES: usize = 100;

/// Longest chunk-size line in a chunked body (hex size plus extensions).
const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// Most bytes of trailer lines after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Bytes read from the socket per read call.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Shortest socket timeout set: a zero timeout means "block forever" to the OS.
const MIN_SOCKET_WAIT: Duration = Duration::from_millis(1);

/// How long an idle kept-alive connection is reused (servers close theirs
/// after 5-75 s; an older one would mostly fail on first use).
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Idle connections kept at most (one per picture server, in practice).
const POOL_MAX: usize = 4;

/// Why a request failed, split by what the queue should do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth another attempt later: network errors, stalls, 5xx, 429, short bodies.
    Transient {
        /// What happened, for the log and the queue row.
        reason: String,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Will not get better by retrying: 4xx, too large, not an image, bad path.
    Permanent(String),
}

impl Failure {
    /// A transient failure without a server-given delay.
    pub fn transient(reason: impl Into<String>) -> Failure {
        Failure::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// The reason, whichever kind.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Transient { reason, .. } | Failure::Permanent(reason) => reason,
        }
    }
}

/// An `http` or `https` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`?
    pub https: bool,
    /// Host name or address, lowercased, without IPv6 brackets.
    pub host: String,
    /// TCP port (80 or 443 unless given).
    pub port: u16,
    /// Path and query as sent in the request line (non-ASCII percent-encoded).
    pub target: String,
}

impl Url {
    /// Parses an absolute `http://` or `https://` URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (scheme, rest) = s.split_once("://").ok_or("not an absolute URL")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(format!("unsupported scheme {scheme:?}")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("URLs with a user name or password are not supported".into());
        }
        let (host, port) = split_host_port(authority)?;
        if host.is_empty() {
            return Err("URL has no host".into());
        }
        if !host.is_ascii() {
            return Err("international host names are not supported (use the xn-- form)".into());
        }
        let path = path.split('#').next().unwrap_or_default();
        let target = if path.is_empty() || path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Url {
            https,
            port: port.unwrap_or(if https { 443 } else { 80 }),
            host: host.to_ascii_lowercase(),
            target: encode_target(&target),
        })
    }

    /// The URL a `Location` header points to, relative to this one.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        let location = location.trim();
        if location.contains("://") {
            return Url::parse(location);
        }
        let scheme = if self.https { "https" } else { "http" };
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{scheme}://{rest}"));
        }
        let target = if location.starts_with('/') {
            location.to_string()
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        let target = target.split('#').next().unwrap_or_default();
        Ok(Url {
            target: encode_target(target),
            ..self.clone()
        })
    }

    /// The `Host` header: the port only when it is not the scheme's default.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.https { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = |p: &str| format!("invalid port {p:?}");
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in the host")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("unexpected {after:?} after the host")),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, "")) => Ok((host, None)),
        Some((host, p)) => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
        None => Ok((authority, None)),
    }
}

/// Percent-encodes what may not appear raw in a request line (non-ASCII and
/// control bytes); existing escapes are kept as they are.
fn encode_target(target: &str) -> String {
    let mut out = String::with_capacity(target.len());
    for b in target.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

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

/// How the body of a response is delimited.
#[derive(Debug, PartialEq)]
enum Framing {
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
fn framing(head: &Head) -> Result<Framing, String> {
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

/// Limits of one GET, including its redirects.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest time without a byte (or a connect) before the attempt fails.
    pub stall: Duration,
    /// Longest time the whole attempt may take.
    pub max_time: Duration,
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Read the body no faster than this (bytes per second); None: as fast as it comes.
    pub max_bytes_per_sec: Option<u64>,
}

/// Bytes the throttle lets through at once (a tenth of a second's worth, at
/// least one read's worth of a slow link).
fn throttle_burst(rate: u64) -> u64 {
    (rate / 10).max(4096)
}

/// What one [`Get::step`] achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing new yet (waiting for the network).
    Pending,
    /// The final response head is in: see [`Get::head`].
    Head,
    /// This many body bytes were appended.
    Body(usize),
    /// The body is complete.
    End,
}

/// A socket, plain or wrapped in TLS.
enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(Box<(rustls::ClientConnection, TcpStream)>),
}

/// A read that found nothing yet (socket timeouts are WouldBlock on Unix and TimedOut on Windows).
fn is_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Conn {
    fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Tls(t) => &t.1,
        }
    }

    /// Lets the next socket call wait at most until `deadline`.
    fn wait_until(&self, deadline: Instant) -> io::Result<()> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_SOCKET_WAIT);
        self.socket().set_read_timeout(Some(wait))?;
        self.socket().set_write_timeout(Some(wait))
    }

    /// Drives the TLS handshake; true once it is done (plain sockets: at once).
    fn handshake(&mut self) -> io::Result<bool> {
        match self {
            Conn::Plain(_) => Ok(true),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                while conn.is_handshaking() {
                    if conn.wants_write() {
                        conn.write_tls(sock)?;
                    } else if conn.wants_read() {
                        if conn.read_tls(sock)? == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "server closed the connection during the TLS handshake",
                            ));
                        }
                        conn.process_new_packets().map_err(tls_error)?;
                    } else {
                        break;
                    }
                }
                Ok(!conn.is_handshaking())
            }
        }
    }

    /// Writes some of `buf`; returns how much was taken.
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                // rustls buffers the plaintext; it goes out with write_tls.
                let n = conn.writer().write(buf)?;
                while conn.wants_write() {
                    conn.write_tls(sock)?;
                }
                Ok(n)
            }
        }
    }

    /// Reads what is there (0 at the end of the stream).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                loop {
                    match conn.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    while conn.wants_write() {
                        conn.write_tls(sock)?;
                    }
                    if conn.read_tls(sock)? == 0 {
                        // The server closed without close_notify: an end of
                        // stream all the same (the body framing tells whether
                        // anything is missing).
                        conn.process_new_packets().map_err(tls_error)?;
                        return match conn.reader().read(buf) {
                            Ok(n) => Ok(n),
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                            Err(e) => Err(e),
                        };
                    }
                    conn.process_new_packets().map_err(tls_error)?;
                }
            }
        }
    }
}

#[cfg(feature = "tls")]
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// Where a connection goes: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    /// TLS?
    https: bool,
    /// Host name or address.
    host: String,
    /// Port.
    port: u16,
}

impl Origin {
    fn of(url: &Url) -> Origin {
        Origin {
            https: url.https,
            host: url.host.clone(),
            port: url.port,
        }
    }
}

/// Connections kept open between requests to the same server (HTTP/1.1
/// keep-alive), as curl and browsers do: a drain of many pictures from one
/// server pays for one connect (and one TLS handshake), not one each.
#[derive(Default)]
pub struct Pool {
    /// Idle connections, oldest first, with when they became idle.
    idle: Vec<(Origin, Conn, Instant)>,
}

impl Pool {
    /// An idle connection to `origin` that is not too old, if there is one.
    fn take(&mut self, origin: &Origin) -> Option<Conn> {
        self.idle
            .retain(|(_, _, since)| since.elapsed() < POOL_IDLE);
        let i = self.idle.iter().rposition(|(o, _, _)| o == origin)?;
        Some(self.idle.remove(i).1)
    }

    /// Keeps `conn` for the next request to `origin`.
    fn put(&mut self, origin: Origin, conn: Conn) {
        if self.idle.len() >= POOL_MAX {
            self.idle.remove(0);
        }
        self.idle.push((origin, conn, Instant::now()));
    }
}

/// Where a [`Get`] is.
enum State {
    /// Looking up the host and connecting.
    Dialing(Dial),
    /// Connected: TLS handshake (if any), then the request bytes.
    Sending {
        /// The connection.
        conn: Conn,
        /// The request.
        request: Vec<u8>,
        /// Bytes of it sent.
        sent: usize,
    },
    /// Reading the response head.
    Head {
        /// The connection.
        conn: Conn,
        /// Bytes read so far (may run past the head).
        buf: Vec<u8>,
    },
    /// Reading the body.
    Body {
        /// The connection.
        conn: Conn,
        /// How the body ends.
        framing: Framing,
        /// Bytes read past the head before the body state began.
        pending: Vec<u8>,
    },
    /// Finished (or failed).
    Done,
}

/// One GET in progress, redirects included.
pub struct Get {
    /// The URL being fetched now (after redirects).
    url: Url,
    /// Extra request headers (`Range`, `If-None-Match`, ...).
    extra: Vec<(&'static str, String)>,
    /// The limits.
    limits: Limits,
    /// Redirects followed so far.
    redirects: usize,
    /// Where the request is.
    state: State,
    /// The final response head, once in.
    head: Option<Head>,
    /// When the attempt began.
    started: Instant,
    /// When a byte last arrived (or the attempt began).
    last_progress: Instant,
    /// Body bytes received.
    received: u64,
    /// When the body began (the throttle counts from here).
    body_started: Instant,
    /// The connection came from the pool: if it fails before any byte of a
    /// response, the server had closed it meanwhile, and a new one is dialed.
    reused: bool,
    /// The server may keep the connection open after this response.
    keep_alive: bool,
    /// The connection, once the response is complete and it can be reused.
    idle: Option<Conn>,
}

impl Get {
    /// Starts a GET of `url` with `extra` request headers, on an idle
    /// connection from `pool` if there is one to the same server.
    pub fn start(
        url: &str,
        extra: Vec<(&'static str, String)>,
        limits: Limits,
        pool: &mut Pool,
    ) -> Result<Get, Failure> {
        let url = Url::parse(url).map_err(Failure::Permanent)?;
        let now = Instant::now();
        let mut get = Get {
            state: State::Done,
            url,
            extra,
            limits,
            redirects: 0,
            head: None,
            started: now,
            last_progress: now,
            received: 0,
            body_started: now,
            reused: false,
            keep_alive: false,
            idle: None,
        };
        get.state = match pool.take(&Origin::of(&get.url)) {
            Some(conn) => {
                get.reused = true;
                State::Sending {
                    conn,
                    request: get.request(),
                    sent: 0,
                }
            }
            None => get.dial()?,
        };
        Ok(get)
    }

    /// Gives the connection back to `pool` if the response is complete and
    /// the server keeps it open.
    pub fn release(&mut self, pool: &mut Pool) {
        if let Some(conn) = self.idle.take() {
            pool.put(Origin::of(&self.url), conn);
        }
    }

    /// A reused connection failed before any byte of the response: the
    /// server closed it while it was idle. Dial a new one (once).
    fn stale(&mut self, e: &str) -> Result<State, Failure> {
        if !self.reused {
            return Err(Failure::transient(format!("connection failed: {e}")));
        }
        self.reused = false;
        log::debug!(
            "{}: a kept-alive connection was closed by the server ({e}); reconnecting",
            self.url.host
        );
        self.dial()
    }

    /// The URL fetched now (the last redirect's target).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The final response head, once [`Progress::Head`] was returned.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// Body bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether the whole body is in (the next [`Get::step`] says `End`).
    pub fn finished(&self) -> bool {
        self.head.is_some() && matches!(self.state, State::Done)
    }

    /// The body length the server announced, if any.
    pub fn content_length(&self) -> Option<u64> {
        match &self.state {
            State::Body {
                framing: Framing::Length(n),
                ..
            } => Some(*n),
            _ => None,
        }
    }

    fn dial(&self) -> Result<State, Failure> {
        if self.url.https && !cfg!(feature = "tls") {
            return Err(Failure::Permanent(
                "HTTPS support is not compiled into this build".into(),
            ));
        }
        let left = self
            .limits
            .max_time
            .saturating_sub(self.started.elapsed())
            .max(MIN_SOCKET_WAIT);
        // Throttled, a small receive window makes the server send no faster
        // than we read (else the kernel would buffer megabytes at link speed).
        let window = self.limits.max_bytes_per_sec.map(|r| {
            usize::try_from(r / 4)
                .unwrap_or(usize::MAX)
                .clamp(16 << 10, 256 << 10)
        });
        Ok(State::Dialing(Dial::start_with(
            &self.url.host,
            self.url.port,
            self.limits.stall,
            self.limits.stall.min(left),
            window,
        )))
    }

    fn request(&self) -> Vec<u8> {
        let mut r = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: holosync/{}\r\nAccept: */*\r\n",
            self.url.target,
            self.url.host_header(),
            env!("CARGO_PKG_VERSION")
        );
        for (k, v) in &self.extra {
            let _ = write!(r, "{k}: {v}\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    /// Does a bounded piece of work and returns by `deadline` (plus a few ms
    /// at most); body bytes are appended to `body`.
    pub fn step(&mut self, body: &mut Vec<u8>, deadline: Instant) -> Result<Progress, Failure> {
        let result = self.advance(body, deadline);
        if result.is_err() {
            self.state = State::Done;
        }
        result
    }

    fn advance(&mut self, body: &mut Vec<u8>, deadline: Instant) -> Result<Progress, Failure> {
        let now = Instant::now();
        if now.duration_since(self.started) > self.limits.max_time {
            return Err(Failure::transient(format!(
                "took longer than {} s (download.max_secs); {} bytes received",
                self.limits.max_time.as_secs(),
                self.received
            )));
        }
        if now.duration_since(self.last_progress) > self.limits.stall {
            return Err(Failure::transient(format!(
                "stalled: nothing received for {} s (download.timeout_secs); {} bytes received",
                self.limits.stall.as_secs(),
                self.received
            )));
        }
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return Ok(Progress::End),
                State::Dialing(mut dial) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match dial.poll(wait) {
                        Poll::Pending => {
                            self.state = State::Dialing(dial);
                            return Ok(Progress::Pending);
                        }
                        Poll::Ready(Err(e)) => {
                            return Err(Failure::transient(format!("connect failed: {e}")))
                        }
                        Poll::Ready(Ok(sock)) => {
                            let _ = sock.set_nodelay(true);
                            self.last_progress = Instant::now();
                            let conn = self.wrap(sock)?;
                            let request = self.request();
                            self.state = State::Sending {
                                conn,
                                request,
                                sent: 0,
                            };
                        }
                    }
                }
                State::Sending {
                    mut conn,
                    request,
                    mut sent,
                } => {
                    conn.wait_until(deadline).map_err(net_failure)?;
                    let step = conn.handshake().and_then(|done| {
                        while done && sent < request.len() {
                            sent += conn.send(&request[sent..])?;
                        }
                        Ok(done)
                    });
                    match step {
                        Ok(true) if sent == request.len() => {
                            self.last_progress = Instant::now();
                            self.state = State::Head {
                                conn,
                                buf: Vec::new(),
                            };
                        }
                        Ok(_) => {
                            self.state = State::Sending {
                                conn,
                                request,
                                sent,
                            };
                            return Ok(Progress::Pending);
                        }
                        Err(e) if is_wait(&e) => {
                            self.state = State::Sending {
                                conn,
                                request,
                                sent,
                            };
                            return Ok(Progress::Pending);
                        }
                        Err(e) => self.state = self.stale(&e.to_string())?,
                    }
                }
                State::Head { mut conn, mut buf } => {
                    if let Some((head, len)) = parse_head(&buf).map_err(Failure::Permanent)? {
                        let pending = buf.split_off(len);
                        if let Some(next) = self.after_head(head, conn, pending)? {
                            self.state = next;
                            if self.head.is_some() {
                                return Ok(Progress::Head);
                            }
                        }
                        continue;
                    }
                    if Instant::now() >= deadline {
                        self.state = State::Head { conn, buf };
                        return Ok(Progress::Pending);
                    }
                    conn.wait_until(deadline).map_err(net_failure)?;
                    let mut chunk = vec![0u8; 8192];
                    match conn.recv(&mut chunk) {
                        Ok(0) if buf.is_empty() && self.reused => {
                            self.state = self.stale("closed")?;
                        }
                        Ok(0) => {
                            return Err(Failure::transient(if buf.is_empty() {
                                "server closed the connection without a response".to_string()
                            } else {
                                "server closed the connection inside the response head".to_string()
                            }))
                        }
                        Ok(n) => {
                            self.last_progress = Instant::now();
                            buf.extend_from_slice(&chunk[..n]);
                            self.state = State::Head { conn, buf };
                        }
                        Err(e) if is_wait(&e) => {
                            self.state = State::Head { conn, buf };
                            return Ok(Progress::Pending);
                        }
                        Err(e) if buf.is_empty() => self.state = self.stale(&e.to_string())?,
                        Err(e) => return Err(net_failure(e)),
                    }
                }
                State::Body {
                    mut conn,
                    mut framing,
                    pending,
                } => {
                    let before = body.len();
                    let result = self.read_body(&mut conn, &mut framing, pending, body, deadline);
                    let appended = body.len() - before;
                    match result? {
                        true => {
                            if self.keep_alive {
                                self.idle = Some(conn);
                            }
                            return Ok(if appended > 0 {
                                // Report the bytes; the next step reports the end.
                                Progress::Body(appended)
                            } else {
                                Progress::End
                            });
                        }
                        false => {
                            self.state = State::Body {
                                conn,
                                framing,
                                pending: Vec::new(),
                            };
                            return Ok(if appended > 0 {
                                Progress::Body(appended)
                            } else {
                                Progress::Pending
                            });
                        }
                    }
                }
            }
        }
    }

    #[cfg(feature = "tls")]
    fn wrap(&self, sock: TcpStream) -> Result<Conn, Failure> {
        if !self.url.https {
            return Ok(Conn::Plain(sock));
        }
        let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
            .map_err(|e| Failure::Permanent(format!("invalid TLS server name: {e}")))?;
        let config =
            crate::tls::client_config().map_err(|e| Failure::transient(format!("TLS: {e}")))?;
        let conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| Failure::transient(format!("TLS: {e}")))?;
        Ok(Conn::Tls(Box::new((conn, sock))))
    }

    #[cfg(not(feature = "tls"))]
    fn wrap(&self, sock: TcpStream) -> Result<Conn, Failure> {
        Ok(Conn::Plain(sock))
    }

    /// Handles a complete head: redirects and 1xx lead to a new state, the
    /// final head to the body. None means "read on" (the state is set).
    fn after_head(
        &mut self,
        head: Head,
        conn: Conn,
        pending: Vec<u8>,
    ) -> Result<Option<State>, Failure> {
        if (100..200).contains(&head.status) {
            // 100 Continue and friends: the real head follows.
            return Ok(Some(State::Head { conn, buf: pending }));
        }
        if matches!(head.status, 301 | 302 | 303 | 307 | 308) {
            if let Some(location) = head.header("location") {
                if self.redirects >= MAX_REDIRECTS {
                    return Err(Failure::Permanent(format!(
                        "too many redirects (more than {MAX_REDIRECTS})"
                    )));
                }
                let next = self
                    .url
                    .join(location)
                    .map_err(|e| Failure::Permanent(format!("bad redirect: {e}")))?;
                if self.url.https && !next.https {
                    return Err(Failure::Permanent(format!(
                        "refused a redirect from https to http ({location})"
                    )));
                }
                self.redirects += 1;
                self.url = next;
                drop(conn);
                return self.dial().map(Some);
            }
        }
        let framing = framing(&head).map_err(Failure::Permanent)?;
        if let Framing::Length(n) = framing {
            if n > self.limits.max_bytes {
                return Err(too_large(self.limits.max_bytes));
            }
        }
        // HTTP/1.1 keeps the connection unless told otherwise; a body that
        // ends with the connection cannot leave it reusable.
        self.keep_alive = !matches!(framing, Framing::UntilClose)
            && head.version_1_1
            && !head
                .header("connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
        self.head = Some(head);
        self.body_started = Instant::now();
        Ok(Some(State::Body {
            conn,
            framing,
            pending,
        }))
    }

    /// Reads body bytes until `deadline`; true when the body is complete.
    fn read_body(
        &mut self,
        conn: &mut Conn,
        framing: &mut Framing,
        pending: Vec<u8>,
        body: &mut Vec<u8>,
        deadline: Instant,
    ) -> Result<bool, Failure> {
        if self.take(framing, &pending, body)? {
            return Ok(true);
        }
        let mut chunk = vec![0u8; READ_BUFFER_BYTES];
        conn.wait_until(deadline).map_err(net_failure)?;
        loop {
            let cap = match self.allowance() {
                None => chunk.len(),
                Some(0) => {
                    // Ahead of the throttle: wait for it (not a stall), within the slice.
                    let wait = self
                        .until_allowed()
                        .min(deadline.saturating_duration_since(Instant::now()));
                    std::thread::sleep(wait);
                    self.last_progress = Instant::now();
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                    continue;
                }
                Some(n) => chunk.len().min(usize::try_from(n).unwrap_or(usize::MAX)),
            };
            match conn.recv(&mut chunk[..cap]) {
                Ok(0) => {
                    return match framing {
                        Framing::UntilClose | Framing::Empty => Ok(true),
                        Framing::Length(n) => Err(Failure::transient(format!(
                            "short body: got {} of {n} bytes (Content-Length)",
                            self.received
                        ))),
                        Framing::Chunked(_) => Err(Failure::transient(format!(
                        "short body: the connection closed inside the chunked body after {} bytes",
                        self.received
                    ))),
                    }
                }
                Ok(n) => {
                    self.last_progress = Instant::now();
                    if self.take(framing, &chunk[..n], body)? {
                        return Ok(true);
                    }
                }
                Err(e) if is_wait(&e) => return Ok(false),
                Err(e) => {
                    return Err(Failure::transient(format!(
                        "reading the body failed after {} bytes: {e}",
                        self.received
                    )))
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Body bytes the throttle allows now beyond those received; None when unthrottled.
    fn allowance(&self) -> Option<u64> {
        let rate = self.limits.max_bytes_per_sec?;
        let allowed =
            (rate as f64 * self.body_started.elapsed().as_secs_f64()) as u64 + throttle_burst(rate);
        Some(allowed.saturating_sub(self.received))
    }

    /// How long until the throttle allows another read's worth.
    fn until_allowed(&self) -> Duration {
        let Some(rate) = self.limits.max_bytes_per_sec.filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        let want = self.received + 1024 - throttle_burst(rate).min(self.received + 1024);
        let at = Duration::from_secs_f64(want as f64 / rate as f64);
        at.saturating_sub(self.body_started.elapsed())
            .max(MIN_SOCKET_WAIT)
    }

    /// Adds `data` to the body as the framing says; true when the body is complete.
    fn take(
        &mut self,
        framing: &mut Framing,
        data: &[u8],
        body: &mut Vec<u8>,
    ) -> Result<bool, Failure> {
        let before = body.len();
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(n) => {
                let want = usize::try_from(*n - self.received).unwrap_or(usize::MAX);
                if data.len() > want {
                    // Bytes past the body: the connection is not clean.
                    self.keep_alive = false;
                }
                body.extend_from_slice(&data[..data.len().min(want)]);
                self.received + (body.len() - before) as u64 == *n
            }
            Framing::UntilClose => {
                body.extend_from_slice(data);
                false
            }
            Framing::Chunked(c) => {
                let used = c.feed(data, body).map_err(Failure::transient)?;
                if used < data.len() {
                    self.keep_alive = false;
                }
                c.is_done()
            }
        };
        self.received += (body.len() - before) as u64;
        if self.received > self.limits.max_bytes {
            return Err(too_large(self.limits.max_bytes));
        }
        Ok(done)
    }
}

/// The body is over the cap.
pub fn too_large(max: u64) -> Failure {
    Failure::Permanent(format!(
        "too large: body over download.max_bytes ({max} bytes)"
    ))
}

/// A socket or TLS error, worth another attempt.
fn net_failure(e: io::Error) -> Failure {
    Failure::transient(format!("connection failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_request_parts() {
        let u = Url::parse("https://B.oss-cn.aliyuncs.com/works/12/a.jpg!preview?x=1#f").unwrap();
        assert_eq!(
            u,
            Url {
                https: true,
                host: "b.oss-cn.aliyuncs.com".into(),
                port: 443,
                target: "/works/12/a.jpg!preview?x=1".into()
            }
        );
        let u = Url::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(u.host_header(), "[::1]:8080");
        assert_eq!(Url::parse("http://h/é.jpg").unwrap().target, "/%C3%A9.jpg");
        assert!(Url::parse("http://user:pw@h/a.jpg").is_err());
        assert!(Url::parse("http://h:99999/a.jpg").is_err());
        assert!(Url::parse("ftp://h/a.jpg").is_err());
        assert!(Url::parse("http://bücher.de/a.jpg").is_err());
    }

    #[test]
    fn locations_resolve_against_the_current_url() {
        let base = Url::parse("https://h.com/a/b/c.jpg?q").unwrap();
        assert_eq!(base.join("d.jpg").unwrap().target, "/a/b/d.jpg");
        assert_eq!(base.join("/x.jpg").unwrap().target, "/x.jpg");
        let other = base.join("//cdn.com/y.jpg").unwrap();
        assert_eq!((other.https, other.host.as_str()), (true, "cdn.com"));
        assert!(!base.join("http://h.com/z.jpg").unwrap().https);
    }

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
