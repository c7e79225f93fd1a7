//! Sync payloads: bytes from the broker to a list of URLs (pure, no I/O).

use crate::config::Protocol;

/// Longest URL accepted; longer ones cannot map to a sane local path anyway.
pub const MAX_URL_BYTES: usize = 4096;

/// A sync payload, split and checked.
#[derive(Debug, Default, PartialEq)]
pub struct SyncPayload {
    /// The URLs to queue, in payload order, with the scheme lowercased.
    pub entries: Vec<Entry>,
    /// Entries that were not URLs we can fetch, with the reason.
    pub skipped: Vec<Skipped>,
}

/// One URL to queue.
#[derive(Debug, PartialEq)]
pub struct Entry {
    /// The URL, scheme lowercased.
    pub url: String,
    /// Why its local path would be unsafe; such URLs are stored as failed at once.
    pub rejected: Option<String>,
}

impl Entry {
    /// A URL checked for a safe local path.
    pub fn new(url: String) -> Entry {
        let rejected = crate::cache::url_segments(&url).err();
        Entry { url, rejected }
    }
}

/// One payload entry that was left out.
#[derive(Debug, PartialEq)]
pub struct Skipped {
    /// The entry as text (lossy for invalid UTF-8), cut to 200 characters for the log.
    pub entry: String,
    /// Why it was left out.
    pub reason: &'static str,
}

/// Splits a payload at commas, trims blanks, skips empty entries and keeps the
/// http(s) URLs. A literal comma cannot be part of a URL: senders encode it as `%2C`.
pub fn parse_sync(payload: &[u8]) -> SyncPayload {
    let mut out = SyncPayload::default();
    for raw in payload.split(|&b| b == b',') {
        let raw = raw.trim_ascii();
        if raw.is_empty() {
            continue;
        }
        let Ok(entry) = std::str::from_utf8(raw) else {
            out.skipped.push(skipped(raw, "not valid UTF-8"));
            continue;
        };
        match check_url(entry) {
            Ok(url) => out.entries.push(Entry::new(url)),
            Err(reason) => out.skipped.push(skipped(raw, reason)),
        }
    }
    out
}

fn skipped(raw: &[u8], reason: &'static str) -> Skipped {
    let text = String::from_utf8_lossy(raw);
    Skipped {
        entry: text.chars().take(200).collect(),
        reason,
    }
}

