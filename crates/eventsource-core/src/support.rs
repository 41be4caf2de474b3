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

/// `url` with its password replaced by `***`, for logs and error messages; the one redactor
/// of the workspace (Redis and PostgreSQL URLs, the CLI, the tests).
///
/// It does not parse the URL by the standard: a password holding `/`, `?`, `#` or `@` (a
/// hand-written URL) would end the authority early there and leak what follows. Instead the
/// user information is everything between the scheme and the **last** `@`, and the password
/// everything in it after the first `:`. A URL with a user and no password keeps the user
/// (nothing is invented), except a Redis URL's, which may be a password written where the user
/// goes; `password`, `pass` and `sslpassword` query parameters are replaced
/// too. An `@` in the query of a URL without user information makes it redact more than it
/// must, never less.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let (userinfo, place) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let place = redact_query(place);
    match userinfo {
        None => format!("{scheme}{place}"),
        Some(info) => match info.split_once(':') {
            Some((user, _)) => format!("{scheme}{user}:***@{place}"),
            // `redis://secret@host`: a password written where the user goes (Redis's old
            // `AUTH password`) is a common slip, so a Redis URL's lone user is hidden too.
            None if scheme.starts_with("redis") => format!("{scheme}***@{place}"),
            None => format!("{scheme}{info}@{place}"),
        },
    }
}

/// `host/path?password=x&a=b` → `host/path?password=***&a=b`.
fn redact_query(place: &str) -> String {
    let Some((before, query)) = place.split_once('?') else {
        return place.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if ["password", "pass", "sslpassword"]
                    .contains(&key.to_ascii_lowercase().as_str()) =>
            {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{before}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
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
    fn redact_url_hides_every_password_and_invents_none() {
        let cases = [
            ("redis://localhost:6379", "redis://localhost:6379"),
            ("redis://u:secret@host:6379/0", "redis://u:***@host:6379/0"),
            // Digits then `/`: a standard parser takes `1234` for a port and leaks the rest.
            ("redis://u:1234/s3cret@host", "redis://u:***@host"),
            ("redis://u:pa?ss#w@rd@host:1", "redis://u:***@host:1"),
            ("redis://u:p%40ss%2Fw@host", "redis://u:***@host"),
            (
                "rediss://:only-a-password@host:6380",
                "rediss://:***@host:6380",
            ),
            ("redis://:pw@[::1]:6379", "redis://:***@[::1]:6379"),
            ("redis://[::1]:6379", "redis://[::1]:6379"),
            ("redis://secret@host", "redis://***@host"),
            (
                "postgres://postgres@127.0.0.1:5432/test",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            (
                "postgres://app:s3cr3t@db.internal/app?sslmode=require",
                "postgres://app:***@db.internal/app?sslmode=require",
            ),
            (
                "postgres://db/app?user=app&password=hunter2&sslmode=verify-full",
                "postgres://db/app?user=app&password=***&sslmode=verify-full",
            ),
            (
                "redis+unix:///run/redis.sock?pass=secret&db=1",
                "redis+unix:///run/redis.sock?pass=***&db=1",
            ),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
            for secret in [
                "secret",
                "1234",
                "s3cret",
                "pa?ss",
                "w@rd",
                "p%40ss",
                "hunter2",
                "only-a-password",
                "s3cr3t",
            ] {
                if url.contains(&format!(":{secret}")) || url.contains(&format!("={secret}")) {
                    assert!(!redact_url(url).contains(secret), "{url} leaks {secret}");
                }
            }
        }
    }

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        // FNV-1a 64 of "" and "a" (the reference implementation's test vectors).
        assert_eq!(fnv1a64(b"", 0), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a", 0), 0xaf63_dc4c_8601_ec8c);
    }
}
