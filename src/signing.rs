//! What a fleet operator signs, and the checks of it: the canonical
//! statements of an update and of a config patch, Ed25519 signatures over
//! them (ring), SHA-256 (ring), the keys in hex or base64, and the order of
//! versions. Pure: no files, no network.
//!
//! An update statement is these six lines, each ending in `\n` (UTF-8):
//!
//! ```text
//! holosync update v2
//! target holosync-x86-windows
//! version 0.3.0
//! sha256 <64 lower-case hex digits>
//! allow_downgrade false
//! seq 1796600000000
//! ```
//!
//! A config statement is three lines, the patch re-serialized by serde_json
//! (keys sorted, no whitespace: the same bytes whatever spacing or key
//! order the operator wrote):
//!
//! ```text
//! holosync set-config v2
//! seq 1796600000000
//! patch {"log":{"level":"debug"}}
//! ```
//!
//! The first line names the kind, so a signature over one kind can never
//! pass as the other; the target (`holosync-<arch>-<os>`) keeps a Windows
//! 32-bit build from being swapped onto another platform. `seq` is the
//! operator's counter (`holosync sign` takes the time of signing in
//! milliseconds): a kiosk accepts a signed command only if its `seq` is
//! higher than that of the last one it accepted, or the same command again,
//! so an old signed command (a downgrade, a broker address) cannot be
//! replayed by whoever can publish on the command topics.

use ring::signature::{UnparsedPublicKey, ED25519};

/// Bytes of an Ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;

/// Bytes of an Ed25519 signature.
const SIGNATURE_BYTES: usize = 64;

/// Longest version string accepted (`0.3.0`, `1.2.3-rc.1`).
const MAX_VERSION_CHARS: usize = 32;

/// This build's target name: `holosync-<arch>-<os>` (`holosync-x86-windows`
/// for the kiosk exe), the name an update statement must carry.
pub fn own_target() -> String {
    format!(
        "holosync-{}-{}",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

/// The signed facts of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateStatement {
    /// `holosync-<arch>-<os>`.
    pub target: String,
    /// The new version.
    pub version: String,
    /// SHA-256 of the new executable, 64 lower-case hex digits.
    pub sha256: String,
    /// Whether a version not newer than the running one may be installed.
    pub allow_downgrade: bool,
    /// The operator's counter (see the module's comment).
    pub seq: u64,
}

impl UpdateStatement {
    /// The exact bytes signed (see the module's comment).
    pub fn bytes(&self) -> Vec<u8> {
        format!(
            "holosync update v2\ntarget {}\nversion {}\nsha256 {}\nallow_downgrade {}\nseq {}\n",
            self.target, self.version, self.sha256, self.allow_downgrade, self.seq
        )
        .into_bytes()
    }
}

/// The exact bytes signed for a config patch (see the module's comment).
pub fn config_statement(patch: &serde_json::Value, seq: u64) -> Vec<u8> {
    format!("holosync set-config v2\nseq {seq}\npatch {patch}\n").into_bytes()
}

/// Whether `signature` (hex or base64) is a valid Ed25519 signature of
/// `message` by one of `keys` (raw 32-byte public keys).
pub fn verify(keys: &[[u8; PUBLIC_KEY_BYTES]], message: &[u8], signature: &str) -> bool {
    let Some(sig) = decode(signature).filter(|s| s.len() == SIGNATURE_BYTES) else {
        return false;
    };
    keys.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k)
            .verify(message, &sig)
            .is_ok()
    })
}

/// A public key from its hex (64 digits) or base64 (44 characters) form.
pub fn parse_public_key(text: &str) -> Result<[u8; PUBLIC_KEY_BYTES], String> {
    decode(text.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            "is not an Ed25519 public key (32 bytes as 64 hex digits or 44 base64 characters)"
                .to_string()
        })
}

/// SHA-256 as 64 lower-case hex digits.
pub fn sha256_hex(digest: &[u8]) -> String {
    hex(digest)
}

/// `bytes` as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (even length, either case) or standard base64 (with its `=` padding)
/// to bytes; None if it is neither.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let t = text.as_bytes();
    if t.len().is_multiple_of(2) && t.iter().all(u8::is_ascii_hexdigit) {
        return (0..t.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
            .collect();
    }
    base64(t)
}

/// Standard base64 (RFC 4648 section 4, padded) to bytes.
fn base64(t: &[u8]) -> Option<Vec<u8>> {
    if t.is_empty() || !t.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let pad = t.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(t.len() / 4 * 3);
    for (n, quad) in t.chunks(4).enumerate() {
        let last = n == t.len() / 4 - 1;
        let mut acc = 0u32;
        for (i, &c) in quad.iter().enumerate() {
            let v = if c == b'=' && last && i >= 4 - pad {
                0
            } else {
                value(c)?
            };
            acc = acc << 6 | v;
        }
        let keep = if last { 3 - pad } else { 3 };
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + keep]);
    }
    Some(out)
}

