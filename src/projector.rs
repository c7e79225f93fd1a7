//! Projector protocols (raw TCP and PJLink class 1) as small state machines
//! over any `Read + Write` that move bytes whenever they can, and the TCP side:
//! a dial off the loop, then the exchange on a non-blocking socket, with a
//! deadline for all of it.
//!
//! A message's projectors are driven at once: every dial starts together, and
//! each step moves whatever bytes every connected projector can take without
//! waiting, so a batch takes at most its connect and I/O timeouts however many
//! projectors are dead, and a sync message arriving meanwhile is queued within
//! one turn. Messages wait in a short queue, and one that waited longer than
//! `projector.max_age_ms` is dropped rather than sent late.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::config::{self, Protocol};
use crate::dial::Dial;
use crate::message::{self, Target};

/// Time allowed for looking up a projector's host name, on top of the connect timeout.
const LOOKUP_ALLOWANCE: Duration = Duration::from_secs(3);

/// Reply bytes read from a raw projector before we stop listening.
const MAX_RAW_REPLY_BYTES: usize = 4096;

/// Longest PJLink line (the spec's limit is 136 bytes; leave room).
const MAX_PJLINK_LINE_BYTES: usize = 512;

/// Reply bytes shown in a log line.
const MAX_LOGGED_REPLY_BYTES: usize = 200;

/// Projector messages waiting behind the one in progress. Past this the
/// oldest is dropped: a kiosk flooded with power commands should act on the
/// latest ones, not on a backlog.
pub const MAX_WAITING_BATCHES: usize = 8;

/// Projector messages in progress and waiting, oldest first.
#[derive(Default)]
pub struct Projectors {
    /// The message being sent.
    current: Option<Batch>,
    /// Messages waiting, with when each arrived.
    waiting: VecDeque<Batch>,
}

impl Projectors {
    /// Queues a message; drops the oldest waiting one (with a log line) if
    /// the queue is full.
    pub fn push(&mut self, batch: Batch) {
        if self.waiting.len() >= MAX_WAITING_BATCHES {
            let old = self.waiting.pop_front().expect("the queue is full");
            log::warn!(
                "dropped projector command {:?} for {} projectors: {MAX_WAITING_BATCHES} newer projector messages are waiting",
                old.command,
                old.targets.len()
            );
        }
        self.waiting.push_back(batch);
    }

    /// Whether anything is in progress or waiting (work the loop must not wait on).
    pub fn busy(&self) -> bool {
        self.current.is_some() || !self.waiting.is_empty()
    }

    /// How many messages are in progress or waiting.
    pub fn count(&self) -> usize {
        self.waiting.len() + usize::from(self.current.is_some())
    }

    /// Works on the message in progress (taking the next one that is not too
    /// old); returns it once every projector is handled.
    pub fn step(&mut self, defaults: &config::Projector) -> Option<Batch> {
        if self.current.is_none() {
            let max_age = Duration::from_millis(defaults.max_age_ms);
            while let Some(batch) = self.waiting.pop_front() {
                let age = batch.arrived.elapsed();
                if age <= max_age {
                    self.current = Some(batch);
                    break;
                }
                log::warn!(
                    "dropped projector command {:?} for {} projectors: it waited {} ms, over projector.max_age_ms ({}); a late command is not sent",
                    batch.command,
                    batch.targets.len(),
                    age.as_millis(),
                    defaults.max_age_ms
                );
            }
        }
        let batch = self.current.as_mut()?;
        if batch.step(defaults) {
            return self.current.take();
        }
        None
    }
}

/// One projector message in progress: every projector's attempt, driven
/// together, and the results so far.
pub struct Batch {
    /// The command as it came in the message.
    command: String,
    /// When the message arrived.
    arrived: Instant,
    /// The projectors, in the message's order.
    targets: Vec<Target>,
    /// Each projector's attempt, once started; None when finished.
    attempts: Vec<Option<Attempt>>,
    /// Each projector's result, once finished.
    results: Vec<Option<Outcome>>,
}

