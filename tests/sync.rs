//! End-to-end tests of the sync path: the real holosync binary, a real
//! mosquitto per test on a free port, and a real HTTP server on 127.0.0.1.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    agent_with, files_under, jpeg, png, wait_until, Agent, HttpServer, Mosquitto, Route, TempDir,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// State and error of one URL, read from the queue database directly.
fn db_state(dir: &Path, url: &str) -> Option<(String, String)> {
    let db = rusqlite::Connection::open(dir.join("holosync.db")).unwrap();
    db.query_row(
        "SELECT state, COALESCE(last_error, '') FROM queue WHERE url = ?1",
        [url],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

fn state_of(status: &serde_json::Value, url: &str) -> Option<String> {
    status["failures"]
        .as_array()?
        .iter()
        .find(|f| f["url"] == url)
        .map(|f| format!("{} {}", f["state"], f["error"]))
}

/// The first scenario: three URLs in one message, one with a `!style`
/// suffix, end up byte-identical at the mirrored paths.
#[test]
fn sync_message_caches_three_files_byte_identical() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-three");
    let files = [
        ("/works/12/a.jpg!preview", jpeg(64, 48, 1)),
        ("/works/12/b.png", png(30, 20, 2)),
        // The classic 1x1 GIF: one pixel of LZW data, decoded and checked.
        (
            "/other/c.gif",
            b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b"
                .to_vec(),
        ),
    ];
    for (path, bytes) in &files {
        http.set(path, Route::Ok(bytes.clone()));
    }
    let agent = agent_with(dir.path(), &broker, json!({}));
    let payload: Vec<String> = files.iter().map(|(p, _)| http.url(p)).collect();
    broker.publish("sync", payload.join(",").as_bytes(), 1);
    let status = agent.wait_done(3, WAIT);
    assert_eq!(status["pending"], 0);
    assert_eq!(status["failed"], 0);
    for (path, bytes) in &files {
        let local = agent.cache().join(path.trim_start_matches('/'));
        assert_eq!(
            &std::fs::read(&local).unwrap(),
            bytes,
            "{}",
            local.display()
        );
    }
    assert!(agent.log().contains("cached"), "{}", agent.log());
}

/// A message published while the agent is stopped arrives once it starts:
/// stable client id, clean session off, QoS 1.
#[test]
fn message_sent_while_agent_is_stopped_arrives_after_start() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-offline");
    let bytes = jpeg(32, 32, 3);
    http.set("/offline/x.jpg", Route::Ok(bytes.clone()));
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    agent.kill();
    broker.publish("sync-single-work", http.url("/offline/x.jpg").as_bytes(), 1);
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("offline/x.jpg")).unwrap(),
        bytes
    );
}

/// Without a configured client id, one is made on first start, kept in the
/// database, and reused after a restart (so the broker session survives).
#[test]
fn generated_client_id_is_kept_across_restarts() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("e2e-clientid");
    let mut config = Agent::default_config(broker.port);
    config["mqtt"].as_object_mut().unwrap().remove("client_id");
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    let log = agent.wait_log("subscribed to", WAIT);
    let made = log
        .lines()
        .find_map(|l| l.split("made a new MQTT client id ").nth(1))
        .expect("the first start makes a client id")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(made.starts_with("holosync-"), "{made}");
    agent.kill();
    std::fs::remove_file(dir.path().join("holosync.log")).unwrap();
    agent.start();
    let log = agent.wait_log("subscribed to", WAIT);
    assert!(log.contains(&format!("client id {made}")), "{log}");
    assert!(!log.contains("made a new MQTT client id"), "{log}");
}

/// SIGKILL while a download is in flight: after a restart the download
/// completes and no temporary file is left anywhere.
#[test]
fn kill_during_download_then_restart_completes() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-kill");
    let bytes = jpeg(200, 150, 4);
    http.set("/slow/k.jpg", Route::Hold(bytes.clone()));
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    broker.publish("sync", http.url("/slow/k.jpg").as_bytes(), 1);
    wait_until("the download to start", WAIT, || {
        http.hits("/slow/k.jpg") >= 1
    });
    agent.kill();
    http.set("/slow/k.jpg", Route::Ok(bytes.clone()));
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("slow/k.jpg")).unwrap(),
        bytes
    );
    let stray: Vec<_> = files_under(&agent.cache())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".holosync-tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// A message whose commit cannot happen (database locked by another process)
