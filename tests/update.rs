//! End-to-end tests of the signed self-update and of `set-config`, with the
//! real binary copied into a kiosk folder (the swap renames files next to
//! it), a real mosquitto and the HTTP fixture server serving the new
//! version. The newer version is the same source built with another
//! version in its Cargo.toml (built once, into a folder of the target
//! directory). A version that exits or hangs at start is a shell script.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{
    command_for, exe_under_test, merge, png, poll_until, processes_under, under_wine, Agent,
    HttpServer, Mosquitto, Ranged, Route, Subscriber, TempDir,
};
use serde_json::{json, Value};

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(90);

/// The version the newer build says it is.
const NEWER: &str = "0.9.0";

/// The version of the binary under test.
const OWN: &str = env!("CARGO_PKG_VERSION");

/// Trial time of the kiosks here (short, so rollbacks are quick).
const CONFIRM_SECS: u64 = 15;

/// The same source built as version [`NEWER`]: the crate copied to
/// `<target>/update-newer/src`, its version rewritten, built (debug) into
/// `<target>/update-newer/target`. Built once per test run.
fn newer_build() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_holosync"));
        let target = bin
            .parent()
            .and_then(Path::parent)
            .expect("target/debug/holosync");
        let work = target.join("update-newer");
        let src = work.join("src");
        let _ = fs::remove_dir_all(&src);
        fs::create_dir_all(&src).unwrap();
        for entry in ["src", "bench", "tests/support", "Cargo.lock"] {
            let status = Command::new("cp")
                .args(["-r", "--parents", entry])
                .arg(&src)
                .current_dir(root)
                .status()
                .unwrap();
            assert!(status.success(), "copy {entry}");
        }
        let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let own_line = format!("version = \"{OWN}\"");
        assert!(manifest.contains(&own_line));
        let manifest = manifest.replacen(&own_line, &format!("version = \"{NEWER}\""), 1);
        fs::write(src.join("Cargo.toml"), manifest).unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--offline", "--bin", "holosync"])
            .env("CARGO_TARGET_DIR", work.join("target"))
            .current_dir(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building version {NEWER} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        work.join("target/debug/holosync")
    })
}

/// The kiosk's executable name, and its staged and previous copies'.
fn exe_name(tag: &str) -> String {
    match (under_wine(), tag) {
        (true, "") => "holosync.exe".into(),
        (true, tag) => format!("holosync.{tag}.exe"),
        (false, "") => "holosync".into(),
        (false, tag) => format!("holosync.{tag}"),
    }
}

/// A kiosk folder: a copy of the binary, its config, database, cache and
/// log. Every process started from the folder (the agent, the supervisor,
/// the new version) is killed on drop.
struct Kiosk {
    /// The folder.
    dir: TempDir,
    /// The executable's path in it.
    exe: PathBuf,
    /// The config as first written.
    config: Value,
    /// The first agent started by the test.
    child: Option<Child>,
}