/// What happened at one projector.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    /// `host:port`.
    pub projector: String,
    /// The command went through and the projector did not report an error.
    pub ok: bool,
    /// The reply in words, or the error.
    pub reply: String,
    /// Milliseconds spent.
    pub ms: u64,
}

/// Parses a projector message into a batch; a bad message is logged and gives None.
pub fn parse_batch(payload: &[u8], defaults: &config::Projector) -> Option<Batch> {
    match message::parse_projector(payload, defaults) {
        Ok(req) => Some(Batch {
            command: req.command,
            arrived: Instant::now(),
            targets: req.targets,
            attempts: Vec::new(),
            results: Vec::new(),
        }),
        Err(e) => {
            log::warn!(
                "ignored projector message {:?}: {e}; nothing sent",
                escape(&payload[..payload.len().min(MAX_LOGGED_REPLY_BYTES)])
            );
            None
        }
    }
}

impl Batch {
    /// Starts every projector's attempt at the first call, then moves what
    /// bytes each can take without waiting; true when every one is handled.
    pub fn step(&mut self, defaults: &config::Projector) -> bool {
        if self.attempts.is_empty() {
            self.attempts = self
                .targets
                .iter()
                .map(|t| Some(Attempt::start(t.clone(), &self.command, defaults)))
                .collect();
            self.results = self.targets.iter().map(|_| None).collect();
        }
        let mut done = true;
        for (slot, result) in self.attempts.iter_mut().zip(&mut self.results) {
            let Some(attempt) = slot else { continue };
            match attempt.step() {
                Poll::Pending => done = false,
                Poll::Ready(r) => {
                    let attempt = slot.take().expect("matched above");
                    *result = Some(attempt.outcome(&self.command, r));
                }
            }
        }
        done
    }

    /// The results as one JSON object, for `projector.result_topic`.
    pub fn report(&self) -> String {
        let results: Vec<&Outcome> = self.results.iter().flatten().collect();
        serde_json::json!({"command": self.command, "results": results}).to_string()
    }
}

/// The conversation with one projector, either protocol.
enum Exchange {
    /// Raw bytes and a reply.
    Raw(RawExchange),
    /// PJLink class 1.
    Pjlink(PjlinkExchange),
}

impl Exchange {
    /// Moves bytes; `Ready` with the result in words.
    fn step<S: Read + Write>(&mut self, s: &mut S) -> Poll<Result<String, String>> {
        match self {
            Exchange::Raw(x) => match x.step(s) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => Poll::Ready(raw_words(r)),
            },
            Exchange::Pjlink(x) => x.step(s),
        }
    }

    /// The result when the I/O deadline has passed.
    fn time_up(&mut self) -> Result<String, String> {
        match self {
            Exchange::Raw(x) => raw_words(x.time_up()),
            Exchange::Pjlink(x) => Err(x.time_up()),
        }
    }
}

