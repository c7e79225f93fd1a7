//! HTTP fetch with bounded time and size, and the line between failures worth
//! retrying and failures that will not get better.

use std::io::Read;
use std::time::Duration;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

/// Longest `Retry-After` honoured, so a hostile header cannot park a URL for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Limits for one fetch.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Whole-request deadline in seconds (connect, headers, body).
    pub timeout_secs: u64,
    /// Largest body accepted.
    pub max_bytes: u64,
}

/// A complete response body.
#[derive(Debug)]
pub struct Fetched {
    /// The body, exactly as sent.
    pub body: Vec<u8>,
    /// The server's Content-Type, if any.
    pub content_type: Option<String>,
}

/// Why a fetch failed, split by what the queue should do about it.
#[derive(Debug, PartialEq)]
pub enum Failure {
    /// Worth another attempt later: network errors, timeouts, 5xx, 429, short bodies.
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
}

/// GETs `url` within `limits` and checks the body against Content-Length.
pub fn fetch(url: &str, limits: &Limits) -> Result<Fetched, Failure> {
    let response = minreq::get(url)
        .with_timeout(limits.timeout_secs)
        .with_max_redirects(MAX_REDIRECTS)
        .send_lazy()
        .map_err(request_failure)?;
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let content_type = header("content-type");
    if let Some(failure) = status_failure(response.status_code, header("retry-after").as_deref()) {
        return Err(failure);
    }
    let declared = match header("content-length") {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| Failure::Permanent(format!("invalid Content-Length {v:?}")))?,
        ),
        None => None,
    };
    if let Some(len) = declared {
        if len > limits.max_bytes {
            return Err(too_large(limits.max_bytes));
        }
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(64 * 1024).min(limits.max_bytes) as usize);
    response
        .take(limits.max_bytes + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            Failure::transient(if e.kind() == std::io::ErrorKind::TimedOut {
                format!("timed out reading the body: {e}")
            } else {
                format!("reading the body failed: {e}")
            })
        })?;
    if body.len() as u64 > limits.max_bytes {
        return Err(too_large(limits.max_bytes));
    }
    if let Some(len) = declared {
        if body.len() as u64 != len {
            return Err(Failure::transient(format!(
                "short body: got {} of {len} bytes (Content-Length)",
                body.len()
            )));
        }
    }
    Ok(Fetched { body, content_type })
}

fn too_large(max: u64) -> Failure {
    Failure::Permanent(format!(
        "too large: body over download.max_bytes ({max} bytes)"
    ))
}

/// What a status code means for the queue; None for success.
pub fn status_failure(code: u16, retry_after: Option<&str>) -> Option<Failure> {
    let retry_after = retry_after
        .and_then(|v| v.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    match code {
        200..=203 | 205..=299 => None,
        204 => Some(Failure::Permanent("HTTP 204: no content".into())),
        408 | 425 | 429 | 500..=599 => Some(Failure::Transient {
            reason: format!("HTTP {code}"),
            retry_after,
        }),
        300..=399 => Some(Failure::Permanent(format!(
            "HTTP {code}: redirect without a usable Location"
        ))),
        _ => Some(Failure::Permanent(format!("HTTP {code}"))),
    }
}

/// Errors from minreq before a status line: the network's fault unless the
/// request itself can never work.
fn request_failure(e: minreq::Error) -> Failure {
    use minreq::Error as E;
    match e {
        E::TooManyRedirections
        | E::InfiniteRedirectionLoop
        | E::RedirectLocationMissing
        | E::InvalidProtocol
        | E::InvalidProtocolInRedirect
        | E::HttpsFeatureNotEnabled
        | E::PunycodeFeatureNotEnabled
        | E::PunycodeConversionFailed => Failure::Permanent(format!("request failed: {e}")),
        E::IoError(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            Failure::transient(format!("timed out: {io}"))
        }
        other => Failure::transient(format!("request failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_codes_pass() {
        assert_eq!(status_failure(200, None), None);
        assert_eq!(status_failure(203, None), None);
    }

    #[test]
    fn gone_and_forbidden_are_permanent() {
        for code in [400, 401, 403, 404, 410, 451] {
            assert!(
                matches!(status_failure(code, None), Some(Failure::Permanent(_))),
                "{code}"
            );
        }
    }

    #[test]
    fn server_trouble_is_transient_and_keeps_retry_after() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(status_failure(code, None), Some(Failure::Transient { .. })),
                "{code}"
            );
        }
        assert_eq!(
            status_failure(429, Some("7")),
            Some(Failure::Transient {
                reason: "HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            })
        );
        let capped = status_failure(503, Some("99999999"));
        assert!(
            matches!(capped, Some(Failure::Transient { retry_after: Some(d), .. }) if d == MAX_RETRY_AFTER)
        );
    }
}
