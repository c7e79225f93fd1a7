//! End-to-end tests of what a kiosk tells its fleet over MQTT: the retained
//! online/offline state with its Last Will, the retained status, one event
//! per download, the commands (status, retry-failed, audit, forget), the
//! same against RabbitMQ's MQTT plugin, and a fleet of twenty agents that
//! does not come back in lockstep after a broker restart or an origin outage.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use common::{
    agent_with, merge, png, wait_until, Agent, Endpoint, HttpServer, Mosquitto, Route, Subscriber,
    TempDir,
};
use serde_json::{json, Value};

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// The agent's topic prefix (the default: `holosync/<client id>`).
fn prefix(agent: &Agent) -> String {
    format!(
        "holosync/{}",
        agent.config()["mqtt"]["client_id"].as_str().unwrap()
    )
}

/// The JSON payloads received on `topic` so far, in order.
fn payloads(sub: &Subscriber, topic: &str) -> Vec<Value> {
    sub.json_payloads(topic)
}

/// Waits for a payload on `topic` that satisfies `pred`; returns it.
fn wait_payload(sub: &Subscriber, topic: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_json(topic, what, WAIT, pred)
}

/// Fast reports for the tests.
fn quick() -> Value {
    json!({"report": {"status_interval_secs": 1}, "mqtt": {"keep_alive_secs": 5}})
}

/// A subscriber sees the retained online state, and after a kill -9 the
/// Last Will's offline (the broker notices the closed socket at once; at
/// the latest after 1.5 x keep-alive). A later subscriber gets the retained
/// offline too.
#[test]
fn online_then_the_will_says_offline_after_a_kill() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("fleet-will");
    let mut agent = agent_with(dir.path(), &broker, quick());
    let state = format!("{}/state", prefix(&agent));
    let sub = broker.subscribe(&state);
    let online = wait_payload(&sub, &state, "online state", |v| v["online"] == true);
    assert_eq!(online["client_id"], agent.config()["mqtt"]["client_id"]);
    assert!(online["version"].is_string() && online["started_at"].is_string());
    assert!(online["host"].is_string());
    let killed = Instant::now();
    agent.kill();
    let offline = wait_payload(&sub, &state, "the will", |v| v["online"] == false);
    assert_eq!(offline["reason"], "connection lost");
    assert!(killed.elapsed() <= Duration::from_secs(8) + Duration::from_secs(30));
    let later = broker.subscribe(&state);
    wait_payload(&later, &state, "the retained offline", |v| {
        v["online"] == false
    });
}

/// A clean stop publishes offline itself, at once, and the broker sends no
/// will after it.
#[test]
fn a_clean_stop_publishes_offline_at_once() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("fleet-stop");
    let mut agent = agent_with(dir.path(), &broker, quick());
    let state = format!("{}/state", prefix(&agent));
    let sub = broker.subscribe(&state);
    wait_payload(&sub, &state, "online state", |v| v["online"] == true);
    let status = agent.terminate().expect("running");
    assert!(status.success());
    let offline = wait_payload(&sub, &state, "offline", |v| v["online"] == false);
    assert_eq!(offline["reason"], "stopped");
    // The offline state is retained: a subscriber that comes later gets it.
    let later = broker.subscribe(&state);
    wait_payload(&later, &state, "the retained offline", |v| {
        v["online"] == false && v["reason"] == "stopped"
    });
    // Give a will every chance to come, then check none did.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !payloads(&sub, &state)
            .iter()
            .any(|v| v["reason"] == "connection lost"),
        "{}",
        sub.lines().join("\n")
    );
}

