//! The `update` and `set-config` commands in the loop: the checks that
//! refuse them (no key, bad signature, not newer, invalid patch), the new
//! executable downloaded in bounded slices next to the running one, hashed
//! as it arrives, and the files of the handover made ready (`swap.rs` does
//! the rest once the agent has stopped).
//!
//! The download goes through the same HTTP client as the pictures
//! (`http::Get`: proxy, stall and overall limits, `download.max_bytes`,
//! `download.max_bytes_per_sec`), but not through `download.rs`, which is
//! made for the queue and the cache (rows, image verification, cache
//! paths). One attempt, no resume: a failure is answered and the operator
//! sends the command again.

use std::fs::File;
use std::io::Write;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::Config;
use crate::http::{self, Get, Pool, Progress};
use crate::link::Delivery;
use crate::signing::{self, UpdateStatement};
use crate::swap::{self, Kind, Marker, Paths};

/// An `update` as the command gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    /// The new version.
    pub version: String,
    /// Where to download it.
    pub url: String,
    /// Its SHA-256, 64 lower-case hex digits.
    pub sha256: String,
    /// Ed25519 signature of the statement (hex or base64).
    pub signature: String,
    /// Whether the statement allows a version not newer than ours.
    pub allow_downgrade: bool,
    /// The target the operator signed for, if the command says (shown in a refusal).
    pub target: Option<String>,
}

/// A command for the updater.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Install a new executable.
    Update(Box<UpdateRequest>),
    /// Patch the config and restart.
    SetConfig {
        /// The JSON merge patch.
        patch: Value,
        /// Ed25519 signature of the patch's statement, if given.
        signature: Option<String>,
    },
}

/// A command handed to the updater, with what its answer needs.
#[derive(Debug)]
pub struct Order {
    /// The command's id.
    pub id: Value,
    /// What it asks.
    pub request: Request,
    /// The message, acked when the command is done (None for QoS 0).
    pub delivery: Option<Delivery>,
}

/// What became of an order.
#[derive(Debug)]
pub struct Outcome {
    /// The command's id.
    pub id: Value,
    /// The answer for `events`.
    pub answer: Value,
    /// The message to ack.
    pub delivery: Option<Delivery>,
    /// Set when the agent must stop and hand over (the files are ready).
    pub hand_over: Option<Kind>,
}

/// The download of a new version in progress.
struct Fetch {
    /// The order.
    order: Order,
    /// The request.
    request: Box<UpdateRequest>,
    /// The GET.
    get: Get,
    /// the staged file (`holosync.new.exe`), being written.
    file: File,
    /// SHA-256 of the bytes so far.
    hash: ring::digest::Context,
    /// Bytes so far.
    size: u64,
    /// Body bytes of the last step.
    body: Vec<u8>,
}

/// The updater: at most one download at a time.
pub struct Updater {
    /// Where the files of a handover go.
    paths: Paths,
    /// HTTP limits (the download section's).
    limits: http::Limits,
    /// Connections (and the proxies in force).
    pool: Pool,
    /// The download in progress.
    fetch: Option<Fetch>,
}

impl Updater {
    /// An updater for the agent of `paths`.
    pub fn new(paths: Paths, limits: http::Limits, pool: Pool) -> Updater {
        Updater {
            paths,
            limits,
            pool,
            fetch: None,
        }
    }

    /// Whether a download is in progress.
    pub fn busy(&self) -> bool {
        self.fetch.is_some()
    }

    /// The handover's files.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// Whether a handover may start now (see `swap::readiness`).
    pub fn readiness(&self) -> swap::Readiness {
        swap::readiness(&self.paths)
    }

