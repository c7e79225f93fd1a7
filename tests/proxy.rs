//! Downloads behind a venue's forward proxy, end to end: the proxy named by
//! the environment or by `proxy.url` (with Basic credentials), a picture
//! server whose name only the proxy resolves, `NO_PROXY` and
//! `proxy.no_proxy` going direct, and a wrong password logged as the
//! proxy's refusal without the password. (HTTPS through the proxy's tunnel
//! is in `tests/tls.rs`; MQTT over WebSockets through it in
//! `tests/websocket.rs`.)
//!
//! Real parts only: the holosync binary, a mosquitto per test, an HTTP
//! server and a forward proxy (test support) on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{agent_with, png, Agent, HttpServer, Mosquitto, Route, TempDir, TestProxy};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// `HTTP_PROXY` in the environment: a picture on `pictures.venue.test`, a
/// name only the proxy resolves, is fetched through it in absolute form
/// (`GET http://pictures.venue.test:<port>/...`) and stored byte for byte;
/// a host in `NO_PROXY` is fetched directly. The start-up line names the
/// proxy and where it came from.
#[test]
fn the_environments_proxy_fetches_what_only_it_can_reach() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let proxy = TestProxy::start(&["pictures.venue.test"], None);
    let dir = TempDir::new("proxy-env");
    let (a, b) = (png(8, 8, 1), png(8, 8, 2));
    http.set("/venue/a.png", Route::Ok(a.clone()));
    http.set("/direct/b.png", Route::Ok(b.clone()));
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    agent.start_with_env(&[
        ("HTTP_PROXY", &proxy.url(None)),
        ("NO_PROXY", "127.0.0.1,.lan"),
    ]);
    agent.wait_log("subscribed to", WAIT);
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "proxy http://127.0.0.1:{} for http, none for https (from the environment), 2 hosts or ranges bypass it",
            proxy.port
        )),
        "{log}"
    );
    let proxied = format!("http://pictures.venue.test:{}/venue/a.png", http.port());
    broker.publish(
        "sync",
        format!("{proxied},{}", http.url("/direct/b.png")).as_bytes(),
        1,
    );
    agent.wait_done(2, WAIT);
    assert_eq!(std::fs::read(agent.cache().join("venue/a.png")).unwrap(), a);
    assert_eq!(
        std::fs::read(agent.cache().join("direct/b.png")).unwrap(),
        b
    );
    let seen = proxy.seen();
    assert!(
        seen.requests
            .iter()
            .any(|r| r.starts_with(&format!("GET {proxied} "))),
        "{seen:?}"
    );
    assert!(
        !seen.requests.iter().any(|r| r.contains("/direct/")),
        "NO_PROXY host went through the proxy: {seen:?}"
    );
}

/// `proxy.url` with Basic credentials wins over the environment (which
/// names a dead proxy here), and the password never reaches the log. With a
/// wrong password the proxy answers 407: the URL is retried (transient) and
/// the log line names the proxy and the status, not the password.
#[test]
fn the_configs_proxy_with_credentials_and_a_wrong_password() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let proxy = TestProxy::start(&["pictures.venue.test"], Some(("kiosk", "s3cret")));
    let a = png(9, 9, 3);
    http.set("/cfg/a.png", Route::Ok(a.clone()));
    let url = format!("http://pictures.venue.test:{}/cfg/a.png", http.port());

    let dir = TempDir::new("proxy-config");
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"proxy": {"url": proxy.url(Some(("kiosk", "s3cret")))}}),
    );
    broker.publish("sync", url.as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(std::fs::read(agent.cache().join("cfg/a.png")).unwrap(), a);
    assert!(!agent.log().contains("s3cret"), "{}", agent.log());
    drop(agent);

    let dir = TempDir::new("proxy-wrong");
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"proxy": {"url": proxy.url(Some(("kiosk", "wrong-pw")))},
               "download": {"max_attempts": 100}}),
    );
    broker.publish("sync", url.as_bytes(), 1);
    let log = agent.wait_log("407", WAIT);
    let line = log.lines().find(|l| l.contains("407")).unwrap();
    assert!(
        line.contains(&format!("proxy http://kiosk:****@127.0.0.1:{}", proxy.port)),
        "{line}"
    );
    assert!(line.contains("check proxy.url"), "{line}");
    assert!(!log.contains("wrong-pw"), "{log}");
    let status = agent.status();
    assert_eq!(
        status["retry"], 1,
        "a refusing proxy is transient: {status}"
    );
    assert!(proxy.seen().refused >= 1);
}

/// `"proxy": {"url": ""}` means no proxy whatever the environment says, and
/// `proxy.no_proxy` sends a host directly: with `HTTP_PROXY` naming a proxy
/// that refuses everything, both agents fetch directly.
#[test]
fn an_empty_proxy_url_and_no_proxy_go_direct() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let proxy = TestProxy::start(&[], Some(("nobody", "never")));
    let a = png(5, 5, 7);
    http.set("/d/a.png", Route::Ok(a.clone()));
    for (name, patch) in [
        ("proxy-off", json!({"proxy": {"url": ""}})),
        (
            "proxy-bypass",
            json!({"proxy": {"no_proxy": "127.0.0.0/8"}}),
        ),
    ] {
        let dir = TempDir::new(name);
        let mut config = Agent::default_config(broker.port);
        common::merge(&mut config, patch);
        let mut agent = Agent::new(dir.path(), config);
        agent.start_with_env(&[("HTTP_PROXY", &proxy.url(None))]);
        agent.wait_log("subscribed to", WAIT);
        broker.publish("sync", http.url("/d/a.png").as_bytes(), 1);
        agent.wait_done(1, WAIT);
        assert_eq!(std::fs::read(agent.cache().join("d/a.png")).unwrap(), a);
    }
    assert!(proxy.seen().requests.is_empty(), "{:?}", proxy.seen());
}
