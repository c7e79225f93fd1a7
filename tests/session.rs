//! End-to-end tests of the session-integrity promises: no message lost, no
//! link dropped. Each scenario broke the agent before the loop was rebuilt
//! around bounded steps (see ARCHITECTURE.md, "Timing budget"): a stale ack
//! after a reconnect, pings starved while busy, downloads capped at the
//! keep-alive, rows stranded by a clock jump, a hostile server's endless
//! header, path clashes retried for hours, projector commands waiting for a
//! download, a download before the broker connection, and a commit that a
//! power cut could undo after its ack.
//!
//! Real parts only: a mosquitto per test, HTTP servers and projector
//! listeners on 127.0.0.1, and the holosync binary.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    agent_with, jpeg, png, poll_until, wait_until, Agent, HttpServer, Mosquitto, Route, TcpSink,
    TempDir,
};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// State, attempts and error of one URL, read from the queue database.
fn row(dir: &Path, url: &str) -> Option<(String, u32, String)> {
    let db = rusqlite::Connection::open(dir.join("holosync.db")).ok()?;
    db.busy_timeout(Duration::from_secs(5)).ok()?;
    db.query_row(
        "SELECT state, attempts, COALESCE(last_error, '') FROM queue WHERE url = ?1",
        [url],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .ok()
}

/// Runs SQL on the agent's queue database (test-side changes, such as a
/// trigger that makes commits of some URLs fail).
fn sql(dir: &Path, statements: &str) {
    let db = rusqlite::Connection::open(dir.join("holosync.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db.execute_batch(statements).unwrap();
}

/// The client id an agent config uses.
fn client_id(agent: &Agent) -> String {
    agent.config()["mqtt"]["client_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// PUBACKs the broker logged from `client` (mosquitto logs every packet).
fn pubacks_from(broker: &Mosquitto, client: &str) -> usize {
    broker
        .log()
        .lines()
        .filter(|l| l.contains(&format!("Received PUBACK from {client} ")))
        .count()
}

/// Defect 1: a held message's ack must not go out on a later connection,
/// where its packet id names another message. Message A is held (its commit
/// fails), the broker restarts without persistence (session lost), message B
/// arrives with the same packet id on the new connection and is held too;
/// then A commits. A's ack would tell the broker B was delivered. After a
/// kill -9 and restart, B must still arrive, and A must be in the queue.
#[test]
fn held_message_is_never_acked_on_a_later_connection() {
    let mut broker = Mosquitto::start_volatile();
    let http = HttpServer::start();
    let dir = TempDir::new("session-stale-ack");
    let (a, b) = (http.url("/stale/msg-a.png"), http.url("/stale/msg-b.png"));
    http.set("/stale/msg-a.png", Route::Ok(png(8, 8, 1)));
    http.set("/stale/msg-b.png", Route::Ok(png(8, 8, 2)));
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    let id = client_id(&agent);
    // Commits of A and B fail (as if the database were locked) until the test says.
    sql(
        dir.path(),
        "CREATE TABLE test_refuse (pattern TEXT);
         INSERT INTO test_refuse VALUES ('%/msg-a%'), ('%/msg-b%');
         CREATE TRIGGER test_refuse BEFORE INSERT ON queue
         WHEN EXISTS (SELECT 1 FROM test_refuse WHERE NEW.url LIKE pattern)
         BEGIN SELECT RAISE(ABORT, 'test: refused'); END;",
    );
    broker.publish("sync", a.as_bytes(), 1);
    agent.wait_log("could not commit a message from sync", WAIT);
    let before_restart = agent.log().matches("connected to broker").count();
    broker.restart();
    wait_until("the agent to reconnect", WAIT, || {
        agent.log().matches("connected to broker").count() > before_restart
            && agent
                .log()
                .rsplit("connected to broker")
                .next()
                .unwrap_or("")
                .contains("subscribed to")
    });
    let pubacks_before_b = pubacks_from(&broker, &id);
    broker.publish("sync", b.as_bytes(), 1);
    wait_until("B to reach the agent", WAIT, || {
        broker
            .log()
            .contains(&format!("Sending PUBLISH to {id} (d0, q1, r0, m1, 'sync'"))
    });
    // A may commit now; B still cannot.
    sql(
        dir.path(),
        "DELETE FROM test_refuse WHERE pattern = '%/msg-a%';",
    );
    wait_until("A to be queued", WAIT, || row(dir.path(), &a).is_some());
    // A wrong ack would follow the commit at once: watch for one a while.
    let wrong_ack = poll_until(Duration::from_secs(3), || {
        pubacks_from(&broker, &id) > pubacks_before_b
    });
    assert!(
        !wrong_ack,
        "a PUBACK went out on the new connection before B was committed\n{}",
        common::tail(&broker.log(), 3000)
    );
    assert!(
        agent.log().contains("not acknowledging a message on sync"),
        "{}",
        agent.diagnostics()
    );
    agent.kill();
    sql(
        dir.path(),
        "DROP TRIGGER test_refuse; DROP TABLE test_refuse;",
    );
    agent.start();
    wait_until(
        "B to arrive again and both files to be cached",
        WAIT,
        || {
            matches!(row(dir.path(), &a), Some((s, ..)) if s == "done")
                && matches!(row(dir.path(), &b), Some((s, ..)) if s == "done")
        },
    );
}

/// Publishes one sync message mid-way through long work and returns how long
/// it took, after `mosquitto_pub` returned, to show up as queued in the log.
fn queued_latency(broker: &Mosquitto, agent: &Agent, url: &str) -> Duration {
    let before = agent
        .log()
        .matches("queued 1 URLs from sync-single-work")
        .count();
    broker.publish("sync-single-work", url.as_bytes(), 1);
    let published = Instant::now();
    wait_until("the mid-way message to be queued", WAIT, || {
        agent
            .log()
            .matches("queued 1 URLs from sync-single-work")
            .count()
            > before
    });
    published.elapsed()
}

/// The link stayed up through long work: a message published during it
/// was queued within 2 s, and neither side dropped the connection.
fn assert_link_kept(work: &str, latency: Duration, broker: &Mosquitto, agent: &Agent, id: &str) {
    assert!(
        latency <= Duration::from_secs(2),
        "a sync message waited {latency:?} behind {work}"
    );
    assert_eq!(broker.drops_of(id), Vec::<String>::new());
    assert!(
        !agent.log().contains("lost connection"),
        "{}",
        agent.diagnostics()
    );
}

/// Defect 2, projectors: with keep-alive 10 s, eight projector messages
/// each naming one silent projector (3 s I/O timeout each; the messages are
/// sent one after another, so 24 s in all) keep the link alive and a sync
/// message published meanwhile is queued within 2 s.
#[test]
fn pings_go_on_during_a_long_projector_batch() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-projectors");
    http.set("/mid/p.png", Route::Ok(png(4, 4, 3)));
    let silent: Vec<TcpSink> = (0..8).map(|_| TcpSink::start()).collect();
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"projector": {"connect_timeout_ms": 2000, "io_timeout_ms": 3000,
                             "protocol": "pjlink", "max_age_ms": 120_000}}),
    );
    let id = client_id(&agent);
    let started = Instant::now();
    for s in &silent {
        broker.publish(
            "projector-remote-control",
            json!({"command": "on", "projectors": [format!("127.0.0.1:{}", s.port)]})
                .to_string()
                .as_bytes(),
            0,
        );
    }
    wait_until("the messages to be well under way", WAIT, || {
        agent.log().matches("no PJLink greeting").count() >= 4
    });
    let latency = queued_latency(&broker, &agent, &http.url("/mid/p.png"));
    wait_until("all 8 projectors to time out", WAIT, || {
        agent.log().matches("no PJLink greeting").count() == 8
    });
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "the projector work was not long"
    );
    assert_link_kept("the projector messages", latency, &broker, &agent, &id);
}

