//! The one loop: each turn polls the broker link, dispatches what arrived,
//! and gives every piece of work in progress (a projector message, a
//! download) one bounded slice. `agent.rs` owns the turn; each capability
//! lives in its own module (`link`, `inbox`, `transfers`, `projector`). See
//! ARCHITECTURE.md for the timing budget.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{LastWill, MqttOptions, QoS};

use crate::cache;
use crate::config::Config;
use crate::download;
use crate::error::{Context, Result};
use crate::http;
use crate::inbox::{self, Inbox, Kind};
use crate::link::{Delivery, Link};
use crate::projector::{self, Batch};
use crate::queue::Queue;
use crate::report::{Acked, Identity, Report};
use crate::transfers::Transfers;

/// Longest time one piece of work (a download, a projector) runs per turn
/// before the broker link gets its turn again.
pub const WORK_SLICE: Duration = Duration::from_millis(20);

/// Longest wait for MQTT when nothing else is due (the link wakes at once
/// for a message; the loop looks at its clocks again after this).
const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// A wall clock that moved this much less than the monotonic clock between
/// two turns jumped back.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

/// How long a clean stop waits for the broker to get the DISCONNECT.
const STOP_FLUSH: Duration = Duration::from_millis(500);

/// Queue meta key holding the running agent's start time; emptied by a clean
/// stop, so a start that finds it set knows the last run ended abruptly.
const RUNNING_KEY: &str = "running_since";

/// The running agent: config, queue, broker link and the work in progress.
pub struct Agent {
    /// The validated config.
    config: Config,
    /// The durable queue.
    queue: Queue,
    /// The broker link.
    link: Link,
    /// Messages held until their commit succeeds.
    inbox: Inbox,
    /// The downloads.
    transfers: Transfers,
    /// Projector messages in progress, oldest first.
    projectors: VecDeque<Batch>,
    /// What the fleet hears of this kiosk, and its commands.
    report: Report,
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
            config.mqtt.port(),
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
        let started_at = crate::logger::utc_timestamp(SystemTime::now());
        queue.set_meta(RUNNING_KEY, &started_at)?;
        let moved = queue.clamp_schedule(unix_ms(), config.download.retry_max_ms)?;
        if moved > 0 {
            log::warn!(
                "{moved} queued URLs were scheduled too far ahead (the clock was ahead when they were queued); they are due now"
            );
        }

