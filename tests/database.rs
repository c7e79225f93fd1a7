//! End-to-end tests of database trouble: a corrupt, empty or foreign queue
//! file at start-up, and a database locked by another process for a while.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{png, Agent, HttpServer, Mosquitto, Route, TempDir};

const WAIT: Duration = Duration::from_secs(30);

/// Starts an agent over whatever `holosync.db` the test left in `dir` and
/// checks it still caches a file from a fresh sync message.
fn agent_still_syncs(dir: &Path, broker: &Mosquitto, http: &HttpServer) -> Agent {
    let mut agent = Agent::new(dir, Agent::default_config(broker.port));
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let bytes = png(6, 6, 42);
    http.set("/db/after.png", Route::Ok(bytes.clone()));
    broker.publish("sync", http.url("/db/after.png").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("db/after.png")).unwrap(),
        bytes
    );
    agent
}

fn moved_aside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("holosync.db.corrupt-"))
        .collect()
}

/// Garbage bytes where the database should be: moved aside, loudly logged,
/// and the agent runs on with a fresh queue.
#[test]
fn garbage_database_is_moved_aside_and_the_agent_runs() {
    let (broker, http, dir) = (
        Mosquitto::start(),
        HttpServer::start(),
        TempDir::new("db-garbage"),
    );
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(dir.path().join("holosync.db"), &garbage).unwrap();
    let agent = agent_still_syncs(dir.path(), &broker, &http);
    let aside = moved_aside(dir.path());
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(dir.path().join(&aside[0])).unwrap(), garbage);
    let log = agent.log();
    assert!(
        log.contains("ERROR") && log.contains("is unusable"),
        "{log}"
    );
}

/// A zero-length file is a valid empty SQLite database: used as is.
#[test]
fn empty_database_file_is_used_as_a_fresh_queue() {
    let (broker, http, dir) = (
        Mosquitto::start(),
        HttpServer::start(),
        TempDir::new("db-empty"),
    );
    std::fs::write(dir.path().join("holosync.db"), b"").unwrap();
    agent_still_syncs(dir.path(), &broker, &http);
    assert!(moved_aside(dir.path()).is_empty());
}

/// Another program's SQLite file (a `queue` table of another shape) is not
/// written into: moved aside, fresh queue.
#[test]
fn another_programs_database_is_moved_aside() {
    foreign_queue_is_moved_aside(
        "db-foreign",
        "CREATE TABLE queue (job TEXT, owner TEXT); INSERT INTO queue VALUES ('x', 'y');",
    );
}

/// Writes a database made by `schema`, starts the agent on it: it is moved
/// aside as another program's, and the agent syncs with a fresh queue.
fn foreign_queue_is_moved_aside(name: &str, schema: &str) {
    let (broker, http, dir) = (Mosquitto::start(), HttpServer::start(), TempDir::new(name));
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch(schema).unwrap();
    drop(db);
    let agent = agent_still_syncs(dir.path(), &broker, &http);
    assert_eq!(moved_aside(dir.path()).len(), 1, "{}", agent.log());
    assert!(
        agent.log().contains("belongs to another program"),
        "{}",
        agent.log()
    );
}

/// A technician's shell holds the database locked for a few seconds: the
/// agent keeps the message unacknowledged (its loop never waits long for a
/// lock), tries again, and commits it once the lock is gone.
#[test]
fn database_locked_for_a_few_seconds_delays_but_loses_nothing() {
    let (broker, http, dir) = (
        Mosquitto::start(),
        HttpServer::start(),
        TempDir::new("db-locked"),
    );
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let bytes = png(5, 5, 7);
    http.set("/db/locked.png", Route::Ok(bytes.clone()));
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    broker.publish("sync", http.url("/db/locked.png").as_bytes(), 1);
    // Hold the lock while the message arrives and a few retries fail.
    agent.wait_log("kept unacknowledged, will retry", WAIT);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        http.hits("/db/locked.png"),
        0,
        "nothing can be queued while locked"
    );
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("db/locked.png")).unwrap(),
        bytes
    );
    let log = agent.log();
    assert_eq!(
        log.matches("could not commit").count(),
        1,
        "a held message is logged once, not on every retry:\n{log}"
    );
}

