//! End-to-end tests of the loop's promise under fleet and projector traffic:
//! one bad or heavy message never drops the broker link (keep-alive 5 s, the
//! broker's own log read for the agent's client id), never grows memory
//! without bound, never runs twice, and never makes a power command late.
//! Each failed on the build before these rules (see README, "Test it").
//!
//! Real parts only: the holosync binary, a mosquitto per test on a free port
//! (`log_type all`), TCP listeners on 127.0.0.1 as projectors, strace for a
//! slow disk.

mod common;
#[path = "support/hanging_listener.rs"]
mod hanging;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{agent_with, poll_until, wait_until, Agent, Mosquitto, Subscriber, TcpSink, TempDir};
use serde_json::{json, Value};

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(120);

/// How long the link is watched for a drop after a heavy message: four
/// keep-alives (the broker drops a silent client after one and a half).
const WATCH: Duration = Duration::from_secs(20);

/// Keep-alive 5 s (the broker drops a silent client after 7.5 s), and no
/// download pace to speak of (the rows these tests make are never fetched).
fn tight() -> Value {
    json!({"mqtt": {"keep_alive_secs": 5}, "download": {"interval_ms": 3_600_000}})
}

/// The agent's client id.
fn client_id(agent: &Agent) -> String {
    agent.config()["mqtt"]["client_id"]
        .as_str()
        .expect("test configs name the client id")
        .to_string()
}

/// The JSON payloads received on `topic` so far, in order (grouped events
/// unpacked).
fn events(sub: &Subscriber, topic: &str) -> Vec<Value> {
    let head = format!("{topic} ");
    sub.lines()
        .iter()
        .filter_map(|l| l.strip_prefix(&head))
        .filter_map(|p| serde_json::from_str::<Value>(p).ok())
        .flat_map(|v| match v.get("events") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v],
        })
        .collect()
}

/// Waits for an event that satisfies `pred`; returns it.
fn wait_event(sub: &Subscriber, topic: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    let ok = poll_until(WAIT, || {
        found = events(sub, topic).into_iter().find(|v| pred(v));
        found.is_some()
    });
    assert!(ok, "no {what} on {topic}; got:\n{}", sub.lines().join("\n"));
    found.expect("found")
}

/// Asserts the broker never dropped the agent (nor the agent lost the
/// broker) while watching for [`WATCH`].
fn assert_link_held(broker: &Mosquitto, agent: &Agent) {
    let id = client_id(agent);
    let dropped = poll_until(WATCH, || {
        !broker.drops_of(&id).is_empty() || agent.log().contains("lost connection to broker")
    });
    assert!(
        !dropped,
        "the link dropped: broker says {:?}\n{}",
        broker.drops_of(&id),
        agent.diagnostics()
    );
}

/// A command with a 1.1 MB id (QoS 1, on the fleet topic), with the command
/// limit raised so it is read: the answer echoes the id cut to a few dozen
/// characters, and the link stays up (before, the answer was over the
/// outgoing packet limit: rumqttc dropped the connection before the PUBACK,
/// the broker sent the command again, forever). One more byte than
/// `mqtt.max_command_bytes` is refused unread, answered once, acked once.
#[test]
fn a_command_with_a_huge_id_is_answered_once_and_the_link_holds() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("traffic-huge-id");
    let limit = 2_000_000;
    let mut patch = tight();
    patch["mqtt"]["max_command_bytes"] = json!(limit);
    let agent = agent_with(dir.path(), &broker, patch);
    let id = client_id(&agent);
    let topic = format!("holosync/{id}/events");
    let sub = broker.subscribe(&topic);
    let huge = "x".repeat(1_100_000);
    let command = format!(r#"{{"id":"{huge}","command":"status"}}"#);
    broker.publish("holosync/all/cmd", command.as_bytes(), 1);
    let answer = wait_event(&sub, &topic, "the answer", |v| v["command"] == "status");
    let echoed = answer["id"].as_str().expect("the id is echoed");
    assert!(
        echoed.len() < 200 && echoed.starts_with("xxxx") && echoed.ends_with('…'),
        "{echoed:?}"
    );
    let over = format!(
        r#"{{"id":"y","command":"status","pad":"{}"}}"#,
        "p".repeat(limit)
    );
    broker.publish("holosync/all/cmd", over.as_bytes(), 1);
    let refusal = wait_event(&sub, &topic, "the refusal", |v| v["error"].is_string());
    assert!(
        refusal["error"]
            .as_str()
            .unwrap()
            .contains("mqtt.max_command_bytes"),
        "{refusal}"
    );
    assert_link_held(&broker, &agent);
    let all = events(&sub, &topic);
    assert_eq!(
        all.iter().filter(|v| v["command"] == "status").count(),
        1,
        "answered once: {all:?}"
    );
    assert_eq!(
        all.iter().filter(|v| v["error"].is_string()).count(),
        1,
        "refused once: {all:?}"
    );
    let pubacks = broker
        .log()
        .matches(&format!("Received PUBACK from {id} "))
        .count();
    assert_eq!(pubacks, 2, "each command acked once:\n{}", broker.log());
}