impl Kiosk {
    /// A kiosk for `broker` trusting `keys`, with `patch` over the test config.
    fn new(name: &str, broker: &Mosquitto, keys: &[&str], patch: Value) -> Kiosk {
        let dir = TempDir::new(name);
        let exe = dir.path().join(exe_name(""));
        fs::copy(exe_under_test(), &exe).unwrap();
        let mut config = Agent::default_config(broker.port);
        config["update"] = json!({"public_keys": keys, "confirm_secs": CONFIRM_SECS});
        config["report"] = json!({"status_interval_secs": 1});
        // A debug build of holosync is over the test config's 10 MiB.
        config["download"]["max_bytes"] = json!(200_000_000);
        merge(&mut config, patch);
        fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        Kiosk {
            dir,
            exe,
            config,
            child: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the kiosk's executable, as the Startup folder does.
    fn start(&mut self) {
        let config = self.path("config.json");
        let mut cmd = command_for(&self.exe, &["--config", config.to_str().unwrap()]);
        let out = fs::File::create(self.path("stderr.txt")).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(out);
        // ETXTBSY: another test's process, forked while this exe was being
        // copied, holds the copy's write handle until it execs; gone soon.
        let give_up = Instant::now() + WAIT;
        self.child = Some(loop {
            match cmd.spawn() {
                Ok(child) => break child,
                Err(e) if e.raw_os_error() == Some(26) && Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("could not start {}: {e}", self.exe.display()),
            }
        });
    }

    fn prefix(&self) -> String {
        format!(
            "holosync/{}",
            self.config["mqtt"]["client_id"].as_str().unwrap()
        )
    }

    fn log(&self) -> String {
        common::read_lossy(&self.path("holosync.log"))
    }

    /// Kills every process of the kiosk (a power cut, as far as it can tell).
    fn kill_all(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for _ in 0..3 {
            for pid in processes_under(self.dir.path()) {
                common::send_signal(pid, "KILL");
            }
            if poll_until(Duration::from_secs(5), || {
                processes_under(self.dir.path()).is_empty()
            }) {
                return;
            }
        }
    }

    /// `holosync status --json` of the kiosk's database.
    fn status(&self) -> Value {
        let config = self.path("config.json");
        let out = command_for(
            &exe_under_test(),
            &["status", "--json", "--config", config.to_str().unwrap()],
        )
        .output()
        .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

impl Drop for Kiosk {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Serves `body` at `path` as a static file (ranges, validators) sent in
/// about four seconds, so a kill or a stop lands in the middle.
fn serve_in_four_seconds(http: &HttpServer, path: &str, body: Vec<u8>) {
    let size = body.len() as u64;
    http.set(
        path,
        Route::Ranged(Arc::new(Ranged {
            rate: Some(size / 4),
            ..Ranged::new(body, "v090")
        })),
    );
}

/// Waits until the supervisor has copied `newer` into place once its trial
/// was confirmed (then it removes the marker), and checks the exe's bytes.
fn wait_installed(kiosk: &Kiosk, newer: &Path) {
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));
    assert!(
        bytes(&kiosk.exe) == bytes(newer),
        "the new build is in place"
    );
}

/// What a test starts with: a broker, the HTTP server, and the operator's
/// key (`fleet.key` in the folder `<name>-keys`): the folder, the key file
/// and its public key.
fn rig(name: &str) -> (Mosquitto, HttpServer, TempDir, PathBuf, String) {
    let keys = TempDir::new(&format!("{name}-keys"));
    let (key, public) = keygen(keys.path(), "fleet.key");
    (Mosquitto::start(), HttpServer::start(), keys, key, public)
}

/// A kiosk named `name` trusting `public`, started and online: it and its
/// first retained state.
fn started_kiosk(name: &str, broker: &Mosquitto, public: &str) -> (Kiosk, Value) {
    let mut kiosk = Kiosk::new(name, broker, &[public], json!({}));
    kiosk.start();
    let first = wait_online(broker, &kiosk, OWN, &Value::Null);
    (kiosk, first)
}

/// The operator's key: `holosync keygen` in `dir`; returns the key file and
/// the public key it printed. The operator's tools run natively (the
/// operator's machine), whichever exe the kiosks run.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(common::holosync_exe())
        .args(["keygen", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("public key for update.public_keys: "))
        .expect("keygen prints the public key")
        .to_string();
    (key, public)
}

/// `holosync sign --key key args...`: the command JSON.
fn sign(key: &Path, args: &[&str]) -> Value {
    let mut all = vec!["sign", "--key", key.to_str().unwrap()];
    all.extend_from_slice(args);
    let target = kiosk_target();
    if args.contains(&"update") {
        all.extend(["--target", &target]);
    }
    let out = Command::new(common::holosync_exe())
        .args(&all)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The target name the kiosks under test run (`holosync-<arch>-<os>`): this
/// machine's, or the Windows exe's by its PE header's machine field.
fn kiosk_target() -> String {
    if !under_wine() {
        return format!(
            "holosync-{}-{}",
            std::env::consts::ARCH,
            std::env::consts::OS
        );
    }
    let exe = fs::read(exe_under_test()).unwrap();
    let pe = u32::from_le_bytes(exe[0x3c..0x40].try_into().unwrap()) as usize;
    match u16::from_le_bytes([exe[pe + 4], exe[pe + 5]]) {
        0x14c => "holosync-x86-windows".into(),
        0x8664 => "holosync-x86_64-windows".into(),
        other => panic!("unknown PE machine {other:#x}"),
    }
}

/// SHA-256 of a file, by `sha256sum`.
fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// The JSON payloads received on `topic` so far, in order.
fn payloads(sub: &Subscriber, topic: &str) -> Vec<Value> {
    sub.json_payloads(topic)
}

/// Waits for a payload on `topic` that satisfies `pred`; returns it.
fn wait_payload(sub: &Subscriber, topic: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    sub.wait_json(topic, what, WAIT, pred)
}

/// Waits until the retained state says online with `version` and a start
/// time other than `not_started_at`; returns it.
fn wait_online(broker: &Mosquitto, kiosk: &Kiosk, version: &str, not_started_at: &Value) -> Value {
    let topic = format!("{}/state", kiosk.prefix());
    let mut last = Value::Null;
    let ok = poll_until(WAIT, || {
        let sub = broker.subscribe(&topic);
        poll_until(Duration::from_secs(3), || {
            !payloads(&sub, &topic).is_empty()
        });
        last = payloads(&sub, &topic).pop().unwrap_or(Value::Null);
        last["online"] == true
            && last["version"] == version
            && last["started_at"] != *not_started_at
    });
    assert!(
        ok,
        "kiosk not online as {version}; state {last}\n--- log ---\n{}",
        common::tail(&kiosk.log(), 4000)
    );
    last
}

/// Bytes of a file, for "nothing changed" checks.
fn bytes(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_default()
}

/// A script standing in for a broken new version.
fn script(body: &str) -> Vec<u8> {
    format!("#!/bin/sh\n{body}\n").into_bytes()
}

/// An update to a newer build: downloaded through the HTTP server, swapped
/// in, started on trial, confirmed; the retained state then says the new
/// version, the old executable is kept as `.old`, the queue is the same.
#[test]
fn an_update_to_a_newer_build_swaps_reports_the_new_version_and_keeps_the_queue() {
    let newer = newer_build();
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let keys = TempDir::new("update-keys");
    let (key, public) = keygen(keys.path(), "fleet.key");
    let mut kiosk = Kiosk::new("update-swap", &broker, &[&public], json!({}));
    let original = bytes(&kiosk.exe);
    kiosk.start();
    let first = wait_online(&broker, &kiosk, OWN, &Value::Null);

    http.set("/a.png", Route::Ok(png(8, 8, 1)));
    http.set("/gone.png", Route::Status(404, Vec::new()));
    broker.publish(
        "sync",
        format!("{},{}", http.url("/a.png"), http.url("/gone.png")).as_bytes(),
        1,
    );
    assert!(poll_until(WAIT, || {
        let s = kiosk.status();
        s["done"] == 1 && s["failed"] == 1
    }));

    http.set("/holosync-0.9.0", Route::Ok(fs::read(newer).unwrap()));
    let url = http.url("/holosync-0.9.0");
    let command = sign(
        &key,
        &[
            "--id",
            "u-1",
            "update",
            NEWER,
            &url,
            "--file",
            newer.to_str().unwrap(),
        ],
    );
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    let sent = Instant::now();
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        command.to_string().as_bytes(),
        1,
    );

    wait_payload(&sub, &events, "the old agent's answer", |v| {
        v["id"] == "u-1" && v["ok"] == true && v["restarting"] == true
    });
    let state = wait_online(&broker, &kiosk, NEWER, &first["started_at"]);
    eprintln!(
        "update of {} bytes: {NEWER} online {:?} after the command",
        fs::metadata(newer).unwrap().len(),
        sent.elapsed()
    );
    assert_eq!(state["client_id"], first["client_id"]);
    let done = wait_payload(&sub, &events, "the new agent's confirmation", |v| {
        v["id"] == "u-1"
            && v["ok"] == true
            && v["version"] == NEWER
            && v.get("restarting").is_none()
    });
    assert_eq!(done["command"], "update");
    // The supervisor copies it in once the trial is confirmed, then removes the marker.
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));
    assert!(
        bytes(&kiosk.exe) == bytes(newer),
        "the new build is at the exe's path"
    );
    assert!(
        bytes(&kiosk.path("holosync.old")) == original,
        "the old one is kept"
    );
    assert!(!kiosk.path("holosync.new").exists());
    let status = kiosk.status();
    assert_eq!(
        (status["done"].clone(), status["failed"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(status["last_update"]["version"], NEWER);
    assert_eq!(status["last_update"]["ok"], true);
    assert_eq!(http.hits("/holosync-0.9.0"), 1);
    let log = kiosk.log();
    assert!(log.contains("handing over to the new version"), "{log}");
    assert!(
        log.contains("supervisor: update to 0.9.0 confirmed"),
        "{log}"
    );
}

/// The signed `update` command for [`NEWER`] with id `id`, served at `url`.
fn newer_command(key: &Path, id: &str, url: &str) -> Value {
    let newer = newer_build();
    sign(
        key,
        &[
            "--id",
            id,
            "update",
            NEWER,
            url,
            "--file",
            newer.to_str().unwrap(),
        ],
    )
}

/// The name of the partial download of the file whose SHA-256 is `sha256`
/// (`holosync.<first 16 hex digits>.part`, next to the exe).
fn partial_name(sha256: &str) -> String {
    format!("holosync.{}.part", &sha256[..16])
}

/// The value of header `name` in one request's headers.
fn header(head: &[(String, String)], name: &str) -> Option<String> {
    head.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// An update whose first response is cut at 40% of the file is not
/// answered with an error: the same command tries again after the backoff,
/// asking only for the rest (`Range` from where the cut left it, `If-Range`
/// with the ETag it saw), swaps and reports the new version; the file
/// crossed the network about once.
#[test]
fn an_update_cut_at_40_percent_resumes_with_a_range_request_and_swaps() {
    let newer = newer_build();
    let body = fs::read(newer).unwrap();
    let size = body.len() as u64;
    let cut = size * 2 / 5;
    let (broker, http, _keys, key, public) = rig("update-cut");
    let (kiosk, first) = started_kiosk("update-cut", &broker, &public);

    let path = "/holosync-0.9.0";
    http.set(
        path,
        Route::Ranged(Arc::new(Ranged {
            cuts: vec![Some(cut)],
            ..Ranged::new(body, "v090")
        })),
    );
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    let sent = Instant::now();
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        newer_command(&key, "cut-1", &http.url(path))
            .to_string()
            .as_bytes(),
        1,
    );
    let answer = wait_payload(&sub, &events, "the answer", |v| v["id"] == "cut-1");
    assert!(
        answer["ok"] == true && answer["restarting"] == true,
        "the cut download was not resumed: {answer}\n--- log ---\n{}",
        common::tail(&kiosk.log(), 3000)
    );
    wait_online(&broker, &kiosk, NEWER, &first["started_at"]);
    eprintln!(
        "update of {size} bytes cut at {cut}: {NEWER} online {:?} after the command",
        sent.elapsed()
    );
    wait_payload(&sub, &events, "the new agent's confirmation", |v| {
        v["id"] == "cut-1" && v["ok"] == true && v["version"] == NEWER
    });

    // What reached the agent before the cut (the server's close may reset
    // the connection with bytes still unread) is what the log says it kept.
    let log = kiosk.log();
    let kept: u64 = log
        .lines()
        .find_map(|l| l.split("update 0.9.0: attempt 1 of 5 failed: ").nth(1))
        .and_then(|rest| rest.split("; ").nth(1))
        .and_then(|kept| kept.strip_suffix(" bytes kept, retrying in 0.2 s"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line on the failed attempt\n{log}"));
    assert!(kept > 0 && kept <= cut, "{kept} bytes kept of {cut} sent");
    let heads = http.request_headers(path);
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert_eq!(header(&heads[0], "range"), None);
    assert_eq!(
        header(&heads[1], "range"),
        Some(format!("bytes={kept}-")),
        "the second request asks for the rest"
    );
    assert_eq!(header(&heads[1], "if-range").as_deref(), Some("\"v090\""));
    let total = http.sent(path);
    assert!(
        (total as f64) < 1.3 * size as f64,
        "{total} bytes sent for a file of {size}"
    );
    wait_installed(&kiosk, newer);
    let part = partial_name(&sha256_of(newer));
    assert!(!kiosk.path(&part).exists(), "{part} is renamed into place");
    assert!(
        log.contains(&format!("resuming the download of 0.9.0 at {kept} bytes")),
        "{log}"
    );
}

/// A kill -9 of the agent in the middle of a (throttled) update download:
/// the partial file stays, the restarted agent gets the command again (the
/// broker redelivers the unacked QoS 1 message to the persistent session)
/// and resumes from the bytes kept, with a `Range` request and no
/// `If-Range` (this process never saw the validator: the signed SHA-256
/// decides), then swaps and reports the new version.
#[test]
fn an_update_killed_mid_download_resumes_from_the_kept_partial_after_the_restart() {
    let newer = newer_build();
    let body = fs::read(newer).unwrap();
    let size = body.len() as u64;
    let (broker, http, _keys, key, public) = rig("update-killdl");
    let (mut kiosk, first) = started_kiosk("update-killdl", &broker, &public);

    let path = "/holosync-0.9.0";
    serve_in_four_seconds(&http, path, body);
    let part = kiosk.path(&partial_name(&sha256_of(newer)));
    let command = newer_command(&key, "kill-1", &http.url(path));
    let cmd_topic = format!("{}/cmd", kiosk.prefix());
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    broker.publish(&cmd_topic, command.to_string().as_bytes(), 1);
    let mid = poll_until(WAIT, || {
        http.sent(path) > size / 5 && fs::metadata(&part).is_ok_and(|m| m.len() > 0)
    });
    let kept_before = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        mid,
        "no partial file {} while the download ran ({} bytes sent)\n--- log ---\n{}",
        part.display(),
        http.sent(path),
        common::tail(&kiosk.log(), 3000)
    );
    kiosk.kill_all();
    let sent_at_kill = http.sent(path);
    assert!(sent_at_kill < size, "killed after the whole file was sent");
    let kept = fs::metadata(&part).unwrap().len();
    assert!(kept >= kept_before && kept > 0);

    let restarted = Instant::now();
    kiosk.start();
    // The broker redelivers the unacked command; if it has not after a
    // while, the operator sends it again.
    if !poll_until(Duration::from_secs(30), || {
        kiosk.log().contains("resuming the download of 0.9.0")
    }) {
        eprintln!("the command was not redelivered within 30 s: publishing it again");
        broker.publish(&cmd_topic, command.to_string().as_bytes(), 1);
    }
    let answer = wait_payload(&sub, &events, "the answer", |v| {
        v["id"] == "kill-1" && (v["ok"] == true || v["error"].is_string())
    });
    assert!(answer["ok"] == true, "{answer}");
    wait_online(&broker, &kiosk, NEWER, &first["started_at"]);
    eprintln!(
        "update of {size} bytes killed at {kept} bytes kept ({sent_at_kill} sent): {NEWER} online {:?} after the restart",
        restarted.elapsed()
    );

    let heads = http.request_headers(path);
    let resumed = heads
        .iter()
        .skip(1)
        .filter_map(|h| header(h, "range"))
        .collect::<Vec<_>>();
    assert!(
        resumed.iter().any(|r| r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)),
        "no resuming Range request after the restart: {heads:?}"
    );
    assert!(
        heads
            .iter()
            .skip(1)
            .all(|h| header(h, "if-range").is_none()),
        "no validator is known after a restart: {heads:?}"
    );
    let total = http.sent(path);
    assert!(
        (total as f64) < 1.5 * size as f64,
        "{total} bytes sent for a file of {size}"
    );
    wait_installed(&kiosk, newer);
    assert!(!part.exists());
    let log = kiosk.log();
    assert!(log.contains("resuming the download of 0.9.0 at "), "{log}");
}

/// A clean stop (SIGTERM) during an update's download keeps the partial
/// file for the update to resume, and says so in the log.
#[test]
fn a_clean_stop_during_an_update_download_keeps_the_partial_file() {
    if under_wine() {
        return; // SIGTERM is the native stop.
    }
    let newer = newer_build();
    let body = fs::read(newer).unwrap();
    let size = body.len() as u64;
    let (broker, http, _keys, key, public) = rig("update-stopdl");
    let (mut kiosk, _) = started_kiosk("update-stopdl", &broker, &public);
    let path = "/holosync-0.9.0";
    serve_in_four_seconds(&http, path, body);
    let part = kiosk.path(&partial_name(&sha256_of(newer)));
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        newer_command(&key, "stop-1", &http.url(path))
            .to_string()
            .as_bytes(),
        1,
    );
    assert!(poll_until(WAIT, || http.sent(path) > size / 5));
    let mut child = kiosk.child.take().unwrap();
    common::send_signal(child.id(), "TERM");
    assert!(
        poll_until(WAIT, || child.try_wait().unwrap().is_some()),
        "the agent did not stop"
    );
    let log = kiosk.log();
    assert!(log.contains("holosync stopped (SIGTERM)"), "{log}");
    assert!(
        log.contains("for resuming it when the update comes again"),
        "{log}"
    );
    let kept = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        kept > 0 && kept < size,
        "{} keeps {kept} of {size} bytes",
        part.display()
    );
}

/// A kept partial file whose bytes are wrong (here: corrupted before the
/// agent starts, as a power cut or a bad disk might leave it) survives the
/// start-up tidy-up, is resumed, does not hash to the signed SHA-256, and
/// is started over from byte 0 once: the update ends with the right
/// version, not a refusal. Another version's partial file is removed.
#[test]
fn a_wrong_kept_partial_is_started_over_from_byte_0_and_the_update_succeeds() {
    let newer = newer_build();
    let body = fs::read(newer).unwrap();
    let size = body.len() as u64;
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let keys = TempDir::new("update-wrongpart-keys");
    let (key, public) = keygen(keys.path(), "fleet.key");
    let mut kiosk = Kiosk::new("update-wrongpart", &broker, &[&public], json!({}));
    // 40% of the file with a run of its bytes flipped.
    let kept = (size * 2 / 5) as usize;
    let mut wrong = body[..kept].to_vec();
    for b in &mut wrong[kept / 2..kept / 2 + 4096] {
        *b ^= 0xff;
    }
    let part = kiosk.path(&partial_name(&sha256_of(newer)));
    fs::write(&part, &wrong).unwrap();
    // Another version's partial download, which this update removes.
    let other = kiosk.path(&partial_name(&"0".repeat(64)));
    fs::write(&other, b"an older attempt").unwrap();
    kiosk.start();
    let first = wait_online(&broker, &kiosk, OWN, &Value::Null);
    assert!(
        part.exists() && other.exists(),
        "the start-up tidy-up keeps partial files"
    );

    let path = "/holosync-0.9.0";
    http.set(path, Route::Ranged(Arc::new(Ranged::new(body, "v090"))));
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        newer_command(&key, "wrong-1", &http.url(path))
            .to_string()
            .as_bytes(),
        1,
    );
    let answer = wait_payload(&sub, &events, "the answer", |v| v["id"] == "wrong-1");
    assert!(answer["ok"] == true, "{answer}");
    wait_online(&broker, &kiosk, NEWER, &first["started_at"]);

    let heads = http.request_headers(path);
    assert_eq!(
        heads.len(),
        2,
        "the kept partial resumed, then the whole file: {heads:?}"
    );
    assert_eq!(
        header(&heads[0], "range"),
        Some(format!("bytes={kept}-")),
        "the kept bytes are resumed first"
    );
    assert_eq!(header(&heads[0], "if-range"), None);
    assert_eq!(header(&heads[1], "range"), None, "then the whole file");
    wait_installed(&kiosk, newer);
    assert!(!part.exists());
    assert!(!other.exists(), "another version's partial is removed");
    let log = kiosk.log();
    assert!(log.contains("starting over from byte 0"), "{log}");
}

/// The same version installed again, signed with `allow_downgrade`: the
/// whole handover (the running exe renamed aside, the single-instance lock
/// passed from the old process to the new one, the trial) without a second
/// build, so it runs under Wine with the kiosk exe too (`.ci/run`).
#[test]
fn a_reinstall_signed_with_allow_downgrade_hands_over_to_the_new_process() {
    let (broker, http, _keys, key, public) = rig("update-reinstall");
    let (mut kiosk, first) = started_kiosk("update-reinstall", &broker, &public);
    let exe = bytes(&kiosk.exe);
    http.set("/again", Route::Ok(exe.clone()));
    let file = kiosk.exe.to_str().unwrap().to_string();
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    let unsigned_downgrade = {
        let mut c = sign(
            &key,
            &[
                "--id",
                "r-0",
                "update",
                OWN,
                &http.url("/again"),
                "--file",
                &file,
            ],
        );
        c["allow_downgrade"] = json!(true);
        c
    };
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        unsigned_downgrade.to_string().as_bytes(),
        1,
    );
    let refused = wait_payload(&sub, &events, "the refusal", |v| v["id"] == "r-0");
    assert!(
        refused["error"].as_str().unwrap().contains("bad signature"),
        "{refused}"
    );
    // The same exe again, signed with allow_downgrade, published.
    let cmd = format!("{}/cmd", kiosk.prefix());
    let reinstall = |id: &str| {
        let command = sign(
            &key,
            &[
                "--id",
                id,
                "update",
                OWN,
                &http.url("/again"),
                "--file",
                &file,
                "--allow-downgrade",
            ],
        );
        broker.publish(&cmd, command.to_string().as_bytes(), 1);
    };
    reinstall("r-1");
    let second = wait_online(&broker, &kiosk, OWN, &first["started_at"]);
    wait_payload(&sub, &events, "the confirmation", |v| {
        v["id"] == "r-1" && v["ok"] == true && v.get("restarting").is_none()
    });
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));
    assert!(
        kiosk.child.as_mut().unwrap().try_wait().unwrap().is_some(),
        "the first process ended"
    );
    assert!(
        bytes(&kiosk.exe) == exe,
        "the reinstalled exe is at its path"
    );
    assert!(
        bytes(&kiosk.path(&exe_name("old"))) == exe,
        "the previous exe is kept"
    );
    let log = kiosk.log();
    assert!(
        log.contains("holosync stopped (handing over to the new version)"),
        "{log}"
    );
    assert_eq!(kiosk.status()["last_update"]["ok"], true);

    // Again, while the agent of the first trial still runs from the staged
    // file (on Windows it holds holosync.new.exe, which the next download
    // must take the name of).
    reinstall("r-2");
    wait_online(&broker, &kiosk, OWN, &second["started_at"]);
    let done = wait_payload(&sub, &events, "the second update's end", |v| {
        v["id"] == "r-2" && v.get("restarting").is_none()
    });
    assert_eq!(done["ok"], true, "{done}");
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));
    assert!(
        bytes(&kiosk.exe) == exe,
        "the reinstalled exe is at its path"
    );
}