/// is not acknowledged: killed in that state and restarted, the agent gets it
/// again from the broker and caches the file.
#[test]
fn message_not_committed_before_a_kill_is_delivered_again() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-uncommitted");
    let bytes = png(8, 8, 5);
    http.set("/lock/l.png", Route::Ok(bytes.clone()));
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    broker.publish("sync", http.url("/lock/l.png").as_bytes(), 1);
    agent.wait_log("could not commit a message from sync", WAIT);
    agent.kill();
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("lock/l.png")).unwrap(),
        bytes
    );
}

/// The broker restarts under a running agent: it reconnects, subscribes again
/// and handles the next message.
#[test]
fn broker_restart_reconnects_and_resubscribes() {
    let mut broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-broker-restart");
    let bytes = jpeg(16, 16, 6);
    http.set("/after/r.jpg", Route::Ok(bytes.clone()));
    let agent = agent_with(dir.path(), &broker, json!({}));
    broker.restart();
    wait_until("a second subscription", WAIT, || {
        agent.log().matches("subscribed to").count() >= 2
    });
    assert!(
        agent.log().contains("lost connection to broker"),
        "{}",
        agent.log()
    );
    broker.publish("holo-file-sync", http.url("/after/r.jpg").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("after/r.jpg")).unwrap(),
        bytes
    );
}

/// Each kind of bad response ends in its state with a readable error, leaves
/// no file at its final path, and does not hold up the good URL behind it.
#[test]
fn faulty_responses_fail_cleanly_and_good_urls_still_arrive() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-faults");
    let good = jpeg(40, 30, 7);
    let big = jpeg(40, 30, 8);
    let truncated = {
        let j = jpeg(120, 90, 9);
        j[..j.len() * 2 / 3].to_vec()
    };
    let faults: Vec<(&str, Route, &str)> = vec![
        (
            "/f/404.jpg",
            Route::Status(404, b"gone".to_vec()),
            "failed HTTP 404",
        ),
        (
            "/f/html.jpg",
            Route::Html("<!DOCTYPE html><html>oops</html>".into()),
            "failed",
        ),
        (
            "/f/short.jpg",
            Route::ShortBody(good.clone(), 100),
            "failed",
        ),
        ("/f/trunc.jpg", Route::Ok(truncated), "failed broken JPEG"),
        (
            "/f/slow.jpg",
            Route::Slow(good.clone(), Duration::from_secs(4)),
            "failed",
        ),
        (
            "/f/big.jpg",
            Route::Ok(vec![0xAB; 300_000]),
            "failed too large",
        ),
    ];
    let mut payload = Vec::new();
    for (i, (path, route, _)) in faults.iter().enumerate() {
        http.set(path, route.clone());
        let ok_path = format!("/ok/{i}.jpg");
        http.set(&ok_path, Route::Ok(good.clone()));
        payload.push(http.url(path));
        payload.push(http.url(&ok_path));
    }
    http.set(
        "/f/500-then-200.jpg",
        Route::Sequence(vec![
            Route::Status(500, b"busy".to_vec()),
            Route::Ok(big.clone()),
        ]),
    );
    payload.push(http.url("/f/500-then-200.jpg"));
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 20, "timeout_secs": 1, "max_bytes": 200_000,
                            "max_attempts": 2, "retry_base_ms": 100, "retry_max_ms": 200}}),
    );
    broker.publish("sync", payload.join(",").as_bytes(), 1);
    agent.wait_done(faults.len() as u64 + 1, WAIT);
    wait_until("every fault to settle", WAIT, || {
        let s = agent.status();
        s["failed"] == faults.len() && s["pending"] == 0 && s["retry"] == 0
    });
    let status = agent.status();
    for (path, _, want) in &faults {
        let got = state_of(&status, &http.url(path)).unwrap_or_default();
        let want_words: Vec<&str> = want.split(' ').collect();
        for w in want_words {
            assert!(got.contains(w), "{path}: want {want:?}, got {got:?}");
        }
        assert!(
            !agent.cache().join(path.trim_start_matches('/')).exists(),
            "{path} left a file"
        );
    }
    let errors: Vec<String> = faults
        .iter()
        .map(|(p, _, _)| state_of(&status, &http.url(p)).unwrap())
        .collect();
    assert!(errors[1].contains("HTML"), "{errors:?}");
    assert!(errors[2].contains("short body"), "{errors:?}");
    assert!(
        errors[4].contains("timed out") || errors[4].contains("timeout"),
        "{errors:?}"
    );
    assert_eq!(
        std::fs::read(agent.cache().join("f/500-then-200.jpg")).unwrap(),
        big,
        "500 then 200 is retried and succeeds"
    );
    assert_eq!(http.hits("/f/500-then-200.jpg"), 2);
    for i in 0..faults.len() {
        assert_eq!(
            std::fs::read(agent.cache().join(format!("ok/{i}.jpg"))).unwrap(),
            good
        );
    }
}

