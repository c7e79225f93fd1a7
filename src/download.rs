//! One download in progress, in bounded steps: the HTTP GET in slices, the
//! body verified as it arrives and written to a temporary file beside its
//! final name, renamed into place only once complete and verified. Failures
//! are split into worth retrying and will not get better.
//!
//! An interrupted download keeps its temporary file (synced every 1 MiB or
//! second) and the server's validator, so the next attempt asks only for the
//! rest (`Range` + `If-Range`); a URL synced again while its file is in place
//! is asked for with `If-None-Match` / `If-Modified-Since`, and a `304` keeps
//! the file as it is.

use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::cache::{self, TempFile};
pub use crate::http::Failure;
use crate::http::{Get, Head, Limits, Pool, Progress};
use crate::queue::{Job, Validators};
use crate::verify::{self, Kind, Verifier, Whole};

/// Longest `Retry-After` honoured, so a hostile header cannot park a URL for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Bytes of a kept partial file read back into memory per step (resuming).
const LOAD_STEP_BYTES: usize = 4 << 20;

/// How downloads are done, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time, size and rate limits of one attempt.
    pub limits: Limits,
    /// Re-encode JPEGs at this quality instead of storing the bytes unchanged.
    pub reencode_jpeg_quality: Option<u8>,
    /// Limits against decompression bombs.
    pub verify: verify::Limits,
}

/// How a download ended well.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// A new file is in place.
    Stored(Stored),
    /// The server said the file in place is current (`304`); nothing written.
    NotModified {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The validators, as the server repeated them.
        validators: Validators,
    },
}

/// A file that is in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// Where it is.
    pub path: PathBuf,
    /// What it is.
    pub kind: Kind,
    /// Bytes written.
    pub bytes: usize,
    /// Bytes fetched in this attempt (less than `bytes` when resumed).
    pub fetched: u64,
    /// The server's validators for this version.
    pub validators: Validators,
}

/// How far an interrupted download got: what the queue keeps so the next
/// attempt (even after a restart) can resume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resume {
    /// Bytes safely in the temporary file (0: nothing to resume).
    pub partial: u64,
    /// The validators those bytes belong to.
    pub validators: Validators,
}

/// What the request asks the server for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The whole file.
    Whole,
    /// The rest, from this offset, if the file did not change.
    Rest(u64),
    /// The whole file, unless the one in place is current.
    IfChanged,
}

/// One download in progress.
pub struct Download {
    /// The queue row.
    job: Job,
    /// The cache root.
    root: PathBuf,
    /// Where the file goes.
    path: PathBuf,
    /// What is being asked for.
    mode: Mode,
    /// The request (None while a kept prefix is read back in).
    get: Option<Get>,
    /// The body so far (a resumed download's kept prefix first).
    body: Vec<u8>,
    /// Bytes of a kept prefix still to read back into `body`.
    loading: u64,
    /// Whether the whole body is in.
    complete: bool,
    /// Checks the body as it arrives; made when the head is in.
    verifier: Option<Verifier>,
    /// The verdict, once reached.
    kind: Option<Kind>,
    /// The temporary file, once the first byte is in.
    temp: Option<TempFile>,
    /// Body bytes in the temporary file.
    written: usize,
    /// Bytes of the temporary file kept for the next attempt, once set aside.
    kept: u64,
    /// How often the temporary file is synced while it grows.
    sync_every: Option<u64>,
    /// CPU time spent on this download: fetching, verifying, writing.
    cpu: Cpu,
    /// The validators of the bytes being fetched.
    validators: Validators,
    /// The resume state changed since the queue last heard of it.
    resume_dirty: bool,
    /// The settings.
    settings: Settings,
    /// When the attempt began.
    started: Instant,
    /// Whether the attempt has already started over once (a 416, a changed file).
    restarted: bool,
}

