//! Small value types that appear in touchpoint files as strings: durations (`"10s"`) and rate limits
//! (`"50/s"`). Each parses strictly, prints canonically (so `"60s"` and `"1m"` compare equal) and
//! carries the JSON Schema pattern that editors and `validate` check against.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pattern a duration string must match: a whole number and a unit.
pub const DURATION_PATTERN: &str = r"^[0-9]+(ms|s|m|h|d)$";
/// Pattern a rate limit string must match: a whole number of requests per unit of time.
pub const RATE_PATTERN: &str = r"^[1-9][0-9]*/(s|m|h)$";

/// A length of time written as a whole number and a unit: `500ms`, `10s`, `2m`, `1h`, `1d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(std::time::Duration);

const UNITS: [(&str, u128); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Duration {
    /// A duration of whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// The standard-library duration.
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl Duration {
    /// A duration of whole milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// The length in whole milliseconds (every duration a file can write is whole milliseconds,
    /// and fits: see [`FromStr`]); a longer one, made in code, saturates.
    pub const fn as_millis(self) -> u64 {
        let ms = self.0.as_millis();
        if ms > u64::MAX as u128 {
            u64::MAX
        } else {
            ms as u64
        }
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = s.split_at(digits);
        let factor = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, ms)| *ms)
            .filter(|_| !number.is_empty())
            .ok_or_else(|| format!("`{s}` is not a duration: write a whole number and a unit, e.g. \"500ms\", \"10s\", \"2m\", \"1h\""))?;
        let n: u64 = number
            .parse()
            .map_err(|_| format!("`{s}` is too large for a duration"))?;
        let ms = u128::from(n) * factor;
        let ms = u64::try_from(ms).map_err(|_| format!("`{s}` is too large for a duration"))?;
        Ok(Self(std::time::Duration::from_millis(ms)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (unit, factor) = UNITS
            .iter()
            .find(|(_, factor)| ms.is_multiple_of(*factor))
            .copied()
            .unwrap_or(("ms", 1));
        write!(f, "{}{unit}", ms / factor)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "A whole number and a unit: ms, s, m, h or d (e.g. \"500ms\", \"10s\", \"2m\").",
        })
    }
}

/// A [`Duration`] that one field accepts only from `MIN_MS` to `MAX_MS` milliseconds, both
/// included. Parsing refuses anything outside (so a spec read back from the registry cannot hold
/// it either), and the schema's pattern admits exactly the values in range, so an editor flags
/// `timeout = "0s"` as `validate` does. Each field names its own alias with its bounds and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationIn<const MIN_MS: u64, const MAX_MS: u64>(Duration);

impl<const MIN_MS: u64, const MAX_MS: u64> DurationIn<MIN_MS, MAX_MS> {
    /// The shortest duration accepted.
    pub const MIN: Duration = Duration::from_millis(MIN_MS);
    /// The longest duration accepted.
    pub const MAX: Duration = Duration::from_millis(MAX_MS);

    /// A duration of whole seconds, for defaults and constants: out of range, it fails to compile
    /// in a `const` item (and panics elsewhere), so use [`DurationIn::new`] for values from input.
    pub const fn from_secs(secs: u64) -> Self {
        assert!(
            MIN_MS <= MAX_MS && secs <= MAX_MS / 1000 && secs * 1000 >= MIN_MS,
            "duration out of the field's range"
        );
        Self(Duration::from_secs(secs))
    }

    /// `d`, or why it is out of range.
    pub fn new(d: Duration) -> Result<Self, String> {
        if d < Self::MIN || d > Self::MAX {
            return Err(format!(
                "`{d}` is out of range: write a duration from {} to {}",
                Self::MIN,
                Self::MAX
            ));
        }
        Ok(Self(d))
    }

    /// The standard-library duration.
    pub fn get(self) -> std::time::Duration {
        self.0.get()
    }

