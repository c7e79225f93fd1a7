//! End-to-end tests of big pictures over slow, broken links: an interrupted
//! download resumes (`Range` + `If-Range`) instead of starting over, a URL
//! synced again is revalidated (`304` keeps the file), a stall limit replaces
//! the wall clock, and a throttle keeps a download to its share of the link.
//!
//! The server is a real HTTP server on 127.0.0.1 that supports ranges and
//! validators and counts every body byte it sends.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent_with, wait_until, HttpServer, Mosquitto, Ranged, Route, TempDir};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(120);

/// `n` incompressible, deterministic bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (common::mix64(i as u64 ^ (seed << 40)) >> 11) as u8)
        .collect()
}

/// Fast retries, so the tests do not wait out the default backoff.
fn quick_retries() -> serde_json::Value {
    json!({"download": {"interval_ms": 0, "retry_base_ms": 100, "retry_max_ms": 500,
                        "max_attempts": 10, "max_bytes": 67_108_864}})
}

/// A 20 MB file whose first three responses are cut at 25%, 50% and 75%
/// completes, and the server sends it about once in all (≤ 1.1 × its size).
#[test]
fn a_download_cut_three_times_resumes_each_time() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-cuts");
    let size = 20_000_000;
    let body = bytes(size, 1);
    let quarter = size as u64 / 4;
    http.set(
        "/big/film.bin",
        Route::Ranged(Arc::new(Ranged {
            cuts: vec![Some(quarter), Some(2 * quarter), Some(3 * quarter)],
            ..Ranged::new(body.clone(), "v1")
        })),
    );
    let agent = agent_with(dir.path(), &broker, quick_retries());
    broker.publish("sync", http.url("/big/film.bin").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("big/film.bin")).unwrap(),
        body
    );
    let sent = http.sent("/big/film.bin");
    assert!(
        sent as f64 <= 1.1 * size as f64,
        "sent {sent} bytes for a {size}-byte file\n{}",
        agent.diagnostics()
    );
    assert_eq!(
        agent.log().matches("resumed http").count(),
        3,
        "{}",
        agent.diagnostics()
    );
    let heads = http.request_headers("/big/film.bin");
    assert_eq!(heads.len(), 4);
    let header = |h: &Vec<(String, String)>, k: &str| {
        h.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header(&heads[1], "range"),
        Some(format!("bytes={quarter}-"))
    );
    assert_eq!(header(&heads[1], "if-range").as_deref(), Some("\"v1\""));
}

/// A kill -9 in the middle of a download: after the restart it resumes
/// from what the temporary file kept (≤ 1.15 × the size sent in all).
#[test]
fn a_download_killed_mid_way_resumes_after_the_restart() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-kill");
    let size = 20_000_000;
    let body = bytes(size, 2);
    http.set(
        "/big/kill.bin",
        Route::Ranged(Arc::new(Ranged {
            rate: Some(4_000_000),
            ..Ranged::new(body.clone(), "k1")
        })),
    );
    let mut agent = agent_with(dir.path(), &broker, quick_retries());
    broker.publish("sync", http.url("/big/kill.bin").as_bytes(), 1);
    wait_until("half the file to be sent", WAIT, || {
        http.sent("/big/kill.bin") >= size as u64 / 2
    });
    agent.kill();
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("big/kill.bin")).unwrap(),
        body
    );
    let sent = http.sent("/big/kill.bin");
    assert!(
        sent as f64 <= 1.15 * size as f64,
        "sent {sent} bytes for a {size}-byte file\n{}",
        agent.diagnostics()
    );
    assert!(
        agent.log().contains("resumed http"),
        "{}",
        agent.diagnostics()
    );
}

