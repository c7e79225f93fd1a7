//! The product's core promises, end to end, each written so that it fails
//! when the promise breaks (each was checked against a hand-made mutation of
//! the code, see README "Test it"): a message is acked only after its URLs
//! are committed and on disk; nothing partial is ever visible at a final
//! path; nothing is written outside the cache; the bytes served are the bytes
//! stored; a 404 is permanent; a query string never reaches a file name; a
//! body shorter than its Content-Length is never cached.
//!
//! Real parts only: the holosync binary, a mosquitto per test on a free
//! port, an HTTP server on 127.0.0.1, strace for the order of system calls.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    agent_with, files_under, jpeg, png, wait_until, Agent, HttpServer, Mosquitto, Route, TempDir,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// State, attempts and last error of one URL, read from the queue database.
fn row(dir: &Path, url: &str) -> Option<(String, i64, String)> {
    let db = rusqlite::Connection::open(dir.join("holosync.db")).ok()?;
    db.query_row(
        "SELECT state, attempts, COALESCE(last_error, '') FROM queue WHERE url = ?1",
        [url],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .ok()
}

/// Waits until the URL's row is in `state`; returns the row.
fn wait_state(dir: &Path, url: &str, state: &str) -> (String, i64, String) {
    let mut last = None;
    let ok = common::poll_until(WAIT, || {
        last = row(dir, url);
        last.as_ref().is_some_and(|r| r.0 == state)
    });
    assert!(ok, "{url}: never {state}; last row {last:?}");
    last.expect("polled above")
}

/// PUBACKs the broker received from the agent (mosquitto logs each one).
fn pubacks(broker: &Mosquitto, agent: &Agent) -> usize {
    let client = agent.config()["mqtt"]["client_id"]
        .as_str()
        .expect("test configs name the client id")
        .to_string();
    broker
        .log()
        .matches(&format!("Received PUBACK from {client} "))
        .count()
}

/// Temporary files under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".holosync-tmp-"))
        .collect()
}

/// Ack after commit: while the queue cannot commit (the database is locked
/// by another process) the message is never acked, not even after the agent
/// has sent later acks; killed in that state and restarted, the agent gets
/// the message again and caches the file. An ack sent before (or without)
/// the commit shows up as an extra PUBACK and as a message that never returns.
#[test]
fn no_ack_without_the_commit_and_the_message_survives_a_kill() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-ack");
    let bytes = png(9, 9, 21);
    http.set("/ack/held.png", Route::Ok(bytes.clone()));
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"mqtt": {"max_payload_bytes": 2000}}),
    );
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    broker.publish("sync", http.url("/ack/held.png").as_bytes(), 1);
    agent.wait_log("could not commit a message from sync", WAIT);
    // A message acked at once (a sync message over mqtt.max_payload_bytes,
    // dropped). Acks leave in order, so once the broker has this one, any
    // early ack of the held message would have reached it too.
    broker.publish("sync-single-work", &[b'x'; 3000], 1);
    agent.wait_log("dropped a sync message", WAIT);
    wait_until("the dropped message's PUBACK", WAIT, || {
        pubacks(&broker, &agent) >= 1
    });
    // The held message is tried again every 500 ms: an ack sent on that
    // path before (or without) its commit shows up within a few retries.
    let early = common::poll_until(Duration::from_secs(3), || pubacks(&broker, &agent) > 1);
    assert!(
        !early,
        "only the dropped message may be acked while the sync message is uncommitted:\n{}",
        broker.log()
    );
    assert_eq!(pubacks(&broker, &agent), 1);
    agent.kill();
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("ack/held.png")).unwrap(),
        bytes
    );
}

/// Ack after commit, the other side: a kill -9 right after the broker got
/// the PUBACK finds the URL in the queue (before any restart), and the
/// restarted agent caches it.
#[test]
fn a_kill_right_after_the_puback_finds_the_url_queued() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-puback-kill");
    let bytes = jpeg(32, 24, 22);
    // Held: the download cannot finish before the kill.
    http.set("/ack/queued.jpg", Route::Hold(bytes.clone()));
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    let url = http.url("/ack/queued.jpg");
    broker.publish("sync", url.as_bytes(), 1);
    wait_until("the PUBACK", WAIT, || pubacks(&broker, &agent) >= 1);
    agent.kill();
    let (state, _, _) = row(dir.path(), &url).expect("an acked URL is in the queue");
    assert!(
        state == "pending" || state == "retry",
        "{url} is {state} after the kill"
    );
    http.set("/ack/queued.jpg", Route::Ok(bytes.clone()));
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("ack/queued.jpg")).unwrap(),
        bytes
    );
}

