//! One download in progress, in bounded steps: the HTTP GET in slices, the
//! body verified as it arrives and written to a temporary file beside its
//! final name, renamed into place only once complete and verified. Failures
//! are split into worth retrying and will not get better.

use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::cache::{self, TempFile};
pub use crate::http::Failure;
use crate::http::{Get, Limits, Progress};
use crate::queue::Job;
use crate::verify::{self, Kind, Verifier};

/// Longest `Retry-After` honoured, so a hostile header cannot park a URL for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How downloads are done, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Time and size limits of one attempt.
    pub limits: Limits,
    /// Re-encode JPEGs at this quality instead of storing the bytes unchanged.
    pub reencode_jpeg_quality: Option<u8>,
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
}

/// One download in progress.
pub struct Download {
    /// The queue row.
    job: Job,
    /// The cache root.
    root: PathBuf,
    /// Where the file goes.
    path: PathBuf,
    /// The request.
    get: Get,
    /// The body so far.
    body: Vec<u8>,
    /// Whether the whole body is in.
    complete: bool,
    /// Checks the body as it arrives; made when the head is in.
    verifier: Option<Verifier>,
    /// The verdict, once reached.
    kind: Option<Kind>,
    /// The temporary file, once the first byte is in.
    temp: Option<TempFile>,
    /// Body bytes written to the temporary file.
    written: usize,
    /// The settings.
    settings: Settings,
    /// When the attempt began.
    started: Instant,
}

impl Download {
    /// Starts downloading `job` into the cache under `root`, or says at once
    /// why it cannot be (a bad URL or a path clash).
    pub fn start(job: Job, root: &Path, settings: Settings) -> Result<Download, (Job, Failure)> {
        let path = match cache::local_path(root, &job.url) {
            Ok(p) => p,
            Err(e) => return Err((job, Failure::Permanent(format!("rejected path: {e}")))),
        };
        if let Some(why) = cache::clash(root, &path) {
            return Err((job, Failure::Permanent(why)));
        }
        let get = match Get::start(&job.url, Vec::new(), settings.limits) {
            Ok(g) => g,
            Err(f) => return Err((job, f)),
        };
        Ok(Download {
            job,
            root: root.to_path_buf(),
            path,
            get,
            body: Vec::new(),
            complete: false,
            verifier: None,
            kind: None,
            temp: None,
            written: 0,
            settings,
            started: Instant::now(),
        })
    }

    /// The queue row being downloaded.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Time since the attempt began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Does a bounded piece of work, returning by `deadline` (give or take a
    /// few ms); `Ready` with the file in place or the reason it is not.
    pub fn step(&mut self, deadline: Instant) -> Poll<Result<Stored, Failure>> {
        match self.advance(deadline) {
            Ok(None) => Poll::Pending,
            Ok(Some(stored)) => Poll::Ready(Ok(stored)),
            Err(f) => {
                if let Some(t) = self.temp.take() {
                    t.discard();
                }
                Poll::Ready(Err(f))
            }
        }
    }

    /// Consumes the download, removing its temporary file.
    pub fn abandon(mut self) {
        if let Some(t) = self.temp.take() {
            t.discard();
        }
    }

    fn advance(&mut self, deadline: Instant) -> Result<Option<Stored>, Failure> {
        if !self.complete {
            // Half the slice for the network, the rest for checking what came.
            let now = Instant::now();
            let fetch_until = now + deadline.saturating_duration_since(now) / 2;
            match self.get.step(&mut self.body, fetch_until)? {
                Progress::Pending => {}
                Progress::Head => self.on_head()?,
                Progress::Body(_) => self.write_new()?,
                Progress::End => self.complete = true,
            }
        }
        let Some(verifier) = self.verifier.as_mut() else {
            return Ok(None);
        };
        if self.kind.is_none() {
            match verifier.step(&self.body, self.complete, deadline) {
                verify::Progress::NeedMore | verify::Progress::Paused => return Ok(None),
                verify::Progress::Done(Err(e)) => return Err(Failure::Permanent(e)),
                verify::Progress::Done(Ok(kind)) => self.kind = Some(kind),
            }
        }
        match (self.complete, self.kind) {
            (true, Some(kind)) => self.finish(kind).map(Some),
            _ => Ok(None),
        }
    }

    /// The final head is in: refuse error statuses before any byte is kept.
    fn on_head(&mut self) -> Result<(), Failure> {
        let head = self.get.head().expect("Progress::Head comes with a head");
        if let Some(f) = status_failure(head.status, head.header("retry-after")) {
            return Err(f);
        }
        self.verifier = Some(Verifier::new(&self.job.url, head.header("content-type")));
        Ok(())
    }

    /// Appends the bytes that arrived to the temporary file (not when they
    /// will be re-encoded: then only the result is written).
    fn write_new(&mut self) -> Result<(), Failure> {
        if self.settings.reencode_jpeg_quality.is_some() || self.written == self.body.len() {
            return Ok(());
        }
        if self.temp.is_none() {
            let temp = TempFile::create(&self.path).map_err(|e| self.write_failure(e))?;
            self.temp = Some(temp);
        }
        let temp = self.temp.as_mut().expect("made above");
        temp.write(&self.body[self.written..])
            .map_err(|e| write_failure(&self.root, &self.path, e))?;
        self.written = self.body.len();
        Ok(())
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
        })
    }

    fn write_failure(&self, e: std::io::Error) -> Failure {
        write_failure(&self.root, &self.path, e)
    }
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
        let capped = status_failure(503, Some("99999999"));
        assert!(
            matches!(capped, Some(Failure::Transient { retry_after: Some(d), .. }) if d == MAX_RETRY_AFTER)
        );
    }
}