/// Every refusal is answered with its reason and changes nothing: no key
/// configured, a signature by another key, a sha256 that does not match
/// the download, an older version, an unsigned `mqtt.host` change, an
/// invalid patch (naming the key). The agent keeps running, same process.
#[test]
fn refused_updates_and_patches_are_answered_and_change_nothing() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let keys = TempDir::new("update-refusal-keys");
    let (key, public) = keygen(keys.path(), "fleet.key");
    let (other, _) = keygen(keys.path(), "other.key");
    let payload = script("exit 0");
    http.set("/new", Route::Ok(payload.clone()));
    let url = http.url("/new");
    let good_sha = {
        let p = keys.path().join("new");
        fs::write(&p, &payload).unwrap();
        sha256_of(&p)
    };

    let mut keyless = Kiosk::new("update-keyless", &broker, &[], json!({}));
    let mut kiosk = Kiosk::new("update-refusals", &broker, &[&public], json!({}));
    keyless.start();
    kiosk.start();
    wait_online(&broker, &keyless, OWN, &Value::Null);
    let state = wait_online(&broker, &kiosk, OWN, &Value::Null);
    let (exe, config) = (bytes(&kiosk.exe), bytes(&kiosk.path("config.json")));

    let ask = |k: &Kiosk, command: Value, id: &str| -> String {
        let mut command = command;
        command["id"] = json!(id);
        let events = format!("{}/events", k.prefix());
        let sub = broker.subscribe(&events);
        broker.publish(
            &format!("{}/cmd", k.prefix()),
            command.to_string().as_bytes(),
            1,
        );
        let answer = wait_payload(&sub, &events, id, |v| v["id"] == id);
        assert!(answer["ok"].is_null(), "{answer}");
        answer["error"].as_str().unwrap().to_string()
    };
    let update = sign(&key, &["update", NEWER, &url, "--sha256", &good_sha]);

    let why = ask(&keyless, update.clone(), "no-key");
    assert!(why.contains("no key is configured"), "{why}");
    let why = ask(
        &kiosk,
        sign(&other, &["update", NEWER, &url, "--sha256", &good_sha]),
        "other-key",
    );
    assert!(why.contains("bad signature"), "{why}");
    let mut tampered = update.clone();
    tampered["version"] = json!("0.9.1");
    let why = ask(&kiosk, tampered, "tampered");
    assert!(why.contains("bad signature"), "{why}");
    let wrong_sha = "0".repeat(64);
    let why = ask(
        &kiosk,
        sign(&key, &["update", NEWER, &url, "--sha256", &wrong_sha]),
        "wrong-sha",
    );
    assert!(why.contains("sha256 mismatch"), "{why}");
    let why = ask(
        &kiosk,
        sign(&key, &["update", "0.0.1", &url, "--sha256", &good_sha]),
        "older",
    );
    assert!(why.contains("not newer"), "{why}");
    let why = ask(
        &kiosk,
        sign(&key, &["update", OWN, &url, "--sha256", &good_sha]),
        "same",
    );
    assert!(why.contains("not newer"), "{why}");
    let host = json!({"command": "set-config", "patch": {"mqtt": {"host": "broker.example"}}});
    let why = ask(&kiosk, host, "unsigned-host");
    assert!(
        why.contains("mqtt.host") && why.contains("signature"),
        "{why}"
    );
    let bad = json!({"command": "set-config", "patch": {"log": {"level": "loud"}}});
    let why = ask(&kiosk, bad, "bad-level");
    assert!(why.contains("key `log.level`"), "{why}");
    let unknown = json!({"command": "set-config", "patch": {"download": {"max_byte": 1}}});
    let why = ask(&kiosk, unknown, "unknown-key");
    assert!(why.contains("key `download.max_byte`"), "{why}");

    assert!(bytes(&kiosk.exe) == exe, "a refusal changed the exe");
    assert!(
        bytes(&kiosk.path("config.json")) == config,
        "a refusal changed the config"
    );
    for leftover in [
        "holosync.new",
        "holosync.old",
        "holosync.update",
        "config.json.prev",
    ] {
        assert!(!kiosk.path(leftover).exists(), "{leftover}");
    }
    // The wrong-sha one was downloaded (then refused); the others were not.
    assert_eq!(http.hits("/new"), 1);
    assert!(
        kiosk.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "same process"
    );
    let now = wait_online(&broker, &kiosk, OWN, &Value::Null);
    assert_eq!(now["started_at"], state["started_at"]);
    assert!(kiosk.status()["last_update"].is_null());
}