/// Hostile input: path tricks are rejected without writing anything outside
/// the cache, odd but legal characters work, huge and broken payloads are
/// survived, and the next good message is still handled.
#[test]
fn hostile_input_is_contained_and_the_agent_keeps_going() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-hostile");
    let bytes = png(4, 4, 10);
    http.set("/%2e%2e/kept.png", Route::Ok(bytes.clone()));
    http.set("/q/it's;x.png", Route::Ok(bytes.clone()));
    http.set("/good/last.png", Route::Ok(bytes.clone()));
    let agent = agent_with(dir.path(), &broker, json!({"download": {"interval_ms": 0}}));
    let rejected = [
        http.url("/../../escape.png"),
        http.url("/a/../../escape2.png"),
        http.url("/C:/x.png"),
        http.url("/CON.jpg"),
        http.url("/dir/aux.png"),
    ];
    let legal = [http.url("/%2e%2e/kept.png"), http.url("/q/it's;x.png")];
    let payload = [&rejected[..], &legal[..]].concat().join(",");
    broker.publish("sync", payload.as_bytes(), 1);
    broker.publish("sync", b"\xff\xfe\xfd,\xc3\x28", 1);
    broker.publish("sync", b"", 1);
    let many: Vec<String> = (0..5000)
        .map(|i| http.url(&format!("/many/{i}.jpg")))
        .collect();
    broker.publish("sync", many.join(",").as_bytes(), 1);
    broker.publish("sync", http.url("/good/last.png").as_bytes(), 1);
    wait_until("the last good file", Duration::from_secs(120), || {
        agent.cache().join("good/last.png").exists()
    });
    let status = agent.status();
    assert_eq!(status["done"], 3, "{status}");
    for url in &rejected {
        let (state, error) = db_state(dir.path(), url).expect("rejected URLs get a row");
        assert_eq!(state, "failed", "{url}");
        assert!(error.contains("path segment"), "{url}: {error}");
    }
    assert_eq!(
        std::fs::read(agent.cache().join("%2e%2e/kept.png")).unwrap(),
        bytes
    );
    assert_eq!(
        std::fs::read(agent.cache().join("q/it's;x.png")).unwrap(),
        bytes
    );
    let log = agent.log();
    assert!(log.contains("not valid UTF-8"), "invalid UTF-8 is logged");
    assert!(
        log.contains("queued 5000 URLs"),
        "the 5,000-URL message is queued"
    );
    // Nothing anywhere in the test folder except the agent's own files and the cache.
    for f in files_under(dir.path()) {
        let rel = f.strip_prefix(dir.path()).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .to_string();
        assert!(
            top == "images"
                || top.starts_with("holosync")
                || ["config.json", "stdout.txt", "stderr.txt"].contains(&top.as_str()),
            "unexpected file {}",
            f.display()
        );
    }
    assert!(!dir.path().join("escape.png").exists());
}