    /// The schema pattern: a duration in range, in any unit (see [`range_pattern`]).
    pub fn pattern() -> String {
        range_pattern(Self::MIN, Self::MAX)
    }
}

impl<const MIN_MS: u64, const MAX_MS: u64> fmt::Display for DurationIn<MIN_MS, MAX_MS> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const MIN_MS: u64, const MAX_MS: u64> FromStr for DurationIn<MIN_MS, MAX_MS> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<Duration>() {
            Ok(d) => Self::new(d),
            // A well-formed number too large for any duration is out of range too.
            Err(_) if is_duration_format(s) => Err(format!(
                "`{s}` is out of range: write a duration from {} to {}",
                Self::MIN,
                Self::MAX
            )),
            Err(e) => Err(e),
        }
    }
}

impl<const MIN_MS: u64, const MAX_MS: u64> Serialize for DurationIn<MIN_MS, MAX_MS> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de, const MIN_MS: u64, const MAX_MS: u64> Deserialize<'de> for DurationIn<MIN_MS, MAX_MS> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl<const MIN_MS: u64, const MAX_MS: u64> JsonSchema for DurationIn<MIN_MS, MAX_MS> {
    // Each field's range is its own: written out where the field is, not shared under one name.
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        format!("Duration_{MIN_MS}ms_{MAX_MS}ms").into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": Self::pattern(),
            "description": format!(
                "A duration from {} to {}: a whole number and a unit, ms, s, m, h or d (e.g. \"10s\", \"2m\").",
                Self::MIN,
                Self::MAX
            ),
        })
    }
}

/// Whether `s` is written as a duration (a whole number and a unit), whatever its size.
pub fn is_duration_format(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && UNITS.iter().any(|(unit, _)| *unit == &s[digits..])
}

/// A regular expression (ECMA-262 and Rust `regex` alike) matching exactly the duration strings
/// from `min` to `max`: for each unit, the whole numbers that times the unit fall in range (with
/// any leading zeros, as the parser takes them). A unit no whole number fits is left out.
pub fn range_pattern(min: Duration, max: Duration) -> String {
    let (lo_ms, hi_ms) = (min.as_millis(), max.as_millis());
    let mut units = Vec::new();
    // Longest unit first, "ms" last: the order [`UNITS`] keeps.
    for (unit, factor) in UNITS {
        // The factors fit u64; so do the quotients.
        let factor = factor as u64;
        let lo = lo_ms.div_ceil(factor);
        let hi = hi_ms / factor;
        if lo > hi {
            continue;
        }
        let mut numbers = Vec::new();
        if lo == 0 {
            numbers.push("0".to_string());
        }
        int_range(lo.max(1), hi, &mut numbers);
        if numbers.is_empty() {
            continue;
        }
        units.push(format!("(?:{}){unit}", numbers.join("|")));
    }
    format!("^0*(?:{})$", units.join("|"))
}

/// Alternatives matching the whole numbers `lo..=hi` (no leading zeros; `lo` at least 1).
fn int_range(lo: u64, hi: u64, out: &mut Vec<String>) {
    if lo > hi {
        return;
    }
    let (l, h) = (lo.to_string(), hi.to_string());
    if l.len() < h.len() {
        // Up to the largest number of `lo`'s length, then the rest. `l.len()` is below 20, the
        // length of u64::MAX, so the power fits.
        let top = 10u64.pow(l.len() as u32) - 1;
        out.extend(same_length(&l, &top.to_string()));
        int_range(top + 1, hi, out);
    } else {
        out.extend(same_length(&l, &h));
    }
}

