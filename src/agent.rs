//! The one loop: each turn polls the broker link, dispatches what arrived,
//! and gives every piece of work in progress (a projector message, a
//! download) one bounded slice. See ARCHITECTURE.md for the timing budget.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{MqttOptions, QoS};

use crate::cache;
use crate::config::Config;
use crate::download::{self, Done, Download, Failure, Resume};
use crate::error::{Context, Result};
use crate::http;
use crate::link::{Ack, Delivery, Link};
use crate::message;
use crate::projector::{self, Batch};
use crate::queue::{self, Job, Queue, Validators};

/// Longest time one piece of work (a download, a projector) runs per turn
/// before the broker link gets its turn again.
pub const WORK_SLICE: Duration = Duration::from_millis(20);

/// How often a commit that failed (database locked) is tried again.
const COMMIT_RETRY: Duration = Duration::from_millis(500);

/// How often a failing held commit is logged again (the first failure always is).
const COMMIT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// With nothing due, the queue is looked at again after this (rows can also
/// arrive from `holosync enqueue` in another process).
const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// A wall clock that moved this much less than the monotonic clock between
/// two turns jumped back.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

/// How long a clean stop waits for the broker to get the DISCONNECT.
const STOP_FLUSH: Duration = Duration::from_millis(500);

/// Queue meta key holding the running agent's start time; emptied by a clean
/// stop, so a start that finds it set knows the last run ended abruptly.
const RUNNING_KEY: &str = "running_since";

/// Skipped payload entries logged one by one per message; the rest are counted.
const MAX_SKIPPED_LINES: usize = 10;

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

/// The running agent: config, queue, broker link and the work in progress.
pub struct Agent {
    /// The validated config.
    config: Config,
    /// The durable queue.
    queue: Queue,
    /// The broker link.
    link: Link,
    /// How downloads are done.
    settings: download::Settings,
    /// Sync messages not committed yet (database busy): retried, acked if
    /// their connection is still up.
    held: Vec<Delivery>,
    /// When held commits and unrecorded results are tried again.
    retry_at: Instant,
    /// When a failing held commit was last logged.
    commit_failure_logged: Option<Instant>,
    /// Projector messages in progress, oldest first.
    projectors: VecDeque<Batch>,
    /// The download in progress.
    download: Option<Download>,
    /// When the last download started (downloads start `interval_ms` apart).
    last_start: Option<Instant>,
    /// The start before that: a download that turns out to be only a check
    /// (not modified) gives its turn back.
    previous_start: Option<Instant>,
    /// When to look at the queue for a due row.
    next_check: Instant,
    /// Results the queue could not take yet (database busy).
    unrecorded: Vec<Record>,
    /// The wall clock and monotonic clock at the last turn, to see jumps.
    clock: (Instant, i64),
}

