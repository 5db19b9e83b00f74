//! A touchpoint spec as JSON text: how the registry stores it and a plan carries it. Kept as text so
//! that comparing an unchanged spec with the live one is a string comparison, with no parsing; when
//! the texts differ (e.g. a spec written by another version, with its keys in another order) the
//! parsed values are compared instead.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Touchpoint;

/// A spec as JSON text (always a syntactically valid JSON value).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SpecJson(Box<RawValue>);

impl SpecJson {
    /// The canonical text of a touchpoint: its fields in declaration order, defaults filled in.
    pub fn of(tp: &Touchpoint) -> Self {
        // Serializing a touchpoint cannot fail (string keys, finite numbers).
        serde_json::value::to_raw_value(tp).map_or_else(|_| Self::null(), Self)
    }

    /// Wraps stored text, checking that it is JSON.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self)
    }

    /// The text of a JSON value.
    pub fn from_value(value: &Value) -> Self {
        Self::from_text(value.to_string()).unwrap_or_else(|_| Self::null())
    }

    fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The parsed value.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }
}

impl PartialEq for SpecJson {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.value() == other.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_in_another_key_order_are_equal() {
        let a = SpecJson::from_text(r#"{"a":1,"b":[1,2]}"#.into()).unwrap();
        let b = SpecJson::from_text(r#"{ "b": [1, 2], "a": 1 }"#.into()).unwrap();
        let c = SpecJson::from_text(r#"{"a":1,"b":[2,1]}"#.into()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(SpecJson::from_text("{not json".into()).is_err());
    }
}
