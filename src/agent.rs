//! The one loop: MQTT events, the download deadline, and dispatch.
//!
//! One thread. rumqttc's blocking `Connection` is polled with a timeout that
//! ends at the next download deadline; between events one due queue row is
//! downloaded. Every blocking step (a download, a projector command) is kept
//! well under the MQTT keep-alive by config validation.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, Publish, QoS};

use crate::cache;
use crate::config::Config;
use crate::download::{self, Failure, Limits};
use crate::error::{Context, Result};
use crate::message;
use crate::projector::{self, Batch};
use crate::queue::{self, Job, Queue};
use crate::verify;

/// Largest MQTT packet accepted: the protocol's own maximum (a 268,435,455-byte
/// remaining length plus the fixed header). A client that refuses a QoS 1
/// message drops the connection, and under a persistent session the broker
/// sends the same message again on reconnect, forever. Accepting whatever the
/// broker sends and then dropping oversized payloads in the application (see
/// `mqtt.max_payload_bytes`) is the only way out of that loop with MQTT 3.1.1.
pub const MAX_PACKET_BYTES: usize = 268_435_460;

/// Largest packet we send (projector results); far above what we need.
const MAX_OUTGOING_PACKET_BYTES: usize = 1024 * 1024;

/// Requests (acks, subscribes, publishes) buffered for the event loop.
const REQUEST_CHANNEL_CAPACITY: usize = 1024;

/// rumqttc's own connect timeout (TCP + CONNACK).
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Poll timeout while connecting. It must outlast a connect: a shorter one
/// cancels the connect each time and the client never gets through.
const CONNECT_POLL_TIMEOUT: Duration = Duration::from_secs(CONNECT_TIMEOUT_SECS + 5);

/// First reconnect delay; doubles per failed attempt.
const RECONNECT_MIN: Duration = Duration::from_secs(1);

/// Longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(60);

/// Longest single poll while connected, so idle ticks stay cheap but regular.
const MAX_POLL: Duration = Duration::from_secs(10);

/// With `interval_ms: 0` and nothing due, look at the queue again after this
/// (rows can also arrive from `holosync enqueue` in another process).
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Skipped payload entries logged one by one per message; the rest are counted.
const MAX_SKIPPED_LINES: usize = 10;

/// The broker link.
enum Link {
    /// Connected and subscribed.
    Up,
    /// Not connected; the next attempt is due at `retry_at`.
    Down {
        /// When to try again.
        retry_at: Instant,
        /// Delay after the next failure.
        backoff: Duration,
    },
}

/// The running agent: config, queue, MQTT client and the loop's clocks.
pub struct Agent {
    /// The validated config.
    config: Config,
    /// The durable queue.
    queue: Queue,
    /// Sends requests (acks, subscriptions, publishes) to the event loop.
    client: Client,
    /// The MQTT event loop, polled by `run`.
    connection: Connection,
    /// Broker link state.
    link: Link,
    /// When the next queue row may be downloaded.
    next_download: Instant,
    /// Sync messages received but not yet committed (database busy): retried, then acked.
    uncommitted: Vec<Publish>,
    /// Projector messages in progress; one projector is handled per loop step.
    projector_batches: VecDeque<Batch>,
    /// Download limits from the config.
    limits: Limits,
}

