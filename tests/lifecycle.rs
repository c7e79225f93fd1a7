//! End-to-end tests of the agent's life as a technician sees it: a stop is
//! logged (and told apart from a crash at the next start), and an agent
//! started from a terminal shows its log lines there.
//!
//! Native, except the log-off test: Wine turns neither Unix signals into
//! console events nor a pseudo-terminal into a Windows console, and only
//! Windows has a log-off.

mod common;

use std::time::Duration;

use common::{agent_with, poll_until, read_lossy, send_signal, wait_until, Mosquitto, TempDir};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// Starts the agent and waits for this run's subscription.
fn start_and_wait(agent: &mut common::Agent) {
    let before = agent.log().matches("subscribed to").count();
    agent.start();
    wait_until("the agent to subscribe", WAIT, || {
        agent.log().matches("subscribed to").count() > before
    });
}

/// SIGTERM (and SIGINT) stop the agent cleanly: a log line says so, the exit
/// code is 0, and the next start does not report a crash. After a SIGKILL
/// the next start does.
#[test]
fn a_stop_is_logged_and_told_apart_from_a_crash() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("life-stop");
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    let status = agent.terminate().expect("agent was running");
    assert!(
        status.success(),
        "exit status {status}\n{}",
        agent.diagnostics()
    );
    let log = agent.log();
    assert!(log.contains("stopping: SIGTERM"), "{log}");
    assert!(log.contains("holosync stopped (SIGTERM)"), "{log}");
    // Nothing was left undone, so the stop says nothing of projectors.
    assert!(!log.contains("projector messages unfinished"), "{log}");

    start_and_wait(&mut agent);
    assert!(
        !agent.log().contains("ended without stopping"),
        "{}",
        agent.log()
    );
    let pid = agent.pid().expect("running");
    assert!(send_signal(pid, "INT"));
    let status = agent.wait_exit(WAIT);
    assert!(status.success(), "exit status {status}");
    assert!(
        agent.log().contains("holosync stopped (SIGINT"),
        "{}",
        agent.log()
    );

    start_and_wait(&mut agent);
    agent.kill();
    let starts = agent.log().matches(" starting: ").count();
    agent.start();
    wait_until("the next start", WAIT, || {
        agent.log().matches(" starting: ").count() > starts
    });
    agent.wait_log("ended without stopping: a crash, a kill", WAIT);
}

/// A stop while a download is under way leaves no temporary file, and the
/// URL is still queued (it is fetched at the next start).
#[test]
fn a_stop_mid_download_leaves_the_url_queued_and_no_temp_file() {
    let broker = Mosquitto::start();
    let http = common::HttpServer::start();
    let dir = TempDir::new("life-stop-download");
    let body = common::jpeg(256, 256, 4);
    http.set(
        "/life/slow.jpg",
        common::Route::Slow(body.clone(), Duration::from_secs(30)),
    );
    let mut agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"timeout_secs": 60}}),
    );
    broker.publish("sync", http.url("/life/slow.jpg").as_bytes(), 1);
    http.wait_hits("/life/slow.jpg", 1, WAIT);
    let status = agent.terminate().expect("running");
    assert!(status.success(), "{status}");
    assert!(
        agent.log().contains("left the download of"),
        "{}",
        agent.log()
    );
    let temps: Vec<_> = common::files_under(&agent.cache())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".holosync-tmp-"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    http.set("/life/slow.jpg", common::Route::Ok(body.clone()));
    agent.start();
    agent.wait_done(1, WAIT);
    assert_eq!(
        std::fs::read(agent.cache().join("life/slow.jpg")).unwrap(),
        body
    );
}

/// Started from a terminal, the agent writes its log lines there too (here
/// the terminal is a pseudo-terminal made by `script`).
#[test]
fn started_from_a_terminal_the_log_shows_there_too() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("life-tty");
    let mut config = common::Agent::default_config(broker.port);
    common::merge(&mut config, json!({"log": {"level": "info"}}));
    let agent = common::Agent::new(dir.path(), config);
    let typescript = dir.path().join("terminal.txt");
    let command = format!(
        "exec {} --config {}",
        common::holosync_exe().display(),
        agent.config_path().display()
    );
    let mut script = std::process::Command::new(common::find_program("script"))
        .args(["-q", "-f", "-c", &command])
        .arg(&typescript)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn script");
    let seen = poll_until(WAIT, || read_lossy(&typescript).contains("subscribed to"));
    // `exec` made holosync the shell's process: its pid is script's child.
    let pids = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        script.id(),
        script.id()
    ))
    .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        send_signal(pid, "TERM");
    }
    let ended = poll_until(WAIT, || script.try_wait().ok().flatten().is_some());
    if !ended {
        let _ = script.kill();
    }
    let _ = script.wait();
    let terminal = read_lossy(&typescript);
    assert!(seen, "no log line on the terminal: {terminal:?}");
    assert!(terminal.contains("INFO  holosync"), "{terminal}");
    assert!(
        terminal.contains("holosync stopped (SIGTERM)"),
        "{terminal}"
    );
    // The same lines are in the file.
    assert!(agent.log().contains("holosync stopped (SIGTERM)"));
}

