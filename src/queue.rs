//! The durable queue: one SQLite row per URL and the state changes it goes
//! through. Every statement is parameterised.
//!
//! ```text
//! enqueue ─> pending ──ok──> done ──synced again──> pending
//!              │ └─permanent─> failed ──synced again──> pending
//!              └─transient─> retry (attempts, next_attempt) ─> ... ─> failed
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Context, Error, Result};
use crate::message::Entry;

/// How long a technician's command (`status`, `enqueue`) waits for a lock
/// held by another process before giving up.
const CLI_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the agent waits for a lock held by another process (a
/// technician's `sqlite3` shell, `holosync enqueue`). Short, because the loop
/// must not block: a commit that cannot get the lock is simply tried again on
/// a later turn (a sync message stays unacknowledged meanwhile).
pub const AGENT_BUSY_TIMEOUT: Duration = Duration::from_millis(250);

/// Queue meta key holding the running agent's start time; emptied by a
/// clean stop, so a start that finds it set knows the last run ended
/// abruptly (and checks the database's pages).
pub const RUNNING_KEY: &str = "running_since";

/// When opening runs SQLite's `quick_check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Never (a technician's command, tests).
    Never,
    /// When the last run did not stop cleanly (or never ran).
    AfterAnUncleanEnd,
}

/// Meta key holding how the last `update` or `set-config` ended (JSON).
pub const LAST_UPDATE_KEY: &str = "last_update";

/// Milliseconds since the Unix epoch: the queue's clock (it survives
/// restarts; `clamp_schedule` keeps rows on time when it jumps).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (
    id            INTEGER PRIMARY KEY,
    url           TEXT NOT NULL UNIQUE,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'retry', 'done', 'failed')),
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  INTEGER NOT NULL,
    last_error    TEXT,
    updated       INTEGER NOT NULL,
    etag          TEXT,
    last_modified TEXT,
    partial       INTEGER NOT NULL DEFAULT 0,
    size          INTEGER,
    queued        INTEGER
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (next_attempt, id)
    WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS queue_state ON queue (state, updated);
CREATE INDEX IF NOT EXISTS queue_waiting ON queue (COALESCE(queued, updated))
    WHERE state IN ('pending', 'retry');
CREATE INDEX IF NOT EXISTS queue_done_size ON queue (size) WHERE state = 'done';
CREATE INDEX IF NOT EXISTS queue_partial ON queue (id) WHERE partial > 0;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const QUEUE_COLUMNS: &[&str] = &[
    "id",
    "url",
    "state",
    "attempts",
    "next_attempt",
    "last_error",
    "updated",
    "etag",
    "last_modified",
    "partial",
    "size",
    "queued",
];

/// Columns added since the first release, with their definitions: an older
/// queue gets them (`ALTER TABLE ... ADD COLUMN`) when it is opened.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("etag", "TEXT"),
    ("last_modified", "TEXT"),
    ("partial", "INTEGER NOT NULL DEFAULT 0"),
    ("size", "INTEGER"),
    ("queued", "INTEGER"),
];
const META_COLUMNS: &[&str] = &["key", "value"];

/// Why a database could not be set up.
enum InitError {
    /// SQLite said no.
    Sqlite(rusqlite::Error),
    /// It is SQLite, but not a healthy holosync queue.
    Foreign(String),
}

impl From<rusqlite::Error> for InitError {
    fn from(e: rusqlite::Error) -> Self {
        InitError::Sqlite(e)
    }
}

/// Why a database could not be opened, split by whether moving it aside helps.
enum Unusable {
    /// Corrupt, not a database, or another program's: move aside, start fresh.
    Broken(String),
    /// Anything else (permissions, locks, I/O): report, do not touch the file.
    Other(Error),
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// Renames the database (and its WAL and shared-memory files) to
/// `<name>.corrupt-<UTC time>`; returns the new name of the database.
fn move_aside(path: &Path) -> Result<PathBuf> {
    let stamp = crate::logger::utc_timestamp(std::time::SystemTime::now()).replace([':', '.'], "-");
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let aside = with(&format!(".corrupt-{stamp}"));
    std::fs::rename(path, &aside).context(|| {
        format!(
            "could not move unusable queue database {} aside",
            path.display()
        )
    })?;
    for side in ["-wal", "-shm"] {
        let from = with(side);
        if from.exists() {
            let _ = std::fs::rename(&from, with(&format!(".corrupt-{stamp}{side}")));
        }
    }
    Ok(aside)
}

/// The queue database.
pub struct Queue {
    /// The SQLite connection (WAL mode).
    conn: Connection,
}

/// One URL to download now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Job {
    /// Row id.
    pub id: i64,
    /// The URL as queued.
    pub url: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// What the server said of the file: of the partial download if there is
    /// one, else of the file in the cache.
    pub validators: Validators,
    /// Bytes of an interrupted download kept (synced) in its temporary file.
    pub partial: u64,
    /// Size of the file in the cache, when the row was done before.
    pub size: Option<u64>,
}