/// `retry-failed` naming 10,000 URLs among 30,000 failed rows: answered
/// with the right count and the link held (before, each named URL scanned
/// every failed row in one turn: the broker cut the agent after 11 s and the
/// command came back after every reconnect, never answered).
#[test]
fn retry_failed_of_ten_thousand_urls_is_answered_without_a_drop() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("traffic-retry");
    let mut patch = tight();
    patch["mqtt"]["max_command_bytes"] = json!(1_048_576);
    let mut agent = agent_with(dir.path(), &broker, patch);
    // The agent made the queue; fill it while the agent is stopped.
    assert!(agent.terminate().expect("running").success());
    let url = |i: usize| format!("http://127.0.0.1:9/failed/{i:05}.png");
    fill_queue(dir.path(), 30_000, "failed", url);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let id = client_id(&agent);
    let topic = format!("holosync/{id}/events");
    let sub = broker.subscribe(&topic);
    let named: Vec<String> = (0..30_000).step_by(3).map(url).collect();
    assert_eq!(named.len(), 10_000);
    let command = json!({"id": "r10k", "command": "retry-failed", "urls": named});
    broker.publish(
        &format!("holosync/{id}/cmd"),
        command.to_string().as_bytes(),
        1,
    );
    let answer = wait_event(&sub, &topic, "the answer", |v| v["id"] == "r10k");
    assert_eq!(answer["requeued"], 10_000, "{answer}");
    assert_link_held(&broker, &agent);
    assert_eq!(
        events(&sub, &topic)
            .iter()
            .filter(|v| v["id"] == "r10k")
            .count(),
        1
    );
}

/// A slow disk (every fsync delayed 500 ms by strace, as on a worn SD card)
/// and 20 QoS 1 sync messages sent back to back (mosquitto's in-flight
/// window: they arrive in one poll): all are queued and the link holds
/// (before, the 20 commits ran in one turn, 10 s without a ping).
#[test]
fn a_burst_of_sync_messages_on_a_slow_disk_keeps_the_link() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("traffic-slow-disk");
    let mut config = Agent::default_config(broker.port);
    common::merge(&mut config, tight());
    let agent = Agent::new(dir.path(), config);
    let trace = dir.path().join("strace.txt");
    let _traced = common::traced_agent(
        &agent.config_path(),
        &trace,
        &[
            "-e",
            "trace=fsync,fdatasync",
            "-e",
            "inject=fsync,fdatasync:delay_enter=500000",
        ],
    );
    agent.wait_log("subscribed to", WAIT);
    let lines: Vec<String> = (0..20)
        .map(|i| format!("http://127.0.0.1:9/burst/{i}.png"))
        .collect();
    broker.publish_lines("sync", &lines, 1);
    wait_until("all 20 URLs queued", WAIT, || queued(dir.path()) == 20);
    assert!(
        common::read_lossy(&trace).contains("fsync")
            || common::read_lossy(&trace).contains("fdatasync"),
        "strace saw no fsync"
    );
    assert_link_held(&broker, &agent);
}

