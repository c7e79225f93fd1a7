//! `cargo run --release --example demo`: the whole job on one machine, from nothing but the repo.
//!
//! It starts a private `mosquitto` on a free 127.0.0.1 port, serves the
//! sample pictures in `demo/pictures/` over HTTP, listens as a fake raw
//! projector, runs the real holosync binary on a config in a temporary
//! folder, publishes one sync message (QoS 1) and one projector command,
//! waits until every sample is `done`, prints what arrived where, then
//! stops everything and removes the folder. Every wait polls against a
//! deadline; nothing sleeps a fixed time hoping a thing has happened.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS, RecvTimeoutError};
use serde_json::{json, Value};

/// The crate's folder, fixed at compile time so the demo runs from any current directory.
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Sample pictures under [`REPO`]; a file's path below this folder is its URL path.
const PICTURES: &str = "demo/pictures";

/// How often every wait re-checks its condition.
const POLL: Duration = Duration::from_millis(50);

/// Time for mosquitto to listen, generous for a busy 2-core machine.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Tries at starting mosquitto: a port found free can be taken before mosquitto binds it.
const BROKER_ATTEMPTS: u32 = 3;

/// Time from starting the agent to its subscriptions being in place.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Time for the broker to acknowledge the QoS 1 sync message.
const PUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for a clean MQTT disconnect after the publishes; the messages are already safe.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Time from the publish to every sample `done` and the projector answered.
/// A normal run takes about a second; this is the ceiling on a loaded machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// Time one `holosync status` may take before the demo gives up on it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Time for a process to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between downloads in the agent's config. Today's default (10 s)
/// is a fixed tick, so four pictures would take about 40 s.
const DOWNLOAD_INTERVAL_MS: u64 = 100;

/// Read and write deadline of the picture server and the fake projector,
/// so a stuck peer cannot wedge their thread.
const PEER_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest command the fake projector reads; a raw command is one short line.
const PROJECTOR_MAX_COMMAND_BYTES: usize = 1024;

/// What the fake projector answers: the reply a raw-protocol projector gives, with
/// the agent's default terminator, so the agent logs it as the projector's reply.
const PROJECTOR_REPLY: &[u8] = b"OK\r";

/// The agent's MQTT client id: fixed, as the README tells kiosks to do.
const AGENT_CLIENT_ID: &str = "holosync-demo-kiosk";

/// Topic the agent reads sync messages from (one of its defaults).
const SYNC_TOPIC: &str = "sync";

/// Topic the agent reads projector commands from (its default).
const PROJECTOR_TOPIC: &str = "projector-remote-control";

/// The line the agent logs once its subscriptions are acknowledged.
const SUBSCRIBED_LOG_LINE: &str = "subscribed to";

/// Bytes of the agent's log shown when the demo fails.
const LOG_TAIL_BYTES: usize = 4000;

fn main() -> ExitCode {
    let Some(mosquitto) = find_mosquitto() else {
        eprintln!(
            "demo: `mosquitto` was not found on PATH or in /usr/sbin.\n\
             Install it as root (Debian/Ubuntu): apt-get install mosquitto mosquitto-clients"
        );
        return ExitCode::FAILURE;
    };
    let agent_exe = match build_agent() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut demo = match Demo::new() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match demo.run(&mosquitto, &agent_exe) {
        Ok(()) => {
            let dir = demo.dir.clone();
            drop(demo);
            println!(
                "\nstopped the agent and mosquitto, removed {}; the demo took {:.1} s after the build",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e}\n{}", demo.diagnostics());
            ExitCode::FAILURE
        }
    }
}

/// The running pieces of one demo; dropping it stops them and removes the folder.
struct Demo {
    /// Temporary folder holding the agent's config, queue, log and cache, and mosquitto's.
    dir: PathBuf,
    /// The private broker.
    broker: Option<Child>,
    /// The holosync agent.
    agent: Option<Child>,
}

impl Demo {
    /// Makes a fresh temporary folder named after this process.
    fn new() -> Result<Demo, String> {
        let dir = std::env::temp_dir().join(format!("holosync-demo-{}", std::process::id()));
        // Only a demo killed before its clean-up, whose pid this process now
        // has, can have left this folder; nothing of it is needed.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir)
            .map_err(|e| format!("could not create temp folder {}: {e}", dir.display()))?;
        Ok(Demo {
            dir,
            broker: None,
            agent: None,
        })
    }

