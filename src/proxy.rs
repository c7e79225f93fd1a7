//! Which HTTP proxy a connection goes through, decided as curl and Python's
//! `requests` (which the old script used) decide it:
//!
//! 1. `proxy.url` in the config (`"http://[user:password@]host:port"`); an
//!    empty string means no proxy, whatever the environment says;
//! 2. else the environment: `https_proxy`/`HTTPS_PROXY` for `https` and
//!    `wss`, `http_proxy`/`HTTP_PROXY` for `http` and `ws`, then
//!    `all_proxy`/`ALL_PROXY` for either;
//! 3. else, on Windows, the user's Internet Options (`ProxyEnable`,
//!    `ProxyServer` as `host:port` or `http=host:port;https=host:port`,
//!    `ProxyOverride` with `*` wildcards and `<local>`).
//!
//! `proxy.no_proxy` and `no_proxy`/`NO_PROXY` (comma-separated host names,
//! whose subdomains match too, IP addresses, IPv4 ranges like `10.0.0.0/8`,
//! or `*` for all) name hosts reached directly. Pure: the environment and
//! the registry values are read by the caller.

use std::fmt;
use std::net::IpAddr;

use crate::config::Secret;

/// One HTTP proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or address (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Basic authentication, from the URL's user information.
    pub auth: Option<(String, Secret)>,
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (or without the scheme, as
    /// Windows and many environments write it); the port defaults to 80.
    pub fn parse(text: &str) -> Result<Proxy, String> {
        let t = text.trim();
        let rest = match t.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "proxy scheme {scheme:?} is not supported (only http:// proxies)"
                ))
            }
            None => t,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let auth = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            (percent_decode(user), Secret::new(percent_decode(password)))
        });
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("proxy {:?} has an unclosed [", mask(text)))?;
            (host, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("proxy {:?} has no host", mask(text)));
        }
        let port = match port {
            None | Some("") => 80,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 5 => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("proxy {:?} has a bad port", mask(text)))?,
            Some(_) => return Err(format!("proxy {:?} has a bad port", mask(text))),
        };
        Ok(Proxy {
            host: host.to_string(),
            port,
            auth,
        })
    }

    /// The value of a `Proxy-Authorization` header, if the proxy has credentials.
    pub fn authorization(&self) -> Option<String> {
        self.auth
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{}", p.expose()).as_bytes())))
    }
}

impl fmt::Display for Proxy {
    /// `http://user:****@host:port`: the password never shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match &self.auth {
            Some((user, _)) => write!(f, "http://{user}:****@{host}:{}", self.port),
            None => write!(f, "http://{host}:{}", self.port),
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The user's proxy settings from Windows' Internet Options (HKCU).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WindowsSettings {
    /// `ProxyEnable` (a DWORD, non-zero: on).
    pub enable: bool,
    /// `ProxyServer`.
    pub server: Option<String>,
    /// `ProxyOverride`.
    pub bypass: Option<String>,
}

/// The proxies in force, and where they came from.
#[derive(Debug, Default, Clone)]
pub struct Proxies {
    /// For `http` and `ws`.
    http: Option<Proxy>,
    /// For `https` and `wss`.
    https: Option<Proxy>,
    /// Hosts reached directly.
    bypass: Vec<Bypass>,
    /// Where the settings came from, for the start-up line.
    source: &'static str,
}

/// One entry of a bypass list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// Everything.
    All,
    /// A host name and its subdomains (lower case, no leading dot).
    Domain(String),
    /// A Windows pattern with `*` wildcards (lower case).
    Pattern(String),
    /// Host names without a dot (Windows' `<local>`).
    Local,
    /// One address.
    Addr(IpAddr),
    /// An IPv4 range: the network and the prefix length.
    Range(u32, u32),
}