/// Ack after a durable commit, seen in the system calls: strace shows the
/// queue's WAL written with the URL, then fsynced, then the PUBACK bytes
/// (`0x40 0x02` and packet id 1) sent on the MQTT socket. A commit without
/// fsync, or an ack sent before the commit, puts them out of order.
#[test]
fn the_commit_with_the_url_is_fsynced_before_the_puback() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-fsync");
    let marker = format!("/fsync/{}/a.png", common::unique());
    http.set(&marker, Route::Hold(png(4, 4, 23)));
    let agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    let trace = dir.path().join("strace.txt");
    let _guard = common::traced_agent(
        &agent.config_path(),
        &trace,
        &[
            "-s",
            "65536",
            "-e",
            "trace=openat,fsync,fdatasync,write,writev,sendto,sendmsg,pwrite64",
        ],
    );
    agent.wait_log("subscribed to", WAIT);
    broker.publish("sync", http.url(&marker).as_bytes(), 1);
    let is_puback = |l: &str| l.contains("\"@\\2\\0\\1\"");
    wait_until("the PUBACK to be traced", WAIT, || {
        common::read_lossy(&trace).lines().any(is_puback)
    });
    let text = common::read_lossy(&trace);
    let lines: Vec<&str> = text.lines().collect();
    let puback = lines.iter().position(|l| is_puback(l)).expect("traced");
    let wal_fd = lines[..puback]
        .iter()
        .rfind(|l| l.contains("openat(") && l.contains("holosync.db-wal\""))
        .and_then(|l| l.rsplit("= ").next())
        .map(|fd| fd.trim().to_string())
        .expect("the WAL was opened before the PUBACK");
    // Pages are traced whole (to find the URL in them): show only their start.
    let excerpt = |ls: &[&str]| -> String {
        ls.iter()
            .map(|l| l.chars().take(160).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let on_wal = |l: &str, calls: &[&str]| {
        calls
            .iter()
            .any(|c| l.contains(&format!("{c}({wal_fd},")) || l.contains(&format!("{c}({wal_fd})")))
    };
    let commit = lines[..puback]
        .iter()
        .rposition(|l| on_wal(l, &["pwrite64", "write"]) && l.contains(&marker))
        .unwrap_or_else(|| {
            panic!(
                "no WAL write holding {marker} before the PUBACK (line {puback}):\n{}",
                excerpt(&lines[puback.saturating_sub(20)..=puback])
            )
        });
    assert!(
        lines[commit..puback]
            .iter()
            .any(|l| on_wal(l, &["fsync", "fdatasync"])),
        "no fsync of the WAL (fd {wal_fd}) between the commit and the PUBACK:\n{}",
        excerpt(&lines[commit..=puback])
    );
}

/// The start-up marker ("this run has not stopped yet") is on the disk
/// before the agent says it is connected: strace shows the queue's WAL
/// written with `running_since`, then fsynced. A kiosk switched off at the
/// mains while idle makes no later commit, so a marker left to the next
/// commit's fsync was lost, and the next start said nothing of the cut.
#[test]
fn the_start_up_marker_is_fsynced_at_once() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("promise-marker");
    let agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    let trace = dir.path().join("strace.txt");
    let _guard = common::traced_agent(
        &agent.config_path(),
        &trace,
        &[
            "-s",
            "65536",
            "-e",
            "trace=openat,fsync,fdatasync,write,pwrite64",
        ],
    );
    agent.wait_log("subscribed to", WAIT);
    let text = common::read_lossy(&trace);
    let lines: Vec<&str> = text.lines().collect();
    let wal_fds: Vec<String> = lines
        .iter()
        .filter(|l| l.contains("openat(") && l.contains("holosync.db-wal\""))
        .filter_map(|l| l.rsplit("= ").next().map(|fd| fd.trim().to_string()))
        .collect();
    let on_wal = |l: &str, calls: &[&str]| {
        wal_fds.iter().any(|fd| {
            calls
                .iter()
                .any(|c| l.contains(&format!("{c}({fd},")) || l.contains(&format!("{c}({fd})")))
        })
    };
    let marker = lines
        .iter()
        .rposition(|l| on_wal(l, &["pwrite64", "write"]) && l.contains("running_since"))
        .unwrap_or_else(|| panic!("no WAL write of the marker:\n{}", common::tail(&text, 3000)));
    assert!(
        lines[marker..]
            .iter()
            .any(|l| on_wal(l, &["fsync", "fdatasync"])),
        "the marker's WAL write is never fsynced:\n{}",
        lines[marker..]
            .iter()
            .map(|l| l.chars().take(160).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Nothing partial is visible: a download stalled after more than half of
/// its body reached the disk leaves no file at the final path, neither while
/// it stalls nor after a kill -9; restarted, the file arrives whole.
#[test]
fn a_kill_mid_body_leaves_nothing_at_the_final_path() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-partial");
    let bytes = jpeg(640, 480, 24);
    assert!(bytes.len() > 100_000, "{}", bytes.len());
    // Half the body, then a pause far beyond the test.
    http.set(
        "/partial/big.jpg",
        Route::Slow(bytes.clone(), Duration::from_secs(300)),
    );
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"timeout_secs": 600, "max_secs": 1200}}),
    );
    broker.publish("sync", http.url("/partial/big.jpg").as_bytes(), 1);
    let final_path = agent.cache().join("partial/big.jpg");
    let half = bytes.len() as u64 / 2;
    let written = |agent: &Agent| -> u64 {
        files_under(&agent.cache())
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .max()
            .unwrap_or(0)
    };
    wait_until("half the body to be on disk", WAIT, || {
        written(&agent) >= half
    });
    assert!(
        !final_path.exists(),
        "a partial file is visible at {}",
        final_path.display()
    );
    assert_eq!(
        temp_files(&agent.cache()).len(),
        1,
        "the part is in one temporary file: {:?}",
        files_under(&agent.cache())
    );
    agent.kill();
    assert!(
        !final_path.exists(),
        "a partial file is visible after a kill"
    );
    http.set("/partial/big.jpg", Route::Ok(bytes.clone()));
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(std::fs::read(&final_path).unwrap(), bytes);
    assert!(temp_files(&agent.cache()).is_empty());
}