/// A sync message over `mqtt.max_payload_bytes` (default 4 MiB) is logged, acknowledged (so it
/// is not redelivered forever) and dropped; a 1 MiB message of about 20,000
/// URLs fits under the default limit and is queued whole.
#[test]
fn oversized_message_is_dropped_once_and_a_1mib_message_works() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("e2e-oversize");
    let mut agent = agent_with(
        dir.path(),
        &broker,
        // Downloads are parked far in the future: this test is about ingest.
        json!({"download": {"interval_ms": 3_600_000}}),
    );
    // The first download tick happens at start-up; an empty queue then waits an hour.
    let urls: Vec<String> = (0..20_000)
        .map(|i| format!("http://127.0.0.1:9/works/{i:05}/image-{i:05}-preview.jpg!p"))
        .collect();
    let payload = urls.join(",");
    assert!(payload.len() > 1024 * 1024, "{}", payload.len());
    broker.publish("sync", payload.as_bytes(), 1);
    agent.wait_log("queued 20000 URLs", WAIT);
    // Over the default mqtt.max_payload_bytes (4 MiB), and made of real URLs:
    // queued, they would show in the count below.
    let oversized: Vec<String> = (0..100_000)
        .map(|i| format!("http://127.0.0.1:9/oversize/{i:06}/image-{i:06}.jpg"))
        .collect();
    let oversized = oversized.join(",");
    assert!(oversized.len() > 4 * 1024 * 1024, "{}", oversized.len());
    broker.publish("sync", oversized.as_bytes(), 1);
    agent.wait_log(
        &format!(
            "dropped a sync message on sync of {} bytes",
            oversized.len()
        ),
        WAIT,
    );
    broker.publish("sync", b"http://127.0.0.1:9/after/oversize.jpg", 1);
    agent.wait_log("queued 1 URLs", WAIT);
    agent.kill();
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    // Give the broker a moment to redeliver anything unacknowledged, then check it did not.
    broker.publish("sync", b"http://127.0.0.1:9/marker.jpg", 1);
    wait_until("the marker to be queued after restart", WAIT, || {
        agent.log().matches("queued 1 URLs").count() >= 2
    });
    assert_eq!(agent.log().matches("dropped a sync message").count(), 1);
    let status = agent.status();
    let queued = status["pending"].as_u64().unwrap() + status["retry"].as_u64().unwrap();
    assert_eq!(queued, 20_002, "{status}");
}

/// Started from another working directory without --config, the agent uses
/// the config.json next to its executable; a broken config exits 2 naming the key.
#[test]
fn config_is_found_next_to_the_binary_and_errors_name_the_key() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("e2e-exe-dir");
    let name = if common::under_wine() {
        "holosync.exe"
    } else {
        "holosync"
    };
    let exe = dir.path().join(name);
    std::fs::copy(common::exe_under_test(), &exe).unwrap();
    let mut config = Agent::default_config(broker.port);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let elsewhere = TempDir::new("e2e-cwd");
    let mut child = common::command_for(&exe, &[])
        .current_dir(elsewhere.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log_path = dir.path().join("holosync.log");
    wait_until("the agent to subscribe", WAIT, || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("subscribed to"))
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let config_path = dir.path().join("config.json").display().to_string();
    let shown = if common::under_wine() {
        format!("Z:{}", config_path.replace('/', "\\"))
    } else {
        config_path
    };
    assert!(log.contains(&format!("config {shown}")), "{log}");
    assert!(dir.path().join("holosync.db").exists());
    assert!(!elsewhere.path().join("holosync.db").exists());

    config["mqtt"]["port"] = json!("1883");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let out = common::command_for(&exe, &[])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mqtt.port"), "{err}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("cannot start") && log.contains("mqtt.port"),
        "{log}"
    );

    config["mqtt"]["port"] = json!(0);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let out = common::command_for(&exe, &["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt.port"));
}