    /// The whole demo; the first failure ends it.
    fn run(&mut self, mosquitto: &Path, agent_exe: &Path) -> Result<(), String> {
        let samples = samples()?;
        let (broker, broker_port) = start_broker(mosquitto, &self.dir)?;
        self.broker = Some(broker);
        let http_port = serve_pictures(Path::new(REPO).join(PICTURES))?;
        let projector = FakeProjector::start()?;
        let config = self.write_config(broker_port)?;

        println!(
            "holosync demo, everything on 127.0.0.1, files in {}",
            self.dir.display()
        );
        println!(
            "  broker     mosquitto on port {broker_port} ({})",
            mosquitto.display()
        );
        println!(
            "  pictures   http://127.0.0.1:{http_port}/ serving {} files from {PICTURES}/",
            samples.len()
        );
        println!(
            "  projector  fake raw projector on port {}, answers {:?}",
            projector.port,
            String::from_utf8_lossy(PROJECTOR_REPLY)
        );
        println!(
            "  agent      {} --config {}",
            agent_exe.display(),
            config.display()
        );

        let agent = Command::new(agent_exe)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(self.output_file("agent.out")?)
            .stderr(self.output_file("agent.out")?)
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", agent_exe.display()))?;
        self.agent = Some(agent);
        // A QoS 1 message reaches a new client id only once its subscription
        // exists; before that the broker has no session to keep it in.
        let t = Instant::now();
        self.wait_for("the agent to subscribe", SUBSCRIBE_TIMEOUT, |demo| {
            Ok(demo.log().contains(SUBSCRIBED_LOG_LINE))
        })?;
        println!(
            "\nagent connected and subscribed ({} ms)",
            t.elapsed().as_millis()
        );

        let urls: Vec<String> = samples
            .iter()
            .map(|s| format!("http://127.0.0.1:{http_port}/{s}"))
            .collect();
        let command =
            json!({"command": "on", "projectors": [format!("127.0.0.1:{}", projector.port)]});
        publish(broker_port, &urls.join(","), &command.to_string())?;
        let published = Instant::now();
        println!("published {command} on `{PROJECTOR_TOPIC}`");
        println!(
            "published {} URLs on `{SYNC_TOPIC}` (QoS 1, acknowledged by the broker)",
            urls.len()
        );

        self.wait_for("every sample to be done", SYNC_TIMEOUT, |demo| {
            let status = demo.status_json(agent_exe, &config)?;
            if status["failed"].as_u64() != Some(0) {
                return Err(format!("the agent reports failures: {status}"));
            }
            Ok(status["done"].as_u64() == Some(urls.len() as u64) && projector.answered() > 0)
        })?;
        println!(
            "\nall {} samples done, projector answered, {} ms after the publish:",
            urls.len(),
            published.elapsed().as_millis()
        );
        let cache = self.dir.join("images");
        for (sample, url) in samples.iter().zip(&urls) {
            let cached = fs::read(cache.join(sample))
                .map_err(|e| format!("{url} is done but not in the cache: {e}"))?;
            let original = fs::read(Path::new(REPO).join(PICTURES).join(sample))
                .map_err(|e| format!("could not read sample {sample}: {e}"))?;
            if cached != original {
                return Err(format!("cached {sample} differs from {PICTURES}/{sample}"));
            }
            println!("  done  {url}  (cached byte for byte)");
        }

        println!("\nfake projector received:");
        for (i, bytes) in projector.received().iter().enumerate() {
            println!(
                "  connection {}: {:?}, answered {:?}",
                i + 1,
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(PROJECTOR_REPLY)
            );
        }

        println!("\n$ holosync status --config {}", config.display());
        let out = run_bounded(
            Command::new(agent_exe)
                .arg("status")
                .arg("--config")
                .arg(&config),
            STATUS_TIMEOUT,
        )?;
        print!("{}", indent(&out));

        println!("\ncached files under {}:", cache.display());
        print!("{}", tree(&cache)?);

        println!("\nagent log ({}):", self.dir.join("holosync.log").display());
        print!("{}", indent(&self.log()));
        Ok(())
    }

