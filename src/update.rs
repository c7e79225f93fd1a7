//! The `update` and `set-config` commands in the loop: the checks that
//! refuse them (no key, bad signature, not newer, invalid patch), the new
//! executable downloaded in bounded slices next to the running one, and the
//! files of the handover made ready (`swap.rs` does the rest once the agent
//! has stopped).
//!
//! The download goes through the same HTTP client as the pictures
//! (`http::Get`: proxy, stall and overall limits, `download.max_bytes`,
//! `download.max_bytes_per_sec`), but not through `download.rs`, which is
//! made for the queue and the cache (rows, image verification, cache
//! paths). `update_fetch.rs` does it: into a partial file named by the
//! signed SHA-256, resumed with `Range` after a transient failure, tried up
//! to `download.max_attempts` times within the command with the download
//! section's backoff. When the attempts are spent the command fails and the
//! partial file stays: the same command sent again (or redelivered by the
//! broker after a kill, as it is acked only with its outcome) resumes it.
//! A failure that will not get better (404, too large, a whole download
//! that does not hash right) removes it, and so does an update to another
//! version.

use std::task::Poll;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::Config;
use crate::http::{self, Pool};
use crate::link::Delivery;
use crate::queue::Queue;
use crate::signing::{self, UpdateStatement};
use crate::swap::{self, Kind, Marker, Paths};
use crate::update_fetch::{self, Fetch, Retries};

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
    /// The signed counter (see `signing.rs`).
    pub seq: u64,
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
        /// The signed counter, which a signed patch must carry.
        seq: Option<u64>,
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
struct Running {
    /// The order.
    order: Order,
    /// The request.
    request: Box<UpdateRequest>,
    /// The download into the partial file.
    fetch: Fetch,
}

/// The updater: at most one download at a time.
pub struct Updater {
    /// Where the files of a handover go.
    paths: Paths,
    /// HTTP limits (the download section's).
    limits: http::Limits,
    /// Attempts and backoff (the download section's).
    retries: Retries,
    /// Connections (and the proxies in force).
    pool: Pool,
    /// The download in progress.
    running: Option<Running>,
}

impl Updater {
    /// An updater for the agent of `paths`.
    pub fn new(paths: Paths, limits: http::Limits, retries: Retries, pool: Pool) -> Updater {
        Updater {
            paths,
            limits,
            retries,
            pool,
            running: None,
        }
    }

