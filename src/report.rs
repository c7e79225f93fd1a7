//! What a kiosk tells its fleet over MQTT, and the commands it takes, in
//! the conventions MQTT users know (Home Assistant, Tasmota, Zigbee2MQTT):
//!
//! - `<prefix>/state`, retained: `{"online":true,...}` on every connect, the
//!   Last Will `{"online":false,...}` when the link dies, and the same
//!   `offline` published by a clean stop;
//! - `<prefix>/status`, retained: the queue and cache figures of `holosync
//!   status --json`, after connecting and when something changed, at most
//!   once per `report.status_interval_secs`;
//! - `<prefix>/events`, QoS 0: one message per finished download or command,
//!   grouped into one message a second when they come faster than 10 a second;
//! - `<prefix>/cmd` and the fleet topic, QoS 1: `status`, `retry-failed`,
//!   `audit`, `forget`, acknowledged once their effect is committed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cache;
use crate::config;
use crate::link::{Delivery, Link};
use crate::queue::Queue;
use crate::transfers::{Finished, Transfers};

/// Failures listed in a status.
pub const STATUS_FAILURES: usize = 20;

/// Events published one by one per second before they are grouped.
const EVENTS_PER_SECOND: f64 = 10.0;

/// How often grouped events go out.
const GROUP_EVERY: Duration = Duration::from_secs(1);

/// Most events in one grouped message (a bigger group is split).
const MAX_GROUP: usize = 100;

/// Most bytes of events in one grouped message: far below what the link
/// publishes at most (`link::MAX_PUBLISH_BYTES`), since every event is small
/// (ids are cut, lists of URLs are capped).
const MAX_GROUP_BYTES: usize = 256 * 1024;

/// URLs one command may name.
const MAX_COMMAND_URLS: usize = 10_000;

/// Longest command id echoed in an answer or a log line, in characters; a
/// longer one is cut and marked with `…` (the answer must stay small
/// whatever the id: see `link::MAX_PUBLISH_BYTES`).
const MAX_ID_CHARS: usize = 64;

/// Ids of the last commands carried out, kept in the database, so a command
/// the broker delivers again (its ack was lost in a reconnect) is answered
/// "already done" instead of run twice.
const REMEMBERED_IDS: usize = 64;

/// Queue meta key holding the remembered ids (a JSON array).
const REMEMBERED_IDS_KEY: &str = "command_ids";

/// URLs (or failed rows) a `retry-failed` or `forget` changes per
/// transaction; the rest waits for the next turn.
const URLS_PER_STEP: usize = 256;

/// Commands with a long effect (`retry-failed`, `forget`) waiting; one more
/// is answered "busy" and dropped.
const MAX_WAITING_JOBS: usize = 8;

/// Commands answered individually when they join an audit in progress.
const MAX_AUDIT_IDS: usize = 16;

/// Missing files named in an audit's answer and log line.
const MAX_LISTED: usize = 20;

/// Done rows an audit checks per clock read.
const AUDIT_CHECKS_PER_CLOCK: usize = 64;

/// A fleet command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Publish the status now.
    Status,
    /// Put failed rows back to pending: all, or these URLs.
    RetryFailed(Option<Vec<String>>),
    /// Check every cached file (exists, same size); queue again what is not.
    Audit,
    /// Remove these URLs' rows (the files stay).
    Forget(Vec<String>),
}

impl Command {
    /// The command's name in messages.
    fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::RetryFailed(_) => "retry-failed",
            Command::Audit => "audit",
            Command::Forget(_) => "forget",
        }
    }
}

