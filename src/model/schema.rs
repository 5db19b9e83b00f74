//! The JSON Schema of a touchpoint file, generated from the model types (draft 2020-12). The same
//! generated value is what `validate` checks against, and what `touchctl schema` writes to
//! `schemas/touchpoint.schema.json` for editors (taplo, VS Code Even Better TOML).

use std::path::Path;
use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use crate::model::Touchpoint;

/// Where `touchctl schema` writes by default, relative to the repository root.
pub const DEFAULT_PATH: &str = "schemas/touchpoint.schema.json";

/// The schema as a JSON value, generated once per process.
pub fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let generator = SchemaSettings::draft2020_12().into_generator();
        let mut schema = generator.into_root_schema_for::<Touchpoint>().to_value();
        drop_null(&mut schema);
        document_tags(&mut schema);
        if let Some(obj) = schema.as_object_mut() {
            obj.insert(
                "$id".into(),
                "https://touchctl.dev/schemas/touchpoint.schema.json".into(),
            );
        }
        schema
    })
}

/// TOML has no null: an absent optional field is simply left out. So the `null` that schemars adds
/// for `Option<T>` is removed, which keeps editor completion and error messages about `T` itself.
fn drop_null(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            let is_null = |s: &Value| s.get("type").and_then(Value::as_str) == Some("null");
            let any_of = map.get("anyOf").and_then(Value::as_array);
            if let Some([a, b]) = any_of.map(Vec::as_slice) {
                let keep = match (is_null(a), is_null(b)) {
                    (false, true) => Some(a.clone()),
                    (true, false) => Some(b.clone()),
                    _ => None,
                };
                if let Some(Value::Object(keep)) = keep {
                    map.remove("anyOf");
                    for (k, val) in keep {
                        map.entry(k).or_insert(val);
                    }
                }
            }
            map.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

/// The tag field of an internally tagged enum (e.g. `mode`) has no doc comment of its own; give it
/// a title and the description of the variant it selects, so every field is documented.
fn document_tags(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let variant_doc = map
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                for (name, prop) in props.iter_mut() {
                    let Some(obj) = prop.as_object_mut() else {
                        continue;
                    };
                    let Some(tag) = obj.get("const").and_then(Value::as_str).map(str::to_owned)
                    else {
                        continue;
                    };
                    if !obj.contains_key("title") {
                        let mut title = name.replace('_', " ");
                        if let Some(first) = title.get_mut(..1) {
                            first.make_ascii_uppercase();
                        }
                        obj.insert("title".into(), title.into());
                    }
                    if !obj.contains_key("description") {
                        let doc = variant_doc.as_deref().unwrap_or("Selects this form.");
                        obj.insert("description".into(), format!("`{tag}`: {doc}").into());
                    }
                }
            }
            map.values_mut().for_each(document_tags);
        }
        Value::Array(items) => items.iter_mut().for_each(document_tags),
        _ => {}
    }
}

/// The schema file's exact text: pretty JSON and a final newline.
pub fn render() -> String {
    let mut text = serde_json::to_string_pretty(schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// Whether the file at `path` equals what [`render`] produces now.
pub enum Freshness {
    /// Identical.
    Current,
    /// Differs; the first differing line number is given (1-based).
    Stale(usize),
    /// The file does not exist.
    Missing,
}

/// Compares the committed file with the generated schema.
pub fn check(path: &Path) -> std::io::Result<Freshness> {
    let committed = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Freshness::Missing),
        Err(e) => return Err(e),
    };
    let fresh = render();
    if committed == fresh {
        return Ok(Freshness::Current);
    }
    let line = committed
        .lines()
        .zip(fresh.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| committed.lines().count().min(fresh.lines().count()))
        + 1;
    Ok(Freshness::Stale(line))
}

/// Writes the schema, creating the folder if needed.
pub fn write(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, render())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property, wherever it is, carries a title and a description taken from the doc comments.
    #[test]
    fn every_field_has_title_and_description() {
        fn walk(v: &Value, at: &str, missing: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::Object(props)) = map.get("properties") {
                        for (name, prop) in props {
                            for key in ["title", "description"] {
                                if prop
                                    .get(key)
                                    .and_then(Value::as_str)
                                    .is_none_or(str::is_empty)
                                {
                                    missing.push(format!("{at}/properties/{name}: no {key}"));
                                }
                            }
                        }
                    }
                    for (k, child) in map {
                        walk(child, &format!("{at}/{k}"), missing);
                    }
                }
                Value::Array(items) => {
                    for (i, child) in items.iter().enumerate() {
                        walk(child, &format!("{at}/{i}"), missing);
                    }
                }
                _ => {}
            }
        }
        let mut missing = Vec::new();
        walk(schema(), "", &mut missing);
        assert!(
            missing.is_empty(),
            "fields without docs:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn schema_is_a_valid_draft_2020_12_schema() {
        assert_eq!(
            schema()["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        jsonschema::draft202012::meta::validate(schema()).unwrap();
    }
}
