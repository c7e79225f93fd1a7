//! The downloads side of the loop: which queue row is fetched next and when
//! (at most one start per `download.interval_ms`; a check answered "not
//! modified" gives its turn back), the downloads in progress, and their
//! results in the queue (kept and written again later if the database is
//! busy).
//!
//! Two downloads overlap, still on the one thread: once a download's bytes
//! are all in, it moves aside to be checked and written while the next one
//! already transfers, so the link does not idle during that work. Only one
//! transfer is on the network at a time.

use std::path::PathBuf;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::config;
use crate::download::{self, Done, Download, Failure, Resume};
use crate::http::Pool;
use crate::queue::{self, Job, Queue, Validators};

/// With nothing due, the queue is looked at again after this (rows can also
/// arrive from `holosync enqueue` in another process).
const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// How long the download on the network may wait for bytes when another one
/// waits to be finished (checked and written): enough to send a request.
const NETWORK_TASTE: Duration = Duration::from_millis(1);

/// How soon a queue read that failed (database busy) is tried again.
const QUEUE_RETRY: Duration = Duration::from_millis(500);

/// What the queue must record about a finished download.
#[derive(Debug)]
enum Record {
    /// The file is in place: its size and version.
    Done(Job, u64, Validators),
    /// Given up on, with the reason.
    Failed(Job, String),
    /// Try again at `next_ms`, resuming from what was kept.
    Retry(Job, String, i64, Resume),
}

/// One finished download, as the fleet report tells it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Finished {
    /// The URL.
    pub url: String,
    /// `done`, `failed` or `retry`.
    pub state: &'static str,
    /// Bytes in place (done) or received (otherwise).
    pub bytes: u64,
    /// How long the attempt took.
    pub ms: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The downloads: pacing, the one in progress, results to record.
pub struct Transfers {
    /// The cache root.
    root: PathBuf,
    /// How downloads are done.
    settings: download::Settings,
    /// Least time between two starts.
    interval: Duration,
    /// Attempts, backoff.
    retries: Retries,
    /// The download on the network.
    download: Option<Download>,
    /// The download whose bytes are all in, being checked and written.
    finishing: Option<Download>,
    /// When the last download started.
    last_start: Option<Instant>,
    /// The start before that (a check that needed no transfer gives its turn back).
    previous_start: Option<Instant>,
    /// When to look at the queue for a due row.
    next_check: Instant,
    /// Results the queue could not take yet (database busy).
    unrecorded: Vec<Record>,
    /// Kept-alive connections to picture servers.
    pool: Pool,
}

/// The retry settings.
#[derive(Debug, Clone, Copy)]
struct Retries {
    /// Attempts before giving up.
    max_attempts: u32,
    /// First delay.
    base_ms: u64,
    /// Longest delay.
    max_ms: u64,
}

impl Transfers {
    /// The downloads side for `config`; it looks at the queue at once.
    pub fn new(
        config: &config::Config,
        settings: download::Settings,
        proxies: crate::proxy::Proxies,
    ) -> Transfers {
        let d = &config.download;
        Transfers {
            root: config.cache_dir.clone(),
            settings,
            interval: Duration::from_millis(d.interval_ms),
            retries: Retries {
                max_attempts: d.max_attempts,
                base_ms: d.retry_base_ms,
                max_ms: d.retry_max_ms,
            },
            download: None,
            finishing: None,
            last_start: None,
            previous_start: None,
            next_check: Instant::now(),
            unrecorded: Vec::new(),
            pool: Pool::new(proxies),
        }
    }

    /// New rows were queued: look at the queue now (the pace still applies).
    pub fn wake(&mut self) {
        self.next_check = self.next_check.min(Instant::now());
    }

    /// Whether a download is in progress.
    pub fn busy(&self) -> bool {
        self.download.is_some() || self.finishing.is_some()
    }

    /// When there is something to do (None: now); the loop may wait until then.
    pub fn idle_until(&self, retry_at: Instant) -> Option<Instant> {
        if self.busy() {
            return None;
        }
        Some(if self.unrecorded.is_empty() {
            self.next_check
        } else {
            retry_at
        })
    }

