//! The download of a new executable for `update`, in bounded steps: into a
//! partial file next to the running one, named by the signed SHA-256
//! (`swap::Paths::partial`), resumed where it stopped and retried after
//! transient failures within the one command, with the download section's
//! backoff and attempt count.
//!
//! The signed SHA-256 is what decides whether kept bytes are right, not
//! the server's validators: a kept prefix is hashed again (in slices)
//! before the rest is asked for with `Range`, plus `If-Range` when this
//! process saw the server's validator for those bytes (after a restart it
//! has none, and sends `Range` alone). A resumed file that does not hash
//! right is started over from byte 0 once; only a whole download from
//! byte 0 that does not hash right is refused.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::download::{content_range, if_range, status_failure};
use crate::http::{self, Failure, Get, Head, Pool, Progress};
use crate::queue::{retry_delay, Validators};
use crate::signing;

/// Bytes of a kept partial file hashed per read while resuming: the clock is
/// read between two reads, so a multi-MB prefix takes several slices, not
/// one long turn.
const REHASH_READ_BYTES: usize = 256 * 1024;

/// How often a failing download is tried within one command (from the
/// download section: `max_attempts`, `retry_base_ms` doubling up to
/// `retry_max_ms`).
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait after the first failure, in ms.
    pub base_ms: u64,
    /// Longest wait, in ms.
    pub max_ms: u64,
}

/// How a download ended without the file.
#[derive(Debug)]
pub struct Failed {
    /// Why, for the answer and the log.
    pub why: String,
    /// Whether the partial file is worth keeping for the update sent again
    /// (transient failures); else it is to be removed.
    pub keep: bool,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole file.
    Whole,
    /// The rest, from this offset.
    Rest(u64),
}

/// Where the download is.
enum State {
    /// Hashing the kept prefix again, up to this many bytes.
    Rehash(u64),
    /// A request goes out in the next step.
    Request,
    /// A request in progress.
    Fetch(Box<Get>, Mode),
    /// Waiting out the backoff before the next attempt.
    Wait(Instant),
}

/// One new executable's download in progress.
pub struct Fetch {
    /// The version, for the log.
    version: String,
    /// Where it is downloaded from.
    url: String,
    /// The signed SHA-256 (hex).
    sha256: String,
    /// The partial file.
    path: PathBuf,
    /// The partial file, open for reading (the kept prefix) and writing.
    file: File,
    /// SHA-256 of the file's first `size` bytes.
    hash: ring::digest::Context,
    /// Bytes in the file (and hashed).
    size: u64,
    /// Where the download is.
    state: State,
    /// The attempt in progress (1 for the first).
    attempt: u32,
    /// Whether it already started over from byte 0 (once per command).
    restarted: bool,
    /// The file's bytes came from more than one response (resumed).
    pieced: bool,
    /// The server's validator for the bytes in the file (`If-Range`), when
    /// this process saw one.
    validator: Option<String>,
    /// HTTP limits of one attempt; `max_bytes` bounds the whole file.
    limits: http::Limits,
    /// How often and how soon to try again.
    retries: Retries,
    /// Body bytes of the last step.
    body: Vec<u8>,
}

