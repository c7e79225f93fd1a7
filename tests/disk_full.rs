//! Full disks: the cache's disk and the log's disk, each on its own small
//! tmpfs. Mounting needs root (CI runs as root); without it the tests fail,
//! or print `skipped: needs root for mount` with `HOLOSYNC_ALLOW_SKIP=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    agent_with, files_under, jpeg, png, run_bounded, wait_until, Agent, HttpServer, Mosquitto,
    Ranged, Route, TempDir,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// A tmpfs mounted for one test; lazily unmounted on drop, even on panic.
struct Tmpfs {
    /// The mount point.
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: `4m`, `64k`) at `path`
    /// (created if needed). When this process may not mount: a failure, or
    /// None with `HOLOSYNC_ALLOW_SKIP=1` (see `common::cannot_run`); any
    /// other failure panics.
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("create mount point");
        let out = match Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                common::cannot_run(&format!("needs root for mount (cannot run mount: {e})"));
                return None;
            }
        };
        if out.status.success() {
            return Some(Tmpfs {
                path: path.to_owned(),
            });
        }
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        if !is_root()
            || err.contains("permission denied")
            || err.contains("not permitted")
            || err.contains("must be superuser")
        {
            let why = err.split_whitespace().collect::<Vec<_>>().join(" ");
            common::cannot_run(&format!("needs root for mount ({why})"));
            return None;
        }
        panic!("mount tmpfs at {} failed: {err}", path.display());
    }

    /// Changes the size of the mounted tmpfs.
    fn resize(&self, size: &str) {
        let mut cmd = Command::new("mount");
        cmd.args(["-o", &format!("remount,size={size}")])
            .arg(&self.path);
        let out = run_bounded(cmd, None, WAIT);
        assert!(
            out.status.success(),
            "remount {}: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    /// `umount -l`: detaches even while the agent still holds files open.
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Whether the effective user is root (from /proc; no libc needed).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Milliseconds since the Unix epoch (the queue's clock).
fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Row counts (pending, retry, done, failed) in the queue database.
fn counts(db: &Path) -> (u64, u64, u64, u64) {
    let conn = rusqlite::Connection::open(db).expect("open queue db");
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let n = |state: &str| -> u64 {
        conn.query_row(
            "SELECT COUNT(*) FROM queue WHERE state = ?1",
            [state],
            |r| r.get(0),
        )
        .unwrap()
    };
    (n("pending"), n("retry"), n("done"), n("failed"))
}

/// Waits until at least `n` rows are done, failing at once (with the log
/// tail) if the agent exits meanwhile.
fn wait_done(agent: &mut Agent, db: &Path, n: u64) {
    wait_until(&format!("{n} URLs done"), WAIT, || {
        assert!(
            agent.is_running(),
            "the agent exited\n{}",
            agent.diagnostics()
        );
        counts(db).2 >= n
    });
}

/// Lists the cache at a moment when the agent cannot be writing: every
/// pending or retry row is due at least 400 ms from now (a row being
/// downloaded is still due in the past, so none is in flight), so a temporary
/// file seen then was left behind, not one in the middle of its write.
fn list_cache_while_idle(db: &Path, cache: &Path) -> Vec<PathBuf> {
    let mut listing = None;
    wait_until("a moment with no download due or in flight", WAIT, || {
        let conn = rusqlite::Connection::open(db).expect("open queue db");
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let next: Option<i64> = conn
            .query_row(
                "SELECT MIN(next_attempt) FROM queue WHERE state IN ('pending', 'retry')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if next.is_some_and(|at| at > unix_ms() + 400) {
            listing = Some(files_under(cache));
            true
        } else {
            false
        }
    });
    listing.expect("listed")
}

/// Temporary files under `cache`.
fn temp_files(files: &[PathBuf]) -> Vec<&PathBuf> {
    files
        .iter()
        .filter(|p| p.to_string_lossy().contains(".holosync-tmp-"))
        .collect()
}

/// `Received PUBACK from <client id>` lines in the broker's log: the agent's
/// acknowledgements of QoS 1 messages.
fn pubacks(broker: &Mosquitto, client_id: &str) -> usize {
    broker
        .log()
        .matches(&format!("Received PUBACK from {client_id} "))
        .count()
}

/// The cache on a 4 MiB tmpfs, 30 JPEGs of about 300 KB queued: the ones
/// that do not fit fail as transient with a "no space" log line, no partial or
/// temporary file is left, the agent keeps running and keeps acknowledging
/// sync messages (a small one sent meanwhile is queued and PUBACKed); once the
/// disk has room again every file arrives byte-identical.
#[test]
fn full_cache_disk_is_transient_and_recovers_when_space_returns() {
    let dir = TempDir::new("diskfull-cache");
    let cache = dir.path().join("images");
    let Some(tmpfs) = Tmpfs::mount(&cache, "4m") else {
        return;
    };
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let big: Vec<(String, Vec<u8>)> = (0..30u32)
        .map(|i| (format!("/big/{i:02}.jpg"), jpeg(800, 600, 100 + i)))
        .collect();
    let total: usize = big.iter().map(|(_, b)| b.len()).sum();
    assert!(
        total > 2 * 4 * 1024 * 1024 && big.iter().all(|(_, b)| b.len() > 250_000),
        "the JPEGs must be about 300 KB each and overflow 4 MiB twice: {total} bytes"
    );
    let small: Vec<(String, Vec<u8>)> = (0..3u32)
        .map(|i| (format!("/small/{i}.png"), png(8, 8, 200 + i)))
        .collect();
    // Every other big file without a Content-Length (a JPEG shows it is
    // whole): the disk fills while it is written. The rest say their length,
    // so one that cannot fit is refused before its body.
    for (i, (path, bytes)) in big.iter().enumerate() {
        if i % 2 == 0 {
            http.set(path, Route::Ok(bytes.clone()));
        } else {
            let mut raw =
                b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n"
                    .to_vec();
            raw.extend_from_slice(bytes);
            http.set(path, Route::Raw(raw));
        }
    }
    for (path, bytes) in &small {
        http.set(path, Route::Ok(bytes.clone()));
    }
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "timeout_secs": 3, "max_attempts": 1000,
                            "retry_base_ms": 500, "retry_max_ms": 3000}}),
    );
    let db = dir.path().join("holosync.db");
    let client_id = agent.config()["mqtt"]["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let cache_prefix = "no space left on the cache disk";

    let payload: Vec<String> = big.iter().map(|(p, _)| http.url(p)).collect();
    broker.publish("sync", payload.join(",").as_bytes(), 1);
    let log = agent.wait_log(cache_prefix, WAIT);
    let line = log
        .lines()
        .find(|l| l.contains(cache_prefix))
        .unwrap()
        .to_string();
    assert!(
        line.contains("WARN")
            && line.contains("download of")
            && line.contains("next try in")
            && line.contains(&cache.display().to_string()),
        "a full disk is a transient failure: {line}"
    );
    // Both ways a disk is found full: while a file without a length is
    // written, and by the Content-Length before a body is read.
    wait_until(
        "both kinds of no-space failure, several times",
        WAIT,
        || {
            let log = agent.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(cache_prefix)).collect();
            lines.len() >= 4
                && lines.iter().any(|l| l.contains("No space left on device"))
                && lines.iter().any(|l| l.contains("(not downloaded)"))
        },
    );
    assert!(agent.is_running(), "{}", agent.diagnostics());
    let (_, retry, done, failed) = counts(&db);
    assert_eq!(failed, 0, "no URL may fail for good on a full disk");
    assert!(retry > 0 && done < 30, "retry {retry}, done {done}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let error: String = conn
        .query_row(
            "SELECT last_error FROM queue WHERE state = 'retry' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert!(error.contains("no space left"), "{error}");

    // Nothing partial: every file in the cache is complete, and no temp file.
    let files = list_cache_while_idle(&db, &cache);
    assert!(
        temp_files(&files).is_empty(),
        "temporary files left on the full disk: {files:?}"
    );
    for f in &files {
        let rel = f.strip_prefix(&cache).unwrap().to_string_lossy();
        let want = big
            .iter()
            .find(|(p, _)| p.trim_start_matches('/') == rel)
            .unwrap_or_else(|| panic!("unexpected file {}", f.display()));
        assert_eq!(
            &std::fs::read(f).unwrap(),
            &want.1,
            "{} is partial",
            f.display()
        );
    }

    // MQTT still works: a small message is queued and acknowledged.
    let acks_before = pubacks(&broker, &client_id);
    let payload: Vec<String> = small.iter().map(|(p, _)| http.url(p)).collect();
    broker.publish("sync-single-work", payload.join(",").as_bytes(), 1);
    agent.wait_log("queued 3 URLs from sync-single-work", WAIT);
    wait_until("the broker to get the agent's PUBACK", WAIT, || {
        pubacks(&broker, &client_id) > acks_before
    });
    assert!(agent.is_running(), "{}", agent.diagnostics());
    assert_eq!(counts(&db).3, 0, "nothing failed for good");

    // Room again: everything arrives.
    tmpfs.resize("64m");
    wait_done(&mut agent, &db, 33);
    assert_eq!(counts(&db), (0, 0, 33, 0));
    for (path, bytes) in big.iter().chain(&small) {
        let local = cache.join(path.trim_start_matches('/'));
        assert_eq!(
            &std::fs::read(&local).unwrap(),
            bytes,
            "{}",
            local.display()
        );
    }
    let files = files_under(&cache);
    assert!(temp_files(&files).is_empty(), "{files:?}");
    assert_eq!(files.len(), 33, "{files:?}");
    assert!(agent.is_running(), "{}", agent.diagnostics());
}

/// A file whose Content-Length already says it cannot fit on the cache's
/// disk (8 MB against 1 MiB) is refused after its head, each time it is
/// tried: its body is not downloaded (the server, sending at 2 MB/s, gets
/// to send a small part of one megabyte over three attempts, where the old
/// agent read at least the disk's size each time until the write failed),
/// no temporary file is made, and the reason names both sizes.
#[test]
fn a_file_that_cannot_fit_is_refused_before_its_body() {
    let dir = TempDir::new("diskfull-length");
    let cache = dir.path().join("images");
    let Some(_tmpfs) = Tmpfs::mount(&cache, "1m") else {
        return;
    };
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let big = jpeg(2600, 2000, 7);
    let big: Vec<u8> = big.iter().copied().cycle().take(8_000_000).collect();
    // Counted by the server as it sends; no validators, so no resume.
    http.set(
        "/huge.jpg",
        Route::Ranged(std::sync::Arc::new(Ranged {
            body: big,
            rate: Some(2_000_000),
            ..Ranged::default()
        })),
    );
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "max_attempts": 1000,
                            "retry_base_ms": 200, "retry_max_ms": 400}}),
    );
    broker.publish("sync", http.url("/huge.jpg").as_bytes(), 1);
    let prefix = "no space left on the cache disk";
    wait_until("three refusals", WAIT, || {
        assert!(agent.is_running(), "{}", agent.diagnostics());
        agent.log().matches(prefix).count() >= 3
    });
    let sent = http.sent("/huge.jpg");
    assert!(
        sent < 1_000_000,
        "{sent} body bytes sent over three attempts for a file that cannot fit"
    );
    let log = agent.log();
    let line = log.lines().find(|l| l.contains(prefix)).unwrap();
    assert!(
        line.contains("8000000 bytes") && line.contains("(not downloaded)"),
        "the reason names the length and says nothing was downloaded: {line}"
    );
    assert!(
        temp_files(&files_under(&cache)).is_empty() && files_under(&cache).is_empty(),
        "{:?}",
        files_under(&cache)
    );
    assert!(agent.is_running(), "{}", agent.diagnostics());
}