/// The retained status follows the queue: a URL held by the server shows as
/// pending, then everything done or failed with the cache figures, and the
/// object has the same keys as `status --json`.
#[test]
fn the_status_follows_the_queue() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("fleet-status");
    let (a, b) = (png(8, 8, 1), png(9, 9, 2));
    http.set("/s/a.png", Route::Ok(a.clone()));
    http.set("/s/held.png", Route::Hold(b.clone()));
    let agent = agent_with(dir.path(), &broker, quick());
    let topic = format!("{}/status", prefix(&agent));
    let sub = broker.subscribe(&topic);
    wait_payload(&sub, &topic, "the first status", |v| v["done"] == 0);
    // The last one fails with a name too long to show whole.
    let long = format!("/s/{}.png", "n".repeat(400));
    let urls = [
        http.url("/s/a.png"),
        http.url("/s/held.png"),
        http.url("/s/gone.png"),
        http.url(&long),
    ];
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    wait_payload(&sub, &topic, "a status with work waiting", |v| {
        v["pending"].as_u64().unwrap_or(0) + v["retry"].as_u64().unwrap_or(0) >= 1
            && v["oldest_pending_secs"].is_u64()
    });
    // Seconds, not milliseconds: the URLs were queued moments ago.
    let waiting = payloads(&sub, &topic);
    let age = waiting
        .iter()
        .rev()
        .find_map(|v| v["oldest_pending_secs"].as_u64())
        .expect("a status with an age");
    assert!(age < 600, "oldest_pending_secs {age}");
    http.release("/s/held.png");
    let last = wait_payload(&sub, &topic, "the final status", |v| {
        v["done"] == 2 && v["failed"] == 2
    });
    assert_eq!(last["cache_files"], 2);
    assert_eq!(last["cache_bytes"], (a.len() + b.len()) as u64);
    assert!(last["cache_free_bytes"].as_u64().unwrap() > 0);
    // Stamps of today (this year, give or take one), not of 1970 or before.
    let year = 1970
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952;
    let stamp_year = |v: &Value| -> u64 {
        v.as_str()
            .and_then(|s| s.get(..4))
            .and_then(|y| y.parse().ok())
            .unwrap_or_else(|| panic!("not a time stamp: {v}"))
    };
    assert!(
        stamp_year(&last["last_sync"]).abs_diff(year) <= 1,
        "{}",
        last["last_sync"]
    );
    assert!(last["last_download"]["url"].is_string());
    let failed: Vec<&str> = last["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["url"].as_str().unwrap())
        .collect();
    assert!(failed.contains(&urls[2].as_str()), "{failed:?}");
    // The long URL is shown cut, marked as cut.
    let cut = failed
        .iter()
        .find(|u| u.contains("nnnn"))
        .expect("the long URL is among the failures");
    assert!(
        cut.ends_with("...") && cut.chars().count() <= 303,
        "{} characters: {cut}",
        cut.chars().count()
    );
    let cli = agent.status();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&cli),
        keys(&last),
        "status --json and the topic differ"
    );
}

/// One event per finished download: URL, state, bytes, time, error.
#[test]
fn one_event_per_download() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("fleet-events");
    let mut urls = Vec::new();
    for i in 0..4 {
        let path = format!("/e/{i}.png");
        http.set(&path, Route::Ok(png(5, 5, i)));
        urls.push(http.url(&path));
    }
    urls.push(http.url("/e/missing.png"));
    let mut patch = quick();
    merge(&mut patch, json!({"download": {"interval_ms": 300}}));
    let agent = agent_with(dir.path(), &broker, patch);
    let topic = format!("{}/events", prefix(&agent));
    let sub = broker.subscribe(&topic);
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    wait_until("five events", WAIT, || payloads(&sub, &topic).len() >= 5);
    let events = payloads(&sub, &topic);
    assert_eq!(events.len(), 5, "{events:?}");
    for url in &urls {
        let e = events.iter().find(|e| e["url"] == *url).expect(url);
        if url.ends_with("missing.png") {
            assert_eq!(e["state"], "failed");
            assert!(e["error"].as_str().unwrap().contains("404"));
        } else {
            assert_eq!(e["state"], "done");
            assert!(e["bytes"].as_u64().unwrap() > 0 && e["ms"].is_u64());
        }
    }
}

