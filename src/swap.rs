//! The handover to a new executable or a new config, its trial, and the
//! rollback: files and processes only (no MQTT, no queue).
//!
//! The files, with `holosync.exe` the agent's executable and `config.json`
//! its config (on Unix, `holosync`, `holosync.new` and `holosync.old`):
//!
//! - `holosync.new.exe`: the downloaded, verified new version (staged);
//! - `holosync.old.exe`: a copy of the running version, made before the
//!   swap; it runs the supervisor, and stays as the previous version;
//! - `config.json.prev`: the config before a `set-config`;
//! - `holosync.update` (next to the config): the trial marker, JSON with
//!   the kind (`update`, `config`), the versions, the command's id and the
//!   phase (`staged`, `trial`, `confirmed`, `restoring`, `failed`).
//!
//! An update, in order. Every step is one new file, one rename or one
//! copy through a temporary name, each on the disk before the next, and
//! `holosync.exe` is the old version until the new one has been confirmed:
//! whatever the power cuts, the Startup-folder shortcut starts a version
//! that has run here, and that version finishes or undoes the handover.
//!
//! 1. the old agent downloads to `holosync.new.exe` and checks size and SHA-256;
//! 2. it copies itself to `holosync.old.exe` (a temporary name, synced,
//!    renamed);
//! 3. it writes the marker (`staged`), acks the command, stops cleanly
//!    (goodbye on `state`, the single-instance lock released) and starts
//!    `holosync.old.exe supervise`, then exits;
//! 4. the supervisor (not holding the lock, not on MQTT) marks the trial
//!    (`trial`) and starts `holosync.new.exe` itself, which knows it is on
//!    trial because the marker says `trial` and the supervisor holds
//!    `holosync.update.lock`, and takes its paths from the marker;
//! 5. the new agent, once connected and subscribed, records the outcome in
//!    its queue (durably) and marks `confirmed`;
//! 6. the supervisor copies `holosync.new.exe` over `holosync.exe` (a
//!    temporary name, renamed: the name of a running exe is never taken
//!    or given, so Windows has nothing to refuse), removes
//!    `holosync.new.exe` (on Windows the running new agent holds it: the
//!    next start removes it, or the next update renames it aside first,
//!    [`free_staged`]), removes the marker and exits.
//!
//! If the new one cannot start, exits, or is not confirmed within
//! `update.confirm_secs`, the supervisor kills it, marks `failed` with the
//! reason, removes `holosync.new.exe` and starts `holosync.exe`, which was
//! never replaced; that agent records and reports the failure.
//!
//! A `set-config` is the same with `config.json` and `config.json.prev`:
//! the new config is written before the trial, the supervisor runs from
//! `holosync.exe` itself, and a rollback copies `config.json.prev` back
//! while the marker says `restoring`.
//!
//! At every start ([`at_start`]) the marker says what a crash or a power cut
//! interrupted: `staged` or `trial` without a supervisor resumes the trial
//! (a supervisor is started again); `confirmed` with `holosync.new.exe`
//! still there resumes step 6; `restoring` finishes the rollback;
//! `failed`, and `confirmed` after step 6, are recorded and reported, then
//! the marker is removed ([`clear`]); no marker and a stray
//! `holosync.new.exe` (a download that never got to step 3, or the copy
//! the running new agent held at step 6) removes it.
//!
//! Before step 1 the download grows in a partial file named by the signed
//! SHA-256 ([`Paths::partial`], `holosync.<16 hex digits>.part`), renamed to
//! `holosync.new.exe` once whole and checked. The start-up tidy-up leaves
//! it: the same `update`, sent again or redelivered after a kill, resumes
//! it (`update_fetch.rs`), and an update to another version removes it.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Context, Error, Result};
use crate::os::Process;

/// How often the supervisor looks at the marker and the agent on trial.
const SUPERVISE_POLL: Duration = Duration::from_millis(100);

/// How long the supervisor waits for the old agent to let go of the
/// executable's name (Windows: until its process has ended).
const RELEASE_WAIT: Duration = Duration::from_secs(60);