/// Accepts `http://host/...` and `https://host/...` (scheme in any case) and
/// returns it with the scheme lowercased.
pub fn check_url(entry: &str) -> Result<String, &'static str> {
    if entry.len() > MAX_URL_BYTES {
        return Err("longer than 4096 bytes");
    }
    let (scheme, rest) = entry.split_once("://").ok_or("not an http(s) URL")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err("not an http(s) URL");
    }
    if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains a blank or control character (send it percent-encoded)");
    }
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[..host_end].is_empty() {
        return Err("has no host");
    }
    Ok(format!("{scheme}://{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(p: &SyncPayload) -> Vec<&str> {
        p.entries.iter().map(|e| e.url.as_str()).collect()
    }

    #[test]
    fn splits_trims_and_skips_empty_entries() {
        let p = parse_sync(b" http://a.com/1.jpg ,,https://b.com/x/2.png!preview,\n");
        assert_eq!(
            urls(&p),
            ["http://a.com/1.jpg", "https://b.com/x/2.png!preview"]
        );
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn unsafe_paths_are_kept_as_rejected_entries() {
        let p = parse_sync(b"http://h.com/../x.jpg,http://h.com/ok.jpg");
        assert!(p.entries[0].rejected.as_deref().unwrap().contains(".."));
        assert_eq!(p.entries[1].rejected, None);
    }

    #[test]
    fn empty_payload_gives_nothing() {
        assert_eq!(parse_sync(b""), SyncPayload::default());
        assert_eq!(parse_sync(b" , ,"), SyncPayload::default());
    }

    #[test]
    fn bad_entries_are_skipped_and_the_rest_kept() {
        let p = parse_sync(
            b"ftp://x/y,\xff\xfe,http://ok.com/a.jpg,http:///nohost.jpg,javascript:alert(1)",
        );
        assert_eq!(urls(&p), ["http://ok.com/a.jpg"]);
        let reasons: Vec<_> = p.skipped.iter().map(|s| s.reason).collect();
        assert_eq!(
            reasons,
            [
                "not an http(s) URL",
                "not valid UTF-8",
                "has no host",
                "not an http(s) URL"
            ]
        );
    }

    #[test]
    fn scheme_is_case_insensitive_and_lowercased() {
        assert_eq!(
            check_url("HTTPS://h.com/A.JPG").unwrap(),
            "https://h.com/A.JPG"
        );
    }

    #[test]
    fn blanks_inside_a_url_are_rejected() {
        assert!(check_url("http://h.com/a b.jpg").is_err());
        assert!(check_url("http://h.com/a\tb.jpg").is_err());
    }

    #[test]
    fn overlong_url_is_rejected() {
        let long = format!("http://h.com/{}", "a".repeat(5000));
        assert_eq!(check_url(&long), Err("longer than 4096 bytes"));
    }

    #[test]
    fn quotes_and_semicolons_are_ordinary_characters() {
        let p = parse_sync(b"http://h.com/it's;drop--.jpg");
        assert_eq!(urls(&p), ["http://h.com/it's;drop--.jpg"]);
    }
}

/// Projectors one message may address; more is an error for the whole message.
pub const MAX_PROJECTORS: usize = 64;

/// Longest command accepted (PJLink allows 136 bytes; raw devices rarely need more).
const MAX_COMMAND_BYTES: usize = 1024;

/// One projector to send a command to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Host name, IPv4 or IPv6 address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Protocol to speak.
    pub protocol: Protocol,
    /// PJLink password, if any.
    pub password: Option<crate::config::Secret>,
}

