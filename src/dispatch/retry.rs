//! When to try a failed batch again: exponential backoff from the touchpoint's `retry.backoff`,
//! capped at `retry.max_backoff`, with full jitter so that many batches failing together do not
//! come back together; a `Retry-After` from the endpoint is honoured (as a lower bound), up to
//! `retry.max_backoff` too: an endpoint cannot park a batch for longer than its touchpoint allows,
//! whatever number or date it sends. Arithmetic on waits saturates.

use std::time::Duration;

use crate::model::Retry;

/// What a failed attempt leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Try again after this long.
    RetryAfter(Duration),
    /// The last attempt failed (or the failure is final): dead-letter the batch.
    DeadLetter,
}

/// The wait before attempt `attempts_made + 1`, after `attempts_made` failed attempts.
/// `unit` is a random number in `[0, 1)` for the jitter; `retry_after` is the endpoint's
/// `Retry-After`, if it sent one.
pub fn next(policy: &Retry, attempts_made: u32, retry_after: Option<Duration>, unit: f64) -> Next {
    if attempts_made >= policy.attempts {
        return Next::DeadLetter;
    }
    let base = policy.backoff.get();
    let cap = policy.max_backoff.get().max(base);
    let exp = attempts_made.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exp).min(cap);
    // Full jitter, but never less than half the ceiling: the backoff still grows. (The factor is
    // at most 1, so the product cannot overflow.)
    let jittered = ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
    Next::RetryAfter(retry_after.map_or(jittered, |ra| jittered.max(ra.min(cap))))
}

/// When a wait of `wait` from `now_ms` (ms since the epoch) ends, saturating instead of wrapping.
pub fn due_at(now_ms: i64, wait: Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
}

pub use crate::channel::answer::parse_retry_after;

/// A random number in `[0, 1)`.
pub fn unit() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backoff, MaxBackoff};

    fn policy(attempts: u32, backoff: u64, max: u64) -> Retry {
        Retry {
            attempts,
            backoff: Backoff::from_secs(backoff),
            max_backoff: MaxBackoff::from_secs(max),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let p = policy(12, 1, 60);
        let secs = |made, unit| match next(&p, made, None, unit) {
            Next::RetryAfter(d) => d.as_secs_f64(),
            Next::DeadLetter => -1.0,
        };
        assert_eq!(secs(1, 1.0), 1.0);
        assert_eq!(secs(1, 0.0), 0.5);
        assert_eq!(secs(2, 1.0), 2.0);
        assert_eq!(secs(4, 1.0), 8.0);
        assert_eq!(secs(10, 1.0), 60.0, "capped at max_backoff");
        assert_eq!(secs(11, 0.0), 30.0);
        assert_eq!(next(&p, 12, None, 0.5), Next::DeadLetter);
    }

    #[test]
    fn retry_after_is_a_lower_bound() {
        let p = policy(5, 1, 600);
        assert_eq!(
            next(&p, 1, Some(Duration::from_secs(30)), 0.0),
            Next::RetryAfter(Duration::from_secs(30))
        );
        let now = humantime::parse_rfc3339("2026-11-22T08:00:00Z").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 08:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_18446744073709551615_waits_max_backoff_instead_of_dead_lettering() {
        let p = policy(12, 1, 600);
        let now = humantime::parse_rfc3339("2026-11-22T08:00:00Z").unwrap();
        for header in ["18446744073709551615", "99999999999999999999999999"] {
            let ra = parse_retry_after(header, now);
            assert_eq!(ra, Some(Duration::from_secs(u64::MAX)), "{header}");
            assert_eq!(
                next(&p, 1, ra, 0.0),
                Next::RetryAfter(Duration::from_secs(600)),
                "{header}"
            );
        }
        // The time it is due saturates instead of wrapping into the past.
        let wait = Duration::from_secs(u64::MAX);
        assert_eq!(due_at(1_795_000_000_000, wait), i64::MAX);
        assert_eq!(
            due_at(1_795_000_000_000, Duration::from_secs(600)),
            1_795_000_600_000
        );
    }

    #[test]
    fn retry_after_in_the_year_2999_waits_max_backoff_instead_of_parking_for_ever() {
        let p = policy(12, 1, 600);
        let now = humantime::parse_rfc3339("2026-11-22T08:00:00Z").unwrap();
        for header in ["Tue, 01 Jan 2999 00:00:00 GMT", "2999-01-01T00:00:00Z"] {
            let ra = parse_retry_after(header, now).unwrap();
            assert!(ra > Duration::from_secs(900 * 365 * 86_400), "{header}");
            assert_eq!(
                next(&p, 3, Some(ra), 1.0),
                Next::RetryAfter(Duration::from_secs(600)),
                "{header}"
            );
        }
        // A date in the past is no wait at all; the backoff stands.
        let past = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now);
        assert_eq!(past, Some(Duration::ZERO));
        assert_eq!(
            next(&p, 1, past, 1.0),
            Next::RetryAfter(Duration::from_secs(1))
        );
        for bad in ["-1", "1.5", "", "soon"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}
