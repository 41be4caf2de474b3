//! Pieces the workspace's backends share (retry delays, stable hashes). Not a stable API:
//! hidden from the documentation, kept public so that sibling crates use one copy.

use std::time::Duration;

/// Exponential backoff with jitter, from backon: the first delay falls in `[min, 2·min)`,
/// each next one doubles, and none exceeds `max`. Many processes retrying after one outage
/// spread out instead of arriving in lockstep.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// Delays from `min` doubling up to `max` (`max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            delays: Self::build(min, max),
        }
    }

    fn build(min: Duration, max: Duration) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        // backon's jitter adds up to the delay itself, so each delay d becomes [d, 2d): the
        // exponential part stops at max / 2.
        backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay((max / 2).max(min))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = Self::build(self.min, self.max);
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }
}

/// FNV-1a (64 bits) over `bytes`, starting from the offset basis xor `seed`: stable across
/// processes, versions and languages (unlike `std`'s hasher). Used for advisory lock keys and,
/// with a finaliser, for partition assignment scores.
pub fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_bounds_and_spreads() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(min, max);
            let first = b.next_delay();
            assert!(first >= min && first < min * 2, "{first:?}");
            seen.insert(first);
            for _ in 0..30 {
                let d = b.next_delay();
                assert!(d >= min && d <= max, "{d:?}");
            }
            b.reset();
            assert!(b.next_delay() < min * 2);
        }
        assert!(seen.len() > 1, "jitter spreads the first delays");
    }

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        // FNV-1a 64 of "" and "a" (the reference implementation's test vectors).
        assert_eq!(fnv1a64(b"", 0), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a", 0), 0xaf63_dc4c_8601_ec8c);
    }
}
