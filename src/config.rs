//! The config tree: one serde structure, defaults in one place, a validation
//! step that names the wrong key, and paths resolved next to the config file.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest MQTT packet accepted: the protocol's own maximum (a 268,435,455-byte
/// remaining length plus the fixed header). A client that refuses a QoS 1
/// message drops the connection, and under a persistent session the broker
/// sends the same message again on reconnect, forever. Accepting whatever the
/// broker sends and then dropping oversized payloads in the application (see
/// `mqtt.max_payload_bytes`) is the only way out of that loop with MQTT 3.1.1.
pub const MAX_PACKET_BYTES: usize = 268_435_460;

/// The whole `config.json`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection and topics (optional: the old script's config has
    /// none and used a broker on 127.0.0.1:1883).
    #[serde(default)]
    pub mqtt: Mqtt,
    /// The mall (site) name of the old script's config: with it, the default
    /// sync topics are `sync`, `sync-single-work-<mall>` and `holo-file-sync-<mall>`.
    #[serde(default)]
    pub mall: Option<String>,
    /// Root of the local image cache (`holoImageUrl` in the old script's config).
    #[serde(default = "default_cache_dir", alias = "holoImageUrl")]
    pub cache_dir: PathBuf,
    /// SQLite queue database.
    #[serde(default = "default_database")]
    pub database: PathBuf,
    /// Download pacing, limits and retries.
    #[serde(default)]
    pub download: Download,
    /// Log file and rotation.
    #[serde(default)]
    pub log: Log,
    /// Defaults for projector commands.
    #[serde(default)]
    pub projector: Projector,
    /// What the kiosk reports about itself over MQTT, and the commands it takes.
    #[serde(default)]
    pub report: Report,
    /// The HTTP proxy for downloads and MQTT over WebSockets (see `proxy.rs`).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Signed self-update and remote config (see `update.rs`).
    #[serde(default)]
    pub update: Update,
}

/// `update` section: who may sign updates and protected config changes,
/// and how long a new version or config has to get online.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Ed25519 public keys (hex or base64 of the raw 32 bytes) whose
    /// signatures are accepted; any of them will do, so keys can rotate.
    /// Empty: updates and protected config changes are refused.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// Time a new version (or config) has after its start to connect and
    /// subscribe before it is stopped and the previous one restored.
    #[serde(default = "default_confirm_secs")]
    pub confirm_secs: u64,
}

/// `report` section: the fleet's view of this kiosk.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Topic prefix; default `holosync/<client id>`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `<prefix>/state`: retained online/offline, with a Last Will.
    #[serde(default = "yes")]
    pub state: bool,
    /// `<prefix>/status`: retained queue and cache figures, when they change.
    #[serde(default = "yes")]
    pub status: bool,
    /// `<prefix>/events`: one message per finished download or command.
    #[serde(default = "yes")]
    pub events: bool,
    /// `<prefix>/cmd` and the fleet topic: commands (status, retry-failed, audit, forget).
    #[serde(default = "yes")]
    pub commands: bool,
    /// The command topic every kiosk of the fleet listens on; empty: none.
    #[serde(default = "default_fleet_topic")]
    pub fleet_topic: String,
    /// Least time between two status messages.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
}

