//! The broker link: rumqttc's blocking `Connection`, which connection
//! delivered which message, acks bound to that connection, subscriptions
//! renewed on every ConnAck, and the reconnect backoff.
//!
//! A packet id means something only on the connection that carried it: after
//! a reconnect the same id may name another message (RabbitMQ numbers them
//! per connection; a broker that lost its session starts again at 1). So
//! every delivery carries the number of its connection, and an ack goes out
//! only while that same connection is up. A message from an earlier
//! connection is committed but never acked: the broker sends it again and the
//! queue deduplicates. Events rumqttc read just before a connection died are
//! taken out at once and marked as the dead connection's, because rumqttc
//! would otherwise hand them over after the next ConnAck.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, Publish, QoS};

use crate::config::MAX_PACKET_BYTES;

/// Largest packet rumqttc may send. A bigger one fails in its encoder, which
/// drops the connection with the acks still queued (so the broker sends the
/// message that caused it again, in a loop): [`Link::publish`] refuses any
/// packet over it before it reaches rumqttc.
const MAX_OUTGOING_PACKET_BYTES: usize = 1024 * 1024;

/// Largest PUBLISH payload [`Link::publish`] hands to rumqttc: the packet
/// limit less the topic and headers, with room to spare.
pub const MAX_PUBLISH_BYTES: usize = MAX_OUTGOING_PACKET_BYTES - 64 * 1024;

/// Requests (acks, subscribes, publishes) buffered for the event loop.
const REQUEST_CHANNEL_CAPACITY: usize = 1024;

/// rumqttc's own connect timeout (TCP + CONNACK).
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// Poll timeout while connecting. It must outlast a connect: a shorter one
/// cancels the connect each time and the client never gets through. This is
/// the one wait in the loop longer than a work slice; no ping is due then.
const CONNECT_POLL_TIMEOUT: Duration = Duration::from_secs(CONNECT_TIMEOUT_SECS + 2);

/// First reconnect delay after a connection is lost (then doubling per
/// failed attempt); every delay is jittered by ±50% (see `random::jitter`).
const RECONNECT_MIN: Duration = Duration::from_secs(2);

/// Longest reconnect delay.
const RECONNECT_MAX: Duration = Duration::from_secs(60);

/// While work is due, rumqttc's runtime (its timers, so its pings, and its
/// socket reads) runs at least this often. Between such polls the queue of
/// events already read is drained without waiting. A timer-running poll costs
/// about 1 ms (tokio's timer has 1 ms steps), so not every turn gets one.
pub const BUSY_POLL_EVERY: Duration = Duration::from_millis(25);

/// How long a timer-running poll waits while work is due.
const BUSY_POLL_WAIT: Duration = Duration::from_millis(1);

/// Longest single wait while idle; the loop looks at its clocks again after it.
const MAX_IDLE_POLL: Duration = Duration::from_secs(10);

/// Events taken per poll before the loop gets its turn again.
const MAX_EVENTS_PER_POLL: usize = 256;

/// Payload bytes of received messages waiting for the loop past which the
/// link reads no more until the loop has taken some. QoS 0 messages have no
/// flow control: without this, a flood of large ones that the loop handles
/// more slowly than they arrive would pile up in memory. While over it,
/// rumqttc is not polled at all (a poll would read more); the loop takes at
/// least one message a turn, so the pause is short against the keep-alive.
const MAX_WAITING_BYTES: usize = 8 * 1024 * 1024;

/// A message from the broker, with the connection that delivered it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub publish: Publish,
    /// The connection it came on (see [`Link`]); acks go only to that one.
    connection: u64,
}

/// What became of an ack.
#[derive(Debug, PartialEq, Eq)]
pub enum Ack {
    /// Handed to rumqttc for the connection that delivered the message.
    Sent,
    /// Not sent: the message came on an earlier connection (or the link is
    /// down), where its packet id now means nothing. The broker sends it again.
    Stale,
    /// The request channel refused it; the broker sends the message again.
    Failed,
    /// QoS 0: nothing to acknowledge.
    NotNeeded,
}

/// Whether the link is up.
#[derive(Debug)]
enum State {
    /// Connected (ConnAck seen).
    Up,
    /// Not connected; the next attempt is due at `retry_at`.
    Down {
        /// When to try again.
        retry_at: Instant,
        /// Delay after the next failure.
        backoff: Duration,
    },
}