    /// One slice: finish the download whose bytes are in, start a due one
    /// (if the pace allows), work on the one on the network. Returns the
    /// downloads that finished.
    pub fn step(&mut self, queue: &Queue, deadline: Instant) -> Vec<Finished> {
        let mut finished = Vec::new();
        if self.download.is_none() && self.unrecorded.is_empty() {
            if let Some(f) = self.start(queue) {
                finished.push(f);
            }
        }
        if let Some(dl) = self.download.as_mut() {
            // With a download to finish, only send the request and take what
            // is there: the finishing work then runs while the reply travels.
            let until = if self.finishing.is_some() {
                Instant::now() + NETWORK_TASTE
            } else {
                deadline
            };
            match dl.step(until, &mut self.pool) {
                Poll::Ready(result) => {
                    let dl = self.download.take().expect("stepped above");
                    finished.push(self.finished(queue, dl, result));
                }
                Poll::Pending => {
                    if let Some(r) = dl.take_resume() {
                        // How far it got, so a crash or a restart resumes from there.
                        if let Err(e) = queue.set_partial(dl.job(), r.partial, &r.validators) {
                            log::debug!("{}", e.chain());
                        }
                    }
                    if dl.body_complete() && self.finishing.is_none() {
                        // The network is free: the next download may start.
                        self.finishing = self.download.take();
                        if let Some(f) = self.start(queue) {
                            finished.push(f);
                        }
                        if let Some(next) = self.download.as_mut() {
                            // Its request goes out before the finishing work.
                            if let Poll::Ready(result) =
                                next.step(Instant::now() + NETWORK_TASTE, &mut self.pool)
                            {
                                let dl = self.download.take().expect("stepped above");
                                finished.push(self.finished(queue, dl, result));
                            }
                        }
                    }
                }
            }
        }
        if let Some(dl) = &mut self.finishing {
            if let Poll::Ready(result) = dl.step(deadline, &mut self.pool) {
                let dl = self.finishing.take().expect("stepped above");
                finished.push(self.finished(queue, dl, result));
            }
        }
        finished
    }

    /// Looks for a due row and starts downloading it; a row refused before
    /// any traffic (bad path, clash) finishes at once.
    fn start(&mut self, queue: &Queue) -> Option<Finished> {
        let now = Instant::now();
        if now < self.next_check {
            return None;
        }
        if let Some(allowed) = self.last_start.map(|t| t + self.interval) {
            if now < allowed {
                self.next_check = allowed;
                return None;
            }
        }
        let cpu = crate::os::thread_cpu();
        let busy = self.finishing.as_ref().map(|dl| dl.job().id);
        let due = queue.next_due_except(crate::queue::unix_ms(), busy);
        let queue_cpu = crate::os::thread_cpu().saturating_sub(cpu);
        let job = match due {
            Ok(Some(job)) => job,
            Ok(None) => {
                let wait = match queue.next_due_time() {
                    Ok(Some(at)) => Duration::from_millis(
                        at.saturating_sub(crate::queue::unix_ms()).max(0) as u64,
                    ),
                    _ => IDLE_RECHECK,
                };
                self.next_check = now + wait.min(IDLE_RECHECK);
                return None;
            }
            Err(e) => {
                log::error!("{}", e.chain());
                self.next_check = now + QUEUE_RETRY;
                return None;
            }
        };
        match Download::start(&job, &self.root, self.settings, &mut self.pool) {
            Ok(mut dl) => {
                self.previous_start = self.last_start;
                self.last_start = Some(now);
                dl.add_queue_cpu(queue_cpu);
                self.download = Some(dl);
                None
            }
            // Refused before any network traffic: no pause is due.
            Err(failure) => {
                Some(self.record(queue, job, Err(failure), Duration::ZERO, Resume::default()))
            }
        }
    }

    fn finished(
        &mut self,
        queue: &Queue,
        mut dl: Download,
        result: Result<Done, Failure>,
    ) -> Finished {
        let elapsed = dl.elapsed();
        let job = dl.job().clone();
        let resume = dl.take_resume().unwrap_or_default();
        let cpu = dl.cpu();
        if matches!(result, Ok(Done::NotModified { .. })) {
            // A check, not a transfer: the pause between transfers does not apply.
            self.last_start = self.previous_start;
        }
        let t = crate::os::thread_cpu();
        let finished = self.record(queue, job, result, elapsed, resume);
        let queue_cpu = cpu.queue + crate::os::thread_cpu().saturating_sub(t);
        log::debug!(
            "cpu for {}: fetch {} us, verify {} us, write {} us, queue {} us",
            finished.url,
            cpu.fetch.as_micros(),
            cpu.verify.as_micros(),
            cpu.write.as_micros(),
            queue_cpu.as_micros()
        );
        let allowed = self
            .last_start
            .map_or(Instant::now(), |t| t + self.interval);
        self.next_check = allowed.max(Instant::now());
        finished
    }

