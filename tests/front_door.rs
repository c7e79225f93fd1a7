//! What a technician sees at the front door, on the real binary: each
//! mistake gives a message that names the key or the thing and the fix, in
//! plain words, and nothing is created by looking.
//!
//! Real parts only: the holosync binary, a mosquitto with a password file.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{command, run_bounded, Agent, Mosquitto, TempDir};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// `holosync check --config <dir>/config.json` with `text` as the config.
fn check_with(dir: &Path, text: &str) -> Output {
    std::fs::write(dir.join("config.json"), text).unwrap();
    let config = dir.join("config.json");
    run_bounded(
        command(&["check", "--config", config.to_str().unwrap()]),
        None,
        WAIT,
    )
}

/// Bad configs are refused with exit code 2 and a message in plain words:
/// a Windows path with single backslashes gets the fix, a number in quotes
/// says what is expected (not `u16`), a section of the wrong kind says
/// "an object", and a JSON array is not taken for a config.
#[test]
fn bad_configs_are_explained_in_plain_words() {
    let dir = TempDir::new("door-config");
    for (text, want) in [
        (r#"{"cache_dir": "D:\holo"}"#, "write a Windows path as D:/holo"),
        (
            r#"{"mqtt": {"port": "1883"}}"#,
            "key `mqtt.port`: invalid type: string \"1883\", expected a whole number from 0 to 65535",
        ),
        (r#"{"mqtt": 5}"#, "expected an object { ... }"),
        ("[]", "the config must be one JSON object"),
        (r#"{"mqtt": {"tls": "yes"}}"#, "expected true or false"),
    ] {
        let out = check_with(dir.path(), text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(want), "{text}: want {want:?} in {stderr}");
        assert!(!stderr.contains(" u16") && !stderr.contains("struct "), "{stderr}");
    }
}

/// `--config` twice is a usage error, not a silent choice of the last one.
#[test]
fn config_given_twice_is_refused() {
    let out = run_bounded(
        command(&["status", "--config", "a.json", "--config", "b.json"]),
        None,
        WAIT,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config given twice"));
}

/// `status` in a folder where the agent never ran says so and creates no
/// database.
#[test]
fn status_creates_nothing() {
    let dir = TempDir::new("door-status");
    let agent = Agent::new(dir.path(), Agent::default_config(1));
    let out = agent.run(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the agent has not run with this config yet"),
        "{stderr}"
    );
    assert!(!dir.path().join("holosync.db").exists());
}

/// A cache folder that cannot be made (a file stands where a folder of its
/// path should be) stops the agent at once, and the line says it stopped
/// and which key to check, in the log too.
#[test]
fn an_unwritable_cache_folder_stops_the_agent_saying_so() {
    let broker = Mosquitto::start();
    let dir = TempDir::new("door-cache");
    std::fs::write(dir.path().join("blocker"), b"a file, not a folder").unwrap();
    let mut config = Agent::default_config(broker.port);
    config["cache_dir"] = json!("blocker/images");
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    let status = agent.wait_exit(WAIT);
    assert_eq!(status.code(), Some(1));
    let log = agent.log();
    assert!(log.contains("holosync stopped: cache folder"), "{log}");
    assert!(log.contains("check cache_dir"), "{log}");
}

/// A wrong broker password names the keys to fix (the broker's own words,
/// `NotAuthorized`, alone sent technicians looking elsewhere); the agent
/// keeps trying with its backoff.
#[test]
fn a_wrong_broker_password_names_the_keys() {
    let pw_dir = TempDir::new("door-passwd");
    let passwords = pw_dir.path().join("passwd");
    let made = run_bounded(
        {
            let mut c = std::process::Command::new(common::find_program("mosquitto_passwd"));
            c.args(["-b", "-c"])
                .arg(&passwords)
                .args(["kiosk", "right"]);
            c
        },
        None,
        WAIT,
    );
    assert!(made.status.success(), "{made:?}");
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    ));
    let dir = TempDir::new("door-login");
    let mut config = Agent::default_config(broker.port);
    config["mqtt"]["username"] = json!("kiosk");
    config["mqtt"]["password"] = json!("pw-Xq7-never-logged");
    let mut agent = Agent::new(dir.path(), config);
    agent.start();
    let log = agent.wait_log("check mqtt.username and mqtt.password", WAIT);
    assert!(
        !log.contains("wrong"),
        "the password reached the log: {log}"
    );
    assert!(agent.is_running());
}