/// The log on a 64 KiB tmpfs at debug level: once the log's disk is full the
/// agent keeps running and caching files (log lines are dropped, not fatal),
/// also across a restart with the disk still full, and the log resumes when
/// the disk has room again.
#[test]
fn full_log_disk_does_not_stop_the_agent() {
    let dir = TempDir::new("diskfull-log");
    let logfs = dir.path().join("logfs");
    let Some(tmpfs) = Tmpfs::mount(&logfs, "64k") else {
        return;
    };
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let log_path = logfs.join("holosync.log");
    let mut files = Vec::new();
    for i in 0..1200u32 {
        let path = format!("/activity/{:02}/{i:04}.png", i / 100);
        let bytes = png(4 + i % 5, 4 + i % 3, i);
        http.set(&path, Route::Ok(bytes.clone()));
        files.push((path, bytes));
    }
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0},
               "log": {"file": log_path.to_str().unwrap(), "level": "debug",
                       "max_bytes": 1_048_576, "keep": 1}}),
    );
    let db = dir.path().join("holosync.db");
    let log_len = || std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let publish = |range: std::ops::Range<usize>| {
        let urls: Vec<String> = files[range].iter().map(|(p, _)| http.url(p)).collect();
        broker.publish("sync", urls.join(",").as_bytes(), 1);
    };

    // Fill the log's disk with activity: each cached file logs a line.
    let mut sent = 0;
    while log_len() < 64 * 1024 {
        assert!(
            sent < 800,
            "800 downloads did not fill 64 KiB of log ({} bytes)",
            log_len()
        );
        publish(sent..sent + 100);
        sent += 100;
        wait_done(&mut agent, &db, sent as u64);
    }
    assert_eq!(log_len(), 64 * 1024, "the log's disk is exactly full");
    assert!(agent.is_running(), "{}", agent.diagnostics());

    // Still caching with the log's disk full.
    let full = log_len();
    publish(sent..sent + 100);
    sent += 100;
    wait_done(&mut agent, &db, sent as u64);
    assert!(agent.is_running(), "{}", agent.diagnostics());
    assert_eq!(log_len(), full);

    // A restart with the log's disk still full works too.
    agent.kill();
    agent.start();
    publish(sent..sent + 100);
    sent += 100;
    wait_done(&mut agent, &db, sent as u64);
    assert!(agent.is_running(), "{}", agent.diagnostics());
    assert_eq!(counts(&db), (0, 0, sent as u64, 0));
    for (path, bytes) in &files[..sent] {
        let local = agent.cache().join(path.trim_start_matches('/'));
        assert_eq!(
            &std::fs::read(&local).unwrap(),
            bytes,
            "{}",
            local.display()
        );
    }

    // Room again: the log picks up where it stopped.
    tmpfs.resize("1m");
    publish(sent..sent + 1);
    agent.wait_log("queued 1 URLs from sync", WAIT);
    wait_done(&mut agent, &db, sent as u64 + 1);
    assert!(agent.is_running(), "{}", agent.diagnostics());
    // The line cut by the full disk is ended: every later line starts with its timestamp.
    let log = agent.log();
    let resumed = log.find("queued 1 URLs from sync").unwrap();
    let line_start = log[..resumed].rfind('\n').map_or(0, |i| i + 1);
    assert!(
        log[line_start..].starts_with("20"),
        "a log line was glued onto a cut one: {:?}",
        &log[line_start..resumed + 30]
    );
}