/// The file changes on the server between two attempts (a new ETag): the
/// resume request's If-Range no longer matches, the server sends the whole
/// new file, and the new content is what ends up in the cache.
#[test]
fn a_changed_file_starts_over_and_the_new_content_wins() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-changed");
    let (old, new) = (bytes(3_000_000, 3), bytes(3_100_000, 4));
    http.set(
        "/big/changed.bin",
        Route::Ranged(Arc::new(Ranged {
            cuts: vec![Some(1_500_000)],
            ..Ranged::new(old, "old")
        })),
    );
    let mut config = quick_retries();
    common::merge(
        &mut config,
        json!({"download": {"retry_base_ms": 3000, "retry_max_ms": 3000}}),
    );
    let agent = agent_with(dir.path(), &broker, config);
    broker.publish("sync", http.url("/big/changed.bin").as_bytes(), 1);
    agent.wait_log("bytes kept to resume", WAIT);
    http.set(
        "/big/changed.bin",
        Route::Ranged(Arc::new(Ranged::new(new.clone(), "new"))),
    );
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("big/changed.bin")).unwrap(),
        new
    );
    assert!(
        agent.log().contains("starting over"),
        "{}",
        agent.diagnostics()
    );
}

/// A URL synced again while its file is in place is asked for with
/// If-None-Match; the 304 leaves the file untouched (same inode and mtime).
#[test]
fn a_resync_answered_304_leaves_the_file_untouched() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-304");
    let body = common::jpeg(64, 64, 5);
    http.set(
        "/works/a.jpg",
        Route::Ranged(Arc::new(Ranged::new(body.clone(), "a1"))),
    );
    let agent = agent_with(dir.path(), &broker, json!({}));
    let url = http.url("/works/a.jpg");
    broker.publish("sync", url.as_bytes(), 1);
    agent.wait_done(1, WAIT);
    let path = agent.cache().join("works/a.jpg");
    let before = std::fs::metadata(&path).unwrap();
    broker.publish("sync", url.as_bytes(), 1);
    agent.wait_log("not modified: ", WAIT);
    agent.wait_done(1, WAIT);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(after.ino(), before.ino(), "the file was replaced");
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let heads = http.request_headers("/works/a.jpg");
    assert!(
        heads[1]
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("if-none-match") && v == "\"a1\""),
        "{heads:?}"
    );
    assert_eq!(
        http.sent("/works/a.jpg"),
        body.len() as u64,
        "the body was sent twice"
    );
}

/// With the default interval (10 s between transfers), twenty re-synced
/// unchanged URLs answered 304 all finish in under 2 s: checks are not paced.
#[test]
fn twenty_unchanged_resyncs_are_not_paced() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-20x304");
    let mut config = Agent::default_config(broker.port);
    common::merge(&mut config, json!({"download": {"interval_ms": 0}}));
    let urls: Vec<String> = (0..20)
        .map(|i| {
            let path = format!("/works/u{i:02}.png");
            http.set(
                &path,
                Route::Ranged(Arc::new(Ranged::new(
                    common::png(4, 4, i),
                    &format!("e{i}"),
                ))),
            );
            http.url(&path)
        })
        .collect();
    let mut agent = common::Agent::new(dir.path(), config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(20, WAIT);
    // Now at the default pace, as a kiosk runs.
    agent.kill();
    let mut paced = agent.config().clone();
    paced["download"]["interval_ms"] = json!(10_000);
    let mut agent = common::Agent::new(dir.path(), paced);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let checks_before = agent.log().matches("not modified: ").count();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    let published = Instant::now();
    wait_until("20 checks", WAIT, || {
        agent.log().matches("not modified: ").count() >= checks_before + 20
    });
    let took = published.elapsed();
    assert!(took < Duration::from_secs(2), "20 checks took {took:?}");
}

use common::Agent;

