//! Shared helpers for holosync's end-to-end tests.
//!
//! Everything here uses real processes and real sockets on 127.0.0.1: a real
//! `mosquitto` broker ([`Mosquitto`]), a small real HTTP/1.1 server with
//! scripted misbehaviour ([`HttpServer`], [`Route`]), a TCP recorder standing
//! in for a projector ([`TcpSink`]) and the real holosync binary ([`Agent`]).
//! Every wait is bounded by a deadline and polls every [`POLL`]; nothing
//! sleeps a fixed time to wait for a condition.
//!
//! Set `HOLOSYNC_KEEP_TEST_DIRS=1` to keep the temporary directories for
//! inspection. Set `HOLOSYNC_EXE=/path/to/holosync.exe` to run every agent
//! command under `wine64` instead of the native binary (see [`command`]).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// How often every wait in this module re-checks its condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Counter shared by everything that needs a process-unique name.
static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// Returns a string unique within this test process run (pid + counter).
pub fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Locks a mutex, ignoring poisoning (a panicking test must not wedge helpers).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Returns at most the last `n` bytes of `s`, cut at a char boundary.
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

// ---------------------------------------------------------------------------
// Temporary directories, ports, waiting
// ---------------------------------------------------------------------------

/// A unique directory under [`std::env::temp_dir`], removed recursively on
/// drop unless `HOLOSYNC_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TempDir {
    /// Absolute path of the directory.
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-<pid>-<counter>-<nanos>`.
    pub fn new(prefix: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", unique()));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    /// Removes the directory tree unless `HOLOSYNC_KEEP_TEST_DIRS` is set.
    fn drop(&mut self) {
        if std::env::var_os("HOLOSYNC_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Polls `cond` every [`POLL`] until it is true or `timeout` passes; returns
/// whether it became true. `cond` is always evaluated at least once and once
/// more at the deadline.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        thread::sleep(POLL.min(deadline - now));
    }
}

/// Polls `cond` until true; panics with
/// `timed out after {timeout:?} waiting for {what}` otherwise.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    if !poll_until(timeout, &mut cond) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Recursively lists the regular files under `dir` (symlinks are not
/// followed and not listed), sorted; empty if `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => walk(&path, out),
                Ok(meta) if meta.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// Finds an executable by name on `PATH`, then in the sbin directories