    /// Writes the agent's config.json; relative paths in it are relative to its folder.
    fn write_config(&self, broker_port: u16) -> Result<PathBuf, String> {
        let config = json!({
            "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": AGENT_CLIENT_ID},
            "cache_dir": "images",
            "database": "holosync.db",
            "download": {"interval_ms": DOWNLOAD_INTERVAL_MS, "timeout_secs": 10},
            "log": {"file": "holosync.log", "level": "info"},
            "projector": {"protocol": "raw", "port": 4352, "terminator": "\r"}
        });
        let path = self.dir.join("config.json");
        let text = serde_json::to_string_pretty(&config).expect("a json! value always serialises");
        fs::write(&path, text).map_err(|e| format!("could not write {}: {e}", path.display()))?;
        Ok(path)
    }

    /// A file in the demo folder to append a child's stdout or stderr to.
    fn output_file(&self, name: &str) -> Result<File, String> {
        let path = self.dir.join(name);
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("could not open {}: {e}", path.display()))
    }

    /// The agent's log so far ("" before it exists).
    fn log(&self) -> String {
        read_lossy(&self.dir.join("holosync.log"))
    }

    /// `holosync status --json`, parsed.
    fn status_json(&self, agent_exe: &Path, config: &Path) -> Result<Value, String> {
        let out = run_bounded(
            Command::new(agent_exe)
                .args(["status", "--json", "--config"])
                .arg(config),
            STATUS_TIMEOUT,
        )?;
        serde_json::from_str(&out)
            .map_err(|e| format!("status --json printed no JSON ({e}): {out}"))
    }

    /// Polls `cond` every [`POLL`] until it is true, fails, the deadline
    /// passes, or a child process dies.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Demo) -> Result<bool, String>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self)? {
                return Ok(());
            }
            for (name, child) in [("agent", &mut self.agent), ("mosquitto", &mut self.broker)] {
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    return Err(format!("{name} exited ({status}) while waiting for {what}"));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("timed out after {timeout:?} waiting for {what}"));
            }
            thread::sleep(POLL);
        }
    }

    /// The tails of the agent's log and output and of mosquitto's output.
    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (title, name) in [
            ("holosync.log", "holosync.log"),
            ("agent stdout/stderr", "agent.out"),
            ("mosquitto", "mosquitto.out"),
        ] {
            let text = read_lossy(&self.dir.join(name));
            let _ = writeln!(
                out,
                "--- {title} (tail) ---\n{}",
                tail(&text, LOG_TAIL_BYTES)
            );
        }
        out
    }
}

impl Drop for Demo {
    /// Stops the agent, then the broker, then removes the folder.
    fn drop(&mut self) {
        for child in [self.agent.take(), self.broker.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("demo: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// `mosquitto` on PATH, or in /usr/sbin where Debian puts it (often not on a user's PATH).
fn find_mosquitto() -> Option<PathBuf> {
    let name = format!("mosquitto{}", std::env::consts::EXE_SUFFIX);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file())
}

/// Builds the holosync binary with the cargo running this example (so one
/// command does it all) and returns its path, which is next to this example's
/// own folder: `target/<profile>/examples/demo` -> `target/<profile>/holosync`.
fn build_agent() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find the demo's own exe: {e}"))?;
    let profile_dir = me
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected location of the demo exe: {}", me.display()))?;
    let agent = profile_dir.join(format!("holosync{}", std::env::consts::EXE_SUFFIX));
    let Some(cargo) = std::env::var_os("CARGO") else {
        // Started without cargo: use the binary if it is there.
        return if agent.is_file() {
            Ok(agent)
        } else {
            Err(format!(
                "{} is missing; run the demo with `cargo run --release --example demo`",
                agent.display()
            ))
        };
    };
    eprintln!(
        "demo: building {} (cargo build --bin holosync)",
        agent.display()
    );
    let mut build = Command::new(cargo);
    build
        .args(["build", "--bin", "holosync", "--manifest-path"])
        .arg(Path::new(REPO).join("Cargo.toml"));
    // `cargo run` gives this example the package's variables (CARGO_PKG_*,
    // CARGO_MANIFEST_DIR, ...); passed on, they change what some build
    // scripts see (ring's, rustls'), so the build here and a plain `cargo
    // build --release` would each rebuild what the other built.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            build.env_remove(&key);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("could not run cargo to build holosync: {e}"))?;
    if !status.success() {
        return Err(format!("building holosync failed ({status})"));
    }
    if !agent.is_file() {
        return Err(format!(
            "cargo built holosync but {} is missing",
            agent.display()
        ));
    }
    Ok(agent)
}

/// The sample pictures' paths below [`PICTURES`], with `/` separators, sorted.
fn samples() -> Result<Vec<String>, String> {
    let root = Path::new(REPO).join(PICTURES);
    let mut out: Vec<String> = files_under(&root)?
        .into_iter()
        .map(|(rel, _)| rel)
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(format!("no sample pictures in {}", root.display()));
    }
    Ok(out)
}

/// Every regular file below `root`: its path relative to `root` (with `/`) and its size.
fn files_under(root: &Path) -> Result<Vec<(String, u64)>, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, u64)>) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), &format!("{rel}/"), out)?;
            } else if meta.is_file() {
                out.push((rel, meta.len()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, "", &mut out).map_err(|e| format!("could not list {}: {e}", root.display()))?;
    Ok(out)
}

/// The files below `root`, sorted, as an indented tree with their sizes.
fn tree(root: &Path) -> Result<String, String> {
    let mut files = files_under(root)?;
    files.sort();
    let mut out = String::new();
    let mut shown: Vec<&str> = Vec::new();
    for (rel, size) in &files {
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, folders) = parts.split_last().expect("split always yields one part");
        // Print the folders this file needs that the previous file did not share.
        let common = shown
            .iter()
            .zip(folders)
            .take_while(|(a, b)| a == b)
            .count();
        for (depth, folder) in folders.iter().enumerate().skip(common) {
            let _ = writeln!(out, "  {}{folder}/", "    ".repeat(depth));
        }
        shown = folders.to_vec();
        let _ = writeln!(
            out,
            "  {}{name}  {size} bytes",
            "    ".repeat(folders.len())
        );
    }
    Ok(out)
}