impl Download {
    /// Starts downloading `job` into the cache under `root`, or says at once
    /// why it cannot be (a bad URL or a path clash).
    pub fn start(
        job: &Job,
        root: &Path,
        settings: Settings,
        pool: &mut Pool,
    ) -> Result<Download, Failure> {
        let path = cache::local_path(root, &job.url)
            .map_err(|e| Failure::Permanent(format!("rejected path: {e}")))?;
        if let Some(why) = cache::clash(root, &path) {
            return Err(Failure::Permanent(why));
        }
        let resumable = settings.reencode_jpeg_quality.is_none();
        let mut temp = None;
        let mut mode = Mode::Whole;
        if job.partial > 0 {
            match (resumable && if_range(&job.validators).is_some())
                .then(|| TempFile::reopen(&path, job.partial))
            {
                Some(Ok(Some(t))) => {
                    mode = Mode::Rest(job.partial);
                    temp = Some(t);
                }
                _ => {
                    let _ = std::fs::remove_file(cache::temp_file_of(&path));
                }
            }
        }
        if mode == Mode::Whole && job.size.is_some_and(|n| file_size(&path) == Some(n)) {
            let v = &job.validators;
            if v.etag.is_some() || v.last_modified.is_some() {
                mode = Mode::IfChanged;
            }
        }
        let mut dl = Download {
            loading: if let Mode::Rest(n) = mode { n } else { 0 },
            validators: job.validators.clone(),
            job: job.clone(),
            root: root.to_path_buf(),
            path,
            mode,
            get: None,
            body: Vec::new(),
            complete: false,
            verifier: None,
            kind: None,
            temp,
            written: 0,
            kept: 0,
            sync_every: sync_every(None),
            cpu: Cpu::default(),
            resume_dirty: false,
            settings,
            started: Instant::now(),
            restarted: false,
        };
        if dl.loading == 0 {
            dl.request(pool)?;
        }
        Ok(dl)
    }

    /// The queue row being downloaded.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Time since the attempt began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether every byte of the body is in (what is left is checking and
    /// writing, which need no network: the next transfer may start).
    pub fn body_complete(&self) -> bool {
        self.complete
    }

    /// The CPU time this download cost so far, by phase.
    pub fn cpu(&self) -> Cpu {
        self.cpu
    }

    /// Counts queue work done for this download (the caller measures it).
    pub fn add_queue_cpu(&mut self, d: Duration) {
        self.cpu.queue += d;
    }

    /// The resume state, when it changed since the last call (for the queue).
    pub fn take_resume(&mut self) -> Option<Resume> {
        if !self.resume_dirty {
            return None;
        }
        self.resume_dirty = false;
        Some(self.resume())
    }

    fn resume(&self) -> Resume {
        if !self.resumable() {
            return Resume::default();
        }
        Resume {
            partial: self.temp.as_ref().map_or(self.kept, TempFile::synced),
            validators: self.validators.clone(),
        }
    }

    /// Whether what is being fetched could be resumed: the bytes go to the
    /// temporary file as they come, and the server named the version.
    fn resumable(&self) -> bool {
        self.settings.reencode_jpeg_quality.is_none() && if_range(&self.validators).is_some()
    }

    /// Does a bounded piece of work, returning by `deadline` (give or take a
    /// few ms); `Ready` with the file in place or the reason it is not.
    /// After a transient failure the temporary file is kept when the next
    /// attempt can resume ([`Download::take_resume`] then says how far).
    pub fn step(&mut self, deadline: Instant, pool: &mut Pool) -> Poll<Result<Done, Failure>> {
        match self.advance(deadline, pool) {
            Ok(None) => Poll::Pending,
            Ok(Some(done)) => Poll::Ready(Ok(done)),
            Err(f) => {
                self.set_aside(matches!(f, Failure::Transient { .. }));
                Poll::Ready(Err(f))
            }
        }
    }

    /// Ends the download without a result (the agent is stopping): the
    /// temporary file stays if the next start can resume from it.
    pub fn abandon(mut self) -> Resume {
        self.set_aside(true);
        self.resume()
    }

    /// Keeps the temporary file for a later attempt (when `keep` and it can
    /// be resumed), else removes it.
    fn set_aside(&mut self, keep: bool) {
        // Bytes that came in the failing step are not written yet.
        if keep && self.resumable() && self.write_new().is_err() {
            if let Some(t) = self.temp.take() {
                t.discard();
            }
        }
        let Some(t) = self.temp.take() else {
            return;
        };
        self.resume_dirty = true;
        if keep && self.resumable() && !t.is_empty() {
            self.kept = t.keep();
        } else {
            t.discard();
            self.kept = 0;
        }
    }

