//! Reading a platform's or endpoint's answer: a body read up to a bound, an excerpt for the attempt
//! log, a network error in words (never with the URL: its query may carry an access token),
//! `Retry-After`, and when the platforms' limits reset (per minute; per day at midnight in China).

use std::time::Duration;

/// Reads at most `max` bytes of a response body; says whether there was more.
pub async fn read_capped(mut response: reqwest::Response, max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            return (out, true);
        }
    }
    (out, false)
}

/// The start of an error body, for the attempt log (`": text…"`, or nothing when empty).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let cut: String = text.chars().take(200).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    format!(": {cut}{more}")
}

/// A network error in words, without the URL (its query may carry an access token).
pub fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {}", humantime::format_duration(timeout));
    }
    let mut text = if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Parses a `Retry-After` header: delay seconds, or an HTTP date. A number of seconds too large
/// for a `u64` saturates (it is capped by [`next`] anyway); a date in the past means now.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
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

/// From `now_ms` (ms since the epoch) to one second into the next minute, when per-minute limits
/// (WeChat 45011, Getui 10005/30015) have reset whatever the two clocks' skew.
pub fn to_next_minute(now_ms: i64) -> Duration {
    const MINUTE: i64 = 60_000;
    Duration::from_millis((MINUTE - now_ms.rem_euclid(MINUTE)) as u64 + 1_000)
}

/// From `now_ms` to one second past the next 00:00 in UTC+8 (China Standard Time), when WeChat's
/// daily quotas and Getui's daily totals reset.
pub fn to_quota_reset(now_ms: i64) -> Duration {
    const DAY: i64 = 86_400_000;
    const UTC8: i64 = 8 * 3_600_000;
    let into_day = now_ms.saturating_add(UTC8).rem_euclid(DAY);
    Duration::from_millis((DAY - into_day) as u64 + 1_000)
}
