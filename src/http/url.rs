//! `http`/`https` URLs: parsing one for a request, resolving a redirect's
//! `Location` against it (RFC 3986, 5.2, dot segments removed), and the
//! `Host` header (pure).

use std::fmt::Write as _;

/// An `http` or `https` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https`?
    pub https: bool,
    /// Host name or address, lowercased, without IPv6 brackets.
    pub host: String,
    /// TCP port (80 or 443 unless given).
    pub port: u16,
    /// Path and query as sent in the request line (non-ASCII percent-encoded).
    pub target: String,
}

impl Url {
    /// Parses an absolute `http://` or `https://` URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (scheme, rest) = s.split_once("://").ok_or("not an absolute URL")?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(format!("unsupported scheme {scheme:?}")),
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err("URLs with a user name or password are not supported".into());
        }
        let (host, port) = split_host_port(authority)?;
        if host.is_empty() {
            return Err("URL has no host".into());
        }
        if !host.is_ascii() {
            return Err("international host names are not supported (use the xn-- form)".into());
        }
        let path = path.split('#').next().unwrap_or_default();
        let target = if path.is_empty() || path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Url {
            https,
            port: port.unwrap_or(if https { 443 } else { 80 }),
            host: host.to_ascii_lowercase(),
            target: encode_target(&target),
        })
    }

    /// The URL a `Location` header points to, relative to this one, with
    /// its dot segments removed (`sub/../x.jpg` asks for `x.jpg`).
    pub fn join(&self, location: &str) -> Result<Url, String> {
        let location = location.trim();
        let scheme = if self.https { "https" } else { "http" };
        let mut url = if location.contains("://") {
            Url::parse(location)?
        } else if let Some(rest) = location.strip_prefix("//") {
            Url::parse(&format!("{scheme}://{rest}"))?
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let target = if location.starts_with('/') {
                location.to_string()
            } else if location.starts_with('?') {
                format!("{path}{location}")
            } else {
                let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
                format!("{dir}{location}")
            };
            let target = target.split('#').next().unwrap_or_default();
            Url {
                target: encode_target(target),
                ..self.clone()
            }
        };
        let (path, query) = match url.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url.target.as_str(), None),
        };
        let mut target = remove_dot_segments(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        url.target = target;
        Ok(url)
    }

    /// The host as it stands in an authority (an IPv6 address in brackets).
    pub(super) fn host_bracketed(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// The `Host` header: the port only when it is not the scheme's default.
    pub(super) fn host_header(&self) -> String {
        let host = self.host_bracketed();
        if self.port == if self.https { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// An absolute path without its `.` and `..` segments (RFC 3986, 5.2.4):
/// `..` removes the segment before it and never climbs above the root.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut ends_in_dir = false;
    for segment in path.strip_prefix('/').unwrap_or(path).split('/') {
        ends_in_dir = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = format!("/{}", out.join("/"));
    if ends_in_dir && !out.is_empty() {
        result.push('/');
    }
    result
}

/// A port: ASCII digits only (`+80` is not a port), at most 65535.
fn parse_port(p: &str) -> Result<u16, String> {
    Some(p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("invalid port {p:?}"))
}

/// `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in the host")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(parse_port(p)?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("unexpected {after:?} after the host")),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, "")) => Ok((host, None)),
        Some((host, p)) => Ok((host, Some(parse_port(p)?))),
        None => Ok((authority, None)),
    }
}

/// Percent-encodes what may not appear raw in a request line (non-ASCII and
/// control bytes); existing escapes are kept as they are.
fn encode_target(target: &str) -> String {
    let mut out = String::with_capacity(target.len());
    for b in target.bytes() {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn urls_split_into_request_parts() {
        let u = Url::parse("https://B.oss-cn.aliyuncs.com/works/12/a.jpg!preview?x=1#f").unwrap();
        assert_eq!(
            u,
            Url {
                https: true,
                host: "b.oss-cn.aliyuncs.com".into(),
                port: 443,
                target: "/works/12/a.jpg!preview?x=1".into()
            }
        );
        let u = Url::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 8080, "/")
        );
        assert_eq!(u.host_header(), "[::1]:8080");
        assert_eq!(Url::parse("http://h/é.jpg").unwrap().target, "/%C3%A9.jpg");
        assert!(Url::parse("http://user:pw@h/a.jpg").is_err());
        assert!(Url::parse("http://h:99999/a.jpg").is_err());
        assert!(Url::parse("http://h:+80/a.jpg").is_err());
        assert!(Url::parse("http://[::1]:+80/a.jpg").is_err());
        assert!(Url::parse("http://h:8 0/a.jpg").is_err());
        assert!(Url::parse("ftp://h/a.jpg").is_err());
        assert!(Url::parse("http://bücher.de/a.jpg").is_err());
    }

    #[test]
    fn locations_resolve_against_the_current_url() {
        let base = Url::parse("https://h.com/a/b/c.jpg?q").unwrap();
        assert_eq!(base.join("d.jpg").unwrap().target, "/a/b/d.jpg");
        assert_eq!(base.join("/x.jpg").unwrap().target, "/x.jpg");
        let other = base.join("//cdn.com/y.jpg").unwrap();
        assert_eq!((other.https, other.host.as_str()), (true, "cdn.com"));
        assert!(!base.join("http://h.com/z.jpg").unwrap().https);
        assert_eq!(base.join("?r").unwrap().target, "/a/b/c.jpg?r");
    }

    #[test]
    fn locations_lose_their_dot_segments() {
        let base = Url::parse("http://h.com/a/b/c.jpg").unwrap();
        let target = |l: &str| base.join(l).unwrap().target;
        assert_eq!(target("sub/../x.jpg"), "/a/b/x.jpg");
        assert_eq!(target("./x.jpg"), "/a/b/x.jpg");
        assert_eq!(target("../../../../x.jpg"), "/x.jpg");
        assert_eq!(target("/a/./b/../x.jpg?y=../z"), "/a/x.jpg?y=../z");
        assert_eq!(target(".."), "/a/");
        assert_eq!(target("http://o.com/p/../q.jpg"), "/q.jpg");
        assert_eq!(target("//o.com/p/./q/"), "/p/q/");
        // RFC 3986, 5.4's examples that apply to a path.
        let rfc = Url::parse("http://a/b/c/d;p?q").unwrap();
        for (l, want) in [
            ("g", "/b/c/g"),
            ("./g", "/b/c/g"),
            ("g/", "/b/c/g/"),
            ("..", "/b/"),
            ("../g", "/b/g"),
            ("../..", "/"),
            ("../../../g", "/g"),
            ("/./g", "/g"),
            ("g.", "/b/c/g."),
            ("..g", "/b/c/..g"),
            ("./../g", "/b/g"),
            ("g/./h", "/b/c/g/h"),
            ("g/../h", "/b/c/h"),
        ] {
            assert_eq!(rfc.join(l).unwrap().target, want, "{l}");
        }
    }
}
