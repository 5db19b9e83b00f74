//! Bridges the spanned TOML tree and the JSON value the schema validates: converts one to the other
//! and finds the source span of any JSON location afterwards, so diagnostics point into the file.

use std::ops::Range;

use serde_json::{Map, Number, Value};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a location inside a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// Renders a location as a reader would write it: `templates[0].mini_program.app_id`.
pub fn dotted(at: &[Segment]) -> String {
    let mut out = String::new();
    for seg in at {
        match seg {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Converts a parsed TOML table to JSON. Datetimes become strings (the schema has none) and
/// integers beyond 64 bits become their text, which the schema then refuses with a type error.
pub fn table_to_json(table: &DeTable<'_>) -> Value {
    // Collecting builds the map from the sorted entries in one go, cheaper than one insert (and
    // search) per key. Keys are unique: the parser reports duplicates.
    let map: Map<String, Value> = table
        .iter()
        .map(|(key, value)| (key.get_ref().to_string(), value_to_json(value.get_ref())))
        .collect();
    Value::Object(map)
}

fn value_to_json(value: &DeValue<'_>) -> Value {
    match value {
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let text = i.as_str().replace('_', "");
            if let Ok(n) = i64::from_str_radix(&text, i.radix()) {
                Value::Number(n.into())
            } else if let Ok(n) = u64::from_str_radix(&text, i.radix()) {
                Value::Number(n.into())
            } else {
                Value::String(i.to_string())
            }
        }
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        DeValue::Boolean(b) => Value::Bool(*b),
        DeValue::Datetime(d) => Value::String(d.to_string()),
        DeValue::Array(items) => {
            Value::Array(items.iter().map(|v| value_to_json(v.get_ref())).collect())
        }
        DeValue::Table(t) => table_to_json(t),
    }
}

/// Where a location sits in the source: the key that names it (absent for array items and the
/// root) and the value itself.
#[derive(Clone, Debug)]
pub struct Located {
    /// Span of the key, if the location is a table entry.
    pub key: Option<Range<usize>>,
    /// Span of the value.
    pub value: Range<usize>,
}

/// Finds the spans of the location `at`, or of its nearest existing ancestor.
pub fn locate(root: &Spanned<DeTable<'_>>, at: &[Segment]) -> Located {
    let mut found = Located {
        key: None,
        value: 0..0,
    };
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for seg in at {
        let next = match (seg, table, array) {
            (Segment::Key(k), Some(t), _) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, value)| (Some(key.span()), value)),
            (Segment::Index(i), _, Some(items)) => items.get(*i).map(|v| (None, v)),
            _ => None,
        };
        let Some((key, value)) = next else { break };
        found = Located {
            key,
            value: value.span(),
        };
        table = None;
        array = None;
        match value.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(items) => array = Some(&items[..]),
            _ => {}
        }
    }
    found
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_and_locates() {
        let text = "id = \"a\"\n[retry]\nattempts = 0x10\n[[templates]]\nid = \"t\"\nurl = \"x\"\n";
        let root = DeTable::parse(text).unwrap();
        let json = table_to_json(root.get_ref());
        assert_eq!(json["retry"]["attempts"], 16);
        assert_eq!(json["templates"][0]["url"], "x");
        let at = [
            Segment::Key("templates".into()),
            Segment::Index(0),
            Segment::Key("url".into()),
        ];
        let loc = locate(&root, &at);
        assert_eq!(line_col(text, loc.value.start), (6, 7));
        assert_eq!(line_col(text, loc.key.unwrap().start), (6, 1));
        assert_eq!(dotted(&at), "templates[0].url");
    }

    #[test]
    fn columns_count_characters() {
        let text = "name = \"短信\" # x\nbad";
        assert_eq!(line_col(text, text.find('#').unwrap()), (1, 13));
        assert_eq!(line_col(text, text.len()), (2, 4));
    }
}