/// (mosquitto lives in /usr/sbin, which is often not on a user's PATH).
pub fn find_program(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` not found on PATH or in /usr/sbin"))
}

/// A test that cannot run here (no root for a mount, no RabbitMQ, no
/// openssl) fails, so CI never passes a test it did not run; with
/// `HOLOSYNC_ALLOW_SKIP=1` (a developer machine without them) it prints
/// `skipped: <why>` and the caller returns instead.
pub fn cannot_run(why: &str) {
    if std::env::var("HOLOSYNC_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("skipped: {why} (HOLOSYNC_ALLOW_SKIP=1)");
        return;
    }
    panic!("this test cannot run here: {why}; install what it needs (see .ci/run), or set HOLOSYNC_ALLOW_SKIP=1 to skip it");
}

/// Bytes read from a pipe so far, and whether it reached EOF.
#[derive(Default)]
struct PipeData {
    /// Bytes read so far.
    bytes: Vec<u8>,
    /// Whether the pipe reached EOF (or failed).
    eof: bool,
}

/// Accumulates everything read from a pipe on a background thread.
struct Collector {
    /// Shared with the reader thread; the condvar signals EOF.
    state: Arc<(Mutex<PipeData>, Condvar)>,
}

impl Collector {
    /// Starts reading `pipe` until EOF on a new thread.
    fn start(mut pipe: impl Read + Send + 'static) -> Collector {
        let state = Arc::new((Mutex::new(PipeData::default()), Condvar::new()));
        let shared = state.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut guard = lock(&shared.0);
                if n == 0 {
                    guard.eof = true;
                    shared.1.notify_all();
                    return;
                }
                guard.bytes.extend_from_slice(&buf[..n]);
            }
        });
        Collector { state }
    }

    /// Waits (at most `timeout`) for EOF and returns what was read. A
    /// grandchild holding the pipe open (wineserver) cannot hang us.
    fn finish(self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut guard = lock(&self.state.0);
        while !guard.eof {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            guard = self
                .state
                .1
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        guard.bytes.clone()
    }
}

/// Runs `cmd` to completion with `stdin` fed in (or stdin null), capturing
/// stdout and stderr; kills it and panics if it takes longer than `timeout`.
pub fn run_bounded(mut cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Detached: it ends with EPIPE at the latest when the child exits.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        });
    }
    let out = Collector::start(child.stdout.take().expect("stdout pipe"));
    let err = Collector::start(child.stderr.take().expect("stderr pipe"));
    let mut status = None;
    let finished = poll_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !finished {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out.finish(Duration::from_secs(2));
        let stderr = err.finish(Duration::from_secs(2));
        panic!(
            "timed out after {timeout:?} waiting for {what} to exit\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Output {
        status: status.expect("exit status"),
        stdout: out.finish(Duration::from_secs(5)),
        stderr: err.finish(Duration::from_secs(5)),
    }
}

/// The processes running an executable under `dir` (natively, by
/// `/proc/PID/exe`; under Wine, by a command line starting with the folder's
/// `Z:` path): a kiosk folder's agent, supervisor and new version.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let windows = format!("Z:{}", dir.display()).replace('/', "\\");
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let native = fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe.starts_with(dir));
        let wine = under_wine()
            && fs::read(entry.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).starts_with(&windows));
        if native || wine {
            pids.push(pid);
        }
    }
    pids
}

/// Sends a signal (`"TERM"`, `"KILL"`, ...) to `pid` with the `kill` command
/// (std has no signal API); returns whether `kill` succeeded.
pub fn send_signal(pid: u32, signal: &str) -> bool {
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{signal}")).arg(pid.to_string());
    run_bounded(cmd, None, Duration::from_secs(10))
        .status
        .success()
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit, then
/// SIGKILLs it; returns its exit status.
fn terminate_child(child: &mut Child, timeout: Duration) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    send_signal(child.id(), "TERM");
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(status) => status,
        None => {
            let _ = child.kill();
            child.wait().expect("wait after SIGKILL")
        }
    }
}

/// Opens `path` for appending (creating it), for child stdout/stderr.
fn append_file(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// Reads a file as (lossy) UTF-8; empty string if it does not exist.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------

/// A real `mosquitto` broker on 127.0.0.1 with persistence in its own
/// [`TempDir`]; stopped (SIGTERM, so it saves its db) on drop.
pub struct Mosquitto {
    /// The port the broker listens on (stable across [`Mosquitto::restart`]).
    pub port: u16,
    /// Holds the config, `mosquitto.db`, `mosquitto.log`, `mosquitto.out`.
    dir: TempDir,
    /// The running broker, if any.
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker with the default test configuration.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Starts a broker without persistence: a restart forgets every session
    /// and every message it held.
    pub fn start_volatile() -> Mosquitto {
        Mosquitto::start_conf(false, "")
    }

    /// Starts a broker whose config has `extra_conf` lines appended (e.g.
    /// `"message_size_limit 1000\n"`). Retries on a fresh port if the chosen
    /// one was grabbed by someone else in the meantime.
    pub fn start_with(extra_conf: &str) -> Mosquitto {
        Mosquitto::start_conf(true, extra_conf)
    }

    fn start_conf(persistence: bool, extra_conf: &str) -> Mosquitto {
        let dir = TempDir::new("holosync-mosquitto");
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let d = dir.path().display();
            let conf = format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence {persistence}\n\
                 persistence_location {d}/\n\
                 autosave_interval 1\n\
                 user root\n\
                 log_dest file {d}/mosquitto.log\n\
                 log_type all\n\
                 max_queued_messages 100000\n\
                 {extra_conf}\n"
            );
            fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
            match launch_broker(dir.path(), port) {
                Ok(child) => {
                    return Mosquitto {
                        port,
                        dir,
                        child: Some(child),
                    }
                }
                Err(e) => last_error = e,
            }
        }
        panic!("mosquitto did not start: {last_error}");
    }

    /// The broker's directory (config, persistence db, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's log so far (all restarts appended).
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("mosquitto.log"))
    }

    /// Broker log lines that tell the broker dropped a client on its own:
    /// its keep-alive ran out, or it broke the protocol.
    pub fn timeouts_of(&self, client_id: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(client_id))
            .filter(|l| l.contains("exceeded timeout") || l.contains("protocol error"))
            .map(str::to_owned)
            .collect()
    }

    /// Broker log lines that tell a client was dropped or went away (not
    /// counting clean disconnects): timeouts, protocol errors, closed sockets.
    pub fn drops_of(&self, client_id: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(client_id))
            .filter(|l| {
                l.contains("exceeded timeout")
                    || l.contains("protocol error")
                    || l.contains("closed its connection")
                    || l.contains("disconnected due to")
            })
            .map(str::to_owned)
            .collect()
    }

    /// Whether the broker process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM (mosquitto then writes its persistence db) and wait up to
    /// 10 s, then SIGKILL. No-op if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_child(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGKILL, simulating a crash: anything not yet autosaved is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts the broker with persistence turned off: it starts without the
    /// sessions and messages it held, and keeps nothing on disk from then on.
    pub fn restart_volatile(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let text = read_lossy(&conf).replace("persistence true\n", "persistence false\n");
        fs::write(&conf, text).expect("rewrite mosquitto.conf");
        self.restart();
    }

    /// Stops the broker (if running) and starts it again with the same port,
    /// config and persistence dir, waiting until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = launch_broker(self.dir.path(), self.port)
            .unwrap_or_else(|e| panic!("mosquitto did not restart on {}: {e}", self.port));
        self.child = Some(child);
    }

    /// The broker as a client sees it (for `mosquitto_pub` and `mosquitto_sub`).
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            port: self.port,
            login: None,
        }
    }

    /// Publishes `payload` (any bytes, any size, may be empty) to `topic`
    /// with `mosquitto_pub`, asserting it succeeded.
    pub fn publish(&self, topic: &str, payload: &[u8], qos: u8) {
        self.endpoint().publish_with(topic, payload, qos, &[]);
    }

    /// Like [`Mosquitto::publish`] with extra `mosquitto_pub` arguments
    /// (e.g. `&["-r"]` to retain).
    pub fn publish_with(&self, topic: &str, payload: &[u8], qos: u8, extra_args: &[&str]) {
        self.endpoint()
            .publish_with(topic, payload, qos, extra_args);
    }

    /// Publishes every line of `lines` as one message, back to back, from
    /// one `mosquitto_pub -l` (so a burst arrives together).
    pub fn publish_lines(&self, topic: &str, lines: &[String], qos: u8) {
        let mut cmd = Command::new(find_program("mosquitto_pub"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-i", &format!("hspub-{}", unique())])
            .args(["-t", topic, "-q", &qos.to_string(), "-l"]);
        let mut input = lines.join("\n").into_bytes();
        input.push(b'\n');
        let out = run_bounded(cmd, Some(input), Duration::from_secs(90));
        assert!(
            out.status.success(),
            "mosquitto_pub -l failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Subscribes to `topic` (QoS 1) with `mosquitto_sub -v`; returns once
    /// the subscription is live. Output lines are `"<topic> <payload>"`.
    pub fn subscribe(&self, topic: &str) -> Subscriber {
        self.endpoint().subscribe_with(topic, &[])
    }

    /// Like [`Mosquitto::subscribe`] with extra `mosquitto_sub` arguments
    /// (e.g. `&["-c", "-i", "fixed-id"]` for a persistent session).
    pub fn subscribe_with(&self, topic: &str, extra_args: &[&str]) -> Subscriber {
        self.endpoint().subscribe_with(topic, extra_args)
    }
}

/// An MQTT broker on 127.0.0.1 as the mosquitto command-line clients reach it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The broker's port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub login: Option<(String, String)>,
}

impl Endpoint {
    /// Host, port and login arguments for mosquitto_pub / mosquitto_sub.
    fn args(&self, cmd: &mut Command) {
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some((user, password)) = &self.login {
            cmd.args(["-u", user, "-P", password]);
        }
    }

    /// Publishes `payload` (any bytes, may be empty) to `topic`, asserting it succeeded.
    pub fn publish(&self, topic: &str, payload: &[u8], qos: u8) {
        self.publish_with(topic, payload, qos, &[]);
    }

    /// Like [`Endpoint::publish`] with extra `mosquitto_pub` arguments.
    pub fn publish_with(&self, topic: &str, payload: &[u8], qos: u8, extra_args: &[&str]) {
        let mut cmd = Command::new(find_program("mosquitto_pub"));
        self.args(&mut cmd);
        cmd.args(["-i", &format!("hspub-{}", unique())])
            .args(["-t", topic, "-q", &qos.to_string()])
            .args(extra_args);
        // `-s` refuses empty input ("Zero length input"); `-n` sends a null message.
        let stdin = if payload.is_empty() {
            cmd.arg("-n");
            None
        } else {
            cmd.arg("-s");
            Some(payload.to_vec())
        };
        let out = run_bounded(cmd, stdin, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "mosquitto_pub to {topic} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Subscribes to `topic` (QoS 1) with `mosquitto_sub -v` and extra
    /// arguments; returns once the subscription is live.
    pub fn subscribe_with(&self, topic: &str, extra_args: &[&str]) -> Subscriber {
        let dir = TempDir::new("holosync-sub");
        let out_path = dir.path().join("out.txt");
        let probe = format!("holosync-test/probe/{}", unique());
        let mut cmd = Command::new(find_program("mosquitto_sub"));
        self.args(&mut cmd);
        cmd.args(["-q", "1", "-v", "-t", topic, "-t", &probe])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(append_file(&out_path))
            .stderr(append_file(&dir.path().join("err.txt")));
        let child = cmd.spawn().expect("spawn mosquitto_sub");
        let sub = Subscriber {
            child,
            out_path,
            probe,
            dir,
        };
        // There is no "subscribed" signal without -d, so publish to a private
        // probe topic until the subscriber echoes it.
        let probe_prefix = format!("{} ", sub.probe);
        let seen = poll_until(Duration::from_secs(60), || {
            self.publish(&sub.probe, b"probe", 0);
            poll_until(Duration::from_millis(500), || {
                read_lossy(&sub.out_path)
                    .lines()
                    .any(|l| l.starts_with(&probe_prefix))
            })
        });
        assert!(
            seen,
            "mosquitto_sub on {topic} never became ready; stderr: {}",
            read_lossy(&sub.dir.path().join("err.txt"))
        );
        sub
    }
}

impl Drop for Mosquitto {
    /// Stops the broker (SIGTERM, bounded wait, then SIGKILL).
    fn drop(&mut self) {
        self.stop();
    }
}

/// Counts completed broker start-ups recorded in a mosquitto log.
fn broker_runs(dir: &Path) -> usize {
    read_lossy(&dir.join("mosquitto.log"))
        .matches(" running")
        .count()
}

/// Spawns mosquitto with `dir/mosquitto.conf` and waits (10 s) until this
/// very process logged that it is running and the port accepts connections.
fn launch_broker(dir: &Path, port: u16) -> Result<Child, String> {
    let runs_before = broker_runs(dir);
    let mut child = Command::new(find_program("mosquitto"))
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdin(Stdio::null())
        .stdout(append_file(&dir.join("mosquitto.out")))
        .stderr(append_file(&dir.join("mosquitto.out")))
        .spawn()
        .map_err(|e| format!("cannot spawn mosquitto: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut exited = None;
    let up = poll_until(Duration::from_secs(10), || {
        exited = child.try_wait().ok().flatten();
        exited.is_none()
            && broker_runs(dir) > runs_before
            && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    if up {
        return Ok(child);
    }
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    Err(format!(
        "port {port}, exit {exited:?}\n--- mosquitto.out ---\n{}\n--- mosquitto.log ---\n{}",
        read_lossy(&dir.join("mosquitto.out")),
        tail(&read_lossy(&dir.join("mosquitto.log")), 3000)
    ))
}

/// A running `mosquitto_sub -v` writing to a file; killed on drop.
pub struct Subscriber {
    /// The `mosquitto_sub` process.
    child: Child,
    /// Where its stdout goes.
    out_path: PathBuf,
    /// Private topic used to detect that the subscription is live.
    probe: String,
    /// Holds the output files.
    dir: TempDir,
}

impl Subscriber {
    /// All output lines so far (`"<topic> <payload>"`; a payload containing
    /// newlines spans several lines), without the readiness probes.
    pub fn lines(&self) -> Vec<String> {
        let probe_prefix = format!("{} ", self.probe);
        let text = read_lossy(&self.out_path);
        // Only whole lines: mosquitto_sub may be half-way through writing one.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete
            .lines()
            .filter(|l| !l.starts_with(&probe_prefix))
            .map(str::to_owned)
            .collect()
    }

    /// The raw bytes `mosquitto_sub` printed so far (probes included).
    pub fn raw(&self) -> Vec<u8> {
        fs::read(&self.out_path).unwrap_or_default()
    }

    /// Returns the first output line matching `pred`, waiting up to
    /// `timeout`; panics with all lines received so far otherwise.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let mut found = None;
        let ok = poll_until(timeout, || {
            found = self.lines().into_iter().find(|l| pred(l));
            found.is_some()
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for a matching mosquitto_sub line; got:\n{}",
                self.lines().join("\n")
            );
        }
        found.expect("found line")
    }

    /// The JSON payloads received on `topic` so far, in order (lines that
    /// are not JSON are left out).
    pub fn json_payloads(&self, topic: &str) -> Vec<serde_json::Value> {
        let head = format!("{topic} ");
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix(&head))
            .filter_map(|p| serde_json::from_str(p).ok())
            .collect()
    }

    /// Waits up to `timeout` for a JSON payload on `topic` that satisfies
    /// `pred` and returns it; panics naming `what` with every line so far.
    pub fn wait_json(
        &self,
        topic: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        let ok = poll_until(timeout, || {
            found = self.json_payloads(topic).into_iter().find(|v| pred(v));
            found.is_some()
        });
        assert!(
            ok,
            "no {what} on {topic}; got:\n{}",
            self.lines().join("\n")
        );
        found.expect("found")
    }
}

impl Drop for Subscriber {
    /// Kills `mosquitto_sub` and reaps it.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------

/// What [`HttpServer`] answers for one request target.
#[derive(Clone, Debug)]
pub enum Route {
    /// 200 with this body; Content-Type guessed from magic bytes (image/jpeg,
    /// image/png, else application/octet-stream).
    Ok(Vec<u8>),
    /// This status with this body (application/octet-stream).
    Status(u16, Vec<u8>),
    /// 200 `text/html; charset=utf-8` with this body.
    Html(String),
    /// Content-Length of the whole body, but only the first N bytes are sent
    /// before the connection is closed (FIN).
    ShortBody(Vec<u8>, usize),
    /// Headers and the first half of the body, then a pause of the duration
    /// (cut short if the server is dropped), then the rest.
    Slow(Vec<u8>, Duration),
    /// Content-Length of the whole body, the first half sent, then the
    /// connection is reset (RST, see `respond`); the client gets at most half.
    Reset(Vec<u8>),
    /// The n-th request (since the last `set`) gets the n-th route; after the
    /// last one the last one repeats. Empty → 500. Do not nest.
    Sequence(Vec<Route>),
    /// This status (429 or 503) with `Retry-After: <secs>` and a short text body.
    RetryAfter(u16, u64),
    /// No answer until [`HttpServer::release`] for this target (or the server
    /// drops, or a 120 s safety cap), then like [`Route::Ok`].
    Hold(Vec<u8>),
    /// 302 with `Location: <the string>` (absolute URL or path) and an empty body.
    Redirect(String),
    /// These exact bytes as the whole response (status line, headers, body),
    /// then close: for chunked encoding, missing Content-Length, and so on.
    Raw(Vec<u8>),
    /// 200 with the full Content-Length, the body sent at this many bytes per
    /// second (in 10 ms steps), like a slow link.
    Throttled(Vec<u8>, u64),
    /// No answer for the duration (cut short if the server drops), then like [`Route::Ok`].
    Delayed(Vec<u8>, Duration),
    /// These bytes, then an endless stream of `b` until the client goes away
    /// (or 120 s pass): a hostile server.
    Endless(Vec<u8>),
    /// A file served as a real static server does: validators, ranges,
    /// conditional requests, and scripted cuts, stalls and a rate (see [`Ranged`]).
    Ranged(Arc<Ranged>),
}

/// A file for [`Route::Ranged`]. Requests are numbered from 0 per route
/// (since it was set); `cuts[n]` closes the n-th response's connection once
/// the file up to that offset has been sent.
#[derive(Debug, Default)]
pub struct Ranged {
    /// The file.
    pub body: Vec<u8>,
    /// `ETag`, if sent (with its quotes).
    pub etag: Option<String>,
    /// `Last-Modified`, if sent.
    pub last_modified: Option<String>,
    /// Body bytes per second, if throttled.
    pub rate: Option<u64>,
    /// Per request: the file offset at which the connection is closed.
    pub cuts: Vec<Option<u64>>,
    /// Per request: the file offset at which sending pauses, and for how long.
    pub stalls: Vec<Option<(u64, Duration)>>,
}

impl Ranged {
    /// A file with a strong ETag and a Last-Modified date.
    pub fn new(body: Vec<u8>, etag: &str) -> Ranged {
        Ranged {
            body,
            etag: Some(format!("\"{etag}\"")),
            last_modified: Some("Tue, 01 Dec 2026 10:00:00 GMT".into()),
            ..Ranged::default()
        }
    }
}

/// Safety cap for [`Route::Hold`] so a forgotten release cannot leak a thread.
const HOLD_CAP: Duration = Duration::from_secs(120);

/// A route plus how many requests it has served since it was set.
struct Slot {
    /// The configured route.
    route: Route,
    /// Requests served since `set` (indexes [`Route::Sequence`]).
    served: usize,
}

/// Whether [`Route::Ok`] answers keep the connection open for more requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// `Connection: close` after every answer.
    #[default]
    Off,
    /// HTTP/1.1 keep-alive: more requests on the same connection.
    On,
    /// Says keep-alive, but closes after each answer (as a server whose idle
    /// timeout is shorter than the client thinks).
    Lies,
}

/// Server state behind one mutex so waits can use one condvar.
#[derive(Default)]
struct ServerState {
    /// Set on drop; wakes Slow/Hold and stops accepting.
    stopping: bool,
    /// Routes by raw request target.
    routes: HashMap<String, Slot>,
    /// Requests received per raw target.
    hits: HashMap<String, usize>,
    /// All raw targets in arrival order.
    requests: Vec<String>,
    /// Body bytes written per raw target (all requests).
    sent: HashMap<String, u64>,
    /// Request heads per raw target, in arrival order.
    heads: HashMap<String, Vec<Vec<(String, String)>>>,
    /// When each request for a raw target arrived, in order.
    times: HashMap<String, Vec<Instant>>,
    /// How [`Route::Ok`] answers treat the connection.
    keep_alive: KeepAlive,
    /// Connections accepted.
    connections: usize,
    /// Targets whose Hold has been released (until the next `set`).
    released: HashSet<String>,
}

/// State shared by the server handle and its threads.
#[derive(Default)]
struct ServerShared {
    /// The state.
    state: Mutex<ServerState>,
    /// Signalled on release and on stop.
    cond: Condvar,
}

impl ServerShared {
    /// Waits until `done(state)` or stopping or `timeout`; returns whether
    /// the server is stopping.
    fn wait(&self, timeout: Duration, done: impl Fn(&ServerState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if st.stopping || done(&st) {
                return st.stopping;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A real HTTP/1.1 server on 127.0.0.1 (one thread per connection,
/// `Connection: close` on every response) serving scripted [`Route`]s keyed by
/// the raw request target (path plus query, undecoded). Stops accepting on drop.
pub struct HttpServer {
    /// Listening address.
    addr: SocketAddr,
    /// State shared with the threads.
    shared: Arc<ServerShared>,
    /// The accept loop.
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds 127.0.0.1:0 and starts accepting with no routes (all 404).
    pub fn start() -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind http server");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(ServerShared::default());
        let s = shared.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if lock(&s.state).stopping {
                    break;
                }
                if let Ok(stream) = conn {
                    lock(&s.state).connections += 1;
                    let s = s.clone();
                    thread::spawn(move || handle_http(stream, &s));
                }
            }
        });
        HttpServer {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// How [`Route::Ok`] answers treat the connection from now on.
    pub fn set_keep_alive(&self, mode: KeepAlive) {
        lock(&self.shared.state).keep_alive = mode;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        lock(&self.shared.state).connections
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Sets (or replaces) the route for a raw target; resets its Sequence
    /// position and its Hold release.
    pub fn set(&self, path: &str, route: Route) {
        let mut st = lock(&self.shared.state);
        st.routes.insert(path.to_owned(), Slot { route, served: 0 });
        st.released.remove(path);
    }

    /// Lets held requests for `path` answer, now and (until the next `set`)
    /// later ones too.
    pub fn release(&self, path: &str) {
        lock(&self.shared.state).released.insert(path.to_owned());
        self.shared.cond.notify_all();
    }

    /// How many requests arrived for this exact raw target.
    pub fn hits(&self, path: &str) -> usize {
        lock(&self.shared.state)
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until [`HttpServer::hits`] for `path` reaches `n`.
    pub fn wait_hits(&self, path: &str, n: usize, timeout: Duration) {
        wait_until(&format!("{n} request(s) for {path}"), timeout, || {
            self.hits(path) >= n
        });
    }

    /// All raw targets received, in order.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.state).requests.clone()
    }

    /// Body bytes written for this raw target so far, all requests together.
    pub fn sent(&self, path: &str) -> u64 {
        lock(&self.shared.state)
            .sent
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// When each request for this raw target arrived, in order.
    pub fn request_times(&self, path: &str) -> Vec<Instant> {
        lock(&self.shared.state)
            .times
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// The request headers of each request for this raw target, in order.
    pub fn request_headers(&self, path: &str) -> Vec<Vec<(String, String)>> {
        lock(&self.shared.state)
            .heads
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for HttpServer {
    /// Stops accepting, wakes Slow/Hold responders, joins the accept loop.
    fn drop(&mut self) {
        lock(&self.shared.state).stopping = true;
        self.shared.cond.notify_all();
        // Unblock accept(); a loopback connect to a live listener succeeds.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok() {
            if let Some(h) = self.accept.take() {
                let _ = h.join();
            }
        }
    }
}

/// A parsed request head.
struct RequestHead {
    /// Method, e.g. `GET`.
    method: String,
    /// Raw request target.
    target: String,
    /// Length of the head including the blank line.
    head_len: usize,
    /// Declared request body length.
    body_len: usize,
    /// Header names and values.
    headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first value of header `name` (any case).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request head with `peek` (leaving it in the socket so that
/// [`Route::Reset`] can close with unread data, which makes Linux send RST).
/// Bounded by a 5 s deadline and a 64 KiB head limit.
fn peek_request(stream: &TcpStream) -> io::Result<RequestHead> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(pos) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
            let mut lines = head.split("\r\n");
            let mut parts = lines.next().unwrap_or("").split(' ');
            let method = parts.next().unwrap_or("").to_owned();
            let target = parts.next().unwrap_or("").to_owned();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            let body_len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            return Ok(RequestHead {
                method,
                target,
                head_len: pos + 4,
                body_len,
                headers,
            });
        }
        if n == buf.len() || Instant::now() >= deadline {
            return Err(io::ErrorKind::InvalidData.into());
        }
        if n == last {
            // Partial head and no new data yet: peek would return at once.
            thread::sleep(Duration::from_millis(5));
        }
        last = n;
    }
}

/// Consumes the request head and body from the socket (bounded by the 5 s
/// read timeout).
fn consume_request(mut stream: &TcpStream, head: &RequestHead) {
    let mut rest = head.head_len + head.body_len;
    let mut buf = [0u8; 8192];
    while rest > 0 {
        match stream.read(&mut buf[..rest.min(8192)]) {
            Ok(0) | Err(_) => return,
            Ok(n) => rest -= n,
        }
    }
}

/// Guesses a Content-Type from magic bytes.
fn content_type(body: &[u8]) -> &'static str {
    if body.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if body.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else {
        "application/octet-stream"
    }
}

/// Reason phrase for common status codes.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Builds a response head with `Connection: close`.
fn response_head(status: u16, ctype: &str, len: usize, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n",
        reason(status)
    )
    .into_bytes()
}

/// Serves one connection: one request, one response, close (with
/// [`KeepAlive::On`], more requests while the answers are [`Route::Ok`]).
fn handle_http(stream: TcpStream, shared: &ServerShared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    while serve_one(&stream, shared) {}
}

/// Serves one request; true when the connection stays open for another.
fn serve_one(stream: &TcpStream, shared: &ServerShared) -> bool {
    let stream = stream.try_clone().expect("clone the connection");
    let Ok(head) = peek_request(&stream) else {
        return false;
    };
    let mut n = 0;
    let route = {
        let mut st = lock(&shared.state);
        *st.hits.entry(head.target.clone()).or_insert(0) += 1;
        st.requests.push(head.target.clone());
        st.heads
            .entry(head.target.clone())
            .or_default()
            .push(head.headers.clone());
        st.times
            .entry(head.target.clone())
            .or_default()
            .push(Instant::now());
        st.routes.get_mut(&head.target).map(|slot| {
            n = slot.served;
            slot.served += 1;
            match &slot.route {
                Route::Sequence(seq) if seq.is_empty() => {
                    Route::Status(500, b"empty Route::Sequence\n".to_vec())
                }
                Route::Sequence(seq) => seq[n.min(seq.len() - 1)].clone(),
                other => other.clone(),
            }
        })
    };
    if !matches!(route, Some(Route::Reset(_))) {
        consume_request(&stream, &head);
    }
    if let Some(Route::Ranged(file)) = &route {
        let _ = serve_ranged(&stream, file, n, &head, shared);
        return false;
    }
    let mode = lock(&shared.state).keep_alive;
    if let (Some(Route::Ok(body)), KeepAlive::On | KeepAlive::Lies) = (&route, mode) {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
            content_type(body),
            body.len()
        );
        let mut w = &stream;
        let sent = w
            .write_all(answer.as_bytes())
            .and_then(|()| w.write_all(body))
            .and_then(|()| w.flush());
        return sent.is_ok() && mode == KeepAlive::On;
    }
    let head_only = head.method.eq_ignore_ascii_case("HEAD");
    let _ = respond(&stream, route, &head.target, head_only, shared);
    false
}

/// Serves the n-th request for a [`Route::Ranged`] file.
fn serve_ranged(
    mut stream: &TcpStream,
    file: &Ranged,
    n: usize,
    head: &RequestHead,
    shared: &ServerShared,
) -> io::Result<()> {
    let len = file.body.len() as u64;
    let matches =
        |v: &str| file.etag.as_deref() == Some(v) || file.last_modified.as_deref() == Some(v);
    let mut validators = String::new();
    if let Some(e) = &file.etag {
        validators.push_str(&format!("ETag: {e}\r\n"));
    }
    if let Some(l) = &file.last_modified {
        validators.push_str(&format!("Last-Modified: {l}\r\n"));
    }
    let not_modified = head
        .header("if-none-match")
        .map(|v| file.etag.as_deref() == Some(v))
        .or_else(|| {
            head.header("if-modified-since")
                .map(|v| file.last_modified.as_deref() == Some(v))
        })
        .unwrap_or(false);
    if not_modified {
        stream.write_all(
            format!("HTTP/1.1 304 Not Modified\r\nConnection: close\r\n{validators}\r\n")
                .as_bytes(),
        )?;
        return stream.flush();
    }
    let range_start = head
        .header("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|_| head.header("if-range").is_none_or(matches));
    let start = match range_start {
        Some(s) if s >= len => {
            stream.write_all(format!("HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n{validators}\r\n").as_bytes())?;
            return stream.flush();
        }
        Some(s) => {
            stream.write_all(format!("HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n{validators}\r\n", len - 1, len - s).as_bytes())?;
            s
        }
        None => {
            stream.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n{validators}\r\n").as_bytes())?;
            0
        }
    };
    let cut = file.cuts.get(n).copied().flatten().unwrap_or(len).min(len);
    let stall = file.stalls.get(n).copied().flatten();
    let started = Instant::now();
    let mut offset = start;
    let mut stalled = false;
    while offset < cut {
        let mut step = (64 * 1024).min(cut - offset);
        if let Some(rate) = file.rate {
            step = step.min((rate / 100).max(1));
        }
        if let Some((at, pause)) = stall {
            if !stalled && offset >= at {
                stalled = true;
                if shared.wait(pause, |_| false) {
                    return Ok(());
                }
            } else if !stalled && offset + step > at {
                step = at - offset;
            }
        }
        stream.write_all(&file.body[offset as usize..(offset + step) as usize])?;
        offset += step;
        *lock(&shared.state)
            .sent
            .entry(head.target.clone())
            .or_insert(0) += step;
        if let Some(rate) = file.rate {
            let due = started + Duration::from_secs_f64((offset - start) as f64 / rate as f64);
            if shared.wait(due.saturating_duration_since(Instant::now()), |_| false) {
                return Ok(());
            }
        }
    }
    stream.flush()
}

/// Writes the response for `route` (None → 404).
fn respond(
    mut stream: &TcpStream,
    route: Option<Route>,
    target: &str,
    head_only: bool,
    shared: &ServerShared,
) -> io::Result<()> {
    let mut send = |head: Vec<u8>, body: &[u8]| -> io::Result<()> {
        stream.write_all(&head)?;
        if !head_only {
            stream.write_all(body)?;
        }
        stream.flush()
    };
    match route {
        None => send(response_head(404, "text/plain", 10, ""), b"not found\n"),
        Some(Route::Ok(body)) => send(
            response_head(200, content_type(&body), body.len(), ""),
            &body,
        ),
        Some(Route::Status(code, body)) => send(
            response_head(code, "application/octet-stream", body.len(), ""),
            &body,
        ),
        Some(Route::Html(body)) => send(
            response_head(200, "text/html; charset=utf-8", body.len(), ""),
            body.as_bytes(),
        ),
        Some(Route::ShortBody(body, n)) => send(
            response_head(200, content_type(&body), body.len(), ""),
            &body[..n.min(body.len())],
        ),
        Some(Route::Slow(body, pause)) => {
            let half = body.len() / 2;
            send(
                response_head(200, content_type(&body), body.len(), ""),
                &body[..half],
            )?;
            shared.wait(pause, |_| false);
            if !head_only {
                stream.write_all(&body[half..])?;
            }
            stream.flush()
        }
        Some(Route::Reset(body)) => {
            send(
                response_head(200, content_type(&body), body.len(), ""),
                &body[..body.len() / 2],
            )?;
            // The request is still unread (peeked only): dropping the socket
            // now makes the kernel send RST instead of FIN. Data still in our
            // send queue is discarded, so the client may see less than half.
            Ok(())
        }
        Some(Route::RetryAfter(code, secs)) => send(
            response_head(code, "text/plain", 12, &format!("Retry-After: {secs}\r\n")),
            b"retry later\n",
        ),
        Some(Route::Hold(body)) => {
            shared.wait(HOLD_CAP, |st| st.released.contains(target));
            send(
                response_head(200, content_type(&body), body.len(), ""),
                &body,
            )
        }
        Some(Route::Redirect(location)) => send(
            response_head(302, "text/plain", 0, &format!("Location: {location}\r\n")),
            b"",
        ),
        Some(Route::Raw(bytes)) => {
            stream.write_all(&bytes)?;
            stream.flush()
        }
        Some(Route::Sequence(_)) => send(
            response_head(500, "text/plain", 25, ""),
            b"nested Route::Sequence!\r\n",
        ),
        Some(Route::Throttled(body, rate)) => {
            stream.write_all(&response_head(200, content_type(&body), body.len(), ""))?;
            if head_only {
                return stream.flush();
            }
            let step = Duration::from_millis(10);
            let per_step = (rate as usize / 100).max(1);
            let started = Instant::now();
            let mut sent = 0;
            while sent < body.len() {
                let n = per_step.min(body.len() - sent);
                stream.write_all(&body[sent..sent + n])?;
                sent += n;
                // Keep the average rate, whatever the scheduler did.
                let due = started + step * (sent / per_step) as u32;
                if shared.wait(due.saturating_duration_since(Instant::now()), |_| false) {
                    return Ok(());
                }
            }
            stream.flush()
        }
        Some(Route::Delayed(body, pause)) => {
            if shared.wait(pause, |_| false) {
                return Ok(());
            }
            send(
                response_head(200, content_type(&body), body.len(), ""),
                &body,
            )
        }
        Some(Route::Ranged(_)) => unreachable!("served by serve_ranged"),
        Some(Route::Endless(prefix)) => {
            stream.write_all(&prefix)?;
            let junk = vec![b'b'; 64 * 1024];
            let until = Instant::now() + HOLD_CAP;
            while Instant::now() < until && !lock(&shared.state).stopping {
                stream.write_all(&junk)?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------
// TCP sink (fake projector)
// ---------------------------------------------------------------------------

/// A TCP listener on 127.0.0.1 that records every byte any client sends
/// (e.g. a stand-in projector). Never replies. Stops on drop.
pub struct TcpSink {
    /// The listening port.
    pub port: u16,
    /// Received bytes (all connections, arrival order) and connection count.
    state: Arc<Mutex<(Vec<u8>, usize)>>,
    /// Set on drop.
    stopping: Arc<AtomicBool>,
    /// The accept loop.
    accept: Option<JoinHandle<()>>,
}

impl TcpSink {
    /// Binds 127.0.0.1:0 and starts recording.
    pub fn start() -> TcpSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind tcp sink");
        let port = listener.local_addr().expect("local_addr").port();
        let state = Arc::new(Mutex::new((Vec::new(), 0)));
        let stopping = Arc::new(AtomicBool::new(false));
        let (st, stop) = (state.clone(), stopping.clone());
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = conn else { continue };
                lock(&st).1 += 1;
                let (st, stop) = (st.clone(), stop.clone());
                thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 8192];
                    while !stop.load(Ordering::SeqCst) {
                        match stream.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => lock(&st).0.extend_from_slice(&buf[..n]),
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        TcpSink {
            port,
            state,
            stopping,
            accept: Some(accept),
        }
    }

    /// All bytes received so far.
    pub fn received(&self) -> Vec<u8> {
        lock(&self.state).0.clone()
    }

    /// All bytes received so far, as lossy UTF-8.
    pub fn received_string(&self) -> String {
        String::from_utf8_lossy(&self.received()).into_owned()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        lock(&self.state).1
    }

    /// Waits until the received text satisfies `pred`; returns it.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let ok = poll_until(timeout, || pred(&self.received_string()));
        let text = self.received_string();
        assert!(
            ok,
            "timed out after {timeout:?} waiting for TcpSink data; got {text:?}"
        );
        text
    }
}

impl Drop for TcpSink {
    /// Stops accepting and reading.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
            if let Some(h) = self.accept.take() {
                let _ = h.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------

/// Deterministic RGB8 pixels: gradients plus seeded noise.
fn pixels(width: usize, height: usize, seed: u32) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let phase = (seed as usize).wrapping_mul(37);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let z = next();
            let r = x * 255 / width.max(1) + phase + (z & 0x3f) as usize;
            let g = y * 255 / height.max(1) + phase / 3 + ((z >> 8) & 0x3f) as usize;
            let b = (x + y) * 255 / (width + height).max(1) + ((z >> 16) & 0x7f) as usize;
            data.extend_from_slice(&[r as u8, g as u8, b as u8]);
        }
    }
    data
}

/// A deterministic baseline JPEG (RGB, quality 85); different seeds give
/// different bytes.
pub fn jpeg(width: u16, height: u16, seed: u32) -> Vec<u8> {
    let data = pixels(usize::from(width), usize::from(height), seed);
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85)
        .encode(&data, width, height, jpeg_encoder::ColorType::Rgb)
        .expect("encode jpeg");
    out
}

/// A deterministic RGB8 PNG; different seeds give different bytes.
pub fn png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let data = pixels(width as usize, height as usize, seed);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("png header");
    writer.write_image_data(&data).expect("png data");
    writer.finish().expect("png finish");
    out
}

// ---------------------------------------------------------------------------
// The agent
// ---------------------------------------------------------------------------

/// The native holosync binary built by cargo for these tests, or the one
/// `HOLOSYNC_BIN` names (e.g. an older build, to show a test fails there).
pub fn holosync_exe() -> PathBuf {
    std::env::var_os("HOLOSYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_holosync")))
}

/// The one place that knows how to run holosync: the native binary with
/// `args`, or, if `HOLOSYNC_EXE` names a Windows exe, `wine64 <exe> args...`
/// with `WINEDEBUG=-all` (and `WINEPREFIX` inherited from the environment or
/// Wine's default). Under Wine, arguments that are absolute Unix paths are
/// rewritten to `Z:\...`.
pub fn command(args: &[&str]) -> Command {
    command_for(&exe_under_test(), args)
}

/// The executable under test: the Windows exe named by `HOLOSYNC_EXE`, else
/// the native binary cargo built.
pub fn exe_under_test() -> PathBuf {
    std::env::var_os("HOLOSYNC_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(holosync_exe)
}

/// True when the tests drive the Windows exe under Wine.
pub fn under_wine() -> bool {
    std::env::var_os("HOLOSYNC_EXE").is_some()
}

/// Runs `exe` (a copy of [`exe_under_test`], say) with `args`, under Wine
/// when `HOLOSYNC_EXE` is set.
pub fn command_for(exe: &Path, args: &[&str]) -> Command {
    if !under_wine() {
        let mut cmd = Command::new(exe);
        cmd.args(args);
        return cmd;
    }
    let mut cmd = Command::new(wine_loader());
    cmd.arg(exe).env("WINEDEBUG", "-all");
    if let Some(prefix) = std::env::var_os("WINEPREFIX") {
        cmd.env("WINEPREFIX", prefix);
    }
    for arg in args {
        if arg.starts_with('/') {
            cmd.arg(format!("Z:{}", arg.replace('/', "\\")));
        } else {
            cmd.arg(arg);
        }
    }
    cmd
}

/// Wine's 64-bit loader, which also starts 32-bit exes (Debian's wine64
/// package puts it outside PATH).
pub fn wine_loader() -> PathBuf {
    let debian = Path::new("/usr/lib/wine/wine64");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("wine64")
    }
}

/// The agent of `config` started under `strace -f` with `strace_args`
/// (`-e` filters and faults), its trace written to `trace`. Dropping the
/// guard kills the agent and strace (a killed strace leaves its tracee
/// running, so the agent's pid is taken from the trace).
pub fn traced_agent(config: &Path, trace: &Path, strace_args: &[&str]) -> TracedAgent {
    let mut cmd = Command::new(find_program("strace"));
    cmd.args(["-f", "-qq"])
        .args(strace_args)
        .arg("-o")
        .arg(trace)
        .arg(holosync_exe())
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    TracedAgent(cmd.spawn().expect("spawn strace"), trace.to_path_buf())
}

/// See [`traced_agent`].
pub struct TracedAgent(Child, PathBuf);

impl Drop for TracedAgent {
    fn drop(&mut self) {
        let text = read_lossy(&self.1);
        if let Some(pid) = text
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
        {
            send_signal(pid, "KILL");
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real holosync binary, configured by `<dir>/config.json`, with
/// stdout/stderr appended to `<dir>/stdout.txt` / `<dir>/stderr.txt`.
/// Killed on drop.
pub struct Agent {
    /// Working directory holding config, db, cache and logs.
    dir: PathBuf,
    /// The config as written.
    config: Value,
    /// The running daemon, if any.
    child: Option<Child>,
}

impl Agent {
    /// Creates `dir` if needed and writes `config` to `dir/config.json` (pretty).
    pub fn new(dir: &Path, config: Value) -> Agent {
        fs::create_dir_all(dir).expect("create agent dir");
        let text = serde_json::to_string_pretty(&config).expect("serialize config");
        fs::write(dir.join("config.json"), text).expect("write config.json");
        Agent {
            dir: dir.to_owned(),
            config,
            child: None,
        }
    }

    /// The default test config for a broker on `mqtt_port` (unique client id,
    /// fast download timings, debug log at `holosync.log`).
    pub fn default_config(mqtt_port: u16) -> Value {
        json!({
            "mqtt": {
                "host": "127.0.0.1",
                "port": mqtt_port,
                "client_id": format!("test-{}", unique()),
                "keep_alive_secs": 10,
                "sync_topics": ["sync", "sync-single-work", "holo-file-sync"],
                "projector_topic": "projector-remote-control"
            },
            "cache_dir": "images",
            "database": "holosync.db",
            "download": {
                "interval_ms": 100,
                "timeout_secs": 3,
                "max_bytes": 10485760,
                "max_attempts": 5,
                "retry_base_ms": 200,
                "retry_max_ms": 2000
            },
            "log": {
                "file": "holosync.log",
                "level": "debug",
                "max_bytes": 10485760,
                "keep": 2
            }
        })
    }

    /// The agent's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The config as written by [`Agent::new`].
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Resolves a config path value against the agent dir.
    fn config_file(&self, value: &Value, default: &str) -> PathBuf {
        self.dir.join(value.as_str().unwrap_or(default))
    }

    /// Spawns the daemon (`holosync --config <dir>/config.json`); panics if
    /// it is already running.
    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// [`Agent::start`] with extra environment variables (libfaketime's, say).
    pub fn start_with_env(&mut self, vars: &[(&str, &str)]) {
        assert!(!self.is_running(), "agent already running");
        let config = self.config_path();
        let mut cmd = command(&["--config", config.to_str().expect("utf-8 path")]);
        cmd.envs(vars.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(append_file(&self.dir.join("stdout.txt")))
            .stderr(append_file(&self.dir.join("stderr.txt")));
        self.child = Some(cmd.spawn().expect("spawn holosync"));
    }

    /// SIGKILL and reap (a crash, as far as the agent can tell). No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, wait up to 10 s (then SIGKILL); returns the exit status, or
    /// None if it was not started.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        Some(terminate_child(&mut child, Duration::from_secs(10)))
    }

    /// Waits up to `timeout` for the daemon to exit on its own; panics (with
    /// the log tail) if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("agent was not started");
        let mut status = None;
        poll_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        match status {
            Some(s) => s,
            None => panic!(
                "agent still running after {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Whether the daemon process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The daemon's process id, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's peak resident memory so far (`VmHWM`), in KiB (Linux only).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The log file (`log.file`, default `holosync.log`) so far; "" if missing.
    pub fn log(&self) -> String {
        read_lossy(&self.config_file(&self.config["log"]["file"], "holosync.log"))
    }

    /// The daemon's stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.join("stdout.txt"))
    }

    /// The daemon's stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.join("stderr.txt"))
    }

    /// Log tail and stderr tail, for panic messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- holosync.log (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            tail(&self.log(), 3000),
            tail(&self.stderr(), 1500)
        )
    }

    /// Waits until the log contains `needle` and returns the log; panics with
    /// the last 3000 chars of the log otherwise.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        let mut log = String::new();
        if poll_until(timeout, || {
            log = self.log();
            log.contains(needle)
        }) {
            return log;
        }
        panic!(
            "timed out after {timeout:?} waiting for log line {needle:?}\n{}",
            self.diagnostics()
        );
    }

    /// Runs the binary with `args` plus `--config <dir>/config.json` (bounded: 60 s).
    pub fn run(&self, args: &[&str]) -> Output {
        let config = self.config_path();
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().expect("utf-8 path")]);
        run_bounded(command(&all), None, Duration::from_secs(60))
    }

    /// `holosync status --json`, asserting success; the parsed JSON.
    pub fn status(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status output is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The cache dir (`cache_dir`, default `images`, under the agent dir).
    pub fn cache(&self) -> PathBuf {
        self.config_file(&self.config["cache_dir"], "images")
    }

    /// The queue's rows so far, read from its database: url -> (state,
    /// attempts, last error or ""). Empty while there is no queue yet.
    pub fn rows(&self) -> std::collections::HashMap<String, (String, i64, String)> {
        let read = || -> rusqlite::Result<_> {
            let db = rusqlite::Connection::open(self.dir.join("holosync.db"))?;
            let mut st =
                db.prepare("SELECT url, state, attempts, COALESCE(last_error, '') FROM queue")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?;
            rows.collect()
        };
        read().unwrap_or_default()
    }

    /// Waits until every one of `urls` has had its first verdict (done,
    /// failed, or an attempt counted) and returns the rows; panics with the
    /// rows and the log tail otherwise.
    pub fn wait_tried(
        &self,
        urls: &[String],
        timeout: Duration,
    ) -> std::collections::HashMap<String, (String, i64, String)> {
        let mut last = std::collections::HashMap::new();
        let tried = poll_until(timeout, || {
            last = self.rows();
            urls.iter().all(|u| {
                last.get(u).is_some_and(|(state, attempts, _)| {
                    state == "done" || state == "failed" || *attempts >= 1
                })
            })
        });
        assert!(
            tried,
            "not every URL was tried after {timeout:?}: {last:#?}\n{}",
            self.diagnostics()
        );
        last
    }

    /// Polls `status` until its top-level `done` is at least `n`; returns
    /// that status. A failing status command just counts as "not yet".
    pub fn wait_done(&self, n: u64, timeout: Duration) -> Value {
        let mut last = String::from("(no status yet)");
        let mut found = None;
        poll_until(timeout, || {
            let out = self.run(&["status", "--json"]);
            if !out.status.success() {
                last = format!("status failed: {}", String::from_utf8_lossy(&out.stderr));
                return false;
            }
            match serde_json::from_slice::<Value>(&out.stdout) {
                Ok(v) if v["done"].as_u64().is_some_and(|d| d >= n) => {
                    found = Some(v);
                    true
                }
                Ok(v) => {
                    last = v.to_string();
                    false
                }
                Err(e) => {
                    last = format!("bad status JSON ({e})");
                    false
                }
            }
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for done >= {n}; last status: {last}\n{}",
                self.diagnostics()
            )
        })
    }
}

impl Drop for Agent {
    /// Kills the daemon if it is still running.
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Fault-injecting HTTP server (soak tests)
// ---------------------------------------------------------------------------

/// A fault [`FlakyServer`] can answer with instead of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Full Content-Length, the first half of the body, then RST (like [`Route::Reset`]).
    Reset,
    /// 500 with a short body.
    Status500,
    /// 503 with a short body and no Retry-After.
    Status503,
    /// 429 with `Retry-After: <retry_after_secs>` (like [`Route::RetryAfter`]).
    TooManyRequests,
    /// Headers and half the body, then a pause of `slow_pause` (cut short
    /// when the server drops), then the rest (like [`Route::Slow`]).
    Slow,
    /// Full Content-Length, a third of the body, then FIN (like [`Route::ShortBody`]).
    ShortBody,
}

impl Fault {
    /// Every fault with its relative weight when one is picked.
    pub const WEIGHTED: [(Fault, u64); 6] = [
        (Fault::Reset, 2),
        (Fault::Status500, 2),
        (Fault::Status503, 2),
        (Fault::TooManyRequests, 2),
        (Fault::Slow, 1),
        (Fault::ShortBody, 2),
    ];
}

/// How a [`FlakyServer`] misbehaves.
#[derive(Clone, Debug)]
pub struct FaultPlan {
    /// Seed of the per-request choice.
    pub seed: u64,
    /// Share of requests (0-100) that get a fault.
    pub rate_percent: u64,
    /// Pause inside the body for [`Fault::Slow`]; make it longer than the
    /// client's timeout.
    pub slow_pause: Duration,
    /// `Retry-After` seconds sent with [`Fault::TooManyRequests`].
    pub retry_after_secs: u64,
}

/// State shared by a [`FlakyServer`] and its threads.
#[derive(Default)]
struct FlakyState {
    /// Set on drop; wakes slow responders and stops accepting.
    stopping: bool,
    /// Bodies by raw request target.
    bodies: HashMap<String, Arc<Vec<u8>>>,
    /// Requests received per raw target (indexes the fault choice).
    hits: HashMap<String, u64>,
    /// Current fault share (0-100).
    rate_percent: u64,
    /// Faults injected so far, per kind.
    faults: HashMap<Fault, u64>,
    /// Complete 200 answers started.
    ok: u64,
}

/// State plus a condvar (wakes [`Fault::Slow`] responders on drop).
#[derive(Default)]
struct FlakyShared {
    /// The state.
    state: Mutex<FlakyState>,
    /// Signalled on stop.
    cond: Condvar,
}

/// A real HTTP/1.1 server on 127.0.0.1 (thread per connection,
/// `Connection: close`) serving files by raw request target, where a
/// deterministic share of requests gets a [`Fault`] instead. The choice for
/// the n-th request of a target is a pure function of (seed, target, n), so a
/// seed replays the same faults per URL and attempt. Unknown targets get 404
/// and are never faulted. Stops accepting on drop.
pub struct FlakyServer {
    /// Listening address.
    addr: SocketAddr,
    /// The fixed part of the plan (seed, pause, Retry-After).
    plan: FaultPlan,
    /// State shared with the threads.
    shared: Arc<FlakyShared>,
    /// The accept loop.
    accept: Option<JoinHandle<()>>,
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `x`.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The fault (or None) for the `n`-th request (0-based) of `target`.
fn pick_fault(seed: u64, rate_percent: u64, target: &str, n: u64) -> Option<Fault> {
    let name = target.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let h = mix64(seed ^ mix64(name ^ mix64(n)));
    if h % 100 >= rate_percent {
        return None;
    }
    let total: u64 = Fault::WEIGHTED.iter().map(|(_, w)| w).sum();
    let mut roll = (h >> 32) % total;
    for (fault, weight) in Fault::WEIGHTED {
        if roll < weight {
            return Some(fault);
        }
        roll -= weight;
    }
    unreachable!("roll is below the total weight")
}

impl FlakyServer {
    /// Binds 127.0.0.1:0 and starts serving with `plan` (no files yet: all 404).
    pub fn start(plan: FaultPlan) -> FlakyServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind flaky http server");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(FlakyShared::default());
        lock(&shared.state).rate_percent = plan.rate_percent;
        let (s, p) = (shared.clone(), plan.clone());
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if lock(&s.state).stopping {
                    break;
                }
                if let Ok(stream) = conn {
                    let (s, p) = (s.clone(), p.clone());
                    thread::spawn(move || handle_flaky(stream, &s, &p));
                }
            }
        });
        FlakyServer {
            addr,
            plan,
            shared,
            accept: Some(accept),
        }
    }

    /// The plan the server was started with (its rate may have changed since).
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Serves `body` (200, Content-Type from magic bytes) for the raw target `path`.
    pub fn set(&self, path: &str, body: Vec<u8>) {
        lock(&self.shared.state)
            .bodies
            .insert(path.to_owned(), Arc::new(body));
    }

    /// Changes the fault share (0 switches faults off) for requests from now on.
    pub fn set_fault_rate(&self, percent: u64) {
        lock(&self.shared.state).rate_percent = percent.min(100);
    }

    /// Faults injected so far, all kinds.
    pub fn faults(&self) -> u64 {
        lock(&self.shared.state).faults.values().sum()
    }

    /// Faults injected so far, per kind, sorted by kind.
    pub fn fault_counts(&self) -> Vec<(Fault, u64)> {
        let mut v: Vec<_> = lock(&self.shared.state)
            .faults
            .iter()
            .map(|(f, n)| (*f, *n))
            .collect();
        v.sort();
        v
    }

    /// Requests that got the whole file with 200 (sending started, at least).
    pub fn ok_responses(&self) -> u64 {
        lock(&self.shared.state).ok
    }

    /// Requests received, all targets.
    pub fn requests(&self) -> u64 {
        lock(&self.shared.state).hits.values().sum()
    }

    /// Requests received for this raw target.
    pub fn hits(&self, path: &str) -> u64 {
        lock(&self.shared.state)
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FlakyServer {
    /// Stops accepting, wakes slow responders, joins the accept loop.
    fn drop(&mut self) {
        lock(&self.shared.state).stopping = true;
        self.shared.cond.notify_all();
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok() {
            if let Some(h) = self.accept.take() {
                let _ = h.join();
            }
        }
    }
}

/// Serves one connection of a [`FlakyServer`]: one request, one answer, close.
fn handle_flaky(stream: TcpStream, shared: &FlakyShared, plan: &FaultPlan) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let Ok(head) = peek_request(&stream) else {
        return;
    };
    let (body, fault) = {
        let mut st = lock(&shared.state);
        let n = {
            let hits = st.hits.entry(head.target.clone()).or_insert(0);
            *hits += 1;
            *hits - 1
        };
        let body = st.bodies.get(&head.target).cloned();
        let fault = body
            .as_ref()
            .and_then(|_| pick_fault(plan.seed, st.rate_percent, &head.target, n));
        match fault {
            Some(f) => *st.faults.entry(f).or_insert(0) += 1,
            None if body.is_some() => st.ok += 1,
            None => {}
        }
        (body, fault)
    };
    if fault != Some(Fault::Reset) {
        consume_request(&stream, &head);
    }
    let _ = flaky_respond(
        &stream,
        body.as_deref().map(Vec::as_slice),
        fault,
        shared,
        plan,
    );
}

/// Writes the answer for one request of a [`FlakyServer`].
fn flaky_respond(
    mut stream: &TcpStream,
    body: Option<&[u8]>,
    fault: Option<Fault>,
    shared: &FlakyShared,
    plan: &FaultPlan,
) -> io::Result<()> {
    let Some(body) = body else {
        stream.write_all(&response_head(404, "text/plain", 10, ""))?;
        stream.write_all(b"not found\n")?;
        return stream.flush();
    };
    let ok_head = response_head(200, content_type(body), body.len(), "");
    match fault {
        None => {
            stream.write_all(&ok_head)?;
            stream.write_all(body)?;
        }
        Some(Fault::Reset) => {
            stream.write_all(&ok_head)?;
            stream.write_all(&body[..body.len() / 2])?;
            // The request is unread (peeked only): dropping the socket sends RST.
        }
        Some(Fault::Status500) => {
            stream.write_all(&response_head(500, "text/plain", 5, ""))?;
            stream.write_all(b"oops\n")?;
        }
        Some(Fault::Status503) => {
            stream.write_all(&response_head(503, "text/plain", 5, ""))?;
            stream.write_all(b"busy\n")?;
        }
        Some(Fault::TooManyRequests) => {
            let extra = format!("Retry-After: {}\r\n", plan.retry_after_secs);
            stream.write_all(&response_head(429, "text/plain", 12, &extra))?;
            stream.write_all(b"retry later\n")?;
        }
        Some(Fault::Slow) => {
            stream.write_all(&ok_head)?;
            stream.write_all(&body[..body.len() / 2])?;
            stream.flush()?;
            let deadline = Instant::now() + plan.slow_pause;
            let mut st = lock(&shared.state);
            while !st.stopping && Instant::now() < deadline {
                st = shared
                    .cond
                    .wait_timeout(st, deadline.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            drop(st);
            stream.write_all(&body[body.len() / 2..])?;
        }
        Some(Fault::ShortBody) => {
            stream.write_all(&ok_head)?;
            stream.write_all(&body[..body.len() / 3])?;
        }
    }
    stream.flush()
}

// ---------------------------------------------------------------------------
// RabbitMQ's MQTT plugin
// ---------------------------------------------------------------------------

/// RabbitMQ's MQTT plugin, served by the RabbitMQ running on this machine
/// (guest/guest from 127.0.0.1). If the plugin is off, it is turned on with
/// a listener on a free port (1883 is taken by mosquitto), and off again
/// when dropped.
pub struct RabbitMqtt {
    /// Where MQTT clients reach it.
    pub endpoint: Endpoint,
    /// Whether this fixture turned the plugin on (and so turns it off).
    enabled_here: bool,
}

impl RabbitMqtt {
    /// Finds or starts the MQTT listener; Err(reason) when RabbitMQ is not
    /// installed here (the caller fails, or skips with HOLOSYNC_ALLOW_SKIP=1). A RabbitMQ
    /// that is installed but does not answer is a failure, not a skip.
    pub fn start() -> Result<RabbitMqtt, String> {
        let ctl = ["/usr/sbin/rabbitmqctl", "/usr/bin/rabbitmqctl"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or("RabbitMQ is not installed here (no rabbitmqctl)")?;
        let sbin = ctl.parent().expect("rabbitmqctl has a folder");
        let run = |prog: &str, args: &[&str]| {
            let mut cmd = Command::new(sbin.join(prog));
            cmd.args(args);
            run_bounded(cmd, None, Duration::from_secs(120))
        };
        let status = run("rabbitmqctl", &["status"]);
        assert!(
            status.status.success(),
            "RabbitMQ is installed but does not answer: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let listener = |out: &Output| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains("protocol: mqtt"))
                .and_then(|l| l.split("port: ").nth(1))
                .and_then(|p| p.split(',').next())
                .and_then(|p| p.trim().parse::<u16>().ok())
        };
        let mut enabled_here = false;
        let port = match listener(&run("rabbitmq-diagnostics", &["-q", "listeners"])) {
            Some(port) => port,
            None => {
                let port = free_port();
                let set = format!(
                    "application:load(rabbitmq_mqtt), application:set_env(rabbitmq_mqtt, tcp_listeners, [{port}])."
                );
                let out = run("rabbitmqctl", &["eval", &set]);
                assert!(out.status.success(), "{out:?}");
                let out = run("rabbitmq-plugins", &["enable", "rabbitmq_mqtt"]);
                assert!(out.status.success(), "enabling rabbitmq_mqtt: {out:?}");
                enabled_here = true;
                port
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("RabbitMQ's MQTT listener", Duration::from_secs(60), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        });
        Ok(RabbitMqtt {
            endpoint: Endpoint {
                port,
                login: Some(("guest".into(), "guest".into())),
            },
            enabled_here,
        })
    }
}

impl Drop for RabbitMqtt {
    /// Turns the plugin off again if this fixture turned it on (a node that
    /// boots with it on would try port 1883, which mosquitto holds).
    fn drop(&mut self) {
        if self.enabled_here {
            let mut cmd = Command::new("/usr/sbin/rabbitmq-plugins");
            cmd.args(["disable", "rabbitmq_mqtt"]);
            let _ = run_bounded(cmd, None, Duration::from_secs(120));
        }
    }
}

/// RabbitMQ's Web MQTT plugin (MQTT over WebSockets, path `/ws`), served
/// by the RabbitMQ running on this machine: if it is off, it is turned on
/// with its WebSocket listener and the MQTT listener it needs on free ports
/// (1883 is mosquitto's), and both are turned off again when dropped.
pub struct RabbitWebMqtt {
    /// The WebSocket listener's port (path `/ws`).
    pub ws_port: u16,
    /// The plain MQTT listener, for test publishers and subscribers.
    pub endpoint: Endpoint,
    /// Whether this fixture turned the plugins on (and so turns them off).
    enabled_here: bool,
    /// Tests of one binary take the plugin in turn (one turns it off when done).
    _turn: MutexGuard<'static, ()>,
}

/// Held by the [`RabbitWebMqtt`] in use.
static RABBIT_WEB_TURN: Mutex<()> = Mutex::new(());

impl RabbitWebMqtt {
    /// Finds or starts the listeners; Err(reason) when RabbitMQ is not installed.
    pub fn start() -> Result<RabbitWebMqtt, String> {
        RabbitWebMqtt::start_with(None).map(|(r, _)| r)
    }

    /// Like [`RabbitWebMqtt::start`], with a WebSocket-over-TLS listener too,
    /// serving `cert` and `key` (PEM files the broker's user can read); returns
    /// its port. The plugin is (re)started here with that listener.
    pub fn start_tls(cert: &Path, key: &Path) -> Result<(RabbitWebMqtt, u16), String> {
        RabbitWebMqtt::start_with(Some((cert, key)))
            .map(|(r, port)| (r, port.expect("a TLS listener was asked for")))
    }

    fn start_with(tls: Option<(&Path, &Path)>) -> Result<(RabbitWebMqtt, Option<u16>), String> {
        let turn = RABBIT_WEB_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let sbin = Path::new("/usr/sbin");
        if !sbin.join("rabbitmqctl").is_file() {
            return Err("RabbitMQ is not installed here (no rabbitmqctl)".into());
        }
        let run = |prog: &str, args: &[&str]| {
            let mut cmd = Command::new(sbin.join(prog));
            cmd.args(args);
            run_bounded(cmd, None, Duration::from_secs(120))
        };
        let listener = |out: &Output, protocol: &str| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains(&format!("protocol: {protocol},")))
                .and_then(|l| l.split("port: ").nth(1))
                .and_then(|p| p.split(',').next())
                .and_then(|p| p.trim().parse::<u16>().ok())
        };
        let listeners = run("rabbitmq-diagnostics", &["-q", "listeners"]);
        assert!(
            listeners.status.success(),
            "RabbitMQ is installed but does not answer: {listeners:?}"
        );
        let mut enabled_here = false;
        let existing = match (
            listener(&listeners, "http/web-mqtt"),
            listener(&listeners, "mqtt"),
        ) {
            (Some(ws), Some(mqtt)) if tls.is_none() => Some((ws, mqtt)),
            (Some(_), _) => {
                // Started without the TLS listener this test needs: start it again.
                let out = run(
                    "rabbitmq-plugins",
                    &["disable", "rabbitmq_web_mqtt", "rabbitmq_mqtt"],
                );
                assert!(out.status.success(), "{out:?}");
                None
            }
            _ => None,
        };
        let wss_port = tls.map(|_| free_port());
        let (ws_port, mqtt_port) = match existing {
            Some(ports) => ports,
            None => {
                let (ws, mqtt) = (free_port(), free_port());
                let ssl = match (tls, wss_port) {
                    (Some((cert, key)), Some(port)) => format!(
                        ", application:set_env(rabbitmq_web_mqtt, ssl_config, [{{port, {port}}}, {{certfile, \"{}\"}}, {{keyfile, \"{}\"}}])",
                        cert.display(),
                        key.display()
                    ),
                    _ => ", application:unset_env(rabbitmq_web_mqtt, ssl_config)".to_string(),
                };
                let set = format!(
                    "application:load(rabbitmq_mqtt), application:set_env(rabbitmq_mqtt, tcp_listeners, [{mqtt}]), \
                     application:load(rabbitmq_web_mqtt), application:set_env(rabbitmq_web_mqtt, tcp_config, [{{port, {ws}}}]){ssl}."
                );
                let out = run("rabbitmqctl", &["eval", &set]);
                assert!(out.status.success(), "{out:?}");
                let out = run("rabbitmq-plugins", &["enable", "rabbitmq_web_mqtt"]);
                assert!(out.status.success(), "enabling rabbitmq_web_mqtt: {out:?}");
                enabled_here = true;
                (ws, mqtt)
            }
        };
        for port in [Some(ws_port), Some(mqtt_port), wss_port]
            .into_iter()
            .flatten()
        {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_until("RabbitMQ's listeners", Duration::from_secs(60), || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
            });
        }
        Ok((
            RabbitWebMqtt {
                ws_port,
                endpoint: Endpoint {
                    port: mqtt_port,
                    login: Some(("guest".into(), "guest".into())),
                },
                enabled_here: enabled_here || tls.is_some(),
                _turn: turn,
            },
            wss_port,
        ))
    }
}

impl Drop for RabbitWebMqtt {
    /// Turns the plugins off again if this fixture turned them on.
    fn drop(&mut self) {
        if self.enabled_here {
            let mut cmd = Command::new("/usr/sbin/rabbitmq-plugins");
            cmd.args(["disable", "rabbitmq_web_mqtt", "rabbitmq_mqtt"]);
            let _ = run_bounded(cmd, None, Duration::from_secs(120));
        }
    }
}

/// Applies a JSON merge patch: objects merge key by key, anything else replaces.
pub fn merge(base: &mut Value, patch: Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p,
    }
}

/// Starts an agent in `dir` with [`Agent::default_config`] changed by
/// `patch`, and waits (30 s at most) for its subscription.
pub fn agent_with(dir: &Path, broker: &Mosquitto, patch: Value) -> Agent {
    let mut config = Agent::default_config(broker.port);
    merge(&mut config, patch);
    let mut agent = Agent::new(dir, config);
    agent.start();
    agent.wait_log("subscribed to", Duration::from_secs(30));
    agent
}

// ---------------------------------------------------------------------------
// A forward proxy
// ---------------------------------------------------------------------------

/// What a [`TestProxy`] saw: one line per request (`CONNECT host:port`,
/// `GET http://...`) and the `Proxy-Authorization` it carried.
#[derive(Debug, Clone, Default)]
pub struct ProxyLog {
    /// Request lines, in arrival order.
    pub requests: Vec<String>,
    /// Requests refused with 407.
    pub refused: usize,
}

/// A small HTTP forward proxy on 127.0.0.1, as a venue's network has: it
/// takes absolute-form requests (`GET http://host/...`) and `CONNECT`
/// tunnels, may ask for Basic credentials (407 without them), and resolves
/// host names through its own table, so a name only the proxy knows is
/// reachable only through it. Everything it connects to is on 127.0.0.1.
pub struct TestProxy {
    /// The listening port.
    pub port: u16,
    /// What it saw.
    log: Arc<Mutex<ProxyLog>>,
    /// Set on drop.
    stopping: Arc<AtomicBool>,
}

impl TestProxy {
    /// Starts a proxy that maps each of `names` to 127.0.0.1 (other names
    /// must be IP addresses on 127.0.0.1) and, with `credentials`, wants
    /// `Proxy-Authorization: Basic base64(user:password)`.
    pub fn start(names: &[&str], credentials: Option<(&str, &str)>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("local_addr").port();
        let names: Arc<HashSet<String>> =
            Arc::new(names.iter().map(|n| n.to_ascii_lowercase()).collect());
        let want =
            credentials.map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes())));
        let log = Arc::new(Mutex::new(ProxyLog::default()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (l, stop) = (log.clone(), stopping.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let (names, want, log) = (names.clone(), want.clone(), l.clone());
                thread::spawn(move || {
                    let _ = serve_proxy_client(client, &names, want.as_deref(), &log);
                });
            }
        });
        TestProxy {
            port,
            log,
            stopping,
        }
    }

    /// `http://[user:password@]127.0.0.1:<port>`.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// What it saw so far.
    pub fn seen(&self) -> ProxyLog {
        lock(&self.log).clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Serves one client connection of a [`TestProxy`]: reads the request head,
/// checks credentials, then tunnels (CONNECT) or forwards one request.
fn serve_proxy_client(
    mut client: TcpStream,
    names: &HashSet<String>,
    want: Option<&str>,
    log: &Mutex<ProxyLog>,
) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let auth = lines.clone().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("proxy-authorization")
            .then(|| v.trim().to_string())
    });
    lock(log).requests.push(request_line.clone());
    if want.is_some() && auth.as_deref() != want {
        lock(log).refused += 1;
        client.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"venue\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let resolve = |authority: &str| -> Option<SocketAddr> {
        let (host, port) = authority.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if names.contains(&host.to_ascii_lowercase()) || host == "127.0.0.1" {
            Some(SocketAddr::from(([127, 0, 0, 1], port)))
        } else {
            None
        }
    };
    let bad_gateway = |client: &mut TcpStream| {
        client.write_all(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
    };
    if method == "CONNECT" {
        let Some(addr) = resolve(target) else {
            return bad_gateway(&mut client);
        };
        let Ok(upstream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
            return bad_gateway(&mut client);
        };
        client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
        return splice(client, upstream);
    }
    // Absolute form: http://authority/path -> origin form to the origin.
    let Some(rest) = target.strip_prefix("http://") else {
        return bad_gateway(&mut client);
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let Some(addr) = resolve(&authority) else {
        return bad_gateway(&mut client);
    };
    let Ok(mut upstream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return bad_gateway(&mut client);
    };
    let path = if path.is_empty() { "/" } else { path };
    let mut forwarded = format!("{method} {path} {}\r\n", parts.next().unwrap_or("HTTP/1.1"));
    for line in text.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !name.starts_with("proxy-") && name != "connection" {
            forwarded.push_str(line);
            forwarded.push_str("\r\n");
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    upstream.write_all(forwarded.as_bytes())?;
    // One request per client connection: the response, then close.
    client.set_read_timeout(None)?;
    let mut up = upstream.try_clone()?;
    io::copy(&mut up, &mut client)?;
    Ok(())
}

/// Copies both ways until either side closes.
fn splice(client: TcpStream, upstream: TcpStream) -> io::Result<()> {
    client.set_read_timeout(None)?;
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let forward = thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = forward.join();
    Ok(())
}