    /// Takes a command: refuses it, starts its download (None: the outcome
    /// comes from [`Updater::step`]), or, for a valid `set-config`, writes
    /// the new config and asks for the handover.
    pub fn take(&mut self, order: Order, config: &Config) -> Option<Outcome> {
        let refuse = |order, name, why| Some(refused(order, name, why));
        match order.request.clone() {
            Request::Update(r) => {
                if let Err(why) = self.check(&r, config) {
                    return refuse(order, "update", why);
                }
                if self.fetch.is_some() {
                    return refuse(order, "update", "busy: an update is downloading".into());
                }
                self.start(order, r)
            }
            Request::SetConfig { patch, signature } => {
                if self.fetch.is_some() {
                    return refuse(order, "set-config", "busy: an update is downloading".into());
                }
                let current = match std::fs::read_to_string(&self.paths.config) {
                    Ok(t) => t,
                    Err(e) => {
                        let why = format!("could not read {}: {e}", self.paths.config.display());
                        return refuse(order, "set-config", why);
                    }
                };
                let text = match crate::remote_config::patched(
                    &self.paths.config,
                    &current,
                    config,
                    &patch,
                    signature.as_deref(),
                ) {
                    Ok(t) => t,
                    Err(why) => return refuse(order, "set-config", why),
                };
                let version = env!("CARGO_PKG_VERSION").to_string();
                let marker = self.marker(Kind::Config, &order.id, version, config);
                if let Err(e) = swap::prepare_config(&self.paths, &marker, &text) {
                    let _ = std::fs::remove_file(&self.paths.marker);
                    return refuse(order, "set-config", e.chain());
                }
                log::info!(
                    "command set-config (id {}): config written ({} kept); restarting with it",
                    order.id,
                    self.paths.config_prev.display()
                );
                Some(Outcome {
                    answer: json!({"id": order.id, "command": "set-config", "ok": true, "restarting": true}),
                    id: order.id,
                    delivery: order.delivery,
                    hand_over: Some(Kind::Config),
                })
            }
        }
    }

    /// The checks before anything is downloaded: a key, the signature over
    /// this target's statement, a newer version (unless signed otherwise).
    fn check(&self, r: &UpdateRequest, config: &Config) -> Result<(), String> {
        let keys = config.update.keys();
        if keys.is_empty() {
            return Err("no key is configured (update.public_keys): updates are refused".into());
        }
        let target = signing::own_target();
        let statement = UpdateStatement {
            target: target.clone(),
            version: r.version.clone(),
            sha256: r.sha256.clone(),
            allow_downgrade: r.allow_downgrade,
        };
        if !signing::verify(&keys, &statement.bytes(), &r.signature) {
            return Err(match &r.target {
                Some(t) if *t != target => {
                    format!("bad signature: it was made for {t}, this kiosk runs {target}")
                }
                _ => format!(
                    "bad signature: it is not by a key of update.public_keys over this version, sha256 and target {target}"
                ),
            });
        }
        let own = env!("CARGO_PKG_VERSION");
        if !r.allow_downgrade && !signing::newer(&r.version, own) {
            return Err(format!(
                "version {} is not newer than the running {own} (a downgrade needs \"allow_downgrade\": true, signed)",
                r.version
            ));
        }
        Ok(())
    }

    /// Starts the download (None), or says why it cannot start.
    fn start(&mut self, order: Order, request: Box<UpdateRequest>) -> Option<Outcome> {
        let file = match File::create(&self.paths.new) {
            Ok(f) => f,
            Err(e) => {
                let why = format!("could not create {}: {e}", self.paths.new.display());
                return Some(refused(order, "update", why));
            }
        };
        let get = match Get::start(&request.url, Vec::new(), self.limits, &mut self.pool) {
            Ok(g) => g,
            Err(f) => {
                let _ = std::fs::remove_file(&self.paths.new);
                let why = format!("{}: {}", request.url, f.reason());
                return Some(refused(order, "update", why));
            }
        };
        log::info!(
            "command update (id {}): downloading {} {} to {}",
            order.id,
            request.version,
            request.url,
            self.paths.new.display()
        );
        self.fetch = Some(Fetch {
            order,
            request,
            get,
            file,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            size: 0,
            body: Vec::new(),
        });
        None
    }

