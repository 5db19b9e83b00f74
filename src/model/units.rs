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

    /// Checks a string against a schema pattern with the same engine `validate` uses.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let validator =
            jsonschema::validator_for(&serde_json::json!({ "type": "string", "pattern": pattern }))
                .unwrap();
        move |s| validator.is_valid(&serde_json::json!(s))
    }
}
