//! A small HTTP/1.1 GET client made for the one loop: every call to
//! [`Get::step`] does a bounded piece of work (dial, TLS handshake, send,
//! read) and returns by the deadline it is given, so the loop can poll MQTT
//! between slices of even a very long download.
//!
//! Responses are bounded everywhere: the head in bytes and lines, the body by
//! the caller's byte cap, the whole attempt by a stall limit (no byte for
//! that long) and an overall cap. Redirects are followed up to
//! [`MAX_REDIRECTS`]; an `https` page is never redirected to `http`.
//! Parsing (URLs, response heads, chunked bodies) is pure and unit-tested.
//!
//! Framing is strict: a body is complete only when its length, its last
//! chunk or a TLS close_notify says so; a body ended by a plain TCP close is
//! flagged ([`Get::ended_by_close`]) for the caller to check, and nothing in
//! a transfer or content coding other than chunked is accepted (`body.rs`
//! states every rule).
//!
//! One file per seam: `url.rs` (URLs and redirects), `head.rs` (response
//! heads, by httparse), `body.rs` (framing and chunks), `conn.rs` (plain or
//! TLS connections), `pool.rs` (kept-alive connections), `get.rs` (the
//! request's state machine).

mod body;
mod conn;
mod get;
mod head;
mod pool;
mod url;

use std::io;
use std::time::Duration;

pub use body::Chunked;
pub use get::Get;
pub use head::{parse_head, Head};
pub use pool::Pool;
pub use url::Url;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// Bytes read from the socket per read call.
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Shortest socket timeout set: a zero timeout means "block forever" to the OS.
pub(crate) const MIN_SOCKET_WAIT: Duration = Duration::from_millis(1);

/// Why a request failed, split by what the queue should do about it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Worth another attempt later: network errors, stalls, 5xx, 429, short bodies.
    Transient {
        /// What happened, for the log and the queue row.
        reason: String,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Will not get better by retrying: 4xx, too large, not an image, bad path.
    Permanent(String),
}

impl Failure {
    /// A transient failure without a server-given delay.
    pub fn transient(reason: impl Into<String>) -> Failure {
        Failure::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// The reason, whichever kind.
    pub fn reason(&self) -> &str {
        match self {
            Failure::Transient { reason, .. } | Failure::Permanent(reason) => reason,
        }
    }
}

/// Limits of one GET, including its redirects.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest time without a byte (or a connect) before the attempt fails.
    pub stall: Duration,
    /// Longest time the whole attempt may take.
    pub max_time: Duration,
    /// Largest body accepted.
    pub max_bytes: u64,
    /// Read the body no faster than this (bytes per second); None: as fast as it comes.
    pub max_bytes_per_sec: Option<u64>,
}

/// Bytes the throttle lets through at once (a tenth of a second's worth, at
/// least one read's worth of a slow link).
pub(crate) fn throttle_burst(rate: u64) -> u64 {
    (rate / 10).max(4096)
}

/// What one [`Get::step`] achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing new yet (waiting for the network).
    Pending,
    /// The final response head is in: see [`Get::head`].
    Head,
    /// This many body bytes were appended.
    Body(usize),
    /// The body is complete.
    End,
}

/// The body is over the cap.
pub fn too_large(max: u64) -> Failure {
    Failure::Permanent(format!(
        "too large: body over download.max_bytes ({max} bytes)"
    ))
}

/// A socket or TLS error, worth another attempt.
pub(crate) fn net_failure(e: io::Error) -> Failure {
    Failure::transient(format!("connection failed: {e}"))
}