impl Proxies {
    /// The proxies for a config's `proxy.url` and `proxy.no_proxy`, the
    /// environment (`env` reads one variable) and, on Windows, the user's
    /// Internet Options. Err names the setting that is wrong.
    pub fn resolve(
        url: Option<&str>,
        no_proxy: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
        windows: Option<&WindowsSettings>,
    ) -> Result<Proxies, String> {
        let either = |lower: &str, upper: &str| {
            env(lower)
                .or_else(|| env(upper))
                .filter(|v| !v.trim().is_empty())
        };
        let mut bypass = Vec::new();
        for list in [no_proxy.map(str::to_string), either("no_proxy", "NO_PROXY")]
            .into_iter()
            .flatten()
        {
            bypass.extend(list.split(',').filter_map(parse_bypass));
        }
        let parse = |what: &str, v: &str| Proxy::parse(v).map_err(|e| format!("{what}: {e}"));
        if let Some(url) = url {
            if url.trim().is_empty() {
                return Ok(Proxies {
                    source: "proxy.url is \"\"",
                    ..Proxies::default()
                });
            }
            let p = parse("proxy.url", url)?;
            return Ok(Proxies {
                http: Some(p.clone()),
                https: Some(p),
                bypass,
                source: "proxy.url",
            });
        }
        let all = either("all_proxy", "ALL_PROXY");
        let http = either("http_proxy", "HTTP_PROXY").or_else(|| all.clone());
        let https = either("https_proxy", "HTTPS_PROXY").or(all);
        if http.is_some() || https.is_some() {
            return Ok(Proxies {
                http: http.map(|v| parse("HTTP_PROXY", &v)).transpose()?,
                https: https.map(|v| parse("HTTPS_PROXY", &v)).transpose()?,
                bypass,
                source: "the environment",
            });
        }
        if let Some(w) = windows.filter(|w| w.enable) {
            let server = w.server.as_deref().unwrap_or_default();
            let (http, https) = windows_servers(server);
            bypass.extend(
                w.bypass
                    .as_deref()
                    .unwrap_or_default()
                    .split(';')
                    .filter_map(parse_windows_bypass),
            );
            return Ok(Proxies {
                http: http
                    .map(|v| parse("Internet Options ProxyServer", &v))
                    .transpose()?,
                https: https
                    .map(|v| parse("Internet Options ProxyServer", &v))
                    .transpose()?,
                bypass,
                source: "Windows Internet Options",
            });
        }
        Ok(Proxies {
            bypass,
            source: "no setting",
            ..Proxies::default()
        })
    }

    /// The proxy for a connection to `host` (`secure`: https or wss), or
    /// None to go directly.
    pub fn for_host(&self, secure: bool, host: &str) -> Option<&Proxy> {
        let proxy = if secure { &self.https } else { &self.http }.as_ref()?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let addr = host.parse::<IpAddr>().ok();
        let bypassed = self.bypass.iter().any(|b| match b {
            Bypass::All => true,
            Bypass::Domain(d) => host == *d || host.ends_with(&format!(".{d}")),
            Bypass::Pattern(p) => wildcard(p, &host),
            Bypass::Local => addr.is_none() && !host.contains('.'),
            Bypass::Addr(a) => addr == Some(*a),
            Bypass::Range(net, bits) => match addr {
                Some(IpAddr::V4(v4)) => {
                    let mask = if *bits == 0 {
                        0
                    } else {
                        u32::MAX << (32 - bits)
                    };
                    u32::from(v4) & mask == *net & mask
                }
                _ => false,
            },
        });
        (!bypassed).then_some(proxy)
    }

    /// One line for the log: which proxy is in force, for what, and from where.
    pub fn describe(&self) -> String {
        let show = |p: &Option<Proxy>| p.as_ref().map_or("none".to_string(), Proxy::to_string);
        if self.http.is_none() && self.https.is_none() {
            return format!("no proxy ({})", self.source);
        }
        let bypass = if self.bypass.is_empty() {
            String::new()
        } else {
            format!(", {} hosts or ranges bypass it", self.bypass.len())
        };
        if self.http == self.https {
            format!("proxy {} (from {}){bypass}", show(&self.http), self.source)
        } else {
            format!(
                "proxy {} for http, {} for https (from {}){bypass}",
                show(&self.http),
                show(&self.https),
                self.source
            )
        }
    }
}