        let identity = Identity {
            client_id: client_id.clone(),
            started_at,
            host: hostname(),
        };
        let mut report = Report::new(&config, identity);
        // A technician who deleted the cache gets it back without a message.
        report.start_audit(None, None);
        let m = &config.mqtt;
        let mut options = MqttOptions::new(client_id, m.host.clone(), m.port());
        options.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
        #[cfg(feature = "tls")]
        {
            let files = |(key, message)| {
                crate::error::Error::msg(format!("config error: key `{key}`: {message}"))
            };
            crate::tls::init_https(&config);
            if m.tls {
                let tls = crate::tls::mqtt_config(&config).map_err(files)?;
                options.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(tls),
                ));
            }
        }
        if let Some(state) = &report.topics().state {
            let will = report.identity().offline("connection lost");
            options.set_last_will(LastWill::new(state, will, QoS::AtLeastOnce, true));
        }
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
            .chain(
                report
                    .topics()
                    .commands
                    .iter()
                    .map(|t| (t.clone(), QoS::AtLeastOnce)),
            )
            .collect();
        let mut link = Link::new(options, topics, Duration::from_millis(m.connect_jitter_ms));
        if let Some(state) = &report.topics().state {
            link.set_birth(state.clone(), report.identity().online());
        }

        let d = &config.download;
        let settings = download::Settings {
            limits: http::Limits {
                stall: Duration::from_secs(d.timeout_secs),
                max_time: Duration::from_secs(d.max_secs),
                max_bytes: d.max_bytes,
                max_bytes_per_sec: d.max_bytes_per_sec,
            },
            reencode_jpeg_quality: d.reencode_jpeg_quality,
            verify: crate::verify::Limits {
                animation_pixels: d.max_animation_pixels,
            },
        };
        let transfers = Transfers::new(&config, settings);
        Ok(Agent {
            config,
            queue,
            link,
            inbox: Inbox::default(),
            transfers,
            projectors: VecDeque::new(),
            report,
            clock: (Instant::now(), unix_ms()),
        })
    }

    /// Runs until a stop is requested (see `os::watch_stop`), then stops cleanly.
    pub fn run(mut self) {
        let goodbye = self
            .report
            .topics()
            .state
            .clone()
            .map(|t| (t, self.report.identity().offline("stopped")));
        crate::os::on_stop_wake(self.link.stop_waker(goodbye));
        loop {
            if let Some(why) = crate::os::stop_requested() {
                self.stop(why);
                return;
            }
            self.turn();
        }
    }

    /// A clean stop: leave the download and projector work (a download's
    /// temporary file is kept if it can be resumed), say goodbye to the
    /// broker, and mark the run as ended in the queue.
    fn stop(mut self, why: &str) {
        log::info!("stopping: {why}");
        self.transfers.stop(&self.queue);
        if !self.projectors.is_empty() {
            log::warn!(
                "left {} projector messages unfinished",
                self.projectors.len()
            );
        }
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
        if self.link.take_connected() {
            self.report.connected();
        }
        while let Some(d) = self.link.next_delivery() {
            self.dispatch(d);
        }
        self.watch_clock();
        let (queue, config, transfers, report, link) = (
            &mut self.queue,
            &self.config,
            &mut self.transfers,
            &mut self.report,
            &self.link,
        );
        self.inbox.retry(link, &mut |kind, d| {
            commit(queue, config, transfers, report, link, kind, d)
        });
        if let Some(batch) = self.projectors.front_mut() {
            if batch.step(&self.config.projector, Instant::now() + WORK_SLICE) {
                let batch = self.projectors.pop_front().expect("stepped above");
                self.publish_results(&batch);
            }
        }
        self.transfers.record_pending(&self.queue);
        for finished in self
            .transfers
            .step(&self.queue, Instant::now() + WORK_SLICE)
        {
            self.report.finished(&self.link, &finished);
        }
        let done = self.report.step(
            &self.link,
            &mut self.queue,
            &mut self.transfers,
            Instant::now() + WORK_SLICE,
        );
        for d in done {
            inbox::ack(&self.link, &d);
        }
    }

    /// None when work is due now; else when the loop next has something to do.
    fn idle_until(&self) -> Option<Instant> {
        if !self.projectors.is_empty() || self.report.busy() {
            return None;
        }
        let now = Instant::now();
        let mut until = self
            .transfers
            .idle_until(now + inbox::COMMIT_RETRY)?
            .min(now + IDLE_RECHECK);
        for t in [self.inbox.retry_at(), self.report.next_due()]
            .into_iter()
            .flatten()
        {
            until = until.min(t);
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
                inbox::ack(&self.link, &d);
                return;
            }
            self.receive(Kind::Sync, d);
        } else if self.report.is_command_topic(topic) {
            self.receive(Kind::Command, d);
        } else if *topic == m.projector_topic {
            if let Some(batch) = projector::parse_batch(&d.publish.payload, &self.config.projector)
            {
                self.projectors.push_back(batch);
            }
            inbox::ack(&self.link, &d);
        } else {
            log::debug!("ignored a message on unexpected topic {topic}");
            inbox::ack(&self.link, &d);
        }
    }

    /// Hands a message whose effect must be committed before its ack to the inbox.
    fn receive(&mut self, kind: Kind, d: Delivery) {
        let (queue, config, transfers, report, link) = (
            &mut self.queue,
            &self.config,
            &mut self.transfers,
            &mut self.report,
            &self.link,
        );
        self.inbox.receive(kind, d, link, &mut |kind, d| {
            commit(queue, config, transfers, report, link, kind, d)
        });
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
            self.transfers.wake();
        }
    }
}

/// Commits one held or new message's effect: a sync message's URLs queued
/// (waking the downloads), a command carried out.
fn commit(
    queue: &mut Queue,
    config: &Config,
    transfers: &mut Transfers,
    report: &mut Report,
    link: &Link,
    kind: Kind,
    d: &Delivery,
) -> Result<Acked> {
    match kind {
        Kind::Sync => {
            let r = inbox::commit_sync(queue, d, config.download.retry_max_ms)?;
            if r.queued > 0 {
                transfers.wake();
            }
            report.changed();
            Ok(Acked::Now)
        }
        Kind::Command => report.command(link, queue, transfers, d),
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
    let id = format!(
        "holosync-{}-{:08x}",
        hostname(),
        crate::random::u64() as u32
    );
    queue.set_meta("client_id", &id)?;
    log::info!("made a new MQTT client id {id}; it is kept in the database and reused");
    Ok(id)
}

/// The machine's name, reduced to characters every broker accepts in a client id.
pub fn hostname() -> String {
    let raw = std::env::var("COMPUTERNAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    client_id_part(&raw)
}

/// `raw` (a host name) as a part of a client id: ASCII letters, digits and
/// dashes, at most 32, lower case; "kiosk" if nothing is left.
fn client_id_part(raw: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_name_becomes_a_safe_client_id_part() {
        assert_eq!(client_id_part("Lobby-PC-1\n"), "lobby-pc-1");
        assert_eq!(client_id_part(" kiosk_2.mall.local "), "kiosk2malllocal");
        assert_eq!(client_id_part("Ünïcode-Ø"), "ncode-");
        assert_eq!(client_id_part(&"a".repeat(40)), "a".repeat(32));
        assert_eq!(client_id_part("___"), "kiosk");
        assert_eq!(client_id_part(""), "kiosk");
    }

    #[test]
    fn the_host_name_is_the_machines() {
        if std::env::var_os("COMPUTERNAME").is_some() {
            return;
        }
        let Ok(name) = std::fs::read_to_string("/proc/sys/kernel/hostname") else {
            return;
        };
        assert_eq!(hostname(), client_id_part(&name));
        assert!(!hostname().is_empty());
    }
}
