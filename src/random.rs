//! Random numbers without a crate, for ids and jitter: std's randomly keyed
//! hasher, fed the time, the process id and a counter.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Makes every call different even within one clock tick.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// 64 random bits (not for cryptography).
pub fn u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A random fraction in [0, 1).
fn unit() -> f64 {
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `d` times a random factor in [0.5, 1.5): thousands of kiosks that lost
/// the same broker or origin at the same moment do not come back in lockstep.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + unit())
}

/// A random duration in [0, `d`).
pub fn up_to(d: Duration) -> Duration {
    d.mul_f64(unit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_either_side_and_varies() {
        let d = Duration::from_secs(10);
        let samples: Vec<Duration> = (0..200).map(|_| jitter(d)).collect();
        assert!(samples
            .iter()
            .all(|s| *s >= Duration::from_secs(5) && *s < Duration::from_secs(15)));
        let (min, max) = (samples.iter().min().unwrap(), samples.iter().max().unwrap());
        assert!(*max - *min > Duration::from_secs(5), "{min:?}..{max:?}");
        assert!(up_to(Duration::ZERO).is_zero());
    }
}