/// A server's validators for one version of a file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Validators {
    /// `ETag`, as sent (quotes and any `W/` included).
    pub etag: Option<String>,
    /// `Last-Modified`, as sent.
    pub last_modified: Option<String>,
}

/// What the queue says of the kiosk, for `holosync status` and the fleet's
/// status topic (one definition: `status --json` prints this struct, fields
/// in this order; the agent adds the free space).
#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub struct Status {
    /// Queued, never tried.
    pub pending: u64,
    /// Failed transiently, waiting for the next attempt.
    pub retry: u64,
    /// In the cache.
    pub done: u64,
    /// Given up on.
    pub failed: u64,
    /// The last failures, newest first: failed rows, then retry rows.
    pub failures: Vec<FailureRow>,
    /// How long the longest-waiting pending or retry row has been queued, in seconds.
    pub oldest_pending_secs: Option<u64>,
    /// Files in the cache (done rows).
    pub cache_files: u64,
    /// Their bytes.
    pub cache_bytes: u64,
    /// Free bytes on the cache's disk (filled in by the caller).
    pub cache_free_bytes: Option<u64>,
    /// When the last sync message was queued (UTC).
    pub last_sync: Option<String>,
    /// The download that finished last.
    pub last_download: Option<LastDownload>,
    /// How the last `update` or `set-config` ended (confirmed, or rolled
    /// back and why), as its answer on `events` said.
    pub last_update: Option<serde_json::Value>,
}

/// The download that finished last, for the status.
#[derive(Debug, Default, PartialEq, serde::Serialize)]
pub struct LastDownload {
    /// The URL.
    pub url: String,
    /// Its state now: done, retry or failed.
    pub state: String,
    /// When (UTC).
    pub at: String,
}

/// A row that failed, for `holosync status`.
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct FailureRow {
    /// The URL.
    pub url: String,
    /// Current state: failed or retry.
    pub state: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: String,
}

/// What `enqueue` did with one message's URLs.
#[derive(Debug, Default, PartialEq)]
pub struct Enqueued {
    /// New rows, or done/failed rows put back to pending.
    pub queued: usize,
    /// Already pending or retrying: left as they are.
    pub duplicates: usize,
    /// Rejected at once (their local path would be unsafe): stored as failed.
    pub rejected: usize,
}

impl Queue {
    /// Opens (creating if needed) the queue database at `path`, for a
    /// technician's command (waits up to 10 s for another process's lock).
    pub fn open(path: &Path) -> Result<Queue> {
        Queue::open_with(path, CLI_BUSY_TIMEOUT)
    }

    fn open_with(path: &Path, busy: Duration) -> Result<Queue> {
        match Queue::try_open(path, busy, Check::Never) {
            Ok(q) => Ok(q),
            Err(Unusable::Broken(why)) => Err(Error::msg(format!(
                "queue database {} is not usable: {why}",
                path.display()
            ))),
            Err(Unusable::Other(e)) => Err(e),
        }
    }

    /// Opens the queue for the agent. A database that is corrupt, not SQLite,
    /// or another program's is moved aside as `<name>.corrupt-<time>` and a
    /// fresh queue is started: a kiosk must keep running. Other errors
    /// (permissions, a lock held too long) are returned, never "repaired".
    pub fn open_or_recover(path: &Path) -> Result<Queue> {
        match Queue::try_open(path, AGENT_BUSY_TIMEOUT, Check::AfterAnUncleanEnd) {
            Ok(q) => Ok(q),
            Err(Unusable::Other(e)) => Err(e),
            Err(Unusable::Broken(why)) => {
                let aside = move_aside(path)?;
                log::error!(
                    "queue database {} is unusable ({why}); moved it to {} and started an empty queue. \
                     URLs queued before are not in the new queue: sync them again if needed",
                    path.display(),
                    aside.display()
                );
                Queue::open_with(path, AGENT_BUSY_TIMEOUT)
            }
        }
    }

    fn try_open(path: &Path, busy: Duration, check: Check) -> Result<Queue, Unusable> {
        let conn = Connection::open(path)
            .context(|| format!("could not open queue database {}", path.display()))
            .map_err(Unusable::Other)?;
        Queue::init(conn, busy, check).map_err(|e| match e {
            InitError::Sqlite(e) if is_corruption(&e) => Unusable::Broken(e.to_string()),
            InitError::Sqlite(e) => Unusable::Other(Error::new(
                format!("could not set up queue database {}", path.display()),
                e,
            )),
            InitError::Foreign(why) => Unusable::Broken(why),
        })
    }