/// Defect 2, downloads: with keep-alive 10 s and `interval_ms: 0`, draining
/// 150 URLs that each take 150 ms keeps the link alive for the whole 20+ s,
/// and a message published meanwhile is queued within 2 s.
#[test]
fn pings_go_on_during_a_long_drain() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-drain");
    let urls: Vec<String> = (0..150)
        .map(|i| {
            let path = format!("/drain/{i:03}.png");
            http.set(
                &path,
                Route::Delayed(png(6, 6, i), Duration::from_millis(150)),
            );
            http.url(&path)
        })
        .collect();
    http.set("/mid/d.png", Route::Ok(png(4, 4, 999)));
    let agent = agent_with(dir.path(), &broker, json!({"download": {"interval_ms": 0}}));
    let id = client_id(&agent);
    let started = Instant::now();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    wait_until("the drain to be well under way", WAIT, || {
        agent.log().matches("cached ").count() >= 60
    });
    let latency = queued_latency(&broker, &agent, &http.url("/mid/d.png"));
    agent.wait_done(151, Duration::from_secs(180));
    assert!(
        started.elapsed() >= Duration::from_secs(20),
        "the drain was not long"
    );
    assert_link_kept("the drain", latency, &broker, &agent, &id);
}

/// Defect 3: a download may take much longer than the keep-alive. A 2.5 MB
/// picture at 1 Mbit/s (about 20 s) arrives with keep-alive 10 s and a 5 s
/// stall limit, and the broker never drops the agent.
#[test]
fn slow_download_outlasts_the_keep_alive() {
    slow_download(2_500_000, Duration::from_secs(120));
}

