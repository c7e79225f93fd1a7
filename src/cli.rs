//! The command line: argument parsing, the agent's start-up, and the small
//! commands a technician runs (`status`, `enqueue`, `check`).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::agent::Agent;
use crate::config::{self, Config};
use crate::error::{Context, Error, Result};
use crate::logger::{utc_timestamp, FileLogger};
use crate::message;
use crate::operator::{self, Sha256Source, Signed};
use crate::queue::unix_ms;
use crate::queue::Queue;
use crate::swap::{self, Paths, Start};

const HELP: &str = "\
holosync - keeps a kiosk's pictures cached locally, synced over MQTT

USAGE:
    holosync [--config PATH]                  run the agent
    holosync status [--config PATH] [--json]  queue counts and the last failures
    holosync enqueue [--config PATH] URL...   queue URLs as if they came from MQTT
    holosync check [--config PATH]            validate the config and the cache folder
    holosync keygen KEYFILE                   make a signing key; prints its public key
    holosync sign --key KEYFILE [--id ID] [--seq N] update VERSION URL (--sha256 HEX | --file EXE)
                  [--target holosync-x86-windows] [--allow-downgrade]
    holosync sign --key KEYFILE [--id ID] [--seq N] set-config PATCH_JSON
                                              print a signed command to publish on `cmd`
    holosync --help | --version

Without --config, the config is config.json next to the executable.
Exit codes: 0 ok, 1 runtime error, 2 bad config or usage.
";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// Run the agent.
    Run,
    /// Print the queue's state.
    Status {
        /// As one JSON object.
        json: bool,
    },
    /// Queue URLs.
    Enqueue {
        /// The URLs given.
        urls: Vec<String>,
    },
    /// Validate config and cache folder.
    Check,
    /// Watch a new version's or config's trial (started by a handover).
    Supervise,
    /// Make a signing key pair.
    Keygen {
        /// Where the private key goes.
        out: PathBuf,
    },
    /// Print a signed command.
    Sign {
        /// The private key file.
        key: PathBuf,
        /// The command's id, if given.
        id: Option<String>,
        /// What to sign.
        what: Signed,
        /// The counter to sign (`--seq`); the time in milliseconds if not given.
        seq: Option<u64>,
    },
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// A parsed command line.
#[derive(Debug, PartialEq)]
pub struct Args {
    /// The subcommand.
    pub command: Command,
    /// `--config PATH`, if given.
    pub config: Option<PathBuf>,
}

/// Parses the arguments after the program name.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut args = args.into_iter().peekable();
    if let Some("keygen" | "sign") = args
        .peek()
        .map(|a| a.to_string_lossy().into_owned())
        .as_deref()
    {
        let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
        return Ok(Args {
            command: parse_operator(&rest)?,
            config: None,
        });
    }
    let mut command = None;
    let mut config = None;
    let mut json = false;
    let mut urls = Vec::new();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        match text.as_ref() {
            "--help" | "-h" => command = Some(Command::Help),
            "--version" | "-V" => command = Some(Command::Version),
            "--config" | "-c" => {
                let path = args.next().ok_or("--config needs a path")?;
                if config.is_some() {
                    return Err("--config given twice: name one config file".into());
                }
                config = Some(PathBuf::from(path));
            }
            "--json" => json = true,
            "status" | "enqueue" | "check" | "run" | "supervise" if command.is_none() => {
                command = Some(match text.as_ref() {
                    "status" => Command::Status { json: false },
                    "supervise" => Command::Supervise,
                    "enqueue" => Command::Enqueue { urls: Vec::new() },
                    "check" => Command::Check,
                    _ => Command::Run,
                })
            }
            other
                if matches!(command, Some(Command::Enqueue { .. })) && !other.starts_with('-') =>
            {
                urls.push(other.to_string())
            }
            other => return Err(format!("unexpected argument {other:?} (see --help)")),
        }
    }
    let command = match command.unwrap_or(Command::Run) {
        Command::Status { .. } => Command::Status { json },
        Command::Enqueue { .. } if urls.is_empty() => {
            return Err("enqueue needs at least one URL".into())
        }
        Command::Enqueue { .. } => Command::Enqueue { urls },
        _ if json => return Err("--json goes with status".into()),
        other => other,
    };
    Ok(Args { command, config })
}