/// What a handover changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new executable.
    Update,
    /// A new config.
    Config,
}

impl Kind {
    /// The command's name, as in the marker and the events.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Config => "set-config",
        }
    }
}

/// The files of a handover, for the agent run with `config`.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agent's executable (the name the Startup-folder shortcut starts).
    pub exe: PathBuf,
    /// The staged new version.
    pub new: PathBuf,
    /// The previous version, which runs the supervisor.
    pub old: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The config before a `set-config`.
    pub config_prev: PathBuf,
    /// The trial marker.
    pub marker: PathBuf,
}

/// The executable's sibling named by `tag`: `holosync.exe` ->
/// `holosync.old.exe` (Windows runs and scans it as an exe; the
/// supervisor runs from the `old` one), `holosync` -> `holosync.old`.
fn sibling(exe: &Path, tag: &str) -> PathBuf {
    match (exe.file_stem(), exe.extension()) {
        (Some(stem), Some(ext)) if ext.eq_ignore_ascii_case("exe") => {
            let mut name = stem.to_owned();
            name.push(format!(".{tag}."));
            name.push(ext);
            exe.with_file_name(name)
        }
        _ => with_suffix(exe, &format!(".{tag}")),
    }
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl Paths {
    /// The paths for the running executable `exe` and `config`.
    pub fn new(exe: &Path, config: &Path) -> Paths {
        Paths {
            exe: exe.to_path_buf(),
            new: sibling(exe, "new"),
            old: sibling(exe, "old"),
            config: config.to_path_buf(),
            config_prev: with_suffix(config, ".prev"),
            marker: config
                .parent()
                .unwrap_or(Path::new("."))
                .join("holosync.update"),
        }
    }

    /// The partial download of the version whose signed SHA-256 is
    /// `sha256` (hex), next to the executable: `holosync.<first 16 hex
    /// digits>.part`. The name carries the hash so a kept partial is only
    /// ever resumed by the update it belongs to.
    pub fn partial(&self, sha256: &str) -> PathBuf {
        let key: String = sha256.chars().take(16).collect();
        self.exe
            .with_file_name(format!("{}.{key}.part", self.exe_stem()))
    }

    /// Whether `path` is a partial download's file (of any version).
    pub fn is_partial(&self, path: &Path) -> bool {
        let stem = self.exe_stem();
        let Some(name) = path.file_name().and_then(OsStr::to_str) else {
            return false;
        };
        path.parent() == self.exe.parent()
            && name
                .strip_prefix(&format!("{stem}."))
                .and_then(|rest| rest.strip_suffix(".part"))
                .is_some_and(|key| key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// The partial downloads next to the executable (of any version).
    pub fn partials(&self) -> Vec<PathBuf> {
        let dir = self.exe.parent().unwrap_or(Path::new("."));
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| self.is_partial(p))
            .collect()
    }

    /// The executable's name without `.exe` (`holosync`).
    fn exe_stem(&self) -> String {
        let name = match self.exe.extension() {
            Some(ext) if ext.eq_ignore_ascii_case("exe") => self.exe.file_stem(),
            _ => self.exe.file_name(),
        };
        name.map_or_else(|| "holosync".into(), |n| n.to_string_lossy().into_owned())
    }

    /// The paths of this process's executable and `config`.
    pub fn current(config: &Path) -> Result<Paths> {
        let exe = std::env::current_exe().context(|| "could not find the running executable")?;
        Ok(Paths::new(&exe, config))
    }
}

/// What the marker says.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Update or config.
    pub kind: Kind,
    /// The version that started the handover.
    pub from: String,
    /// The version on trial (the same as `from` for a config).
    pub to: String,
    /// The command's id (JSON), for the answer.
    pub id: Value,
    /// `staged`, `trial`, `confirmed` or `failed`.
    pub phase: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// The agent's executable (the supervisor runs from another file).
    pub exe: PathBuf,
    /// Time the new one has to confirm (the old config's, so a patch cannot
    /// shorten its own trial).
    pub confirm_secs: u64,
}

impl Marker {
    fn to_json(&self) -> String {
        json!({
            "kind": self.kind.name(),
            "from": self.from,
            "to": self.to,
            "id": self.id,
            "phase": self.phase,
            "reason": self.reason,
            "exe": self.exe,
            "confirm_secs": self.confirm_secs,
        })
        .to_string()
    }

    fn parse(text: &str) -> Option<Marker> {
        let v: Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(String::from);
        Some(Marker {
            kind: match s("kind")?.as_str() {
                "update" => Kind::Update,
                "set-config" => Kind::Config,
                _ => return None,
            },
            from: s("from")?,
            to: s("to")?,
            id: v.get("id").cloned().unwrap_or(Value::Null),
            phase: s("phase")?,
            reason: s("reason"),
            exe: PathBuf::from(s("exe")?),
            confirm_secs: v.get("confirm_secs")?.as_u64()?,
        })
    }

    /// Reads the marker; None if there is none (an unreadable one is logged
    /// and taken as none: it was being written when the power went).
    pub fn read(path: &Path) -> Option<Marker> {
        let text = fs::read_to_string(path).ok()?;
        let m = Marker::parse(&text);
        if m.is_none() {
            log::warn!("ignored an unreadable trial marker {}", path.display());
        }
        m
    }

    /// Writes the marker atomically (temporary file, synced, renamed).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, self.to_json().as_bytes())
    }
}