/// Parses `{"id": ..., "command": ..., "urls": [...]}`; on error, the id (if
/// one could be read, else null) and why.
pub fn parse_command(payload: &[u8]) -> Result<(Value, Command), (Value, String)> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| (Value::Null, format!("not JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err((Value::Null, "not a JSON object".into()));
    };
    let id = match o.get("id") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::String(id)) => Value::String(cut_id(id)),
        Some(id @ Value::Number(_)) => id.clone(),
        Some(_) => return Err((Value::Null, "\"id\" must be a string or a number".into())),
    };
    let fail = |why: String| Err((id.clone(), why));
    let urls = match o.get("urls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.len() <= MAX_COMMAND_URLS => {
            let mut urls = Vec::with_capacity(a.len());
            for u in a {
                match u {
                    Value::String(s) if s.len() <= crate::message::MAX_URL_BYTES => {
                        urls.push(s.clone())
                    }
                    _ => return fail("\"urls\" must hold URL strings".into()),
                }
            }
            Some(urls)
        }
        Some(Value::Array(_)) => {
            return fail(format!("\"urls\" may name at most {MAX_COMMAND_URLS} URLs"))
        }
        Some(_) => return fail("\"urls\" must be an array".into()),
    };
    let command = match o.get("command").and_then(Value::as_str) {
        Some("status") => Command::Status,
        Some("retry-failed") => Command::RetryFailed(urls),
        Some("audit") => Command::Audit,
        Some("forget") => match urls {
            Some(urls) if !urls.is_empty() => Command::Forget(urls),
            _ => return fail("\"forget\" needs the \"urls\" to forget".into()),
        },
        Some(other) => {
            let shown: String = other.chars().take(50).collect();
            return fail(format!(
                "unknown command {shown:?} (status, retry-failed, audit, forget)"
            ));
        }
        None => return fail("no \"command\"".into()),
    };
    Ok((id, command))
}

/// `id` as echoed: at most [`MAX_ID_CHARS`] characters, a longer one cut and
/// marked with `…`.
fn cut_id(id: &str) -> String {
    match id.char_indices().nth(MAX_ID_CHARS) {
        None => id.to_string(),
        Some((at, _)) => format!("{}…", &id[..at]),
    }
}

/// `d` kept only to be acknowledged later: None for QoS 0 (nothing to ack),
/// else a copy without its payload (which may be large).
fn ack_handle(d: &Delivery) -> Option<Delivery> {
    if d.publish.qos == rumqttc::QoS::AtMostOnce {
        return None;
    }
    let mut d = d.clone();
    d.publish.payload.clear();
    Some(d)
}

/// Whether a message's ack may go out now, or only once its effect is done.
#[derive(Debug, PartialEq, Eq)]
pub enum Acked {
    /// The effect is committed: ack now.
    Now,
    /// The effect comes later (an audit): the report acks it then.
    Later,
}

/// The topics, those that are turned on.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `<prefix>/state`.
    pub state: Option<String>,
    /// `<prefix>/status`.
    pub status: Option<String>,
    /// `<prefix>/events`.
    pub events: Option<String>,
    /// `<prefix>/cmd` and the fleet topic.
    pub commands: Vec<String>,
}

impl Topics {
    /// The topics for `config`, under `holosync/<client id>` unless a prefix is set.
    pub fn new(config: &config::Report, client_id: &str) -> Topics {
        let prefix = config
            .prefix
            .clone()
            .unwrap_or_else(|| format!("holosync/{client_id}"));
        let on = |yes: bool, name: &str| yes.then(|| format!("{prefix}/{name}"));
        let mut commands: Vec<String> = on(config.commands, "cmd").into_iter().collect();
        if config.commands && !config.fleet_topic.is_empty() {
            commands.push(config.fleet_topic.clone());
        }
        Topics {
            state: on(config.state, "state"),
            status: on(config.status, "status"),
            events: on(config.events, "events"),
            commands,
        }
    }
}

/// Who this kiosk is, for the state messages.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The MQTT client id.
    pub client_id: String,
    /// When this run started (UTC).
    pub started_at: String,
    /// The machine's name.
    pub host: String,
}