/// `keygen KEYFILE` or `sign --key KEYFILE [--id ID] update|set-config ...`.
fn parse_operator(args: &[String]) -> Result<Command, String> {
    let usage = "see --help for keygen and sign";
    if args[0] == "keygen" {
        return match args {
            [_, out] if !out.starts_with('-') => Ok(Command::Keygen {
                out: PathBuf::from(out),
            }),
            _ => Err(format!(
                "keygen needs the file to write the key to ({usage})"
            )),
        };
    }
    let (mut key, mut id, mut sha256, mut file, mut target) = (None, None, None, None, None);
    let mut seq = None;
    let mut allow_downgrade = false;
    let mut words = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--key" => key = Some(PathBuf::from(value("--key")?)),
            "--id" => id = Some(value("--id")?),
            "--sha256" => sha256 = Some(value("--sha256")?),
            "--file" => file = Some(PathBuf::from(value("--file")?)),
            "--target" => target = Some(value("--target")?),
            "--allow-downgrade" => allow_downgrade = true,
            "--seq" => {
                let v = value("--seq")?;
                seq = Some(
                    v.parse()
                        .map_err(|_| format!("--seq {v:?} is not a number"))?,
                );
            }
            other if other.starts_with("--") => {
                return Err(format!("unexpected argument {other:?} ({usage})"))
            }
            other => words.push(other.to_string()),
        }
    }
    let key = key.ok_or(format!("sign needs --key KEYFILE ({usage})"))?;
    let what = match (words.as_slice(), sha256, file) {
        ([kind, version, url], Some(h), None) if kind == "update" => Signed::Update {
            version: version.clone(),
            url: url.clone(),
            sha256: Sha256Source::Hex(h),
            target,
            allow_downgrade,
        },
        ([kind, version, url], None, Some(f)) if kind == "update" => Signed::Update {
            version: version.clone(),
            url: url.clone(),
            sha256: Sha256Source::File(f),
            target,
            allow_downgrade,
        },
        ([kind, patch], None, None) if kind == "set-config" && target.is_none() => {
            Signed::SetConfig {
                patch: patch.clone(),
            }
        }
        _ => {
            return Err(format!(
                "sign takes `update VERSION URL` with one of --sha256 or --file, or `set-config PATCH_JSON` ({usage})"
            ))
        }
    };
    Ok(Command::Sign { key, id, what, seq })
}

/// Entry point: parse, dispatch, print the error chain, return the exit code.
pub fn main() -> ExitCode {
    let parsed = parse_args(std::env::args_os().skip(1));
    // Started from a command prompt, output (and the agent's log lines) goes there.
    crate::os::attach_parent_console();
    let args = match parsed {
        Ok(a) => a,
        Err(e) => {
            eprintln!("holosync: {e}");
            return ExitCode::from(2);
        }
    };
    let config_path = args.config.clone().unwrap_or_else(config::default_path);
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    if let Some(answer) = needs_no_config(&args.command) {
        return match answer {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("holosync: {}", e.chain());
                ExitCode::FAILURE
            }
        };
    }
    if matches!(args.command, Command::Supervise) {
        // Even a config that no longer loads must be rolled back.
        return supervise(&config_path);
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("holosync: {e}");
            if matches!(args.command, Command::Run) {
                note_in_default_log(&config_path, &e.to_string());
            }
            return ExitCode::from(2);
        }
    };
    let result = match args.command {
        Command::Run => run(config, config_path),
        Command::Status { json } => status(&config, json),
        Command::Enqueue { urls } => enqueue(&config, &urls),
        Command::Check => return check(&config, &config_path),
        Command::Help
        | Command::Version
        | Command::Keygen { .. }
        | Command::Sign { .. }
        | Command::Supervise => unreachable!("answered above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holosync: {}", e.chain());
            log::error!("{}", e.chain());
            ExitCode::FAILURE
        }
    }
}

/// The output of a command that reads no config (help, version, the
/// operator's keygen and sign); None for the others.
fn needs_no_config(command: &Command) -> Option<Result<String>> {
    Some(match command {
        Command::Help => Ok(HELP.to_string()),
        Command::Version => Ok(format!("holosync {}\n", env!("CARGO_PKG_VERSION"))),
        Command::Keygen { out } => operator::keygen(out).map(|public| {
            format!(
                "wrote the private key to {} (keep it off the kiosks)\npublic key for update.public_keys: {public}\n",
                out.display()
            )
        }),
        Command::Sign { key, id, what, seq } => {
            operator::sign(key, what, id.as_deref(), *seq).map(|c| format!("{c}\n"))
        }
        Command::Run
        | Command::Status { .. }
        | Command::Enqueue { .. }
        | Command::Check
        | Command::Supervise => return None,
    })
}

/// A kiosk has no console: a config that cannot be read is also written to
/// `holosync.log` beside it, where the technician looks.
fn note_in_default_log(config_path: &Path, message: &str) {
    let log = config_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("holosync.log");
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(
            f,
            "{} ERROR holosync {} cannot start: {message}",
            utc_timestamp(std::time::SystemTime::now()),
            env!("CARGO_PKG_VERSION")
        );
    }
}