/// Starts mosquitto on a free 127.0.0.1 port with a config in `dir`; waits until it listens.
fn start_broker(program: &Path, dir: &Path) -> Result<(Child, u16), String> {
    let mut last_error = String::new();
    for _ in 0..BROKER_ATTEMPTS {
        let port = free_port()?;
        let conf = dir.join("mosquitto.conf");
        // `user root`: mosquitto started as root otherwise switches to the
        // `mosquitto` user, which cannot write this folder. It is ignored
        // when mosquitto is started by anyone else.
        let text = format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n");
        fs::write(&conf, text).map_err(|e| format!("could not write {}: {e}", conf.display()))?;
        let out = dir.join("mosquitto.out");
        let open = || {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&out)
                .map_err(|e| format!("could not open {}: {e}", out.display()))
        };
        let mut child = Command::new(program)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .spawn()
            .map_err(|e| format!("could not start {}: {e}", program.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + BROKER_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                last_error = format!("mosquitto exited ({status}) on port {port}");
                break;
            }
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok((child, port));
            }
            if Instant::now() >= deadline {
                stop(child);
                return Err(format!(
                    "mosquitto did not listen on port {port} within {BROKER_START_TIMEOUT:?}: {}",
                    read_lossy(&out)
                ));
            }
            thread::sleep(POLL);
        }
    }
    Err(format!(
        "{last_error} ({BROKER_ATTEMPTS} attempts): {}",
        read_lossy(&dir.join("mosquitto.out"))
    ))
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("cannot read the bound port: {e}"))
}

/// Serves the files below `root` over HTTP/1.1 on 127.0.0.1 from a thread; returns the port.
fn serve_pictures(root: PathBuf) -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    let port = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound port: {e}"))?
        .port();
    thread::spawn(move || {
        // One request per connection, one connection at a time: the agent
        // downloads one picture at a time. An I/O error only ends that connection.
        for stream in listener.incoming().flatten() {
            let _ = serve_one(stream, &root);
        }
    });
    Ok(port)
}

