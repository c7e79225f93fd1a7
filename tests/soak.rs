//! Chaos soak: thousands of URLs synced while the agent is SIGKILLed at
//! random moments, the broker restarts and the HTTP server misbehaves; at the
//! end nothing may be lost, corrupt or left half-written.
//!
//! The MQTT keep-alive is 5 s, so a loop that starves its pings while it
//! downloads gets the agent dropped by the broker: such drops are counted as
//! `unexpected_disconnects` and must be 0. The broker restarts three times:
//! with persistence (agent down, then agent up) and once without (the broker
//! forgets the session; packet ids start again on the new connection).
//!
//! Sized for CI by default (about 2,000 URLs, 100 messages, 20+ kills, under
//! three minutes on two cores). Environment knobs:
//!
//! - `HOLOSYNC_SOAK_URLS` (default 2000): distinct URLs;
//! - `HOLOSYNC_SOAK_MESSAGES` (default 100): QoS 1 sync messages carrying them;
//! - `HOLOSYNC_SOAK_SECONDS` (default 75): length of the chaos phase (it also
//!   lasts until 20 kills, 2 broker restarts and every message are done);
//! - `HOLOSYNC_SOAK_KILLS` (default 20): least number of SIGKILLs;
//! - `HOLOSYNC_SOAK_DRAIN_SECONDS` (default 150): deadline for the queue to
//!   drain after the chaos;
//! - `HOLOSYNC_SOAK_SEED`: replays a schedule (the seed is printed on stderr).
//!
//! The result is one line on stdout, shown with
//! `cargo test --test soak -- --nocapture`:
//! `soak: urls=2000 messages=100 kills=23 broker_restarts=3 faults=431 unexpected_disconnects=0 lost=0 corrupt=0 stray_tmp=0 seconds=152`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    files_under, jpeg, merge, mix64, png, poll_until, tail, Agent, Fault, FaultPlan, FlakyServer,
    Mosquitto, TempDir,
};
use serde_json::json;

/// The sync topics messages are spread over (the default config's).
const TOPICS: [&str; 3] = ["sync", "sync-single-work", "holo-file-sync"];

/// Log rotation limits given to the agent (small, so rotation happens).
const LOG_MAX_BYTES: u64 = 200_000;
/// Rotated log files kept.
const LOG_KEEP: u64 = 3;

/// Share of requests that get a fault during the chaos phase.
const FAULT_RATE_PERCENT: u64 = 20;

/// xorshift64*: a tiny deterministic PRNG for the chaos schedule.
struct Xorshift(u64);