/// The agent's log file, for the agent (echoing to its terminal) and for a
/// technician's `enqueue` (whose own output already goes to the terminal).
fn install_logger(config: &Config, echo: bool) -> Result<()> {
    let level = config
        .log
        .level
        .parse()
        .expect("validated in Config::validate");
    FileLogger::install(
        &config.log.file,
        level,
        config.log.max_bytes,
        config.log.keep,
        echo,
    )
    .context(|| format!("could not open log file {}", config.log.file.display()))
}

fn run(config: Config, config_path: PathBuf) -> Result<()> {
    // Before any other thread exists (see `os::watch_stop`).
    crate::os::watch_stop();
    install_logger(&config, true)?;
    let lock = single_instance(&config.database)?;
    let mut paths = Paths::current(&config_path)?;
    let (trial, ended) = match swap::at_start(&mut paths)? {
        Start::Run { trial, ended } => (trial, ended),
        Start::Resume(kind, paths) => {
            // The agent on trial takes the lock: it must be free first.
            drop(lock);
            swap::start_supervisor(&paths, kind)?;
            log::info!("started the supervisor to resume the trial; this process exits");
            return Ok(());
        }
    };
    cache_writable(&config).map_err(|e| {
        Error::msg(format!(
            "holosync stopped: {} (nothing can be cached)",
            e.chain()
        ))
    })?;
    let hand_over = Agent::new(config, config_path, paths.clone(), trial, ended)
        .map_err(|e| Error::msg(format!("holosync stopped: {}", e.chain())))?
        .run();
    if let Some(kind) = hand_over {
        drop(lock);
        swap::start_supervisor(&paths, kind)?;
        log::info!(
            "started the supervisor of the {}; this process exits",
            kind.name()
        );
    }
    Ok(())
}

/// `holosync supervise`, started by a handover: watches the trial (see
/// `swap.rs`). It logs to the config's log file when the config can be read.
fn supervise(config_path: &Path) -> ExitCode {
    crate::os::watch_stop();
    if let Ok(config) = Config::load(config_path) {
        let _ = install_logger(&config, false);
    }
    match swap::supervise(config_path) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("supervisor: {}", e.chain());
            eprintln!("holosync: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}

/// Makes the cache folder (with its parents) and writes and removes a probe
/// file in it: a folder the agent cannot write would fail every URL after
/// downloading it, so it is refused at the door, as `check` does.
fn cache_writable(config: &Config) -> Result<()> {
    let probe = config.cache_dir.join(".holosync-check");
    std::fs::create_dir_all(&config.cache_dir)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .context(|| {
            format!(
                "cache folder {} is not writable (check cache_dir and the folder's permissions)",
                config.cache_dir.display()
            )
        })
}

/// Holds an OS lock on `<database>.lock` for the life of the process. A second
/// copy (a double start from the Startup folder) finds it taken and exits.
fn single_instance(database: &Path) -> Result<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context(|| format!("could not open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::msg(format!(
            "holosync is already running with this database (lock {} is held); this copy exits",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).context(|| format!("could not lock {}", path.display()))
        }
    }
}

fn status(config: &Config, json: bool) -> Result<()> {
    if !config.database.is_file() {
        return Err(Error::msg(format!(
            "no queue at {}: the agent has not run with this config yet (status creates nothing)",
            config.database.display()
        )));
    }
    let mut st = Queue::open(&config.database)?.status(crate::report::STATUS_FAILURES)?;
    st.cache_free_bytes = crate::os::free_bytes(&config.cache_dir);
    if json {
        let out = serde_json::to_string(&st).expect("a status always serializes");
        println!("{out}");
        return Ok(());
    }
    println!(
        "queue {}: {} pending, {} retry, {} done, {} failed",
        config.database.display(),
        st.pending,
        st.retry,
        st.done,
        st.failed
    );
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "cache {}: {} files, {:.1} MB{}",
        config.cache_dir.display(),
        st.cache_files,
        mb(st.cache_bytes),
        st.cache_free_bytes.map_or(String::new(), |f| format!(
            ", {:.1} MB free on its disk",
            mb(f)
        ))
    );
    if let Some(secs) = st.oldest_pending_secs {
        println!("oldest waiting URL queued {secs} s ago");
    }
    println!(
        "last sync message: {}; last download: {}",
        st.last_sync.as_deref().unwrap_or("none"),
        st.last_download
            .as_ref()
            .map_or("none".to_string(), |l| format!(
                "{} {} at {}",
                l.state, l.url, l.at
            ))
    );
    if let Some(u) = &st.last_update {
        println!("last update or set-config: {u}");
    }
    if !st.failures.is_empty() {
        println!("last failures (failed first, newest first):");
        for f in &st.failures {
            println!(
                "  {:<6} attempts={:<3} {}\n         {}",
                f.state, f.attempts, f.url, f.error
            );
        }
    }
    Ok(())
}