/// A new version that cannot be started, one that exits at start, and one
/// that never gets online are each stopped, the old executable restored and started again within
/// `update.confirm_secs`, and the failure reported on `events` and kept in
/// `status`.
#[test]
fn a_new_version_that_exits_or_hangs_is_rolled_back_and_reported() {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let keys = TempDir::new("update-rollback-keys");
    let (key, public) = keygen(keys.path(), "fleet.key");
    let mut kiosk = Kiosk::new("update-rollback", &broker, &[&public], json!({}));
    let original = bytes(&kiosk.exe);
    kiosk.start();
    let mut state = wait_online(&broker, &kiosk, OWN, &Value::Null);
    let events = format!("{}/events", kiosk.prefix());

    // Not an executable at all (it cannot be started), and natively two
    // shell scripts: one that exits, one that never gets online.
    let mut cases = vec![("0.9.1", b"MZ not really".to_vec(), "could not be started")];
    if !under_wine() {
        cases.push(("0.9.2", script("exit 3"), "exited at start"));
        cases.push((
            "0.9.3",
            script("exec sleep 600"),
            "did not get online within",
        ));
    }
    for (n, (version, body, reason)) in cases.into_iter().enumerate() {
        let file = keys.path().join(version);
        fs::write(&file, body).unwrap();
        let path = format!("/holosync-{version}");
        http.set(&path, Route::Ok(fs::read(&file).unwrap()));
        let id = format!("bad-{n}");
        let command = sign(
            &key,
            &[
                "--id",
                &id,
                "update",
                version,
                &http.url(&path),
                "--file",
                file.to_str().unwrap(),
            ],
        );
        let sub = broker.subscribe(&events);
        broker.publish(
            &format!("{}/cmd", kiosk.prefix()),
            command.to_string().as_bytes(),
            1,
        );
        wait_payload(&sub, &events, "the handover", |v| {
            v["id"] == id && v["ok"] == true
        });
        let handed = Instant::now();
        let failed = wait_payload(&sub, &events, "the rollback report", |v| {
            v["id"] == id && v["ok"] == false
        });
        let back = wait_online(&broker, &kiosk, OWN, &state["started_at"]);
        let took = handed.elapsed();
        eprintln!(
            "{version} ({reason}): rolled back and online as {OWN} {took:?} after the handover"
        );
        assert_eq!(failed["version"], version);
        assert_eq!(failed["rolled_back"], true);
        assert!(
            failed["error"].as_str().unwrap().contains(reason),
            "{failed}"
        );
        assert!(
            took < Duration::from_secs(CONFIRM_SECS + 45),
            "rolled back and online after {took:?}"
        );
        assert!(bytes(&kiosk.exe) == original, "the old executable is back");
        let status = kiosk.status();
        assert_eq!(status["last_update"]["version"], version);
        assert_eq!(status["last_update"]["ok"], false);
        assert!(!kiosk.path("holosync.update").exists());
        state = back;
    }
}