/// The issue's own case: a 30 MB file at 1 Mbit/s (about 4 minutes) with
/// keep-alive 10 s. Too slow for CI; `bench/run` runs it.
#[test]
#[ignore = "four minutes; run by bench/run"]
fn thirty_megabytes_at_one_megabit_outlast_the_keep_alive() {
    slow_download(30_000_000, Duration::from_secs(600));
}

fn slow_download(bytes: usize, deadline: Duration) {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-slow");
    // Incompressible bytes: only the length check and the transfer matter.
    let body: Vec<u8> = (0..bytes)
        .map(|i| (common::mix64(i as u64) >> 7) as u8)
        .collect();
    http.set("/big/film.bin", Route::Throttled(body.clone(), 125_000));
    let agent = agent_with(
        dir.path(),
        &broker,
        // max_bytes: the 30 MB case is over the 10 MiB default.
        json!({"mqtt": {"keep_alive_secs": 10},
               "download": {"timeout_secs": 5, "max_bytes": bytes + 1}}),
    );
    let id = client_id(&agent);
    broker.publish("sync", http.url("/big/film.bin").as_bytes(), 1);
    agent.wait_done(1, deadline);
    assert_eq!(
        std::fs::read(agent.cache().join("big/film.bin")).unwrap(),
        body
    );
    assert_eq!(broker.drops_of(&id), Vec::<String>::new());
    assert!(
        !agent.log().contains("lost connection"),
        "{}",
        agent.diagnostics()
    );
}

/// Defect 4: rows queued while the kiosk's clock was ten years ahead are
/// fetched within seconds of start-up, and a retry scheduled ten years out
/// is freed by syncing the URL again.
#[test]
fn rows_stranded_by_a_clock_jump_are_fetched_at_once() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-clock");
    let (early, retry) = (http.url("/clock/early.png"), http.url("/clock/retry.png"));
    http.set("/clock/early.png", Route::Ok(png(5, 5, 1)));
    http.set("/clock/retry.png", Route::Ok(png(5, 5, 2)));
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    let out = agent.run(&["enqueue", &early, &retry]);
    assert!(out.status.success(), "{out:?}");
    const TEN_YEARS_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
    // As `enqueue` would have written them with the clock ten years ahead:
    // one pending, one in retry with its next attempt due "soon" after then.
    sql(
        dir.path(),
        &format!(
            "UPDATE queue SET next_attempt = next_attempt + {TEN_YEARS_MS}, updated = updated + {TEN_YEARS_MS};
             UPDATE queue SET state = 'retry', attempts = 1, next_attempt = next_attempt + 30000 WHERE url = '{retry}';"
        ),
    );
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    wait_until(
        "both rows to be fetched",
        WAIT,
        || matches!(row(dir.path(), &early), Some((s, ..)) if s == "done"),
    );
    // The retry row keeps its 30 s delay, counted from now rather than from
    // ten years ahead (capped by retry_max_ms, 2 s in the test config).
    wait_until(
        "the retry row to be fetched",
        WAIT,
        || matches!(row(dir.path(), &retry), Some((s, ..)) if s == "done"),
    );

    // A retry left ten years out while the agent runs (written behind its
    // back) is freed by syncing the URL again.
    let again = http.url("/clock/again.png");
    http.set("/clock/again.png", Route::Ok(png(5, 5, 3)));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    sql(
        dir.path(),
        &format!(
            "INSERT INTO queue (url, state, attempts, next_attempt, last_error, updated)
             VALUES ('{again}', 'retry', 1, {}, 'HTTP 503', {now_ms});",
            now_ms + TEN_YEARS_MS
        ),
    );
    broker.publish("sync", again.as_bytes(), 1);
    wait_until(
        "the re-synced row to be fetched",
        WAIT,
        || matches!(row(dir.path(), &again), Some((s, ..)) if s == "done"),
    );
}

