//! Messages whose effect must be committed before they are acknowledged
//! (sync messages, fleet commands): the commit, then the ack on the
//! connection that delivered them, and the messages held while the database
//! is busy, tried again every half second, oldest first.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::link::{Ack, Delivery, Link};
use crate::message;
use crate::queue::{Enqueued, Queue};
use crate::report::{Acked, Report};

/// How often a commit that failed (database locked) is tried again.
pub const COMMIT_RETRY: Duration = Duration::from_millis(500);

/// How often a failing held commit is logged again (the first failure always is).
const COMMIT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(30);

/// Skipped payload entries, and rejected URLs, logged one by one per
/// message; the rest are counted in one line (a message of thousands of bad
/// URLs must not rotate the log's history away).
const MAX_SKIPPED_LINES: usize = 10;

/// What a message asks for, which decides how it is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// URLs to queue.
    Sync,
    /// A fleet command (see `report`).
    Command,
}

/// What a commit writes to and answers on: the queue, the fleet report
/// (which carries out commands) and the link the ack goes out on.
pub struct Parts<'a> {
    /// The durable queue.
    pub queue: &'a mut Queue,
    /// Fleet commands and status.
    pub report: &'a mut Report,
    /// The broker link (acks, answers).
    pub link: &'a Link,
    /// `download.retry_max_ms`: the most a new URL may be scheduled ahead.
    pub max_delay_ms: u64,
}

/// Messages held until their commit succeeds.
#[derive(Default)]
pub struct Inbox {
    /// Held messages, oldest first.
    held: Vec<(Kind, Delivery)>,
    /// When they are tried again.
    retry_at: Option<Instant>,
    /// When a failing commit was last logged.
    failure_logged: Option<Instant>,
}

impl Inbox {
    /// Commits `d` and acks it; if the commit fails, holds it (unacked).
    /// Returns whether URLs were queued (the downloads have work).
    pub fn receive(&mut self, kind: Kind, d: Delivery, parts: &mut Parts) -> bool {
        // A later copy (redelivered after a reconnect) stands for an earlier
        // one still held: one commit, one ack on the right connection.
        self.held.retain(|(_, h)| {
            !(Link::is_later(&d, h)
                && h.publish.topic == d.publish.topic
                && h.publish.payload == d.publish.payload)
        });
        let mut queued = false;
        if self.held.is_empty() && self.try_commit(kind, &d, parts, &mut queued) {
            return queued;
        }
        // Behind held ones, so messages keep their order.
        self.held.push((kind, d));
        self.retry_at
            .get_or_insert_with(|| Instant::now() + COMMIT_RETRY);
        false
    }

    /// When held messages are due again (None: none is held).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Tries the held messages again, oldest first, until one fails or
    /// `deadline` passes (then the rest are due on the next turn). Returns
    /// whether URLs were queued.
    pub fn retry(&mut self, deadline: Instant, parts: &mut Parts) -> bool {
        let mut queued = false;
        if self.retry_at.is_none_or(|t| Instant::now() < t) {
            return queued;
        }
        while let Some((kind, d)) = self.held.first().cloned() {
            if !self.try_commit(kind, &d, parts, &mut queued) {
                self.retry_at = Some(Instant::now() + COMMIT_RETRY);
                return queued;
            }
            self.held.remove(0);
            if Instant::now() >= deadline && !self.held.is_empty() {
                self.retry_at = Some(Instant::now());
                return queued;
            }
        }
        self.retry_at = None;
        queued
    }

    /// Commits one message and acks it (a command with a long effect is
    /// acked later, by the report, when its last step commits).
    fn try_commit(
        &mut self,
        kind: Kind,
        d: &Delivery,
        parts: &mut Parts,
        queued: &mut bool,
    ) -> bool {
        match commit(kind, d, parts) {
            Ok((acked, q)) => {
                self.failure_logged = None;
                *queued |= q;
                if acked == Acked::Now {
                    ack(parts.link, d);
                }
                true
            }
            Err(e) => {
                let now = Instant::now();
                if self
                    .failure_logged
                    .is_none_or(|t| now.duration_since(t) >= COMMIT_FAILURE_LOG_EVERY)
                {
                    self.failure_logged = Some(now);
                    log::error!(
                        "could not commit a message from {} (kept unacknowledged, will retry every {} ms): {}",
                        d.publish.topic,
                        COMMIT_RETRY.as_millis(),
                        e.chain()
                    );
                }
                false
            }
        }
    }
}

/// Commits one message's effect durably: a sync message's URLs queued, a
/// command carried out (or its first step). Says when to ack and whether
/// URLs were queued.
fn commit(kind: Kind, d: &Delivery, parts: &mut Parts) -> Result<(Acked, bool), Error> {
    match kind {
        Kind::Sync => {
            let r = commit_sync(parts.queue, d, parts.max_delay_ms)?;
            parts.report.changed();
            Ok((Acked::Now, r.queued > 0))
        }
        Kind::Command => Ok((parts.report.command(parts.link, parts.queue, d), false)),
    }
}

/// Acks `d` on the connection that delivered it; says so when it came on an
/// earlier one (then it is not acked: the broker sends it again).
pub fn ack(link: &Link, d: &Delivery) {
    if link.ack(d) == Ack::Stale {
        log::info!(
            "not acknowledging a message on {}: it came on an earlier broker connection, where its packet id now means nothing (the broker sends it again; the queue ignores the copy)",
            d.publish.topic
        );
    }
}

/// Queues one sync message's URLs in one durable transaction, with one log
/// line for what was queued and one per entry left out.
fn commit_sync(queue: &mut Queue, d: &Delivery, max_delay_ms: u64) -> Result<Enqueued, Error> {
    let publish = &d.publish;
    let parsed = message::parse_sync(&publish.payload);
    let r = queue.enqueue(&parsed.entries, crate::queue::unix_ms(), max_delay_ms)?;
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
    let rejected: Vec<_> = parsed
        .entries
        .iter()
        .filter_map(|e| e.rejected.as_ref().map(|r| (&e.url, r)))
        .collect();
    for (url, reason) in rejected.iter().take(MAX_SKIPPED_LINES) {
        log::warn!("rejected {url}: {reason} (stored as failed, nothing written)");
    }
    if rejected.len() > MAX_SKIPPED_LINES {
        log::warn!(
            "rejected {} more URLs in the same message (each stored as failed with its reason; `holosync status` lists them)",
            rejected.len() - MAX_SKIPPED_LINES
        );
    }
    log::info!(
        "queued {} URLs from {} ({} already queued, {} rejected, {} skipped)",
        r.queued,
        publish.topic,
        r.duplicates,
        r.rejected,
        parsed.skipped.len()
    );
    Ok(r)
}