/// A power cut (everything killed) at each step of the swap leaves a
/// runnable executable at the kiosk's path, and the next start finishes the
/// swap or keeps the old version: each step's files are laid out as the
/// swap leaves them, then the kiosk is started as the Startup folder would.
/// Last, the supervisor itself is killed -9 during a real trial.
#[test]
fn a_kill_at_each_step_of_the_swap_leaves_a_runnable_agent() {
    let newer = newer_build();
    let mut broker = Mosquitto::start();
    let keys = TempDir::new("update-kill-keys");
    let (_, public) = keygen(keys.path(), "fleet.key");
    let mut kiosk = Kiosk::new("update-kill", &broker, &[&public], json!({}));
    let original = bytes(&kiosk.exe);
    let (dir, exe_path) = (kiosk.dir.path().to_path_buf(), kiosk.exe.clone());
    let at = |name: &str| dir.join(name);
    let marker = |phase: &str| {
        json!({"kind": "update", "from": OWN, "to": NEWER, "id": "k", "phase": phase,
               "reason": null, "exe": exe_path, "confirm_secs": CONFIRM_SECS})
        .to_string()
    };
    let lay_out = |exe: &[u8], new: Option<&[u8]>, old: bool, phase: Option<&str>| {
        fs::write(&exe_path, exe).unwrap();
        let _ = fs::remove_file(at("holosync.new"));
        let _ = fs::remove_file(at("holosync.old"));
        let _ = fs::remove_file(at("holosync.update"));
        if let Some(new) = new {
            fs::write(at("holosync.new"), new).unwrap();
        }
        if old {
            fs::write(at("holosync.old"), &original).unwrap();
        }
        if let Some(phase) = phase {
            fs::write(at("holosync.update"), marker(phase)).unwrap();
        }
        for p in ["holosync", "holosync.new", "holosync.old"] {
            if at(p).exists() {
                let _ = Command::new("chmod").arg("755").arg(at(p)).status();
            }
        }
    };
    let new = bytes(newer);
    let mut started = Value::Null;
    // (step, the exe's path, holosync.new, holosync.old, the marker's
    // phase, the version that must end online): see swap.rs's steps.
    for (step, exe, staged, old, phase, version) in [
        (
            "1: downloaded, not handed over",
            &original,
            Some(&new),
            false,
            None,
            OWN,
        ),
        ("2: old copy made", &original, Some(&new), true, None, OWN),
        (
            "3: marker written",
            &original,
            Some(&new),
            true,
            Some("staged"),
            NEWER,
        ),
        (
            "4: on trial",
            &original,
            Some(&new),
            true,
            Some("trial"),
            NEWER,
        ),
        (
            "5: confirmed, not copied in",
            &original,
            Some(&new),
            true,
            Some("confirmed"),
            NEWER,
        ),
        (
            "6: copied in",
            &new,
            Some(&new),
            true,
            Some("confirmed"),
            NEWER,
        ),
        (
            "6: staged file removed",
            &new,
            None,
            true,
            Some("confirmed"),
            NEWER,
        ),
        ("failed", &original, Some(&new), true, Some("failed"), OWN),
        (
            "failed, staged file removed",
            &original,
            None,
            true,
            Some("failed"),
            OWN,
        ),
    ] {
        kiosk.kill_all();
        lay_out(exe, staged.map(|v| v.as_slice()), old, phase);
        kiosk.start();
        let state = wait_online(&broker, &kiosk, version, &started);
        started = state["started_at"].clone();
        assert!(
            poll_until(WAIT, || !kiosk.path("holosync.update").exists()),
            "step {step}: the marker stays"
        );
        assert!(!kiosk.path("holosync.new").exists(), "step {step}");
        let expected = if version == NEWER { &new } else { &original };
        assert!(&bytes(&kiosk.exe) == expected, "step {step}");
    }

    // A real trial whose supervisor is killed -9: the new agent (running
    // from holosync.new) goes on and confirms, with no supervisor to copy
    // it in; the next start (after a power cut) runs the old version, which
    // finishes the copy and starts the new one. The broker is down
    // meanwhile, so the trial lasts until the kill.
    kiosk.kill_all();
    lay_out(&original, Some(&new), true, Some("staged"));
    broker.stop();
    kiosk.start();
    let runs = |pid: &u32, name: &str| {
        fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with(name))
    };
    let mut supervisor = None;
    assert!(poll_until(WAIT, || {
        let pids = processes_under(&dir);
        let trial =
            fs::read_to_string(at("holosync.update")).is_ok_and(|m| m.contains("\"trial\""));
        supervisor = pids.iter().copied().find(|p| runs(p, "holosync.old"));
        // Killed once the agent on trial runs.
        trial && supervisor.is_some() && pids.iter().any(|p| runs(p, "holosync.new"))
    }));
    common::send_signal(supervisor.unwrap(), "KILL");
    broker.restart();
    let state = wait_online(&broker, &kiosk, NEWER, &started);
    assert!(poll_until(WAIT, || fs::read_to_string(at(
        "holosync.update"
    ))
    .is_ok_and(|m| m.contains("\"confirmed\""))));
    assert!(
        bytes(&kiosk.exe) == original,
        "only the supervisor's step 6 replaces the exe"
    );
    kiosk.kill_all();
    kiosk.start();
    wait_online(&broker, &kiosk, NEWER, &state["started_at"]);
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));
    assert!(
        bytes(&kiosk.exe) == new,
        "the next start copied the new exe in"
    );
    assert!(poll_until(WAIT, || !kiosk.path("holosync.new").exists()));
}