    /// An in-memory queue, for tests.
    pub fn in_memory() -> Queue {
        let conn = Connection::open_in_memory().expect("in-memory SQLite always opens");
        match Queue::init(conn, CLI_BUSY_TIMEOUT, Check::Never) {
            Ok(q) => q,
            Err(_) => unreachable!("the schema applies to an empty database"),
        }
    }

    fn init(conn: Connection, busy: Duration, check: Check) -> Result<Queue, InitError> {
        conn.busy_timeout(busy)?;
        // WAL: readers (`holosync status`) never block the agent. NORMAL keeps
        // commits durable across a process crash, fsyncing only at
        // checkpoints: enough for download results (a result lost to a power
        // cut only means a download is done again). `enqueue`, whose commit
        // comes before an ack, switches to FULL for its commit.
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL;")?;
        for (table, want) in [("queue", QUEUE_COLUMNS), ("meta", META_COLUMNS)] {
            let mut s = conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
            let have: Vec<String> = s
                .query_map([table], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            // An older holosync queue has a prefix of today's columns.
            let older = table == "queue"
                && have.len() >= want.len() - ADDED_COLUMNS.len()
                && want.starts_with(&have.iter().map(String::as_str).collect::<Vec<_>>());
            if !have.is_empty() && have != want && !older {
                return Err(InitError::Foreign(format!(
                    "its `{table}` table has columns {have:?}: it belongs to another program"
                )));
            }
            if older && have.len() < want.len() {
                for (name, definition) in
                    &ADDED_COLUMNS[ADDED_COLUMNS.len() - (want.len() - have.len())..]
                {
                    conn.execute_batch(&format!(
                        "ALTER TABLE queue ADD COLUMN {name} {definition}"
                    ))?;
                }
            }
        }
        conn.execute_batch(SCHEMA)?;
        // quick_check reads every page (about 1.5 s for a million rows on a
        // kiosk): run it where a power cut or crash may have torn pages, not
        // after a clean stop, and never for a technician's command.
        let unclean = || -> rusqlite::Result<bool> {
            let marker: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [RUNNING_KEY],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(marker.is_none_or(|m| !m.is_empty()))
        };
        if check == Check::AfterAnUncleanEnd && unclean()? {
            let result: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if result != "ok" {
                return Err(InitError::Foreign(format!(
                    "integrity check failed: {result}"
                )));
            }
        }
        Ok(Queue { conn })
    }

    /// Commits one message's URLs in one transaction. New URLs and URLs that
    /// were done or failed become pending; pending or retrying ones are left
    /// alone (redelivery is harmless). Entries with a rejection reason are
    /// stored as failed with that reason.
    ///
    /// The commit is durable on disk (fsynced) before this returns, even
    /// against a power cut, because the caller acknowledges the message next.
    /// It also puts back on time rows that a clock jump left waiting (see
    /// [`Queue::clamp_schedule`]), so syncing a stranded URL again frees it.
    pub fn enqueue(
        &mut self,
        entries: &[Entry],
        now_ms: i64,
        max_delay_ms: u64,
    ) -> Result<Enqueued> {
        self.conn
            .execute_batch("PRAGMA synchronous = FULL;")
            .context(|| "could not make the queue commit durable")?;
        let result = self.enqueue_durably(entries, now_ms, max_delay_ms);
        // NORMAL again for everything else; the next FULL commit syncs it all.
        let _ = self.conn.execute_batch("PRAGMA synchronous = NORMAL;");
        result
    }

    fn enqueue_durably(
        &mut self,
        entries: &[Entry],
        now_ms: i64,
        max_delay_ms: u64,
    ) -> Result<Enqueued> {
        let tx = self
            .conn
            .transaction()
            .context(|| "could not start a queue transaction")?;
        clamp(&tx, now_ms, max_delay_ms).context(|| "could not reschedule the queue")?;
        let mut out = Enqueued::default();
        {
            let mut ok = tx
                .prepare_cached(
                    "INSERT INTO queue (url, state, attempts, next_attempt, updated, queued)
                     VALUES (?1, 'pending', 0, ?2, ?2, ?2)
                     ON CONFLICT (url) DO UPDATE SET
                         state = 'pending', attempts = 0, next_attempt = excluded.next_attempt,
                         last_error = NULL, updated = excluded.updated, queued = excluded.queued
                     WHERE state IN ('done', 'failed')",
                )
                .context(|| "could not prepare the enqueue statement")?;
            let mut bad = tx
                .prepare_cached(
                    "INSERT INTO queue (url, state, attempts, next_attempt, last_error, updated)
                     VALUES (?1, 'failed', 0, ?2, ?3, ?2)
                     ON CONFLICT (url) DO UPDATE SET
                         state = 'failed', last_error = excluded.last_error, updated = excluded.updated",
                )
                .context(|| "could not prepare the enqueue statement")?;
            for Entry { url, rejected } in entries {
                match rejected {
                    None => {
                        let changed = ok
                            .execute(params![url, now_ms])
                            .context(|| format!("could not queue {url}"))?;
                        if changed == 1 {
                            out.queued += 1;
                        } else {
                            out.duplicates += 1;
                        }
                    }
                    Some(reason) => {
                        bad.execute(params![url, now_ms, reason])
                            .context(|| format!("could not record rejected URL {url}"))?;
                        out.rejected += 1;
                    }
                }
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('last_sync_ms', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [now_ms.to_string()],
        )
        .context(|| "could not note the sync time")?;
        tx.commit().context(|| "could not commit queued URLs")?;
        Ok(out)
    }

    /// Puts rows a backward clock jump left waiting back on time: no pending
    /// or retry row waits longer than `max_delay_ms` past `now_ms`, whatever
    /// the clock did. Pending rows stamped in the future are due now; retry
    /// rows scheduled from the future keep their delay (capped), counted from
    /// now. Returns how many rows moved.
    pub fn clamp_schedule(&self, now_ms: i64, max_delay_ms: u64) -> Result<usize> {
        clamp(&self.conn, now_ms, max_delay_ms).context(|| "could not reschedule the queue")
    }

    /// The row to download now, oldest due first, or None.
    pub fn next_due(&self, now_ms: i64) -> Result<Option<Job>> {
        self.next_due_except(now_ms, None)
    }

    /// Like [`Queue::next_due`], leaving out the row `busy` (a download still
    /// being finished: its row is not done yet, but it must not start twice).
    pub fn next_due_except(&self, now_ms: i64, busy: Option<i64>) -> Result<Option<Job>> {
        self.conn
            .prepare_cached(
                // The due index gives the order: without INDEXED BY, SQLite
                // took the state index and sorted every waiting row per call
                // (0.37 s with a million rows).
                "SELECT id, url, attempts, etag, last_modified, partial, size FROM queue
                 INDEXED BY queue_due
                 WHERE state IN ('pending', 'retry') AND next_attempt <= ?1
                   AND (?2 IS NULL OR id != ?2)
                 ORDER BY next_attempt, id LIMIT 1",
            )
            .and_then(|mut s| s.query_row(params![now_ms, busy], job_from_row).optional())
            .context(|| "could not read the queue")
    }

    /// Rows whose interrupted download is kept in a temporary file (pending
    /// or retry, with partial bytes): their temp files survive the start-up sweep.
    pub fn partial_downloads(&self) -> Result<Vec<Job>> {
        let read = || -> rusqlite::Result<Vec<Job>> {
            let mut s = self.conn.prepare(
                "SELECT id, url, attempts, etag, last_modified, partial, size FROM queue
                 INDEXED BY queue_partial WHERE partial > 0 AND state IN ('pending', 'retry')",
            )?;
            let rows = s.query_map([], job_from_row)?;
            rows.collect()
        };
        read().context(|| "could not read the queue")
    }

    /// Records how far an interrupted download got (synced bytes in its
    /// temporary file) and the validators those bytes belong to.
    pub fn set_partial(&self, job: &Job, partial: u64, v: &Validators) -> Result<()> {
        self.update(
            "UPDATE queue SET partial = ?2, etag = ?3, last_modified = ?4 WHERE id = ?1",
            params![job.id, partial as i64, v.etag, v.last_modified],
            &job.url,
        )
    }

    /// When the next pending or retry row becomes due, if there is one.
    pub fn next_due_time(&self) -> Result<Option<i64>> {
        self.conn
            .query_row(
                // The due index's first entry (the state index would scan).
                "SELECT MIN(next_attempt) FROM queue INDEXED BY queue_due
                 WHERE state IN ('pending', 'retry')",
                [],
                |r| r.get(0),
            )
            .context(|| "could not read the queue")
    }

    /// The download succeeded (or the server said the file in place is
    /// current): `size` bytes are in place, of the version `v` names.
    pub fn mark_done(&self, job: &Job, size: u64, v: &Validators, now_ms: i64) -> Result<()> {
        self.update(
            "UPDATE queue SET state = 'done', attempts = ?2, last_error = NULL, updated = ?3,
                 partial = 0, size = ?4, etag = ?5, last_modified = ?6
             WHERE id = ?1",
            params![
                job.id,
                job.attempts + 1,
                now_ms,
                size as i64,
                v.etag,
                v.last_modified
            ],
            &job.url,
        )
    }

    /// Gives up on the URL, keeping the reason (and forgetting any partial download).
    pub fn mark_failed(&self, job: &Job, error: &str, now_ms: i64) -> Result<()> {
        self.update(
            "UPDATE queue SET state = 'failed', attempts = ?2, last_error = ?3, updated = ?4,
                 partial = 0
             WHERE id = ?1",
            params![job.id, job.attempts + 1, error, now_ms],
            &job.url,
        )
    }

    /// Schedules another attempt at `next_ms`.
    pub fn mark_retry(&self, job: &Job, error: &str, next_ms: i64, now_ms: i64) -> Result<()> {
        self.update(
            "UPDATE queue SET state = 'retry', attempts = ?2, last_error = ?3,
                 next_attempt = ?4, updated = ?5
             WHERE id = ?1",
            params![job.id, job.attempts + 1, error, next_ms, now_ms],
            &job.url,
        )
    }

    fn update(&self, sql: &str, params: impl rusqlite::Params, url: &str) -> Result<()> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params))
            .map(drop)
            .context(|| format!("could not update the queue row of {url}"))
    }