/// Queues URLs by hand; what it did goes to the terminal and, for the
/// technician reading it later, to the agent's log.
fn enqueue(config: &Config, urls: &[String]) -> Result<()> {
    // Without a log file the command still works: the terminal shows all.
    let logged = install_logger(config, false).is_ok();
    let say = |level: log::Level, line: String| {
        println!("{line}");
        if logged {
            log::log!(level, "enqueue (command line): {line}");
        }
    };
    let parsed = message::parse_sync(urls.join(",").as_bytes());
    for s in &parsed.skipped {
        say(
            log::Level::Warn,
            format!("skipped {:?}: {}", s.entry, s.reason),
        );
    }
    for e in &parsed.entries {
        if let Some(reason) = &e.rejected {
            say(
                log::Level::Warn,
                format!("rejected {}: {reason} (stored as failed)", e.url),
            );
        }
    }
    let r = Queue::open(&config.database)?.enqueue(
        &parsed.entries,
        unix_ms(),
        config.download.retry_max_ms,
    )?;
    say(
        log::Level::Info,
        format!(
            "queued {} URLs ({} already queued, {} rejected, {} skipped)",
            r.queued,
            r.duplicates,
            r.rejected,
            parsed.skipped.len()
        ),
    );
    Ok(())
}

fn check(config: &Config, config_path: &Path) -> ExitCode {
    if let Err(e) = cache_writable(config) {
        eprintln!("holosync: {}", e.chain());
        return ExitCode::from(2);
    }
    println!(
        "config {} is valid; cache folder {} is writable",
        config_path.display(),
        config.cache_dir.display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_runs_the_agent_with_the_default_config() {
        assert_eq!(
            parse(&[]).unwrap(),
            Args {
                command: Command::Run,
                config: None
            }
        );
    }

    #[test]
    fn subcommands_and_options_in_any_order() {
        let a = parse(&["--config", "c.json", "status", "--json"]).unwrap();
        assert_eq!(a.command, Command::Status { json: true });
        assert_eq!(a.config, Some(PathBuf::from("c.json")));
        let a = parse(&[
            "enqueue",
            "http://a/1.jpg",
            "--config",
            "x",
            "http://a/2.jpg",
        ])
        .unwrap();
        assert_eq!(
            a.command,
            Command::Enqueue {
                urls: vec!["http://a/1.jpg".into(), "http://a/2.jpg".into()]
            }
        );
    }

    #[test]
    fn the_operators_tools_take_their_own_arguments() {
        let a = parse(&[
            "sign",
            "--key",
            "k",
            "update",
            "0.3.0",
            "https://x/h.exe",
            "--file",
            "h.exe",
            "--target",
            "holosync-x86-windows",
            "--id",
            "u-1",
        ])
        .unwrap();
        assert_eq!(
            a.command,
            Command::Sign {
                key: PathBuf::from("k"),
                id: Some("u-1".into()),
                what: Signed::Update {
                    version: "0.3.0".into(),
                    url: "https://x/h.exe".into(),
                    sha256: Sha256Source::File(PathBuf::from("h.exe")),
                    target: Some("holosync-x86-windows".into()),
                    allow_downgrade: false,
                },
                seq: None,
            }
        );
        let a = parse(&["sign", "--key", "k", "--seq", "42", "set-config", "{}"]).unwrap();
        assert!(matches!(a.command, Command::Sign { seq: Some(42), .. }));
        assert!(parse(&["sign", "--key", "k", "--seq", "x", "set-config", "{}"]).is_err());
        let a = parse(&["sign", "--key", "k", "set-config", "{}"]).unwrap();
        assert!(matches!(
            a.command,
            Command::Sign {
                what: Signed::SetConfig { .. },
                ..
            }
        ));
        assert_eq!(
            parse(&["keygen", "fleet.key"]).unwrap().command,
            Command::Keygen {
                out: PathBuf::from("fleet.key")
            }
        );
        assert!(parse(&["keygen"]).is_err());
        assert!(parse(&["sign", "update", "0.3.0", "u", "--sha256", "ab"]).is_err());
        assert!(parse(&["sign", "--key", "k", "update", "0.3.0", "u"]).is_err());
        assert!(parse(&[
            "sign", "--key", "k", "update", "0.3.0", "u", "--sha256", "a", "--file", "f"
        ])
        .is_err());
        assert_eq!(parse(&["supervise"]).unwrap().command, Command::Supervise);
    }

    #[test]
    fn mistakes_are_reported() {
        assert!(parse(&["--config"]).is_err());
        assert!(parse(&["enqueue"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        assert!(parse(&["check", "--json"]).is_err());
    }
}
