//! Kept-alive connections, idle between requests to the same server, and
//! the proxies every new connection is chosen by.

use std::time::{Duration, Instant};

use super::conn::Conn;
use super::url::Url;
use crate::proxy::{Proxies, Proxy};

/// How long an idle kept-alive connection is reused (servers close theirs
/// after 5-75 s; an older one would mostly fail on first use).
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Idle connections kept at most (one per picture server, in practice).
const POOL_MAX: usize = 4;

/// Where a connection goes: scheme, host and port, and the proxy it goes through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    /// TLS?
    https: bool,
    /// Host name or address.
    host: String,
    /// Port.
    port: u16,
    /// The proxy's host and port, if any.
    via: Option<(String, u16)>,
}

impl Origin {
    pub(super) fn of(url: &Url, via: Option<&Proxy>) -> Origin {
        Origin {
            https: url.https,
            host: url.host.clone(),
            port: url.port,
            via: via.map(|p| (p.host.clone(), p.port)),
        }
    }
}

/// Connections kept open between requests to the same server (HTTP/1.1
/// keep-alive), as curl and browsers do: a drain of many pictures from one
/// server pays for one connect (and one TLS handshake), not one each.
#[derive(Default)]
pub struct Pool {
    /// Idle connections, oldest first, with when they became idle.
    idle: Vec<(Origin, Conn, Instant)>,
    /// The proxies in force (see `proxy.rs`).
    proxies: Proxies,
}

impl Pool {
    /// A pool whose new connections go through `proxies` where they apply.
    pub fn new(proxies: Proxies) -> Pool {
        Pool {
            idle: Vec::new(),
            proxies,
        }
    }

    /// The proxies in force.
    pub(super) fn proxies(&self) -> &Proxies {
        &self.proxies
    }

    /// An idle connection to `origin` that is not too old, if there is one.
    pub(super) fn take(&mut self, origin: &Origin) -> Option<Conn> {
        self.idle
            .retain(|(_, _, since)| since.elapsed() < POOL_IDLE);
        let i = self.idle.iter().rposition(|(o, _, _)| o == origin)?;
        Some(self.idle.remove(i).1)
    }

    /// Keeps `conn` for the next request to `origin`.
    pub(super) fn put(&mut self, origin: Origin, conn: Conn) {
        if self.idle.len() >= POOL_MAX {
            self.idle.remove(0);
        }
        self.idle.push((origin, conn, Instant::now()));
    }
}
