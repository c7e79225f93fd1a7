//! MQTT over WebSockets (`"transport": "ws"`), end to end against RabbitMQ's
//! Web MQTT plugin (path `/ws`; Debian's mosquitto has no WebSocket
//! listener): the sync path, the persistent session across a stop, and pings
//! that keep the link up over the WebSocket.
//!
//! Real parts only: the holosync binary, the machine's RabbitMQ (its plugin
//! turned on by the fixture), an HTTP server on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{merge, png, poll_until, Agent, HttpServer, RabbitWebMqtt, Route, TempDir};
use serde_json::{json, Value};

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// An agent on RabbitMQ's Web MQTT, keep-alive 5 s, `patch` applied.
fn ws_agent(dir: &TempDir, rabbit: &RabbitWebMqtt, patch: Value) -> Agent {
    let mut config = Agent::default_config(rabbit.ws_port);
    merge(
        &mut config,
        json!({"mqtt": {"transport": "ws", "ws_path": "/ws", "username": "guest",
                        "password": "guest", "keep_alive_secs": 5}}),
    );
    merge(&mut config, patch);
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    agent
}

/// Over WebSockets: a sync message is queued and its picture cached; one
/// sent while the agent is stopped waits in its session and arrives after
/// the restart (offline delivery); and the link holds through four
/// keep-alives with nothing to do (pings over the WebSocket).
#[test]
fn sync_over_websockets_survives_a_stop_and_keeps_the_link() {
    let rabbit = match RabbitWebMqtt::start() {
        Ok(r) => r,
        Err(why) => {
            common::cannot_run(&why);
            return;
        }
    };
    let http = HttpServer::start();
    let dir = TempDir::new("ws-sync");
    let (a, b) = (png(7, 7, 1), png(7, 7, 2));
    http.set("/ws/a.png", Route::Ok(a.clone()));
    http.set("/ws/b.png", Route::Ok(b.clone()));
    let mut agent = ws_agent(&dir, &rabbit, json!({}));
    assert!(
        agent.log().contains(&format!(
            "connected to broker ws://127.0.0.1:{}/ws",
            rabbit.ws_port
        )),
        "{}",
        agent.log()
    );
    rabbit
        .endpoint
        .publish("sync", http.url("/ws/a.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert!(agent.terminate().expect("running").success());
    rabbit
        .endpoint
        .publish("sync", http.url("/ws/b.png").as_bytes(), 1);
    agent.start();
    agent.wait_done(2, WAIT);
    assert_eq!(std::fs::read(agent.cache().join("ws/a.png")).unwrap(), a);
    assert_eq!(std::fs::read(agent.cache().join("ws/b.png")).unwrap(), b);
    let lost = poll_until(Duration::from_secs(20), || {
        agent.log().contains("lost connection to broker")
    });
    assert!(!lost, "{}", agent.log());
}