/// A Windows log-off (or shutdown) stops the agent cleanly: Windows sends it
/// to the agent's hidden window, the log says so, and the next start does not
/// report a crash. Run by `.ci/run` under Wine against the exe, alone:
/// `wineboot --end-session` ends every program in the Wine prefix.
#[test]
#[ignore = "Windows only: .ci/run runs it alone under Wine against the exe"]
fn a_windows_log_off_is_logged_as_a_stop() {
    assert!(
        common::under_wine(),
        "needs HOLOSYNC_EXE (the Windows exe) and Wine"
    );
    let broker = Mosquitto::start();
    let dir = TempDir::new("life-logoff");
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    // A first window in a freshly made Wine prefix can take a few tries.
    agent.wait_log("the log-off watcher's window is ready", WAIT);
    let ended = common::command_for(std::path::Path::new("wineboot"), &["--end-session"])
        .status()
        .expect("wineboot runs");
    assert!(ended.success(), "wineboot --end-session: {ended}");
    agent.wait_exit(WAIT);
    let log = agent.log();
    // Wine ends its session as a shutdown; a real log-off says "log-off".
    assert!(log.contains("stopping: Windows "), "{log}");
    assert!(log.contains("holosync stopped (Windows "), "{log}");

    start_and_wait(&mut agent);
    assert!(
        !agent.log().contains("ended without stopping"),
        "{}",
        agent.log()
    );
}

/// On Windows the proxy comes from the user's Internet Options when neither
/// the config nor the environment names one: with `ProxyEnable` 1 and
/// `ProxyServer` set in the registry (`wine reg add`), the start-up line says
/// so, and MQTT (`via_proxy`) reaches a broker whose name only the proxy
/// resolves; a host in `ProxyOverride` would go directly. Run by `.ci/run`
/// under Wine against the exe.
#[test]
#[ignore = "Windows only: .ci/run runs it under Wine against the exe"]
fn windows_internet_options_name_the_proxy() {
    assert!(
        common::under_wine(),
        "needs HOLOSYNC_EXE (the Windows exe) and Wine"
    );
    let broker = Mosquitto::start();
    let proxy = common::TestProxy::start(&["broker.venue.test"], None);
    let key = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Internet Settings";
    // Not `common::command_for`: it would take `/v` and `/d` for Unix paths.
    let reg = |args: &[&str]| {
        let status = std::process::Command::new(common::wine_loader())
            .arg("reg")
            .args(args)
            .env("WINEDEBUG", "-all")
            .status()
            .expect("wine reg runs");
        assert!(status.success(), "reg {args:?}: {status}");
    };
    let server = format!("127.0.0.1:{}", proxy.port);
    reg(&[
        "add",
        key,
        "/v",
        "ProxyEnable",
        "/t",
        "REG_DWORD",
        "/d",
        "1",
        "/f",
    ]);
    reg(&[
        "add",
        key,
        "/v",
        "ProxyServer",
        "/t",
        "REG_SZ",
        "/d",
        &server,
        "/f",
    ]);
    reg(&[
        "add",
        key,
        "/v",
        "ProxyOverride",
        "/t",
        "REG_SZ",
        "/d",
        "<local>;*.lan",
        "/f",
    ]);
    let dir = TempDir::new("life-winproxy");
    let mut config = common::Agent::default_config(broker.port);
    common::merge(
        &mut config,
        json!({"mqtt": {"host": "broker.venue.test", "via_proxy": true}}),
    );
    let mut agent = common::Agent::new(dir.path(), config);
    agent.start();
    let subscribed = common::poll_until(WAIT, || agent.log().contains("subscribed to"));
    reg(&[
        "add",
        key,
        "/v",
        "ProxyEnable",
        "/t",
        "REG_DWORD",
        "/d",
        "0",
        "/f",
    ]);
    let log = agent.log();
    assert!(subscribed, "{}", agent.diagnostics());
    assert!(
        log.contains(&format!(
            "proxy http://{server} (from Windows Internet Options), 2 hosts or ranges bypass it"
        )),
        "{log}"
    );
    let connect = format!("CONNECT broker.venue.test:{} ", broker.port);
    assert!(
        proxy
            .seen()
            .requests
            .iter()
            .any(|r| r.starts_with(&connect)),
        "{:?}",
        proxy.seen()
    );
    agent.kill();
}

/// On Windows, `taskkill /IM holosync.exe` (without /F) stops the windowless
/// agent cleanly: its hidden window takes the close request, the log says
/// `holosync stopped (a close request (taskkill))`, and the next start does
/// not report a crash. Run by `.ci/run` under Wine against the exe.
#[test]
#[ignore = "Windows only: .ci/run runs it under Wine against the exe"]
fn taskkill_stops_the_agent_cleanly() {
    assert!(
        common::under_wine(),
        "needs HOLOSYNC_EXE (the Windows exe) and Wine"
    );
    let broker = Mosquitto::start();
    let dir = TempDir::new("life-taskkill");
    let mut agent = agent_with(dir.path(), &broker, json!({}));
    agent.wait_log("the log-off watcher's window is ready", WAIT);
    let status = std::process::Command::new(common::wine_loader())
        .args(["taskkill", "/IM", "holosync.exe"])
        .env("WINEDEBUG", "-all")
        .status()
        .expect("wine taskkill runs");
    assert!(status.success(), "taskkill: {status}");
    agent.wait_exit(WAIT);
    let log = agent.log();
    assert!(
        log.contains("holosync stopped (a close request (taskkill))"),
        "{log}"
    );
    start_and_wait(&mut agent);
    assert!(
        !agent.log().contains("ended without stopping"),
        "{}",
        agent.log()
    );
}