/// `host:port` for every protocol, or `http=h:p;https=h:p;...` (Windows'
/// `ProxyServer`): the http and https proxies.
fn windows_servers(server: &str) -> (Option<String>, Option<String>) {
    if !server.contains('=') {
        let s = server.trim();
        return if s.is_empty() {
            (None, None)
        } else {
            (Some(s.to_string()), Some(s.to_string()))
        };
    }
    let mut found = (None, None);
    for part in server.split(';') {
        if let Some((scheme, value)) = part.split_once('=') {
            let value = value.trim().to_string();
            match scheme.trim().to_ascii_lowercase().as_str() {
                "http" => found.0 = Some(value),
                "https" => found.1 = Some(value),
                _ => {}
            }
        }
    }
    found
}

/// One `NO_PROXY` entry.
fn parse_bypass(entry: &str) -> Option<Bypass> {
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() {
        return None;
    }
    if e == "*" {
        return Some(Bypass::All);
    }
    if let Some((net, bits)) = e.split_once('/') {
        let net: std::net::Ipv4Addr = net.parse().ok()?;
        let bits: u32 = bits.parse().ok().filter(|b| *b <= 32)?;
        return Some(Bypass::Range(u32::from(net), bits));
    }
    let host = e.trim_start_matches("*.").trim_start_matches('.');
    let host = host.trim_start_matches('[');
    let host = match host.split_once(']') {
        Some((v6, _)) => v6,
        None => host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') {
                h
            } else {
                host
            }
        }),
    };
    match host.parse::<IpAddr>() {
        Ok(a) => Some(Bypass::Addr(a)),
        Err(_) => Some(Bypass::Domain(host.to_string())),
    }
}