impl Fetch {
    /// Opens (or creates) the partial file `path` of the version `version`
    /// whose signed SHA-256 is `sha256`; a kept prefix is hashed again in the
    /// first steps. A prefix over `limits.max_bytes` is dropped.
    pub fn open(
        version: &str,
        url: &str,
        sha256: &str,
        path: &Path,
        limits: http::Limits,
        retries: Retries,
    ) -> Result<Fetch, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("could not open {}: {e}", path.display()))?;
        let mut kept = file
            .metadata()
            .map_err(|e| format!("could not read {}: {e}", path.display()))?
            .len();
        if kept > limits.max_bytes {
            log::warn!(
                "dropped the {kept} bytes kept in {}: over download.max_bytes ({})",
                path.display(),
                limits.max_bytes
            );
            file.set_len(0)
                .map_err(|e| format!("could not truncate {}: {e}", path.display()))?;
            kept = 0;
        }
        Ok(Fetch {
            version: version.to_string(),
            url: url.to_string(),
            sha256: sha256.to_string(),
            path: path.to_path_buf(),
            file,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            state: if kept > 0 {
                State::Rehash(kept)
            } else {
                State::Request
            },
            attempt: 1,
            restarted: false,
            pieced: false,
            validator: None,
            limits,
            retries,
            body: Vec::new(),
        })
    }

    /// Bytes in the partial file now.
    pub fn size(&self) -> u64 {
        match self.state {
            State::Rehash(kept) => kept,
            _ => self.size,
        }
    }

    /// The partial file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The end of the backoff before the next attempt, while it is waited out.
    pub fn waiting_until(&self) -> Option<Instant> {
        match self.state {
            State::Wait(until) => Some(until),
            _ => None,
        }
    }

    /// Does a bounded piece of work, returning by `deadline` (give or take
    /// a read); `Ready(Ok)` once the file is whole and hashes to the signed
    /// SHA-256, `Ready(Err)` when the command has failed (all attempts
    /// spent, or a failure that will not get better).
    pub fn step(&mut self, deadline: Instant, pool: &mut Pool) -> Poll<Result<(), Failed>> {
        loop {
            let progress = match self.state {
                State::Wait(until) => {
                    if Instant::now() < until {
                        return Poll::Pending;
                    }
                    self.attempt += 1;
                    self.state = State::Request;
                    continue;
                }
                State::Rehash(kept) => self.rehash(kept, deadline),
                State::Request => self.request(pool).map(|()| false),
                State::Fetch(..) => self.fetch(deadline, pool),
            };
            match progress {
                Ok(true) => return Poll::Ready(Ok(())),
                Ok(false) => {}
                Err(f) => {
                    if let Some(failed) = self.failed(f) {
                        return Poll::Ready(Err(failed));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Poll::Pending;
            }
        }
    }

    /// Hashes the next slice of the kept prefix; true when the prefix alone
    /// is the whole file.
    fn rehash(&mut self, kept: u64, deadline: Instant) -> Result<bool, Failure> {
        if self.size == 0 {
            self.file
                .seek(SeekFrom::Start(0))
                .map_err(|e| self.io_failure("read", e))?;
        }
        self.body.resize(REHASH_READ_BYTES, 0);
        while self.size < kept {
            let n = usize::try_from(kept - self.size)
                .unwrap_or(usize::MAX)
                .min(REHASH_READ_BYTES);
            self.file
                .read_exact(&mut self.body[..n])
                .map_err(|e| self.io_failure("read", e))?;
            self.hash.update(&self.body[..n]);
            self.size += n as u64;
            if self.size < kept && Instant::now() >= deadline {
                return Ok(false);
            }
        }
        self.body.clear();
        if self.hashes_right() {
            log::info!(
                "the {kept} bytes kept in {} are the whole of {}: nothing to download",
                self.path.display(),
                self.version
            );
            return Ok(true);
        }
        self.state = State::Request;
        Ok(false)
    }

    /// Sends the request: the rest of the file after the bytes kept, or all of it.
    fn request(&mut self, pool: &mut Pool) -> Result<(), Failure> {
        // Bytes written in a failing step may not all have been counted.
        self.file
            .set_len(self.size)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.size)).map(drop))
            .map_err(|e| self.io_failure("write", e))?;
        let mut headers = Vec::new();
        let mode = if self.size > 0 {
            headers.push(("Range", format!("bytes={}-", self.size)));
            if let Some(v) = &self.validator {
                headers.push(("If-Range", v.clone()));
            }
            log::info!(
                "resuming the download of {} at {} bytes ({})",
                self.version,
                self.size,
                match &self.validator {
                    Some(v) => format!("If-Range {v}"),
                    None => "no validator known: the signed sha256 decides".into(),
                }
            );
            Mode::Rest(self.size)
        } else {
            Mode::Whole
        };
        // The limit on the whole file is checked here, not by the GET, which
        // sees only the rest.
        let mut limits = self.limits;
        limits.max_bytes = u64::MAX;
        let get = Get::start(&self.url, headers, limits, pool)?;
        self.state = State::Fetch(Box::new(get), mode);
        Ok(())
    }

    /// One slice of the request in progress; true when the file is whole
    /// and hashes right.
    fn fetch(&mut self, deadline: Instant, pool: &mut Pool) -> Result<bool, Failure> {
        let State::Fetch(get, mode) = &mut self.state else {
            unreachable!("called in State::Fetch only");
        };
        let mode = *mode;
        self.body.clear();
        let progress = match get.step(&mut self.body, deadline) {
            Ok(p) => p,
            Err(f) => {
                // Bytes that came before the failure in this step are good to keep.
                if !self.body.is_empty() {
                    let _ = self.write_body();
                }
                return Err(f);
            }
        };
        match progress {
            Progress::Pending => Ok(false),
            Progress::Head => {
                let head = get
                    .head()
                    .expect("Progress::Head comes with a head")
                    .clone();
                self.on_head(&head, mode, pool).map(|()| false)
            }
            Progress::Body(_) => {
                self.write_body()?;
                Ok(false)
            }
            Progress::End => {
                get.release(pool);
                let ended_by_close = get.ended_by_close();
                self.complete(ended_by_close, pool)
            }
        }
    }

    /// The final head is in: refuse error statuses, fit a resumed answer to
    /// the bytes kept.
    fn on_head(&mut self, head: &Head, mode: Mode, pool: &mut Pool) -> Result<(), Failure> {
        let served = Validators {
            etag: head.header("etag").map(str::to_string),
            last_modified: head.header("last-modified").map(str::to_string),
        };
        match (mode, head.status) {
            (Mode::Rest(from), 206) => match head.header("content-range").and_then(content_range) {
                Some((start, _)) if start == from => self.pieced = true,
                _ => return self.start_over("the server's range did not fit", pool),
            },
            (Mode::Rest(_), 416) => {
                return self.start_over("the server refused the range (416)", pool)
            }
            (Mode::Rest(from), 200) => {
                log::info!(
                    "update {}: the server sent the whole file instead of the rest after {from} bytes (it changed, or ignores ranges): taking it from byte 0",
                    self.version
                );
                self.reset()?;
            }
            (Mode::Whole, 206) => {
                return Err(Failure::Permanent(
                    "HTTP 206 to a request for the whole file".into(),
                ))
            }
            (_, code) => {
                if let Some(f) = status_failure(code, head.header("retry-after")) {
                    return Err(f);
                }
            }
        }
        self.validator = if_range(&served).map(str::to_string);
        let length = head
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if length.is_some_and(|n| self.size.saturating_add(n) > self.limits.max_bytes) {
            return Err(http::too_large(self.limits.max_bytes));
        }
        Ok(())
    }

    /// Appends the body bytes that came to the file and the hash.
    fn write_body(&mut self) -> Result<(), Failure> {
        let n = self.body.len() as u64;
        if self.size + n > self.limits.max_bytes {
            return Err(http::too_large(self.limits.max_bytes));
        }
        self.file
            .write_all(&self.body)
            .map_err(|e| self.io_failure("write", e))?;
        self.hash.update(&self.body);
        self.size += n;
        Ok(())
    }

    /// The body is in: the file is done if it hashes right; a resumed one
    /// that does not is started over (once); a whole one is refused.
    fn complete(&mut self, ended_by_close: bool, pool: &mut Pool) -> Result<bool, Failure> {
        if self.hashes_right() {
            return Ok(true);
        }
        let got = signing::sha256_hex(self.hash.clone().finish().as_ref());
        let mismatch = format!(
            "sha256 mismatch: the {} bytes downloaded hash to {got}, the signed statement says {}",
            self.size, self.sha256
        );
        if self.pieced {
            self.start_over(&format!("{mismatch} (resumed)"), pool)?;
            return Ok(false);
        }
        if ended_by_close {
            // A body without a length, ended by a close: it may be cut.
            return Err(Failure::transient(format!(
                "{mismatch}; the body had no length and ended when the server closed the connection, so it may be cut"
            )));
        }
        Err(Failure::Permanent(mismatch))
    }

    /// Whether the bytes so far hash to the signed SHA-256.
    fn hashes_right(&self) -> bool {
        let got = signing::sha256_hex(self.hash.clone().finish().as_ref());
        got == self.sha256
    }

    /// Drops the bytes kept and asks for the whole file (once per command).
    fn start_over(&mut self, why: &str, pool: &mut Pool) -> Result<(), Failure> {
        if self.restarted {
            return Err(Failure::Permanent(format!(
                "{why}, after starting over from byte 0 once already"
            )));
        }
        log::warn!("update {}: {why}; starting over from byte 0", self.version);
        self.restarted = true;
        self.reset()?;
        self.validator = None;
        self.request(pool)
    }

    /// Empties the file and the hash.
    fn reset(&mut self) -> Result<(), Failure> {
        self.size = 0;
        self.pieced = false;
        self.hash = ring::digest::Context::new(&ring::digest::SHA256);
        self.file
            .set_len(0)
            .and_then(|()| self.file.seek(SeekFrom::Start(0)).map(drop))
            .map_err(|e| self.io_failure("write", e))
    }

    /// After a failure: another attempt after the backoff (None), or the
    /// command's failure.
    fn failed(&mut self, f: Failure) -> Option<Failed> {
        let (reason, retry_after) = match f {
            Failure::Permanent(why) => return Some(Failed { why, keep: false }),
            Failure::Transient {
                reason,
                retry_after,
            } => (reason, retry_after),
        };
        let max = self.retries.max_attempts.max(1);
        if self.attempt >= max {
            return Some(Failed {
                why: format!(
                    "{reason} (attempt {} of {max}; {} bytes kept in {}: the same update, sent again, resumes)",
                    self.attempt,
                    self.size,
                    self.path.display()
                ),
                keep: true,
            });
        }
        let delay = retry_delay(
            self.attempt,
            self.retries.base_ms,
            self.retries.max_ms,
            retry_after,
        );
        log::warn!(
            "update {}: attempt {} of {max} failed: {reason}; {} bytes kept, retrying in {}",
            self.version,
            self.attempt,
            self.size,
            seconds(delay)
        );
        self.state = State::Wait(Instant::now() + delay);
        None
    }

    /// The file is whole and right: synced, made executable (Unix), renamed
    /// to `staged` (`holosync.new.exe`).
    pub fn finish(self, staged: &Path) -> Result<(), String> {
        let path = &self.path;
        self.file
            .sync_all()
            .map_err(|e| format!("could not sync {}: {e}", path.display()))?;
        drop(self.file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("could not make {} executable: {e}", path.display()))?;
        }
        std::fs::rename(path, staged).map_err(|e| {
            format!(
                "could not rename {} to {}: {e}",
                path.display(),
                staged.display()
            )
        })
    }

    /// Keeps the partial file for the update sent again (synced, so a
    /// power cut loses little); returns its size.
    pub fn keep(self) -> u64 {
        let size = self.size();
        if let Err(e) = self.file.sync_data() {
            log::warn!("could not sync {}: {e}", self.path.display());
        }
        size
    }

    /// Removes the partial file.
    pub fn discard(self) {
        let path = self.path.clone();
        drop(self.file);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("could not remove {}: {e}", path.display());
            }
        }
    }

    /// A failure to read or write the partial file: worth another attempt
    /// (a full disk or a scanner's lock go away).
    fn io_failure(&self, what: &str, e: std::io::Error) -> Failure {
        Failure::transient(format!("could not {what} {}: {e}", self.path.display()))
    }
}