/// `mqtt` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// Broker host name or address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker port; when absent 1883 (plain MQTT on both RabbitMQ and
    /// Mosquitto) or 8883 with `tls`. See [`Mqtt::port`].
    #[serde(default, rename = "port")]
    port_given: Option<u16>,
    /// MQTT over TLS: the broker's certificate is checked against the bundled
    /// roots (plus `ca_file`) and its name against `host`.
    #[serde(default)]
    pub tls: bool,
    /// How MQTT travels: plain TCP (or TLS with `tls`), or WebSockets
    /// (`ws`, or `wss` over TLS), which get out of networks that let only
    /// HTTP(S) and a proxy through.
    #[serde(default)]
    pub transport: Transport,
    /// The WebSocket path (`ws`, `wss`): Mosquitto and EMQX serve `/mqtt`,
    /// RabbitMQ's Web MQTT plugin `/ws`.
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// Whether plain or TLS MQTT (`tcp`) also goes through the proxy (with
    /// CONNECT); WebSockets always do where a proxy is in force.
    #[serde(default)]
    pub via_proxy: bool,
    /// PEM file of extra CA certificates trusted for the broker (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain), for brokers that ask for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Broker user name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Broker password; never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Stable client id; when absent one is made on first start and kept in the database.
    #[serde(default)]
    pub client_id: Option<String>,
    /// MQTT keep-alive; every blocking step must stay well under it.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Topics whose payload is a comma-separated list of image URLs (QoS 1).
    /// When absent: `sync`, `sync-single-work`, `holo-file-sync`, or with
    /// `mall` set the old script's `sync`, `sync-single-work-<mall>`,
    /// `holo-file-sync-<mall>`. Always set after [`Config::parse`].
    #[serde(default)]
    sync_topics: Option<Vec<String>>,
    /// Topic for projector commands (QoS 0).
    #[serde(default = "default_projector_topic")]
    pub projector_topic: String,
    /// Sync payloads larger than this are logged, acknowledged and dropped.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Command and projector payloads larger than this are logged,
    /// acknowledged, answered and dropped before they are parsed.
    #[serde(default = "default_max_command_bytes")]
    pub max_command_bytes: usize,
    /// The first connect after start-up waits a random 0 to this many ms,
    /// so a fleet powered on at once does not connect in one burst.
    #[serde(default)]
    pub connect_jitter_ms: u64,
}

/// The dotted key (`mqtt.port`) a deserialization error of `value` is about:
/// the first key, then the first key inside it, whose removal changes the
/// error (serde stops at the first error; every key has a default, so a
/// config without the culprit deserializes further). "" if none is found.
fn culprit(value: &serde_json::Value, error: &str) -> String {
    use serde_json::Value;
    let changes = |trial: &Value| {
        Config::deserialize(trial)
            .err()
            .is_none_or(|e| e.to_string() != error)
    };
    let Value::Object(top) = value else {
        return String::new();
    };
    for (key, inner) in top {
        let mut trial = value.clone();
        trial.as_object_mut().expect("an object above").remove(key);
        if !changes(&trial) {
            continue;
        }
        if let Value::Object(fields) = inner {
            for field in fields.keys() {
                let mut trial = value.clone();
                if let Some(Value::Object(f)) = trial.get_mut(key) {
                    f.remove(field);
                }
                if changes(&trial) {
                    return format!("{key}.{field}");
                }
            }
        }
        return key.clone();
    }
    String::new()
}

/// serde's type names in a config error, in a technician's words
/// (`expected u16` -> `expected a whole number from 0 to 65535`).
fn plain_words(message: &str) -> String {
    let mut m = message.to_string();
    for (rust, words) in [
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number of 0 or more"),
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected usize", "expected a whole number of 0 or more"),
        ("expected a boolean", "expected true or false"),
        ("expected a string", "expected text in double quotes"),
        ("expected a sequence", "expected a list in [ ]"),
    ] {
        m = m.replace(rust, words);
    }
    if let Some(at) = m.find("expected struct ") {
        m = format!("{}expected an object {{ ... }}", &m[..at]);
    }
    m
}

/// How MQTT travels to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// MQTT over TCP (TLS with `mqtt.tls`).
    #[default]
    Tcp,
    /// MQTT over WebSockets.
    Ws,
    /// MQTT over WebSockets over TLS.
    Wss,
}

/// `download` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Download {
    /// Pause between two downloads; 0 downloads due rows back to back.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Stall limit: an attempt during which nothing arrives for this long
    /// (no connect, no byte) fails and is retried later.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Longest time one attempt may take, however steadily bytes arrive.
    #[serde(default = "default_max_secs")]
    pub max_secs: u64,
    /// Largest body accepted.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Read downloads no faster than this (bytes per second), so the
    /// display's own streaming keeps its share of the link; none: unlimited.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// Attempts before a transiently failing URL is marked failed.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// Longest retry delay.
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Re-encode JPEGs at this quality (1-100) instead of storing the bytes unchanged.
    #[serde(default)]
    pub reencode_jpeg_quality: Option<u8>,
    /// Pixels all frames of an animation (GIF, WebP, APNG) may declare
    /// together; more is refused as a decompression bomb.
    #[serde(default = "default_max_animation_pixels")]
    pub max_animation_pixels: u64,
    /// PEM file of extra CA certificates trusted for HTTPS image servers (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `log` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// Log file.
    #[serde(default = "default_log_file")]
    pub file: PathBuf,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Size at which the file is rotated.
    #[serde(default = "default_log_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`holosync.log.1` ... `.N`).
    #[serde(default = "default_log_keep")]
    pub keep: u32,
}