    /// Logs the result of one download and records it in the queue.
    fn record(
        &mut self,
        queue: &Queue,
        job: Job,
        result: Result<Done, Failure>,
        took: Duration,
        resume: Resume,
    ) -> Finished {
        let ms = took.as_millis();
        let now = crate::queue::unix_ms();
        let r = self.retries;
        let mut finished = Finished {
            url: job.url.clone(),
            state: "done",
            bytes: 0,
            ms: ms as u64,
            error: None,
        };
        let record = match result {
            Ok(Done::Stored(s)) => {
                log::info!(
                    "cached {} -> {} ({}, {} bytes, {ms} ms, {})",
                    job.url,
                    s.path.display(),
                    s.kind,
                    s.bytes,
                    rate(s.fetched, took)
                );
                finished.bytes = s.bytes as u64;
                Record::Done(job, s.bytes as u64, s.validators)
            }
            Ok(Done::NotModified {
                path,
                size,
                validators,
            }) => {
                log::info!(
                    "not modified: {} (kept {}, {ms} ms)",
                    job.url,
                    path.display()
                );
                finished.bytes = size;
                Record::Done(job, size, validators)
            }
            Err(Failure::Permanent(reason)) => {
                log::warn!("failed {}: {reason} (not retried)", job.url);
                finished.state = "failed";
                finished.error = Some(reason.clone());
                Record::Failed(job, reason)
            }
            Err(Failure::Transient {
                reason,
                retry_after,
            }) => {
                let attempt = job.attempts + 1;
                if attempt >= r.max_attempts {
                    let reason = format!("gave up after {attempt} attempts: {reason}");
                    log::warn!("failed {}: {reason}", job.url);
                    finished.state = "failed";
                    finished.error = Some(reason.clone());
                    Record::Failed(job, reason)
                } else {
                    // Jittered, so kiosks that met the same outage do not all come back at once.
                    let backoff = crate::random::jitter(queue::retry_delay(
                        attempt, r.base_ms, r.max_ms, None,
                    ))
                    .min(Duration::from_millis(r.max_ms));
                    let delay = backoff.max(queue::retry_delay(0, 0, r.max_ms, retry_after));
                    let kept = if resume.partial > 0 {
                        format!("; {} bytes kept to resume", resume.partial)
                    } else {
                        String::new()
                    };
                    log::warn!(
                        "download of {} failed (attempt {attempt} of {}), next try in {:.1} s: {reason}{kept}",
                        job.url,
                        r.max_attempts,
                        delay.as_secs_f64()
                    );
                    finished.state = "retry";
                    finished.bytes = resume.partial;
                    finished.error = Some(reason.clone());
                    Record::Retry(job, reason, now + delay.as_millis() as i64, resume)
                }
            }
        };
        self.unrecorded.push(record);
        self.record_pending(queue);
        finished
    }

    /// Writes the results not yet in the queue; keeps them on failure.
    pub fn record_pending(&mut self, queue: &Queue) {
        while let Some(record) = self.unrecorded.first() {
            let now = crate::queue::unix_ms();
            let written = match record {
                Record::Done(job, size, v) => queue.mark_done(job, *size, v, now),
                Record::Failed(job, reason) => queue.mark_failed(job, reason, now),
                Record::Retry(job, reason, next, r) => queue
                    .set_partial(job, r.partial, &r.validators)
                    .and_then(|()| queue.mark_retry(job, reason, *next, now)),
            };
            if let Err(e) = written {
                log::error!("{} (will retry)", e.chain());
                return;
            }
            self.unrecorded.remove(0);
        }
    }

    /// The agent stops: the download in progress is left (its temporary
    /// file kept if it can be resumed), what is unrecorded is tried once more.
    pub fn stop(&mut self, queue: &Queue) {
        for dl in [self.finishing.take(), self.download.take()]
            .into_iter()
            .flatten()
        {
            let job = dl.job().clone();
            let resume = dl.abandon();
            log::info!(
                "left the download of {} unfinished (it stays queued{})",
                job.url,
                if resume.partial > 0 {
                    format!("; {} bytes kept to resume", resume.partial)
                } else {
                    String::new()
                }
            );
            if let Err(e) = queue.set_partial(&job, resume.partial, &resume.validators) {
                log::warn!("{}", e.chain());
            }
        }
        self.record_pending(queue);
    }
}

/// A transfer rate for the log: `1.2 MB/s`, `350 KB/s`.
fn rate(bytes: u64, took: Duration) -> String {
    let per_sec = bytes as f64 / took.as_secs_f64().max(0.001);
    if per_sec >= 1e6 {
        format!("{:.1} MB/s", per_sec / 1e6)
    } else {
        format!("{:.0} KB/s", per_sec / 1e3)
    }
}