/// `set-config` with a new log level restarts the agent with it (debug
/// lines appear after the restart), keeping `config.json.prev`; a signed
/// patch whose broker port cannot be reached is rolled back to the
/// previous config after `confirm_secs`, and the agent comes back online.
#[test]
fn a_config_patch_applies_after_a_restart_and_an_unreachable_one_is_rolled_back() {
    let broker = Mosquitto::start();
    let keys = TempDir::new("update-config-keys");
    let (key, public) = keygen(keys.path(), "fleet.key");
    let mut kiosk = Kiosk::new(
        "update-config",
        &broker,
        &[&public],
        json!({"log": {"level": "info"}}),
    );
    kiosk.start();
    let first = wait_online(&broker, &kiosk, OWN, &Value::Null);
    // An empty sync message is logged at debug level only.
    let empty_logged = |k: &Kiosk| k.log().contains("DEBUG ignored an empty message on sync");
    broker.publish("sync", b"", 1);
    let marker = json!({"command": "status", "id": "after-empty"});
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        marker.to_string().as_bytes(),
        1,
    );
    wait_payload(&sub, &events, "the status answer", |v| {
        v["id"] == "after-empty"
    });
    assert!(!empty_logged(&kiosk), "info level: no debug line");
    let before = bytes(&kiosk.path("config.json"));
    let patch = json!({"command": "set-config", "id": "c-1", "patch": {"log": {"level": "debug"}}});
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        patch.to_string().as_bytes(),
        1,
    );
    wait_payload(&sub, &events, "the answer", |v| {
        v["id"] == "c-1" && v["restarting"] == true
    });
    let second = wait_online(&broker, &kiosk, OWN, &first["started_at"]);
    wait_payload(&sub, &events, "the confirmation", |v| {
        v["id"] == "c-1" && v["ok"] == true && v.get("restarting").is_none()
    });
    broker.publish("sync", b"", 1);
    assert!(
        poll_until(WAIT, || empty_logged(&kiosk)),
        "debug lines after the restart"
    );
    let now: Value = serde_json::from_slice(&bytes(&kiosk.path("config.json"))).unwrap();
    assert_eq!(now["log"]["level"], "debug");
    assert!(
        bytes(&kiosk.path("config.json.prev")) == before,
        "config.json.prev is the config before the patch"
    );

    let dead_port = common::free_port();
    let signed = sign(
        &key,
        &[
            "--id",
            "c-2",
            "set-config",
            &json!({"mqtt": {"port": dead_port}}).to_string(),
        ],
    );
    let with_debug = bytes(&kiosk.path("config.json"));
    broker.publish(
        &format!("{}/cmd", kiosk.prefix()),
        signed.to_string().as_bytes(),
        1,
    );
    wait_payload(&sub, &events, "the answer", |v| {
        v["id"] == "c-2" && v["restarting"] == true
    });
    wait_online(&broker, &kiosk, OWN, &second["started_at"]);
    let failed = wait_payload(&sub, &events, "the rollback", |v| {
        v["id"] == "c-2" && v["ok"] == false
    });
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("did not get online"),
        "{failed}"
    );
    assert!(
        bytes(&kiosk.path("config.json")) == with_debug,
        "the patched config is kept"
    );
    assert_eq!(kiosk.status()["last_update"]["command"], "set-config");
}