/// A wait for the log: `0.4 s`, `30 s`.
fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} s", d.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// The new version's bytes in these tests.
    const BODY: &[u8] = b"#!/bin/sh\necho holosync 0.9.0, a stand-in for the new version\n";

    fn sha(bytes: &[u8]) -> String {
        signing::sha256_hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    /// A server on port 0 answering its n-th connection with `answers[n]`
    /// (raw bytes, then a close); returns the URL and the request heads.
    fn serve(answers: Vec<Vec<u8>>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/new", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        std::thread::spawn(move || {
            for answer in answers {
                let Ok((mut sock, _)) = listener.accept() else {
                    return;
                };
                let mut reader = std::io::BufReader::new(sock.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen.lock().unwrap().push(head.to_ascii_lowercase());
                let _ = sock.write_all(&answer);
            }
        });
        (url, heads)
    }

    fn ok(body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nETag: \"e1\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn partial(from: usize, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 206 Partial Content\r\nETag: \"e1\"\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len() - 1,
            body.len(),
            body.len() - from
        )
        .into_bytes();
        r.extend_from_slice(&body[from..]);
        r
    }

    /// Runs a download of [`BODY`] from `url` into a partial file that holds
    /// `kept` to start with; the outcome and the file's bytes.
    fn run(name: &str, url: &str, kept: &[u8], attempts: u32) -> (Result<(), Failed>, Vec<u8>) {
        let dir =
            std::env::temp_dir().join(format!("holosync-fetch-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("holosync.0123456789abcdef.part");
        std::fs::write(&path, kept).unwrap();
        let limits = http::Limits {
            stall: Duration::from_secs(10),
            max_time: Duration::from_secs(30),
            max_bytes: 1 << 20,
            max_bytes_per_sec: None,
        };
        let retries = Retries {
            max_attempts: attempts,
            base_ms: 1,
            max_ms: 2,
        };
        let mut fetch = Fetch::open("0.9.0", url, &sha(BODY), &path, limits, retries).unwrap();
        let mut pool = Pool::new(crate::proxy::Proxies::default());
        let give_up = Instant::now() + Duration::from_secs(30);
        let result = loop {
            assert!(Instant::now() < give_up, "no outcome within 30 s");
            let deadline = Instant::now() + Duration::from_millis(20);
            if let Poll::Ready(r) = fetch.step(deadline, &mut pool) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        drop(fetch);
        let bytes = std::fs::read(&path).unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        (result, bytes)
    }

    fn range(head: &str) -> Option<&str> {
        head.lines()
            .find_map(|l| l.strip_prefix("range: "))
            .map(str::trim)
    }

    #[test]
    fn a_kept_prefix_that_is_already_whole_needs_no_request() {
        let (url, heads) = serve(Vec::new());
        let (result, bytes) = run("whole", &url, BODY, 1);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        assert!(heads.lock().unwrap().is_empty());
    }

    #[test]
    fn a_cut_is_resumed_with_range_and_the_validator_seen() {
        let mut cut = ok(BODY);
        cut.truncate(cut.len() - BODY.len() + 20);
        let (url, heads) = serve(vec![cut, partial(20, BODY)]);
        let (result, bytes) = run("cut", &url, b"", 2);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        let heads = heads.lock().unwrap();
        assert_eq!(range(&heads[0]), None);
        assert_eq!(range(&heads[1]), Some("bytes=20-"));
        assert!(heads[1].contains("if-range: \"e1\""), "{}", heads[1]);
    }

    #[test]
    fn a_416_or_a_range_at_another_offset_starts_over_from_byte_0() {
        let refused =
            b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let (url, heads) = serve(vec![refused.to_vec(), ok(BODY)]);
        let (result, bytes) = run("416", &url, &[b'x'; 10], 1);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        let heads = heads.lock().unwrap();
        assert_eq!(range(&heads[0]), Some("bytes=10-"));
        assert!(!heads[0].contains("if-range"), "no validator known");
        assert_eq!(range(&heads[1]), None);

        let (url, heads) = serve(vec![partial(5, BODY), ok(BODY)]);
        let (result, bytes) = run("offset", &url, &BODY[..10], 1);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        assert_eq!(heads.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_200_to_a_range_request_is_taken_whole() {
        let (url, heads) = serve(vec![ok(BODY)]);
        let (result, bytes) = run("200", &url, &[b'x'; 10], 1);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        assert_eq!(range(&heads.lock().unwrap()[0]), Some("bytes=10-"));
    }

    #[test]
    fn a_wrong_resumed_file_starts_over_but_a_wrong_whole_one_is_refused() {
        // The kept bytes are wrong: resumed, mismatched, fetched whole, right.
        let (url, heads) = serve(vec![partial(10, BODY), ok(BODY)]);
        let (result, bytes) = run("wrongpart", &url, &[b'x'; 10], 1);
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(bytes, BODY);
        assert_eq!(range(&heads.lock().unwrap()[1]), None);

        let (url, _) = serve(vec![ok(b"something else entirely")]);
        let (result, _) = run("wrongwhole", &url, b"", 3);
        let failed = result.unwrap_err();
        assert!(failed.why.contains("sha256 mismatch"), "{}", failed.why);
        assert!(!failed.keep);
    }

    #[test]
    fn transient_failures_are_retried_up_to_max_attempts_then_kept() {
        let busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let (url, heads) = serve(vec![busy.to_vec(), busy.to_vec(), busy.to_vec()]);
        let (result, bytes) = run("503", &url, &BODY[..10], 2);
        let failed = result.unwrap_err();
        assert!(failed.keep);
        assert!(failed.why.contains("attempt 2 of 2"), "{}", failed.why);
        assert_eq!(bytes, &BODY[..10], "the kept bytes stay");
        assert_eq!(heads.lock().unwrap().len(), 2);

        let (url, _) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec()
        ]);
        let failed = run("404", &url, b"", 5).0.unwrap_err();
        assert!(!failed.keep, "{}", failed.why);
    }
}
