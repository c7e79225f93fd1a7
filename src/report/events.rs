//! Events waiting to be published on `<prefix>/events`: one message each
//! while they come at most 10 a second, grouped past that into one message
//! a second (split by count and size, far below the packet limit).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

/// Events waiting to be published: at most [`EVENTS_PER_SECOND`] go out one
/// by one; past that they are grouped, one message a second.
#[derive(Debug)]
pub(super) struct Events {
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
    pub(super) fn new() -> Events {
        Events {
            tokens: EVENTS_PER_SECOND,
            refilled: Instant::now(),
            group: Vec::new(),
            group_since: None,
        }
    }

    /// Adds an event; returns it as a message if it may go out at once.
    pub(super) fn push(&mut self, event: Value) -> Option<Vec<u8>> {
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
    pub(super) fn due(&mut self) -> Vec<Vec<u8>> {
        match self.group_since {
            Some(t) if t.elapsed() >= GROUP_EVERY => self.all(),
            _ => Vec::new(),
        }
    }

    /// Every waiting event as grouped messages, due or not (a clean stop
    /// publishes them before it says goodbye).
    pub(super) fn all(&mut self) -> Vec<Vec<u8>> {
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
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.group_since.map(|t| t + GROUP_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