/// Milliseconds since the Unix epoch (the queue's clock: it survives restarts).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Agent {
    /// Opens the queue, settles the client id and prepares the MQTT client.
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
        cache::remove_temp_files(&config.cache_dir);

        let m = &config.mqtt;
        let mut options = MqttOptions::new(client_id, m.host.clone(), m.port);
        options
            .set_keep_alive(Duration::from_secs(m.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_OUTGOING_PACKET_BYTES);
        if let Some(user) = &m.username {
            let password = m.password.as_ref().map_or("", |p| p.expose());
            options.set_credentials(user.clone(), password);
        }
        let (client, mut connection) = Client::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = connection.eventloop.network_options();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        connection.eventloop.set_network_options(network);

        let limits = Limits {
            timeout_secs: config.download.timeout_secs,
            max_bytes: config.download.max_bytes,
        };
        Ok(Agent {
            config,
            queue,
            client,
            connection,
            link: Link::Down {
                retry_at: Instant::now(),
                backoff: RECONNECT_MIN,
            },
            next_download: Instant::now(),
            uncommitted: Vec::new(),
            projector_batches: VecDeque::new(),
            limits,
        })
    }

    /// Runs until the process is killed.
    pub fn run(mut self) -> ! {
        loop {
            self.commit_held_messages();
            if let Some(batch) = self.projector_batches.front_mut() {
                if batch.step(&self.config.projector) {
                    batch.publish(&self.client, &self.config.projector);
                    self.projector_batches.pop_front();
                }
            } else if Instant::now() >= self.next_download {
                self.download_step();
            }
            self.poll_mqtt();
        }
    }

    /// Waits for one MQTT event or until the next deadline, whichever is first.
    fn poll_mqtt(&mut self) {
        let now = Instant::now();
        let busy = !self.projector_batches.is_empty();
        let until_work = if busy {
            Duration::ZERO
        } else {
            self.next_download.saturating_duration_since(now)
        };
        let timeout = match self.link {
            Link::Up => until_work.min(MAX_POLL),
            Link::Down { retry_at, .. } if now < retry_at => {
                // Keep downloading while the broker is away; sleep only until the next job.
                thread::sleep(until_work.min(retry_at - now));
                return;
            }
            Link::Down { .. } => CONNECT_POLL_TIMEOUT,
        };
        // Work is due now: poll once without a timer. tokio's timer has 1 ms
        // steps, so even a zero timeout would wait ~1 ms per downloaded image.
        let polled = if timeout.is_zero() {
            self.connection.try_recv().map_err(|e| match e {
                rumqttc::TryRecvError::Empty => rumqttc::RecvTimeoutError::Timeout,
                rumqttc::TryRecvError::Disconnected => rumqttc::RecvTimeoutError::Disconnected,
            })
        } else {
            self.connection.recv_timeout(timeout)
        };
        match polled {
            Ok(Ok(event)) => self.handle_event(event),
            Ok(Err(e)) => self.connection_lost(&e.to_string()),
            Err(rumqttc::RecvTimeoutError::Timeout) => {
                if matches!(self.link, Link::Down { .. }) {
                    self.connection_lost("connect timed out");
                }
            }
            Err(rumqttc::RecvTimeoutError::Disconnected) => {
                unreachable!("the agent holds the client, so the request channel stays open")
            }
        }
    }

    fn connection_lost(&mut self, why: &str) {
        let m = &self.config.mqtt;
        let (retry_in, next) = match self.link {
            Link::Up => {
                log::warn!("lost connection to broker {}:{}: {why}", m.host, m.port);
                (RECONNECT_MIN, RECONNECT_MIN * 2)
            }
            Link::Down { backoff, .. } => {
                log::warn!(
                    "could not connect to broker {}:{}: {why}; next attempt in {} s",
                    m.host,
                    m.port,
                    backoff.as_secs()
                );
                (backoff, (backoff * 2).min(RECONNECT_MAX))
            }
        };
        self.link = Link::Down {
            retry_at: Instant::now() + retry_in,
            backoff: next,
        };
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                log::info!(
                    "connected to broker {}:{} (session present: {})",
                    self.config.mqtt.host,
                    self.config.mqtt.port,
                    ack.session_present
                );
                self.link = Link::Up;
                self.subscribe();
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    log::error!(
                        "broker refused a subscription (check the user's topic permissions): {:?}",
                        ack.return_codes
                    );
                } else {
                    log::info!("subscribed to {} topics", ack.return_codes.len());
                }
            }
            Event::Incoming(Packet::Publish(publish)) => self.handle_publish(publish),
            Event::Incoming(Packet::Disconnect) => {
                self.connection_lost("broker sent DISCONNECT");
            }
            Event::Incoming(_) | Event::Outgoing(_) => {}
        }
    }

    /// Subscribes again on every ConnAck: a broker that lost the session forgets them.
    fn subscribe(&mut self) {
        let m = &self.config.mqtt;
        let filters = m
            .sync_topics
            .iter()
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
            // QoS 0: a stale power command must not fire hours later.
            .chain([rumqttc::SubscribeFilter::new(
                m.projector_topic.clone(),
                QoS::AtMostOnce,
            )]);
        if let Err(e) = self.client.try_subscribe_many(filters) {
            log::error!("could not request subscriptions: {e}");
        }
    }

    fn handle_publish(&mut self, publish: Publish) {
        let m = &self.config.mqtt;
        if m.sync_topics.contains(&publish.topic) {
            if publish.payload.len() > m.max_payload_bytes {
                log::error!(
                    "dropped a sync message on {} of {} bytes: over mqtt.max_payload_bytes ({}); acknowledged so the broker does not send it again",
                    publish.topic,
                    publish.payload.len(),
                    m.max_payload_bytes
                );
                self.ack(&publish);
                return;
            }
            if !self.commit_sync(&publish) {
                self.uncommitted.push(publish);
            }
        } else if publish.topic == m.projector_topic {
            if let Some(batch) = projector::parse_batch(&publish.payload, &self.config.projector) {
                self.projector_batches.push_back(batch);
            }
            self.ack(&publish);
        } else {
            log::debug!("ignored a message on unexpected topic {}", publish.topic);
            self.ack(&publish);
        }
    }

    /// Queues one sync message's URLs in one transaction and acks it after the
    /// commit. Returns false when the commit failed (the message is kept).
    fn commit_sync(&mut self, publish: &Publish) -> bool {
        let parsed = message::parse_sync(&publish.payload);
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
        match self.queue.enqueue(&parsed.entries, unix_ms()) {
            Ok(r) => {
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
                self.ack(publish);
                if self.config.download.interval_ms == 0 && r.queued > 0 {
                    self.next_download = Instant::now();
                }
                true
            }
            Err(e) => {
                log::error!(
                    "could not commit a message from {} (kept unacknowledged, will retry): {}",
                    publish.topic,
                    e.chain()
                );
                false
            }
        }
    }

    fn commit_held_messages(&mut self) {
        if self.uncommitted.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.uncommitted);
        for (i, publish) in held.iter().enumerate() {
            if !self.commit_sync(publish) {
                self.uncommitted.extend(held.into_iter().skip(i));
                return;
            }
        }
    }

    fn ack(&self, publish: &Publish) {
        if let Err(e) = self.client.try_ack(publish) {
            log::warn!(
                "could not acknowledge a message on {} ({e}); the broker will send it again, which is harmless",
                publish.topic
            );
        }
    }

    /// Downloads at most one due row and schedules the next step.
    fn download_step(&mut self) {
        let interval = Duration::from_millis(self.config.download.interval_ms);
        let did_work = match self.queue.next_due(unix_ms()) {
            Ok(Some(job)) => {
                self.download(job);
                true
            }
            Ok(None) => false,
            Err(e) => {
                log::error!("{}", e.chain());
                false
            }
        };
        let now = Instant::now();
        self.next_download = if !interval.is_zero() {
            now + interval
        } else if did_work {
            now
        } else {
            let wait = match self.queue.next_due_time() {
                Ok(Some(at)) => Duration::from_millis(at.saturating_sub(unix_ms()).max(0) as u64),
                _ => IDLE_RECHECK,
            };
            now + wait.min(IDLE_RECHECK)
        };
    }

    fn download(&mut self, job: Job) {
        let started = Instant::now();
        let result = self.fetch_and_store(&job.url);
        let ms = started.elapsed().as_millis();
        let now = unix_ms();
        let d = &self.config.download;
        let recorded = match result {
            Ok((path, kind, len)) => {
                log::info!(
                    "cached {} -> {} ({kind}, {len} bytes, {ms} ms)",
                    job.url,
                    path.display()
                );
                self.queue.mark_done(&job, now)
            }
            Err(Failure::Permanent(reason)) => {
                log::warn!("failed {}: {reason} (not retried)", job.url);
                self.queue.mark_failed(&job, &reason, now)
            }
            Err(Failure::Transient {
                reason,
                retry_after,
            }) => {
                let attempt = job.attempts + 1;
                if attempt >= d.max_attempts {
                    let reason = format!("gave up after {attempt} attempts: {reason}");
                    log::warn!("failed {}: {reason}", job.url);
                    self.queue.mark_failed(&job, &reason, now)
                } else {
                    let delay =
                        queue::retry_delay(attempt, d.retry_base_ms, d.retry_max_ms, retry_after);
                    log::warn!(
                        "download of {} failed (attempt {attempt} of {}), next try in {:.1} s: {reason}",
                        job.url,
                        d.max_attempts,
                        delay.as_secs_f64()
                    );
                    self.queue
                        .mark_retry(&job, &reason, now + delay.as_millis() as i64, now)
                }
            }
        };
        if let Err(e) = recorded {
            log::error!("{}", e.chain());
        }
    }

    /// Fetch, verify, write atomically. Nothing reaches the final path unless verified.
    fn fetch_and_store(&self, url: &str) -> Result<(PathBuf, verify::Kind, usize), Failure> {
        let path = cache::local_path(&self.config.cache_dir, url)
            .map_err(|e| Failure::Permanent(format!("rejected path: {e}")))?;
        let fetched = download::fetch(url, &self.limits)?;
        let kind = verify::verify(&fetched.body, url, fetched.content_type.as_deref())
            .map_err(Failure::Permanent)?;
        let bytes = match (kind, self.config.download.reencode_jpeg_quality) {
            (verify::Kind::Jpeg { .. }, Some(q)) => {
                verify::reencode_jpeg(&fetched.body, q).map_err(Failure::Permanent)?
            }
            _ => fetched.body,
        };
        cache::write_atomic(&path, &bytes).map_err(|e| {
            let p = path.display();
            Failure::transient(match (e.kind(), e.raw_os_error()) {
                (std::io::ErrorKind::StorageFull, _) => {
                    format!("no space left on the cache disk writing {p}: {e}")
                }
                // ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION: the display program has it open.
                (_, Some(5 | 32)) if cfg!(windows) => {
                    format!("{p} is in use (kept the old file, will retry): {e}")
                }
                _ => format!("could not write {p}: {e}"),
            })
        })?;
        Ok((path, kind, bytes.len()))
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