    /// Starts the request for `mode`.
    fn request(&mut self, pool: &mut Pool) -> Result<(), Failure> {
        let mut headers = Vec::new();
        let mut limits = self.settings.limits;
        match self.mode {
            Mode::Whole => {}
            Mode::Rest(from) => {
                headers.push(("Range", format!("bytes={from}-")));
                headers.push((
                    "If-Range",
                    if_range(&self.validators)
                        .expect("resuming needs a validator")
                        .to_string(),
                ));
                limits.max_bytes = limits.max_bytes.saturating_sub(from);
            }
            Mode::IfChanged => {
                if let Some(etag) = &self.validators.etag {
                    headers.push(("If-None-Match", etag.clone()));
                }
                if let Some(lm) = &self.validators.last_modified {
                    headers.push(("If-Modified-Since", lm.clone()));
                }
            }
        }
        self.get = Some(Get::start(&self.job.url, headers, limits, pool)?);
        Ok(())
    }

    fn advance(&mut self, deadline: Instant, pool: &mut Pool) -> Result<Option<Done>, Failure> {
        if self.loading > 0 {
            self.load()?;
            if self.loading > 0 {
                return Ok(None);
            }
            self.request(pool)?;
        }
        if !self.complete {
            // Half the slice for the network, the rest for checking what came.
            let now = Instant::now();
            let fetch_until = now + deadline.saturating_duration_since(now) / 2;
            let get = self.get.as_mut().expect("requested above");
            let t = crate::os::thread_cpu();
            let progress = get.step(&mut self.body, fetch_until);
            self.cpu.fetch += crate::os::thread_cpu().saturating_sub(t);
            match progress? {
                Progress::Pending => {}
                Progress::Head => {
                    let head = get
                        .head()
                        .expect("Progress::Head comes with a head")
                        .clone();
                    if let Some(done) = self.on_head(&head, pool)? {
                        return Ok(Some(done));
                    }
                }
                Progress::Body(_) => {
                    let t = crate::os::thread_cpu();
                    let written = self.write_new();
                    self.cpu.write += crate::os::thread_cpu().saturating_sub(t);
                    written?;
                    let get = self.get.as_mut().expect("requested above");
                    if get.finished() {
                        self.complete = true;
                        get.release(pool);
                        // Back to the caller first: the network is free for
                        // the next transfer while this one is checked and written.
                        return Ok(None);
                    }
                }
                Progress::End => {
                    self.complete = true;
                    get.release(pool);
                    return Ok(None);
                }
            }
        }
        let Some(verifier) = self.verifier.as_mut() else {
            return Ok(None);
        };
        if self.kind.is_none() {
            // download.max_secs bounds the whole attempt: the HTTP side
            // checks it while bytes arrive (transient), this once they are
            // all in and still being verified (the same bytes would take
            // as long again: permanent).
            let max = self.settings.limits.max_time;
            if self.complete && self.started.elapsed() > max {
                return Err(Failure::Permanent(format!(
                    "not verified within download.max_secs ({} s for the whole attempt, \
                     transfer and verification; {} bytes received)",
                    max.as_secs(),
                    self.body.len()
                )));
            }
            let t = crate::os::thread_cpu();
            let progress = verifier.step(&self.body, self.complete, deadline);
            self.cpu.verify += crate::os::thread_cpu().saturating_sub(t);
            match progress {
                verify::Progress::NeedMore | verify::Progress::Paused => return Ok(None),
                verify::Progress::Done(Err(e)) => {
                    return Err(self.cut_by_close().unwrap_or(Failure::Permanent(e)))
                }
                verify::Progress::Done(Ok(kind)) => self.kind = Some(kind),
            }
        }
        match (self.complete, self.kind) {
            (true, Some(kind)) => {
                self.check_whole(kind)?;
                let t = crate::os::thread_cpu();
                let stored = self.finish(kind);
                self.cpu.write += crate::os::thread_cpu().saturating_sub(t);
                stored.map(|s| Some(Done::Stored(s)))
            }
            _ => Ok(None),
        }
    }

    /// Reads a slice of the kept prefix back into memory (the verifier checks
    /// the whole file).
    fn load(&mut self) -> Result<(), Failure> {
        let temp = self.temp.as_mut().expect("resuming keeps a temp file");
        let offset = self.body.len() as u64;
        let n = usize::try_from(self.loading)
            .unwrap_or(usize::MAX)
            .min(LOAD_STEP_BYTES);
        let bytes = temp
            .read_at(offset, n)
            .map_err(|e| write_failure(&self.root, &self.path, e))?;
        if bytes.len() < n {
            return Err(Failure::transient(format!(
                "the kept part of {} is shorter than recorded",
                self.path.display()
            )));
        }
        self.body.extend_from_slice(&bytes);
        self.loading -= bytes.len() as u64;
        self.written = self.body.len();
        Ok(())
    }