impl Target {
    /// `host:port`, with brackets around IPv6.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A projector message: one command for a list of projectors.
#[derive(Debug, PartialEq)]
pub struct ProjectorRequest {
    /// The command as sent in the message.
    pub command: String,
    /// Where to send it, in message order.
    pub targets: Vec<Target>,
}

/// Parses `{"command": ..., "projectors": [...]}`, filling what a projector
/// entry leaves out from `defaults`. Any problem rejects the whole message.
pub fn parse_projector(
    payload: &[u8],
    defaults: &crate::config::Projector,
) -> Result<ProjectorRequest, String> {
    use serde_json::Value;
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let command = match obj.get("command") {
        Some(Value::String(c)) if !c.is_empty() => c.clone(),
        Some(Value::String(_)) => return Err("`command` is empty".into()),
        Some(_) => return Err("`command` is not a string".into()),
        None => return Err("`command` is missing".into()),
    };
    if command.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "`command` is longer than {MAX_COMMAND_BYTES} bytes"
        ));
    }
    let items: Vec<Value> = match obj.get("projectors") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect(),
        Some(_) => return Err("`projectors` is not an array or a string".into()),
        None => return Err("`projectors` is missing".into()),
    };
    if items.is_empty() {
        return Err("`projectors` is empty".into());
    }
    if items.len() > MAX_PROJECTORS {
        return Err(format!(
            "{} projectors in one message; at most {MAX_PROJECTORS}",
            items.len()
        ));
    }
    let targets = items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_target(item, defaults).map_err(|e| format!("projectors[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProjectorRequest { command, targets })
}

fn parse_target(
    item: &serde_json::Value,
    defaults: &crate::config::Projector,
) -> Result<Target, String> {
    use serde_json::Value;
    let mut target = Target {
        host: String::new(),
        port: defaults.port,
        protocol: defaults.protocol,
        password: defaults.password.clone(),
    };
    match item {
        Value::String(s) => {
            let (host, port) = split_host_port(s)?;
            target.host = host;
            target.port = port.unwrap_or(target.port);
        }
        Value::Object(o) => {
            for key in o.keys() {
                if !matches!(key.as_str(), "host" | "port" | "protocol" | "password") {
                    return Err(format!("unknown key `{key}`"));
                }
            }
            let host = o
                .get("host")
                .and_then(Value::as_str)
                .ok_or("`host` is missing or not a string")?;
            let (host, port) = split_host_port(host)?;
            target.host = host;
            target.port = port.unwrap_or(target.port);
            if let Some(p) = o.get("port") {
                target.port = p
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or("`port` is not a number 1-65535")?;
            }
            if let Some(p) = o.get("protocol") {
                target.protocol = serde_json::from_value(p.clone())
                    .map_err(|_| "`protocol` is not \"raw\" or \"pjlink\"")?;
            }
            match o.get("password") {
                None | Some(Value::Null) => {}
                Some(Value::String(_)) => {
                    target.password = serde_json::from_value(o["password"].clone()).ok();
                }
                Some(_) => return Err("`password` is not a string".into()),
            }
        }
        _ => return Err("not a string or an object".into()),
    }
    Ok(target)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with the host checked.
fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed `[` in address")?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{h:?} is not an IPv6 address"));
        }
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or("junk after `]`")?)),
        }
    } else if s.matches(':').count() > 1 {
        return Err("IPv6 addresses must be written in brackets, as [::1]:4352".into());
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p:?} is not a number 1-65535"))?,
        ),
    };
    let is_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !(is_name || host.parse::<std::net::Ipv6Addr>().is_ok()) {
        return Err(format!("{host:?} is not a host name or address"));
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod projector_tests {
    use super::*;

    fn defaults() -> crate::config::Projector {
        serde_json::from_str("{}").unwrap()
    }

    fn parse(json: &str) -> Result<ProjectorRequest, String> {
        parse_projector(json.as_bytes(), &defaults())
    }

    #[test]
    fn every_address_form_is_understood() {
        let r = parse(
            r#"{"command":"on","projectors":["10.0.0.5","proj-2:4000","[::1]:4352","[fe80::1]",
                {"host":"p4","port":23,"protocol":"pjlink","password":"x"}]}"#,
        )
        .unwrap();
        let addrs: Vec<String> = r.targets.iter().map(Target::address).collect();
        assert_eq!(
            addrs,
            [
                "10.0.0.5:4352",
                "proj-2:4000",
                "[::1]:4352",
                "[fe80::1]:4352",
                "p4:23"
            ]
        );
        assert_eq!(r.targets[4].protocol, Protocol::Pjlink);
        assert_eq!(r.targets[4].password.as_ref().unwrap().expose(), "x");
        assert_eq!(r.targets[0].protocol, Protocol::Raw);
    }

    #[test]
    fn a_comma_separated_string_is_accepted() {
        let r = parse(r#"{"command":"x","projectors":"a:1, b:2"}"#).unwrap();
        assert_eq!(r.targets.len(), 2);
    }

    #[test]
    fn bad_messages_are_rejected_whole() {
        let many: Vec<String> = (0..65).map(|i| format!("\"h{i}\"")).collect();
        let too_many = format!(r#"{{"command":"on","projectors":[{}]}}"#, many.join(","));
        for (json, want) in [
            ("not json", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"projectors":["a"]}"#, "`command` is missing"),
            (r#"{"command":5,"projectors":["a"]}"#, "not a string"),
            (r#"{"command":"on","projectors":[]}"#, "empty"),
            (r#"{"command":"on","projectors":5}"#, "not an array"),
            (r#"{"command":"on","projectors":["a b"]}"#, "not a host"),
            (r#"{"command":"on","projectors":["a:0"]}"#, "port"),
            (r#"{"command":"on","projectors":["a:99999"]}"#, "port"),
            (r#"{"command":"on","projectors":["::1"]}"#, "brackets"),
            (
                r#"{"command":"on","projectors":[{"host":"a","port":"x"}]}"#,
                "port",
            ),
            (
                r#"{"command":"on","projectors":[{"host":"a","protocol":"telnet"}]}"#,
                "protocol",
            ),
            (
                r#"{"command":"on","projectors":[{"host":"a","colour":1}]}"#,
                "unknown key",
            ),
            (too_many.as_str(), "at most 64"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