/// A raw exchange's result in words.
fn raw_words(r: io::Result<Option<Vec<u8>>>) -> Result<String, String> {
    match r {
        Ok(Some(r)) if !r.is_empty() => Ok(format!("reply {:?}", escape(&r))),
        Ok(_) => Ok("sent, no reply".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Where the TCP side of one projector is.
enum Phase {
    /// The command could not be built: nothing to send.
    Refused(String),
    /// Looking up and connecting.
    Dialing(Dial, Exchange),
    /// Connected (a non-blocking socket): the exchange runs until `until`.
    Talking {
        /// The connection.
        stream: TcpStream,
        /// The conversation.
        exchange: Exchange,
        /// The I/O deadline.
        until: Instant,
    },
}

/// One projector being talked to.
struct Attempt {
    /// The projector.
    target: Target,
    /// When this projector's turn began.
    started: Instant,
    /// Where it is.
    phase: Option<Phase>,
    /// Time allowed for the exchange once connected.
    io_timeout: Duration,
}

impl Attempt {
    /// Builds the bytes first (a bad command is an error without touching the
    /// network), then starts dialing.
    fn start(target: Target, command: &str, defaults: &config::Projector) -> Attempt {
        let exchange = match target.protocol {
            Protocol::Raw => raw_payload(command, &defaults.terminator).map(|bytes| {
                Exchange::Raw(RawExchange::new(bytes, defaults.terminator.as_bytes()))
            }),
            Protocol::Pjlink => pjlink_line(command).map(|line| {
                let password = target.password.as_ref().map(|p| p.expose().to_string());
                Exchange::Pjlink(PjlinkExchange::new(line, password))
            }),
        };
        let connect_timeout = Duration::from_millis(defaults.connect_timeout_ms);
        let phase = match exchange {
            Ok(exchange) => Phase::Dialing(
                Dial::start(
                    &target.host,
                    target.port,
                    connect_timeout,
                    connect_timeout + LOOKUP_ALLOWANCE,
                ),
                exchange,
            ),
            Err(e) => Phase::Refused(e),
        };
        Attempt {
            target,
            started: Instant::now(),
            phase: Some(phase),
            io_timeout: Duration::from_millis(defaults.io_timeout_ms),
        }
    }

    /// Moves the attempt on without waiting.
    fn step(&mut self) -> Poll<Result<String, String>> {
        loop {
            match self.phase.take().expect("stepped after the end") {
                Phase::Refused(e) => return Poll::Ready(Err(e)),
                Phase::Dialing(mut dial, exchange) => match dial.poll(Duration::ZERO) {
                    Poll::Pending => {
                        self.phase = Some(Phase::Dialing(dial, exchange));
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("connect failed: {e}"))),
                    Poll::Ready(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        if let Err(e) = stream.set_nonblocking(true) {
                            return Poll::Ready(Err(e.to_string()));
                        }
                        self.phase = Some(Phase::Talking {
                            stream,
                            exchange,
                            until: Instant::now() + self.io_timeout,
                        });
                    }
                },
                Phase::Talking {
                    mut stream,
                    mut exchange,
                    until,
                } => {
                    if let Poll::Ready(r) = exchange.step(&mut stream) {
                        return Poll::Ready(r);
                    }
                    if Instant::now() >= until {
                        return Poll::Ready(exchange.time_up());
                    }
                    self.phase = Some(Phase::Talking {
                        stream,
                        exchange,
                        until,
                    });
                    return Poll::Pending;
                }
            }
        }
    }

    /// Logs one line about this projector and makes its result.
    fn outcome(self, command: &str, result: Result<String, String>) -> Outcome {
        let ms = self.started.elapsed().as_millis() as u64;
        let protocol = match self.target.protocol {
            Protocol::Raw => "raw",
            Protocol::Pjlink => "pjlink",
        };
        let address = self.target.address();
        let (ok, reply) = match result {
            Ok(words) => {
                log::info!("projector {address} ({protocol}) {command:?}: {words} ({ms} ms)");
                (true, words)
            }
            Err(e) => {
                log::warn!("projector {address} ({protocol}) {command:?}: failed: {e} ({ms} ms)");
                (false, e)
            }
        };
        Outcome {
            projector: address,
            ok,
            reply,
            ms,
        }
    }
}

/// A socket read or write that found nothing to do yet.
fn is_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A raw exchange: write the payload, then read a reply until the
/// terminator's last byte or LF, the peer closing, or `MAX_RAW_REPLY_BYTES`.
/// No reply is fine.
pub struct RawExchange {
    /// The bytes to send.
    payload: Vec<u8>,
    /// Bytes of it sent.
    sent: usize,
    /// The byte that ends a reply (besides LF).
    end: u8,
    /// The reply so far.
    reply: Vec<u8>,
}

impl RawExchange {
    /// An exchange sending `payload`; replies end at `terminator`'s last byte or LF.
    pub fn new(payload: Vec<u8>, terminator: &[u8]) -> RawExchange {
        RawExchange {
            payload,
            sent: 0,
            end: *terminator.last().unwrap_or(&b'\r'),
            reply: Vec::new(),
        }
    }

    /// Moves bytes until the peer has nothing more for now (`Pending`) or the
    /// exchange is over: the reply (None if there was none).
    pub fn step<S: Read + Write>(&mut self, s: &mut S) -> Poll<io::Result<Option<Vec<u8>>>> {
        while self.sent < self.payload.len() {
            match s.write(&self.payload[self.sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if is_wait(&e) => return Poll::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if let Err(e) = s.flush() {
            return Poll::Ready(Err(e));
        }
        let mut buf = [0u8; 512];
        while self.reply.len() < MAX_RAW_REPLY_BYTES {
            match s.read(&mut buf) {
                Ok(0) => return Poll::Ready(Ok(self.take_reply())),
                Ok(n) => {
                    let n = n.min(MAX_RAW_REPLY_BYTES - self.reply.len());
                    if let Some(pos) = buf[..n].iter().position(|&b| b == self.end || b == b'\n') {
                        self.reply.extend_from_slice(&buf[..pos]);
                        return Poll::Ready(Ok(Some(std::mem::take(&mut self.reply))));
                    }
                    self.reply.extend_from_slice(&buf[..n]);
                }
                Err(e) if is_wait(&e) => return Poll::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(self.take_reply()))
    }

    /// The result when time is up: what came of a reply, or an error if the
    /// command itself did not go out.
    pub fn time_up(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.sent < self.payload.len() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "projector I/O timed out",
            ));
        }
        Ok(self.take_reply())
    }

    fn take_reply(&mut self) -> Option<Vec<u8>> {
        let reply = std::mem::take(&mut self.reply);
        (!reply.is_empty()).then_some(reply)
    }
}

/// Writes `payload` and reads a reply over a blocking stream (tests and
/// fuzzing: an in-memory peer never makes the exchange wait).
pub fn raw_exchange<S: Read + Write>(
    s: &mut S,
    payload: &[u8],
    terminator: &[u8],
) -> io::Result<Option<Vec<u8>>> {
    let mut x = RawExchange::new(payload.to_vec(), terminator);
    match x.step(s) {
        Poll::Ready(r) => r,
        Poll::Pending => x.time_up(),
    }
}

/// Where a PJLink exchange is.
#[derive(Debug, PartialEq)]
enum PjlinkPhase {
    /// Waiting for `PJLINK 0` or `PJLINK 1 <random>`.
    Greeting,
    /// Sending the (digest-prefixed) command line.
    Sending,
    /// Waiting for the reply line.
    Reply,
}

/// A PJLink class 1 exchange: greeting, MD5 authentication if asked, one
/// command line, one reply told in words.
pub struct PjlinkExchange {
    /// The command line, without CR.
    line: String,
    /// The password, if any.
    password: Option<String>,
    /// Where it is.
    phase: PjlinkPhase,
    /// Bytes received and not yet used.
    inbuf: Vec<u8>,
    /// The bytes to send, once known.
    out: Vec<u8>,
    /// Bytes of `out` sent.
    sent: usize,
}

impl PjlinkExchange {
    /// An exchange sending `line` (from [`pjlink_line`]).
    pub fn new(line: String, password: Option<String>) -> PjlinkExchange {
        PjlinkExchange {
            line,
            password,
            phase: PjlinkPhase::Greeting,
            inbuf: Vec::new(),
            out: Vec::new(),
            sent: 0,
        }
    }

    /// Moves bytes until the peer has nothing more for now (`Pending`) or the
    /// exchange is over: the reply in words, or what went wrong.
    pub fn step<S: Read + Write>(&mut self, s: &mut S) -> Poll<Result<String, String>> {
        loop {
            match self.phase {
                PjlinkPhase::Greeting => {
                    let greeting = match self.read_line(s) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err(format!("no PJLink greeting: {e}")))
                        }
                        Poll::Ready(Ok(line)) => line,
                    };
                    let prefix =
                        match greeting.split(' ').collect::<Vec<_>>().as_slice() {
                            ["PJLINK", "0"] => String::new(),
                            ["PJLINK", "1", random] => match &self.password {
                                Some(p) => pjlink_digest(random, p),
                                None => return Poll::Ready(Err(
                                    "projector asks for a PJLink password and none is configured"
                                        .into(),
                                )),
                            },
                            ["PJLINK", "ERRA"] => {
                                return Poll::Ready(Err("ERRA: wrong password".into()))
                            }
                            _ => {
                                return Poll::Ready(Err(format!(
                                    "not a PJLink greeting: {:?}",
                                    escape(greeting.as_bytes())
                                )))
                            }
                        };
                    self.out = format!("{prefix}{}\r", self.line).into_bytes();
                    self.phase = PjlinkPhase::Sending;
                }
                PjlinkPhase::Sending => {
                    while self.sent < self.out.len() {
                        match s.write(&self.out[self.sent..]) {
                            Ok(0) => {
                                return Poll::Ready(Err("sending failed: connection closed".into()))
                            }
                            Ok(n) => self.sent += n,
                            Err(e) if is_wait(&e) => return Poll::Pending,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Poll::Ready(Err(format!("sending failed: {e}"))),
                        }
                    }
                    if let Err(e) = s.flush() {
                        return Poll::Ready(Err(format!("sending failed: {e}")));
                    }
                    self.phase = PjlinkPhase::Reply;
                }
                PjlinkPhase::Reply => {
                    return match self.read_line(s) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Err(e)) => Poll::Ready(Err(format!("no reply: {e}"))),
                        Poll::Ready(Ok(reply)) => Poll::Ready(describe_reply(&self.line, &reply)),
                    }
                }
            }
        }
    }

    /// What went wrong when time is up.
    pub fn time_up(&mut self) -> String {
        match self.phase {
            PjlinkPhase::Greeting => "no PJLink greeting: projector I/O timed out".into(),
            PjlinkPhase::Sending => "sending failed: projector I/O timed out".into(),
            PjlinkPhase::Reply => "no reply: projector I/O timed out".into(),
        }
    }

    /// Takes one CR-ended line; errors on EOF before it or an overlong line.
    fn read_line<S: Read>(&mut self, s: &mut S) -> Poll<Result<String, String>> {
        loop {
            if let Some(pos) = self.inbuf.iter().position(|&b| b == b'\r') {
                let line: Vec<u8> = self.inbuf.drain(..=pos).take(pos).collect();
                return Poll::Ready(String::from_utf8(line).map_err(|e| e.to_string()));
            }
            if self.inbuf.len() > MAX_PJLINK_LINE_BYTES {
                return Poll::Ready(Err(format!(
                    "line longer than {MAX_PJLINK_LINE_BYTES} bytes"
                )));
            }
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(0) => {
                    return Poll::Ready(Err(format!(
                        "connection closed after {:?}",
                        escape(&self.inbuf)
                    )))
                }
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if is_wait(&e) => return Poll::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(e.to_string())),
            }
        }
    }
}