/// Answers one GET with the file at its path, or 404.
fn serve_one(stream: TcpStream, root: &Path) -> io::Result<()> {
    stream.set_read_timeout(Some(PEER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(PEER_IO_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim_end().is_empty() {
            break;
        }
    }
    let target = request_line.split(' ').nth(1).unwrap_or("");
    let (status, content_type, body) = match picture(root, target) {
        Some(bytes) => {
            let kind = if bytes.starts_with(b"\x89PNG") {
                "image/png"
            } else {
                "image/jpeg"
            };
            ("200 OK", kind, bytes)
        }
        None => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = &stream;
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()
}

/// The file for a request target such as `/works/12/a.jpg!preview`; only
/// plain path segments, so nothing outside `root` can be served.
fn picture(root: &Path, target: &str) -> Option<Vec<u8>> {
    let rel = target.strip_prefix('/')?;
    let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('\\');
    if !rel.split('/').all(plain) {
        return None;
    }
    fs::read(root.join(rel)).ok()
}

/// A TCP listener on 127.0.0.1 standing in for a raw-protocol projector: it
/// records each command and answers [`PROJECTOR_REPLY`].
struct FakeProjector {
    /// Its port.
    port: u16,
    /// Bytes received, one entry per connection, added once the reply is sent.
    received: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeProjector {
    /// Starts listening and answering on a thread.
    fn start() -> Result<FakeProjector, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound port: {e}"))?
            .port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let shared = received.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(bytes) = answer_command(stream) {
                    shared.lock().unwrap_or_else(|e| e.into_inner()).push(bytes);
                }
            }
        });
        Ok(FakeProjector { port, received })
    }

    /// Commands received and answered so far.
    fn received(&self) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many commands were answered.
    fn answered(&self) -> usize {
        self.received().len()
    }
}

/// Reads one command (up to CR or LF, or the peer closing), then answers it.
fn answer_command(mut stream: TcpStream) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(PEER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(PEER_IO_TIMEOUT))?;
    let mut command = Vec::new();
    let mut buf = [0u8; 256];
    while command.len() < PROJECTOR_MAX_COMMAND_BYTES {
        let n = stream.read(&mut buf)?;
        command.extend_from_slice(&buf[..n]);
        if n == 0 || buf[..n].iter().any(|&b| b == b'\r' || b == b'\n') {
            break;
        }
    }
    stream.write_all(PROJECTOR_REPLY)?;
    Ok(command)
}

/// Publishes the projector command (QoS 0, as the agent subscribes to it)
/// and then the sync message (QoS 1), and waits for the sync message's
/// PubAck. Requests go out in order, so that ack also means the projector
/// command, which gets no ack of its own, reached the broker.
fn publish(port: u16, sync: &str, projector: &str) -> Result<(), String> {
    let id = format!("holosync-demo-publisher-{}", std::process::id());
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_clean_session(true);
    let (client, mut connection) = Client::new(options, 10);
    let publish_error = |e| format!("could not queue a publish: {e}");
    client
        .publish(PROJECTOR_TOPIC, QoS::AtMostOnce, false, projector)
        .map_err(publish_error)?;
    client
        .publish(SYNC_TOPIC, QoS::AtLeastOnce, false, sync)
        .map_err(publish_error)?;
    // rumqttc sends nothing unless its Connection is polled.
    let deadline = Instant::now() + PUBACK_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the broker on port {port} did not acknowledge the sync message within {PUBACK_TIMEOUT:?}"
            ));
        }
        match connection.recv_timeout(left) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => break,
            Ok(Ok(_)) | Err(RecvTimeoutError::Timeout) => {}
            Ok(Err(e)) => return Err(format!("MQTT connection to 127.0.0.1:{port} failed: {e}")),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(
                    "the MQTT client closed before the sync message was acknowledged".into(),
                )
            }
        }
    }
    // A clean goodbye; the broker has the messages whatever happens here.
    if client.disconnect().is_ok() {
        let deadline = Instant::now() + DISCONNECT_TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match connection.recv_timeout(left) {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
    Ok(())
}

/// Runs `cmd` with its stdout captured, killing it after `timeout`; its stdout if it succeeded.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("could not run {cmd:?}: {e}"))?;
    // Readers on threads, so a full pipe cannot block the child while we wait.
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{cmd:?}: {e}"))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{cmd:?} did not finish within {timeout:?}"));
        }
        thread::sleep(POLL);
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{cmd:?} failed ({status}): {out}{err}"));
    }
    Ok(out)
}

/// Asks `child` to stop (SIGTERM on Unix, so it can finish its turn), kills
/// it if it has not exited within [`STOP_TIMEOUT`], and reaps it.
fn stop(mut child: Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    #[cfg(unix)]
    {
        // std has no signal API; the `kill` command sends SIGTERM.
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while sent && Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(POLL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A file's text, lossily decoded; "" if it cannot be read.
fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// At most the last `n` bytes of `s`, starting at a line when one starts in them.
fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    let cut = &s[start..];
    cut.find('\n').map_or(cut, |i| &cut[i + 1..])
}

/// `text` with every line indented by two spaces.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
