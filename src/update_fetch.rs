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