/// Each command works and answers on the events topic with its id; a
/// command delivered twice is harmless; bad ones get an error event.
#[test]
fn commands_answer_with_their_id_and_are_harmless_twice() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("fleet-commands");
    http.set("/c/a.png", Route::Ok(png(6, 6, 1)));
    http.set("/c/c.png", Route::Ok(png(6, 6, 3)));
    let agent = agent_with(dir.path(), &broker, quick());
    let p = prefix(&agent);
    let (events, cmd) = (format!("{p}/events"), format!("{p}/cmd"));
    let sub = broker.subscribe(&events);
    let (a, b, c) = (
        http.url("/c/a.png"),
        http.url("/c/b.png"),
        http.url("/c/c.png"),
    );
    broker.publish("sync", format!("{a},{b},{c}").as_bytes(), 1);
    wait_until("a and c done, b failed", WAIT, || {
        let s = agent.status();
        s["done"] == 2 && s["failed"] == 1
    });
    let answer = |id: &str| {
        let id = id.to_string();
        wait_payload(&sub, &events, &format!("the answer to {id}"), move |v| {
            v["id"] == id
        })
    };

    // retry-failed: b is back, and now the server has it.
    http.set("/c/b.png", Route::Ok(png(6, 6, 2)));
    let retry = format!(r#"{{"id": "r1", "command": "retry-failed", "urls": ["{b}"]}}"#);
    broker.publish(&cmd, retry.as_bytes(), 1);
    assert_eq!(answer("r1")["requeued"], 1);
    agent.wait_done(3, WAIT);
    // Nothing is failed any more: retrying all of them requeues none.
    broker.publish(&cmd, br#"{"id": "r2", "command": "retry-failed"}"#, 1);
    assert_eq!(answer("r2")["requeued"], 0);

    // forget: c's row goes, its file stays; twice is harmless.
    let forget = format!(r#"{{"id": "f1", "command": "forget", "urls": ["{c}"]}}"#);
    broker.publish(&cmd, forget.as_bytes(), 1);
    assert_eq!(answer("f1")["forgotten"], 1);
    wait_until("c forgotten", WAIT, || agent.status()["done"] == 2);
    assert!(agent.cache().join("c/c.png").is_file());
    let forget2 = forget.replace("f1", "f2");
    broker.publish(&cmd, forget2.as_bytes(), 1);
    assert_eq!(answer("f2")["forgotten"], 0);

    // status, on the fleet topic.
    let status_topic = format!("{p}/status");
    let statuses = broker.subscribe(&status_topic);
    broker.publish(
        "holosync/all/cmd",
        br#"{"id": "s1", "command": "status"}"#,
        1,
    );
    assert_eq!(answer("s1")["ok"], true);
    wait_payload(&statuses, &status_topic, "the status", |v| v["done"] == 2);

    // Bad input: one log line and an error event each, nothing else.
    broker.publish(&cmd, b"{not json", 1);
    broker.publish(&cmd, br#"{"id": "u1", "command": "reboot"}"#, 1);
    let unknown = answer("u1");
    assert!(unknown["error"]
        .as_str()
        .unwrap()
        .contains("unknown command"));
    wait_until("the bad-JSON error event", WAIT, || {
        payloads(&sub, &events).iter().any(|v| {
            v["id"].is_null() && v["error"].as_str().is_some_and(|e| e.contains("not JSON"))
        })
    });
    assert_eq!(agent.status()["done"], 2);
    // Every command was acknowledged (QoS 1): none is waiting at the broker.
    let log = broker.log();
    let id = agent.config()["mqtt"]["client_id"].as_str().unwrap();
    let sent = log
        .lines()
        .filter(|l| l.contains(&format!("Sending PUBLISH to {id} (d0, q1")) && l.contains("/cmd'"))
        .count();
    wait_until("PUBACKs for the commands", WAIT, || {
        broker
            .log()
            .lines()
            .filter(|l| l.contains(&format!("Received PUBACK from {id}")))
            .count()
            >= sent
    });
}

/// Three cached files deleted behind the agent's back: the audit command
/// requeues exactly those three (and they come back), the others stay as
/// they are. An audit at start-up does the same without a command.
#[test]
fn audit_requeues_exactly_the_deleted_files() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("fleet-audit");
    let urls: Vec<String> = (0..6)
        .map(|i| {
            let path = format!("/au/{i}.png");
            http.set(&path, Route::Ok(png(7, 7, i)));
            http.url(&path)
        })
        .collect();
    let mut patch = quick();
    merge(&mut patch, json!({"download": {"interval_ms": 0}}));
    let mut agent = agent_with(dir.path(), &broker, patch);
    let events = format!("{}/events", prefix(&agent));
    let sub = broker.subscribe(&events);
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(6, WAIT);
    let cache = agent.cache();
    let file = |i: usize| cache.join(format!("au/{i}.png"));
    let inode = |i: usize| std::fs::metadata(file(i)).unwrap().ino();
    let kept: Vec<u64> = (3..6).map(inode).collect();
    for i in 0..3 {
        std::fs::remove_file(file(i)).unwrap();
    }
    broker.publish(
        &format!("{}/cmd", prefix(&agent)),
        br#"{"id": "a1", "command": "audit"}"#,
        1,
    );
    let answer = wait_payload(&sub, &events, "the audit's answer", |v| v["id"] == "a1");
    assert_eq!(answer["checked"], 6);
    assert_eq!(answer["requeued"], 3);
    let mut listed: Vec<String> = answer["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, urls[..3]);
    wait_until("the three to come back", WAIT, || {
        (0..3).all(|i| file(i).is_file())
    });
    agent.wait_done(6, WAIT);
    assert_eq!(
        (3..6).map(inode).collect::<Vec<_>>(),
        kept,
        "untouched files were rewritten"
    );

    // At start-up, without a command.
    agent.kill();
    std::fs::remove_file(file(4)).unwrap();
    agent.start();
    agent.wait_log("audit at start-up: 1 of 6 cached files were missing", WAIT);
    wait_until("the file to come back", WAIT, || file(4).is_file());
}

/// State, status and will through RabbitMQ's MQTT plugin (the RabbitMQ on
/// this machine; the plugin is turned on on a free port for the test).
#[test]
fn state_status_and_will_work_on_rabbitmq() {
    let rabbit = match common::RabbitMqtt::start() {
        Ok(r) => r,
        Err(why) => {
            common::cannot_run(&why);
            return;
        }
    };
    let ep: &Endpoint = &rabbit.endpoint;
    let http = HttpServer::start();
    let dir = TempDir::new("fleet-rabbit");
    http.set("/r/a.png", Route::Ok(png(6, 6, 9)));
    let mut config = Agent::default_config(ep.port);
    merge(
        &mut config,
        json!({"mqtt": {"username": "guest", "password": "guest", "keep_alive_secs": 5},
               "report": {"status_interval_secs": 1}}),
    );
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let p = prefix(&agent);
    let (state, status) = (format!("{p}/state"), format!("{p}/status"));
    // RabbitMQ sends retained messages only to subscriptions without wildcards.
    let sub = ep.subscribe_with(&state, &["-t", &status]);
    wait_payload(&sub, &state, "online state", |v| v["online"] == true);
    ep.publish("sync", http.url("/r/a.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    wait_payload(&sub, &status, "a status with the file", |v| v["done"] == 1);
    agent.kill();
    let offline = wait_payload(&sub, &state, "the will", |v| v["online"] == false);
    assert_eq!(offline["reason"], "connection lost");
    // Retained: a new subscriber gets the last state and status.
    let later = ep.subscribe_with(&state, &["-t", &status]);
    wait_payload(&later, &state, "the retained state", |v| {
        v["online"] == false
    });
    wait_payload(&later, &status, "the retained status", |v| v["done"] == 1);
}

/// The time in a holosync log line (`2026-12-01T20:15:03.123Z ...`), as ms of the day.
fn log_ms(line: &str) -> Option<u64> {
    let t = line.get(11..23)?;
    let (h, m, s) = (t.get(0..2)?, t.get(3..5)?, t.get(6..12)?);
    let secs: f64 = s.parse().ok()?;
    Some(
        h.parse::<u64>().ok()? * 3_600_000
            + m.parse::<u64>().ok()? * 60_000
            + (secs * 1000.0) as u64,
    )
}

/// Twenty agents on one broker that restarts reconnect spread over time
/// (not within one second), and their retries after an origin outage are
/// spread the same way.
#[test]
fn a_fleet_does_not_come_back_in_lockstep() {
    let mut broker = Mosquitto::start();
    let http = HttpServer::start();
    let root = TempDir::new("fleet-twenty");
    let mut outage: Vec<Route> = vec![Route::Status(503, b"down\n".to_vec()); 20];
    outage.push(Route::Ok(png(6, 6, 20)));
    http.set("/fleet/pic.png", Route::Sequence(outage));
    let agents: Vec<Agent> = (0..20)
        .map(|i| {
            agent_with(
                &root.path().join(format!("k{i:02}")),
                &broker,
                json!({"download": {"interval_ms": 0, "retry_base_ms": 2000, "retry_max_ms": 8000},
                       "log": {"level": "info"}}),
            )
        })
        .collect();
    let connects = |a: &Agent| a.log().matches("connected to broker").count();
    broker.restart();
    wait_until("all twenty to reconnect", WAIT, || {
        agents.iter().all(|a| connects(a) >= 2)
    });
    let instants: Vec<u64> = agents
        .iter()
        .map(|a| {
            let log = a.log();
            let line = log
                .lines()
                .filter(|l| l.contains("connected to broker"))
                .nth(1)
                .unwrap()
                .to_string();
            log_ms(&line).unwrap()
        })
        .collect();
    let spread = instants.iter().max().unwrap() - instants.iter().min().unwrap();
    assert!(
        spread >= 1000,
        "reconnects bunched within {spread} ms: {instants:?}"
    );
    let ids: Vec<String> = agents
        .iter()
        .map(|a| {
            a.config()["mqtt"]["client_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let broker_log = broker.log();
    let restarted_at = broker_log.rfind(" running").unwrap();
    let seconds: std::collections::HashSet<&str> = broker_log[restarted_at..]
        .lines()
        .filter(|l| {
            l.contains("New client connected")
                && ids.iter().any(|id| l.contains(&format!(" as {id} ")))
        })
        .filter_map(|l| l.split(':').next())
        .collect();
    assert!(
        seconds.len() >= 2,
        "all reconnects in one second of the broker log: {seconds:?}"
    );

    // The origin is down for everyone's first request.
    for a in &agents {
        a.wait_log("subscribed to", WAIT);
    }
    broker.publish("sync", http.url("/fleet/pic.png").as_bytes(), 1);
    wait_until(
        "all twenty to retry and finish",
        Duration::from_secs(120),
        || agents.iter().all(|a| a.log().contains("cached http")),
    );
    let times = http.request_times("/fleet/pic.png");
    assert!(times.len() >= 40, "{} requests", times.len());
    let retries = &times[20..40];
    let first = *retries.iter().min().unwrap();
    let last = *retries.iter().max().unwrap();
    assert!(
        last.duration_since(first) >= Duration::from_secs(1),
        "retries bunched within {:?}",
        last.duration_since(first)
    );
}