/// `projector` section: defaults that a projector message may override.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Projector {
    /// Protocol used when the message does not name one.
    #[serde(default = "default_projector_protocol")]
    pub protocol: Protocol,
    /// PJLink password used when the message does not give one; never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// TCP port used when the message names only a host.
    #[serde(default = "default_projector_port")]
    pub port: u16,
    /// Time allowed for the TCP connect.
    #[serde(default = "default_projector_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for writing the command and reading the reply.
    #[serde(default = "default_projector_io_timeout_ms")]
    pub io_timeout_ms: u64,
    /// Appended to a raw command unless it already ends with CR or LF.
    #[serde(default = "default_projector_terminator")]
    pub terminator: String,
    /// When set, one JSON result per projector message is published here (QoS 0).
    #[serde(default)]
    pub result_topic: Option<String>,
    /// A projector message still waiting this long after it arrived is
    /// dropped with a log line rather than sent late (a power command that
    /// fires minutes after it was meant is worse than none).
    #[serde(default = "default_projector_max_age_ms")]
    pub max_age_ms: u64,
}

/// How a command is spoken to a projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The command text plus a terminator (or `hex:` bytes), reply read and logged.
    Raw,
    /// PJLink class 1, with MD5 authentication when the projector asks.
    Pjlink,
}

/// `proxy` section: when absent, the environment and (on Windows) the
/// Internet Options decide, as for curl and Python's `requests`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `http://[user:password@]host:port`; `""` means no proxy whatever the
    /// environment says. Never logged with its password.
    #[serde(default)]
    pub url: Option<Secret>,
    /// Hosts reached directly, comma-separated (as `NO_PROXY`): names (their
    /// subdomains too), addresses, IPv4 ranges, `*`.
    #[serde(default)]
    pub no_proxy: Option<String>,
}

/// A password: its `Debug` and `Display` print a mask, so it cannot reach the log.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `s`.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

fn yes() -> bool {
    true
}
fn default_fleet_topic() -> String {
    "holosync/all/cmd".into()
}
fn default_status_interval() -> u64 {
    5
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("images")
}
fn default_database() -> PathBuf {
    PathBuf::from("holosync.db")
}
fn default_host() -> String {
    "127.0.0.1".into()
}
/// Plain MQTT's port.
const MQTT_PORT: u16 = 1883;
/// MQTT over TLS's port.
const MQTT_TLS_PORT: u16 = 8883;
fn default_keep_alive_secs() -> u64 {
    60
}
/// The sync topics when the config names none.
fn default_sync_topics(mall: Option<&str>) -> Vec<String> {
    match mall {
        None => ["sync", "sync-single-work", "holo-file-sync"]
            .map(String::from)
            .to_vec(),
        Some(m) => vec![
            "sync".to_string(),
            format!("sync-single-work-{m}"),
            format!("holo-file-sync-{m}"),
        ],
    }
}

impl Mqtt {
    /// The broker port: `port` if given, else 8883 with `tls`, else 1883.
    pub fn port(&self) -> u16 {
        self.port_given.unwrap_or(match self.transport {
            Transport::Tcp if self.tls => MQTT_TLS_PORT,
            Transport::Tcp => MQTT_PORT,
            Transport::Ws => 80,
            Transport::Wss => 443,
        })
    }

    /// The client certificate and key files, when both are given.
    pub fn client_pair(&self) -> Option<(&Path, &Path)> {
        self.client_cert.as_deref().zip(self.client_key.as_deref())
    }

    /// Whether the broker link uses TLS (`tls`, or the `wss` transport).
    pub fn uses_tls(&self) -> bool {
        self.tls || self.transport == Transport::Wss
    }