/// `holosync enqueue` queues URLs for a technician; `check` accepts a good config.
#[test]
fn enqueue_and_check_commands_work_without_a_broker() {
    let dir = TempDir::new("e2e-cli");
    let agent = Agent::new(dir.path(), Agent::default_config(common::free_port()));
    let out = agent.run(&["check"]);
    assert!(out.status.success(), "{out:?}");
    let out = agent.run(&[
        "enqueue",
        "http://h.example/a.jpg",
        "ftp://x/y",
        "http://h.example/../b.jpg",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("queued 1 URLs"), "{text}");
    let status = agent.status();
    assert_eq!(
        (status["pending"].as_u64(), status["failed"].as_u64()),
        (Some(1), Some(1))
    );
    // What enqueue refused reaches the log a technician reads later.
    let log = agent.log();
    assert!(
        log.contains("enqueue (command line): rejected http://h.example/../b.jpg"),
        "{log}"
    );
    assert!(
        log.contains("enqueue (command line): skipped \"ftp://x/y\""),
        "{log}"
    );
    // `status --json` keys come in the README's order.
    let out = agent.run(&["status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let order: Vec<usize> = [
        "\"pending\"",
        "\"retry\"",
        "\"done\"",
        "\"failed\"",
        "\"failures\"",
    ]
    .iter()
    .map(|k| {
        text.find(k)
            .unwrap_or_else(|| panic!("{k} missing: {text}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
}

/// A second copy started while the first runs exits with "already running".
#[test]
fn second_instance_exits_with_already_running() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("e2e-single");
    let agent = agent_with(dir.path(), &broker, json!({}));
    let out = agent.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    assert!(agent.log().contains("already running"));
}

/// A cache path over 260 characters (Windows' old MAX_PATH) is written and
/// read back; under Wine this runs the Windows long-path handling.
#[test]
fn cache_path_longer_than_260_characters_works() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-longpath");
    let path = format!(
        "/{}/{}/{}.png",
        "a".repeat(120),
        "b".repeat(120),
        "c".repeat(60)
    );
    let bytes = png(3, 3, 11);
    http.set(&path, Route::Ok(bytes.clone()));
    let agent = agent_with(dir.path(), &broker, json!({}));
    broker.publish("sync", http.url(&path).as_bytes(), 1);
    agent.wait_done(1, WAIT);
    let local = agent.cache().join(path.trim_start_matches('/'));
    assert!(local.display().to_string().len() > 260);
    assert_eq!(std::fs::read(local).unwrap(), bytes);
}

/// HTTPS is compiled in and checks certificates: a local TLS server with a
/// self-signed certificate (openssl s_server) is refused at the certificate,
/// as a transient failure with a readable reason. (A full HTTPS download needs
/// a server whose certificate chains to the bundled public roots, which a
/// machine without internet access cannot reach.)
#[test]
fn https_checks_the_server_certificate() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        common::cannot_run("no openssl command to play the TLS server");
        return;
    }
    let broker = Mosquitto::start();
    let dir = TempDir::new("e2e-tls");
    let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let port = common::free_port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .arg("-key")
        .arg(&key)
        .arg("-cert")
        .arg(&cert)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the TLS server to listen", WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"max_attempts": 1}}),
    );
    let url = format!("https://127.0.0.1:{port}/works/tls.jpg");
    broker.publish("sync", url.as_bytes(), 1);
    wait_until("the https URL to fail", WAIT, || {
        agent.status()["failed"] == 1
    });
    let _ = server.kill();
    let _ = server.wait();
    let (state, error) = db_state(dir.path(), &url).unwrap();
    assert_eq!(state, "failed");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert!(!agent.cache().join("works/tls.jpg").exists());
}

/// Redirects are followed up to five times; a longer chain fails permanently.
#[test]
fn redirects_are_followed_at_most_five_times() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-redirect");
    let bytes = jpeg(24, 24, 12);
    http.set("/r/target.jpg", Route::Ok(bytes.clone()));
    http.set("/r/once.jpg", Route::Redirect(http.url("/r/target.jpg")));
    for i in 0..6 {
        http.set(
            &format!("/r/chain{i}.jpg"),
            Route::Redirect(http.url(&format!("/r/chain{}.jpg", i + 1))),
        );
    }
    http.set("/r/chain6.jpg", Route::Ok(bytes.clone()));
    let agent = agent_with(dir.path(), &broker, json!({}));
    let (once, chain) = (http.url("/r/once.jpg"), http.url("/r/chain0.jpg"));
    broker.publish("sync", format!("{once},{chain}").as_bytes(), 1);
    wait_until("both URLs to settle", WAIT, || {
        let s = agent.status();
        s["done"] == 1 && s["failed"] == 1
    });
    assert_eq!(
        std::fs::read(agent.cache().join("r/once.jpg")).unwrap(),
        bytes
    );
    let (state, error) = db_state(dir.path(), &chain).unwrap();
    assert_eq!(state, "failed");
    assert!(error.contains("redirect"), "{error}");
    assert!(!agent.cache().join("r/chain0.jpg").exists());
}