    /// Whether a download has work now (not waiting out a backoff).
    pub fn busy(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.fetch.waiting_until().is_none())
    }

    /// The end of the backoff a download waits out before its next
    /// attempt, if it does (the loop may sleep until then).
    pub fn waiting_until(&self) -> Option<Instant> {
        self.running.as_ref().and_then(|r| r.fetch.waiting_until())
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
    pub fn take(&mut self, order: Order, config: &Config, queue: &mut Queue) -> Option<Outcome> {
        let refuse = |order, name, why| Some(refused(order, name, why));
        match order.request.clone() {
            Request::Update(r) => {
                if let Err(why) = self.check(&r, config) {
                    return refuse(order, "update", why);
                }
                if self.running.is_some() {
                    return refuse(order, "update", "busy: an update is downloading".into());
                }
                if let Err(why) = accept_seq(queue, r.seq, &statement(&r).bytes()) {
                    return refuse(order, "update", why);
                }
                self.start(order, r)
            }
            Request::SetConfig {
                patch,
                signature,
                seq,
            } => {
                if self.running.is_some() {
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
                    seq,
                ) {
                    Ok(t) => t,
                    Err(why) => return refuse(order, "set-config", why),
                };
                if let (Some(_), Some(seq)) = (&signature, seq) {
                    let statement = signing::config_statement(&patch, seq);
                    if let Err(why) = accept_seq(queue, seq, &statement) {
                        return refuse(order, "set-config", why);
                    }
                }
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
        if !signing::verify(&keys, &statement(r).bytes(), &r.signature) {
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

    /// Starts the download (None), or says why it cannot start. Partial
    /// files of other versions are removed; this version's is resumed.
    fn start(&mut self, order: Order, request: Box<UpdateRequest>) -> Option<Outcome> {
        let partial = self.paths.partial(&request.sha256);
        for other in self.paths.partials() {
            if other != partial {
                match std::fs::remove_file(&other) {
                    Ok(()) => log::info!(
                        "removed {}: the partial download of another update",
                        other.display()
                    ),
                    Err(e) => log::warn!("could not remove {}: {e}", other.display()),
                }
            }
        }
        let fetch = match Fetch::open(
            &request.version,
            &request.url,
            &request.sha256,
            &partial,
            self.limits,
            self.retries,
        ) {
            Ok(f) => f,
            Err(why) => return Some(refused(order, "update", why)),
        };
        log::info!(
            "command update (id {}): downloading {} {} to {}{}",
            order.id,
            request.version,
            request.url,
            partial.display(),
            match fetch.size() {
                0 => String::new(),
                n => format!(
                    " ({n} bytes kept from before, checked against the signed sha256 first)"
                ),
            }
        );
        self.running = Some(Running {
            order,
            request,
            fetch,
        });
        None
    }

    /// One slice of the download until `deadline`; the outcome once it is
    /// over (failed, or the handover's files ready).
    pub fn step(&mut self, config: &Config, deadline: Instant) -> Option<Outcome> {
        let r = self.running.as_mut()?;
        let result = match r.fetch.step(deadline, &mut self.pool) {
            Poll::Pending => return None,
            Poll::Ready(result) => result,
        };
        let Running {
            order,
            request,
            fetch,
        } = self.running.take().expect("taken above");
        let url = request.url;
        let version = request.version;
        match result {
            Ok(()) => {
                if let Err(e) = swap::free_staged(&self.paths) {
                    return Some(self.failed(order, e.chain()));
                }
                if let Err(why) = fetch.finish(&self.paths.new) {
                    let _ = std::fs::remove_file(&self.paths.new);
                    return Some(self.failed(order, why));
                }
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
            Err(update_fetch::Failed { why, keep }) => {
                if keep {
                    fetch.keep();
                } else {
                    fetch.discard();
                }
                Some(self.failed(order, format!("{url}: {why}")))
            }
        }
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

    /// The agent is stopping: a download in progress is left, its partial
    /// file kept for the same update, redelivered or sent again, to resume.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let path = r.fetch.path().to_path_buf();
            let size = r.fetch.keep();
            log::info!(
                "left the download of version {} unfinished: kept {} ({size} bytes) for resuming it when the update comes again",
                r.request.version,
                path.display()
            );
        }
    }
}

/// What the operator signed for `r`, for this build's target.
fn statement(r: &UpdateRequest) -> UpdateStatement {
    UpdateStatement {
        target: signing::own_target(),
        version: r.version.clone(),
        sha256: r.sha256.clone(),
        allow_downgrade: r.allow_downgrade,
        seq: r.seq,
    }
}

/// The replay guard's entry in the queue's meta table: `SEQ DIGEST`, the
/// signed counter and the SHA-256 of the statement last accepted here.
const SIGNED_SEQ_KEY: &str = "signed_seq";

/// Accepts a signed command whose signature was checked: its `seq` must be
/// above the last one accepted here, or equal with the same statement (the
/// same command again: resent after a failed download, or redelivered after
/// a kill). Recorded durably before the command takes effect, so an older
/// signed command (a downgrade, an earlier broker) cannot be replayed.
fn accept_seq(queue: &mut Queue, seq: u64, statement: &[u8]) -> Result<(), String> {
    let digest =
        signing::sha256_hex(ring::digest::digest(&ring::digest::SHA256, statement).as_ref());
    let last = queue.meta(SIGNED_SEQ_KEY).map_err(|e| e.chain())?;
    if let Some((last_seq, last_digest)) = last.as_deref().and_then(|t| t.split_once(' ')) {
        let last_seq: u64 = last_seq.parse().unwrap_or(u64::MAX);
        if seq < last_seq || (seq == last_seq && digest != last_digest) {
            return Err(format!(
                "replayed or out of order: its seq {seq} is not after {last_seq}, the last signed command accepted here (sign it again: holosync sign takes a new seq)"
            ));
        }
    }
    queue
        .set_meta_durably(SIGNED_SEQ_KEY, &format!("{seq} {digest}"))
        .map_err(|e| e.chain())
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