/// One `ProxyOverride` entry (Windows: `*` wildcards, `<local>`).
fn parse_windows_bypass(entry: &str) -> Option<Bypass> {
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() {
        None
    } else if e == "<local>" {
        Some(Bypass::Local)
    } else if e == "*" {
        Some(Bypass::All)
    } else if e.contains('*') {
        Some(Bypass::Pattern(e))
    } else {
        parse_bypass(&e)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn wildcard(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// `%XX` sequences decoded (user information in a proxy URL).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A proxy URL with its password masked, for error messages.
fn mask(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((userinfo, host)) => {
            let (scheme, user) = match userinfo.split_once("://") {
                Some((s, u)) => (format!("{s}://"), u),
                None => (String::new(), userinfo),
            };
            let user = user.split(':').next().unwrap_or_default();
            format!("{scheme}{user}:****@{host}")
        }
        None => text.to_string(),
    }
}

/// Standard base64 with padding (the Basic credentials).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn proxy_urls_parse_with_credentials_masked() {
        let p = Proxy::parse("http://ops:s%40cret@proxy.mall:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.mall", 3128));
        assert_eq!(p.auth.as_ref().unwrap().1.expose(), "s@cret");
        assert_eq!(p.to_string(), "http://ops:****@proxy.mall:3128");
        assert_eq!(format!("{p:?}"), "http://ops:****@proxy.mall:3128");
        assert_eq!(
            p.authorization().unwrap(),
            format!("Basic {}", base64(b"ops:s@cret"))
        );
        let bare = Proxy::parse("10.1.2.3:8080").unwrap();
        assert_eq!(
            (bare.host.as_str(), bare.port, bare.auth),
            ("10.1.2.3", 8080, None)
        );
        assert_eq!(Proxy::parse("http://[::1]:3128/").unwrap().host, "::1");
        assert_eq!(Proxy::parse("http://p").unwrap().port, 80);
        for bad in [
            "socks5://p:1080",
            "http://:3128",
            "http://p:+80",
            "http://p:70000",
            "http://p:0",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
        let e = Proxy::parse("http://u:hunter2@:1").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn config_comes_first_and_empty_means_none() {
        let e = env(&[("HTTPS_PROXY", "http://env:1")]);
        let p = Proxies::resolve(Some("http://cfg:2"), None, &e, None).unwrap();
        assert_eq!(p.for_host(true, "a.com").unwrap().host, "cfg");
        let none = Proxies::resolve(Some(""), None, &e, None).unwrap();
        assert_eq!(none.for_host(true, "a.com"), None);
        assert!(none.describe().contains("no proxy"));
    }

    #[test]
    fn environment_by_scheme_in_either_case() {
        let e = env(&[("https_proxy", "http://s:1"), ("HTTP_PROXY", "http://p:2")]);
        let p = Proxies::resolve(None, None, &e, None).unwrap();
        assert_eq!(p.for_host(true, "a.com").unwrap().host, "s");
        assert_eq!(p.for_host(false, "a.com").unwrap().host, "p");
        let all =
            Proxies::resolve(None, None, env(&[("ALL_PROXY", "http://all:3")]), None).unwrap();
        assert_eq!(all.for_host(true, "a.com").unwrap().port, 3);
        assert_eq!(all.for_host(false, "a.com").unwrap().port, 3);
        let bad = Proxies::resolve(None, None, env(&[("HTTP_PROXY", "socks5://x:1")]), None);
        assert!(bad.unwrap_err().contains("HTTP_PROXY"));
    }

    #[test]
    fn no_proxy_matches_domains_addresses_ranges_and_star() {
        let e = env(&[
            ("HTTP_PROXY", "http://p:1"),
            (
                "NO_PROXY",
                "example.com, .corp.local,10.0.0.0/8,127.0.0.1,[::1],cdn.net:443",
            ),
        ]);
        let p = Proxies::resolve(None, Some("extra.org"), &e, None).unwrap();
        for direct in [
            "example.com",
            "img.example.com",
            "EXAMPLE.COM.",
            "a.corp.local",
            "10.2.3.4",
            "127.0.0.1",
            "[::1]",
            "cdn.net",
            "extra.org",
            "x.extra.org",
        ] {
            assert_eq!(p.for_host(false, direct), None, "{direct}");
        }
        for proxied in [
            "notexample.com",
            "example.com.evil",
            "11.0.0.1",
            "127.0.0.2",
            "corp.localx",
        ] {
            assert!(p.for_host(false, proxied).is_some(), "{proxied}");
        }
        let star = Proxies::resolve(
            None,
            None,
            env(&[("HTTP_PROXY", "http://p:1"), ("no_proxy", "*")]),
            None,
        )
        .unwrap();
        assert_eq!(star.for_host(false, "a.com"), None);
    }

    #[test]
    fn windows_internet_options() {
        let w = WindowsSettings {
            enable: true,
            server: Some("http=hp:80;https=sp:443;ftp=f:21".into()),
            bypass: Some("*.mall.local;<local>;192.168.*".into()),
        };
        let p = Proxies::resolve(None, None, env(&[]), Some(&w)).unwrap();
        assert_eq!(p.for_host(false, "a.com").unwrap().host, "hp");
        assert_eq!(p.for_host(true, "a.com").unwrap().host, "sp");
        for direct in ["cdn.mall.local", "kioskserver", "192.168.1.9"] {
            assert_eq!(p.for_host(true, direct), None, "{direct}");
        }
        assert!(p.describe().contains("Windows Internet Options"));
        let one = WindowsSettings {
            enable: true,
            server: Some("proxy:3128".into()),
            bypass: None,
        };
        let p = Proxies::resolve(None, None, env(&[]), Some(&one)).unwrap();
        assert_eq!(p.for_host(true, "a.com").unwrap().port, 3128);
        let off = WindowsSettings {
            enable: false,
            ..one
        };
        let p = Proxies::resolve(None, None, env(&[]), Some(&off)).unwrap();
        assert_eq!(p.for_host(true, "a.com"), None);
        let env_wins =
            Proxies::resolve(None, None, env(&[("HTTPS_PROXY", "http://e:1")]), Some(&w)).unwrap();
        assert_eq!(env_wins.for_host(true, "a.com").unwrap().host, "e");
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*.a.com", "x.a.com"));
        assert!(!wildcard("*.a.com", "a.com"));
        assert!(wildcard("10.*.1", "10.2.3.1"));
        assert!(wildcard("a*b*c", "abc"));
        assert!(!wildcard("a*b*c", "acb"));
    }
}