/// Milliseconds since the Unix epoch (the queue's clock: it survives restarts).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Agent {
    /// Opens the queue, settles the client id and prepares the broker link.
    pub fn new(config: Config, config_path: PathBuf) -> Result<Agent> {
        let queue = Queue::open_or_recover(&config.database)?;
        let client_id = client_id(&config, &queue)?;
        log::info!(
            "holosync {} starting: config {}, client id {client_id}, broker {}:{}, cache {}, database {}",
            env!("CARGO_PKG_VERSION"),
            config_path.display(),
            config.mqtt.host,
            config.mqtt.port,
            config.cache_dir.display(),
            config.database.display()
        );
        std::fs::create_dir_all(&config.cache_dir).context(|| {
            format!(
                "could not create cache folder {}",
                config.cache_dir.display()
            )
        })?;
        let keep = queue
            .partial_downloads()?
            .iter()
            .filter_map(|job| cache::local_path(&config.cache_dir, &job.url).ok())
            .map(|p| cache::temp_file_of(&p))
            .collect();
        cache::remove_temp_files(&config.cache_dir, &keep);
        if let Some(since) = queue.meta(RUNNING_KEY)?.filter(|s| !s.is_empty()) {
            log::warn!(
                "the previous run (started {since}) ended without stopping: a crash, a kill, a power cut or a Windows log-off"
            );
        }
        queue.set_meta(
            RUNNING_KEY,
            &crate::logger::utc_timestamp(SystemTime::now()),
        )?;
        let moved = queue.clamp_schedule(unix_ms(), config.download.retry_max_ms)?;
        if moved > 0 {
            log::warn!(
                "{moved} queued URLs were scheduled too far ahead (the clock was ahead when they were queued); they are due now"
            );
        }

        let m = &config.mqtt;
        let mut options = MqttOptions::new(client_id, m.host.clone(), m.port);
        options.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
        if let Some(user) = &m.username {
            let password = m.password.as_ref().map_or("", |p| p.expose());
            options.set_credentials(user.clone(), password);
        }
        let topics = m
            .sync_topics()
            .iter()
            .map(|t| (t.clone(), QoS::AtLeastOnce))
            // QoS 0: a stale power command must not fire hours later.
            .chain([(m.projector_topic.clone(), QoS::AtMostOnce)])
            .collect();
        let link = Link::new(options, topics);

        let d = &config.download;
        let settings = download::Settings {
            limits: http::Limits {
                stall: Duration::from_secs(d.timeout_secs),
                max_time: Duration::from_secs(d.max_secs),
                max_bytes: d.max_bytes,
                max_bytes_per_sec: d.max_bytes_per_sec,
            },
            reencode_jpeg_quality: d.reencode_jpeg_quality,
        };
        let now = Instant::now();
        Ok(Agent {
            config,
            queue,
            link,
            settings,
            held: Vec::new(),
            retry_at: now,
            commit_failure_logged: None,
            projectors: VecDeque::new(),
            download: None,
            last_start: None,
            previous_start: None,
            next_check: now,
            unrecorded: Vec::new(),
            clock: (now, unix_ms()),
        })
    }

    /// Runs until a stop is requested (see `os::watch_stop`), then stops cleanly.
    pub fn run(mut self) {
        crate::os::on_stop_wake(self.link.stop_waker());
        loop {
            if let Some(why) = crate::os::stop_requested() {
                self.stop(why);
                return;
            }
            self.turn();
        }
    }

    /// A clean stop: leave the download and projector work (a download's
    /// temporary file is removed; its row stays due), say goodbye to the
    /// broker, and mark the run as ended in the queue.
    fn stop(mut self, why: &str) {
        log::info!("stopping: {why}");
        if let Some(dl) = self.download.take() {
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
            if let Err(e) = self
                .queue
                .set_partial(&job, resume.partial, &resume.validators)
            {
                log::warn!("{}", e.chain());
            }
        }
        if !self.projectors.is_empty() {
            log::warn!(
                "left {} projector messages unfinished",
                self.projectors.len()
            );
        }
        self.record_pending();
        self.link.flush(STOP_FLUSH);
        if let Err(e) = self.queue.set_meta(RUNNING_KEY, "") {
            log::warn!("{}", e.chain());
        }
        log::info!("holosync stopped ({why})");
        crate::os::stopped();
    }

    /// One turn: the link, what arrived, the clocks, then one slice of each
    /// piece of work.
    fn turn(&mut self) {
        let idle_until = self.idle_until();
        self.link.poll(idle_until);
        while let Some(d) = self.link.next_delivery() {
            self.dispatch(d);
        }
        self.watch_clock();
        if Instant::now() >= self.retry_at {
            self.retry_at = Instant::now() + COMMIT_RETRY;
            self.commit_held();
            self.record_pending();
        }
        if let Some(batch) = self.projectors.front_mut() {
            if batch.step(&self.config.projector, Instant::now() + WORK_SLICE) {
                let batch = self.projectors.pop_front().expect("stepped above");
                self.publish_results(&batch);
            }
        }
        if self.download.is_none() && self.unrecorded.is_empty() {
            self.start_download();
        }
        if let Some(dl) = &mut self.download {
            let stepped = dl.step(Instant::now() + WORK_SLICE);
            if let Poll::Ready(result) = stepped {
                let dl = self.download.take().expect("stepped above");
                self.finished(dl, result);
            } else if let Some(r) = dl.take_resume() {
                // How far it got, so a crash or a restart resumes from there.
                if let Err(e) = self.queue.set_partial(dl.job(), r.partial, &r.validators) {
                    log::debug!("{}", e.chain());
                }
            }
        }
    }

    /// None when work is due now; else when the loop next has something to do.
    fn idle_until(&self) -> Option<Instant> {
        if !self.projectors.is_empty() || self.download.is_some() {
            return None;
        }
        let now = Instant::now();
        let mut until = now + IDLE_RECHECK;
        if self.unrecorded.is_empty() {
            until = until.min(self.next_check);
        }
        if !self.held.is_empty() || !self.unrecorded.is_empty() {
            until = until.min(self.retry_at);
        }
        (until > now).then_some(until)
    }

    /// Handles one message from the broker.
    fn dispatch(&mut self, d: Delivery) {
        let m = &self.config.mqtt;
        let topic = &d.publish.topic;
        if m.sync_topics().contains(topic) {
            let max = m.max_payload_bytes;
            if d.publish.payload.len() > max {
                log::error!(
                    "dropped a sync message on {topic} of {} bytes: over mqtt.max_payload_bytes ({max}); acknowledged so the broker does not send it again",
                    d.publish.payload.len(),
                );
                self.ack(&d);
                return;
            }
            // A later copy (redelivered after a reconnect) stands for an
            // earlier one still held: one commit, one ack on the right link.
            self.held.retain(|h| {
                !(Link::is_later(&d, h)
                    && h.publish.topic == d.publish.topic
                    && h.publish.payload == d.publish.payload)
            });
            if !self.commit_sync(&d) {
                self.held.push(d);
            }
        } else if *topic == m.projector_topic {
            if let Some(batch) = projector::parse_batch(&d.publish.payload, &self.config.projector)
            {
                self.projectors.push_back(batch);
            }
            self.ack(&d);
        } else {
            log::debug!("ignored a message on unexpected topic {topic}");
            self.ack(&d);
        }
    }

    /// Queues one sync message's URLs in one durable transaction and acks it
    /// after the commit. Returns false when the commit failed (kept, unacked).
    fn commit_sync(&mut self, d: &Delivery) -> bool {
        let publish = &d.publish;
        let parsed = message::parse_sync(&publish.payload);
        let now_ms = unix_ms();
        let committed =
            self.queue
                .enqueue(&parsed.entries, now_ms, self.config.download.retry_max_ms);
        let r = match committed {
            Ok(r) => r,
            Err(e) => {
                let now = Instant::now();
                if self
                    .commit_failure_logged
                    .is_none_or(|t| now.duration_since(t) >= COMMIT_FAILURE_LOG_EVERY)
                {
                    self.commit_failure_logged = Some(now);
                    log::error!(
                        "could not commit a message from {} (kept unacknowledged, will retry every {} ms): {}",
                        publish.topic,
                        COMMIT_RETRY.as_millis(),
                        e.chain()
                    );
                }
                return false;
            }
        };
        self.commit_failure_logged = None;
        for s in parsed.skipped.iter().take(MAX_SKIPPED_LINES) {
            log::warn!(
                "skipped entry {:?} in a message on {}: {}",
                s.entry,
                publish.topic,
                s.reason
            );
        }
        if parsed.skipped.len() > MAX_SKIPPED_LINES {
            log::warn!(
                "skipped {} more entries in the same message",
                parsed.skipped.len() - MAX_SKIPPED_LINES
            );
        }
        for e in &parsed.entries {
            if let Some(reason) = &e.rejected {
                log::warn!(
                    "rejected {}: {reason} (stored as failed, nothing written)",
                    e.url
                );
            }
        }
        log::info!(
            "queued {} URLs from {} ({} already queued, {} rejected, {} skipped)",
            r.queued,
            publish.topic,
            r.duplicates,
            r.rejected,
            parsed.skipped.len()
        );
        self.ack(d);
        if r.queued > 0 {
            self.next_check = self.next_check.min(Instant::now());
        }
        true
    }

    fn ack(&self, d: &Delivery) {
        if self.link.ack(d) == Ack::Stale {
            log::info!(
                "not acknowledging a message on {}: it came on an earlier broker connection, where its packet id now means nothing (the broker sends it again; the queue ignores the copy)",
                d.publish.topic
            );
        }
    }

    /// Tries the held messages again, oldest first, until one fails.
    fn commit_held(&mut self) {
        while let Some(d) = self.held.first().cloned() {
            if !self.commit_sync(&d) {
                return;
            }
            self.held.remove(0);
        }
    }

    /// Looks for a due row and starts downloading it, if the pause since the
    /// last start allows.
    fn start_download(&mut self) {
        let now = Instant::now();
        if now < self.next_check {
            return;
        }
        let interval = Duration::from_millis(self.config.download.interval_ms);
        if let Some(allowed) = self.last_start.map(|t| t + interval) {
            if now < allowed {
                self.next_check = allowed;
                return;
            }
        }
        let job = match self.queue.next_due(unix_ms()) {
            Ok(Some(job)) => job,
            Ok(None) => {
                let wait = match self.queue.next_due_time() {
                    Ok(Some(at)) => {
                        Duration::from_millis(at.saturating_sub(unix_ms()).max(0) as u64)
                    }
                    _ => IDLE_RECHECK,
                };
                self.next_check = now + wait.min(IDLE_RECHECK);
                return;
            }
            Err(e) => {
                log::error!("{}", e.chain());
                self.next_check = now + COMMIT_RETRY;
                return;
            }
        };
        match Download::start(&job, &self.config.cache_dir, self.settings) {
            Ok(dl) => {
                self.previous_start = self.last_start;
                self.last_start = Some(now);
                self.download = Some(dl);
            }
            // Refused before any network traffic: no pause is due.
            Err(failure) => self.record(job, Err(failure), Duration::ZERO, Resume::default()),
        }
    }

    fn finished(&mut self, mut dl: Download, result: std::result::Result<Done, Failure>) {
        let elapsed = dl.elapsed();
        let job = dl.job().clone();
        let resume = dl.take_resume().unwrap_or_default();
        if matches!(result, Ok(Done::NotModified { .. })) {
            // A check, not a transfer: the pause between transfers does not apply.
            self.last_start = self.previous_start;
        }
        self.record(job, result, elapsed, resume);
        let interval = Duration::from_millis(self.config.download.interval_ms);
        let allowed = self.last_start.map_or(Instant::now(), |t| t + interval);
        self.next_check = allowed.max(Instant::now());
    }

    /// Logs the result of one download and records it in the queue.
    fn record(
        &mut self,
        job: Job,
        result: std::result::Result<Done, Failure>,
        took: Duration,
        resume: Resume,
    ) {
        let ms = took.as_millis();
        let now = unix_ms();
        let d = &self.config.download;
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
                Record::Done(job, size, validators)
            }
            Err(Failure::Permanent(reason)) => {
                log::warn!("failed {}: {reason} (not retried)", job.url);
                Record::Failed(job, reason)
            }
            Err(Failure::Transient {
                reason,
                retry_after,
            }) => {
                let attempt = job.attempts + 1;
                if attempt >= d.max_attempts {
                    let reason = format!("gave up after {attempt} attempts: {reason}");
                    log::warn!("failed {}: {reason}", job.url);
                    Record::Failed(job, reason)
                } else {
                    let delay =
                        queue::retry_delay(attempt, d.retry_base_ms, d.retry_max_ms, retry_after);
                    let kept = if resume.partial > 0 {
                        format!("; {} bytes kept to resume", resume.partial)
                    } else {
                        String::new()
                    };
                    log::warn!(
                        "download of {} failed (attempt {attempt} of {}), next try in {:.1} s: {reason}{kept}",
                        job.url,
                        d.max_attempts,
                        delay.as_secs_f64()
                    );
                    Record::Retry(job, reason, now + delay.as_millis() as i64, resume)
                }
            }
        };
        self.unrecorded.push(record);
        self.record_pending();
    }

    /// Writes the results not yet in the queue; keeps them on failure.
    fn record_pending(&mut self) {
        while let Some(record) = self.unrecorded.first() {
            let now = unix_ms();
            let written = match record {
                Record::Done(job, size, v) => self.queue.mark_done(job, *size, v, now),
                Record::Failed(job, reason) => self.queue.mark_failed(job, reason, now),
                Record::Retry(job, reason, next, r) => self
                    .queue
                    .set_partial(job, r.partial, &r.validators)
                    .and_then(|()| self.queue.mark_retry(job, reason, *next, now)),
            };
            if let Err(e) = written {
                log::error!("{} (will retry)", e.chain());
                return;
            }
            self.unrecorded.remove(0);
        }
    }

    fn publish_results(&self, batch: &Batch) {
        if let Some(topic) = &self.config.projector.result_topic {
            if let Err(e) = self.link.publish(topic, false, batch.report().into_bytes()) {
                log::warn!("could not publish projector results to {topic}: {e}");
            }
        }
    }

    /// Notices a wall clock that jumped back and puts stranded rows on time.
    fn watch_clock(&mut self) {
        let (then, then_ms) = self.clock;
        let now = Instant::now();
        let now_ms = unix_ms();
        let mono = now.duration_since(then).as_millis() as i64;
        let wall = now_ms - then_ms;
        self.clock = (now, now_ms);
        if wall < mono - CLOCK_JUMP.as_millis() as i64 {
            let back = (mono - wall) / 1000;
            match self
                .queue
                .clamp_schedule(now_ms, self.config.download.retry_max_ms)
            {
                Ok(n) => log::warn!(
                    "the system clock went back by about {back} s; rescheduled {n} queued URLs so none waits longer than download.retry_max_ms"
                ),
                Err(e) => log::error!("{}", e.chain()),
            }
            self.next_check = now;
        }
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

/// The configured client id, else the one made on first start and kept in the database.
fn client_id(config: &Config, queue: &Queue) -> Result<String> {
    if let Some(id) = &config.mqtt.client_id {
        return Ok(id.clone());
    }
    if let Some(id) = queue.meta("client_id")? {
        return Ok(id);
    }
    let id = format!("holosync-{}-{:08x}", hostname(), random_u32());
    queue.set_meta("client_id", &id)?;
    log::info!("made a new MQTT client id {id}; it is kept in the database and reused");
    Ok(id)
}

/// The machine's name, reduced to characters every broker accepts in a client id.
fn hostname() -> String {
    let raw = std::env::var("COMPUTERNAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    if clean.is_empty() {
        "kiosk".into()
    } else {
        clean.to_ascii_lowercase()
    }
}

/// 32 random bits from std's randomly keyed hasher (no extra crate needed).
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}