/// A kiosk migrated from the old script keeps its `config.json`: no `mqtt`
/// section but the broker port (the old script had none and used
/// 127.0.0.1:1883, which a test cannot take), the cache under the old key
/// `holoImageUrl` in a folder whose parents do not exist yet, and `mall`,
/// which makes the sync topics the old script's `-<mall>` ones.
#[test]
fn the_old_scripts_config_with_mall_syncs_through_its_topics() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-legacy");
    let (a, b) = (png(6, 6, 31), jpeg(20, 20, 32));
    http.set("/works/7/a.png", Route::Ok(a.clone()));
    http.set("/works/7/b.jpg!preview", Route::Ok(b.clone()));
    let config = json!({
        "holoImageUrl": "kiosk/D/holo",
        "mall": "m01",
        "mqtt": {"port": broker.port, "client_id": format!("legacy-{}", common::unique())}
    });
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    agent.wait_log(
        "subscribed to sync, sync-single-work-m01, holo-file-sync-m01, projector-remote-control, ",
        WAIT,
    );
    broker.publish(
        "sync-single-work-m01",
        http.url("/works/7/a.png").as_bytes(),
        1,
    );
    broker.publish(
        "holo-file-sync-m01",
        http.url("/works/7/b.jpg!preview").as_bytes(),
        1,
    );
    agent.wait_done(2, WAIT);
    let holo = dir.path().join("kiosk/D/holo");
    assert_eq!(std::fs::read(holo.join("works/7/a.png")).unwrap(), a);
    assert_eq!(
        std::fs::read(holo.join("works/7/b.jpg!preview")).unwrap(),
        b
    );
}

/// Pictures from one server come over one kept-alive connection (as curl
/// does), and a kept connection the server closed meanwhile is replaced
/// without a failed download.
#[test]
fn pictures_from_one_server_share_a_kept_alive_connection() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("e2e-keepalive");
    http.set_keep_alive(common::KeepAlive::On);
    let files: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| (format!("/ka/{i}.png"), png(8, 8, 100 + i)))
        .collect();
    for (path, bytes) in &files {
        http.set(path, Route::Ok(bytes.clone()));
    }
    let agent = agent_with(dir.path(), &broker, json!({"download": {"interval_ms": 0}}));
    let urls: Vec<String> = files.iter().map(|(p, _)| http.url(p)).collect();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(10, WAIT);
    assert!(
        http.connections() <= 3,
        "{} connections for 10 pictures",
        http.connections()
    );
    // Downloads overlap (one finishing while the next transfers): still
    // each picture is fetched once.
    for (path, _) in &files {
        assert_eq!(
            http.hits(path),
            1,
            "{path} fetched {} times",
            http.hits(path)
        );
    }

    // Now the server says keep-alive but closes: every reuse finds it closed.
    http.set_keep_alive(common::KeepAlive::Lies);
    let more: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("/ka/more-{i}.png"), png(8, 8, 200 + i)))
        .collect();
    for (path, bytes) in &more {
        http.set(path, Route::Ok(bytes.clone()));
    }
    let urls: Vec<String> = more.iter().map(|(p, _)| http.url(p)).collect();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(15, WAIT);
    assert!(
        !agent.log().contains("failed (attempt"),
        "{}",
        agent.diagnostics()
    );
    for (path, bytes) in files.iter().chain(&more) {
        let local = agent.cache().join(path.trim_start_matches('/'));
        assert_eq!(&std::fs::read(&local).unwrap(), bytes);
    }
}

/// One message of 5,000 URLs that climb out of the cache (`/../`): every one
/// is a failed row with its reason, and the log gets ten lines naming URLs
/// and one counting the rest, not 5,000 (which rotated the log's history
/// away).
#[test]
fn thousands_of_rejected_urls_take_a_few_log_lines() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("sync-rejected-flood");
    let agent = agent_with(dir.path(), &broker, json!({}));
    let payload: Vec<String> = (0..5000)
        .map(|i| format!("http://127.0.0.1:9/a/../../x{i}.png"))
        .collect();
    broker.publish("sync", payload.join(",").as_bytes(), 1);
    agent.wait_log("queued 0 URLs from sync", WAIT);
    let log = agent.log();
    assert_eq!(
        log.matches("WARN  rejected http").count(),
        10,
        "{}",
        common::tail(&log, 3000)
    );
    assert!(
        log.contains("rejected 4990 more URLs in the same message"),
        "{}",
        common::tail(&log, 3000)
    );
    assert!(
        log.contains("5000 rejected"),
        "{}",
        common::tail(&log, 3000)
    );
    assert_eq!(agent.status()["failed"], 5000);
}