/// Runs a PJLink exchange over a blocking stream (tests and fuzzing).
pub fn pjlink_exchange<S: Read + Write>(
    s: &mut S,
    line: &str,
    password: Option<&str>,
) -> Result<String, String> {
    let mut x = PjlinkExchange::new(line.to_string(), password.map(str::to_string));
    match x.step(s) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(x.time_up()),
    }
}

/// The bytes of a raw command: `hex:02 00 ...` exactly, else the text plus the
/// terminator unless it already ends with CR or LF.
pub fn raw_payload(command: &str, terminator: &str) -> Result<Vec<u8>, String> {
    if let Some(hex) = command.strip_prefix("hex:") {
        let digits: String = hex.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        if digits.is_empty() || !digits.len().is_multiple_of(2) {
            return Err("hex command needs an even number of hex digits".into());
        }
        // from_str_radix would accept a sign ("+1"); only hex digits are bytes.
        if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(format!("{c:?} is not a hex digit"));
        }
        return (0..digits.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(&digits[i..i + 2], 16)
                    .map_err(|_| format!("{:?} is not a hex byte", &digits[i..i + 2]))
            })
            .collect();
    }
    let mut out = command.as_bytes().to_vec();
    if !command.ends_with(['\r', '\n']) {
        out.extend_from_slice(terminator.as_bytes());
    }
    Ok(out)
}