/// `download.max_bytes_per_sec` paces the download: from the request to
/// the file in place, the rate stays within 15% of the setting.
#[test]
fn the_throttle_keeps_the_rate_near_its_setting() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-throttle");
    let size = 2_000_000;
    let rate = 250_000.0;
    http.set(
        "/big/throttled.bin",
        Route::Ranged(Arc::new(Ranged::new(bytes(size, 6), "t"))),
    );
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"max_bytes_per_sec": 250_000}}),
    );
    broker.publish("sync", http.url("/big/throttled.bin").as_bytes(), 1);
    http.wait_hits("/big/throttled.bin", 1, WAIT);
    let asked = Instant::now();
    let path = agent.cache().join("big/throttled.bin");
    wait_until("the file in place", WAIT, || path.exists());
    let secs = asked.elapsed().as_secs_f64();
    let measured = size as f64 / secs;
    assert!(
        (measured - rate).abs() <= 0.15 * rate,
        "measured {measured:.0} B/s against a setting of {rate} B/s"
    );
}

/// An 8 MB file at a steady 250 KB/s takes about 32 s, far beyond a 5 s
/// stall limit: it succeeds in one go (the limit is on silence, not on
/// the whole transfer), and the server sends it once.
#[test]
fn a_slow_steady_download_outlasts_the_stall_limit() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-steady");
    let size = 8_000_000;
    let body = bytes(size, 7);
    http.set(
        "/big/steady.bin",
        Route::Ranged(Arc::new(Ranged {
            rate: Some(250_000),
            ..Ranged::new(body.clone(), "s")
        })),
    );
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"timeout_secs": 5}}),
    );
    broker.publish("sync", http.url("/big/steady.bin").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("big/steady.bin")).unwrap(),
        body
    );
    let sent = http.sent("/big/steady.bin");
    assert!(sent as f64 <= 1.1 * size as f64, "sent {sent}");
    assert_eq!(http.hits("/big/steady.bin"), 1, "{}", agent.diagnostics());
}

/// A server that goes silent for longer than `timeout_secs` fails the
/// attempt ("stalled"), and the next attempt resumes where it stopped.
#[test]
fn a_stall_fails_the_attempt_and_the_next_resumes() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-stall");
    let size = 4_000_000;
    let body = bytes(size, 8);
    http.set(
        "/big/stall.bin",
        Route::Ranged(Arc::new(Ranged {
            stalls: vec![Some((size as u64 / 2, Duration::from_secs(30)))],
            ..Ranged::new(body.clone(), "st")
        })),
    );
    let mut config = quick_retries();
    common::merge(&mut config, json!({"download": {"timeout_secs": 2}}));
    let agent = agent_with(dir.path(), &broker, config);
    broker.publish("sync", http.url("/big/stall.bin").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("big/stall.bin")).unwrap(),
        body
    );
    let log = agent.log();
    assert!(log.contains("stalled: nothing received for 2 s"), "{log}");
    assert!(
        log.contains(&format!(
            "resumed {} at 2000000 of 4000000 bytes",
            http.url("/big/stall.bin")
        )),
        "{log}"
    );
    let sent = http.sent("/big/stall.bin");
    assert!(sent as f64 <= 1.1 * size as f64, "sent {sent}");
}

/// The issue's own case: a 40 MB picture over 1 Mbit/s (about 5.5 minutes),
/// cut at 25%, 50% and 75%: it finishes, and the server sends it about once.
/// Too slow for CI; `bench/run` runs it.
#[test]
#[ignore = "five and a half minutes; run by bench/run"]
fn forty_megabytes_at_one_megabit_with_three_cuts() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("resume-forty");
    let size = 40_000_000;
    let body = bytes(size, 9);
    let quarter = size as u64 / 4;
    http.set(
        "/big/forty.bin",
        Route::Ranged(Arc::new(Ranged {
            rate: Some(125_000),
            cuts: vec![Some(quarter), Some(2 * quarter), Some(3 * quarter)],
            ..Ranged::new(body.clone(), "forty")
        })),
    );
    let agent = agent_with(dir.path(), &broker, quick_retries());
    broker.publish("sync", http.url("/big/forty.bin").as_bytes(), 1);
    agent.wait_done(1, Duration::from_secs(900));
    assert_eq!(
        std::fs::read(agent.cache().join("big/forty.bin")).unwrap(),
        body
    );
    let sent = http.sent("/big/forty.bin");
    assert!(sent as f64 <= 1.1 * size as f64, "sent {sent}");
}