    /// Counts per state, the last `limit` failures and the rest of [`Status`]
    /// (all from the queue; URLs and errors cut to a few hundred characters,
    /// so a status message stays small).
    pub fn status(&self, limit: usize) -> Result<Status> {
        self.status_at(limit, unix_ms())
    }

    fn status_at(&self, limit: usize, now_ms: i64) -> Result<Status> {
        let read = || -> rusqlite::Result<Status> {
            let mut st = Status::default();
            let mut s = self
                .conn
                .prepare("SELECT state, COUNT(*) FROM queue GROUP BY state")?;
            let mut rows = s.query([])?;
            while let Some(r) = rows.next()? {
                let n: u64 = r.get(1)?;
                match r.get_ref(0)?.as_str()? {
                    "pending" => st.pending = n,
                    "retry" => st.retry = n,
                    "done" => st.done = n,
                    _ => st.failed = n,
                }
            }
            // Failed first, then retrying, newest first: each by the state
            // index backwards (one query over both sorted every such row).
            let mut s = self.conn.prepare(
                "SELECT url, state, attempts, COALESCE(last_error, '') FROM queue
                 WHERE state = ?1 ORDER BY updated DESC, id DESC LIMIT ?2",
            )?;
            for state in ["failed", "retry"] {
                let left = limit.saturating_sub(st.failures.len());
                let rows = s.query_map(params![state, left as i64], |r| {
                    Ok(FailureRow {
                        url: r.get(0)?,
                        state: r.get(1)?,
                        attempts: r.get(2)?,
                        error: r.get(3)?,
                    })
                })?;
                for row in rows {
                    st.failures.push(row?);
                }
            }
            for f in &mut st.failures {
                cut(&mut f.url);
                cut(&mut f.error);
            }
            let oldest: Option<i64> = self.conn.query_row(
                "SELECT MIN(COALESCE(queued, updated)) FROM queue INDEXED BY queue_waiting
                 WHERE state IN ('pending', 'retry')",
                [],
                |r| r.get(0),
            )?;
            st.oldest_pending_secs =
                oldest.map(|t| (now_ms.saturating_sub(t).max(0) / 1000) as u64);
            let (files, bytes): (i64, i64) = self.conn.query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue INDEXED BY queue_done_size
                 WHERE state = 'done'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            (st.cache_files, st.cache_bytes) = (files.max(0) as u64, bytes.max(0) as u64);
            let stamp = |ms: i64| {
                crate::logger::utc_timestamp(
                    std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
                )
            };
            let last_sync: Option<String> = self
                .conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'last_sync_ms'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            st.last_sync = last_sync.and_then(|v| v.parse().ok()).map(stamp);
            let last_update: Option<String> = self
                .conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [LAST_UPDATE_KEY],
                    |r| r.get(0),
                )
                .optional()?;
            st.last_update = last_update.and_then(|v| serde_json::from_str(&v).ok());
            // The newest of each state's newest (by the state index backwards).
            let mut s = self.conn.prepare(
                "SELECT url, state, updated, id FROM queue WHERE state = ?1 AND attempts > 0
                 ORDER BY updated DESC, id DESC LIMIT 1",
            )?;
            let mut newest: Option<(i64, i64, String, String)> = None;
            for state in ["done", "retry", "failed"] {
                let row = s
                    .query_row([state], |r| {
                        Ok((
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get(0)?,
                            r.get(1)?,
                        ))
                    })
                    .optional()?;
                if let Some(row) = row {
                    if newest.as_ref().is_none_or(|n| (row.0, row.1) > (n.0, n.1)) {
                        newest = Some(row);
                    }
                }
            }
            st.last_download = newest.map(|(at, _, url, state)| LastDownload {
                url,
                state,
                at: stamp(at),
            });
            Ok(st)
        };
        read().context(|| "could not read the queue status")
    }

    /// Puts failed rows back to pending (all, or those of `urls`); returns
    /// how many. Durable, like [`Queue::enqueue`] (an ack follows).
    pub fn retry_failed(&mut self, urls: Option<&[String]>, now_ms: i64) -> Result<usize> {
        // `+state`: look the row up by its URL (the unique index), never scan
        // every failed row once per named URL through the state index.
        let sql = "UPDATE queue SET state = 'pending', attempts = 0, next_attempt = ?1,
                       last_error = NULL, updated = ?1, queued = ?1
                   WHERE url = ?2 AND +state = 'failed'";
        self.durably(|tx| match urls {
            None => tx.execute(
                "UPDATE queue SET state = 'pending', attempts = 0, next_attempt = ?1,
                     last_error = NULL, updated = ?1, queued = ?1
                 WHERE state = 'failed'",
                params![now_ms],
            ),
            Some(urls) => {
                let mut s = tx.prepare_cached(sql)?;
                urls.iter()
                    .try_fold(0, |n, u| Ok(n + s.execute(params![now_ms, u])?))
            }
        })
        .context(|| "could not put failed URLs back in the queue")
    }

    /// Puts at most `limit` failed rows back to pending (oldest failures
    /// first); returns how many. Durable. Called until it returns less than
    /// `limit`, it does what `retry_failed(None, ..)` does in bounded steps.
    pub fn retry_failed_some(&mut self, limit: usize, now_ms: i64) -> Result<usize> {
        self.durably(|tx| {
            tx.execute(
                "UPDATE queue SET state = 'pending', attempts = 0, next_attempt = ?1,
                     last_error = NULL, updated = ?1, queued = ?1
                 WHERE id IN (SELECT id FROM queue WHERE state = 'failed'
                              ORDER BY updated LIMIT ?2)",
                params![now_ms, limit as i64],
            )
        })
        .context(|| "could not put failed URLs back in the queue")
    }

    /// Removes the rows of `urls` (their files stay); returns how many. Durable.
    pub fn forget(&mut self, urls: &[String]) -> Result<usize> {
        self.durably(|tx| {
            let mut s = tx.prepare_cached("DELETE FROM queue WHERE url = ?1")?;
            urls.iter().try_fold(0, |n, u| Ok(n + s.execute([u])?))
        })
        .context(|| "could not forget URLs")
    }

    /// Done rows after row `after_id`, at most `limit`, in id order: id, URL
    /// and the size of its file (if known). A caller pages through them, so
    /// no read takes long or holds every row.
    pub fn done_files(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String, Option<u64>)>> {
        let read = || -> rusqlite::Result<Vec<(i64, String, Option<u64>)>> {
            // By the rowid, not the state index: the state index would find
            // every done row and sort them for each page.
            let mut s = self.conn.prepare_cached(
                "SELECT id, url, size FROM queue NOT INDEXED
                 WHERE id > ?1 AND state = 'done' ORDER BY id LIMIT ?2",
            )?;
            let rows = s.query_map(params![after_id, limit as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get::<_, Option<i64>>(2)?.map(|n| n.max(0) as u64),
                ))
            })?;
            rows.collect()
        };
        read().context(|| "could not read the queue")
    }

    /// Puts done rows whose file is missing or changed back to pending
    /// (without validators: the file must be fetched whole); returns how
    /// many. Durable.
    pub fn requeue(&mut self, ids: &[i64], now_ms: i64) -> Result<usize> {
        self.durably(|tx| {
            ids.iter().try_fold(0, |n, id| {
                Ok(n + tx.execute(
                    "UPDATE queue SET state = 'pending', attempts = 0, next_attempt = ?2,
                         last_error = NULL, updated = ?2, queued = ?2, etag = NULL,
                         last_modified = NULL, size = NULL, partial = 0
                     WHERE id = ?1 AND state = 'done'",
                    params![id, now_ms],
                )?)
            })
        })
        .context(|| "could not queue missing files again")
    }

    /// Runs `f` in one transaction committed with `synchronous = FULL`.
    fn durably<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.conn.execute_batch("PRAGMA synchronous = FULL;")?;
        let result = (|| {
            let tx = self.conn.transaction()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })();
        let _ = self.conn.execute_batch("PRAGMA synchronous = NORMAL;");
        result
    }

    /// A value kept across restarts (the generated client id).
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .context(|| format!("could not read {key} from the queue database"))
    }

    /// Stores a value kept across restarts.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(drop)
            .context(|| format!("could not store {key} in the queue database"))
    }

    /// Like [`Queue::set_meta`], committed with `synchronous = FULL`: on the
    /// disk before this returns (the start-up marker must survive a power
    /// cut while the kiosk is idle, when no other commit follows it).
    pub fn set_meta_durably(&mut self, key: &str, value: &str) -> Result<()> {
        self.durably(|tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
        })
        .map(drop)
        .context(|| format!("could not store {key} in the queue database"))
    }
}