/// The broker link.
pub struct Link {
    /// Sends requests (acks, subscriptions, publishes) to the event loop.
    client: Client,
    /// The MQTT event loop.
    connection: Connection,
    /// Up or down.
    state: State,
    /// Number of the current connection: counts ConnAcks.
    generation: u64,
    /// `host:port`, for log lines.
    broker: String,
    /// Topic filters subscribed on every ConnAck, with their QoS.
    topics: Vec<(String, QoS)>,
    /// When rumqttc's runtime last ran (a poll with a timer).
    last_run: Instant,
    /// Messages received, not yet taken by the loop.
    inbox: VecDeque<Delivery>,
    /// Payload bytes in `inbox`.
    inbox_bytes: usize,
    /// Published (retained, QoS 1) on every ConnAck, before subscribing:
    /// the "online" state.
    birth: Option<(String, Vec<u8>)>,
    /// A ConnAck came since [`Link::take_connected`] was last asked.
    connected: bool,
    /// A SubAck granting every subscription came since
    /// [`Link::take_subscribed`] was last asked.
    subscribed: bool,
    /// The proxy the link goes through (masked), for log lines.
    via: Option<String>,
    /// Longest time between two timer-running polls while connected (the
    /// loop's promise: far below the keep-alive), for the log and `bench/run`.
    longest_gap: Duration,
}