    /// One slice of the download until `deadline`; the outcome once it is
    /// over (refused, or the handover's files ready).
    pub fn step(&mut self, config: &Config, deadline: Instant) -> Option<Outcome> {
        let f = self.fetch.as_mut()?;
        let result = loop {
            f.body.clear();
            match f.get.step(&mut f.body, deadline) {
                Ok(Progress::Head) => {
                    let status = f.get.head().map_or(0, |h| h.status);
                    if status != 200 {
                        break Err(format!("{}: HTTP status {status}", f.request.url));
                    }
                }
                Ok(Progress::Body(_)) => {
                    f.hash.update(&f.body);
                    f.size += f.body.len() as u64;
                    if let Err(e) = f.file.write_all(&f.body) {
                        break Err(format!("could not write {}: {e}", self.paths.new.display()));
                    }
                }
                Ok(Progress::End) => break Ok(()),
                Ok(Progress::Pending) => {}
                Err(failure) => break Err(format!("{}: {}", f.request.url, failure.reason())),
            }
            if Instant::now() >= deadline {
                return None;
            }
        };
        let mut f = self.fetch.take().expect("taken above");
        f.get.release(&mut self.pool);
        let result = result.and_then(|()| self.finish(f.file, f.hash, f.size, &f.request));
        let (order, version) = (f.order, f.request.version);
        match result {
            Ok(()) => {
                let marker = self.marker(Kind::Update, &order.id, version.clone(), config);
                if let Err(e) = swap::prepare_update(&self.paths, &marker) {
                    let _ = std::fs::remove_file(&self.paths.new);
                    let _ = std::fs::remove_file(&self.paths.marker);
                    return Some(self.failed(order, e.chain()));
                }
                log::info!(
                    "command update (id {}): {version} downloaded and checked; handing over",
                    order.id
                );
                Some(Outcome {
                    answer: json!({"id": order.id, "command": "update", "ok": true, "version": version, "restarting": true}),
                    id: order.id,
                    delivery: order.delivery,
                    hand_over: Some(Kind::Update),
                })
            }
            Err(why) => {
                let _ = std::fs::remove_file(&self.paths.new);
                Some(self.failed(order, why))
            }
        }
    }

    /// Checks the whole download (its SHA-256, which also covers its size)
    /// and makes it durable and executable.
    fn finish(
        &self,
        file: File,
        hash: ring::digest::Context,
        size: u64,
        request: &UpdateRequest,
    ) -> Result<(), String> {
        let got = signing::sha256_hex(hash.finish().as_ref());
        if got != request.sha256 {
            return Err(format!(
                "sha256 mismatch: the {size} bytes downloaded hash to {got}, the signed statement says {}",
                request.sha256
            ));
        }
        let new = &self.paths.new;
        file.sync_all()
            .map_err(|e| format!("could not sync {}: {e}", new.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(new, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("could not make {} executable: {e}", new.display()))?;
        }
        Ok(())
    }

    fn failed(&self, order: Order, why: String) -> Outcome {
        log::warn!("command update (id {}) failed: {why}", order.id);
        Outcome {
            answer: json!({"id": order.id, "command": "update", "error": why}),
            id: order.id,
            delivery: order.delivery,
            hand_over: None,
        }
    }

    fn marker(&self, kind: Kind, id: &Value, to: String, config: &Config) -> Marker {
        Marker {
            kind,
            from: env!("CARGO_PKG_VERSION").into(),
            to,
            id: id.clone(),
            phase: "staged".into(),
            reason: None,
            exe: self.paths.exe.clone(),
            confirm_secs: config.update.confirm_secs,
        }
    }

    /// The agent is stopping: a download in progress is dropped with its file.
    pub fn stop(&mut self) {
        if let Some(f) = self.fetch.take() {
            log::info!(
                "left the download of version {} unfinished (send the update again)",
                f.request.version
            );
            drop(f.file);
            let _ = std::fs::remove_file(&self.paths.new);
        }
    }
}

/// The answer to a command refused (or failed) without changing anything.
pub fn refused(order: Order, name: &str, why: String) -> Outcome {
    log::warn!("command {name} (id {}) refused: {why}", order.id);
    Outcome {
        answer: json!({"id": order.id, "command": name, "error": why}),
        id: order.id,
        delivery: order.delivery,
        hand_over: None,
    }
}

/// How a handover ended, as told on `events` and kept for `status`:
/// confirmed (the version now running), or rolled back and why.
pub fn ended(m: &Marker) -> Value {
    let ok = m.phase == "confirmed";
    let mut v = json!({
        "id": m.id,
        "command": m.kind.name(),
        "ok": ok,
        "at": crate::logger::utc_timestamp(std::time::SystemTime::now()),
    });
    if m.kind == Kind::Update {
        v["version"] = json!(m.to);
    }
    if !ok {
        v["rolled_back"] = json!(true);
        v["error"] = json!(m.reason.as_deref().unwrap_or("the trial was not confirmed"));
    }
    v
}