/// Writes `bytes` to `path` through `<path>.tmp`, synced before the rename,
/// so `path` holds the old bytes or the new, never a part; the rename is on
/// the disk before this returns (a command is acked after it).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let result = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| crate::os::rename_durably(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.context(|| format!("could not write {}", path.display()))
}

/// Copies `from` to `to` through `<to>.tmp` (synced, renamed durably),
/// keeping `from`'s permissions (the executable bit on Unix).
fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    let tmp = with_suffix(to, ".tmp");
    let result = fs::copy(from, &tmp)
        .and_then(|_| OpenOptions::new().write(true).open(&tmp)?.sync_all())
        .map_err(|e| {
            Error::new(
                format!("could not copy {} to {}", from.display(), tmp.display()),
                e,
            )
        })
        .and_then(|()| rename_when_free(&tmp, to));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `holosync.new.exe` moved aside by [`free_staged`].
fn aside(new: &Path) -> PathBuf {
    with_suffix(new, ".del")
}

/// Frees the staged name for a new version. The last update's staged file
/// may still be the image of the running agent: on Windows the agent that
/// was on trial runs from it until its next start, and a running exe can be
/// renamed but not replaced or deleted. So it is removed, or else renamed
/// aside to `holosync.new.exe.del`, which the next start removes.
pub fn free_staged(paths: &Paths) -> Result<()> {
    if !paths.new.exists() || fs::remove_file(&paths.new).is_ok() {
        return Ok(());
    }
    let aside = aside(&paths.new);
    let _ = fs::remove_file(&aside);
    fs::rename(&paths.new, &aside).context(|| {
        format!(
            "could not move {} (the last update's, still running) aside to {}",
            paths.new.display(),
            aside.display()
        )
    })
}

/// Steps 2 and 3 of an update (before the clean stop): the running
/// executable copied to `holosync.old.exe`, the marker written.
pub fn prepare_update(paths: &Paths, marker: &Marker) -> Result<()> {
    copy_atomically(&paths.exe, &paths.old)?;
    marker.write(&paths.marker)
}

/// A `set-config`'s files: the marker, `config.json.prev`, then the new
/// config, each written atomically.
pub fn prepare_config(paths: &Paths, marker: &Marker, new_config: &str) -> Result<()> {
    marker.write(&paths.marker)?;
    copy_atomically(&paths.config, &paths.config_prev)?;
    write_atomically(&paths.config, new_config.as_bytes())
}