impl Identity {
    /// `{"online":true,...}`.
    pub fn online(&self) -> Vec<u8> {
        json!({
            "online": true,
            "version": env!("CARGO_PKG_VERSION"),
            "client_id": self.client_id,
            "started_at": self.started_at,
            "host": self.host,
        })
        .to_string()
        .into_bytes()
    }

    /// `{"online":false,...}`, saying why: the Last Will (`connection lost`)
    /// or a clean stop (`stopped`).
    pub fn offline(&self, reason: &str) -> Vec<u8> {
        json!({
            "online": false,
            "version": env!("CARGO_PKG_VERSION"),
            "client_id": self.client_id,
            "started_at": self.started_at,
            "host": self.host,
            "reason": reason,
        })
        .to_string()
        .into_bytes()
    }
}

/// Events waiting to be published: at most [`EVENTS_PER_SECOND`] go out one
/// by one; past that they are grouped, one message a second.
#[derive(Debug)]
struct Events {
    /// Events that may go out one by one now (a token bucket).
    tokens: f64,
    /// When the tokens were last topped up.
    refilled: Instant,
    /// Events waiting for the next group message.
    group: Vec<Value>,
    /// When the oldest of them came.
    group_since: Option<Instant>,
}

impl Events {
    fn new() -> Events {
        Events {
            tokens: EVENTS_PER_SECOND,
            refilled: Instant::now(),
            group: Vec::new(),
            group_since: None,
        }
    }

    /// Adds an event; returns it as a message if it may go out at once.
    fn push(&mut self, event: Value) -> Option<Vec<u8>> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * EVENTS_PER_SECOND).min(EVENTS_PER_SECOND);
        self.refilled = now;
        if self.group.is_empty() && self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Some(event.to_string().into_bytes());
        }
        self.group.push(event);
        self.group_since.get_or_insert(now);
        None
    }

    /// The grouped messages due now: every waiting event, in order.
    fn due(&mut self) -> Vec<Vec<u8>> {
        match self.group_since {
            Some(t) if t.elapsed() >= GROUP_EVERY => {}
            _ => return Vec::new(),
        }
        self.group_since = None;
        // Split by count and by size, so no message nears the packet limit.
        let mut messages = Vec::new();
        let mut chunk: Vec<Value> = Vec::new();
        let mut bytes = 0;
        for event in std::mem::take(&mut self.group) {
            let size = event.to_string().len();
            if !chunk.is_empty() && (chunk.len() >= MAX_GROUP || bytes + size > MAX_GROUP_BYTES) {
                messages.push(
                    json!({"events": std::mem::take(&mut chunk)})
                        .to_string()
                        .into_bytes(),
                );
                bytes = 0;
            }
            bytes += size;
            chunk.push(event);
        }
        if !chunk.is_empty() {
            messages.push(json!({"events": chunk}).to_string().into_bytes());
        }
        messages
    }

    /// When the waiting group is due.
    fn next_due(&self) -> Option<Instant> {
        self.group_since.map(|t| t + GROUP_EVERY)
    }
}

/// A `retry-failed` or `forget` in progress, a transaction per step.
struct Job {
    /// The command's id.
    id: Value,
    /// The command (`RetryFailed` or `Forget`).
    command: Command,
    /// URLs of the command's list done so far.
    pos: usize,
    /// Rows changed so far.
    changed: usize,
    /// The command message, acked once the whole effect is committed.
    delivery: Option<Delivery>,
}

/// The audit in progress (one at most: commands that ask for one while it
/// runs join it): every done row's file checked, a slice at a time.
struct Audit {
    /// The ids of the commands that asked for it (none for the audit at
    /// start-up), the first [`MAX_AUDIT_IDS`].
    ids: Vec<Value>,
    /// How many commands asked for it in all.
    asked: usize,
    /// The QoS 1 command messages, acked once the requeue is committed.
    deliveries: Vec<Delivery>,
    /// The rows to check (loaded at the first step).
    rows: Option<Vec<(i64, String, Option<u64>)>>,
    /// Rows checked so far.
    pos: usize,
    /// Rows whose file is missing or changed: id and URL.
    missing: Vec<(i64, String)>,
}