/// Nothing outside the cache: URLs whose paths climb out of it (`..`, a
/// backslash, a drive, an empty segment) are failed rows, never requested,
/// though the server would answer each with a valid image; look-alikes that
/// are legal names (`%2e%2e`, `%2f`, `%5c` taken literally) land inside the
/// cache. Nothing appears anywhere else in the agent's folder, which is the
/// cache's parent's parent.
#[test]
fn escaping_urls_write_nothing_outside_the_cache() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-escape");
    let bytes = png(5, 5, 25);
    let escaping = [
        "/../../escape1.png",
        "/a/../../escape2.png",
        "/a/b/../../../../escape3.png",
        "/..\\..\\escape4.png",
        "/a/..\\..\\..\\escape5.png",
        "/C:/escape6.png",
        "//escape7.png",
        "/a//../../escape8.png",
        "/./../escape9.png",
    ];
    let literal = [
        "/%2e%2e/%2e%2e/lit1.png",
        "/..%2f..%2flit2.png",
        "/..%5c..%5clit3.png",
        "/%2E%2E%2F%2E%2E%2Flit4.png",
    ];
    for p in escaping.iter().chain(&literal) {
        http.set(p, Route::Ok(bytes.clone()));
    }
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"cache_dir": "nest/cache", "download": {"interval_ms": 0}}),
    );
    let cache = agent.cache();
    assert_eq!(cache, dir.path().join("nest/cache"));
    let urls: Vec<String> = escaping
        .iter()
        .chain(&literal)
        .map(|p| http.url(p))
        .collect();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(literal.len() as u64, WAIT);
    // The technician's line counts them.
    agent.wait_log(
        &format!(
            "queued {} URLs from sync (0 already queued, {} rejected",
            literal.len(),
            escaping.len()
        ),
        WAIT,
    );
    for p in &escaping {
        let url = http.url(p);
        let (state, attempts, error) = row(dir.path(), &url).expect("a row for every URL");
        assert_eq!(state, "failed", "{url}: {error}");
        assert_eq!(attempts, 0, "{url} was attempted");
        assert!(error.contains("path segment"), "{url}: {error}");
        assert_eq!(http.hits(p), 0, "{url} was requested");
    }
    for p in &literal {
        assert_eq!(
            std::fs::read(cache.join(p.trim_start_matches('/'))).unwrap(),
            bytes,
            "{p}"
        );
    }
    for f in files_under(dir.path()) {
        let rel = f.strip_prefix(dir.path()).unwrap();
        assert!(
            f.starts_with(&cache)
                || ["config.json", "stdout.txt", "stderr.txt"]
                    .iter()
                    .any(|n| rel == Path::new(n))
                || rel.to_string_lossy().starts_with("holosync"),
            "a file outside the cache: {}",
            f.display()
        );
    }
    let parent = dir.path().parent().expect("temp dirs have a parent");
    for n in 1..=9 {
        assert!(!parent.join(format!("escape{n}.png")).exists());
    }
}

