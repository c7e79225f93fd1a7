//! The properties the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the
//! corpus replay test (`tests/fuzz_corpus.rs`) both check, one function per target.
//!
//! Each function takes arbitrary bytes, feeds them to one pure part of the
//! crate and panics when a property does not hold. Returning is a pass. The
//! checks are written here independently of the code they test (the Windows
//! file name rules in particular), so a bug in the crate's own check is found
//! rather than copied.

use std::path::{Component, Path};

use holosync::{cache, config, message, projector, verify};

/// Cache root used by the path properties.
const ROOT: &str = "/srv/holosync/cache";

/// Sync payload: `message::parse_sync` never panics; every URL it keeps starts
/// with `http://` or `https://`, has a host, holds no comma, blank or control
/// character, and is at most `MAX_URL_BYTES` long; an entry is rejected
/// exactly when `cache::url_segments` refuses it, and an accepted entry maps to
/// a safe path under the cache root. Every non-blank entry is either kept or
/// skipped.
pub fn sync_payload(data: &[u8]) {
    let parsed = message::parse_sync(data);
    let pieces = data
        .split(|&b| b == b',')
        .filter(|p| !p.trim_ascii().is_empty())
        .count();
    assert_eq!(
        parsed.entries.len() + parsed.skipped.len(),
        pieces,
        "every non-blank entry is kept or skipped"
    );
    for entry in &parsed.entries {
        let url = &entry.url;
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or_else(|| panic!("kept URL {url:?} is not http(s)"));
        let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        assert!(host_end > 0, "kept URL {url:?} has no host");
        assert!(
            !url.chars()
                .any(|c| c == ',' || c.is_whitespace() || c.is_control()),
            "kept URL {url:?} holds a comma, blank or control character"
        );
        assert!(url.len() <= message::MAX_URL_BYTES, "kept URL is too long");
        assert_eq!(
            entry.rejected.is_none(),
            cache::url_segments(url).is_ok(),
            "rejected flag of {url:?} disagrees with url_segments"
        );
        if entry.rejected.is_none() {
            check_local_path(url);
        }
    }
    for skipped in &parsed.skipped {
        assert!(
            skipped.entry.chars().count() <= 200,
            "skipped entry not cut"
        );
        assert!(!skipped.reason.is_empty());
    }
}

/// URL to cache path: `cache::url_segments` and `cache::local_path` never
/// panic and agree; a path they produce is inside the root, made of exactly
/// the URL's segments as normal components (no `.` or `..`), and every segment
/// passes `cache::check_segment` and is a valid Windows file name. The bytes
/// are tried as a URL on their own and after `http://h.com/`.
pub fn url_path(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_local_path(&text);
    check_local_path(&format!("http://h.com/{text}"));
}

/// Projector message: `message::parse_projector` (with the default
/// `[projector]` config) never panics; an accepted message has a non-empty
/// command of at most 1024 bytes and 1 to 64 targets, each with a non-empty
/// host (IPv6 only if it contains `:`) and a nonzero port. Building the bytes
/// to send, as the agent does for each target's protocol
/// (`projector::raw_payload`, `projector::pjlink_line`), never panics either.
pub fn projector_message(data: &[u8]) {
    let defaults = config::Projector::default();
    let Ok(request) = message::parse_projector(data, &defaults) else {
        return;
    };
    assert!(!request.command.is_empty(), "empty command accepted");
    assert!(request.command.len() <= 1024, "overlong command accepted");
    let n = request.targets.len();
    assert!(
        (1..=message::MAX_PROJECTORS).contains(&n),
        "{n} targets accepted"
    );
    for t in &request.targets {
        assert_ne!(t.port, 0, "target {t:?} has port 0");
        assert!(!t.host.is_empty(), "target {t:?} has no host");
        assert!(
            !t.host.chars().any(|c| c.is_whitespace() || c.is_control()),
            "host of {t:?} holds a blank or control character"
        );
        if t.host.contains(':') {
            assert!(
                t.host.parse::<std::net::Ipv6Addr>().is_ok(),
                "host {:?} has a colon but is no IPv6 address",
                t.host
            );
            assert!(t.address().starts_with('['), "IPv6 address not bracketed");
        }
    }
    // What `projector::exchange` does with the command before connecting.
    if let Ok(bytes) = projector::raw_payload(&request.command, &defaults.terminator) {
        assert!(!bytes.is_empty(), "raw command gave no bytes");
    }
    if let Ok(line) = projector::pjlink_line(&request.command) {
        check_pjlink_line(&line);
    }
}