/// The fleet report: state, status, events and commands.
pub struct Report {
    /// The topics turned on.
    topics: Topics,
    /// Who this kiosk is.
    identity: Identity,
    /// The cache root (audits check files there; the status tells its free space).
    cache_dir: PathBuf,
    /// Least time between two status messages.
    status_interval: Duration,
    /// Something changed since the last status message.
    status_dirty: bool,
    /// A status is wanted now (after a connect, or asked for).
    status_now: bool,
    /// When the last status went out.
    status_sent: Option<Instant>,
    /// Events waiting.
    events: Events,
    /// The audit in progress.
    audit: Option<Audit>,
    /// `retry-failed` and `forget` commands in progress, oldest first.
    jobs: VecDeque<Job>,
    /// Ids of the last commands carried out (their JSON), oldest first.
    done_ids: VecDeque<String>,
    /// A failing step was logged (logged again only after a success).
    step_failure_logged: bool,
}

impl Report {
    /// The report for `config`, as kiosk `identity`.
    pub fn new(config: &config::Config, identity: Identity) -> Report {
        Report {
            topics: Topics::new(&config.report, &identity.client_id),
            identity,
            cache_dir: config.cache_dir.clone(),
            status_interval: Duration::from_secs(config.report.status_interval_secs),
            status_dirty: true,
            status_now: false,
            status_sent: None,
            events: Events::new(),
            audit: None,
            jobs: VecDeque::new(),
            done_ids: VecDeque::new(),
            step_failure_logged: false,
        }
    }

    /// Loads the ids of the commands carried out by earlier runs.
    pub fn load_done_ids(&mut self, queue: &Queue) {
        match queue.meta(REMEMBERED_IDS_KEY) {
            Ok(Some(json)) => {
                let ids: Vec<String> = serde_json::from_str(&json).unwrap_or_default();
                self.done_ids = ids.into_iter().rev().take(REMEMBERED_IDS).rev().collect();
            }
            Ok(None) => {}
            Err(e) => log::warn!("{}", e.chain()),
        }
    }

    /// Remembers (durably enough: a lost id only means a command runs twice,
    /// which every command survives) that the command `id` was carried out.
    fn remember(&mut self, queue: &Queue, id: &Value) {
        if id.is_null() {
            return;
        }
        if self.done_ids.len() >= REMEMBERED_IDS {
            self.done_ids.pop_front();
        }
        self.done_ids.push_back(id.to_string());
        let json = serde_json::to_string(&self.done_ids).expect("strings always serialize");
        if let Err(e) = queue.set_meta(REMEMBERED_IDS_KEY, &json) {
            log::warn!("{}", e.chain());
        }
    }

    /// The topics turned on.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Who this kiosk is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether `topic` carries commands.
    pub fn is_command_topic(&self, topic: &str) -> bool {
        self.topics.commands.iter().any(|t| t == topic)
    }

    /// The link came up: a status goes out at once.
    pub fn connected(&mut self) {
        self.status_now = true;
    }

    /// The queue changed (a message queued, a row moved): a status is due.
    pub fn changed(&mut self) {
        self.status_dirty = true;
    }

    /// A download finished: one event, and a status is due.
    pub fn finished(&mut self, link: &Link, f: &Finished) {
        self.status_dirty = true;
        self.event(link, json!(f));
    }

    /// Checks every cached file (the start-up audit, or the command `id`
    /// delivered in `d`); a command that comes while an audit runs joins it.
    pub fn start_audit(&mut self, link: &Link, id: Option<Value>, d: Option<&Delivery>) {
        let audit = self.audit.get_or_insert_with(|| Audit {
            ids: Vec::new(),
            asked: 0,
            deliveries: Vec::new(),
            rows: None,
            pos: 0,
            missing: Vec::new(),
        });
        audit.deliveries.extend(d.and_then(ack_handle));
        let Some(id) = id else { return };
        audit.asked += 1;
        if audit.ids.len() < MAX_AUDIT_IDS {
            audit.ids.push(id);
        } else {
            self.event(
                link,
                json!({"id": id, "command": "audit", "ok": true, "joined": true}),
            );
        }
    }