/// Bytes unchanged and no query in file names: what the server sent is what
/// is stored, byte for byte (a JPEG with a `!style` suffix, a PNG, a file of
/// no known kind); a query string is not part of the file name (the request
/// still carries it), and the URL with it is one row.
#[test]
fn bytes_are_stored_unchanged_under_a_name_without_the_query() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-bytes");
    let files: [(&str, &str, Vec<u8>); 3] = [
        (
            "/b/photo.jpg!preview",
            "b/photo.jpg!preview",
            jpeg(97, 61, 26),
        ),
        ("/b/q.png?v=3&sig=ab%2Fcd", "b/q.png", png(33, 17, 27)),
        ("/b/data.bin?x=1#frag", "b/data.bin", {
            let mut v: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
            v.extend_from_slice(b"\r\n\0\xff tail");
            v
        }),
    ];
    for (target, _, body) in &files {
        // The server routes by the raw target; a fragment is never sent.
        http.set(target.split('#').next().unwrap(), Route::Ok(body.clone()));
    }
    let agent = agent_with(dir.path(), &broker, json!({}));
    let urls: Vec<String> = files.iter().map(|(t, _, _)| http.url(t)).collect();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    agent.wait_done(files.len() as u64, WAIT);
    for (target, local, body) in &files {
        let path = agent.cache().join(local);
        assert_eq!(
            &std::fs::read(&path).unwrap_or_default(),
            body,
            "{target} -> {}",
            path.display()
        );
        assert_eq!(http.hits(target.split('#').next().unwrap()), 1, "{target}");
    }
    let names: Vec<PathBuf> = files_under(&agent.cache());
    assert_eq!(names.len(), files.len(), "{names:?}");
    for n in &names {
        let s = n.to_string_lossy();
        assert!(
            !s.contains('?') && !s.contains("v=3") && !s.contains('#'),
            "{s}"
        );
    }
}

/// A 404 is permanent: one request, then the row is `failed` with the status
/// code, and it is never asked for again (retries are 100 ms apart here, so a
/// transient failure would be tried again well within the wait).
#[test]
fn a_404_fails_the_url_after_one_attempt() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-404");
    http.set("/gone/x.png", Route::Status(404, b"gone".to_vec()));
    http.set("/gone/after.png", Route::Ok(png(3, 3, 28)));
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "max_attempts": 5,
                            "retry_base_ms": 100, "retry_max_ms": 100}}),
    );
    let url = http.url("/gone/x.png");
    broker.publish("sync", url.as_bytes(), 1);
    let (_, attempts, error) = wait_state(dir.path(), &url, "failed");
    assert_eq!(attempts, 1, "{error}");
    assert!(error.contains("404"), "the error names the status: {error}");
    // Later work is done, and the 404 was still asked for only once.
    broker.publish("sync", http.url("/gone/after.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    // Longer than a transient failure's whole retry schedule (5 x 100 ms).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(http.hits("/gone/x.png"), 1);
    assert_eq!(row(dir.path(), &url).unwrap().0, "failed");
    assert!(!agent.cache().join("gone/x.png").exists());
}

/// A transient failure is tried exactly `download.max_attempts` times: a URL
/// that always answers 500 is asked for three times with `max_attempts: 3`,
/// then the row is `failed` naming the status and the count, and it is
/// never asked for again.
#[test]
fn a_transient_failure_is_tried_exactly_max_attempts_times() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-attempts");
    http.set("/busy/x.png", Route::Status(500, b"busy".to_vec()));
    let _agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "max_attempts": 3,
                            "retry_base_ms": 100, "retry_max_ms": 100}}),
    );
    let url = http.url("/busy/x.png");
    broker.publish("sync", url.as_bytes(), 1);
    let (_, attempts, error) = wait_state(dir.path(), &url, "failed");
    assert_eq!(attempts, 3, "{error}");
    assert!(error.contains("500"), "the error names the status: {error}");
    // A fourth request would come within 100 ms (the retry delay): watch 2 s.
    let more = common::poll_until(Duration::from_secs(2), || http.hits("/busy/x.png") > 3);
    assert!(!more, "asked for {} times", http.hits("/busy/x.png"));
    assert_eq!(http.hits("/busy/x.png"), 3);
}