/// The answer to a `set-config` that comes in a burst of commands (past ten
/// events a second, so it waits in a group) is published before the
/// handover's clean stop, not lost with the old process: the operator sees
/// `restarting`, then the new process's confirmation.
#[test]
fn an_answer_grouped_in_a_burst_is_published_before_the_handover() {
    let (broker, _http, _keys, _, public) = rig("update-grouped");
    let (kiosk, first) = started_kiosk("update-grouped", &broker, &public);
    let events = format!("{}/events", kiosk.prefix());
    let sub = broker.subscribe(&events);
    let mut burst: Vec<String> = (0..20)
        .map(|i| json!({"id": format!("r-{i}"), "command": "retry-failed"}).to_string())
        .collect();
    burst.push(
        json!({"id": "c-g", "command": "set-config", "patch": {"log": {"level": "info"}}})
            .to_string(),
    );
    broker.publish_lines(&format!("{}/cmd", kiosk.prefix()), &burst, 1);
    // One by one, or inside a group ({"events": [...]}).
    let answered = |pred: &dyn Fn(&Value) -> bool| {
        payloads(&sub, &events).iter().any(|v| {
            pred(v)
                || v["events"]
                    .as_array()
                    .is_some_and(|group| group.iter().any(pred))
        })
    };
    wait_online(&broker, &kiosk, OWN, &first["started_at"]);
    let confirmed =
        |v: &Value| v["id"] == "c-g" && v["ok"] == true && v.get("restarting").is_none();
    assert!(
        poll_until(WAIT, || answered(&confirmed)),
        "no confirmation from the new process; events:\n{}",
        sub.lines().join("\n")
    );
    assert!(
        answered(&|v: &Value| v["id"] == "c-g" && v["restarting"] == true),
        "the old process's answer was lost at the handover; events:\n{}",
        sub.lines().join("\n")
    );
    let grouped = payloads(&sub, &events)
        .iter()
        .any(|v| v["events"].as_array().is_some_and(|g| !g.is_empty()));
    assert!(grouped, "the burst was not grouped: the test shows nothing");
}