/// Starts the supervisor for the marker's handover (the old agent's last
/// act, after its clean stop and with its lock released).
pub fn start_supervisor(paths: &Paths, kind: Kind) -> Result<()> {
    let program = match kind {
        Kind::Update => &paths.old,
        Kind::Config => &paths.exe,
    };
    spawn(program, &paths.config, &["supervise"])
        .map(drop)
        .context(|| format!("could not start the supervisor {}", program.display()))
}

/// Starts `program` (with `args`, then `--config config`), its output
/// nowhere (see `os::spawn`).
fn spawn(program: &Path, config: &Path, args: &[&str]) -> std::io::Result<Process> {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend([OsStr::new("--config"), config.as_os_str()]);
    crate::os::spawn(program, &all)
}

/// What a start finds of an earlier handover.
#[derive(Debug)]
pub enum Start {
    /// Run the agent: on trial (started by a supervisor) or not, and
    /// reporting the handover that ended (confirmed or failed), if any.
    Run {
        /// This agent is the new version (or config) on trial.
        trial: bool,
        /// The handover that ended.
        ended: Option<Marker>,
    },
    /// A trial was interrupted: start a supervisor of this kind to resume
    /// it (once the lock is released), and exit.
    Resume(Kind, Paths),
}

/// Looks for an interrupted or finished handover (see the module's
/// comment). A marker names the agent's executable: `paths` becomes the
/// marker's (the new version on trial runs from `holosync.new.exe`).
pub fn at_start(paths: &mut Paths) -> Result<Start> {
    // A partial download (`Paths::partial`) is not stray: it is kept for
    // the update that resumes it. A staged file moved aside is.
    let _ = fs::remove_file(aside(&paths.new));
    let Some(marker) = Marker::read(&paths.marker) else {
        if paths.new.exists() {
            log::info!(
                "removed {}: a staged update not on trial (a download that was never handed over, or the last update's copy)",
                paths.new.display()
            );
            let _ = fs::remove_file(&paths.new);
        }
        return Ok(Start::Run {
            trial: false,
            ended: None,
        });
    };
    *paths = Paths::new(&marker.exe, &paths.config);
    let swapped = marker.kind == Kind::Config || !paths.new.exists();
    match marker.phase.as_str() {
        // Removed by the agent once it has recorded how it ended ([`clear`]).
        "failed" => Ok(Start::Run {
            trial: false,
            ended: Some(marker),
        }),
        "confirmed" if swapped => Ok(Start::Run {
            trial: false,
            ended: Some(marker),
        }),
        // Started by the supervisor, which holds its lock while it watches.
        "trial" if supervisor_lock(&paths.marker)?.is_none() => Ok(Start::Run {
            trial: true,
            ended: None,
        }),
        _ => {
            log::warn!(
                "the {} to {} was interrupted (phase {}): resuming it",
                marker.kind.name(),
                marker.to,
                marker.phase
            );
            let paths = paths.clone();
            if marker.kind == Kind::Update && !paths.old.exists() {
                // The marker is written after `holosync.old.exe`, so this is a hand's work.
                fs::remove_file(&paths.marker)
                    .context(|| format!("could not remove {}", paths.marker.display()))?;
                return Err(Error::msg(format!(
                    "{} is gone, so the interrupted update cannot be checked; removed its marker, start again",
                    paths.old.display()
                )));
            }
            Ok(Start::Resume(marker.kind, paths))
        }
    }
}

/// Removes the marker of a handover that ended (found at start), once the
/// agent has recorded how it ended: a power cut before that finds the
/// marker again, and the next start records it again. A failed update's
/// staged file goes first.
pub fn clear(paths: &Paths) -> Result<()> {
    if paths.new.exists() {
        let _ = fs::remove_file(&paths.new);
    }
    match fs::remove_file(&paths.marker) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::new(
            format!("could not remove {}", paths.marker.display()),
            e,
        )),
        _ => Ok(()),
    }
}

