//! Verification against public image corpora (tests/corpora, see its
//! README.md and LICENSES/): every file's verdict must match the manifest,
//! which records what viewers (Pillow, djpeg, libpng) do with it.
//!
//! Two tests: `verify_agrees_with_the_manifest` calls `verify::verify` on
//! every file (fast; a failure names the files), and
//! `agent_syncs_every_corpus_file_as_the_manifest_expects` runs the real
//! binary over all of them, served from 127.0.0.1, through a real mosquitto.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{agent_with, poll_until, HttpServer, Mosquitto, Route, TempDir};
use holosync::verify;
use serde_json::json;

/// What the manifest expects of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// A viewer shows it fully: it must be accepted.
    Valid,
    /// Torn, cut short or corrupt: it must be refused.
    Broken,
    /// References disagree (or not PNG/JPEG): not scored.
    Either,
}

/// One manifest row.
struct Entry {
    /// The corpus folder.
    corpus: String,
    /// The file's path inside it.
    path: String,
    /// The expected verdict.
    expected: Expected,
    /// Why, as the manifest says.
    why: String,
}

impl Entry {
    fn file(&self) -> PathBuf {
        corpora().join(&self.corpus).join(&self.path)
    }
}

fn corpora() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpora")
}

/// Splits one CSV line (fields may be double-quoted, `""` inside quotes).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().expect("one field").push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

fn manifest() -> Vec<Entry> {
    let text = std::fs::read_to_string(corpora().join("manifest.csv")).expect("read manifest.csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("corpus,path,expected,why"));
    lines
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f = csv_fields(line);
            assert_eq!(f.len(), 4, "manifest line {line:?}");
            let expected = match f[2].as_str() {
                "valid" => Expected::Valid,
                "broken" => Expected::Broken,
                "either" => Expected::Either,
                other => panic!("manifest verdict {other:?} in {line:?}"),
            };
            Entry {
                corpus: f[0].clone(),
                path: f[1].clone(),
                expected,
                why: f[3].clone(),
            }
        })
        .collect()
}

/// Per corpus: files, valid accepted, broken refused, either, and the misses.
#[derive(Default)]
struct Counts {
    files: usize,
    valid: usize,
    valid_accepted: usize,
    broken: usize,
    broken_refused: usize,
    either: usize,
    either_accepted: usize,
}

/// Prints the per-corpus table; returns the totals.
fn print_table(title: &str, counts: &BTreeMap<String, Counts>) {
    println!("{title}");
    println!("| corpus | files | valid accepted | broken refused | either (accepted) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut total = Counts::default();
    for (corpus, c) in counts {
        println!(
            "| {corpus} | {} | {} / {} | {} / {} | {} ({}) |",
            c.files,
            c.valid_accepted,
            c.valid,
            c.broken_refused,
            c.broken,
            c.either,
            c.either_accepted
        );
        total.files += c.files;
        total.valid += c.valid;
        total.valid_accepted += c.valid_accepted;
        total.broken += c.broken;
        total.broken_refused += c.broken_refused;
        total.either += c.either;
        total.either_accepted += c.either_accepted;
    }
    println!(
        "| all | {} | {} / {} | {} / {} | {} ({}) |",
        total.files,
        total.valid_accepted,
        total.valid,
        total.broken_refused,
        total.broken,
        total.either,
        total.either_accepted
    );
}

/// Scores one verdict; returns a line for a false refusal or acceptance.
fn score(counts: &mut Counts, entry: &Entry, accepted: bool, detail: &str) -> Option<String> {
    counts.files += 1;
    match entry.expected {
        Expected::Valid => {
            counts.valid += 1;
            counts.valid_accepted += usize::from(accepted);
            (!accepted).then(|| {
                format!(
                    "false refusal: {}/{} ({}): {detail}",
                    entry.corpus, entry.path, entry.why
                )
            })
        }
        Expected::Broken => {
            counts.broken += 1;
            counts.broken_refused += usize::from(!accepted);
            accepted.then(|| {
                format!(
                    "false acceptance: {}/{} ({}): {detail}",
                    entry.corpus, entry.path, entry.why
                )
            })
        }
        Expected::Either => {
            counts.either += 1;
            counts.either_accepted += usize::from(accepted);
            None
        }
    }
}

/// The URL path a corpus file is served under: its path, with characters
/// holosync refuses in a file name (the `#` of `issue#430.png`) escaped.
fn url_path(entry: &Entry) -> String {
    let escaped: String = format!("{}/{}", entry.corpus, entry.path)
        .chars()
        .map(|c| match c {
            '#' => "%23".to_owned(),
            c => c.to_string(),
        })
        .collect();
    format!("/corpora/{escaped}")
}

/// Feeds `bytes` to a [`verify::Verifier`] `chunk` bytes at a time, with a
/// deadline already past at every step (so every step pauses as early as it
/// may), and returns its verdict and the most steps any one prefix needed.
fn verify_in_slices(
    bytes: &[u8],
    url: &str,
    chunk: usize,
) -> (Result<verify::Kind, String>, usize) {
    let mut verifier = verify::Verifier::new(url, None);
    let mut len = 0;
    let mut most_steps = 0;
    loop {
        len = (len + chunk).min(bytes.len());
        let complete = len == bytes.len();
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000_000, "no progress on {url}");
            match verifier.step(&bytes[..len], complete, Instant::now()) {
                verify::Progress::Done(result) => return (result, most_steps.max(steps)),
                verify::Progress::Paused => {}
                verify::Progress::NeedMore => {
                    assert!(!complete, "NeedMore on a complete body: {url}");
                    break;
                }
            }
        }
        most_steps = most_steps.max(steps);
    }
}