/// A wall clock set back while the agent runs (NTP correcting a kiosk that
/// booted with a wrong date) would leave a retry scheduled by the old clock
/// waiting as long as the jump: the agent sees the wall clock fall behind
/// its monotonic clock and puts the row within `retry_max_ms` of the new now.
/// The clock is moved by libfaketime (wall clock only; the monotonic clock
/// stays real), its offset read from a file the test rewrites.
#[test]
fn a_clock_set_back_while_running_strands_no_retry() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    if !lib.exists() {
        return common::cannot_run("libfaketime is missing (apt-get install faketime)");
    }
    if common::under_wine() {
        // Wine does not read the time through the preloaded calls (tried:
        // the jump is never seen); .ci/run runs this test natively only.
        return common::cannot_run("libfaketime cannot move the clock of an exe under Wine");
    }
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-clock-back");
    let url = http.url("/clock-back/a.png");
    http.set(
        "/clock-back/a.png",
        Route::Sequence(vec![
            Route::Status(503, b"busy\n".to_vec()),
            Route::Ok(png(5, 5, 4)),
        ]),
    );
    let offset = dir.path().join("faketime.txt");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut config = Agent::default_config(broker.port);
    // The retry after the 503 is due 10-30 s later; retry_max_ms 30 s.
    config["download"]["retry_base_ms"] = json!(20_000);
    config["download"]["retry_max_ms"] = json!(30_000);
    let mut agent = Agent::new(dir.path(), config);
    agent.start_with_env(&[
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("DONT_FAKE_MONOTONIC", "1"),
    ]);
    agent.wait_log("subscribed to", WAIT);
    broker.publish("sync", url.as_bytes(), 1);
    wait_until(
        "the 503 to put the row in retry",
        WAIT,
        || matches!(row(dir.path(), &url), Some((s, ..)) if s == "retry"),
    );
    // Two hours back: the retry is now due two hours and some seconds away.
    std::fs::write(&offset, "-7200\n").unwrap();
    wait_until("the agent to notice the clock going back", WAIT, || {
        agent.log().contains("the system clock went back by about")
    });
    wait_until(
        "the retry to be fetched after the jump",
        Duration::from_secs(90),
        || matches!(row(dir.path(), &url), Some((s, ..)) if s == "done"),
    );
    // One jump, one line, with its size; the idle turns before and after it
    // (up to 10 s apart) are not taken for jumps.
    let log = agent.log();
    let jumps: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the system clock went back by about"))
        .collect();
    assert_eq!(jumps.len(), 1, "{jumps:#?}");
    let secs: i64 = jumps[0]
        .split("about ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no seconds in {:?}", jumps[0]));
    assert!((7190..=7210).contains(&secs), "{}", jumps[0]);
}

/// Defect 5: a server that sends an 8 KiB header line ending in a bare LF
/// and then an endless line cannot grow the agent's memory: the head is
/// refused at its size limit and the URL fails with that reason.
#[test]
fn endless_header_line_is_refused_with_bounded_memory() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-endless");
    // 8,191 bytes and a bare LF: exactly what made minreq 3.0.0's 8 KiB
    // header budget (`max -= line.len() + 2`) wrap around to "unlimited".
    let mut prefix = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
    prefix.extend(std::iter::repeat_n(b'a', 8191 - "X-Long: ".len()));
    prefix.extend_from_slice(b"\nX-Endless: ");
    http.set("/hostile/endless.jpg", Route::Endless(prefix));
    http.set("/hostile/fine.jpg", Route::Ok(jpeg(16, 16, 1)));
    // A long keep-alive and stall limit give a leaky client every chance.
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"mqtt": {"keep_alive_secs": 60}, "download": {"timeout_secs": 30, "max_attempts": 1}}),
    );
    let (endless, fine) = (
        http.url("/hostile/endless.jpg"),
        http.url("/hostile/fine.jpg"),
    );
    broker.publish("sync", format!("{endless},{fine}").as_bytes(), 1);
    let mut peak = 0;
    let settled = poll_until(WAIT, || {
        peak = peak.max(agent.peak_rss_kib().unwrap_or(0));
        matches!(row(dir.path(), &endless), Some((s, ..)) if s == "failed")
            && matches!(row(dir.path(), &fine), Some((s, ..)) if s == "done")
    });
    peak = peak.max(agent.peak_rss_kib().unwrap_or(0));
    assert!(
        settled,
        "{:?}\n{}",
        row(dir.path(), &endless),
        agent.diagnostics()
    );
    assert!(
        peak > 0 && peak < 64 * 1024,
        "peak RSS {peak} KiB\n{}",
        agent.diagnostics()
    );
    let (_, _, error) = row(dir.path(), &endless).unwrap();
    assert!(error.contains("response head is over"), "{error}");
}

