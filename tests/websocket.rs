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

/// Behind a venue's proxy: the broker's name is one only the proxy can
/// resolve, and the proxy wants Basic credentials (`proxy.url`). MQTT over
/// WebSockets goes through it (CONNECT) and a sync message arrives; the
/// start-up line says which proxy is in force, without its password. With a
/// wrong password the agent logs the proxy's refusal (naming the proxy,
/// never the password) and keeps trying.
#[test]
fn mqtt_over_websockets_goes_through_the_venue_proxy() {
    let rabbit = match RabbitWebMqtt::start() {
        Ok(r) => r,
        Err(why) => {
            common::cannot_run(&why);
            return;
        }
    };
    let http = HttpServer::start();
    let proxy = common::TestProxy::start(&["broker.venue.test"], Some(("kiosk", "s3cret")));
    let dir = TempDir::new("ws-proxy");
    let a = png(6, 6, 9);
    http.set("/px/a.png", Route::Ok(a.clone()));
    let agent = ws_agent(
        &dir,
        &rabbit,
        json!({"mqtt": {"host": "broker.venue.test"},
               "proxy": {"url": proxy.url(Some(("kiosk", "s3cret"))), "no_proxy": "127.0.0.1"}}),
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "proxy http://kiosk:****@127.0.0.1:{} (from proxy.url)",
            proxy.port
        )),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
    let connect = format!("CONNECT broker.venue.test:{} ", rabbit.ws_port);
    assert!(
        proxy
            .seen()
            .requests
            .iter()
            .any(|r| r.starts_with(&connect)),
        "{:?}",
        proxy.seen()
    );
    rabbit
        .endpoint
        .publish("sync", http.url("/px/a.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(std::fs::read(agent.cache().join("px/a.png")).unwrap(), a);
    drop(agent);

    let dir = TempDir::new("ws-proxy-wrong");
    let mut config = Agent::default_config(rabbit.ws_port);
    merge(
        &mut config,
        json!({"mqtt": {"transport": "ws", "ws_path": "/ws", "username": "guest",
                        "password": "guest", "host": "broker.venue.test"},
               "proxy": {"url": proxy.url(Some(("kiosk", "wrong-pw")))}}),
    );
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    let log = agent.wait_log("could not connect to broker", WAIT);
    let line = log
        .lines()
        .find(|l| l.contains("could not connect to broker"))
        .unwrap();
    assert!(
        line.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{line}"
    );
    assert!(line.contains("407"), "{line}");
    assert!(!log.contains("wrong-pw"), "{log}");
    assert!(proxy.seen().refused >= 1);
}