/// Alternatives matching the digit strings from `lo` to `hi`, both of the same length.
fn same_length(lo: &str, hi: &str) -> Vec<String> {
    if lo == hi {
        return vec![lo.to_string()];
    }
    let (a, rest_lo) = lo.split_at(1);
    let (b, rest_hi) = hi.split_at(1);
    if rest_lo.is_empty() {
        return vec![format!("[{a}-{b}]")];
    }
    if a == b {
        return same_length(rest_lo, rest_hi)
            .into_iter()
            .map(|p| format!("{a}{p}"))
            .collect();
    }
    let digit = |s: &str| s.bytes().next().map_or(0, |c| c - b'0');
    let (mut first, mut last) = (digit(a), digit(b));
    let mut out = Vec::new();
    if !rest_lo.bytes().all(|c| c == b'0') {
        let nines = "9".repeat(rest_lo.len());
        out.extend(
            same_length(rest_lo, &nines)
                .into_iter()
                .map(|p| format!("{a}{p}")),
        );
        first += 1;
    }
    let mut tail = Vec::new();
    if !rest_hi.bytes().all(|c| c == b'9') {
        let zeros = "0".repeat(rest_hi.len());
        tail = same_length(&zeros, rest_hi)
            .into_iter()
            .map(|p| format!("{b}{p}"))
            .collect();
        // `b` is above `a`, so at least 1.
        last -= 1;
    }
    if first <= last {
        let class = if first == last {
            first.to_string()
        } else {
            format!("[{first}-{last}]")
        };
        let any = if rest_lo.len() == 1 {
            "[0-9]".to_string()
        } else {
            format!("[0-9]{{{}}}", rest_lo.len())
        };
        out.push(format!("{class}{any}"));
    }
    out.extend(tail);
    out
}

/// The unit a rate limit counts per.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateUnit {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

/// A request rate: `50/s`, `600/m`, `1000/h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimit {
    /// How many requests.
    pub count: u32,
    /// Per what.
    pub per: RateUnit,
}

impl RateLimit {
    /// The limit as requests per second.
    pub fn per_second(self) -> f64 {
        let secs = match self.per {
            RateUnit::Second => 1.0,
            RateUnit::Minute => 60.0,
            RateUnit::Hour => 3600.0,
        };
        f64::from(self.count) / secs
    }
}