/// Defect 6: a URL whose path needs a folder where another URL's file is
/// (or a file where a folder is) fails at once, once, naming the clash; a
/// Windows 8.3 short-name alias is refused before any download.
#[test]
fn path_clashes_fail_once_with_the_reason() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-clash");
    for (path, seed) in [
        ("/c1/a", 1),
        ("/c1/a/b.png", 2),
        ("/c2/x/y.png", 3),
        ("/c2/x", 4),
    ] {
        http.set(path, Route::Ok(png(4, 4, seed)));
    }
    http.set("/works/PHOTOG~1.PNG", Route::Ok(png(4, 4, 5)));
    let agent = agent_with(dir.path(), &broker, json!({}));
    let url = |p: &str| http.url(p);
    // First the file and the folder that take the places, then the clashes.
    broker.publish(
        "sync",
        format!("{},{}", url("/c1/a"), url("/c2/x/y.png")).as_bytes(),
        1,
    );
    agent.wait_done(2, WAIT);
    broker.publish(
        "sync",
        format!(
            "{},{},{}",
            url("/c1/a/b.png"),
            url("/c2/x"),
            url("/works/PHOTOG~1.PNG")
        )
        .as_bytes(),
        1,
    );
    wait_until("the three to fail", WAIT, || agent.status()["failed"] == 3);
    for (path, words) in [
        ("/c1/a/b.png", "path clash"),
        ("/c2/x", "path clash"),
        ("/works/PHOTOG~1.PNG", "8.3 short name"),
    ] {
        let (state, attempts, error) = row(dir.path(), &url(path)).unwrap();
        assert_eq!(state, "failed", "{path}");
        assert!(attempts <= 1, "{path}: {attempts} attempts");
        assert!(error.contains(words), "{path}: {error}");
        assert_eq!(http.hits(path), 0, "{path} was downloaded anyway");
    }
    // What was there first is untouched.
    assert!(agent.cache().join("c1/a").is_file());
    assert!(agent.cache().join("c2/x/y.png").is_file());
}

/// Defect 7: a projector command that arrives during a slow download reaches
/// a listening projector within 1 s.
#[test]
fn projector_command_is_served_during_a_slow_download() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-projector-during-download");
    http.set(
        "/slow/big.jpg",
        Route::Slow(jpeg(64, 64, 1), Duration::from_secs(20)),
    );
    let projector = TcpSink::start();
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"mqtt": {"keep_alive_secs": 60}, "download": {"timeout_secs": 30}}),
    );
    broker.publish("sync", http.url("/slow/big.jpg").as_bytes(), 1);
    http.wait_hits("/slow/big.jpg", 1, WAIT);
    broker.publish(
        "projector-remote-control",
        json!({"command": "PWR ON", "projectors": [format!("127.0.0.1:{}", projector.port)]})
            .to_string()
            .as_bytes(),
        0,
    );
    let published = Instant::now();
    projector.wait_for(|t| t.contains("PWR ON\r"), WAIT);
    let took = published.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "the command waited {took:?}"
    );
    assert_eq!(agent.status()["done"], 0, "the download was still running");
}

/// Defect 8: with a slow download due at start-up, the broker sees the
/// agent's CONNECT before the HTTP server sees the request.
#[test]
fn broker_connection_comes_before_a_download_due_at_start() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("session-connect-first");
    http.set("/first/held.jpg", Route::Hold(jpeg(16, 16, 1)));
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    let id = client_id(&agent);
    let out = agent.run(&["enqueue", &http.url("/first/held.jpg")]);
    assert!(out.status.success(), "{out:?}");
    agent.start();
    http.wait_hits("/first/held.jpg", 1, WAIT);
    let log = broker.log();
    assert!(
        log.contains("New client connected from 127.0.0.1") && log.contains(&format!(" as {id} ")),
        "the download started before the broker connection\n{}",
        common::tail(&log, 2000)
    );
    http.release("/first/held.jpg");
    agent.wait_done(1, WAIT);
}

// Defect 9 (the commit before a PUBACK must survive a power cut: an fsync of
// the WAL between the commit and the PUBACK) is watched under strace in
// tests/promises.rs, `the_commit_with_the_url_is_fsynced_before_the_puback`.