/// The agent on trial is online (connected and subscribed): `record` keeps
/// how the handover ended (durably), then the marker says `confirmed`, for
/// the supervisor, which removes it. In that order, so a power cut never
/// leaves a kiosk whose marker is gone but whose `status` does not know the
/// handover ended. Returns the confirmed marker.
pub fn confirm(
    paths: &Paths,
    record: impl FnOnce(&Marker) -> Result<()>,
) -> Result<Option<Marker>> {
    let Some(mut marker) = Marker::read(&paths.marker) else {
        return Ok(None);
    };
    if marker.phase != "trial" {
        return Ok(None);
    }
    marker.phase = "confirmed".into();
    marker.to = if marker.kind == Kind::Update {
        env!("CARGO_PKG_VERSION").into()
    } else {
        marker.to
    };
    record(&marker)?;
    marker.write(&paths.marker)?;
    log::info!(
        "{} to {} confirmed: online and subscribed",
        marker.kind.name(),
        marker.to
    );
    Ok(Some(marker))
}

/// Whether a new handover may start now.
#[derive(Debug, PartialEq)]
pub enum Readiness {
    /// No handover is going on.
    Ready,
    /// This agent's trial was confirmed and its supervisor is closing it
    /// (a tenth of a second): try again on a later turn.
    Wait,
    /// A handover is going on that this agent cannot finish: why.
    Busy(String),
}

/// Whether a new handover may start (one at a time: a marker written while
/// a supervisor still watches the last trial would look like that trial's
/// failure to it). A confirmed marker whose supervisor is gone (killed) is
/// removed here.
pub fn readiness(paths: &Paths) -> Readiness {
    let Some(m) = Marker::read(&paths.marker) else {
        return Readiness::Ready;
    };
    match supervisor_lock(&paths.marker) {
        Ok(Some(_lock)) if m.phase == "confirmed" => match finish(paths, &m) {
            Ok(()) => Readiness::Ready,
            Err(e) => Readiness::Busy(format!(
                "could not finish the confirmed {}: {}",
                m.kind.name(),
                e.chain()
            )),
        },
        Ok(None) if m.phase == "confirmed" => Readiness::Wait,
        _ => Readiness::Busy(format!(
            "a {} to {} is in progress ({}, phase {})",
            m.kind.name(),
            m.to,
            paths.marker.display(),
            m.phase
        )),
    }
}

/// Holds `<marker>.lock` while a supervisor runs: a second supervisor (a
/// double start during a trial) finds it taken and leaves.
fn supervisor_lock(marker: &Path) -> Result<Option<File>> {
    let path = with_suffix(marker, ".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context(|| format!("could not open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(_) => Ok(None),
    }
}

