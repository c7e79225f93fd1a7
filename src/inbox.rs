//! Messages whose effect must be committed before they are acknowledged
//! (sync messages, fleet commands): the commit, then the ack on the
//! connection that delivered them, and the messages held while the database
//! is busy, tried again every half second, oldest first.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::link::{Ack, Delivery, Link};
use crate::message;
use crate::queue::{Enqueued, Queue};
pub use crate::report::Acked;

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

/// Commits one message's effect (durably: the ack follows, now or, for an
/// effect that takes a while, when the caller says so).
pub type Commit<'a> = dyn FnMut(Kind, &Delivery) -> Result<Acked, Error> + 'a;

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
    pub fn receive(&mut self, kind: Kind, d: Delivery, link: &Link, commit: &mut Commit) {
        // A later copy (redelivered after a reconnect) stands for an earlier
        // one still held: one commit, one ack on the right connection.
        self.held.retain(|(_, h)| {
            !(Link::is_later(&d, h)
                && h.publish.topic == d.publish.topic
                && h.publish.payload == d.publish.payload)
        });
        if self.held.is_empty() && self.try_commit(kind, &d, link, commit) {
            return;
        }
        // Behind held ones, so messages keep their order.
        self.held.push((kind, d));
        self.retry_at
            .get_or_insert_with(|| Instant::now() + COMMIT_RETRY);
    }

    /// When held messages are due again (None: none is held).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Tries the held messages again, oldest first, until one fails or
    /// `deadline` passes (then the rest are due on the next turn).
    pub fn retry(&mut self, link: &Link, deadline: Instant, commit: &mut Commit) {
        if self.retry_at.is_none_or(|t| Instant::now() < t) {
            return;
        }
        while let Some((kind, d)) = self.held.first().cloned() {
            if !self.try_commit(kind, &d, link, commit) {
                self.retry_at = Some(Instant::now() + COMMIT_RETRY);
                return;
            }
            self.held.remove(0);
            if Instant::now() >= deadline && !self.held.is_empty() {
                self.retry_at = Some(Instant::now());
                return;
            }
        }
        self.retry_at = None;
    }

    fn try_commit(&mut self, kind: Kind, d: &Delivery, link: &Link, commit: &mut Commit) -> bool {
        match commit(kind, d) {
            Ok(acked) => {
                self.failure_logged = None;
                if acked == Acked::Now {
                    ack(link, d);
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
pub fn commit_sync(queue: &mut Queue, d: &Delivery, max_delay_ms: u64) -> Result<Enqueued, Error> {
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