/// A signed command carries the operator's counter (`seq`): a kiosk takes
/// one only above the last it accepted, or the same command again, so an
/// older signed command cannot be replayed by whoever can publish on the
/// command topics (here: a signed `mqtt.port` change and a signed
/// downgrade, both made before the command the kiosk last accepted).
#[test]
fn an_older_signed_command_is_refused_as_a_replay() {
    let (broker, http, _keys, key, public) = rig("update-replay");
    let (kiosk, first) = started_kiosk("update-replay", &broker, &public);
    let events = format!("{}/events", kiosk.prefix());
    let cmd = format!("{}/cmd", kiosk.prefix());
    let sub = broker.subscribe(&events);

    // Signed long ago (seq 100, 150), kept by an attacker; then the
    // operator's own command (seq 200) is accepted.
    let port = json!({"mqtt": {"port": common::free_port()}}).to_string();
    let old_port = sign(
        &key,
        &["--id", "old-port", "--seq", "100", "set-config", &port],
    );
    let file = kiosk.exe.to_str().unwrap().to_string();
    http.set("/again", Route::Ok(bytes(&kiosk.exe)));
    let old_downgrade = sign(
        &key,
        &[
            "--id",
            "old-down",
            "--seq",
            "150",
            "update",
            OWN,
            &http.url("/again"),
            "--file",
            &file,
            "--allow-downgrade",
        ],
    );
    let level = json!({"log": {"level": "info"}}).to_string();
    let current = sign(
        &key,
        &["--id", "c-200", "--seq", "200", "set-config", &level],
    );
    broker.publish(&cmd, current.to_string().as_bytes(), 1);
    wait_payload(&sub, &events, "the accepted command", |v| {
        v["id"] == "c-200" && v["restarting"] == true
    });
    let second = wait_online(&broker, &kiosk, OWN, &first["started_at"]);
    wait_payload(&sub, &events, "its confirmation", |v| {
        v["id"] == "c-200" && v["ok"] == true && v.get("restarting").is_none()
    });
    assert!(poll_until(WAIT, || !kiosk.path("holosync.update").exists()));

    let config = bytes(&kiosk.path("config.json"));
    let exe = bytes(&kiosk.exe);
    for (id, replay) in [("old-port", &old_port), ("old-down", &old_downgrade)] {
        broker.publish(&cmd, replay.to_string().as_bytes(), 1);
        let answer = wait_payload(&sub, &events, "the refusal", |v| v["id"] == id);
        assert!(
            answer["error"]
                .as_str()
                .is_some_and(|e| e.contains("replayed or out of order")),
            "{answer}"
        );
    }
    assert!(
        bytes(&kiosk.path("config.json")) == config,
        "a replay changed the config"
    );
    assert!(bytes(&kiosk.exe) == exe, "a replay changed the exe");
    assert!(!kiosk.path("holosync.update").exists());
    let state = wait_online(&broker, &kiosk, OWN, &Value::Null);
    assert_eq!(state["started_at"], second["started_at"], "no restart");

    // The same signed command again (resent under another id, or
    // redelivered after a kill) is not a replay.
    let mut again = current.clone();
    again["id"] = json!("c-200-again");
    broker.publish(&cmd, again.to_string().as_bytes(), 1);
    let answer = wait_payload(&sub, &events, "the same command again", |v| {
        v["id"] == "c-200-again"
    });
    assert_eq!(answer["restarting"], true, "{answer}");
    wait_online(&broker, &kiosk, OWN, &second["started_at"]);
}
