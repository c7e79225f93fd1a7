//! The fleet commands (`status`, `retry-failed`, `audit`, `forget`): each
//! message parsed (bounded before, its id cut for the answer), the ids of
//! the last commands run (kept in the queue, so a redelivery is answered
//! "already done"), `retry-failed` and `forget` in steps of a transaction
//! each, and the one audit in slices that later `audit` commands join.

use std::time::Instant;

use serde_json::{json, Value};

use super::{Acked, Report};
use crate::cache;
use crate::link::{Delivery, Link};
use crate::queue::Queue;
use crate::transfers::Transfers;
use crate::update::{Order, Request, UpdateRequest};

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

/// Done rows an audit reads from the queue at a time.
const AUDIT_PAGE_ROWS: usize = 1024;

/// Done rows an audit checks per clock read.
const AUDIT_CHECKS_PER_CLOCK: usize = 64;

/// A fleet command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Publish the status now.
    Status,
    /// Put failed rows back to pending: all, or these URLs.
    RetryFailed(Option<Vec<String>>),
    /// Check every cached file (exists, same size); queue again what is not.
    Audit,
    /// Remove these URLs' rows (the files stay).
    Forget(Vec<String>),
    /// Install a new version, or patch the config (see `update.rs`).
    Update(Request),
}

impl Command {
    /// The command's name in messages.
    fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::RetryFailed(_) => "retry-failed",
            Command::Audit => "audit",
            Command::Forget(_) => "forget",
            Command::Update(Request::Update(_)) => "update",
            Command::Update(Request::SetConfig { .. }) => "set-config",
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
        Some("update") => Command::Update(Request::Update(Box::new(
            parse_update(&o).map_err(|why| (id.clone(), why))?,
        ))),
        Some("set-config") => {
            let signature = match o.get("signature") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.len() <= MAX_SIGNATURE_CHARS => Some(s.clone()),
                Some(_) => return fail("\"signature\" must be a hex or base64 string".into()),
            };
            match o.get("patch") {
                Some(patch @ Value::Object(_)) => Command::Update(Request::SetConfig {
                    patch: patch.clone(),
                    signature,
                    seq: match o.get("seq") {
                        None | Some(Value::Null) => None,
                        Some(v) => match v.as_u64() {
                            Some(n) => Some(n),
                            None => return fail("\"seq\" must be a whole number".into()),
                        },
                    },
                }),
                _ => {
                    return fail(
                        "\"set-config\" needs a \"patch\" object (a JSON merge patch)".into(),
                    )
                }
            }
        }
        Some("forget") => match urls {
            Some(urls) if !urls.is_empty() => Command::Forget(urls),
            _ => return fail("\"forget\" needs the \"urls\" to forget".into()),
        },
        Some(other) => {
            let shown: String = other.chars().take(50).collect();
            return fail(format!(
                "unknown command {shown:?} (status, retry-failed, audit, forget, update, set-config)"
            ));
        }
        None => return fail("no \"command\"".into()),
    };
    Ok((id, command))
}

/// Longest signature accepted (a 64-byte signature is 128 hex digits).
const MAX_SIGNATURE_CHARS: usize = 256;

/// The fields of an `update` command: version, url, sha256, signature,
/// and optionally allow_downgrade and target.
fn parse_update(o: &serde_json::Map<String, Value>) -> Result<UpdateRequest, String> {
    let text = |key: &str, max: usize| match o.get(key) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(s.clone()),
        _ => Err(format!(
            "\"update\" needs \"{key}\" (text of at most {max} bytes)"
        )),
    };
    let version = text("version", 32)?;
    if !crate::signing::valid_version(&version) {
        return Err(format!("{version:?} is not a version (like 0.3.0)"));
    }
    let sha256 = text("sha256", 64)?.to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("\"sha256\" must be 64 hex digits".into());
    }
    let allow_downgrade = match o.get("allow_downgrade") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("\"allow_downgrade\" must be true or false".into()),
    };
    let seq = o
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or("\"update\" needs \"seq\" (the signed counter, which holosync sign adds)")?;
    Ok(UpdateRequest {
        version,
        url: text("url", crate::message::MAX_URL_BYTES)?,
        sha256,
        signature: text("signature", MAX_SIGNATURE_CHARS)?,
        allow_downgrade,
        target: text("target", 64).ok(),
        seq,
    })
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