    /// Takes a command message: answers a bad or repeated one, carries out
    /// `status` at once, and starts the others (their effect is committed in
    /// steps; the message is acked when it is all committed). One log line
    /// and one answer event per command.
    pub fn command(&mut self, link: &Link, queue: &Queue, d: &Delivery) -> Acked {
        let (id, command) = match parse_command(&d.publish.payload) {
            Ok(c) => c,
            Err((id, why)) => {
                log::warn!("ignored a command on {}: {why}", d.publish.topic);
                self.event(link, json!({"id": id, "error": why}));
                return Acked::Now;
            }
        };
        let name = command.name();
        if !id.is_null() && self.done_ids.contains(&id.to_string()) {
            log::info!(
                "command {name} (id {id}) came again; it was already carried out, so not again"
            );
            self.event(
                link,
                json!({"id": id, "command": name, "ok": true, "already_done": true}),
            );
            return Acked::Now;
        }
        match command {
            Command::Status => {
                log::info!("command {name} (id {id}): publishing the status now");
                self.status_now = true;
                let gap = link.longest_poll_gap().as_millis() as u64;
                self.remember(queue, &id);
                self.event(
                    link,
                    json!({"id": id, "command": name, "ok": true, "longest_poll_gap_ms": gap}),
                );
                Acked::Now
            }
            Command::Audit => {
                if self.audit.is_some() {
                    log::debug!("command {name} (id {id}): joins the audit in progress");
                } else {
                    log::info!("command {name} (id {id}): checking every cached file");
                }
                self.start_audit(link, Some(id), Some(d));
                Acked::Later
            }
            Command::RetryFailed(_) | Command::Forget(_) => {
                if self.jobs.len() >= MAX_WAITING_JOBS {
                    let why = format!(
                        "busy: {} earlier retry-failed or forget commands are still running; send it again later",
                        self.jobs.len()
                    );
                    log::warn!("command {name} (id {id}) refused: {why}");
                    self.event(link, json!({"id": id, "command": name, "error": why}));
                    return Acked::Now;
                }
                self.jobs.push_back(Job {
                    id,
                    command,
                    pos: 0,
                    changed: 0,
                    delivery: ack_handle(d),
                });
                Acked::Later
            }
        }
    }

