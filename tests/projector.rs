//! End-to-end tests of projector control: messages published to the real
//! broker, handled by the real binary, received by TCP listeners played by the
//! test on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{free_port, png, Agent, HttpServer, Mosquitto, Route, TcpSink, TempDir};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A projector played by the test: on each connection it writes `greeting`,
/// reads until CR (or for raw: a short while), records what it got, then
/// writes `reply` and closes.
struct FakeProjector {
    port: u16,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeProjector {
    fn start(greeting: &[u8], reply: &[u8]) -> FakeProjector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (greeting, reply, rec) = (greeting.to_vec(), reply.to_vec(), received.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { return };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(&greeting);
                let mut got = Vec::new();
                let mut byte = [0u8; 1];
                while let Ok(1) = s.read(&mut byte) {
                    got.push(byte[0]);
                    if byte[0] == b'\r' {
                        break;
                    }
                }
                rec.lock().unwrap().push(got);
                let _ = s.write_all(&reply);
            }
        });
        FakeProjector { port, received }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap().clone()
    }

    fn wait_received(&self, n: usize) -> Vec<Vec<u8>> {
        common::wait_until("the projector to receive a command", WAIT, || {
            self.received().len() >= n
        });
        self.received()
    }
}

fn start_agent(dir: &TempDir, broker: &Mosquitto, projector: serde_json::Value) -> Agent {
    let mut config = Agent::default_config(broker.port);
    config["projector"] = projector;
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    agent
}

fn send(broker: &Mosquitto, message: serde_json::Value) {
    broker.publish(
        "projector-remote-control",
        message.to_string().as_bytes(),
        0,
    );
}

/// Raw: every listener receives exactly the command plus the terminator, and
/// a `hex:` command arrives as exactly those bytes.
#[test]
fn raw_command_reaches_every_projector_exactly() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("proj-raw");
    let (a, b) = (TcpSink::start(), TcpSink::start());
    let agent = start_agent(&dir, &broker, json!({"io_timeout_ms": 300}));
    send(
        &broker,
        json!({"command": "PWR ON", "projectors": [format!("127.0.0.1:{}", a.port), format!("127.0.0.1:{}", b.port)]}),
    );
    agent.wait_log(&format!("projector 127.0.0.1:{} (raw)", b.port), WAIT);
    assert_eq!(a.received(), b"PWR ON\r");
    assert_eq!(b.received(), b"PWR ON\r");
    let c = TcpSink::start();
    send(
        &broker,
        json!({"command": "hex:02 00 00 00 00 02", "projectors": [{"host": "127.0.0.1", "port": c.port}]}),
    );
    agent.wait_log(&format!("projector 127.0.0.1:{} (raw)", c.port), WAIT);
    assert_eq!(c.received(), [2, 0, 0, 0, 0, 2]);
}

/// PJLink without and with authentication (the spec's vector, byte for
/// byte), shortcuts mapped to class 1 lines.
#[test]
fn pjlink_with_and_without_auth() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("proj-pjlink");
    let open = FakeProjector::start(b"PJLINK 0\r", b"%1AVMT=OK\r");
    let locked = FakeProjector::start(b"PJLINK 1 498e4a67\r", b"%1POWR=OK\r");
    let agent = start_agent(&dir, &broker, json!({"protocol": "pjlink"}));
    send(
        &broker,
        json!({"command": "mute", "projectors": [format!("127.0.0.1:{}", open.port)]}),
    );
    assert_eq!(open.wait_received(1), [b"%1AVMT 31\r".to_vec()]);
    send(
        &broker,
        json!({"command": "on", "projectors": [{"host": "127.0.0.1", "port": locked.port, "password": "JBMIAProjectorLink"}]}),
    );
    assert_eq!(
        locked.wait_received(1),
        [b"5d8409bc1c3fa39749434aa3a5c38682%1POWR 1\r".to_vec()]
    );
    let log = agent.wait_log(
        &format!("projector 127.0.0.1:{} (pjlink) \"on\": OK", locked.port),
        WAIT,
    );
    assert!(!log.contains("JBMIAProjectorLink"), "password in the log");
    assert!(!log.contains("5d8409bc"), "digest in the log");
}

/// Each PJLink error reply is logged in words.
#[test]
fn pjlink_error_replies_are_logged_in_words() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("proj-pjlink-err");
    let agent = start_agent(&dir, &broker, json!({"protocol": "pjlink"}));
    let cases: [(&[u8], &str); 5] = [
        (b"%1POWR=ERR1\r", "ERR1: undefined command"),
        (b"%1POWR=ERR2\r", "ERR2: bad parameter"),
        (b"%1POWR=ERR3\r", "ERR3: unavailable now"),
        (b"%1POWR=ERR4\r", "ERR4: projector failure"),
        (b"PJLINK ERRA\r", "ERRA: wrong password"),
    ];
    let projectors: Vec<FakeProjector> = cases
        .iter()
        .map(|(reply, _)| FakeProjector::start(b"PJLINK 0\r", reply))
        .collect();
    let addrs: Vec<String> = projectors
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    send(&broker, json!({"command": "on", "projectors": addrs}));
    for (p, (_, words)) in projectors.iter().zip(cases) {
        agent.wait_log(
            &format!(
                "projector 127.0.0.1:{} (pjlink) \"on\": failed: {words}",
                p.port
            ),
            WAIT,
        );
    }
}

