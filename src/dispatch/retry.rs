//! When to try a failed batch again: exponential backoff from the touchpoint's `retry.backoff`,
//! capped at `retry.max_backoff`, with full jitter so that many batches failing together do not
//! come back together; a `Retry-After` from the endpoint is honoured (as a lower bound).

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
    // Full jitter, but never less than half the ceiling: the backoff still grows.
    let jittered = ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
    Next::RetryAfter(retry_after.map_or(jittered, |ra| jittered.max(ra)))
}

/// Parses a `Retry-After` header: delay seconds, or an HTTP date.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate(value)?;
    Some(at.duration_since(now).unwrap_or_default())
}

fn httpdate(value: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT".
        let parts: Vec<&str> = value.split_whitespace().collect();
        let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
            return None;
        };
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let m = months.iter().position(|x| x == month)? + 1;
        humantime::parse_rfc3339(&format!("{year}-{m:02}-{day:0>2}T{time}Z")).ok()
    })
}

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
    use crate::model::Duration as D;

    fn policy(attempts: u32, backoff: u64, max: u64) -> Retry {
        Retry {
            attempts,
            backoff: D::from_secs(backoff),
            max_backoff: D::from_secs(max),
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
}