/// A queue written by the first release (seven columns, no resume or
/// revalidation data) is upgraded in place: its rows stay, pending ones are
/// fetched, nothing is moved aside.
#[test]
fn a_first_release_queue_is_upgraded_in_place() {
    let (broker, http, dir) = (
        Mosquitto::start(),
        HttpServer::start(),
        TempDir::new("db-upgrade"),
    );
    let bytes = png(7, 7, 43);
    http.set("/db/old.png", Route::Ok(bytes.clone()));
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE queue (
             id INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE,
             state TEXT NOT NULL CHECK (state IN ('pending', 'retry', 'done', 'failed')),
             attempts INTEGER NOT NULL DEFAULT 0, next_attempt INTEGER NOT NULL,
             last_error TEXT, updated INTEGER NOT NULL);
         CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )
    .unwrap();
    db.execute(
        "INSERT INTO queue (url, state, attempts, next_attempt, updated) VALUES (?1, 'pending', 0, 0, 0)",
        [http.url("/db/old.png")],
    )
    .unwrap();
    drop(db);
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    let newer = png(6, 6, 44);
    http.set("/db/new.png", Route::Ok(newer.clone()));
    broker.publish("sync", http.url("/db/new.png").as_bytes(), 1);
    agent.wait_done(2, WAIT);
    for (name, want) in [("db/old.png", &bytes), ("db/new.png", &newer)] {
        assert_eq!(&std::fs::read(agent.cache().join(name)).unwrap(), want);
    }
    assert!(moved_aside(dir.path()).is_empty());
}

/// A `queue` table whose columns are only the first two of holosync's
/// (`id`, `url`) is another program's too: older holosync queues have at
/// least the first release's seven, so it is moved aside, not "upgraded".
#[test]
fn a_queue_table_shorter_than_the_first_releases_is_another_programs() {
    foreign_queue_is_moved_aside(
        "db-prefix",
        "CREATE TABLE queue (id INTEGER, url TEXT); INSERT INTO queue VALUES (1, 'x');",
    );
}

/// A queue another process holds locked when the agent starts (a
/// technician's shell with an exclusive lock, a backup tool) is not taken
/// for a broken one: the agent says it cannot set up the queue and exits (it
/// is started again), nothing is moved aside, and once the lock is gone the
/// URL queued before is fetched.
#[test]
fn a_queue_locked_at_start_up_is_never_moved_aside() {
    let (broker, http, dir) = (
        Mosquitto::start(),
        HttpServer::start(),
        TempDir::new("db-locked-start"),
    );
    let mut agent = Agent::new(dir.path(), Agent::default_config(broker.port));
    let bytes = png(5, 5, 9);
    http.set("/db/kept.png", Route::Ok(bytes.clone()));
    let out = agent.run(&["enqueue", &http.url("/db/kept.png")]);
    assert!(out.status.success(), "{out:?}");
    // Exclusive locking mode: the lock outlives the write and keeps every
    // other connection out, readers too (no shared WAL index).
    let db = rusqlite::Connection::open(dir.path().join("holosync.db")).unwrap();
    db.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
        .unwrap();
    agent.start();
    let status = agent.wait_exit(WAIT);
    assert!(
        !status.success(),
        "the agent ran on a queue it could not open"
    );
    assert!(
        agent.stderr().contains("could not set up queue database")
            || agent.log().contains("could not set up queue database"),
        "{}",
        agent.diagnostics()
    );
    assert_eq!(moved_aside(dir.path()), Vec::<String>::new());
    drop(db);
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("db/kept.png")).unwrap(),
        bytes
    );
}