/// The incremental verifier, fed in slices of several sizes and paused at
/// every chance, reaches the same verdict as `verify::verify` on every file.
#[test]
fn verifier_in_slices_agrees_with_verify() {
    let deadline = Instant::now() + Duration::from_secs(600);
    for entry in manifest() {
        let bytes = std::fs::read(entry.file()).expect("read corpus file");
        let url = format!("http://127.0.0.1{}", url_path(&entry));
        let whole = verify::verify(&bytes, &url, None);
        for chunk in [1, 7, 4096] {
            if chunk == 1 && bytes.len() > 64 << 10 {
                continue; // byte by byte is quadratic in steps; small files suffice
            }
            let (sliced, _) = verify_in_slices(&bytes, &url, chunk);
            assert_eq!(
                sliced, whole,
                "{}/{} fed {chunk} bytes at a time",
                entry.corpus, entry.path
            );
        }
        assert!(
            Instant::now() < deadline,
            "slicing the corpora took over 10 minutes"
        );
    }
}

/// `verify::verify` on every file, as the agent calls it (with the URL the
/// end-to-end test serves it under and no Content-Type).
#[test]
fn verify_agrees_with_the_manifest() {
    let entries = manifest();
    assert!(entries.len() > 400, "{} manifest rows", entries.len());
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    let mut misses = Vec::new();
    for entry in &entries {
        let bytes = std::fs::read(entry.file()).expect("read corpus file");
        let url = format!("http://127.0.0.1{}", url_path(entry));
        let verdict = verify::verify(&bytes, &url, None);
        let detail = match &verdict {
            Ok(kind) => format!("accepted as {kind}"),
            Err(e) => format!("refused: {e}"),
        };
        let c = counts.entry(entry.corpus.clone()).or_default();
        if let Some(miss) = score(c, entry, verdict.is_ok(), &detail) {
            misses.push(miss);
        }
        if std::env::var_os("CORPUS_VERBOSE").is_some() {
            println!(
                "{:?} {}/{}: {detail}",
                entry.expected, entry.corpus, entry.path
            );
        }
    }
    print_table("verify::verify over the corpora", &counts);
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses.join("\n")
    );
}

/// Rows of the agent's queue: URL -> (state, last error).
fn queue_rows(dir: &Path) -> BTreeMap<String, (String, String)> {
    let db = rusqlite::Connection::open(dir.join("holosync.db")).expect("open queue database");
    let mut stmt = db
        .prepare("SELECT url, state, COALESCE(last_error, '') FROM queue")
        .expect("prepare queue query");
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
        .expect("query queue");
    rows.map(|r| r.expect("queue row")).collect()
}

/// The real binary syncs every corpus file from a 127.0.0.1 HTTP server
/// (one sync message per corpus, through a real mosquitto): no valid file
/// ends `failed`, no broken file ends `done`, a `done` file is stored byte
/// for byte and a `failed` one not at all.
#[test]
fn agent_syncs_every_corpus_file_as_the_manifest_expects() {
    // Generous: CI is a busy 2-core machine; a drain takes a few seconds.
    const SETTLE: Duration = Duration::from_secs(300);
    let entries = manifest();
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("corpus");
    let mut urls = BTreeMap::new();
    for entry in &entries {
        let bytes = std::fs::read(entry.file()).expect("read corpus file");
        let path = url_path(entry);
        http.set(&path, Route::Ok(bytes));
        urls.insert(http.url(&path), entry);
    }
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"interval_ms": 0, "max_attempts": 2}}),
    );
    let mut by_corpus: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (url, entry) in &urls {
        by_corpus.entry(&entry.corpus).or_default().push(url);
    }
    for list in by_corpus.values() {
        broker.publish("sync", list.join(",").as_bytes(), 1);
    }
    // Settled: every URL is queued and none is pending or retrying.
    let mut rows = BTreeMap::new();
    let settled = poll_until(SETTLE, || {
        rows = if dir.path().join("holosync.db").exists() {
            queue_rows(dir.path())
        } else {
            BTreeMap::new()
        };
        rows.len() == urls.len()
            && rows
                .values()
                .all(|(state, _)| state == "done" || state == "failed")
    });
    assert!(
        settled,
        "not settled after {SETTLE:?}: {} of {} rows, states {:?}\n{}",
        rows.len(),
        urls.len(),
        rows.values().fold(BTreeMap::new(), |mut m, (s, _)| {
            *m.entry(s.clone()).or_insert(0) += 1;
            m
        }),
        agent.diagnostics()
    );
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    let mut misses = Vec::new();
    for (url, entry) in &urls {
        let (state, error) = &rows[url];
        let accepted = state == "done";
        let local = agent.cache().join(url_path(entry).trim_start_matches('/'));
        if accepted {
            let stored = std::fs::read(&local).unwrap_or_default();
            let sent = std::fs::read(entry.file()).expect("read corpus file");
            assert!(
                stored == sent,
                "{} is not stored byte for byte",
                local.display()
            );
        } else {
            assert!(
                !local.exists(),
                "refused file was stored: {}",
                local.display()
            );
        }
        let detail = if accepted {
            "done".to_owned()
        } else {
            format!("failed: {error}")
        };
        let c = counts.entry(entry.corpus.clone()).or_default();
        if let Some(miss) = score(c, entry, accepted, &detail) {
            misses.push(miss);
        }
    }
    print_table(
        "the agent over the corpora (state done = accepted)",
        &counts,
    );
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses.join("\n")
    );
}