/// Faults at some projectors take bounded time, the others in the same
/// message are still served, and the next sync message is still handled.
#[test]
fn projector_faults_are_bounded_and_do_not_block_the_rest() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("proj-faults");
    // A closed port: bind, note the port, drop.
    let refused = free_port();
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    // Closes in the middle of a reply.
    let cut = FakeProjector::start(b"PJLINK 0\r", b"%1PO");
    // A megabyte of garbage instead of a greeting.
    let garbage = FakeProjector::start(&vec![b'Z'; 1_000_000], b"");
    let good = FakeProjector::start(b"PJLINK 0\r", b"%1POWR=OK\r");
    let agent = start_agent(
        &dir,
        &broker,
        json!({"protocol": "pjlink", "connect_timeout_ms": 1000, "io_timeout_ms": 1000}),
    );
    send(
        &broker,
        json!({"command": "on", "projectors": [
            format!("127.0.0.1:{refused}"), format!("127.0.0.1:{silent_port}"),
            format!("127.0.0.1:{}", cut.port), format!("127.0.0.1:{}", garbage.port),
            format!("127.0.0.1:{}", good.port)]}),
    );
    assert_eq!(good.wait_received(1), [b"%1POWR 1\r".to_vec()]);
    agent.wait_log(
        &format!("projector 127.0.0.1:{} (pjlink) \"on\": OK", good.port),
        WAIT,
    );
    // The projectors are driven at once: the faults end after the good one.
    for port in [refused, silent_port, cut.port, garbage.port] {
        agent.wait_log(
            &format!("projector 127.0.0.1:{port} (pjlink) \"on\": failed: "),
            WAIT,
        );
    }
    let log = agent.log();
    // Bounded by the timeouts, not by the wall clock: every fault ends in
    // exactly one failure line with its reason (the silent one by the I/O
    // timeout, not by hanging), and the good projector got its command once.
    for (port, words) in [
        (refused, "connect failed"),
        (silent_port, "timed out"),
        (cut.port, "closed"),
        (garbage.port, "longer than"),
    ] {
        assert!(
            log.contains(&format!(
                "projector 127.0.0.1:{port} (pjlink) \"on\": failed: "
            )),
            "{port}: {log}"
        );
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("127.0.0.1:{port} ")))
            .collect();
        assert_eq!(lines.len(), 1, "one line per fault: {lines:?}");
        assert!(lines[0].contains(words), "{}", lines[0]);
    }
    drop(silent);
    let bytes = png(4, 4, 1);
    http.set("/after/p.png", Route::Ok(bytes.clone()));
    broker.publish("sync", http.url("/after/p.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
}

/// Bad projector messages are one log line each; nothing is sent; the agent lives on.
#[test]
fn bad_projector_messages_send_nothing() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("proj-bad");
    let sink = TcpSink::start();
    let mut agent = start_agent(&dir, &broker, json!({}));
    let addr = format!("127.0.0.1:{}", sink.port);
    let many: Vec<String> = (0..65).map(|_| addr.clone()).collect();
    let bad = [
        b"this is not json".to_vec(),
        json!({"command": 1, "projectors": [addr]})
            .to_string()
            .into_bytes(),
        json!({"command": "on", "projectors": {"host": addr}})
            .to_string()
            .into_bytes(),
        json!({"command": "on", "projectors": many})
            .to_string()
            .into_bytes(),
        json!({"command": "on", "projectors": []})
            .to_string()
            .into_bytes(),
        json!({"command": "on", "projectors": ["bad host!:4352", addr]})
            .to_string()
            .into_bytes(),
        b"\xff\xfe".to_vec(),
    ];
    for payload in &bad {
        broker.publish("projector-remote-control", payload, 0);
    }
    common::wait_until("a log line per bad message", WAIT, || {
        agent.log().matches("ignored projector message").count() >= bad.len()
    });
    assert!(agent.is_running());
    assert_eq!(sink.connections(), 0, "nothing may be sent");
    // Still alive and serving: a good message after the bad ones.
    send(&broker, json!({"command": "PING", "projectors": [addr]}));
    sink.wait_for(|s| s == "PING\r", WAIT);
}

/// With `result_topic` set, a subscriber sees one JSON result per message.
#[test]
fn results_are_published_to_the_result_topic() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("proj-result");
    let good = FakeProjector::start(b"PJLINK 0\r", b"%1POWR=1\r");
    let refused = free_port();
    let results = broker.subscribe("projector-results");
    let _agent = start_agent(
        &dir,
        &broker,
        json!({"protocol": "pjlink", "result_topic": "projector-results"}),
    );
    send(
        &broker,
        json!({"command": "status", "projectors": [format!("127.0.0.1:{}", good.port), format!("127.0.0.1:{refused}")]}),
    );
    let line = results.wait_for(|l| l.starts_with("projector-results "), WAIT);
    let v: serde_json::Value =
        serde_json::from_str(line.trim_start_matches("projector-results ")).unwrap();
    assert_eq!(v["command"], "status");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["projector"], format!("127.0.0.1:{}", good.port));
    assert_eq!(r[0]["ok"], true);
    assert_eq!(r[0]["reply"], "power: on");
    assert!(r[0]["ms"].is_u64());
    assert_eq!(r[1]["ok"], false);
}
