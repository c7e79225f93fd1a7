//! The fleet operator's tools: `holosync keygen` makes an Ed25519 key pair,
//! `holosync sign` prints the signed `update` and `set-config` commands to
//! publish on a kiosk's (or the fleet's) `cmd` topic. They run on the
//! operator's machine, never on a kiosk: the private key stays there.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Map, Value};

use crate::error::{Context, Error, Result};
use crate::signing::{self, UpdateStatement};

/// What `holosync sign` signs.
#[derive(Debug, PartialEq)]
pub enum Signed {
    /// An `update` command.
    Update {
        /// The new version.
        version: String,
        /// Where kiosks download it.
        url: String,
        /// Its SHA-256 given in hex, or the file to hash.
        sha256: Sha256Source,
        /// `holosync-<arch>-<os>`; this build's own when not given.
        target: Option<String>,
        /// Whether an older version may be installed.
        allow_downgrade: bool,
    },
    /// A `set-config` command with this JSON merge patch.
    SetConfig {
        /// The patch as the operator wrote it.
        patch: String,
    },
}

/// Where the SHA-256 of an update comes from.
#[derive(Debug, PartialEq)]
pub enum Sha256Source {
    /// Given as 64 hex digits.
    Hex(String),
    /// Computed from this file (the exe to publish).
    File(PathBuf),
}

/// Whether this build has the tools: the kiosk exe is built without the
/// `operator` feature (`.ci/windows-build.sh`), which leaves this code out
/// (the condition is constant, so the optimizer drops the rest): keys and
/// signatures are made on the operator's machine, never on a kiosk.
fn built_in() -> Result<()> {
    if cfg!(feature = "operator") {
        Ok(())
    } else {
        Err(Error::msg(
            "this holosync was built without the operator's tools (the `operator` feature); run keygen and sign with a desktop build",
        ))
    }
}

/// Writes a new private key (PKCS#8 DER, as ring makes it; `openssl pkey
/// -inform DER` reads it) to `out`, which must not exist yet, and returns
/// the public key in hex, for `update.public_keys`.
pub fn keygen(out: &Path) -> Result<String> {
    built_in()?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| Error::msg("could not make a key: no random numbers from the OS"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| Error::msg("ring made a key it cannot read back"))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(out).context(|| {
        format!(
            "could not create key file {} (it must not exist yet)",
            out.display()
        )
    })?;
    f.write_all(pkcs8.as_ref())
        .and_then(|()| f.sync_all())
        .context(|| format!("could not write key file {}", out.display()))?;
    Ok(signing::hex(pair.public_key().as_ref()))
}

/// The command JSON (one line) that carries `what`, signed with the key in
/// `key_file`, with `id` if given, and the counter `seq` (the time of
/// signing in milliseconds if not given: see `signing.rs`).
pub fn sign(key_file: &Path, what: &Signed, id: Option<&str>, seq: Option<u64>) -> Result<String> {
    built_in()?;
    let seq = seq.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    });
    let der = std::fs::read(key_file)
        .context(|| format!("could not read key file {}", key_file.display()))?;
    let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|_| {
        Error::msg(format!(
            "key file {} is not an Ed25519 private key (PKCS#8, as `holosync keygen` writes)",
            key_file.display()
        ))
    })?;
    let mut command = Map::new();
    if let Some(id) = id {
        command.insert("id".into(), json!(id));
    }
    match what {
        Signed::Update {
            version,
            url,
            sha256,
            target,
            allow_downgrade,
        } => {
            if !signing::valid_version(version) {
                return Err(Error::msg(format!(
                    "{version:?} is not a version (like 0.3.0)"
                )));
            }
            let sha256 = match sha256 {
                Sha256Source::Hex(h) if h.len() == 64 && signing::decode(h).is_some() => {
                    h.to_ascii_lowercase()
                }
                Sha256Source::Hex(h) => {
                    return Err(Error::msg(format!(
                        "{h:?} is not a SHA-256 (64 hex digits)"
                    )))
                }
                Sha256Source::File(p) => {
                    let bytes =
                        std::fs::read(p).context(|| format!("could not read {}", p.display()))?;
                    signing::sha256_hex(
                        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
                    )
                }
            };
            let statement = UpdateStatement {
                target: target.clone().unwrap_or_else(signing::own_target),
                version: version.clone(),
                sha256,
                allow_downgrade: *allow_downgrade,
                seq,
            };
            let signature = signing::hex(pair.sign(&statement.bytes()).as_ref());
            command.insert("command".into(), json!("update"));
            command.insert("version".into(), json!(statement.version));
            command.insert("url".into(), json!(url));
            command.insert("target".into(), json!(statement.target));
            command.insert("sha256".into(), json!(statement.sha256));
            if statement.allow_downgrade {
                command.insert("allow_downgrade".into(), json!(true));
            }
            command.insert("seq".into(), json!(seq));
            command.insert("signature".into(), json!(signature));
        }
        Signed::SetConfig { patch } => {
            let patch: Value = serde_json::from_str(patch)
                .map_err(|e| Error::msg(format!("the patch is not JSON: {e}")))?;
            if !patch.is_object() {
                return Err(Error::msg("the patch must be a JSON object"));
            }
            let statement = signing::config_statement(&patch, seq);
            let signature = signing::hex(pair.sign(&statement).as_ref());
            command.insert("command".into(), json!("set-config"));
            command.insert("patch".into(), patch);
            command.insert("seq".into(), json!(seq));
            command.insert("signature".into(), json!(signature));
        }
    }
    Ok(Value::Object(command).to_string())
}
