//! `set-config`: a JSON merge patch (RFC 7396) over `config.json`, the keys
//! that need a signature, and the validation of the result by the same
//! door as at start-up (`Config::from_text`). Pure except for reading the
//! current file.

use std::path::Path;

use serde_json::Value;

use crate::config::Config;
use crate::signing;

/// Keys whose change could hand the kiosk to someone else (another broker,
/// another CA, another proxy, another signer): a patch that changes any of
/// them needs a signature. JSON pointers, and the names shown.
const PROTECTED: [(&str, &str); 7] = [
    ("/mqtt/host", "mqtt.host"),
    ("/mqtt/port", "mqtt.port"),
    ("/mqtt/transport", "mqtt.transport"),
    ("/mqtt/tls", "mqtt.tls"),
    ("/mqtt/ca_file", "mqtt.ca_file"),
    ("/update/public_keys", "update.public_keys"),
    ("/proxy", "proxy"),
];

/// Keys holding secrets: an error about them is answered without serde's
/// message, which may quote the value.
const SECRETS: [&str; 3] = ["mqtt.password", "projector.password", "proxy.url"];

/// Applies `patch` to `target` as RFC 7396 says: an object patch merges
/// key by key (`null` removes), anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The protected keys whose value differs between `before` and `after`
/// (a key that appears, disappears or changes; comparing the results, not
/// the patch, also catches `"mqtt": null` and the like).
pub fn protected_changes(before: &Value, after: &Value) -> Vec<&'static str> {
    PROTECTED
        .iter()
        .filter(|(pointer, _)| before.pointer(pointer) != after.pointer(pointer))
        .map(|(_, name)| *name)
        .collect()
}

/// The new text of the config file `file` (whose current text is
/// `current`) after `patch`, if the patch may be applied: signed where it
/// must be, and valid as a whole. Else why not, naming the key.
pub fn patched(
    file: &Path,
    current: &str,
    config: &Config,
    patch: &Value,
    signature: Option<&str>,
    seq: Option<u64>,
) -> Result<String, String> {
    if !patch.is_object() {
        return Err("\"patch\" must be a JSON object (a merge patch)".into());
    }
    let before: Value = serde_json::from_str(current)
        .map_err(|e| format!("the config file on disk is not JSON: {e}"))?;
    let mut after = before.clone();
    merge_patch(&mut after, patch);
    let keys = config.update.keys();
    if let (Some(_), None) = (signature, seq) {
        return Err("a signed patch needs its \"seq\" (holosync sign adds it)".into());
    }
    let signed = signature.is_some_and(|s| {
        signing::verify(
            &keys,
            &signing::config_statement(patch, seq.unwrap_or_default()),
            s,
        )
    });
    if signature.is_some() && !signed {
        return Err(if keys.is_empty() {
            "the patch is signed, but no key is configured (update.public_keys)".into()
        } else {
            "bad signature: it is not by a key of update.public_keys over this patch".into()
        });
    }
    let protected = protected_changes(&before, &after);
    if !protected.is_empty() && !signed {
        return Err(format!(
            "the patch changes {}, which needs a signature (holosync sign ... set-config){}",
            protected.join(", "),
            if keys.is_empty() {
                "; no key is configured (update.public_keys)"
            } else {
                ""
            }
        ));
    }
    let text = serde_json::to_string_pretty(&after).expect("a JSON value always serializes");
    Config::from_text(&text, file).map_err(|e| {
        if SECRETS.contains(&e.key.as_str()) {
            // serde's message may quote the value, and answers go to `events`.
            format!(
                "the patched config is not valid: key `{}` (a secret: its value is not shown)",
                e.key
            )
        } else if e.key.is_empty() {
            format!("the patched config is not valid: {}", e.message)
        } else {
            format!(
                "the patched config is not valid: key `{}`: {}",
                e.key, e.message
            )
        }
    })?;
    Ok(text + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The examples of RFC 7396, appendix A (a selection).
        for (target, patch, result) in [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ] {
            let mut t = target.clone();
            merge_patch(&mut t, &patch);
            assert_eq!(t, result, "{target} + {patch}");
        }
    }

    #[test]
    fn protected_keys_are_seen_however_the_patch_reaches_them() {
        let before = json!({"mqtt": {"host": "a", "port": 1883}, "log": {"level": "info"}});
        let change = |patch: Value| {
            let mut after = before.clone();
            merge_patch(&mut after, &patch);
            protected_changes(&before, &after)
        };
        assert!(change(json!({"log": {"level": "debug"}})).is_empty());
        assert_eq!(change(json!({"mqtt": {"host": "b"}})), ["mqtt.host"]);
        assert_eq!(change(json!({"mqtt": null})), ["mqtt.host", "mqtt.port"]);
        assert_eq!(
            change(json!({"proxy": {"url": "http://p:3128"}})),
            ["proxy"]
        );
        assert_eq!(
            change(json!({"update": {"public_keys": ["00"]}})),
            ["update.public_keys"]
        );
        assert!(change(json!({"mqtt": {"host": "a"}})).is_empty());
    }

    #[test]
    fn a_patch_is_refused_unsigned_or_invalid_and_accepted_otherwise() {
        let dir = std::env::temp_dir();
        let file = dir.join("holosync-remote-config-test.json");
        let current = r#"{"mqtt": {"host": "broker"}}"#;
        let config = Config::from_text(current, &file).unwrap();
        let why = patched(
            &file,
            current,
            &config,
            &json!({"mqtt": {"host": "evil"}}),
            None,
            None,
        )
        .unwrap_err();
        assert!(
            why.contains("mqtt.host") && why.contains("signature"),
            "{why}"
        );
        let why = patched(
            &file,
            current,
            &config,
            &json!({"log": {"level": "loud"}}),
            None,
            None,
        )
        .unwrap_err();
        assert!(why.contains("key `log.level`"), "{why}");
        let why = patched(
            &file,
            current,
            &config,
            &json!({"log": {"levle": "x"}}),
            None,
            None,
        )
        .unwrap_err();
        assert!(why.contains("key `log.levle`"), "{why}");
        let text = patched(
            &file,
            current,
            &config,
            &json!({"log": {"level": "debug"}}),
            None,
            None,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            json!({"mqtt": {"host": "broker"}, "log": {"level": "debug"}})
        );
        let secret = json!({"mqtt": {"password": 918273}});
        let why = patched(&file, current, &config, &secret, None, None).unwrap_err();
        assert!(
            why.contains("key `mqtt.password`") && !why.contains("918273"),
            "{why}"
        );
        let signed = |seq| {
            patched(
                &file,
                current,
                &config,
                &json!({"log": {}}),
                Some("00"),
                seq,
            )
            .unwrap_err()
        };
        let why = signed(Some(1));
        assert!(why.contains("no key is configured"), "{why}");
        let why = signed(None);
        assert!(why.contains("\"seq\""), "{why}");
    }
}