impl Link {
    /// A link for `options` (client id, broker, keep-alive, credentials, the
    /// Last Will); it connects on the first [`Link::poll`] after a random
    /// 0..`connect_jitter` (so a fleet that boots together spreads out).
    pub fn new(
        mut options: MqttOptions,
        topics: Vec<(String, QoS)>,
        connect_jitter: Duration,
    ) -> Link {
        let broker = {
            let (host, port) = options.broker_address();
            if host.contains("://") {
                host // a WebSocket URL, with its port
            } else {
                format!("{host}:{port}")
            }
        };
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_OUTGOING_PACKET_BYTES);
        let (client, mut connection) = Client::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = connection.eventloop.network_options();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        connection.eventloop.set_network_options(network);
        Link {
            client,
            connection,
            state: State::Down {
                retry_at: Instant::now() + crate::random::up_to(connect_jitter),
                backoff: RECONNECT_MIN,
            },
            generation: 0,
            broker,
            topics,
            last_run: Instant::now(),
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            via: None,
            birth: None,
            connected: false,
            subscribed: false,
            longest_gap: Duration::ZERO,
        }
    }

    /// Longest time between two timer-running polls while connected, so far.
    pub fn longest_poll_gap(&self) -> Duration {
        self.longest_gap
    }

    /// Whether messages received are waiting for the loop.
    pub fn has_deliveries(&self) -> bool {
        !self.inbox.is_empty()
    }

    /// Names the proxy the link goes through (masked), for its log lines.
    pub fn set_via(&mut self, proxy: String) {
        self.via = Some(proxy);
    }

    /// Sets what is published (retained, QoS 1) on every ConnAck, first.
    pub fn set_birth(&mut self, topic: String, payload: Vec<u8>) {
        self.birth = Some((topic, payload));
    }

    /// Whether every subscription was granted since the last call (the
    /// link is fully up: an agent on trial confirms then).
    pub fn take_subscribed(&mut self) -> bool {
        std::mem::take(&mut self.subscribed)
    }

    /// Whether a ConnAck came since the last call.
    pub fn take_connected(&mut self) -> bool {
        std::mem::take(&mut self.connected)
    }

    /// Whether the broker connection is up.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up)
    }

    /// When the next connect attempt is due, while down.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.state {
            State::Up => None,
            State::Down { retry_at, .. } => Some(retry_at),
        }
    }

    /// Runs the MQTT side for one loop turn. `idle_until` is when the loop
    /// has work again (None: work is due now). While connected and busy it
    /// takes the events that are there, running rumqttc's runtime (pings,
    /// socket reads) at least every [`BUSY_POLL_EVERY`]; while idle it waits
    /// for the first event or `idle_until`. While disconnected it sleeps (if
    /// idle) until the next attempt, then waits for one connect.
    pub fn poll(&mut self, idle_until: Option<Instant>) {
        let now = Instant::now();
        match self.state {
            State::Down { retry_at, .. } if now < retry_at => {
                if let Some(until) = idle_until {
                    crate::os::sleep(until.min(retry_at).saturating_duration_since(now));
                }
            }
            State::Down { .. } => {
                let polled = self.connection.recv_timeout(CONNECT_POLL_TIMEOUT);
                self.last_run = Instant::now();
                match polled {
                    Ok(Ok(event)) => self.handle(event),
                    Ok(Err(e)) => self.lost(&describe(&e, self.via.as_deref())),
                    Err(rumqttc::RecvTimeoutError::Timeout) => self.lost("connect timed out"),
                    Err(rumqttc::RecvTimeoutError::Disconnected) => {
                        unreachable!("the link holds the client, so the request channel stays open")
                    }
                }
            }
            State::Up => {
                let wait = match idle_until {
                    Some(until) => Some(until.saturating_duration_since(now).min(MAX_IDLE_POLL)),
                    None if now.duration_since(self.last_run) >= BUSY_POLL_EVERY => {
                        Some(BUSY_POLL_WAIT)
                    }
                    None => None,
                };
                self.take_events(wait);
            }
        }
    }

    /// Takes events: the first with a timer-running wait (if `wait` is
    /// given), the rest without waiting, until none is left or the cap.
    fn take_events(&mut self, mut wait: Option<Duration>) {
        for _ in 0..MAX_EVENTS_PER_POLL {
            if self.inbox_bytes >= MAX_WAITING_BYTES {
                return;
            }
            let polled = match wait.take() {
                Some(d) if !d.is_zero() => {
                    if self.is_up() {
                        self.longest_gap = self.longest_gap.max(self.last_run.elapsed());
                    }
                    let r = self.connection.recv_timeout(d);
                    self.last_run = Instant::now();
                    r
                }
                // Work is due: no timer (tokio's timer would wait ~1 ms).
                _ => self.connection.try_recv().map_err(|e| match e {
                    rumqttc::TryRecvError::Empty => rumqttc::RecvTimeoutError::Timeout,
                    rumqttc::TryRecvError::Disconnected => rumqttc::RecvTimeoutError::Disconnected,
                }),
            };
            match polled {
                Ok(Ok(event)) => self.handle(event),
                Ok(Err(e)) => return self.lost(&describe(&e, self.via.as_deref())),
                Err(rumqttc::RecvTimeoutError::Timeout) => return,
                Err(rumqttc::RecvTimeoutError::Disconnected) => {
                    unreachable!("the link holds the client, so the request channel stays open")
                }
            }
            if !self.is_up() {
                return;
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.generation += 1;
                // A gap across a reconnect is the backoff, not the loop's.
                self.last_run = Instant::now();
                self.state = State::Up;
                self.connected = true;
                log::info!(
                    "connected to broker {} (session present: {})",
                    self.broker,
                    ack.session_present
                );
                if let Some((topic, payload)) = &self.birth {
                    if let Err(e) =
                        self.client
                            .try_publish(topic, QoS::AtLeastOnce, true, payload.clone())
                    {
                        log::warn!("could not publish the online state to {topic}: {e}");
                    }
                }
                self.subscribe();
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                let names: Vec<&str> = self.topics.iter().map(|(t, _)| t.as_str()).collect();
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    log::error!(
                        "broker refused a subscription to {} (check the user's topic permissions): {:?}",
                        names.join(", "),
                        ack.return_codes
                    );
                } else {
                    log::info!("subscribed to {}", names.join(", "));
                    self.subscribed = true;
                }
            }
            Event::Incoming(Packet::Publish(publish)) => self.push(publish),
            Event::Incoming(_) | Event::Outgoing(_) => {}
        }
    }

    /// The connection failed (or a connect did): keep what rumqttc had
    /// already read, marked as the dead connection's, and back off.
    fn lost(&mut self, why: &str) {
        let read_before_death = std::mem::take(&mut self.connection.eventloop.state.events);
        for event in read_before_death {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                self.push(publish);
            }
        }
        let (retry_in, next) = match self.state {
            State::Up => {
                let retry_in = crate::random::jitter(RECONNECT_MIN);
                log::warn!(
                    "lost connection to broker {}: {why}; reconnecting in {:.1} s",
                    self.broker,
                    retry_in.as_secs_f64()
                );
                (retry_in, RECONNECT_MIN * 2)
            }
            State::Down { backoff, .. } => {
                let retry_in = crate::random::jitter(backoff);
                log::warn!(
                    "could not connect to broker {}: {why}; next attempt in {:.1} s",
                    self.broker,
                    retry_in.as_secs_f64()
                );
                (retry_in, (backoff * 2).min(RECONNECT_MAX))
            }
        };
        self.state = State::Down {
            retry_at: Instant::now() + retry_in,
            backoff: next,
        };
    }

    /// Subscribes again on every ConnAck: a broker that lost the session forgets them.
    fn subscribe(&mut self) {
        let filters = self
            .topics
            .iter()
            .map(|(t, qos)| rumqttc::SubscribeFilter::new(t.clone(), *qos));
        if let Err(e) = self.client.try_subscribe_many(filters) {
            log::error!("could not request subscriptions: {e}");
        }
    }

    /// Keeps a received message for the loop, marked with its connection.
    fn push(&mut self, publish: Publish) {
        self.inbox_bytes += publish.payload.len();
        self.inbox.push_back(Delivery {
            publish,
            connection: self.generation,
        });
    }

    /// The next message received, oldest first.
    pub fn next_delivery(&mut self) -> Option<Delivery> {
        let d = self.inbox.pop_front()?;
        self.inbox_bytes -= d.publish.payload.len();
        Some(d)
    }

    /// Whether `d` came on the connection that is up now.
    pub fn is_current(&self, d: &Delivery) -> bool {
        self.is_up() && d.connection == self.generation
    }

    /// Whether `newer` came on a later connection than `older`.
    pub fn is_later(newer: &Delivery, older: &Delivery) -> bool {
        newer.connection > older.connection
    }

    /// Acknowledges `d`, but only on the connection that delivered it.
    pub fn ack(&self, d: &Delivery) -> Ack {
        if d.publish.qos == QoS::AtMostOnce {
            return Ack::NotNeeded;
        }
        if !self.is_current(d) {
            return Ack::Stale;
        }
        match self.client.try_ack(&d.publish) {
            Ok(()) => Ack::Sent,
            Err(e) => {
                log::warn!(
                    "could not acknowledge a message on {} ({e}); the broker will send it again, which is harmless",
                    d.publish.topic
                );
                Ack::Failed
            }
        }
    }

    /// Something another thread can call to wake a loop blocked in
    /// [`Link::poll`] when the agent must stop: it asks rumqttc to send
    /// `goodbye` (retained, QoS 1: the "offline" state) and a DISCONNECT (a
    /// clean goodbye, after which the broker sends no Last Will), which ends
    /// any wait.
    pub fn stop_waker(
        &self,
        goodbye: Option<(String, Vec<u8>)>,
    ) -> impl Fn() + Send + Sync + 'static {
        let client = self.client.clone();
        move || {
            if let Some((topic, payload)) = &goodbye {
                let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload.clone());
            }
            let _ = client.try_disconnect();
        }
    }

    /// Lets rumqttc send what is queued (the DISCONNECT) for at most `limit`.
    pub fn flush(&mut self, limit: Duration) {
        if !self.is_up() {
            return;
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self
                .connection
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => {
                    return
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Publishes without blocking (QoS 0: results, reports, events). A
    /// payload over [`MAX_PUBLISH_BYTES`] is refused here: rumqttc would
    /// drop the connection over it.
    pub fn publish(&self, topic: &str, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        if payload.len() > MAX_PUBLISH_BYTES || topic.len() > 65_535 {
            return Err(format!(
                "a message of {} bytes is over the {MAX_PUBLISH_BYTES}-byte limit for what holosync publishes; not sent",
                payload.len()
            ));
        }
        self.client
            .try_publish(topic, QoS::AtMostOnce, retain, payload)
            .map_err(|e| e.to_string())
    }
}

/// A connection error for the log (`via`: the proxy, if any). A proxy's
/// refusal names the proxy. A failed TLS handshake says so and why
/// (rustls' reason: `invalid peer certificate: UnknownIssuer`, `... Expired`,
/// `... NotValidForName`, or the broker's alert), without rumqttc's layers.
fn describe(e: &rumqttc::ConnectionError, via: Option<&str>) -> String {
    // Without the `ws` feature there is no proxy to name.
    #[cfg(not(feature = "ws"))]
    let _ = via;
    match e {
        rumqttc::ConnectionError::ConnectionRefused(
            code @ (rumqttc::ConnectReturnCode::BadUserNamePassword
            | rumqttc::ConnectReturnCode::NotAuthorized),
        ) => format!(
            "the broker refused the login ({code:?}): check mqtt.username and mqtt.password"
        ),
        #[cfg(feature = "ws")]
        rumqttc::ConnectionError::Proxy(p) => {
            let proxy = via.unwrap_or("the proxy");
            let text = p.to_string();
            let hint = if text.contains("407") {
                " (407: the proxy wants other credentials; check proxy.url)"
            } else {
                ""
            };
            format!("through proxy {proxy}: {text}{hint}")
        }
        #[cfg(feature = "tls")]
        rumqttc::ConnectionError::Tls(rumqttc::TlsError::Io(io)) => {
            format!("TLS handshake failed: {io}")
        }
        #[cfg(feature = "tls")]
        rumqttc::ConnectionError::Tls(tls) => format!("TLS handshake failed: {tls}"),
        e => e.to_string(),
    }
}