/// A PJLink command line for a shortcut (`on`, `off`, `status`, `mute`,
/// `unmute`, `input N`) or a full `%1XXXX param` line.
pub fn pjlink_line(command: &str) -> Result<String, String> {
    let c = command.trim();
    let lower = c.to_ascii_lowercase();
    let line = match lower.as_str() {
        "on" => "%1POWR 1".to_string(),
        "off" => "%1POWR 0".to_string(),
        "status" => "%1POWR ?".to_string(),
        "mute" => "%1AVMT 31".to_string(),
        "unmute" => "%1AVMT 30".to_string(),
        _ => {
            if let Some(n) = lower.strip_prefix("input ") {
                let n = n.trim();
                if n.is_empty() || n.len() > 2 || !n.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(format!("{n:?} is not a PJLink input"));
                }
                format!("%1INPT {}", n.to_ascii_uppercase())
            } else if c.starts_with('%') {
                c.to_string()
            } else {
                return Err(format!(
                    "{c:?} is not a PJLink command (use on, off, status, mute, unmute, input N or a %1XXXX line)"
                ));
            }
        }
    };
    let valid = line.len() >= 7
        && line.len() <= 136
        && line.starts_with("%1")
        // Bytes, not a str slice: a multi-byte character there must not panic.
        && line.as_bytes()[2..6].iter().all(u8::is_ascii_alphanumeric)
        && line.as_bytes()[6] == b' '
        && !line.contains(['\r', '\n']);
    if !valid {
        return Err(format!(
            "{line:?} is not a PJLink class 1 line (%1XXXX param)"
        ));
    }
    Ok(line)
}