/// PJLink: the data is `<command>\n<bytes the projector sends>` (without a
/// newline, the command is `%1POWR ?` and all of it is the projector's side).
/// `projector::pjlink_line` never panics on the command, and what it accepts
/// is a class 1 line; `projector::pjlink_exchange` over an in-memory peer,
/// with and without a password, never panics and writes nothing or exactly one
/// CR-terminated command line (digest-prefixed only when asked);
/// `projector::describe_reply` never panics on any line of the peer's bytes;
/// `projector::raw_exchange` never returns more than 4096 bytes or the
/// terminator.
pub fn pjlink_reply(data: &[u8]) {
    let (command, peer_bytes) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => ("%1POWR ?".to_string(), data),
    };
    let line = match projector::pjlink_line(&command) {
        Ok(line) => {
            check_pjlink_line(&line);
            line
        }
        Err(_) => "%1POWR ?".to_string(),
    };

    for password in [None, Some("JBMIAProjectorLink")] {
        let mut peer = projector::MemoryPeer::new(peer_bytes);
        let result = projector::pjlink_exchange(&mut peer, &line, password);
        let out = &peer.output;
        if out.is_empty() {
            assert!(result.is_err(), "PJLink success without sending anything");
            continue;
        }
        let sent = out
            .strip_suffix(b"\r")
            .unwrap_or_else(|| panic!("sent {out:?} does not end in CR"));
        assert!(!sent.contains(&b'\r'), "more than one line sent: {out:?}");
        let digest_len = sent
            .len()
            .checked_sub(line.len())
            .unwrap_or_else(|| panic!("sent {out:?} is shorter than {line:?}"));
        assert_eq!(&sent[digest_len..], line.as_bytes(), "sent the wrong line");
        match digest_len {
            0 => assert!(peer_bytes.starts_with(b"PJLINK 0\r")),
            32 => {
                assert!(password.is_some(), "digest sent without a password");
                assert!(peer_bytes.starts_with(b"PJLINK 1 "));
                assert!(sent[..32]
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
            }
            n => panic!("{n} bytes before the command line: {out:?}"),
        }
    }

    for reply in peer_bytes.split(|&b| b == b'\r') {
        if let Ok(reply) = std::str::from_utf8(reply) {
            if let Ok(words) = projector::describe_reply(&line, reply) {
                let head = reply.split('=').next().unwrap_or_default();
                assert!(
                    head.eq_ignore_ascii_case(&line[..6]),
                    "{reply:?} accepted as the answer to {line:?}"
                );
                assert!(!words.is_empty());
            }
        }
    }

    let mut peer = projector::MemoryPeer::new(peer_bytes);
    if let Ok(Some(reply)) = projector::raw_exchange(&mut peer, b"PWR ON\r", b"\r") {
        assert!(reply.len() <= 4096, "raw reply of {} bytes", reply.len());
        assert!(!reply.contains(&b'\r') && !reply.contains(&b'\n'));
    }
    assert_eq!(peer.output, b"PWR ON\r");
}

