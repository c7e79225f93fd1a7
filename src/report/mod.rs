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
//!   `audit`, `forget`, acknowledged once their effect is committed, and
//!   `update`, `set-config`, handed to the updater (`update.rs`).

mod commands;
mod events;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config;
use crate::link::{Delivery, Link};
use crate::queue::Queue;
use crate::transfers::{Finished, Transfers};

pub use commands::{parse_command, Command};
use commands::{Audit, Job};
use events::Events;

/// Failures listed in a status.
pub const STATUS_FAILURES: usize = 20;

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
    /// `update` and `set-config` commands for the updater, oldest first.
    orders: VecDeque<crate::update::Order>,
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
            orders: VecDeque::new(),
            step_failure_logged: false,
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
        self.audit.is_some() || !self.jobs.is_empty() || !self.orders.is_empty()
    }

    /// Publishes the events still waiting in a group (a clean stop: an
    /// answer grouped in a burst must not be lost at a handover).
    pub fn flush_events(&mut self, link: &Link) {
        let Some(topic) = &self.topics.events else {
            return;
        };
        for payload in self.events.all() {
            if let Err(e) = link.publish(topic, false, payload) {
                log::debug!("could not publish events to {topic}: {e}");
            }
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