/// MD5 digest PJLink wants before the first command: md5hex(random + password).
pub fn pjlink_digest(random: &str, password: &str) -> String {
    crate::md5::hex(format!("{random}{password}").as_bytes())
}

/// A PJLink reply in words, checked against the command it answers.
pub fn describe_reply(sent: &str, reply: &str) -> Result<String, String> {
    if reply == "PJLINK ERRA" {
        return Err("ERRA: wrong password".into());
    }
    let (head, value) = reply
        .split_once('=')
        .ok_or_else(|| format!("not a PJLink reply: {:?}", escape(reply.as_bytes())))?;
    // `sent` comes from `pjlink_line`, so its first six bytes are ASCII; `get`
    // keeps a stray caller from panicking all the same.
    let command = sent.get(..6).ok_or("not a PJLink command line")?;
    if !head.eq_ignore_ascii_case(command) {
        return Err(format!(
            "reply {:?} does not answer {command}",
            escape(reply.as_bytes()),
        ));
    }
    let body = &command[2..].to_ascii_uppercase();
    match value {
        "OK" => Ok("OK".into()),
        "ERR1" => Err("ERR1: undefined command".into()),
        "ERR2" => Err("ERR2: bad parameter".into()),
        "ERR3" => Err("ERR3: unavailable now (warming up or cooling down)".into()),
        "ERR4" => Err("ERR4: projector failure".into()),
        v if body == "POWR" => Ok(match v {
            "0" => "power: standby".into(),
            "1" => "power: on".into(),
            "2" => "power: cooling down".into(),
            "3" => "power: warming up".into(),
            other => format!("power: {other}"),
        }),
        v if body == "AVMT" => Ok(match v {
            "30" => "mute: off".into(),
            "31" => "mute: audio and video".into(),
            "11" => "mute: video".into(),
            "21" => "mute: audio".into(),
            other => format!("mute: {other}"),
        }),
        v => Ok(format!("{body}: {}", escape(v.as_bytes()))),
    }
}

