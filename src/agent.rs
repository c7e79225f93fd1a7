//! The one loop: each turn polls the broker link, dispatches what arrived,
//! and gives every piece of work in progress (a projector message, a
//! download) one bounded slice. `agent.rs` owns the turn; each capability
//! lives in its own module (`link`, `inbox`, `transfers`, `projector`). See
//! ARCHITECTURE.md for the timing budget.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{LastWill, MqttOptions, QoS};

use crate::cache;
use crate::config::Config;
use crate::download;
use crate::error::{Context, Result};
use crate::http;
use crate::inbox::{self, Inbox, Kind};
use crate::intake::{Intake, Sorted};
use crate::link::{Delivery, Link};
use crate::projector::{self, Batch, Projectors};
use crate::queue::{unix_ms, Queue, RUNNING_KEY};
use crate::report::{Identity, Report};
use crate::swap::{self, Paths};
use crate::transfers::Transfers;
use crate::update::{self, Outcome, Updater};

/// Longest time one piece of work (a download, a projector) runs per turn
/// before the broker link gets its turn again.
pub const WORK_SLICE: Duration = Duration::from_millis(20);

/// Longest time a turn spends on what arrived (dispatching deliveries,
/// retrying held commits) before the rest waits for the next turn, with a
/// timer-running poll between. At least one message is handled per turn,
/// so one slow commit (an fsync on a worn SD card) is the most a turn takes.
const DISPATCH_SLICE: Duration = Duration::from_millis(20);

/// Longest wait for MQTT when nothing else is due (the link wakes at once
/// for a message; the loop looks at its clocks again after this).
const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// A wall clock that moved this much less than the monotonic clock between
/// two turns jumped back.
const CLOCK_JUMP: Duration = Duration::from_secs(2);

/// How long a clean stop waits for the broker to get the DISCONNECT.
const STOP_FLUSH: Duration = Duration::from_millis(500);

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
    /// Projector messages in progress and waiting.
    projectors: Projectors,
    /// Sorts what arrives; remembers the retained messages taken this run.
    intake: Intake,
    /// What the fleet hears of this kiosk, and its commands.
    report: Report,
    /// The wall clock and monotonic clock at the last turn, to see jumps.
    clock: (Instant, i64),
    /// `update` and `set-config`: a new version's download, the handover's files.
    updater: Updater,
    /// This run is a new version's (or config's) trial, not yet confirmed.
    trial: bool,
    /// How the last handover ended, for `events` once subscribed.
    news: Option<serde_json::Value>,
    /// A handover is ready: the loop stops and the supervisor takes over.
    hand_over: Option<swap::Kind>,
}