    /// The final head is in: refuse error statuses before any byte is kept,
    /// handle a resumed or conditional answer; `Some` when the download is
    /// over (not modified).
    fn on_head(&mut self, head: &Head, pool: &mut Pool) -> Result<Option<Done>, Failure> {
        let served = Validators {
            etag: head.header("etag").map(str::to_string),
            last_modified: head.header("last-modified").map(str::to_string),
        };
        match (self.mode, head.status) {
            (Mode::IfChanged, 304) => {
                let validators = Validators {
                    etag: served.etag.or(self.validators.etag.take()),
                    last_modified: served
                        .last_modified
                        .or(self.validators.last_modified.take()),
                };
                return Ok(Some(Done::NotModified {
                    path: self.path.clone(),
                    size: self.job.size.unwrap_or_default(),
                    validators,
                }));
            }
            (Mode::Rest(from), 206) => {
                let range = head.header("content-range").and_then(content_range);
                let same = match (&served.etag, &self.validators.etag) {
                    (Some(now), Some(then)) => now == then,
                    _ => true,
                };
                match range {
                    Some((start, total)) if start == from && same => {
                        log::info!(
                            "resumed {} at {from} of {} bytes",
                            self.job.url,
                            total.map_or("?".to_string(), |t| t.to_string())
                        );
                    }
                    _ => {
                        return self
                            .start_over("the server's range did not fit", pool)
                            .map(|()| None)
                    }
                }
            }
            (Mode::Rest(_), 416) => {
                return self
                    .start_over("the server refused the range (416)", pool)
                    .map(|()| None)
            }
            (Mode::Rest(_), 200) => {
                log::info!(
                    "{} changed on the server (or the server ignores ranges): starting over",
                    self.job.url
                );
                self.drop_prefix()?;
                self.mode = Mode::Whole;
            }
            (_, 206) => {
                return Err(Failure::Permanent(
                    "HTTP 206 to a request for the whole file".into(),
                ))
            }
            (_, 304) => {
                return Err(Failure::Permanent(
                    "HTTP 304 to a request that was not conditional".into(),
                ))
            }
            (_, code) => {
                if let Some(f) = status_failure(code, head.header("retry-after")) {
                    return Err(f);
                }
            }
        }
        self.validators = Validators {
            etag: served.etag,
            last_modified: served.last_modified,
        };
        let length = head.header("content-length").and_then(|v| v.parse().ok());
        self.check_room(length)?;
        // The queue hears of the validators with the first synced bytes (a
        // small picture, done in one go, costs the queue no extra write).
        self.sync_every = sync_every(length);
        if let Some(t) = &mut self.temp {
            t.sync_every(self.sync_every);
        }
        self.verifier = Some(Verifier::with_limits(
            &self.job.url,
            head.header("content-type"),
            self.settings.verify,
        ));
        Ok(None)
    }

