//! One GET in progress as a state machine: dial, TLS handshake, request,
//! head, body; redirects, stall, overall and rate limits, each step bounded.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::body::{check_content_coding, framing, Framing};
use super::conn::{is_wait, Conn};
use super::head::{parse_head, Head, HeadError};
use super::pool::{Origin, Pool};
use super::url::Url;
use super::{
    net_failure, throttle_burst, too_large, Failure, Limits, Progress, MAX_REDIRECTS,
    MIN_SOCKET_WAIT, READ_BUFFER_BYTES,
};
use crate::dial::Dial;
use crate::proxy::{Proxies, Proxy};

/// Where a [`Get`] is.
enum State {
    /// Looking up the host (or the proxy) and connecting.
    Dialing(Dial),
    /// Connected to the proxy: asking it for a tunnel to the https origin
    /// (`CONNECT`), then reading its answer.
    Tunnel {
        /// The socket to the proxy.
        sock: TcpStream,
        /// The CONNECT request.
        request: Vec<u8>,
        /// Bytes of it sent.
        sent: usize,
        /// The proxy's answer so far.
        buf: Vec<u8>,
    },
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
    /// The body had no length and ended when a plain TCP connection closed,
    /// which a cut looks just like.
    ended_by_close: bool,
    /// The proxies in force (a redirect may lead to a host that bypasses them).
    proxies: Proxies,
    /// The proxy the current request goes through, if any.
    via: Option<Proxy>,
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
        let via = pool.proxies().for_host(url.https, &url.host).cloned();
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
            ended_by_close: false,
            via,
            proxies: pool.proxies().clone(),
        };
        get.state = match pool.take(&Origin::of(&get.url, get.via.as_ref())) {
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
            pool.put(Origin::of(&self.url, self.via.as_ref()), conn);
        }
    }

    /// A reused connection failed before any byte of the response, or what
    /// came first was no response head: the server closed it while it was
    /// idle, or left stray bytes on it after the last response. Dial a new
    /// one (once).
    fn stale(&mut self, e: &str) -> Result<State, Failure> {
        if !self.reused {
            return Err(Failure::transient(format!("connection failed: {e}")));
        }
        self.reused = false;
        log::debug!(
            "{}: a kept-alive connection was closed or broken by the server ({e}); reconnecting",
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

    /// Whether the body had no length (neither Content-Length nor chunked)
    /// and ended when a plain-HTTP connection closed: nothing then tells a
    /// cut from the end, and the caller must check the bytes themselves.
    /// (Over HTTPS such a body ends only with the server's close_notify.)
    pub fn ended_by_close(&self) -> bool {
        self.ended_by_close
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
        let (host, port) = match &self.via {
            Some(p) => (&p.host, p.port),
            None => (&self.url.host, self.url.port),
        };
        Ok(State::Dialing(Dial::start_with(
            host,
            port,
            self.limits.stall,
            self.limits.stall.min(left),
            window,
        )))
    }

    fn request(&self) -> Vec<u8> {
        // Through a proxy, plain HTTP asks for the absolute URL (RFC 9112,
        // 3.2.2) and carries the proxy's credentials; https goes through a
        // tunnel, where the request is the same as without a proxy.
        let (target, auth) = match &self.via {
            Some(p) if !self.url.https => (
                format!("http://{}{}", self.url.host_header(), self.url.target),
                p.authorization(),
            ),
            _ => (self.url.target.clone(), None),
        };
        let mut r = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: holosync/{}\r\nAccept: */*\r\nAccept-Encoding: identity\r\n",
            self.url.host_header(),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(auth) = auth {
            let _ = write!(r, "Proxy-Authorization: {auth}\r\n");
        }
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
                            return Err(Failure::transient(match &self.via {
                                Some(p) => format!("could not reach proxy {p}: {e}"),
                                None => format!("connect failed: {e}"),
                            }))
                        }
                        Poll::Ready(Ok(sock)) if self.via.is_some() && self.url.https => {
                            let _ = sock.set_nodelay(true);
                            self.last_progress = Instant::now();
                            self.state = State::Tunnel {
                                sock,
                                request: self.connect_request(),
                                sent: 0,
                                buf: Vec::new(),
                            };
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
                State::Tunnel {
                    sock,
                    request,
                    sent,
                    buf,
                } => match self.tunnel(sock, request, sent, buf, deadline)? {
                    Some(state) => self.state = state,
                    None => return Ok(Progress::Pending),
                },
                State::Sending {
                    mut conn,
                    request,
                    mut sent,
                } => {
                    conn.wait_until(deadline).map_err(net_failure)?;
                    let mut handshake_bytes = 0;
                    let step = conn.handshake(&mut handshake_bytes).and_then(|done| {
                        while done && sent < request.len() {
                            sent += conn.send(&request[sent..])?;
                        }
                        Ok(done)
                    });
                    if handshake_bytes > 0 {
                        // A handshake trickling in is not a stall.
                        self.last_progress = Instant::now();
                    }
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
                    let parsed = match parse_head(&buf) {
                        Err(e) if self.reused => {
                            self.state =
                                self.stale(&format!("no response head: {}", e.reason()))?;
                            continue;
                        }
                        Err(HeadError::TooLarge(e)) => return Err(Failure::transient(e)),
                        Err(HeadError::Malformed(e)) => return Err(Failure::Permanent(e)),
                        Ok(parsed) => parsed,
                    };
                    if let Some((head, len)) = parsed {
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
                    let mut wire = 0;
                    let read = conn.recv(&mut chunk, &mut wire);
                    if wire > 0 {
                        self.last_progress = Instant::now();
                    }
                    match read {
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

    /// `CONNECT host:port` for the https origin, with the proxy's credentials.
    fn connect_request(&self) -> Vec<u8> {
        let authority = format!("{}:{}", self.url.host_bracketed(), self.url.port);
        let mut r = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(auth) = self.via.as_ref().and_then(Proxy::authorization) {
            let _ = write!(r, "Proxy-Authorization: {auth}\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }

    /// Sends the CONNECT and reads the proxy's answer until `deadline`: the
    /// next state (TLS to the origin through the tunnel) once it says 200,
    /// None while it has not answered yet, a transient failure naming the
    /// proxy when it refuses.
    fn tunnel(
        &mut self,
        sock: TcpStream,
        request: Vec<u8>,
        mut sent: usize,
        mut buf: Vec<u8>,
        deadline: Instant,
    ) -> Result<Option<State>, Failure> {
        let proxy = self.via.clone().expect("a tunnel goes through a proxy");
        let fail = |why: String| Failure::transient(format!("proxy {proxy}: {why}"));
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_SOCKET_WAIT);
        sock.set_read_timeout(Some(wait)).map_err(net_failure)?;
        sock.set_write_timeout(Some(wait)).map_err(net_failure)?;
        while sent < request.len() {
            match (&sock).write(&request[sent..]) {
                Ok(n) => sent += n,
                Err(e) if is_wait(&e) => {
                    self.state = State::Tunnel {
                        sock,
                        request,
                        sent,
                        buf,
                    };
                    return Ok(None);
                }
                Err(e) => return Err(fail(format!("sending CONNECT failed: {e}"))),
            }
        }
        loop {
            match parse_head(&buf) {
                Ok(Some((head, len))) => {
                    if head.status == 200 {
                        if len != buf.len() {
                            return Err(fail("sent bytes after its answer to CONNECT".into()));
                        }
                        self.last_progress = Instant::now();
                        let conn = self.wrap(sock)?;
                        return Ok(Some(State::Sending {
                            conn,
                            request: self.request(),
                            sent: 0,
                        }));
                    }
                    let hint = if head.status == 407 {
                        " (it wants other credentials: check proxy.url)"
                    } else {
                        ""
                    };
                    return Err(fail(format!(
                        "refused the tunnel to {}:{} with status {}{hint}",
                        self.url.host, self.url.port, head.status
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(fail(format!("no HTTP answer to CONNECT: {}", e.reason()))),
            }
            let mut chunk = [0u8; 1024];
            match (&sock).read(&mut chunk) {
                Ok(0) => {
                    return Err(fail(
                        "closed the connection instead of answering CONNECT".into(),
                    ))
                }
                Ok(n) => {
                    self.last_progress = Instant::now();
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if is_wait(&e) => {
                    self.state = State::Tunnel {
                        sock,
                        request,
                        sent,
                        buf,
                    };
                    return Ok(None);
                }
                Err(e) => return Err(fail(format!("reading its answer to CONNECT: {e}"))),
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
        if head.status == 407 {
            if let Some(p) = &self.via {
                return Err(Failure::transient(format!(
                    "proxy {p} refused the request with status 407 (it wants other credentials: check proxy.url)"
                )));
            }
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
                self.via = self.proxies.for_host(next.https, &next.host).cloned();
                self.url = next;
                self.reused = false;
                drop(conn);
                return self.dial().map(Some);
            }
        }
        let framing = framing(&head)?;
        if (200..300).contains(&head.status) {
            check_content_coding(&head)?;
        }
        if let Framing::Length(n) = framing {
            if n > self.limits.max_bytes {
                return Err(too_large(self.limits.max_bytes));
            }
        }
        // HTTP/1.1 keeps the connection unless told otherwise; a body that
        // ends with the connection cannot leave it reusable.
        // A length beside chunked is a sign of smuggling: never reuse that.
        let smuggled =
            head.header("transfer-encoding").is_some() && head.header("content-length").is_some();
        self.keep_alive = !matches!(framing, Framing::UntilClose)
            && head.version_1_1
            && !smuggled
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
            let mut wire = 0;
            let read = conn.recv(&mut chunk[..cap], &mut wire);
            if wire > 0 {
                self.last_progress = Instant::now();
            }
            match read {
                Ok(0) => return self.stream_ended(framing, true),
                Ok(n) => {
                    if self.take(framing, &chunk[..n], body)? {
                        return Ok(true);
                    }
                }
                Err(e) if is_wait(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return self.stream_ended(framing, false)
                }
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

    /// The server ended the stream (`clean`: with a TLS close_notify, or a
    /// plain TCP close); true when that completes the body.
    fn stream_ended(&mut self, framing: &Framing, clean: bool) -> Result<bool, Failure> {
        let got = self.received;
        match framing {
            Framing::Empty => Ok(true),
            Framing::UntilClose if clean => {
                // A plain close proves nothing; the caller checks the bytes.
                self.ended_by_close = !self.url.https;
                Ok(true)
            }
            Framing::UntilClose => Err(Failure::transient(format!(
                "short body: the server closed the TLS connection without close_notify after {got} bytes of a body without a length, so it may be cut"
            ))),
            Framing::Length(n) => Err(Failure::transient(format!(
                "short body: got {got} of {n} bytes (Content-Length)"
            ))),
            Framing::Chunked(_) => Err(Failure::transient(format!(
                "short body: the connection closed inside the chunked body after {got} bytes"
            ))),
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