/// The supervisor (`holosync supervise`): finishes the swap, starts the
/// agent on trial, and keeps it or rolls back (see the module's comment).
pub fn supervise(config: &Path) -> Result<()> {
    let marker_path = Paths::new(Path::new("holosync"), config).marker;
    let Some(_lock) = supervisor_lock(&marker_path)? else {
        log::info!("another supervisor is watching the trial; this one leaves");
        return Ok(());
    };
    let Some(mut marker) = Marker::read(&marker_path) else {
        return Err(Error::msg(format!(
            "nothing to supervise: no trial marker {}",
            marker_path.display()
        )));
    };
    let paths = Paths::new(&marker.exe, config);
    match marker.phase.as_str() {
        "restoring" => {
            // A rollback that a crash or a power cut interrupted: finish it.
            let reason = marker.reason.clone().unwrap_or_default();
            return roll_back(&paths, config, marker, reason);
        }
        "confirmed" => {
            // Step 6 was interrupted: finish it and start the new version.
            finish(&paths, &marker)?;
            spawn(&paths.exe, config, &[])
                .context(|| format!("could not start {}", paths.exe.display()))?;
            crate::os::stopped();
            return Ok(());
        }
        _ => {}
    }
    let on_trial = match marker.kind {
        Kind::Update if !paths.new.exists() => {
            let reason = format!("{} is gone", paths.new.display());
            return roll_back(&paths, config, marker, reason);
        }
        Kind::Update => &paths.new,
        Kind::Config => &paths.exe,
    };
    marker.phase = "trial".into();
    marker.write(&paths.marker)?;
    let limit = Duration::from_secs(marker.confirm_secs);
    log::info!(
        "supervisor: {} to {} on trial; it has {} s to get online",
        marker.kind.name(),
        marker.to,
        limit.as_secs()
    );
    let started = Instant::now();
    let mut child = match spawn(on_trial, config, &[]) {
        Ok(c) => Some(c),
        Err(e) => {
            log::error!("supervisor: could not start {}: {e}", on_trial.display());
            None
        }
    };
    let failure = loop {
        if crate::os::stop_requested().is_some() {
            // Windows is logging off (the agent on trial is stopping too, so
            // its exit says nothing): the marker stays, the next start resumes.
            crate::os::stopped();
            return Ok(());
        }
        let Some(agent) = child.as_mut() else {
            break Some("the new agent could not be started".to_string());
        };
        match Marker::read(&paths.marker) {
            Some(m) if m.kind == marker.kind && m.id == marker.id => {
                if m.phase == "confirmed" {
                    break None;
                }
            }
            _ => {
                // Only this supervisor removes its marker, and an agent
                // starts no handover while it runs (see `readiness`).
                log::warn!("supervisor: the trial's marker was replaced or removed; leaving it");
                crate::os::stopped();
                return Ok(());
            }
        }
        match agent.try_wait() {
            Ok(Some(status)) => break Some(format!("the new agent exited at start ({status})")),
            Ok(None) => {}
            Err(e) => break Some(format!("could not watch the new agent: {e}")),
        }
        if started.elapsed() > limit {
            break Some(format!(
                "the new agent did not get online within {} s (update.confirm_secs)",
                limit.as_secs()
            ));
        }
        std::thread::sleep(SUPERVISE_POLL);
    };
    let Some(reason) = failure else {
        log::info!(
            "supervisor: {} to {} confirmed after {} ms",
            marker.kind.name(),
            marker.to,
            started.elapsed().as_millis()
        );
        finish(&paths, &marker)?;
        crate::os::stopped();
        return Ok(());
    };
    log::error!(
        "supervisor: {} to {} failed: {reason}; restoring the previous one",
        marker.kind.name(),
        marker.to
    );
    if let Some(mut agent) = child {
        agent.kill();
    }
    roll_back(&paths, config, marker, reason)
}

/// Step 6 of a confirmed handover: the new version copied over the
/// agent's executable (an update), then the marker removed. A marker
/// already gone is no error: its supervisor may finish between an agent's
/// reading it and taking the supervisor's lock (see [`readiness`]).
fn finish(paths: &Paths, marker: &Marker) -> Result<()> {
    if marker.kind == Kind::Update && paths.new.exists() {
        copy_atomically(&paths.new, &paths.exe)?;
        // Windows: the running new agent holds it; the next start removes it.
        let _ = fs::remove_file(&paths.new);
    }
    clear(paths)
}

/// Ends a failed trial: marks the handover `failed` with `reason` and
/// starts the previous agent, which records and reports it. An update's
/// `holosync.exe` was never replaced; a config's previous file is copied
/// back while the marker says `restoring`, so a start after a power cut in
/// between finishes the rollback instead of taking the restored config for
/// the new one on trial.
fn roll_back(paths: &Paths, config: &Path, mut marker: Marker, reason: String) -> Result<()> {
    marker.reason = Some(reason);
    if marker.kind == Kind::Config {
        marker.phase = "restoring".into();
        marker.write(&paths.marker)?;
        copy_atomically(&paths.config_prev, &paths.config)?;
    }
    marker.phase = "failed".into();
    marker.write(&paths.marker)?;
    if marker.kind == Kind::Update {
        let _ = fs::remove_file(&paths.new);
    }
    spawn(&paths.exe, config, &[])
        .context(|| format!("could not start {}", paths.exe.display()))?;
    crate::os::stopped();
    Ok(())
}