    /// Refuses, before its body is read, a body whose Content-Length already
    /// says it cannot fit on the cache's disk: a transient failure (space
    /// comes back) that costs the network nothing. A re-encoded JPEG's size
    /// is not known until it is encoded, so it is not checked here.
    fn check_room(&self, length: Option<u64>) -> Result<(), Failure> {
        let (Some(length), None) = (length, self.settings.reencode_jpeg_quality) else {
            return Ok(());
        };
        match crate::os::free_bytes(&self.root) {
            Some(free) if free < length => Err(Failure::transient(format!(
                "no space left on the cache disk for {}: the server says {length} bytes and {} has {free} bytes free (not downloaded)",
                self.path.display(),
                self.root.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Forgets the kept prefix and asks for the whole file again (once per attempt).
    fn start_over(&mut self, why: &str, pool: &mut Pool) -> Result<(), Failure> {
        if self.restarted {
            return Err(Failure::transient(format!("{why}, again")));
        }
        log::info!("{}: {why}; starting over", self.job.url);
        self.restarted = true;
        self.drop_prefix()?;
        self.mode = Mode::Whole;
        self.validators = Validators::default();
        self.request(pool)
    }

    /// Empties the body and the temporary file.
    fn drop_prefix(&mut self) -> Result<(), Failure> {
        self.body.clear();
        self.written = 0;
        if let Some(t) = &mut self.temp {
            t.rewrite(&[])
                .map_err(|e| write_failure(&self.root, &self.path, e))?;
        }
        self.resume_dirty = true;
        Ok(())
    }

    /// Appends the bytes that arrived to the temporary file (not when they
    /// will be re-encoded: then only the result is written).
    fn write_new(&mut self) -> Result<(), Failure> {
        if self.settings.reencode_jpeg_quality.is_some() || self.written == self.body.len() {
            return Ok(());
        }
        if self.temp.is_none() {
            let mut temp = TempFile::create(&self.path).map_err(|e| self.write_failure(e))?;
            temp.sync_every(self.sync_every);
            self.temp = Some(temp);
        }
        let temp = self.temp.as_mut().expect("made above");
        let synced = temp.synced();
        temp.write(&self.body[self.written..])
            .map_err(|e| write_failure(&self.root, &self.path, e))?;
        self.written = self.body.len();
        if temp.synced() != synced {
            self.resume_dirty = true;
        }
        Ok(())
    }

    /// A body without a length that ended with a plain TCP close may have
    /// been cut anywhere: only the file can show it is whole. JPEG and PNG
    /// and WebP did already (their walkers refuse an early end); a GIF
    /// (accepted without its trailer when it has a Content-Length) or a BMP
    /// must show it by its own structure; any other file cannot, and is refused.
    fn check_whole(&self, kind: Kind) -> Result<(), Failure> {
        let ended_by_close = self.get.as_ref().is_some_and(Get::ended_by_close);
        if !ended_by_close || !matches!(kind, Kind::Other | Kind::Gif { .. }) {
            return Ok(());
        }
        if let Some(cut) = self.cut_by_close() {
            return Err(cut);
        }
        match verify::whole(&self.body) {
            Whole::Yes | Whole::Cut(_) => Ok(()),
            Whole::Unknown => Err(Failure::Permanent(
                "the body had no length (no Content-Length, not chunked) and ended when the server closed the connection, which a cut looks just like; only a JPEG, PNG, GIF, WebP or BMP can show it is whole".into(),
            )),
        }
    }

    /// A body without a length, ended by the server's close, that shows by
    /// its own structure (a GIF's trailer, a WebP's RIFF size, a BMP's file
    /// size) that the close cut it: worth another attempt, whatever the
    /// verifier made of the cut.
    fn cut_by_close(&self) -> Option<Failure> {
        let ended_by_close = self.get.as_ref().is_some_and(Get::ended_by_close);
        if !(ended_by_close && self.complete) {
            return None;
        }
        match verify::whole(&self.body) {
            Whole::Cut(why) => Some(Failure::transient(format!(
                "cut short: the body had no length and ended when the server closed the connection, and {why}"
            ))),
            Whole::Yes | Whole::Unknown => None,
        }
    }

    /// Re-encodes if asked, fsyncs and renames into place.
    fn finish(&mut self, kind: Kind) -> Result<Stored, Failure> {
        let reencoded = match (kind, self.settings.reencode_jpeg_quality) {
            (Kind::Jpeg { .. }, Some(q)) => {
                Some(verify::reencode_jpeg(&self.body, q).map_err(Failure::Permanent)?)
            }
            _ => None,
        };
        let mut temp = match self.temp.take() {
            Some(t) => t,
            None => TempFile::create(&self.path).map_err(|e| self.write_failure(e))?,
        };
        let written = match &reencoded {
            Some(bytes) => temp.rewrite(bytes).map(|()| bytes.len()),
            None => temp
                .write(&self.body[self.written..])
                .map(|()| self.body.len()),
        };
        if let Err(e) = written {
            temp.discard();
            return Err(self.write_failure(e));
        }
        temp.commit().map_err(|e| self.write_failure(e))?;
        Ok(Stored {
            path: self.path.clone(),
            kind,
            bytes: reencoded.map_or(self.body.len(), |b| b.len()),
            fetched: self.get.as_ref().map_or(0, Get::received),
            validators: self.validators.clone(),
        })
    }

    fn write_failure(&self, e: std::io::Error) -> Failure {
        write_failure(&self.root, &self.path, e)
    }
}

/// CPU time one download cost, by phase (for the benchmark's split).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpu {
    /// The HTTP side: dial, TLS, reading and framing the body.
    pub fetch: Duration,
    /// Verifying the bytes.
    pub verify: Duration,
    /// Writing the temporary file, syncing and renaming it.
    pub write: Duration,
    /// Reading and updating the queue for it.
    pub queue: Duration,
}

/// Files up to this size are synced once, at the end: a crash costs at most
/// one small download again. Bigger ones sync in steps, to resume after a
/// power cut with little lost.
const SMALL_FILE_BYTES: u64 = 4 << 20;

/// How often a temporary file of `length` bytes (if known) is synced while
/// it grows: never for a small file, every eighth of a big one (1-8 MiB).
fn sync_every(length: Option<u64>) -> Option<u64> {
    match length {
        Some(n) if n <= SMALL_FILE_BYTES => None,
        Some(n) => Some((n / 8).clamp(1 << 20, 8 << 20)),
        None => Some(1 << 20),
    }
}

/// The validator to send as `If-Range`: a strong ETag, else Last-Modified
/// (a weak ETag may not be used for ranges).
pub(crate) fn if_range(v: &Validators) -> Option<&str> {
    v.etag
        .as_deref()
        .filter(|e| !e.starts_with("W/"))
        .or(v.last_modified.as_deref())
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`): the start and the total.
pub(crate) fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

/// Size of a regular file, if there is one.
fn file_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// A failed write: a path clash (permanent), a full disk or a file held open
/// by the display program (transient: space and locks come back).
fn write_failure(root: &Path, path: &Path, e: std::io::Error) -> Failure {
    if let Some(why) = cache::clash(root, path) {
        return Failure::Permanent(why);
    }
    let p = path.display();
    Failure::transient(match (e.kind(), e.raw_os_error()) {
        (std::io::ErrorKind::StorageFull, _) => {
            format!("no space left on the cache disk writing {p}: {e}")
        }
        // ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION: the display program has it open.
        (_, Some(5 | 32)) if cfg!(windows) => {
            format!("{p} is in use (kept the old file, will retry): {e}")
        }
        _ => format!("could not write {p}: {e}"),
    })
}

/// What a status code means for the queue; None for success.
pub fn status_failure(code: u16, retry_after: Option<&str>) -> Option<Failure> {
    let retry_after = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    match code {
        200..=203 | 205..=299 => None,
        204 => Some(Failure::Permanent("HTTP 204: no content".into())),
        408 | 425 | 429 | 500..=599 => Some(Failure::Transient {
            reason: format!("HTTP {code}"),
            retry_after,
        }),
        300..=399 => Some(Failure::Permanent(format!(
            "HTTP {code}: redirect without a usable Location"
        ))),
        _ => Some(Failure::Permanent(format!("HTTP {code}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_codes_pass() {
        assert_eq!(status_failure(200, None), None);
        assert_eq!(status_failure(203, None), None);
    }

    #[test]
    fn gone_and_forbidden_are_permanent() {
        for code in [400, 401, 403, 404, 410, 451] {
            assert!(
                matches!(status_failure(code, None), Some(Failure::Permanent(_))),
                "{code}"
            );
        }
    }

    #[test]
    fn server_trouble_is_transient_and_keeps_retry_after() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(status_failure(code, None), Some(Failure::Transient { .. })),
                "{code}"
            );
        }
        assert_eq!(
            status_failure(429, Some("7")),
            Some(Failure::Transient {
                reason: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            })
        );
        // A day is honoured as sent; more is capped at a day.
        assert_eq!(
            status_failure(503, Some("86400")),
            Some(Failure::Transient {
                reason: "HTTP 503".into(),
                retry_after: Some(Duration::from_secs(86400))
            })
        );
        let capped = status_failure(503, Some("99999999"));
        assert!(
            matches!(capped, Some(Failure::Transient { retry_after: Some(d), .. }) if d == MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn content_range_gives_start_and_total() {
        assert_eq!(content_range("bytes 100-199/1000"), Some((100, Some(1000))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("items 1-2/3"), None);
        assert_eq!(content_range("bytes x-9/10"), None);
    }

    #[test]
    fn if_range_wants_a_strong_etag_or_a_date() {
        let v = |e: Option<&str>, l: Option<&str>| Validators {
            etag: e.map(str::to_string),
            last_modified: l.map(str::to_string),
        };
        assert_eq!(if_range(&v(Some("\"a\""), None)), Some("\"a\""));
        assert_eq!(if_range(&v(Some("W/\"a\""), None)), None);
        assert_eq!(
            if_range(&v(Some("W/\"a\""), Some("Tue, 01 Dec 2026 10:00:00 GMT"))),
            Some("Tue, 01 Dec 2026 10:00:00 GMT")
        );
    }
}