/// Image: `verify::verify` never panics and never makes a large allocation
/// (the fuzz target runs with `-malloc_limit_mb`); a PNG or JPEG it accepts
/// starts with that format's magic bytes, has 1 to `MAX_PIXELS` pixels, and
/// (for PNG) the size its IHDR chunk says. A JPEG it accepts can be re-encoded
/// without a panic. The incremental `verify::Verifier`, fed the bytes in three
/// slices and paused at every chance, reaches the same verdict (not always
/// for the same reason) and never holds more than `MAX_VERIFIER_BYTES`.
/// Non-image bytes are tried under a `.jpg` and a `.gif` URL.
pub fn image(data: &[u8]) {
    let url = "http://h.com/works/a.jpg!preview";
    let result = verify::verify(data, url, None);
    // The same verdict; the reason may differ (a PNG's bad Adler-32 and a
    // bad filter byte in the same inflater call are found in either order).
    let sliced = verify_in_slices(data, url);
    assert_eq!(
        sliced.as_ref().ok(),
        result.as_ref().ok(),
        "sliced verdict differs: {sliced:?}"
    );
    match result {
        Ok(verify::Kind::Png { width, height }) => {
            assert!(data.starts_with(b"\x89PNG\r\n\x1a\n"));
            check_size(width, height);
            // IHDR is the first chunk: length, "IHDR", width, height.
            assert_eq!(&data[12..16], b"IHDR", "PNG accepted without IHDR first");
            assert_eq!(data[16..20], width.to_be_bytes(), "PNG width");
            assert_eq!(data[20..24], height.to_be_bytes(), "PNG height");
        }
        Ok(verify::Kind::Jpeg { width, height }) => {
            assert!(data.starts_with(b"\xff\xd8\xff"));
            check_size(width, height);
            if u64::from(width) * u64::from(height) <= 1 << 16 {
                let _ = verify::reencode_jpeg(data, 80);
            }
        }
        Ok(verify::Kind::Gif { width, height, .. }) => {
            assert!(data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a"));
            check_size(width, height);
        }
        Ok(verify::Kind::Webp { width, height, .. }) => {
            assert!(data.starts_with(b"RIFF") && data.get(8..12) == Some(b"WEBP"));
            check_size(width, height);
        }
        Ok(verify::Kind::Other) => {
            assert!(!data.is_empty(), "empty body accepted");
            assert!(!data.starts_with(b"\x89PNG\r\n\x1a\n") && !data.starts_with(b"\xff\xd8\xff"));
        }
        Err(e) => assert!(!e.is_empty()),
    }
    let gif_or_webp = data.starts_with(b"GIF8") || data.starts_with(b"RIFF");
    if !data.starts_with(b"\x89PNG") && !data.starts_with(b"\xff\xd8") && !gif_or_webp {
        let other = verify::verify(data, "http://h.com/a.gif", Some("image/gif"));
        assert_eq!(other.is_ok(), !data.is_empty() && !looks_like_html(data));
    }
}

/// The verdict of a `Verifier` given `data` in three slices (the last one
/// complete), with a deadline already past at every step.
fn verify_in_slices(data: &[u8], url: &str) -> Result<verify::Kind, String> {
    let mut verifier = verify::Verifier::new(url, None);
    for (i, cut) in [data.len() / 3, data.len() * 2 / 3, data.len()]
        .into_iter()
        .enumerate()
    {
        let complete = i == 2;
        loop {
            let progress = verifier.step(&data[..cut], complete, std::time::Instant::now());
            assert!(
                verifier.memory_bytes() as u64 <= verify::MAX_VERIFIER_BYTES,
                "verifier holds {} bytes",
                verifier.memory_bytes()
            );
            match progress {
                verify::Progress::Done(result) => return result,
                verify::Progress::Paused => {}
                verify::Progress::NeedMore => {
                    assert!(!complete, "NeedMore on a complete body");
                    break;
                }
            }
        }
    }
    unreachable!("the complete slice ends in Done")
}

fn check_size(width: u32, height: u32) {
    let pixels = u64::from(width) * u64::from(height);
    assert!(
        (1..=verify::MAX_PIXELS).contains(&pixels),
        "{width}x{height} accepted"
    );
}

/// Same rule as `verify`, kept loose on purpose: only used to predict the
/// `.gif` URL case, where nothing but HTML and emptiness is refused.
fn looks_like_html(bytes: &[u8]) -> bool {
    let start = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let start = start.trim_ascii_start();
    [&b"<!doctype html"[..], b"<html", b"<head", b"<body"]
        .iter()
        .any(|p| start.len() >= p.len() && start[..p.len()].eq_ignore_ascii_case(p))
}

/// A PJLink class 1 line as `pjlink_line` promises it.
fn check_pjlink_line(line: &str) {
    let b = line.as_bytes();
    assert!((7..=136).contains(&b.len()), "PJLink line {line:?} length");
    assert!(line.starts_with("%1"), "PJLink line {line:?} prefix");
    assert!(
        b[2..6].iter().all(u8::is_ascii_alphanumeric) && b[6] == b' ',
        "PJLink line {line:?} command"
    );
    assert!(!b.contains(&b'\r') && !b.contains(&b'\n'));
}

/// `url_segments` and `local_path` agree, and an accepted path is safe.
fn check_local_path(url: &str) {
    let root = Path::new(ROOT);
    let segments = cache::url_segments(url);
    let path = cache::local_path(root, url);
    let (segments, path) = match (segments, path) {
        (Ok(s), Ok(p)) => (s, p),
        (Err(_), Err(_)) => return,
        (s, p) => panic!("url_segments {s:?} and local_path {p:?} disagree on {url:?}"),
    };
    assert!(path.starts_with(root), "{path:?} is outside {ROOT}");
    assert!(!segments.is_empty());
    let relative = path.strip_prefix(root).expect("inside the root");
    let components: Vec<Component> = relative.components().collect();
    // `Path::components` drops `.`, so also compare with the segments one by one.
    assert_eq!(
        components.len(),
        segments.len(),
        "{url:?} -> {path:?}: components and segments differ"
    );
    for (component, segment) in components.iter().zip(&segments) {
        match component {
            Component::Normal(name) => assert_eq!(name.to_str(), Some(*segment)),
            other => panic!("{url:?} -> {path:?} has a {other:?} component"),
        }
        assert!(
            cache::check_segment(segment).is_ok(),
            "{segment:?} fails check_segment"
        );
        if let Err(why) = windows_file_name(segment) {
            panic!("{url:?}: segment {segment:?} is not a valid Windows file name: {why}");
        }
        if let Err(why) = unix_file_name(segment) {
            panic!("{url:?}: segment {segment:?} is not a valid Unix file name: {why}");
        }
        assert!(!segment.contains('#'), "fragment kept in {segment:?}");
    }
}

/// Whether `name` is usable as one file or folder name on Windows (NTFS,
/// Win32 paths), written from the Windows documentation ("Naming Files,
/// Paths, and Namespaces") rather than from `cache::check_segment`.
pub fn windows_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name == "." || name == ".." {
        return Err("a relative path component");
    }
    if name.starts_with(cache::TEMP_PREFIX) {
        return Err("holosync's temporary file prefix (the start-up sweep would delete it)");
    }
    for c in name.chars() {
        if u32::from(c) < 0x20 {
            return Err("a control character (U+0000-U+001F)");
        }
        if matches!(c, '/' | '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*') {
            return Err("one of / \\ : < > \" | ? *");
        }
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("a trailing dot or space");
    }
    // NTFS counts a component's length in UTF-16 code units.
    if name.encode_utf16().count() > 255 {
        return Err("longer than 255 UTF-16 code units");
    }
    // `NUL`, `nul.txt`, `NUL .tar.gz` all name the device.
    let base = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let is = |device: &str| base.eq_ignore_ascii_case(device);
    if ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
        .into_iter()
        .any(is)
    {
        return Err("a reserved device name");
    }
    let numbered = |prefix: &str| {
        base.get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
            && {
                let mut tail = base[3..].chars();
                matches!(
                    (tail.next(), tail.next()),
                    (Some('0'..='9' | '\u{b9}' | '\u{b2}' | '\u{b3}'), None)
                )
            }
    };
    if numbered("COM") || numbered("LPT") {
        return Err("a reserved device name (COMn/LPTn)");
    }
    Ok(())
}