    /// The broker as a WebSocket URL (`ws://host:port/path`), for the
    /// WebSocket transports; None for `tcp`.
    pub fn ws_url(&self) -> Option<String> {
        let scheme = match self.transport {
            Transport::Tcp => return None,
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        Some(format!("{scheme}://{host}:{}{}", self.port(), self.ws_path))
    }

    /// The sync topics (resolved by [`Config::parse`]).
    pub fn sync_topics(&self) -> &[String] {
        self.sync_topics.as_deref().unwrap_or_default()
    }
}
impl Update {
    /// The public keys as raw bytes (they were checked by [`Config::validate`]).
    pub fn keys(&self) -> Vec<[u8; crate::signing::PUBLIC_KEY_BYTES]> {
        self.public_keys
            .iter()
            .filter_map(|k| crate::signing::parse_public_key(k).ok())
            .collect()
    }
}

fn default_confirm_secs() -> u64 {
    120
}
fn default_ws_path() -> String {
    "/mqtt".into()
}
fn default_projector_topic() -> String {
    "projector-remote-control".into()
}
fn default_max_payload_bytes() -> usize {
    // 4 MiB is about 80,000 URLs: far above any real work, far below the memory of an old kiosk.
    4 * 1024 * 1024
}
fn default_max_command_bytes() -> usize {
    // A command names a few URLs and a projector message a few projectors;
    // 256 KiB is thousands of either, and parsing it takes well under a slice.
    256 * 1024
}
fn default_projector_max_age_ms() -> u64 {
    10_000
}
fn default_interval_ms() -> u64 {
    10_000
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_max_secs() -> u64 {
    3600
}
fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_animation_pixels() -> u64 {
    crate::verify::MAX_ANIMATION_PIXELS
}
fn default_max_attempts() -> u32 {
    10
}
fn default_retry_base_ms() -> u64 {
    30_000
}
fn default_retry_max_ms() -> u64 {
    3_600_000
}
fn default_log_file() -> PathBuf {
    PathBuf::from("holosync.log")
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_max_bytes() -> u64 {
    1024 * 1024
}
fn default_log_keep() -> u32 {
    5
}
fn default_projector_protocol() -> Protocol {
    Protocol::Raw
}
fn default_projector_port() -> u16 {
    4352
}
fn default_projector_connect_timeout_ms() -> u64 {
    2000
}
fn default_projector_io_timeout_ms() -> u64 {
    3000
}
fn default_projector_terminator() -> String {
    "\r".into()
}

/// Serde builds section defaults from the same field defaults as a present but empty section.
fn from_empty_object<T: for<'de> Deserialize<'de>>() -> T {
    serde_json::from_str("{}").expect("every field of this section has a default")
}

impl Default for Mqtt {
    fn default() -> Self {
        from_empty_object()
    }
}
impl Default for Download {
    fn default() -> Self {
        from_empty_object()
    }
}
impl Default for Log {
    fn default() -> Self {
        from_empty_object()
    }
}
impl Default for Report {
    fn default() -> Self {
        from_empty_object()
    }
}
impl Default for Update {
    /// By hand, not through serde as the other sections: it saves the
    /// 32-bit kiosk exe about 1 KB (the same defaults as the serde ones).
    fn default() -> Self {
        Update {
            public_keys: Vec::new(),
            confirm_secs: default_confirm_secs(),
        }
    }
}
impl Default for Projector {
    fn default() -> Self {
        from_empty_object()
    }
}

/// A config that cannot be used: which file, which key, what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// Dotted key path (`mqtt.port`), or empty when the file as a whole is wrong.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(
                f,
                "config error in {}: {}",
                self.file.display(),
                self.message
            )
        } else {
            write!(
                f,
                "config error in {}: key `{}`: {}",
                self.file.display(),
                self.key,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// The config file used when `--config` is not given: `config.json` next to the executable.
pub fn default_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("holosync"));
    // On Unix, resolve a symlinked exe to the folder it really lives in. Not on
    // Windows: canonicalize returns `\\?\C:\...` paths, confusing in the log.
    #[cfg(unix)]
    let exe = exe.canonicalize().unwrap_or(exe);
    exe.parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.json")
}

impl Config {
    /// Reads, parses, resolves and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| err("", format!("cannot read the file: {e}")))?;
        Config::from_text(&text, file)
    }

    /// Parses, resolves and validates `text` as the config file `file`
    /// (start-up, and a `set-config` patch, are checked by this one door).
    pub fn from_text(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let mut config = Config::parse(text).map_err(|(key, message)| err(&key, message))?;
        let base = file
            .parent()
            .map(absolute)
            .unwrap_or_else(|| absolute(Path::new(".")));
        config.resolve_paths(&base);
        config
            .validate()
            .map_err(|(key, message)| err(key, message))?;
        #[cfg(feature = "tls")]
        config
            .check_tls_files()
            .map_err(|(key, message)| err(key, message))?;
        Ok(config)
    }