/// Content-Length is checked: a body that ends (the server closes) before
/// its Content-Length is never cached, even when what came is a complete,
/// valid PNG (only the length can tell) or a file of no known kind. The same
/// bytes with an honest Content-Length are cached, so the route is sound.
#[test]
fn a_body_shorter_than_its_content_length_is_never_cached() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-length");
    let image = png(20, 20, 29);
    let other = b"a text file, complete as far as anyone can tell\n".repeat(50);
    let raw = |body: &[u8], claimed: usize| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {claimed}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        r.extend_from_slice(body);
        Route::Raw(r)
    };
    let cases = [
        ("/len/short.png", raw(&image, image.len() + 1000), false),
        ("/len/short.txt", raw(&other, other.len() + 1), false),
        ("/len/honest.png", raw(&image, image.len()), true),
        ("/len/honest.txt", raw(&other, other.len()), true),
    ];
    for (p, route, _) in &cases {
        http.set(p, route.clone());
    }
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "max_attempts": 2,
                            "retry_base_ms": 100, "retry_max_ms": 100}}),
    );
    let urls: Vec<String> = cases.iter().map(|(p, _, _)| http.url(p)).collect();
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    for (p, _, ok) in &cases {
        let url = http.url(p);
        let want = if *ok { "done" } else { "failed" };
        let (_, _, error) = wait_state(dir.path(), &url, want);
        let path = agent.cache().join(p.trim_start_matches('/'));
        if *ok {
            let body = if p.ends_with(".png") { &image } else { &other };
            assert_eq!(&std::fs::read(&path).unwrap(), body, "{p}");
        } else {
            assert!(!path.exists(), "{p} was cached ({error})");
            assert!(error.contains("Content-Length"), "{p}: {error}");
        }
    }
    assert!(temp_files(&agent.cache()).is_empty());
}

/// No message lost at the size limit: a sync message of exactly
/// `mqtt.max_payload_bytes` is queued and fetched (with the pace at an hour,
/// so only a newly queued row starts a download); one byte more is dropped.
#[test]
fn a_message_at_the_size_limit_is_queued_and_fetched() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-limit");
    let bytes = png(6, 6, 30);
    http.set("/limit/a.png", Route::Ok(bytes.clone()));
    const LIMIT: usize = 3000;
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"mqtt": {"max_payload_bytes": LIMIT},
               "download": {"interval_ms": 3_600_000}}),
    );
    // Empty entries (the padding commas) are skipped without a word.
    let padded = |url: String, len: usize| {
        let mut p = url.into_bytes();
        p.resize(len, b',');
        p
    };
    broker.publish("sync", &padded(http.url("/limit/over.png"), LIMIT + 1), 1);
    agent.wait_log(
        &format!("dropped a sync message on sync of {} bytes", LIMIT + 1),
        WAIT,
    );
    broker.publish("sync", &padded(http.url("/limit/a.png"), LIMIT), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("limit/a.png")).unwrap(),
        bytes
    );
    assert!(row(dir.path(), &http.url("/limit/over.png")).is_none());
}

/// Two different files of `size` bytes: an old version and a new one.
fn two_versions(size: usize) -> (Vec<u8>, Vec<u8>) {
    let old = (0..size).map(|i| (i % 251) as u8).collect();
    let new = (0..size).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    (old, new)
}

/// `body` served with ranges under `etag`, the first answer cut at `at`.
fn cut_once(body: &[u8], etag: &str, at: usize) -> Route {
    Route::Ranged(std::sync::Arc::new(common::Ranged {
        cuts: vec![Some(at as u64)],
        ..common::Ranged::new(body.to_vec(), etag)
    }))
}