/// Whether `name` is usable as one file or folder name on Linux and the BSDs
/// (`NAME_MAX` is 255 bytes on ext4, XFS, btrfs, APFS, tmpfs).
pub fn unix_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("empty or a relative path component");
    }
    if name.contains(['/', '\0']) {
        return Err("a slash or NUL byte");
    }
    if name.len() > 255 {
        return Err("longer than 255 bytes (NAME_MAX)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_rules_written_here_reject_the_documented_names() {
        for bad in [
            "",
            ".",
            "..",
            "CON",
            "con.txt",
            "Nul .tar.gz",
            "COM1",
            "lpt\u{b9}.jpg",
            "conin$",
            "a:b",
            "a\\b",
            "a*b",
            "a?b",
            "a\"b",
            "a<b",
            "a>b",
            "a|b",
            "a\u{1f}b",
            "a.",
            "a ",
        ] {
            assert!(windows_file_name(bad).is_err(), "{bad:?}");
        }
        let emoji_name = "\u{1f600}".repeat(128);
        assert!(windows_file_name(&emoji_name).is_err());
        for good in [
            "console.jpg",
            "COM10",
            "a.jpg!preview",
            "%2e%2e",
            "CONX",
            "é.png",
        ] {
            assert_eq!(windows_file_name(good), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn the_checks_pass_on_ordinary_inputs() {
        sync_payload(b"http://a.com/1.jpg, https://b.com/x/2.png!preview,,ftp://x");
        url_path(b"works/12/a.jpg!preview");
        projector_message(br#"{"command":"on","projectors":["10.0.0.5","[::1]:4352"]}"#);
        pjlink_reply(b"on\nPJLINK 0\r%1POWR=OK\r");
        image(b"GIF89a....");
    }
}