impl FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{s}` is not a rate limit: write requests per unit, e.g. \"50/s\", \"600/m\", \"1000/h\""
            )
        };
        let (count, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = count.parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(bad());
        }
        let per = match unit {
            "s" => RateUnit::Second,
            "m" => RateUnit::Minute,
            "h" => RateUnit::Hour,
            _ => return Err(bad()),
        };
        Ok(Self { count, per })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per {
            RateUnit::Second => "s",
            RateUnit::Minute => "m",
            RateUnit::Hour => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for RateLimit {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for RateLimit {
    fn schema_name() -> Cow<'static, str> {
        "RateLimit".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": RATE_PATTERN,
            "description": "Requests per unit of time: a whole number, a slash and s, m or h (e.g. \"50/s\").",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print_canonically() {
        for (input, canonical) in [
            ("10s", "10s"),
            ("60s", "1m"),
            ("1500ms", "1500ms"),
            ("2000ms", "2s"),
            ("90m", "90m"),
            ("24h", "1d"),
            ("0s", "0s"),
        ] {
            let d: Duration = input.parse().unwrap();
            assert_eq!(d.to_string(), canonical, "{input}");
        }
    }

    #[test]
    fn bad_durations_are_refused() {
        for input in [
            "",
            "10",
            "s",
            "10 s",
            "10sec",
            "-1s",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert!(input.parse::<Duration>().is_err(), "{input}");
        }
    }

    #[test]
    fn rate_limits_round_trip() {
        let r: RateLimit = "50/s".parse().unwrap();
        assert_eq!(r.per_second(), 50.0);
        assert_eq!(r.to_string(), "50/s");
        let r: RateLimit = "600/m".parse().unwrap();
        assert_eq!(r.per_second(), 10.0);
        for bad in ["0/s", "50", "50/d", "x/s", "/s"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_agree_with_parsers() {
        let duration = regex_lite(DURATION_PATTERN);
        let rate = regex_lite(RATE_PATTERN);
        for s in ["10s", "500ms", "2m", "1h", "1d", "10sec", "s", "1.5s"] {
            assert_eq!(duration(s), s.parse::<Duration>().is_ok(), "{s}");
        }
        for s in ["50/s", "1/h", "0/s", "50/d", "5"] {
            assert_eq!(rate(s), s.parse::<RateLimit>().is_ok(), "{s}");
        }
    }

    #[test]
    fn timeout_0s_and_backoff_100000000000d_are_refused() {
        use crate::model::{Backoff, MaxBackoff, PushTtl, Timeout};
        let err = "0s".parse::<Timeout>().unwrap_err();
        assert_eq!(err, "`0s` is out of range: write a duration from 1s to 5m");
        let err = "100000000000d".parse::<Backoff>().unwrap_err();
        assert_eq!(
            err,
            "`100000000000d` is out of range: write a duration from 10ms to 1h"
        );
        // Too large for any duration: out of range as well, not "not a duration".
        let err = "99999999999999999999s".parse::<Timeout>().unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        assert!(
            "10 s"
                .parse::<Timeout>()
                .unwrap_err()
                .contains("not a duration")
        );
        assert!("2d".parse::<MaxBackoff>().is_err());
        assert!("4d".parse::<PushTtl>().is_err());
        for (ok, canonical) in [("1s", "1s"), ("300s", "5m"), ("1000ms", "1s")] {
            assert_eq!(ok.parse::<Timeout>().unwrap().to_string(), canonical);
        }
        assert_eq!("1d".parse::<MaxBackoff>().unwrap().get().as_secs(), 86_400);
        assert_eq!("3d".parse::<PushTtl>().unwrap().get().as_secs(), 259_200);
        // A value read back (from the registry, say) is held to the range too.
        let read: Result<Timeout, _> = serde_json::from_value(serde_json::json!("0s"));
        assert!(read.is_err());
    }

    #[test]
    fn range_patterns_match_exactly_the_durations_in_range() {
        let ranges: [(u64, u64); 8] = [
            (1_000, 300_000),
            (10, 3_600_000),
            (100, 86_400_000),
            (1_000, 259_200_000),
            (0, 1),
            (1, u64::MAX),
            (999, 1_001),
            (59_999, 7_200_001),
        ];
        for (lo, hi) in ranges {
            let (min, max) = (Duration::from_millis(lo), Duration::from_millis(hi));
            let pattern = range_pattern(min, max);
            let matches = regex_lite(&pattern);
            let mut tried = 0;
            for (unit, factor) in UNITS {
                let factor = factor as u64;
                // Around both ends, around every power of ten, and a few inside.
                let mut numbers: Vec<u64> = vec![0, 1, 2, 9, 10, 11];
                for edge in [
                    lo / factor,
                    lo.div_ceil(factor),
                    hi / factor,
                    hi.div_ceil(factor),
                ] {
                    numbers.extend([edge.saturating_sub(1), edge, edge.saturating_add(1)]);
                }
                for p in 1..20u32 {
                    let ten = 10u64.pow(p);
                    numbers.extend([ten - 1, ten, ten + 1]);
                }
                numbers.extend((1..40).map(|i| lo / factor + i * 7919));
                for n in numbers {
                    for s in [format!("{n}{unit}"), format!("00{n}{unit}")] {
                        let in_range = s.parse::<Duration>().is_ok_and(|d| min <= d && d <= max);
                        assert_eq!(
                            matches(&s),
                            in_range,
                            "{s} against {lo}..={hi} ms: {pattern}"
                        );
                        tried += 1;
                    }
                }
            }
            assert!(tried > 300);
            for s in ["", "s", "1", "1.5s", "-1s", "1 s", "1sec", "0x10s"] {
                assert!(!matches(s), "{s}");
            }
        }
    }

    /// Checks a string against a schema pattern with the same engine `validate` uses.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let validator =
            jsonschema::validator_for(&serde_json::json!({ "type": "string", "pattern": pattern }))
                .unwrap();
        move |s| validator.is_valid(&serde_json::json!(s))
    }
}
