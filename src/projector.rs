//! Projector protocols (raw TCP and PJLink class 1) over any `Read + Write`,
//! and the TCP side with a connect timeout and a deadline on all I/O.
//!
//! A message's projectors are handled one per loop step, with an MQTT poll
//! between steps, so many unreachable projectors never starve the keep-alive.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rumqttc::{Client, QoS};

use crate::config;
use crate::message::{self, Protocol, Target};

/// Reply bytes read from a raw projector before we stop listening.
const MAX_RAW_REPLY_BYTES: usize = 4096;

/// Longest PJLink line (the spec's limit is 136 bytes; leave room).
const MAX_PJLINK_LINE_BYTES: usize = 512;

/// Reply bytes shown in a log line.
const MAX_LOGGED_REPLY_BYTES: usize = 200;

/// One projector message in progress: the targets left and the results so far.
#[derive(Debug)]
pub struct Batch {
    /// The command as it came in the message.
    command: String,
    /// Projectors not yet handled.
    targets: VecDeque<Target>,
    /// Results of the projectors handled.
    results: Vec<Outcome>,
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
            targets: req.targets.into(),
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
    /// Sends the command to the next projector. Returns true when the batch is finished.
    pub fn step(&mut self, defaults: &config::Projector) -> bool {
        if let Some(target) = self.targets.pop_front() {
            let outcome = send(&target, &self.command, defaults);
            self.results.push(outcome);
        }
        self.targets.is_empty()
    }

    /// Publishes the results to `result_topic`, if one is configured.
    pub fn publish(&self, client: &Client, defaults: &config::Projector) {
        let Some(topic) = &defaults.result_topic else {
            return;
        };
        let json = serde_json::json!({"command": self.command, "results": self.results});
        if let Err(e) = client.try_publish(topic.clone(), QoS::AtMostOnce, false, json.to_string())
        {
            log::warn!("could not publish projector results to {topic}: {e}");
        }
    }
}

/// Sends `command` to one projector and logs one line about it.
fn send(target: &Target, command: &str, defaults: &config::Projector) -> Outcome {
    let started = Instant::now();
    let result = exchange(target, command, defaults);
    let ms = started.elapsed().as_millis() as u64;
    let protocol = match target.protocol {
        Protocol::Raw => "raw",
        Protocol::Pjlink => "pjlink",
    };
    let (ok, reply) = match result {
        Ok(words) => {
            log::info!(
                "projector {} ({protocol}) {command:?}: {words} ({ms} ms)",
                target.address()
            );
            (true, words)
        }
        Err(e) => {
            log::warn!(
                "projector {} ({protocol}) {command:?}: failed: {e} ({ms} ms)",
                target.address()
            );
            (false, e)
        }
    };
    Outcome {
        projector: target.address(),
        ok,
        reply,
        ms,
    }
}

fn exchange(
    target: &Target,
    command: &str,
    defaults: &config::Projector,
) -> Result<String, String> {
    // Build the bytes first: a bad command is an error without touching the network.
    let raw = match target.protocol {
        Protocol::Raw => Some(raw_payload(command, &defaults.terminator)?),
        Protocol::Pjlink => None,
    };
    let line = match target.protocol {
        Protocol::Pjlink => Some(pjlink_line(command)?),
        Protocol::Raw => None,
    };
    let connect_timeout = Duration::from_millis(defaults.connect_timeout_ms);
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", target.host))?;
    let stream = TcpStream::connect_timeout(&addr, connect_timeout)
        .map_err(|e| format!("connect failed: {e}"))?;
    let mut io = Deadlined {
        stream: &stream,
        until: Instant::now() + Duration::from_millis(defaults.io_timeout_ms),
    };
    match (raw, line) {
        (Some(bytes), _) => {
            let term = defaults.terminator.as_bytes();
            let reply = raw_exchange(&mut io, &bytes, term).map_err(|e| e.to_string())?;
            Ok(match reply {
                Some(r) if !r.is_empty() => format!("reply {:?}", escape(&r)),
                _ => "sent, no reply".to_string(),
            })
        }
        (None, Some(line)) => {
            let password = target.password.as_ref().map(config::Secret::expose);
            pjlink_exchange(&mut io, &line, password)
        }
        (None, None) => unreachable!("every protocol built its bytes above"),
    }
}

/// A TCP stream whose reads and writes all end by one deadline.
struct Deadlined<'a> {
    /// The connected stream.
    stream: &'a TcpStream,
    /// When all I/O must be done.
    until: Instant,
}

impl Deadlined<'_> {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "projector I/O timed out",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        self.stream.read(buf).map_err(timeout_kind)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        self.stream.write(buf).map_err(timeout_kind)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Socket timeouts show up as WouldBlock on Unix and TimedOut on Windows
/// (whose message text may be missing): make them one error that says so.
fn timeout_kind(e: io::Error) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        io::Error::new(io::ErrorKind::TimedOut, "projector I/O timed out")
    } else {
        e
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

/// Writes `payload`, then reads a reply until the terminator's last byte or LF,
/// the peer closing, the deadline, or `MAX_RAW_REPLY_BYTES`. No reply is fine.
pub fn raw_exchange<S: Read + Write>(
    s: &mut S,
    payload: &[u8],
    terminator: &[u8],
) -> io::Result<Option<Vec<u8>>> {
    s.write_all(payload)?;
    s.flush()?;
    let end = *terminator.last().unwrap_or(&b'\r');
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    while reply.len() < MAX_RAW_REPLY_BYTES {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let n = n.min(MAX_RAW_REPLY_BYTES - reply.len());
                if let Some(pos) = buf[..n].iter().position(|&b| b == end || b == b'\n') {
                    reply.extend_from_slice(&buf[..pos]);
                    return Ok(Some(reply));
                }
                reply.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if reply.is_empty() { None } else { Some(reply) })
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
    format!("{:x}", md5::compute(format!("{random}{password}")))
}

/// Reads the greeting, authenticates if asked, sends `line`, reads the reply
/// and returns it in words (Err for error replies).
pub fn pjlink_exchange<S: Read + Write>(
    s: &mut S,
    line: &str,
    password: Option<&str>,
) -> Result<String, String> {
    let greeting = read_line(s).map_err(|e| format!("no PJLink greeting: {e}"))?;
    let prefix = match greeting.split(' ').collect::<Vec<_>>().as_slice() {
        ["PJLINK", "0"] => String::new(),
        ["PJLINK", "1", random] => {
            let password =
                password.ok_or("projector asks for a PJLink password and none is configured")?;
            pjlink_digest(random, password)
        }
        ["PJLINK", "ERRA"] => return Err("ERRA: wrong password".into()),
        _ => {
            return Err(format!(
                "not a PJLink greeting: {:?}",
                escape(greeting.as_bytes())
            ))
        }
    };
    s.write_all(format!("{prefix}{line}\r").as_bytes())
        .map_err(|e| format!("sending failed: {e}"))?;
    let reply = read_line(s).map_err(|e| format!("no reply: {e}"))?;
    describe_reply(line, &reply)
}

/// Reads up to CR; errors on EOF before it, on timeout, or on an overlong line.
fn read_line<S: Read>(s: &mut S) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed after {:?}", escape(&line)),
                ))
            }
            Ok(_) if byte[0] == b'\r' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_PJLINK_LINE_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("line longer than {MAX_PJLINK_LINE_BYTES} bytes"),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