/// Whether `v` is a version this program takes: 1-32 characters, digits
/// and dots first (`0.3.0`), then optionally `-` or `+` and letters,
/// digits, dots or dashes.
pub fn valid_version(v: &str) -> bool {
    let numbers = v.split(['-', '+']).next().unwrap_or("");
    !v.is_empty()
        && v.len() <= MAX_VERSION_CHARS
        && numbers
            .split('.')
            .all(|n| !n.is_empty() && n.len() <= 9 && n.bytes().all(|b| b.is_ascii_digit()))
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

/// Whether version `a` is newer than `b`: dotted numbers compared as
/// numbers (a missing one counts 0: `1.2` = `1.2.0`); with equal numbers,
/// a release is newer than a pre-release (`0.3.0` > `0.3.0-rc.1`), as in
/// semver. Build metadata (`+...`) is ignored. Both must be valid.
pub fn newer(a: &str, b: &str) -> bool {
    let parse = |v: &str| {
        let v = v.split('+').next().unwrap_or("");
        let (numbers, pre) = match v.split_once('-') {
            Some((n, p)) => (n, Some(p.to_string())),
            None => (v, None),
        };
        let mut n: Vec<u64> = numbers.split('.').filter_map(|x| x.parse().ok()).collect();
        while n.last() == Some(&0) {
            n.pop();
        }
        (n, pre)
    };
    let (na, pa) = parse(a);
    let (nb, pb) = parse(b);
    match na.cmp(&nb) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (pa, pb) {
            (None, Some(_)) => true,
            (Some(x), Some(y)) => x > y,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key_pair() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn statement() -> UpdateStatement {
        UpdateStatement {
            target: "holosync-x86-windows".into(),
            version: "0.3.0".into(),
            sha256: "ab".repeat(32),
            allow_downgrade: false,
            seq: 7,
        }
    }

    #[test]
    fn the_update_statement_is_exactly_the_documented_lines() {
        assert_eq!(
            String::from_utf8(statement().bytes()).unwrap(),
            format!(
                "holosync update v2\ntarget holosync-x86-windows\nversion 0.3.0\nsha256 {}\nallow_downgrade false\nseq 7\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn the_config_statement_does_not_depend_on_spacing_or_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{ "log": {"level":"debug"}, "a": 1 }"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":1,"log":{ "level": "debug" }}"#).unwrap();
        assert_eq!(config_statement(&a, 7), config_statement(&b, 7));
        assert_eq!(
            config_statement(&a, 7),
            b"holosync set-config v2\nseq 7\npatch {\"a\":1,\"log\":{\"level\":\"debug\"}}\n"
        );
    }

    #[test]
    fn a_signature_verifies_only_for_its_statement_and_key() {
        let pair = key_pair();
        let public: [u8; 32] = pair.public_key().as_ref().try_into().unwrap();
        let s = statement();
        let sig = hex(pair.sign(&s.bytes()).as_ref());
        assert!(verify(&[public], &s.bytes(), &sig));
        let other: [u8; 32] = key_pair().public_key().as_ref().try_into().unwrap();
        // Any key of the list will do, so keys can rotate.
        assert!(verify(&[other, public], &s.bytes(), &sig));
        assert!(!verify(&[other], &s.bytes(), &sig));
        let mut changed = s.clone();
        changed.allow_downgrade = true;
        assert!(!verify(&[public], &changed.bytes(), &sig));
        let mut changed = s.clone();
        changed.target = "holosync-x86_64-linux".into();
        assert!(!verify(&[public], &changed.bytes(), &sig));
        let mut changed = s.clone();
        changed.seq += 1;
        assert!(!verify(&[public], &changed.bytes(), &sig));
        assert!(!verify(&[public], &s.bytes(), "00"));
        assert!(!verify(&[public], &s.bytes(), "not a signature"));
    }

    #[test]
    fn keys_are_read_in_hex_or_base64() {
        let key = [7u8; 32];
        assert_eq!(parse_public_key(&hex(&key)).unwrap(), key);
        assert_eq!(
            parse_public_key("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=").unwrap(),
            key
        );
        assert!(parse_public_key("0707").is_err());
        assert!(parse_public_key("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw==").is_err());
        assert!(parse_public_key("").is_err());
        assert_eq!(decode("TWFu").unwrap(), b"Man");
        assert_eq!(decode("TWE=").unwrap(), b"Ma");
        assert_eq!(decode("TQ==").unwrap(), b"M");
        assert_eq!(decode("T==="), None);
        assert_eq!(decode("TQ=a"), None);
    }

    #[test]
    fn versions_compare_as_dotted_numbers() {
        assert!(newer("0.3.0", "0.2.9"));
        assert!(newer("0.10.0", "0.9.0"));
        assert!(newer("1.0", "0.99.99"));
        assert!(!newer("0.3.0", "0.3.0"));
        assert!(!newer("0.3", "0.3.0"));
        assert!(!newer("0.2.0", "0.3.0"));
        assert!(newer("0.3.0", "0.3.0-rc.1"));
        assert!(!newer("0.3.0-rc.1", "0.3.0"));
        assert!(newer("0.3.0-rc.2", "0.3.0-rc.1"));
        assert!(!newer("0.3.0+b2", "0.3.0+b1"));
        for good in ["0.3.0", "1", "1.2.3-rc.1", "2.0.0+build.5"] {
            assert!(valid_version(good), "{good}");
        }
        for bad in ["", "v1.0", "1..2", "1.2 ", "1.2.3/../x", &"1".repeat(40)] {
            assert!(!valid_version(bad), "{bad}");
        }
    }
}