impl Agent {
    /// Opens the queue, settles the client id and prepares the broker link;
    /// `trial`: this run is a new version's (or config's) trial; `ended`:
    /// how the handover before this start ended, if one did.
    pub fn new(
        config: Config,
        config_path: PathBuf,
        paths: Paths,
        trial: bool,
        ended: Option<swap::Marker>,
    ) -> Result<Agent> {
        let mut queue = Queue::open_or_recover(&config.database)?;
        let client_id = crate::client_id::client_id(&config, &queue)?;
        log::info!(
            "holosync {} starting: config {}, client id {client_id}, broker {}, cache {}, database {}",
            env!("CARGO_PKG_VERSION"),
            config_path.display(),
            config
                .mqtt
                .ws_url()
                .unwrap_or_else(|| format!("{}:{}", config.mqtt.host, config.mqtt.port())),
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
        // Durably: a kiosk switched off while idle makes no other commit, and
        // its next start must still know the run ended without a stop.
        queue.set_meta_durably(RUNNING_KEY, &started_at)?;
        let moved = queue.clamp_schedule(unix_ms(), config.download.retry_max_ms)?;
        if moved > 0 {
            log::warn!(
                "{moved} queued URLs were scheduled too far ahead (the clock was ahead when they were queued); they are due now"
            );
        }

        let news = ended.map(|m| update::ended(&m));
        if let Some(n) = &news {
            log::info!("the last handover ended: {n}");
            // On the disk before the marker goes (see `swap::clear`).
            queue.set_meta_durably(crate::queue::LAST_UPDATE_KEY, &n.to_string())?;
            swap::clear(&paths)?;
        }
        let identity = Identity {
            client_id: client_id.clone(),
            started_at,
            host: crate::client_id::hostname(),
        };
        let mut report = Report::new(&config, identity);
        report.load_done_ids(&queue);
        let m = &config.mqtt;
        // For WebSockets rumqttc takes the broker as a URL (its port argument is unused).
        let broker = m.ws_url().unwrap_or_else(|| m.host.clone());
        let mut options = MqttOptions::new(client_id, broker, m.port());
        options.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
        #[cfg(feature = "ws")]
        if m.transport == crate::config::Transport::Ws {
            options.set_transport(rumqttc::Transport::Ws);
        }
        #[cfg(feature = "tls")]
        {
            let files = |(key, message)| {
                crate::error::Error::msg(format!("config error: key `{key}`: {message}"))
            };
            crate::tls::init_https(config.download.ca_file.clone());
            if m.uses_tls() {
                let tls = rumqttc::TlsConfiguration::Rustls(
                    crate::tls::mqtt_config(m.ca_file.as_deref(), m.client_pair())
                        .map_err(files)?,
                );
                options.set_transport(match m.transport {
                    #[cfg(feature = "ws")]
                    crate::config::Transport::Wss => rumqttc::Transport::wss_with_config(tls),
                    _ => rumqttc::Transport::tls_with_config(tls),
                });
            }
        }
        let proxies = proxies(&config);
        log::info!("{}", proxies.describe());
        #[cfg(feature = "ws")]
        let mqtt_proxy = (m.transport != crate::config::Transport::Tcp || m.via_proxy)
            .then(|| proxies.for_host(m.uses_tls(), &m.host))
            .flatten();
        #[cfg(feature = "ws")]
        {
            if let Some(p) = mqtt_proxy {
                log::info!("MQTT goes through {p} (CONNECT)");
                options.set_proxy(rumqttc::Proxy {
                    ty: rumqttc::ProxyType::Http,
                    auth: match &p.auth {
                        Some((user, password)) => rumqttc::ProxyAuth::Basic {
                            username: user.clone(),
                            password: password.expose().to_string(),
                        },
                        None => rumqttc::ProxyAuth::None,
                    },
                    addr: p.host.clone(),
                    port: p.port,
                });
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
        #[cfg(feature = "ws")]
        if let Some(p) = mqtt_proxy {
            link.set_via(p.to_string());
        }
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
        let retries = crate::update_fetch::Retries {
            max_attempts: d.max_attempts,
            base_ms: d.retry_base_ms,
            max_ms: d.retry_max_ms,
        };
        let updater = Updater::new(
            paths,
            settings.limits,
            retries,
            http::Pool::new(proxies.clone()),
        );
        let transfers = Transfers::new(&config, settings, proxies.clone());
        // A technician who deleted the cache gets it back without a message.
        report.start_audit(&link, None, None);
        Ok(Agent {
            config,
            queue,
            link,
            inbox: Inbox::default(),
            transfers,
            projectors: Projectors::default(),
            intake: Intake::default(),
            report,
            clock: (Instant::now(), unix_ms()),
            updater,
            trial,
            news,
            hand_over: None,
        })
    }

    /// Runs until a stop is requested (see `os::watch_stop`) or a handover
    /// is ready, then stops cleanly; returns the handover's kind, if that.
    pub fn run(mut self) -> Option<swap::Kind> {
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
                return None;
            }
            if let Some(kind) = self.hand_over {
                self.stop(match kind {
                    swap::Kind::Update => "handing over to the new version",
                    swap::Kind::Config => "restarting with the new config",
                });
                return Some(kind);
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
        self.updater.stop();
        if self.projectors.busy() {
            log::warn!(
                "left {} projector messages unfinished",
                self.projectors.count()
            );
        }
        log::info!(
            "longest gap between two broker polls while connected this run: {} ms",
            self.link.longest_poll_gap().as_millis()
        );
        self.report.flush_events(&self.link);
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
        if self.link.take_subscribed() {
            self.online();
        }
        let slice_end = Instant::now() + DISPATCH_SLICE;
        while let Some(d) = self.link.next_delivery() {
            self.dispatch(d);
            if Instant::now() >= slice_end {
                break;
            }
        }
        self.watch_clock();
        let mut parts = inbox::Parts {
            queue: &mut self.queue,
            report: &mut self.report,
            link: &self.link,
            max_delay_ms: self.config.download.retry_max_ms,
        };
        if self.inbox.retry(slice_end, &mut parts) {
            self.transfers.wake();
        }
        if let Some(batch) = self.projectors.step(&self.config.projector) {
            self.publish_results(&batch);
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
        if self.report.has_orders() {
            self.take_orders();
        }
        if let Some(outcome) = self.updater.step(&self.config, Instant::now() + WORK_SLICE) {
            self.answer(outcome);
        }
    }

    /// Hands the waiting `update` and `set-config` commands to the updater,
    /// unless the last handover is still being closed (they wait a turn)
    /// or cannot be (they are refused).
    fn take_orders(&mut self) {
        let busy = match self.updater.readiness() {
            swap::Readiness::Wait => return,
            swap::Readiness::Ready => None,
            swap::Readiness::Busy(why) => Some(why),
        };
        while let Some(order) = self.report.take_order() {
            let outcome = match &busy {
                None => self.updater.take(order, &self.config, &mut self.queue),
                Some(why) => {
                    let name = match order.request {
                        update::Request::Update(_) => "update",
                        update::Request::SetConfig { .. } => "set-config",
                    };
                    Some(update::refused(order, name, format!("busy: {why}")))
                }
            };
            if let Some(outcome) = outcome {
                self.answer(outcome);
            }
        }
    }

    /// Answers an `update` or `set-config`, acks it, and notes a handover.
    fn answer(&mut self, o: Outcome) {
        self.report.answer(&self.link, &self.queue, &o.id, o.answer);
        if let Some(d) = o.delivery {
            inbox::ack(&self.link, &d);
        }
        self.hand_over = self.hand_over.or(o.hand_over);
    }

    /// Connected and subscribed: a trial is confirmed, and how the last
    /// handover ended is told.
    fn online(&mut self) {
        if std::mem::take(&mut self.trial) {
            let (queue, mut recorded) = (&mut self.queue, None);
            let confirmed = swap::confirm(self.updater.paths(), |m| {
                let news = update::ended(m);
                queue.set_meta_durably(crate::queue::LAST_UPDATE_KEY, &news.to_string())?;
                recorded = Some(news);
                Ok(())
            });
            match confirmed {
                Ok(Some(_)) => self.news = recorded,
                Ok(None) => {}
                Err(e) => log::error!("{}", e.chain()),
            }
        }
        if let Some(news) = self.news.take() {
            let id = news["id"].clone();
            self.report.answer(&self.link, &self.queue, &id, news);
        }
    }

    /// None when work is due now; else when the loop next has something to do.
    fn idle_until(&self) -> Option<Instant> {
        if self.projectors.busy()
            || self.report.busy()
            || self.link.has_deliveries()
            || self.updater.busy()
            || self.hand_over.is_some()
        {
            return None;
        }
        let now = Instant::now();
        let mut until = self
            .transfers
            .idle_until(now + inbox::COMMIT_RETRY)?
            .min(now + IDLE_RECHECK);
        // An update waiting out its backoff wakes the loop when it ends.
        for t in [
            self.inbox.retry_at(),
            self.report.next_due(),
            self.updater.waiting_until(),
        ]
        .into_iter()
        .flatten()
        {
            until = until.min(t);
        }
        (until > now).then_some(until)
    }

    /// Handles one message from the broker (see `intake` for the rules).
    fn dispatch(&mut self, d: Delivery) {
        let topic = &d.publish.topic;
        let is_command = self.report.is_command_topic(topic);
        match self.intake.sort(&self.config.mqtt, is_command, &d.publish) {
            Sorted::Sync => self.receive(Kind::Sync, d),
            Sorted::Command => self.receive(Kind::Command, d),
            Sorted::Projector => {
                if let Some(batch) =
                    projector::parse_batch(&d.publish.payload, &self.config.projector)
                {
                    self.projectors.push(batch);
                }
                inbox::ack(&self.link, &d);
            }
            Sorted::TooBig { key, max } => {
                let what = match (is_command, *topic == self.config.mqtt.projector_topic) {
                    (true, _) => "command",
                    (false, true) => "projector message",
                    (false, false) => "sync message",
                };
                let why = format!(
                    "{what} of {} bytes is over {key} ({max}); not read",
                    d.publish.payload.len()
                );
                log::error!(
                    "dropped a {what} on {topic} of {} bytes: over {key} ({max}); acknowledged so the broker does not send it again",
                    d.publish.payload.len()
                );
                if is_command {
                    self.report.refused(&self.link, &why);
                }
                inbox::ack(&self.link, &d);
            }
            Sorted::Ignore => {
                inbox::ack(&self.link, &d);
            }
        }
    }

    /// Hands a message whose effect must be committed before its ack to the inbox.
    fn receive(&mut self, kind: Kind, d: Delivery) {
        let mut parts = inbox::Parts {
            queue: &mut self.queue,
            report: &mut self.report,
            link: &self.link,
            max_delay_ms: self.config.download.retry_max_ms,
        };
        if self.inbox.receive(kind, d, &mut parts) {
            self.transfers.wake();
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
            self.transfers.wake();
        }
    }
}

/// The proxies in force (config, else environment, else Windows' Internet
/// Options); a bad environment or registry value is logged and ignored.
fn proxies(config: &Config) -> crate::proxy::Proxies {
    let p = &config.proxy;
    crate::proxy::Proxies::resolve(
        p.url.as_ref().map(|u| u.expose()),
        p.no_proxy.as_deref(),
        |k| std::env::var(k).ok(),
        crate::os::windows_proxy_settings().as_ref(),
    )
    .unwrap_or_else(|e| {
        log::error!("ignored a proxy setting: {e}; going without a proxy");
        crate::proxy::Proxies::default()
    })
}