/// A raw 206 answer under `etag` holding `part`, bytes `start..` of a
/// `total`-byte file, whatever the request asked for.
fn partial_answer(etag: &str, start: usize, total: usize, part: &[u8]) -> Route {
    let mut raw = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nETag: \"{etag}\"\r\nContent-Range: bytes {start}-{}/{total}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        total - 1,
        part.len()
    )
    .into_bytes();
    raw.extend_from_slice(part);
    Route::Raw(raw)
}

/// An agent that retries a cut download at once and takes files of 20 MB.
fn resuming_agent(dir: &Path, broker: &Mosquitto) -> Agent {
    agent_with(
        dir,
        broker,
        json!({"download": {"interval_ms": 0, "retry_base_ms": 100, "retry_max_ms": 500,
                            "max_attempts": 10, "max_bytes": 67_108_864}}),
    )
}

/// Bytes unchanged across a resume: a download cut half-way is resumed, and
/// the server answers the resume with a 206 that does not continue it (it
/// starts at byte 0, of a new version sent under the old ETag). The kept part
/// and that answer must never be spliced: the agent starts over and stores
/// the new version whole. The file is of no known kind, so only the range
/// check can tell.
#[test]
fn a_resume_answered_with_another_range_is_never_spliced() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-splice");
    let size = 20_000_000usize;
    let (old, new) = two_versions(size);
    http.set(
        "/splice/film.bin",
        Route::Sequence(vec![
            cut_once(&old, "v1", size / 2),
            partial_answer("v1", 0, size, &new),
            Route::Ranged(std::sync::Arc::new(common::Ranged::new(new.clone(), "v2"))),
        ]),
    );
    let agent = resuming_agent(dir.path(), &broker);
    broker.publish("sync", http.url("/splice/film.bin").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    let got = std::fs::read(agent.cache().join("splice/film.bin")).unwrap();
    assert!(
        got == new,
        "{} bytes stored, not the new version",
        got.len()
    );
    let heads = http.request_headers("/splice/film.bin");
    assert!(
        heads.len() >= 3
            && heads[1]
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("range") && !v.starts_with("bytes=0-")),
        "the second request resumed: {heads:?}"
    );
}

/// A resume splices only the same version: a cut download of an unchanged
/// file goes on from where it stopped (the kept part read back in several
/// steps, and only the rest sent again); a server that ignores If-Range and
/// answers the resume with the right range of a *different* version (another
/// ETag) gets the whole new file asked for, never half of each.
#[test]
fn a_resume_splices_only_the_same_version() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("promise-same");
    // Over two of the agent's 4 MiB read-back steps before the cut.
    let size = 12_000_000usize;
    let cut = 9_000_000usize;
    let (old, new) = two_versions(size);
    http.set("/same/film.bin", cut_once(&old, "v1", cut));
    http.set(
        "/other/film.bin",
        Route::Sequence(vec![
            cut_once(&old, "v1", cut),
            partial_answer("v2", cut, size, &new[cut..]),
            Route::Ranged(std::sync::Arc::new(common::Ranged::new(new.clone(), "v2"))),
        ]),
    );
    let agent = resuming_agent(dir.path(), &broker);
    broker.publish("sync", http.url("/same/film.bin").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    let got = std::fs::read(agent.cache().join("same/film.bin")).unwrap();
    assert!(got == old, "{} bytes stored, not the file", got.len());
    let sent = http.sent("/same/film.bin");
    assert!(
        sent <= size as u64 * 11 / 10,
        "{sent} bytes sent for a {size}-byte file cut once: the resume started over"
    );
    broker.publish("sync", http.url("/other/film.bin").as_bytes(), 1);
    agent.wait_done(2, WAIT);
    let got = std::fs::read(agent.cache().join("other/film.bin")).unwrap();
    assert!(
        got == new,
        "{} bytes stored, {} of them from the old version",
        got.len(),
        got.iter().zip(&old).take_while(|(a, b)| a == b).count()
    );
    // The case above is the one meant: the resume asked for exactly the rest.
    let heads = http.request_headers("/other/film.bin");
    let range = |i: usize| {
        heads.get(i).and_then(|h| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("range"))
                .map(|(_, v)| v.clone())
        })
    };
    assert_eq!(
        range(1).as_deref(),
        Some(format!("bytes={cut}-").as_str()),
        "{heads:?}"
    );
    assert_eq!(range(2), None, "the third request is for the whole file");
}