    /// Works on the oldest `retry-failed` or `forget` until `deadline`, a
    /// transaction of at most [`URLS_PER_STEP`] URLs at a time; when its
    /// whole effect is committed, answers and returns its message (to ack).
    fn job_step(
        &mut self,
        link: &Link,
        queue: &mut Queue,
        transfers: &mut Transfers,
        deadline: Instant,
    ) -> Option<Option<Delivery>> {
        loop {
            let job = self.jobs.front_mut()?;
            let now = crate::queue::unix_ms();
            let forget = matches!(job.command, Command::Forget(_));
            let (result, end) = match &job.command {
                Command::RetryFailed(Some(urls)) | Command::Forget(urls) => {
                    let end = (job.pos + URLS_PER_STEP).min(urls.len());
                    let chunk = &urls[job.pos..end];
                    let r = if forget {
                        queue.forget(chunk)
                    } else {
                        queue.retry_failed(Some(chunk), now)
                    };
                    (r, Some((end, end == urls.len())))
                }
                _ => (queue.retry_failed_some(URLS_PER_STEP, now), None),
            };
            let finished = match (end, &result) {
                (Some((end, last)), Ok(_)) => {
                    job.pos = end;
                    last
                }
                (None, Ok(n)) => *n < URLS_PER_STEP,
                (_, Err(_)) => false,
            };
            match result {
                Ok(n) => {
                    self.step_failure_logged = false;
                    job.changed += n;
                    if n > 0 {
                        self.status_dirty = true;
                        if !forget {
                            transfers.wake();
                        }
                    }
                }
                Err(e) => {
                    // The database is busy: tried again next turn, unacknowledged.
                    if !std::mem::replace(&mut self.step_failure_logged, true) {
                        log::warn!("{} (trying again)", e.chain());
                    }
                    return None;
                }
            }
            if finished {
                let job = self.jobs.pop_front().expect("worked on above");
                let name = job.command.name();
                let id = job.id;
                let answer = match &job.command {
                    Command::Forget(urls) => {
                        log::info!(
                            "command {name} (id {id}): forgot {} of {} URLs",
                            job.changed,
                            urls.len()
                        );
                        json!({"id": id, "command": name, "ok": true, "forgotten": job.changed})
                    }
                    _ => {
                        log::info!(
                            "command {name} (id {id}): {} failed URLs queued again",
                            job.changed
                        );
                        json!({"id": id, "command": name, "ok": true, "requeued": job.changed})
                    }
                };
                self.remember(queue, &id);
                self.event(link, answer);
                return Some(job.delivery);
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Answers a command that was not read (over its size limit): its id is
    /// unknown, so the answer's is null.
    pub fn refused(&mut self, link: &Link, why: &str) {
        self.event(link, json!({"id": Value::Null, "error": why}));
    }

    /// Publishes `event` now, or groups it (see [`Events`]).
    fn event(&mut self, link: &Link, event: Value) {
        let Some(topic) = &self.topics.events else {
            return;
        };
        if let Some(payload) = self.events.push(event) {
            if let Err(e) = link.publish(topic, false, payload) {
                log::debug!("could not publish an event to {topic}: {e}");
            }
        }
    }

    /// Whether an audit or a command is in progress (work the loop must not wait on).
    pub fn busy(&self) -> bool {
        self.audit.is_some() || !self.jobs.is_empty()
    }

    /// When the report has something to publish (a throttled status, a
    /// group of events); None when nothing is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        [self.status_due(), self.events.next_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// When the next status message may go out, if one is wanted.
    fn status_due(&self) -> Option<Instant> {
        if self.topics.status.is_none() {
            None
        } else if self.status_now {
            Some(Instant::now())
        } else if self.status_dirty {
            Some(
                self.status_sent
                    .map_or_else(Instant::now, |t| t + self.status_interval),
            )
        } else {
            None
        }
    }

    /// One slice: a piece of an audit, then what is due to publish. Returns
    /// the command messages whose effect is now committed (to be acked).
    pub fn step(
        &mut self,
        link: &Link,
        queue: &mut Queue,
        transfers: &mut Transfers,
        deadline: Instant,
    ) -> Vec<Delivery> {
        let mut to_ack = Vec::new();
        if let Some(done) = self.job_step(link, queue, transfers, deadline) {
            to_ack.extend(done);
        }
        if Instant::now() < deadline {
            to_ack.extend(
                self.audit_step(link, queue, transfers, deadline)
                    .unwrap_or_default(),
            );
        }
        if let Some(topic) = &self.topics.events {
            for payload in self.events.due() {
                if let Err(e) = link.publish(topic, false, payload) {
                    log::debug!("could not publish events to {topic}: {e}");
                }
            }
        }
        if link.is_up() && self.status_due().is_some_and(|t| t <= Instant::now()) {
            self.publish_status(link, queue);
        }
        to_ack
    }

    /// Publishes the status (retained) if its time has come.
    fn publish_status(&mut self, link: &Link, queue: &Queue) {
        let Some(topic) = &self.topics.status else {
            return;
        };
        let mut status = match queue.status(STATUS_FAILURES) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("{}", e.chain());
                return;
            }
        };
        status.cache_free_bytes = crate::os::free_bytes(&self.cache_dir);
        let payload = serde_json::to_vec(&status).expect("a status always serializes");
        match link.publish(topic, true, payload) {
            Ok(()) => {
                self.status_sent = Some(Instant::now());
                self.status_dirty = false;
                self.status_now = false;
            }
            Err(e) => log::debug!("could not publish the status to {topic}: {e}"),
        }
    }

    /// Works on the oldest audit until `deadline`; when it is done and its
    /// requeue committed, answers and returns its command message (if any).
    fn audit_step(
        &mut self,
        link: &Link,
        queue: &mut Queue,
        transfers: &mut Transfers,
        deadline: Instant,
    ) -> Option<Vec<Delivery>> {
        let audit = self.audit.as_mut()?;
        let rows = match &audit.rows {
            Some(rows) => rows,
            None => match queue.done_files() {
                Ok(rows) => audit.rows.insert(rows),
                Err(e) => {
                    log::debug!("{}", e.chain());
                    return None;
                }
            },
        };
        while audit.pos < rows.len() {
            for (id, url, size) in rows.iter().skip(audit.pos).take(AUDIT_CHECKS_PER_CLOCK) {
                let in_place = cache::local_path(&self.cache_dir, url)
                    .ok()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .is_some_and(|m| m.is_file() && size.is_none_or(|n| m.len() == n));
                if !in_place {
                    audit.missing.push((*id, url.clone()));
                }
            }
            audit.pos = (audit.pos + AUDIT_CHECKS_PER_CLOCK).min(rows.len());
            if Instant::now() >= deadline {
                return None;
            }
        }
        let ids: Vec<i64> = audit.missing.iter().map(|(id, _)| *id).collect();
        let checked = rows.len();
        if !ids.is_empty() {
            if let Err(e) = queue.requeue(&ids, crate::queue::unix_ms()) {
                // Tried again next turn; the command stays unacknowledged.
                if !std::mem::replace(&mut self.step_failure_logged, true) {
                    log::warn!("audit: {} (trying again)", e.chain());
                }
                return None;
            }
            self.step_failure_logged = false;
            transfers.wake();
            self.status_dirty = true;
        }
        let audit = self.audit.take().expect("worked on above");
        let listed: Vec<&str> = audit
            .missing
            .iter()
            .take(MAX_LISTED)
            .map(|(_, u)| u.as_str())
            .collect();
        let who = match audit.ids.first() {
            None if audit.asked == 0 => "audit at start-up".to_string(),
            None => format!("audit asked for by {} commands", audit.asked),
            Some(id) if audit.asked == 1 => format!("command audit (id {id})"),
            Some(id) => format!(
                "command audit (id {id}, and {} more commands that joined it)",
                audit.asked - 1
            ),
        };
        if ids.is_empty() {
            log::info!("{who}: all {checked} cached files are in place");
        } else {
            log::warn!(
                "{who}: {} of {checked} cached files were missing or changed; queued again: {}{}",
                ids.len(),
                listed.join(", "),
                if ids.len() > listed.len() {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        for id in &audit.ids {
            self.remember(queue, id);
            self.event(
                link,
                json!({"id": id, "command": "audit", "ok": true, "checked": checked,
                       "requeued": ids.len(), "urls": listed}),
            );
        }
        Some(audit.deliveries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_with_their_id() {
        assert_eq!(
            parse_command(br#"{"id": "a1", "command": "status"}"#),
            Ok((json!("a1"), Command::Status))
        );
        assert_eq!(
            parse_command(br#"{"id": 7, "command": "retry-failed", "urls": ["http://h/a.jpg"]}"#),
            Ok((
                json!(7),
                Command::RetryFailed(Some(vec!["http://h/a.jpg".into()]))
            ))
        );
        assert_eq!(
            parse_command(br#"{"command": "retry-failed"}"#),
            Ok((Value::Null, Command::RetryFailed(None)))
        );
        assert_eq!(
            parse_command(br#"{"command": "audit", "extra": 1}"#),
            Ok((Value::Null, Command::Audit))
        );
    }

    #[test]
    fn bad_commands_say_why_and_keep_the_id() {
        let err = |p: &[u8]| parse_command(p).unwrap_err();
        assert_eq!(err(b"{nope").0, Value::Null);
        assert!(err(b"{nope").1.contains("not JSON"));
        assert!(err(b"[1]").1.contains("object"));
        let (id, why) = err(br#"{"id": "x", "command": "reboot"}"#);
        assert_eq!((id, why.contains("unknown command")), (json!("x"), true));
        assert!(err(br#"{"id": "x", "command": "forget"}"#)
            .1
            .contains("urls"));
        assert!(err(br#"{"command": "forget", "urls": [1]}"#)
            .1
            .contains("URL strings"));
        assert!(err(br#"{"id": {"a": 1}, "command": "status"}"#)
            .1
            .contains("id"));
    }

    #[test]
    fn topics_follow_the_prefix_and_the_switches() {
        let mut c: config::Report = serde_json::from_str("{}").unwrap();
        let t = Topics::new(&c, "kiosk-1");
        assert_eq!(t.state.as_deref(), Some("holosync/kiosk-1/state"));
        assert_eq!(t.commands, ["holosync/kiosk-1/cmd", "holosync/all/cmd"]);
        c.prefix = Some("mall/2/k1".into());
        c.events = false;
        c.fleet_topic = String::new();
        let t = Topics::new(&c, "kiosk-1");
        assert_eq!(t.status.as_deref(), Some("mall/2/k1/status"));
        assert_eq!(t.events, None);
        assert_eq!(t.commands, ["mall/2/k1/cmd"]);
    }

    #[test]
    fn long_ids_are_cut_and_marked() {
        let long = "é".repeat(1_100_000);
        let (id, command) =
            parse_command(format!(r#"{{"id":"{long}","command":"status"}}"#).as_bytes()).unwrap();
        assert_eq!(command, Command::Status);
        let id = id.as_str().unwrap();
        assert_eq!(id.chars().count(), MAX_ID_CHARS + 1);
        assert!(id.ends_with('…') && id.starts_with("éé"));
        assert_eq!(cut_id(&"a".repeat(MAX_ID_CHARS)), "a".repeat(MAX_ID_CHARS));
    }

    #[test]
    fn grouped_events_stay_far_below_the_packet_limit() {
        let mut e = Events::new();
        e.tokens = 0.0;
        let big = "u".repeat(40_000);
        for i in 0..60 {
            assert!(e.push(json!({"id": i, "url": big})).is_none());
        }
        e.group_since = Some(Instant::now() - GROUP_EVERY);
        let groups = e.due();
        assert!(groups.len() >= 2, "{} groups", groups.len());
        let mut ids = Vec::new();
        for g in &groups {
            assert!(g.len() <= MAX_GROUP_BYTES + 41_000, "{} bytes", g.len());
            let v: Value = serde_json::from_slice(g).unwrap();
            ids.extend(
                v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["id"].as_u64().unwrap()),
            );
        }
        assert_eq!(ids, (0..60).collect::<Vec<u64>>(), "every event, in order");
    }

    #[test]
    fn events_past_ten_a_second_are_grouped() {
        let mut e = Events::new();
        let sent: usize = (0..25)
            .filter_map(|i| e.push(json!({"url": format!("u{i}")})))
            .count();
        assert_eq!(sent, 10);
        assert_eq!(e.group.len(), 15);
        assert!(e.due().is_empty(), "a group waits a second");
        e.group_since = Some(Instant::now() - GROUP_EVERY);
        let groups = e.due();
        assert_eq!(groups.len(), 1);
        let v: Value = serde_json::from_slice(&groups[0]).unwrap();
        assert_eq!(v["events"].as_array().unwrap().len(), 15);
        assert_eq!(v["events"][0]["url"], "u10");
    }
}