/// Rows in the agent's queue (read while it runs).
fn queued(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("holosync.db"))
        .and_then(|db| db.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// Fills a stopped agent's queue with `n` rows in `state`, URLs made by `url`.
fn fill_queue(dir: &Path, n: usize, state: &str, url: impl Fn(usize) -> String) {
    let mut db = rusqlite::Connection::open(dir.join("holosync.db")).unwrap();
    let tx = db.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO queue (url, state, attempts, next_attempt, last_error, updated)
                 VALUES (?1, ?2, 1, 0, 'HTTP 404', ?3)",
            )
            .unwrap();
        for i in 0..n {
            insert
                .execute(rusqlite::params![url(i), state, i as i64])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// 400 QoS 0 audit commands of 512 KB each, to a kiosk with 20,000 cached
/// files (so one audit takes a while): they join one audit, each message's
/// bytes are let go once read, and the agent's peak memory stays under
/// 64 MiB (before, each audit kept its message in an unbounded queue while
/// the audits ran one by one: 208 MB). A status command sent after them is
/// answered, so every one was read.
#[test]
fn audit_commands_do_not_pile_up_in_memory() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("traffic-audits");
    let mut patch = tight();
    patch["mqtt"]["max_command_bytes"] = json!(1_048_576);
    let mut agent = agent_with(dir.path(), &broker, patch);
    assert!(agent.terminate().expect("running").success());
    let files = 20_000;
    fill_queue(dir.path(), files, "done", |i| {
        format!("http://127.0.0.1:9/cached/{}/{i}.png", i / 1000)
    });
    for i in 0..files {
        let path = agent.cache().join(format!("cached/{}/{i}.png", i / 1000));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }
    agent.start();
    agent.wait_log(&format!("all {files} cached files are in place"), WAIT);
    let id = client_id(&agent);
    let topic = format!("holosync/{id}/events");
    let sub = broker.subscribe(&topic);
    let pad = "p".repeat(512 * 1024);
    let lines: Vec<String> = (0..400)
        .map(|i| format!(r#"{{"id":{i},"command":"audit","pad":"{pad}"}}"#))
        .chain([r#"{"id":"last","command":"status"}"#.to_string()])
        .collect();
    broker.publish_lines(&format!("holosync/{id}/cmd"), &lines, 0);
    wait_event(&sub, &topic, "the status answer", |v| v["id"] == "last");
    wait_event(&sub, &topic, "an audit's answer", |v| {
        v["command"] == "audit" && v["checked"] == files
    });
    let peak = agent.peak_rss_kib().expect("the agent runs on Linux");
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB after 400 audit commands of 512 KB"
    );
    assert!(
        broker.drops_of(&id).is_empty(),
        "{:?}",
        broker.drops_of(&id)
    );
}

/// A batch of 32 projectors that never answer a connect, then an `on` for a
/// working one: the `on` arrives within 5 s (the batch's projectors are
/// dialled at once: one 2 s connect timeout for all; before, one after
/// another, the `on` came 64 s late). A projector message that waited longer
/// than `projector.max_age_ms` is dropped, not sent late.
#[test]
fn a_power_command_is_not_held_up_by_dead_projectors() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("traffic-projectors");
    let (_listener, _fill, dead) = hanging::hanging_listener();
    let good = TcpSink::start();
    let mut patch = tight();
    patch["projector"] = json!({"connect_timeout_ms": 2000, "io_timeout_ms": 3000});
    let agent = agent_with(dir.path(), &broker, patch);
    let batch: Vec<String> = (0..32).map(|_| format!("127.0.0.1:{dead}")).collect();
    let send = |message: Value| {
        broker.publish(
            "projector-remote-control",
            message.to_string().as_bytes(),
            0,
        );
    };
    send(json!({"command": "off", "projectors": batch}));
    let sent = Instant::now();
    send(json!({"command": "on", "projectors": [format!("127.0.0.1:{}", good.port)]}));
    good.wait_for(|s| s.contains("on\r"), WAIT);
    let took = sent.elapsed();
    assert!(
        took <= Duration::from_secs(5),
        "the `on` took {took:?} behind 32 dead projectors\n{}",
        agent.log()
    );
    wait_until("the dead projectors' failures", WAIT, || {
        agent.log().matches("\"off\": failed").count() == 32
    });
    assert_link_held(&broker, &agent);
}

/// Whether the broker got the agent's PUBACK for its first QoS 1 message on
/// `topic` (mosquitto logs the message id of each).
fn acked(broker: &Mosquitto, client: &str, topic: &str) -> bool {
    let sent = format!("Sending PUBLISH to {client} (d0, q1, r0, m");
    let log = broker.log();
    let mid = log
        .lines()
        .filter_map(|l| l.split_once(&sent).map(|(_, rest)| rest))
        .find(|rest| rest.contains(&format!("'{topic}'")))
        .and_then(|rest| rest.split(',').next().map(str::to_owned));
    mid.is_some_and(|m| log.contains(&format!("Received PUBACK from {client} (Mid: {m},")))
}

/// Waits until [`acked`].
fn wait_for_puback(broker: &Mosquitto, client: &str, topic: &str) {
    wait_until("the PUBACK", WAIT, || acked(broker, client, topic));
}

/// A retained command (an id-less `forget` left on the fleet topic) runs
/// once, when it is sent, not again when the broker replays it after each
/// of 3 restarts (before: 4 times). A retained sync message is queued once
/// per start, not at every reconnect; clearing a retained command (an empty
/// retained message) is quiet.
#[test]
fn a_retained_command_runs_once_across_broker_restarts() {
    let mut broker = Mosquitto::start();
    let dir = TempDir::new("traffic-retained");
    broker.publish_with("sync", b"http://127.0.0.1:9/retained/a.png", 1, &["-r"]);
    let agent = agent_with(dir.path(), &broker, tight());
    let forget = br#"{"command":"forget","urls":["http://127.0.0.1:9/retained/gone.png"]}"#;
    broker.publish_with("holosync/all/cmd", forget, 1, &["-r"]);
    agent.wait_log("command forget", WAIT);
    // Its ack must reach the broker first: a command whose ack a restart
    // lost is sent again (at least once), and this one has no id to know it by.
    wait_for_puback(&broker, &client_id(&agent), "holosync/all/cmd");
    let id = client_id(&agent);
    let replay = format!("Sending PUBLISH to {id} (d0, q1, r1,");
    for restart in 1..=3 {
        broker.restart();
        wait_until("the broker's replay of the retained command", WAIT, || {
            broker
                .log()
                .lines()
                .filter(|l| l.contains(&replay) && l.contains("'holosync/all/cmd'"))
                .count()
                >= restart
        });
    }
    // Clear it (quietly), then a live command: handled after the replays.
    broker.publish_with("holosync/all/cmd", b"", 1, &["-r"]);
    broker.publish(
        "holosync/all/cmd",
        br#"{"id":"after","command":"status"}"#,
        1,
    );
    agent.wait_log("(id \"after\")", WAIT);
    let log = agent.log();
    assert_eq!(log.matches("command forget").count(), 1, "{log}");
    // Each replay is one line (a replay whose ack a restart cut off comes again).
    assert!(
        log.matches("ignored a retained command").count() >= 3,
        "{log}"
    );
    assert_eq!(
        log.matches(" URLs from sync (").count(),
        1,
        "the retained sync message is taken once per start:\n{log}"
    );
    let log = agent.log();
    assert!(!log.contains("not JSON"), "{log}");
}

/// An audit command (QoS 1) is acknowledged only once the requeue it found
/// necessary is committed: with the queue locked by another process the
/// audit cannot commit, so a kill -9 then leaves the command unacknowledged,
/// and the restarted agent gets it again and answers it.
#[test]
fn an_audit_is_acked_only_after_its_requeue_is_committed() {
    let broker = Mosquitto::start();
    let http = common::HttpServer::start();
    let dir = TempDir::new("traffic-audit-ack");
    http.set("/a/x.png", common::Route::Ok(common::png(5, 5, 3)));
    let mut agent = agent_with(dir.path(), &broker, json!({"mqtt": {"keep_alive_secs": 5}}));
    broker.publish("sync", http.url("/a/x.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    std::fs::remove_file(agent.cache().join("a/x.png")).unwrap();
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let id = client_id(&agent);
    broker.publish(
        &format!("holosync/{id}/cmd"),
        br#"{"id":"a1","command":"audit"}"#,
        1,
    );
    agent.wait_log("audit: could not", WAIT);
    agent.kill();
    let cmd = format!("holosync/{id}/cmd");
    assert!(
        broker
            .log()
            .contains(&format!("Sending PUBLISH to {id} (d0, q1, r0, m"))
            && !acked(&broker, &id, &cmd),
        "the audit was acked before its requeue was committed:\n{}",
        broker.log()
    );
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    let topic = format!("holosync/{id}/events");
    let sub = broker.subscribe(&topic);
    agent.start();
    let answer = wait_event(&sub, &topic, "the answer after the restart", |v| {
        v["id"] == "a1"
    });
    // The start-up audit got to the missing file first; the command found it queued.
    assert_eq!(answer["ok"], true, "{answer}");
    agent.wait_done(1, WAIT);
    assert!(agent.cache().join("a/x.png").is_file());
}
