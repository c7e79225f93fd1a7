//! What comes in from the broker, sorted before anything is parsed: which
//! kind of message it is, whether it is within its size limit, and whether
//! it is a retained message the broker replays (at every subscribe, so at
//! every reconnect) that this run has already seen.
//!
//! The rules (README, "Retained messages"):
//! - an empty payload clears a retained message at the broker; it is
//!   delivered as an empty message and ignored quietly;
//! - a retained command is never run: commands act when they are sent, and
//!   a stored one would run again at every reconnect;
//! - a retained sync or projector message stands for "the current content"
//!   or "the current projector state": it is taken once per start of the
//!   agent, and its replays at later reconnects of the same run are ignored.

use std::collections::VecDeque;

use crate::config::Mqtt;
use rumqttc::Publish;

/// Retained messages remembered per run (their topic and payload digests).
const MAX_RETAINED_SEEN: usize = 256;

/// What a delivery is, and what the loop does with it.
#[derive(Debug, PartialEq, Eq)]
pub enum Sorted {
    /// URLs to queue.
    Sync,
    /// A fleet command.
    Command,
    /// A projector message.
    Projector,
    /// Over its size limit: acknowledged and dropped (a command is answered).
    TooBig {
        /// The config key of the limit.
        key: &'static str,
        /// The limit in bytes.
        max: usize,
    },
    /// Acknowledged and not acted on (why is already logged, if worth it).
    Ignore,
}

/// The sorter, with the retained messages this run has taken.
#[derive(Default)]
pub struct Intake {
    /// Digests of the retained messages taken this run, oldest first.
    retained_seen: VecDeque<[u8; 16]>,
}

impl Intake {
    /// Sorts `p`: `is_command` says whether its topic carries commands.
    pub fn sort(&mut self, mqtt: &Mqtt, is_command: bool, p: &Publish) -> Sorted {
        let topic = p.topic.as_str();
        let (kind, key, max) = if mqtt.sync_topics().iter().any(|t| t == topic) {
            (
                Sorted::Sync,
                "mqtt.max_payload_bytes",
                mqtt.max_payload_bytes,
            )
        } else if is_command {
            (
                Sorted::Command,
                "mqtt.max_command_bytes",
                mqtt.max_command_bytes,
            )
        } else if topic == mqtt.projector_topic {
            (
                Sorted::Projector,
                "mqtt.max_command_bytes",
                mqtt.max_command_bytes,
            )
        } else {
            log::debug!("ignored a message on unexpected topic {topic}");
            return Sorted::Ignore;
        };
        if p.payload.is_empty() {
            log::debug!("ignored an empty message on {topic} (a retained message cleared)");
            return Sorted::Ignore;
        }
        if p.payload.len() > max {
            return Sorted::TooBig { key, max };
        }
        if p.retain {
            if kind == Sorted::Command {
                log::warn!(
                    "ignored a retained command on {topic}: commands run when they are sent, not when the broker replays a stored one (clear it by publishing an empty retained message)"
                );
                return Sorted::Ignore;
            }
            let digest = digest(topic, &p.payload);
            if self.retained_seen.contains(&digest) {
                log::debug!("ignored the broker's replay of a retained message on {topic}, taken once this run");
                return Sorted::Ignore;
            }
            if self.retained_seen.len() >= MAX_RETAINED_SEEN {
                self.retained_seen.pop_front();
            }
            self.retained_seen.push_back(digest);
            log::info!("taking the retained message on {topic} (once per start)");
        }
        kind
    }
}

/// A digest of a topic and payload (not for security: to know a replay).
fn digest(topic: &str, payload: &[u8]) -> [u8; 16] {
    let mut c = crate::md5::Md5::default();
    c.update(&(topic.len() as u64).to_le_bytes());
    c.update(topic.as_bytes());
    c.update(payload);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;

    fn mqtt() -> Mqtt {
        crate::config::Config::parse(r#"{"mqtt": {"max_command_bytes": 100}}"#)
            .expect("a valid config")
            .mqtt
    }

    fn publish(topic: &str, payload: &[u8], retain: bool) -> Publish {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.retain = retain;
        p
    }

    #[test]
    fn each_topic_has_its_kind_and_its_limit() {
        let (m, mut i) = (mqtt(), Intake::default());
        assert_eq!(
            i.sort(&m, false, &publish("sync", b"http://h/a.jpg", false)),
            Sorted::Sync
        );
        assert_eq!(
            i.sort(&m, true, &publish("k/cmd", b"{}", false)),
            Sorted::Command
        );
        assert_eq!(
            i.sort(
                &m,
                false,
                &publish("projector-remote-control", b"{}", false)
            ),
            Sorted::Projector
        );
        assert_eq!(
            i.sort(&m, false, &publish("other", b"x", false)),
            Sorted::Ignore
        );
        let big = [b'x'; 101];
        assert_eq!(
            i.sort(&m, true, &publish("k/cmd", &big, false)),
            Sorted::TooBig {
                key: "mqtt.max_command_bytes",
                max: 100
            }
        );
        assert_eq!(
            i.sort(&m, false, &publish("projector-remote-control", &big, false)),
            Sorted::TooBig {
                key: "mqtt.max_command_bytes",
                max: 100
            }
        );
        assert_eq!(
            i.sort(&m, false, &publish("sync", &big, false)),
            Sorted::Sync
        );
    }

    #[test]
    fn empty_and_retained_commands_are_ignored() {
        let (m, mut i) = (mqtt(), Intake::default());
        assert_eq!(
            i.sort(&m, true, &publish("k/cmd", b"", true)),
            Sorted::Ignore
        );
        assert_eq!(
            i.sort(&m, false, &publish("sync", b"", false)),
            Sorted::Ignore
        );
        let status = br#"{"command":"status"}"#;
        assert_eq!(
            i.sort(&m, true, &publish("k/cmd", status, true)),
            Sorted::Ignore
        );
        assert_eq!(
            i.sort(&m, true, &publish("k/cmd", status, false)),
            Sorted::Command
        );
    }

    #[test]
    fn a_retained_message_is_taken_once_per_run() {
        let (m, mut i) = (mqtt(), Intake::default());
        let a = publish("sync", b"http://h/a.jpg", true);
        assert_eq!(i.sort(&m, false, &a), Sorted::Sync);
        assert_eq!(
            i.sort(&m, false, &a),
            Sorted::Ignore,
            "the replay at a reconnect"
        );
        let b = publish("sync", b"http://h/b.jpg", true);
        assert_eq!(
            i.sort(&m, false, &b),
            Sorted::Sync,
            "a new retained message"
        );
        let live = publish("sync", b"http://h/a.jpg", false);
        assert_eq!(
            i.sort(&m, false, &live),
            Sorted::Sync,
            "sent live, it is always taken"
        );
        let p = publish("projector-remote-control", br#"{"command":"on"}"#, true);
        assert_eq!(i.sort(&m, false, &p), Sorted::Projector);
        assert_eq!(i.sort(&m, false, &p), Sorted::Ignore);
    }
}