/// Printable ASCII as is, everything else as `\xNN`, cut to the log limit.
pub fn escape(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_LOGGED_REPLY_BYTES)];
    let mut out: String = cut.escape_ascii().to_string();
    if bytes.len() > cut.len() {
        out.push_str("...");
    }
    out
}

/// An in-memory projector for unit tests and fuzzing: reads come from a
/// script, writes are kept.
#[doc(hidden)]
pub struct MemoryPeer {
    /// What the projector "sends".
    input: io::Cursor<Vec<u8>>,
    /// What was written to the projector.
    pub output: Vec<u8>,
}

impl MemoryPeer {
    /// A peer that will answer with `input`, then EOF.
    pub fn new(input: &[u8]) -> MemoryPeer {
        MemoryPeer {
            input: io::Cursor::new(input.to_vec()),
            output: Vec::new(),
        }
    }
}

impl Read for MemoryPeer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemoryPeer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> config::Projector {
        crate::config::Config::parse(r#"{"projector": {"max_age_ms": 10000}}"#)
            .expect("a valid config")
            .projector
    }

    fn batch(command: &str) -> Batch {
        let message = format!(r#"{{"command": "{command}", "projectors": ["127.0.0.1:9"]}}"#);
        parse_batch(message.as_bytes(), &defaults()).expect("a valid message")
    }

    #[test]
    fn the_waiting_queue_is_bounded_and_drops_the_oldest() {
        let mut p = Projectors::default();
        for i in 0..MAX_WAITING_BATCHES + 3 {
            p.push(batch(&format!("c{i}")));
        }
        assert_eq!(p.count(), MAX_WAITING_BATCHES);
        assert_eq!(p.waiting.front().unwrap().command, "c3");
        assert_eq!(
            p.waiting.back().unwrap().command,
            format!("c{}", MAX_WAITING_BATCHES + 2)
        );
    }

    #[test]
    fn a_message_that_waited_too_long_is_dropped_not_sent() {
        let d = defaults();
        let mut p = Projectors::default();
        let mut old = batch("on");
        old.arrived = Instant::now() - Duration::from_millis(d.max_age_ms + 1);
        p.push(old);
        p.push(batch("off"));
        // The stale `on` is dropped; the `off` is taken and started.
        let _ = p.step(&d);
        assert!(p.waiting.is_empty());
        assert_eq!(p.current.as_ref().map(|b| b.command.as_str()), Some("off"));
    }

    #[test]
    fn raw_command_gets_the_terminator_once() {
        assert_eq!(raw_payload("PWR ON", "\r").unwrap(), b"PWR ON\r");
        assert_eq!(raw_payload("PWR ON\r\n", "\r").unwrap(), b"PWR ON\r\n");
        assert_eq!(raw_payload("x", "\r\n").unwrap(), b"x\r\n");
    }

    #[test]
    fn hex_command_is_sent_as_exact_bytes() {
        assert_eq!(
            raw_payload("hex:02 00 00 00 00 02", "\r").unwrap(),
            [2, 0, 0, 0, 0, 2]
        );
        assert!(raw_payload("hex:0", "\r").is_err());
        assert!(raw_payload("hex:zz", "\r").is_err());
        assert!(raw_payload("hex:+1", "\r").is_err());
    }

    #[test]
    fn raw_reply_is_read_to_the_terminator() {
        let mut p = MemoryPeer::new(b"OK\rtrailing");
        let reply = raw_exchange(&mut p, b"PWR ON\r", b"\r").unwrap();
        assert_eq!(reply.as_deref(), Some(&b"OK"[..]));
        assert_eq!(p.output, b"PWR ON\r");
    }

    #[test]
    fn raw_without_reply_is_not_an_error() {
        let mut p = MemoryPeer::new(b"");
        assert_eq!(raw_exchange(&mut p, b"x\r", b"\r").unwrap(), None);
    }

    #[test]
    fn raw_garbage_reply_is_capped() {
        let mut p = MemoryPeer::new(&vec![b'A'; 1_000_000]);
        let reply = raw_exchange(&mut p, b"x\r", b"\r").unwrap().unwrap();
        assert_eq!(reply.len(), MAX_RAW_REPLY_BYTES);
    }

    #[test]
    fn pjlink_digest_matches_the_spec_vector() {
        assert_eq!(
            pjlink_digest("498e4a67", "JBMIAProjectorLink"),
            "5d8409bc1c3fa39749434aa3a5c38682"
        );
    }

    #[test]
    fn pjlink_shortcuts_map_to_class_1_lines() {
        for (short, line) in [
            ("on", "%1POWR 1"),
            ("OFF", "%1POWR 0"),
            ("status", "%1POWR ?"),
            ("mute", "%1AVMT 31"),
            ("unmute", "%1AVMT 30"),
            ("input 31", "%1INPT 31"),
            ("%1LAMP ?", "%1LAMP ?"),
        ] {
            assert_eq!(pjlink_line(short).unwrap(), line);
        }
        assert!(pjlink_line("reboot").is_err());
        assert!(pjlink_line("%1POWR").is_err());
        assert!(pjlink_line("input ../").is_err());
        assert!(pjlink_line("%1PÖWR 1").is_err());
    }

    #[test]
    fn pjlink_without_auth() {
        let mut p = MemoryPeer::new(b"PJLINK 0\r%1POWR=OK\r");
        assert_eq!(pjlink_exchange(&mut p, "%1POWR 1", None).unwrap(), "OK");
        assert_eq!(p.output, b"%1POWR 1\r");
    }

    #[test]
    fn pjlink_with_auth_prefixes_the_digest() {
        let mut p = MemoryPeer::new(b"PJLINK 1 498e4a67\r%1POWR=OK\r");
        let r = pjlink_exchange(&mut p, "%1POWR 1", Some("JBMIAProjectorLink"));
        assert_eq!(r.unwrap(), "OK");
        assert_eq!(p.output, b"5d8409bc1c3fa39749434aa3a5c38682%1POWR 1\r");
    }

    #[test]
    fn pjlink_auth_without_password_sends_nothing() {
        let mut p = MemoryPeer::new(b"PJLINK 1 498e4a67\r");
        assert!(pjlink_exchange(&mut p, "%1POWR 1", None)
            .unwrap_err()
            .contains("password"));
        assert!(p.output.is_empty());
    }

    #[test]
    fn pjlink_errors_are_told_in_words() {
        for (reply, words) in [
            ("%1POWR=ERR1", "undefined command"),
            ("%1POWR=ERR2", "bad parameter"),
            ("%1POWR=ERR3", "unavailable now"),
            ("%1POWR=ERR4", "projector failure"),
            ("PJLINK ERRA", "wrong password"),
        ] {
            assert!(
                describe_reply("%1POWR 1", reply)
                    .unwrap_err()
                    .contains(words),
                "{reply}"
            );
        }
        assert_eq!(describe_reply("%1POWR ?", "%1POWR=1").unwrap(), "power: on");
        assert_eq!(
            describe_reply("%1POWR ?", "%1POWR=3").unwrap(),
            "power: warming up"
        );
        assert_eq!(describe_reply("%1INPT ?", "%1INPT=31").unwrap(), "INPT: 31");
        assert!(describe_reply("%1POWR ?", "%1LAMP=1").is_err());
        assert!(describe_reply("%1POWR ?", "garbage").is_err());
    }

    #[test]
    fn pjlink_overlong_or_cut_reply_fails() {
        let mut p = MemoryPeer::new(&vec![b'x'; 10_000]);
        assert!(pjlink_exchange(&mut p, "%1POWR 1", None).is_err());
        let mut p = MemoryPeer::new(b"PJLINK 0\r%1PO");
        assert!(pjlink_exchange(&mut p, "%1POWR 1", None)
            .unwrap_err()
            .contains("closed"));
    }

    #[test]
    fn escape_shows_bytes_safely() {
        assert_eq!(escape(b"OK\r\x01"), "OK\\r\\x01");
        assert!(escape(&[b'a'; 300]).ends_with("..."));
    }
}