/// Longest URL or error text in a status, in characters.
const MAX_STATUS_TEXT: usize = 300;

/// Cuts `s` to [`MAX_STATUS_TEXT`] characters, marking the cut.
fn cut(s: &mut String) {
    if let Some((i, _)) = s.char_indices().nth(MAX_STATUS_TEXT) {
        s.truncate(i);
        s.push_str("...");
    }
}

/// A [`Job`] from `id, url, attempts, etag, last_modified, partial, size`.
fn job_from_row(r: &rusqlite::Row) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        url: r.get(1)?,
        attempts: r.get(2)?,
        validators: Validators {
            etag: r.get(3)?,
            last_modified: r.get(4)?,
        },
        partial: r.get::<_, i64>(5)?.max(0) as u64,
        size: r.get::<_, Option<i64>>(6)?.map(|n| n.max(0) as u64),
    })
}

/// See [`Queue::clamp_schedule`].
fn clamp(conn: &Connection, now_ms: i64, max_delay_ms: u64) -> rusqlite::Result<usize> {
    let max = i64::try_from(max_delay_ms).unwrap_or(i64::MAX / 4);
    // Rows due later are found by the due index (a range on next_attempt),
    // not by scanning every waiting row through the state index.
    let pending = conn.execute(
        "UPDATE queue SET next_attempt = ?1, updated = MIN(updated, ?1)
         WHERE id IN (SELECT id FROM queue INDEXED BY queue_due
                      WHERE state IN ('pending', 'retry') AND next_attempt > ?1)
           AND state = 'pending'",
        params![now_ms],
    )?;
    let future = conn.execute(
        "UPDATE queue SET next_attempt = ?1 + MIN(MAX(next_attempt - updated, 0), ?2), updated = ?1
         WHERE state = 'retry' AND updated > ?1",
        params![now_ms, max],
    )?;
    let far = conn.execute(
        "UPDATE queue SET next_attempt = ?1 + ?2
         WHERE id IN (SELECT id FROM queue INDEXED BY queue_due
                      WHERE state IN ('pending', 'retry') AND next_attempt > ?1 + ?2)
           AND state = 'retry'",
        params![now_ms, max],
    )?;
    Ok(pending + future + far)
}