    /// Reads every TLS file the config names, so a bad one is a config
    /// error at start-up rather than a failure at each connect.
    #[cfg(feature = "tls")]
    fn check_tls_files(&self) -> Result<(), crate::tls::FileError> {
        if let Some(ca) = &self.download.ca_file {
            crate::tls::https_with(Some(ca))?;
        }
        if self.mqtt.uses_tls() {
            crate::tls::mqtt_config(self.mqtt.ca_file.as_deref(), self.mqtt.client_pair())?;
        }
        Ok(())
    }

    /// Parses JSON text; on error returns the dotted key and the reason.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        // serde would also take a JSON array for the config's fields in order.
        if !text.trim_start().starts_with('{') {
            return Err((
                String::new(),
                "the config must be one JSON object: { \"mqtt\": { ... }, ... }".into(),
            ));
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            // The position is exact; no key can be named yet.
            let message = e.to_string();
            let hint = if message.contains("invalid escape") {
                " (a backslash starts an escape in JSON: write a Windows path as D:/holo or D:\\\\holo)"
            } else {
                ""
            };
            (String::new(), format!("not valid JSON: {message}{hint}"))
        })?;
        let mut config = Config::deserialize(&value)
            .map_err(|e| (culprit(&value, &e.to_string()), plain_words(&e.to_string())))?;
        if config.mqtt.sync_topics.is_none() {
            config.mqtt.sync_topics = Some(default_sync_topics(config.mall.as_deref()));
        }
        Ok(config)
    }

    /// Makes every relative path relative to `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.cache_dir, &mut self.database, &mut self.log.file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let m = &mut self.mqtt;
        for p in [
            &mut m.ca_file,
            &mut m.client_cert,
            &mut m.client_key,
            &mut self.download.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks values serde cannot: ranges, relations between keys, folders that must exist.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let m = &self.mqtt;
        let d = &self.download;
        if m.host.trim().is_empty() {
            return Err(("mqtt.host", "must not be empty".into()));
        }
        if m.port() == 0 {
            return Err(("mqtt.port", "must be 1-65535".into()));
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            return Err((
                if m.client_cert.is_some() {
                    "mqtt.client_key"
                } else {
                    "mqtt.client_cert"
                },
                "mqtt.client_cert and mqtt.client_key go together: give both or neither".into(),
            ));
        }
        if m.tls && m.transport != Transport::Tcp {
            return Err((
                "mqtt.tls",
                "goes with the \"tcp\" transport; for WebSockets over TLS set \"transport\": \"wss\""
                    .into(),
            ));
        }
        if !m.ws_path.starts_with('/')
            || m.ws_path.len() > 1024
            || m.ws_path.chars().any(|c| c.is_control() || c == ' ')
        {
            return Err((
                "mqtt.ws_path",
                format!(
                    "{:?} is not a URL path (it starts with /, no spaces)",
                    m.ws_path
                ),
            ));
        }
        if m.transport != Transport::Tcp && !cfg!(feature = "ws") {
            return Err((
                "mqtt.transport",
                "this holosync was built without WebSockets (the `ws` feature)".into(),
            ));
        }
        if !m.uses_tls() {
            for (key, given) in [
                ("mqtt.ca_file", m.ca_file.is_some()),
                ("mqtt.client_cert", m.client_cert.is_some()),
            ] {
                if given {
                    return Err((
                        key,
                        "is used only with \"tls\": true or \"transport\": \"wss\" in mqtt".into(),
                    ));
                }
            }
        }
        if !cfg!(feature = "tls") {
            if m.uses_tls() {
                return Err((
                    "mqtt.tls",
                    "this holosync was built without TLS (the `tls` feature); use a build with it or plain MQTT".into(),
                ));
            }
            if d.ca_file.is_some() {
                return Err((
                    "download.ca_file",
                    "this holosync was built without TLS (the `tls` feature), so it has no HTTPS"
                        .into(),
                ));
            }
        }
        if !(5..=65_535).contains(&m.keep_alive_secs) {
            return Err(("mqtt.keep_alive_secs", "must be 5-65535".into()));
        }
        if let Some(id) = &m.client_id {
            if id.is_empty() || id.len() > 256 {
                return Err(("mqtt.client_id", "must be 1-256 characters".into()));
            }
        }
        if let Some(mall) = &self.mall {
            if mall.is_empty() || mall.len() > 100 || mall.contains(['/', '#', '+', '\0']) {
                return Err((
                    "mall",
                    format!("{mall:?} cannot be part of a topic name (1-100 characters, no / # +)"),
                ));
            }
        }
        if m.sync_topics().is_empty() {
            return Err(("mqtt.sync_topics", "must name at least one topic".into()));
        }
        for t in m.sync_topics().iter().chain([&m.projector_topic]) {
            if t.is_empty() || t.contains('\0') || t.len() > 65_535 {
                return Err((
                    if *t == m.projector_topic {
                        "mqtt.projector_topic"
                    } else {
                        "mqtt.sync_topics"
                    },
                    format!("{t:?} is not a valid topic"),
                ));
            }
        }
        if m.max_payload_bytes == 0 || m.max_payload_bytes > MAX_PACKET_BYTES {
            return Err((
                "mqtt.max_payload_bytes",
                format!("must be 1-{}", MAX_PACKET_BYTES),
            ));
        }
        if let Some(url) = &self.proxy.url {
            if !url.expose().trim().is_empty() {
                crate::proxy::Proxy::parse(url.expose()).map_err(|e| ("proxy.url", e))?;
            }
        }
        if m.max_command_bytes == 0 || m.max_command_bytes > MAX_PACKET_BYTES {
            return Err((
                "mqtt.max_command_bytes",
                format!("must be 1-{}", MAX_PACKET_BYTES),
            ));
        }
        if !(1..=86_400).contains(&d.timeout_secs) {
            return Err(("download.timeout_secs", "must be 1-86400".into()));
        }
        if d.max_secs < d.timeout_secs || d.max_secs > 7 * 86_400 {
            return Err((
                "download.max_secs",
                "must be at least download.timeout_secs and at most 604800 (a week)".into(),
            ));
        }
        if d.max_bytes_per_sec == Some(0) {
            return Err((
                "download.max_bytes_per_sec",
                "must be at least 1 (or absent: unlimited)".into(),
            ));
        }
        if d.max_bytes == 0 {
            return Err(("download.max_bytes", "must be at least 1".into()));
        }
        if d.max_animation_pixels == 0 {
            return Err(("download.max_animation_pixels", "must be at least 1".into()));
        }
        if d.max_attempts == 0 {
            return Err(("download.max_attempts", "must be at least 1".into()));
        }
        if d.retry_base_ms == 0 {
            return Err(("download.retry_base_ms", "must be at least 1".into()));
        }
        if d.retry_max_ms < d.retry_base_ms {
            return Err((
                "download.retry_max_ms",
                "must be at least download.retry_base_ms".into(),
            ));
        }
        if let Some(q) = d.reencode_jpeg_quality {
            if !(1..=100).contains(&q) {
                return Err(("download.reencode_jpeg_quality", "must be 1-100".into()));
            }
        }
        if self.log.level.parse::<log::LevelFilter>().is_err() {
            return Err((
                "log.level",
                format!(
                    "{:?} is not one of off, error, warn, info, debug, trace",
                    self.log.level
                ),
            ));
        }
        if self.log.max_bytes < 4096 {
            return Err(("log.max_bytes", "must be at least 4096".into()));
        }
        if self.log.keep > 100 {
            return Err(("log.keep", "must be 0-100".into()));
        }
        let p = &self.projector;
        if p.connect_timeout_ms == 0 || p.io_timeout_ms == 0 {
            return Err((
                "projector.connect_timeout_ms",
                "timeouts must be at least 1 ms".into(),
            ));
        }
        if p.connect_timeout_ms > 60_000 || p.io_timeout_ms > 60_000 {
            return Err((
                "projector.io_timeout_ms",
                "connect_timeout_ms and io_timeout_ms must be at most 60000 (a minute)".into(),
            ));
        }
        if !(1..=3_600_000).contains(&p.max_age_ms) {
            return Err(("projector.max_age_ms", "must be 1-3600000 (an hour)".into()));
        }
        if p.port == 0 {
            return Err(("projector.port", "must be 1-65535".into()));
        }
        if p.terminator.is_empty() || p.terminator.len() > 4 {
            return Err(("projector.terminator", "must be 1-4 characters".into()));
        }
        let r = &self.report;
        if let Some(prefix) = &r.prefix {
            if prefix.is_empty() || prefix.contains(['#', '+', '\0']) || prefix.ends_with('/') {
                return Err((
                    "report.prefix",
                    format!("{prefix:?} is not a topic prefix (no # +, no trailing /)"),
                ));
            }
        }
        if r.fleet_topic.contains('\0') || r.fleet_topic.len() > 65_535 {
            return Err(("report.fleet_topic", "is not a topic filter".into()));
        }
        if !(1..=3600).contains(&r.status_interval_secs) {
            return Err(("report.status_interval_secs", "must be 1-3600".into()));
        }
        if m.connect_jitter_ms > 3_600_000 {
            return Err((
                "mqtt.connect_jitter_ms",
                "must be at most 3600000 (an hour)".into(),
            ));
        }
        if let Some(t) = &p.result_topic {
            if t.is_empty() || t.contains(['#', '+', '\0']) {
                return Err((
                    "projector.result_topic",
                    format!("{t:?} is not a topic to publish to"),
                ));
            }
        }
        for key in &self.update.public_keys {
            crate::signing::parse_public_key(key).map_err(|e| {
                let shown: String = key.chars().take(20).collect();
                ("update.public_keys", format!("{shown:?} {e}"))
            })?;
        }
        if !(5..=86_400).contains(&self.update.confirm_secs) {
            return Err(("update.confirm_secs", "must be 5-86400".into()));
        }
        // The cache folder (and its parents) is made at start-up, as the old
        // script did; the database and the log must go into a folder that exists.
        for (key, path) in [("database", &self.database), ("log.file", &self.log.file)] {
            match path.parent() {
                Some(parent) if parent.is_dir() => {}
                _ => {
                    return Err((
                        key,
                        format!(
                            "the folder that should hold {} does not exist",
                            path.display()
                        ),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// An absolute form of `p` without requiring it to exist (and without `\\?\` on Windows).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"mqtt": {"host": "broker"}}"#;

    #[test]
    fn minimal_config_takes_every_default() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.mqtt.port(), 1883);
        assert_eq!(
            c.mqtt.sync_topics(),
            ["sync", "sync-single-work", "holo-file-sync"]
        );
        assert_eq!(c.download.interval_ms, 10_000);
        assert_eq!(c.log.keep, 5);
        assert_eq!(c.cache_dir, PathBuf::from("images"));
        assert_eq!(c.projector.terminator, "\r");
    }

    #[test]
    fn old_holo_image_url_key_is_an_alias_of_cache_dir() {
        let c = Config::parse(r#"{"mqtt": {}, "holoImageUrl": "D:/holo"}"#).unwrap();
        assert_eq!(c.cache_dir, PathBuf::from("D:/holo"));
    }

    #[test]
    fn the_old_scripts_config_works_unchanged() {
        let c = Config::parse(r#"{"holoImageUrl": "D:\\holo", "mall": "m01"}"#).unwrap();
        assert_eq!((c.mqtt.host.as_str(), c.mqtt.port()), ("127.0.0.1", 1883));
        assert_eq!(
            c.mqtt.sync_topics(),
            ["sync", "sync-single-work-m01", "holo-file-sync-m01"]
        );
        assert_eq!(c.mqtt.projector_topic, "projector-remote-control");
        assert_eq!(c.cache_dir, PathBuf::from("D:\\holo"));
        let explicit = Config::parse(r#"{"mall": "m01", "mqtt": {"sync_topics": ["a"]}}"#).unwrap();
        assert_eq!(explicit.mqtt.sync_topics(), ["a"]);
        let mut bad = Config::parse(r#"{"mall": "m/01"}"#).unwrap();
        bad.resolve_paths(&std::env::temp_dir());
        assert_eq!(bad.validate().unwrap_err().0, "mall");
    }

    #[test]
    fn a_json_syntax_error_gives_its_position_not_a_guessed_key() {
        let (key, msg) = Config::parse("{\"download\": {\"interval_ms\": 10,}}").unwrap_err();
        assert_eq!(key, "");
        assert!(msg.contains("line 1 column"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named() {
        let (key, msg) = Config::parse(r#"{"mqtt": {"hots": "x"}}"#).unwrap_err();
        assert_eq!(key, "mqtt.hots");
        assert!(msg.contains("unknown field"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let (key, _) = Config::parse(r#"{"mqtt": {"port": "1883"}}"#).unwrap_err();
        assert_eq!(key, "mqtt.port");
        let (key, _) = Config::parse(r#"{"mqtt": {}, "download": {"max_bytes": -1}}"#).unwrap_err();
        assert_eq!(key, "download.max_bytes");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::parse(r#"{"mqtt": {"port": 0}}"#).unwrap();
        c.resolve_paths(&std::env::temp_dir());
        assert_eq!(c.validate().unwrap_err().0, "mqtt.port");
        let mut c =
            Config::parse(r#"{"mqtt": {}, "download": {"timeout_secs": 60, "max_secs": 30}}"#)
                .unwrap();
        c.resolve_paths(&std::env::temp_dir());
        assert_eq!(c.validate().unwrap_err().0, "download.max_secs");
        let mut c = Config::parse(r#"{"mqtt": {}, "database": "no/such/parent/q.db"}"#).unwrap();
        c.resolve_paths(&std::env::temp_dir());
        assert_eq!(c.validate().unwrap_err().0, "database");
    }

    #[test]
    fn the_new_doors_are_validated_by_key() {
        let key = |json: &str| {
            let mut c = Config::parse(json).unwrap();
            c.resolve_paths(&std::env::temp_dir());
            c.validate().err().map(|e| e.0)
        };
        assert_eq!(
            key(r#"{"mqtt": {"max_command_bytes": 0}}"#),
            Some("mqtt.max_command_bytes")
        );
        assert_eq!(
            key(r#"{"projector": {"max_age_ms": 0}}"#),
            Some("projector.max_age_ms")
        );
        assert_eq!(
            key(r#"{"mqtt": {"tls": true, "transport": "ws"}}"#),
            Some("mqtt.tls")
        );
        assert_eq!(
            key(r#"{"mqtt": {"transport": "ws", "ws_path": "ws"}}"#),
            Some("mqtt.ws_path")
        );
        assert_eq!(
            key(r#"{"proxy": {"url": "socks5://p:1080"}}"#),
            Some("proxy.url")
        );
        assert_eq!(key(r#"{"proxy": {"url": ""}}"#), None);
        let c = Config::parse(
            r#"{"mqtt": {"host": "b.example", "transport": "wss", "ws_path": "/ws"}}"#,
        )
        .unwrap();
        assert_eq!(c.mqtt.ws_url().as_deref(), Some("wss://b.example:443/ws"));
        assert!(c.mqtt.uses_tls());
        let c = Config::parse(r#"{"mqtt": {"host": "::1", "port": 15675, "transport": "ws"}}"#)
            .unwrap();
        assert_eq!(c.mqtt.ws_url().as_deref(), Some("ws://[::1]:15675/mqtt"));
        let c = Config::parse(r#"{"mqtt": {}}"#).unwrap();
        assert_eq!((c.mqtt.ws_url(), c.mqtt.port()), (None, 1883));
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let mut c = Config::parse(MINIMAL).unwrap();
        c.resolve_paths(Path::new("/kiosk"));
        assert_eq!(c.cache_dir, PathBuf::from("/kiosk/images"));
        assert_eq!(c.database, PathBuf::from("/kiosk/holosync.db"));
        assert_eq!(c.log.file, PathBuf::from("/kiosk/holosync.log"));
    }

    #[test]
    fn the_update_sections_default_matches_serdes() {
        let by_hand = Update::default();
        let by_serde: Update = from_empty_object();
        assert_eq!(by_hand.public_keys, by_serde.public_keys);
        assert_eq!(by_hand.confirm_secs, by_serde.confirm_secs);
        let key = |json: &str| {
            let mut c = Config::parse(json).unwrap();
            c.resolve_paths(&std::env::temp_dir());
            c.validate().err().map(|e| e.0)
        };
        assert_eq!(
            key(r#"{"update": {"public_keys": ["00"]}}"#),
            Some("update.public_keys")
        );
        assert_eq!(
            key(r#"{"update": {"confirm_secs": 1}}"#),
            Some("update.confirm_secs")
        );
        assert_eq!(
            key(&format!(
                r#"{{"update": {{"public_keys": ["{}"]}}}}"#,
                "ab".repeat(32)
            )),
            None
        );
    }

    #[test]
    fn password_is_masked_in_debug_output() {
        let c = Config::parse(r#"{"mqtt": {"password": "YTc4Mj"}}"#).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("YTc4Mj"), "{shown}");
        assert_eq!(c.mqtt.password.unwrap().expose(), "YTc4Mj");
    }
}
