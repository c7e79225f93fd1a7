//! `http`/`https` URLs: parsing one for a request, resolving a redirect's
//! `Location` against it, and the `Host` header (pure).

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

    /// The URL a `Location` header points to, relative to this one.
    pub fn join(&self, location: &str) -> Result<Url, String> {
        let location = location.trim();
        if location.contains("://") {
            return Url::parse(location);
        }
        let scheme = if self.https { "https" } else { "http" };
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{scheme}://{rest}"));
        }
        let target = if location.starts_with('/') {
            location.to_string()
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        let target = target.split('#').next().unwrap_or_default();
        Ok(Url {
            target: encode_target(target),
            ..self.clone()
        })
    }

    /// The `Host` header: the port only when it is not the scheme's default.
    pub(super) fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.https { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = |p: &str| format!("invalid port {p:?}");
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in the host")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("unexpected {after:?} after the host")),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, "")) => Ok((host, None)),
        Some((host, p)) => Ok((host, Some(p.parse().map_err(|_| bad_port(p))?))),
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
    }
}