/// Delay before attempt `attempts + 1`, after `attempts` failures: base,
/// doubling, capped; a server's Retry-After wins when longer (still capped).
pub fn retry_delay(
    attempts: u32,
    base_ms: u64,
    max_ms: u64,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = attempts.saturating_sub(1).min(40);
    let backoff = base_ms.saturating_mul(1u64 << exp).min(max_ms);
    let server = retry_after.map_or(0, |d| d.as_millis() as u64).min(max_ms);
    Duration::from_millis(backoff.max(server))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 3_600_000;

    fn ok(urls: &[&str]) -> Vec<Entry> {
        urls.iter()
            .map(|u| Entry {
                url: u.to_string(),
                rejected: None,
            })
            .collect()
    }

    fn urls(q: &Queue) -> Vec<(String, String)> {
        let mut s = q
            .conn
            .prepare("SELECT url, state FROM queue ORDER BY id")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn enqueue_deduplicates_by_url() {
        let mut q = Queue::in_memory();
        let r = q
            .enqueue(&ok(&["http://h/a.jpg", "http://h/a.jpg"]), 1, MAX)
            .unwrap();
        assert_eq!(
            r,
            Enqueued {
                queued: 1,
                duplicates: 1,
                rejected: 0
            }
        );
        assert_eq!(q.status(20).unwrap().pending, 1);
    }

    #[test]
    fn quotes_and_semicolons_are_stored_verbatim() {
        let mut q = Queue::in_memory();
        let url = "http://h/it's'; DROP TABLE queue; --.jpg";
        q.enqueue(&ok(&[url]), 1, MAX).unwrap();
        assert_eq!(q.next_due(1).unwrap().unwrap().url, url);
    }

    #[test]
    fn oldest_due_first_and_retry_waits_its_turn() {
        let mut q = Queue::in_memory();
        q.enqueue(&ok(&["http://h/1", "http://h/2"]), 10, MAX)
            .unwrap();
        let first = q.next_due(10).unwrap().unwrap();
        assert_eq!(first.url, "http://h/1");
        q.mark_retry(&first, "HTTP 500", 1000, 10).unwrap();
        // The failing URL does not block the next one.
        assert_eq!(q.next_due(10).unwrap().unwrap().url, "http://h/2");
        let second = q.next_due(10).unwrap().unwrap();
        q.mark_done(&second, 5, &Validators::default(), 11).unwrap();
        assert_eq!(q.next_due(500).unwrap(), None);
        assert_eq!(q.next_due_time().unwrap(), Some(1000));
        let again = q.next_due(1000).unwrap().unwrap();
        assert_eq!((again.url.as_str(), again.attempts), ("http://h/1", 1));
    }

    #[test]
    fn a_row_being_finished_is_not_started_twice() {
        let mut q = Queue::in_memory();
        q.enqueue(&ok(&["http://h/1", "http://h/2"]), 10, MAX)
            .unwrap();
        let first = q.next_due(10).unwrap().unwrap();
        let next = q.next_due_except(10, Some(first.id)).unwrap().unwrap();
        assert_eq!(next.url, "http://h/2");
        q.mark_done(&next, 1, &Validators::default(), 11).unwrap();
        assert_eq!(q.next_due_except(10, Some(first.id)).unwrap(), None);
    }

    #[test]
    fn synced_again_after_done_or_failed_goes_back_to_pending() {
        let mut q = Queue::in_memory();
        q.enqueue(&ok(&["http://h/a", "http://h/b"]), 1, MAX)
            .unwrap();
        let a = q.next_due(1).unwrap().unwrap();
        q.mark_done(&a, 5, &Validators::default(), 2).unwrap();
        let b = q.next_due(2).unwrap().unwrap();
        q.mark_failed(&b, "HTTP 404", 3).unwrap();
        let r = q
            .enqueue(&ok(&["http://h/a", "http://h/b"]), 4, MAX)
            .unwrap();
        assert_eq!(r.queued, 2);
        let st = q.status(20).unwrap();
        assert_eq!((st.pending, st.done, st.failed), (2, 0, 0));
    }

    #[test]
    fn rejected_entries_are_failed_with_their_reason() {
        let mut q = Queue::in_memory();
        let bad = Entry {
            url: "http://h/../x".into(),
            rejected: Some("path segment \"..\" would leave its folder".into()),
        };
        q.enqueue(&[bad], 1, MAX).unwrap();
        let st = q.status(20).unwrap();
        assert_eq!(st.failed, 1);
        assert_eq!(st.failures[0].url, "http://h/../x");
        assert!(st.failures[0].error.contains("leave"));
        assert_eq!(q.next_due(i64::MAX).unwrap(), None);
        assert_eq!(urls(&q).len(), 1);
    }

    #[test]
    fn status_lists_failures_newest_first() {
        let mut q = Queue::in_memory();
        q.enqueue(&ok(&["http://h/1", "http://h/2"]), 1, MAX)
            .unwrap();
        let j1 = q.next_due(1).unwrap().unwrap();
        q.mark_failed(&j1, "HTTP 404", 5).unwrap();
        let j2 = q.next_due(1).unwrap().unwrap();
        q.mark_failed(&j2, "HTTP 410", 6).unwrap();
        let st = q.status(1).unwrap();
        assert_eq!(st.failed, 2);
        assert_eq!(st.failures.len(), 1);
        assert_eq!(st.failures[0].url, "http://h/2");
        assert_eq!(st.failures[0].attempts, 1);
    }

    #[test]
    fn meta_values_persist() {
        let q = Queue::in_memory();
        assert_eq!(q.meta("client_id").unwrap(), None);
        q.set_meta("client_id", "holosync-x-1").unwrap();
        assert_eq!(
            q.meta("client_id").unwrap().as_deref(),
            Some("holosync-x-1")
        );
    }

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let d = |n, ra| retry_delay(n, 1000, 10_000, ra).as_millis();
        assert_eq!(d(1, None), 1000);
        assert_eq!(d(2, None), 2000);
        assert_eq!(d(4, None), 8000);
        assert_eq!(d(5, None), 10_000);
        assert_eq!(d(60, None), 10_000);
        assert_eq!(d(1, Some(Duration::from_secs(5))), 5000);
        assert_eq!(d(1, Some(Duration::from_secs(500))), 10_000);
    }
}