/// A `retry-failed` or `forget` in progress, a transaction per step.
pub(super) struct Job {
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
pub(super) struct Audit {
    /// The ids of the commands that asked for it (none for the audit at
    /// start-up), the first [`MAX_AUDIT_IDS`].
    ids: Vec<Value>,
    /// How many commands asked for it in all.
    asked: usize,
    /// The QoS 1 command messages, acked once the requeue is committed.
    deliveries: Vec<Delivery>,
    /// The page of rows being checked, and how far into it.
    page: Vec<(i64, String, Option<u64>)>,
    /// Rows of `page` checked.
    pos: usize,
    /// The last row id read (pages follow it); None once every page is read.
    after: Option<i64>,
    /// Rows checked so far.
    checked: usize,
    /// Rows whose file is missing or changed: id and URL.
    missing: Vec<(i64, String)>,
}

impl Report {
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

    /// Publishes the answer of a command the report handed on (`update`,
    /// `set-config`), remembering its id when it was carried out.
    pub fn answer(&mut self, link: &Link, queue: &Queue, id: &Value, answer: Value) {
        if answer.get("ok") == Some(&Value::Bool(true)) {
            self.remember(queue, id);
        }
        self.event(link, answer);
    }

    /// Whether `update` or `set-config` commands wait.
    pub fn has_orders(&self) -> bool {
        !self.orders.is_empty()
    }

    /// The next `update` or `set-config` to carry out.
    pub fn take_order(&mut self) -> Option<Order> {
        self.orders.pop_front()
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

    /// Checks every cached file (the start-up audit, or the command `id`
    /// delivered in `d`); a command that comes while an audit runs joins it.
    pub fn start_audit(&mut self, link: &Link, id: Option<Value>, d: Option<&Delivery>) {
        let audit = self.audit.get_or_insert_with(|| Audit {
            ids: Vec::new(),
            asked: 0,
            deliveries: Vec::new(),
            page: Vec::new(),
            pos: 0,
            after: Some(0),
            checked: 0,
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
            Command::Update(request) => {
                if self.orders.len() >= MAX_WAITING_JOBS {
                    let why = "busy: earlier update or set-config commands are waiting";
                    log::warn!("command {name} (id {id}) refused: {why}");
                    self.event(link, json!({"id": id, "command": name, "error": why}));
                    return Acked::Now;
                }
                self.orders.push_back(Order {
                    id,
                    request,
                    delivery: ack_handle(d),
                });
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
    pub(super) fn job_step(
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

    /// Works on the oldest audit until `deadline`; when it is done and its
    /// requeue committed, answers and returns its command message (if any).
    pub(super) fn audit_step(
        &mut self,
        link: &Link,
        queue: &mut Queue,
        transfers: &mut Transfers,
        deadline: Instant,
    ) -> Option<Vec<Delivery>> {
        let audit = self.audit.as_mut()?;
        loop {
            if audit.pos == audit.page.len() {
                let Some(after) = audit.after else { break };
                match queue.done_files(after, AUDIT_PAGE_ROWS) {
                    Ok(page) => {
                        audit.after = page.last().map(|(id, _, _)| *id);
                        audit.page = page;
                        audit.pos = 0;
                    }
                    Err(e) => {
                        log::debug!("{}", e.chain());
                        return None;
                    }
                }
                continue;
            }
            let end = (audit.pos + AUDIT_CHECKS_PER_CLOCK).min(audit.page.len());
            for (id, url, size) in &audit.page[audit.pos..end] {
                let in_place = cache::local_path(&self.cache_dir, url)
                    .ok()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .is_some_and(|m| m.is_file() && size.is_none_or(|n| m.len() == n));
                if !in_place {
                    audit.missing.push((*id, url.clone()));
                }
            }
            audit.checked += end - audit.pos;
            audit.pos = end;
            if Instant::now() >= deadline {
                return None;
            }
        }
        let ids: Vec<i64> = audit.missing.iter().map(|(id, _)| *id).collect();
        let checked = audit.checked;
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
}