impl Xorshift {
    /// A generator from `seed` (any value; zero is remapped).
    fn new(seed: u64) -> Xorshift {
        Xorshift(mix64(seed) | 1)
    }

    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A positive integer from the environment, or `default`.
fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// The i-th test file: a raw request target and small deterministic image
/// bytes (JPEG and PNG alternating, a few KB each; every tenth target has a
/// `!thumb` style suffix, as the real CDN URLs do).
fn image(i: u64) -> (String, Vec<u8>) {
    let seed = i as u32 + 1;
    let (ext, bytes) = if i.is_multiple_of(2) {
        (
            "jpg",
            jpeg(40 + (i % 17) as u16, 32 + (i % 13) as u16, seed),
        )
    } else {
        ("png", png(24 + (i % 9) as u32, 20 + (i % 7) as u32, seed))
    };
    let suffix = if i % 10 == 3 { "!thumb" } else { "" };
    (format!("/soak/w{:03}/{i:05}.{ext}{suffix}", i / 25), bytes)
}

/// All test files, generated on every core.
fn images(n: u64) -> Vec<(String, Vec<u8>)> {
    let cores = thread::available_parallelism().map_or(2, |c| c.get() as u64);
    let mut out: Vec<(u64, String, Vec<u8>)> = thread::scope(|s| {
        let handles: Vec<_> = (0..cores)
            .map(|c| {
                s.spawn(move || {
                    (c..n)
                        .step_by(cores as usize)
                        .map(|i| {
                            let (p, b) = image(i);
                            (i, p, b)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("image thread"))
            .collect()
    });
    out.sort_by_key(|(i, _, _)| *i);
    out.into_iter().map(|(_, p, b)| (p, b)).collect()
}

/// Every row's state by URL, read from the queue database.
fn db_states(db: &Path) -> rusqlite::Result<BTreeMap<String, String>> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut s = conn.prepare("SELECT url, state FROM queue")?;
    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Row counts per state.
fn db_counts(db: &Path) -> rusqlite::Result<BTreeMap<String, u64>> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mut s = conn.prepare("SELECT state, COUNT(*) FROM queue GROUP BY state")?;
    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Whether the agent's log shows a subscription after its latest start
/// (looking at the current and the last rotated file, in order).
fn subscribed_since_last_start(dir: &Path) -> bool {
    let text = common::read_lossy(&dir.join("holosync.log.1"))
        + &common::read_lossy(&dir.join("holosync.log"));
    text.rfind(" starting: ")
        .is_some_and(|start| text[start..].contains("subscribed to"))
}

/// The driver's bookkeeping: who was published when, what was done to whom.
struct Chaos<'a> {
    /// The broker (restarted in place).
    broker: &'a mut Mosquitto,
    /// The agent under test.
    agent: &'a mut Agent,
    /// The schedule's randomness.
    rng: Xorshift,
    /// Message payloads in publishing order.
    messages: Vec<String>,
    /// Messages published so far.
    published: usize,
    /// Of those, published while the agent was not running.
    published_while_down: usize,
    /// SIGKILLs sent.
    kills: u64,
    /// Broker restarts done.
    broker_restarts: u64,
    /// Agent exits nobody asked for (a crash), with their status.
    unexpected_exits: Vec<String>,
    /// The agent's MQTT client id (to find it in the broker's log).
    client_id: String,
}

impl Chaos<'_> {
    /// Publishes the next message (QoS 1, topics in turn).
    fn publish_next(&mut self) {
        let i = self.published;
        let topic = TOPICS[i % TOPICS.len()];
        self.broker.publish(topic, self.messages[i].as_bytes(), 1);
        self.published += 1;
    }

    /// Notes it if the agent exited on its own since the last look.
    fn check_alive(&mut self, when: &str) {
        if !self.agent.is_running() {
            let status = self.agent.wait_exit(Duration::ZERO);
            self.unexpected_exits.push(format!(
                "{when}: {status}; stderr tail: {}",
                tail(&self.agent.stderr(), 500)
            ));
        }
    }

    /// SIGKILLs the agent (it must have been running).
    fn kill(&mut self) {
        self.check_alive(&format!("before kill {}", self.kills + 1));
        self.agent.kill();
        self.kills += 1;
    }

    /// Restarts the broker under whatever state the agent is in.
    fn restart_broker(&mut self) {
        self.broker.restart();
        self.broker_restarts += 1;
    }

    /// Restarts the broker without persistence, which forgets the agent's
    /// session. Done with the agent up and every message published so far in
    /// the queue (a message the broker forgets before delivering it is the
    /// broker's loss, not the agent's); publishing goes on once the agent has
    /// subscribed again.
    fn restart_broker_volatile(&mut self, urls_of: &dyn Fn(usize) -> Vec<String>, db: &Path) {
        let wanted: Vec<String> = (0..self.published).flat_map(urls_of).collect();
        poll_until(Duration::from_secs(60), || {
            db_states(db).is_ok_and(|s| wanted.iter().all(|u| s.contains_key(u)))
        });
        let subscribe = format!("Received SUBSCRIBE from {}", self.client_id);
        let subscriptions = self.broker.log().matches(&subscribe).count();
        self.broker.restart_volatile();
        self.broker_restarts += 1;
        // The new session has no subscriptions until the agent's SUBSCRIBE:
        // a message published before that is not for it, by MQTT's rules.
        poll_until(Duration::from_secs(60), || {
            self.broker.log().matches(&subscribe).count() > subscriptions
        });
    }
}

/// The chaos soak: 2,000 URLs in 100 QoS 1 messages (some sent while the
/// agent is down, a few URLs repeated), 20+ SIGKILLs at seeded random moments
/// 1-6 s apart, three broker restarts (one while the agent is down, one under a
/// running agent, one without persistence that forgets the session), and 20% of HTTP requests answered with a reset, 500, 503,
/// 429 + Retry-After, a body slower than the timeout or a short body. With
/// faults off and the agent left running, every URL must end `done` with a
/// byte-identical file, no temp file or foreign file may remain, the database
/// must pass `PRAGMA integrity_check`, and the logs must respect rotation.
#[test]
fn soak_kills_broker_restarts_and_http_faults_lose_nothing() {
    let started = Instant::now();
    let n_urls = env_u64("HOLOSYNC_SOAK_URLS", 2000).max(1);
    let n_messages = env_u64("HOLOSYNC_SOAK_MESSAGES", 100).clamp(1, n_urls);
    let chaos = Duration::from_secs(env_u64("HOLOSYNC_SOAK_SECONDS", 75));
    let min_kills = env_u64("HOLOSYNC_SOAK_KILLS", 20);
    let drain = Duration::from_secs(env_u64("HOLOSYNC_SOAK_DRAIN_SECONDS", 150));
    let seed = env_u64(
        "HOLOSYNC_SOAK_SEED",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_000),
    );
    eprintln!("soak seed {seed} (HOLOSYNC_SOAK_SEED={seed} replays the schedule and the faults)");
    let mut rng = Xorshift::new(seed);

    // Files, and the messages that carry them: consecutive slices of new URLs,
    // each with up to two URLs of earlier messages again (redelivery of done
    // URLs puts them back to pending, which must be harmless).
    let files = images(n_urls);
    let server = FlakyServer::start(FaultPlan {
        seed: mix64(seed ^ 0xFA17),
        rate_percent: FAULT_RATE_PERCENT,
        slow_pause: Duration::from_millis(1600),
        retry_after_secs: 1,
    });
    for (path, bytes) in &files {
        server.set(path, bytes.clone());
    }
    let urls: Vec<String> = files.iter().map(|(p, _)| server.url(p)).collect();
    let messages: Vec<String> = (0..n_messages)
        .map(|k| {
            let (lo, hi) = (k * n_urls / n_messages, (k + 1) * n_urls / n_messages);
            let mut batch: Vec<&str> = urls[lo as usize..hi as usize]
                .iter()
                .map(String::as_str)
                .collect();
            for _ in 0..2 {
                if lo > 0 && rng.chance(50) {
                    batch.push(&urls[rng.range(0, lo - 1) as usize]);
                }
            }
            batch.join(",")
        })
        .collect();

    let mut broker = Mosquitto::start();
    let dir = TempDir::new("soak");
    let mut config = Agent::default_config(broker.port);
    merge(
        &mut config,
        json!({
            "mqtt": {"keep_alive_secs": 5},
            "download": {"interval_ms": 0, "timeout_secs": 1, "retry_base_ms": 100,
                         "retry_max_ms": 1000, "max_attempts": 1000},
            "log": {"level": "debug", "max_bytes": LOG_MAX_BYTES, "keep": LOG_KEEP}
        }),
    );
    let client_id = config["mqtt"]["client_id"].as_str().unwrap().to_string();
    let mut agent = Agent::new(dir.path(), config);
    let db = dir.path().join("holosync.db");
    let urls_of =
        |k: usize| -> Vec<String> { messages[k].split(',').map(str::to_string).collect() };

    // ---- chaos phase -------------------------------------------------------
    let mut c = Chaos {
        broker: &mut broker,
        agent: &mut agent,
        rng,
        messages: messages.clone(),
        published: 0,
        published_while_down: 0,
        kills: 0,
        broker_restarts: 0,
        unexpected_exits: Vec::new(),
        client_id: client_id.clone(),
    };
    let chaos_start = Instant::now();
    let total = c.messages.len();
    // Message k is due at k/total of 85% of the chaos phase (or earlier, when
    // published while the agent is down); restarts at 30%, 55% and 75%.
    let due = |k: usize| chaos_start + chaos.mul_f64(0.85 * k as f64 / total as f64);
    let restart_down_at = chaos_start + chaos.mul_f64(0.30);
    let restart_up_at = chaos_start + chaos.mul_f64(0.55);
    let restart_volatile_at = chaos_start + chaos.mul_f64(0.75);
    // The persistent session only exists once the agent has subscribed: a
    // message published before that is (by MQTT's rules) not for it.
    c.agent.start();
    c.agent.wait_log("subscribed to", Duration::from_secs(30));
    loop {
        // Up: publish what is due, maybe restart the broker under the agent,
        // until the seeded kill moment.
        let kill_at = Instant::now() + Duration::from_millis(c.rng.range(1000, 6000));
        loop {
            let now = Instant::now();
            if now >= kill_at {
                break;
            }
            if c.published < total && now >= due(c.published) {
                c.publish_next();
            } else if c.broker_restarts == 1 && now >= restart_up_at {
                c.restart_broker();
            } else if c.broker_restarts == 2 && now >= restart_volatile_at {
                c.restart_broker_volatile(&urls_of, &db);
            } else {
                let mut next = kill_at;
                if c.published < total {
                    next = next.min(due(c.published));
                }
                if c.broker_restarts == 1 {
                    next = next.min(restart_up_at);
                }
                if c.broker_restarts == 2 {
                    next = next.min(restart_volatile_at);
                }
                // The chaos schedule, not a wait for a condition.
                thread::sleep(next.saturating_duration_since(now));
            }
        }
        c.kill();
        // Down: the first broker restart, and sometimes messages the agent
        // will only get from its persistent session.
        if c.broker_restarts == 0 && Instant::now() >= restart_down_at {
            c.restart_broker();
        }
        if c.published < total && (c.published_while_down == 0 || c.rng.chance(40)) {
            for _ in 0..c.rng.range(1, 3) {
                if c.published < total {
                    c.publish_next();
                    c.published_while_down += 1;
                }
            }
        }
        if chaos_start.elapsed() >= chaos
            && c.kills >= min_kills
            && c.published == total
            && c.broker_restarts >= 3
        {
            break;
        }
        c.agent.start();
    }
    let (kills, broker_restarts, published, published_while_down) = (
        c.kills,
        c.broker_restarts,
        c.published,
        c.published_while_down,
    );
    let mut unexpected_exits = std::mem::take(&mut c.unexpected_exits);
    let chaos_secs = chaos_start.elapsed().as_secs();

    // ---- drain: faults off, agent running, until every URL is done --------
    server.set_fault_rate(0);
    let requests_in_chaos = server.requests();
    agent.start();
    let drain_start = Instant::now();
    let mut last_counts = BTreeMap::new();
    // Redelivered messages put done URLs back to pending; they all arrive
    // before the SUBACK, so "every URL done" only counts after the subscription.
    let mut subscribed = false;
    let drained = poll_until(drain, || {
        if !agent.is_running() {
            return true;
        }
        subscribed = subscribed || subscribed_since_last_start(dir.path());
        if !subscribed {
            return false;
        }
        match db_counts(&db) {
            Ok(counts) => {
                last_counts = counts;
                last_counts.get("done").copied().unwrap_or(0) == n_urls
                    && last_counts.values().sum::<u64>() == n_urls
            }
            Err(_) => false,
        }
    });
    let drain_secs = drain_start.elapsed().as_secs();
    if agent.is_running() {
        // One last crash: the checks below look at what a SIGKILL leaves.
        agent.kill();
    } else {
        let status = agent.wait_exit(Duration::ZERO);
        unexpected_exits.push(format!(
            "during the drain: {status}; stderr tail: {}",
            tail(&agent.stderr(), 500)
        ));
    }

    // ---- checks ------------------------------------------------------------
    let cache = agent.cache();
    let states = db_states(&db).unwrap_or_default();
    let mut lost = Vec::new();
    let mut corrupt = Vec::new();
    let mut expected: HashSet<PathBuf> = HashSet::new();
    for ((path, bytes), url) in files.iter().zip(&urls) {
        let local = cache.join(path.trim_start_matches('/'));
        expected.insert(local.clone());
        let state = states.get(url).map_or("(no row)", String::as_str);
        match std::fs::read(&local) {
            Ok(got) if state == "done" => {
                if &got != bytes {
                    corrupt.push(format!("{url}: {} bytes, want {}", got.len(), bytes.len()));
                }
            }
            Ok(_) => lost.push(format!("{url}: state {state}, file present")),
            Err(e) => lost.push(format!("{url}: state {state}, file: {e}")),
        }
    }
    let cached = files_under(&cache);
    let stray_tmp: Vec<&PathBuf> = cached
        .iter()
        .filter(|p| p.to_string_lossy().contains(".holosync-tmp-"))
        .collect();
    let foreign_in_cache: Vec<&PathBuf> = cached
        .iter()
        .filter(|p| !expected.contains(*p) && !p.to_string_lossy().contains(".holosync-tmp-"))
        .collect();
    let own_files: HashSet<String> = [
        "config.json",
        "stdout.txt",
        "stderr.txt",
        "holosync.db",
        "holosync.db-wal",
        "holosync.db-shm",
        "holosync.db-journal",
        "holosync.db.lock",
        "holosync.log",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((1..=LOG_KEEP).map(|n| format!("holosync.log.{n}")))
    .collect();
    let outside: Vec<PathBuf> = files_under(dir.path())
        .into_iter()
        .filter(|p| !p.starts_with(&cache))
        .filter(|p| {
            p.parent() != Some(dir.path())
                || !own_files.contains(&*p.file_name().unwrap_or_default().to_string_lossy())
        })
        .collect();
    let integrity: String = rusqlite::Connection::open(&db)
        .and_then(|conn| conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
        .unwrap_or_else(|e| format!("cannot check: {e}"));
    let logs: Vec<(String, u64)> = std::fs::read_dir(dir.path())
        .expect("read test dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("holosync.log"))
        .map(|name| {
            let len = std::fs::metadata(dir.path().join(&name)).map_or(0, |m| m.len());
            (name, len)
        })
        .collect();
    let oversized_logs: Vec<&(String, u64)> = logs
        .iter()
        .filter(|(_, len)| *len > LOG_MAX_BYTES)
        .collect();

    let faults = server.faults();
    let fault_counts = server.fault_counts();
    // Drops the broker made on its own (keep-alive run out, protocol error),
    // and links the agent gave up because a ping went unanswered.
    let mut unexpected_disconnects = broker.timeouts_of(&client_id);
    let agent_logs = common::read_lossy(&dir.path().join("holosync.log.1"))
        + &common::read_lossy(&dir.path().join("holosync.log"));
    unexpected_disconnects.extend(
        agent_logs
            .lines()
            .filter(|l| l.contains("lost connection") && l.contains("pingreq"))
            .map(str::to_owned),
    );
    let details = format!(
        "seed {seed}; chaos {chaos_secs} s, drain {drain_secs} s (drained: {drained}); \
         {published_while_down} messages sent while the agent was down; \
         {requests_in_chaos} requests in the chaos phase, faults {fault_counts:?}; \
         last counts {last_counts:?}\n\
         lost (first 10): {:?}\ncorrupt (first 10): {:?}\nstray tmp: {stray_tmp:?}\n\
         foreign files in the cache: {foreign_in_cache:?}\nfiles outside the cache: {outside:?}\n\
         unexpected agent exits: {unexpected_exits:?}\nunexpected disconnects: {unexpected_disconnects:?}\n\
         integrity_check: {integrity}\nlogs: {logs:?}\n{}",
        &lost[..lost.len().min(10)],
        &corrupt[..corrupt.len().min(10)],
        agent.diagnostics()
    );

    // Tear down before taking the time, so `seconds` is the whole test.
    drop(agent);
    drop(server);
    drop(broker);
    drop(dir);
    let seconds = started.elapsed().as_secs();
    let line = format!(
        "soak: seed={seed} urls={n_urls} messages={published} kills={kills} broker_restarts={broker_restarts} faults={faults} unexpected_disconnects={} lost={} corrupt={} stray_tmp={} seconds={seconds}",
        unexpected_disconnects.len(),
        lost.len(),
        corrupt.len(),
        stray_tmp.len()
    );
    println!("{line}");
    // `cargo test` hides a passing test's output; CI prints this file after the run.
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("soak-line.txt"),
        format!("{line}\n"),
    );

    assert_eq!(lost.len(), 0, "lost URLs\n{details}");
    assert_eq!(
        unexpected_disconnects.len(),
        0,
        "the link was dropped while the agent worked\n{details}"
    );
    assert_eq!(corrupt.len(), 0, "corrupt files\n{details}");
    assert_eq!(stray_tmp.len(), 0, "temporary files left\n{details}");
    assert!(
        foreign_in_cache.is_empty(),
        "unexpected cache files\n{details}"
    );
    assert!(outside.is_empty(), "files outside the cache\n{details}");
    assert!(
        unexpected_exits.is_empty(),
        "the agent exited on its own\n{details}"
    );
    assert_eq!(integrity, "ok", "database integrity\n{details}");
    assert!(oversized_logs.is_empty(), "log over max_bytes\n{details}");
    assert!(
        logs.len() as u64 <= LOG_KEEP + 1,
        "more than keep+1 log files\n{details}"
    );
    if n_urls >= 2000 {
        assert!(
            logs.iter().any(|(n, _)| n == "holosync.log.1"),
            "2,000 downloads log more than {LOG_MAX_BYTES} bytes, so the log must have rotated\n{details}"
        );
    }
    // The chaos really happened.
    assert!(kills >= min_kills && broker_restarts >= 3, "{details}");
    assert!(published_while_down > 0, "{details}");
    for (fault, _) in Fault::WEIGHTED {
        assert!(
            fault_counts.iter().any(|(f, n)| *f == fault && *n > 0),
            "no {fault:?} was injected\n{details}"
        );
    }
}