/// Renames `from` over `to` once no process runs `to` any more (at once on
/// Unix; on Windows a running exe, or one whose process is still being
/// torn down, cannot be replaced), waiting up to [`RELEASE_WAIT`]. The
/// rename is on the disk before this returns.
fn rename_when_free(from: &Path, to: &Path) -> Result<()> {
    let until = Instant::now() + RELEASE_WAIT;
    loop {
        match crate::os::rename_durably(from, to) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < until => {
                log::debug!("waiting to replace {}: {e}", to.display());
                std::thread::sleep(SUPERVISE_POLL);
            }
            Err(e) => {
                return Err(Error::new(
                    format!("could not rename {} to {}", from.display(), to.display()),
                    e,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_handover_waits_for_the_supervisor_of_the_last_one() {
        let dir = std::env::temp_dir().join(format!("holosync-swap-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let paths = Paths::new(&dir.join("holosync.exe"), &dir.join("config.json"));
        assert_eq!(readiness(&paths), Readiness::Ready);
        let mut m = Marker {
            kind: Kind::Config,
            from: "0.1.0".into(),
            to: "0.1.0".into(),
            id: json!("c-1"),
            phase: "confirmed".into(),
            reason: None,
            exe: paths.exe.clone(),
            confirm_secs: 120,
        };
        m.write(&paths.marker).unwrap();
        let supervisor = supervisor_lock(&paths.marker).unwrap().expect("free");
        assert_eq!(readiness(&paths), Readiness::Wait);
        drop(supervisor);
        // Its supervisor gone (killed), a confirmed trial is over: cleared.
        assert_eq!(readiness(&paths), Readiness::Ready);
        assert!(!paths.marker.exists());
        m.phase = "staged".into();
        m.write(&paths.marker).unwrap();
        assert!(matches!(readiness(&paths), Readiness::Busy(why) if why.contains("phase staged")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_marker_reads_back_what_was_written() {
        let m = Marker {
            kind: Kind::Update,
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            id: json!("u-1"),
            phase: "staged".into(),
            reason: None,
            exe: PathBuf::from("/kiosk/holosync.exe"),
            confirm_secs: 120,
        };
        assert_eq!(Marker::parse(&m.to_json()), Some(m.clone()));
        assert_eq!(Marker::parse("{\"kind\":\"update\""), None);
        let paths = Paths::new(Path::new("/k/holosync.exe"), Path::new("/c/config.json"));
        assert_eq!(paths.old, PathBuf::from("/k/holosync.old.exe"));
        assert_eq!(paths.new, PathBuf::from("/k/holosync.new.exe"));
        let paths = Paths::new(Path::new("/k/holosync"), Path::new("/c/config.json"));
        assert_eq!(paths.old, PathBuf::from("/k/holosync.old"));
        assert_eq!(paths.marker, PathBuf::from("/c/holosync.update"));
        assert_eq!(paths.config_prev, PathBuf::from("/c/config.json.prev"));
    }

    #[test]
    fn a_partial_is_named_by_the_signed_sha256_next_to_the_exe() {
        let sha = "0123456789abcdef".repeat(4);
        let paths = Paths::new(Path::new("/k/holosync.exe"), Path::new("/c/config.json"));
        let part = paths.partial(&sha);
        assert_eq!(part, PathBuf::from("/k/holosync.0123456789abcdef.part"));
        assert!(paths.is_partial(&part));
        let paths = Paths::new(Path::new("/k/holosync"), Path::new("/c/config.json"));
        assert_eq!(
            paths.partial(&sha),
            PathBuf::from("/k/holosync.0123456789abcdef.part")
        );
        for other in [
            "/k/holosync.new",
            "/k/holosync.0123.part",
            "/k/other.0123456789abcdef.part",
            "/elsewhere/holosync.0123456789abcdef.part",
        ] {
            assert!(!paths.is_partial(Path::new(other)), "{other}");
        }
    }
}
