//! Turns JSON Schema validation errors into diagnostics a person can act on: the field named as it
//! is written in TOML, the allowed values listed, a "did you mean" for misspelt keys, and for the
//! `oneOf` of kinds (or of auth modes) the errors of the branch the file chose rather than a
//! "matches none of the schemas".

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::diagnostic::{Issue, Target};
use super::toml_json::{Segment, dotted};
use crate::model::{
    DURATION_PATTERN, ID_PATTERN, NAME_PATTERN, RATE_PATTERN, SOURCE_PATTERN,
    WECHAT_APP_ID_PATTERN, duration_range, is_duration_format,
};

/// Validates `doc` against the touchpoint schema and explains every error.
pub(crate) fn check(validator: &Validator, schema: &Value, doc: &Value) -> Vec<Issue> {
    if validator.is_valid(doc) {
        return Vec::new();
    }
    let mut issues = Vec::new();
    for err in validator.iter_errors(doc) {
        explain(&err, schema, doc, &mut issues);
    }
    issues
}

fn segments(loc: &Location) -> Vec<Segment> {
    loc.iter()
        .map(|s| match s {
            LocationSegment::Property(p) => Segment::Key(p.into_owned()),
            LocationSegment::Index(i) => Segment::Index(i),
        })
        .collect()
}

fn instance_at<'v>(doc: &'v Value, at: &[Segment]) -> Option<&'v Value> {
    at.iter().try_fold(doc, |v, seg| match seg {
        Segment::Key(k) => v.get(k),
        Segment::Index(i) => v.get(i),
    })
}

/// The schema node holding the keyword that failed (the parent of `schema_path`).
fn schema_node<'s>(schema: &'s Value, schema_path: &Location) -> Option<&'s Value> {
    let path = schema_path.as_str();
    let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
    schema.pointer(parent)
}

fn field(at: &[Segment]) -> String {
    if at.is_empty() {
        "the file".to_string()
    } else {
        format!("`{}`", dotted(at))
    }
}

/// A short rendering of a value for messages; long strings are cut.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 40 => {
            format!("\"{}…\"", s.chars().take(40).collect::<String>())
        }
        Value::Object(_) => "a table".into(),
        Value::Array(_) => "an array".into(),
        other => other.to_string(),
    }
}

fn toml_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "a table",
    }
}

fn json_type_name(t: &str) -> &'static str {
    match t {
        "boolean" => "a boolean (true or false)",
        "integer" => "an integer",
        "number" => "a number",
        "string" => "a string",
        "array" => "an array",
        "object" => "a table",
        _ => "a value of another type",
    }
}

/// The closest candidate to a misspelt word, if one is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

fn list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn explain(err: &ValidationError<'_>, schema: &Value, doc: &Value, out: &mut Vec<Issue>) {
    let at = segments(err.instance_path());
    let schema_path = err.schema_path().as_str();
    let value = instance_at(doc, &at).unwrap_or(&Value::Null);
    let mut push = |code, target, message: String| {
        out.push(Issue {
            code,
            at: at.clone(),
            target,
            message,
        })
    };

    if schema_path.starts_with("/$defs/SecretRef") {
        explain_secret(&at, value, out);
        return;
    }

    match err.kind() {
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            let node = schema_node(schema, err.schema_path());
            let alternatives = node
                .and_then(|n| n.get("oneOf").or_else(|| n.get("anyOf")))
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            explain_alternatives(&at, value, context, alternatives, schema, doc, out);
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let allowed: Vec<String> = schema_node(schema, err.schema_path())
                .and_then(|n| n.get("properties"))
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            for name in unexpected {
                let mut key_at = at.clone();
                key_at.push(Segment::Key(name.clone()));
                let place = match (at.is_empty(), doc.get("kind").and_then(Value::as_str)) {
                    (false, _) => format!(" in `{}`", dotted(&at)),
                    (true, Some(kind)) => format!(" for kind `{kind}`"),
                    (true, None) => String::new(),
                };
                let hint = match did_you_mean(name, allowed.iter().map(String::as_str)) {
                    Some(s) => format!("; did you mean `{s}`?"),
                    None if allowed.len() <= 12 => format!("; expected one of {}", list(&allowed)),
                    None => "; the README lists the fields of each kind".into(),
                };
                out.push(Issue {
                    code: "unknown-field",
                    at: key_at,
                    target: Target::Key,
                    message: format!("unknown field `{name}`{place}{hint}"),
                });
            }
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let place = if at.is_empty() {
                String::new()
            } else {
                format!(" in `{}`", dotted(&at))
            };
            push(
                "missing-field",
                Target::Table,
                format!("missing required field `{name}`{place}"),
            );
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => json_type_name(t.as_str()).to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| json_type_name(t.as_str()))
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            let hint = match schema_node(schema, err.schema_path())
                .and_then(|n| n.get("pattern"))
                .and_then(Value::as_str)
            {
                Some(p) if p == DURATION_PATTERN => {
                    " holding a duration such as \"10s\", \"2m\" or \"1d\"".to_string()
                }
                Some(p) => match duration_range(p) {
                    Some((lo, hi)) => {
                        format!(" holding a duration from {lo} to {hi}")
                    }
                    None if p == RATE_PATTERN => " holding a rate such as \"50/s\"".to_string(),
                    None => String::new(),
                },
                None => String::new(),
            };
            push(
                "type",
                Target::Value,
                format!(
                    "{} must be {expected}{hint}, found {}",
                    field(&at),
                    toml_type(value)
                ),
            );
        }
        ValidationErrorKind::Minimum { .. }
        | ValidationErrorKind::Maximum { .. }
        | ValidationErrorKind::ExclusiveMinimum { .. }
        | ValidationErrorKind::ExclusiveMaximum { .. } => {
            let node = schema_node(schema, err.schema_path());
            let min = node.and_then(|n| n.get("minimum"));
            let max = node.and_then(|n| n.get("maximum"));
            let range = match (min, max) {
                (Some(lo), Some(hi)) => format!("between {lo} and {hi}"),
                (Some(lo), None) => format!("at least {lo}"),
                (None, Some(hi)) => format!("at most {hi}"),
                (None, None) => "in range".into(),
            };
            push(
                "out-of-range",
                Target::Value,
                format!("{} must be {range}, found {}", field(&at), show(value)),
            );
        }
        ValidationErrorKind::MinLength { limit } => {
            let message = if *limit == 1 {
                format!("{} must not be empty", field(&at))
            } else {
                format!("{} must be at least {limit} characters long", field(&at))
            };
            push("out-of-range", Target::Value, message);
        }
        ValidationErrorKind::MaxLength { limit } => push(
            "out-of-range",
            Target::Value,
            format!("{} must be at most {limit} characters long", field(&at)),
        ),
        ValidationErrorKind::MinItems { limit } => push(
            "out-of-range",
            Target::Value,
            format!("{} must have at least {limit} item(s)", field(&at)),
        ),
        ValidationErrorKind::MaxItems { limit } => push(
            "out-of-range",
            Target::Value,
            format!("{} must have at most {limit} item(s)", field(&at)),
        ),
        ValidationErrorKind::Enum { options } => {
            let allowed: Vec<String> = options
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            push(
                "invalid-value",
                Target::Value,
                enum_message(&at, value, &allowed),
            );
        }
        ValidationErrorKind::Constant { expected_value } => {
            let allowed: Vec<String> = expected_value
                .as_str()
                .map(String::from)
                .into_iter()
                .collect();
            push(
                "invalid-value",
                Target::Value,
                enum_message(&at, value, &allowed),
            );
        }
        ValidationErrorKind::Pattern { pattern } => match duration_range(pattern) {
            // Written as a duration, but too short or too long for this field.
            Some((lo, hi)) if value.as_str().is_some_and(is_duration_format) => push(
                "out-of-range",
                Target::Value,
                format!(
                    "{} must be between {lo} and {hi}, found {}",
                    field(&at),
                    show(value)
                ),
            ),
            Some((lo, hi)) => push(
                "invalid-format",
                Target::Value,
                format!(
                    "{} must be a duration from {lo} to {hi}: a whole number and a unit (ms, s, m, h or d), found {}",
                    field(&at),
                    show(value)
                ),
            ),
            None => push(
                "invalid-format",
                Target::Value,
                format!(
                    "{} {}, found {}",
                    field(&at),
                    describe_pattern(pattern),
                    show(value)
                ),
            ),
        },
        other => push(
            "invalid-value",
            Target::Value,
            format!(
                "{} is not valid ({} check failed)",
                field(&at),
                other.keyword()
            ),
        ),
    }
}

fn enum_message(at: &[Segment], value: &Value, allowed: &[String]) -> String {
    let hint = value
        .as_str()
        .and_then(|v| did_you_mean(v, allowed.iter().map(String::as_str)))
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default();
    format!(
        "{} must be one of {}, found {}{hint}",
        field(at),
        list(allowed),
        show(value)
    )
}

/// What a schema pattern asks for, in words.
fn describe_pattern(pattern: &str) -> String {
    match pattern {
        p if p == ID_PATTERN => "must start with a lowercase letter and hold only lowercase letters, digits, `-` and `_` (at most 63 characters)".into(),
        p if p == DURATION_PATTERN => "must be a duration: a whole number and a unit, e.g. \"500ms\", \"10s\", \"2m\", \"1h\"".into(),
        p if p == RATE_PATTERN => "must be a rate: requests per unit, e.g. \"50/s\", \"600/m\"".into(),
        p if p == WECHAT_APP_ID_PATTERN => "must be a WeChat app id: `wx` and 16 lowercase hex digits".into(),
        p if p == SOURCE_PATTERN => "must name a user attribute as \"user.<attribute>\", e.g. \"user.phone\"".into(),
        p if p == NAME_PATTERN => "must be a name of letters, digits and `_`, not starting with a digit".into(),
        p if p.starts_with("^w[wx]") => "must be a WeCom corp id: `ww` and 16 lowercase hex digits".into(),
        p => format!("must match the pattern {p}"),
    }
}

/// A secret field holds something other than `{ env = ".." }` or `{ file = ".." }`. The value is never
/// echoed: if it is a literal, it is a secret.
fn explain_secret(at: &[Segment], value: &Value, out: &mut Vec<Issue>) {
    let (code, target, message) = match value {
        Value::String(_) => (
            "literal-secret",
            Target::Value,
            format!(
                "{} is a secret and must not be written in the file: use {{ env = \"NAME\" }} or {{ file = \"path\" }}",
                field(at)
            ),
        ),
        Value::Object(map) => {
            let keys: Vec<&String> = map.keys().collect();
            let has_env = map.contains_key("env");
            let has_file = map.contains_key("file");
            match (has_env, has_file) {
                (true, true) => (
                    "invalid-secret-ref",
                    Target::Value,
                    format!("{} names both `env` and `file`: keep one", field(at)),
                ),
                (false, false) => {
                    let first = keys.first().map(|k| k.as_str()).unwrap_or("");
                    let hint = match did_you_mean(first, ["env", "file"]) {
                        Some(s) => format!("; found `{first}`: did you mean `{s}`?"),
                        None if keys.is_empty() => String::new(),
                        None => format!("; found `{first}`"),
                    };
                    (
                        "invalid-secret-ref",
                        Target::Value,
                        format!(
                            "{} must be {{ env = \"NAME\" }} or {{ file = \"path\" }}{hint}",
                            field(at)
                        ),
                    )
                }
                _ => {
                    let key = if has_env { "env" } else { "file" };
                    let extra: Vec<String> = keys
                        .iter()
                        .filter(|k| k.as_str() != key)
                        .map(|k| k.to_string())
                        .collect();
                    let inner = map.get(key).unwrap_or(&Value::Null);
                    let message = if !extra.is_empty() {
                        format!(
                            "{} has unknown key(s) {}: a secret reference holds only `{key}`",
                            field(at),
                            list(&extra)
                        )
                    } else if !inner.is_string() {
                        format!(
                            "`{}.{key}` must be a string, found {}",
                            dotted(at),
                            toml_type(inner)
                        )
                    } else if key == "env" {
                        // The value is not shown (it may be a pasted secret); a `$` is worth naming.
                        let hint = if inner.as_str().is_some_and(|v| v.starts_with('$')) {
                            ": drop the leading `$`"
                        } else {
                            ""
                        };
                        format!(
                            "`{}.env` must be an environment variable name (letters, digits and `_`, not starting with a digit){hint}",
                            dotted(at)
                        )
                    } else {
                        format!("`{}.file` must not be empty", dotted(at))
                    };
                    let mut inner_at = at.to_vec();
                    if extra.is_empty() {
                        inner_at.push(Segment::Key(key.to_string()));
                    }
                    out.push(Issue {
                        code: "invalid-secret-ref",
                        at: inner_at,
                        target: Target::Value,
                        message,
                    });
                    return;
                }
            }
        }
        other => (
            "invalid-secret-ref",
            Target::Value,
            format!(
                "{} must be {{ env = \"NAME\" }} or {{ file = \"path\" }}, found {}",
                field(at),
                toml_type(other)
            ),
        ),
    };
    out.push(Issue {
        code,
        at: at.to_vec(),
        target,
        message,
    });
}

/// A value matched none of several alternatives. Tagged alternatives (by `kind` or `mode`) are
/// resolved to the branch the value names; untagged ones to the branch of the right type. That
/// branch's own errors are reported; otherwise the tag or type itself is wrong.
fn explain_alternatives(
    at: &[Segment],
    value: &Value,
    branches: &[Vec<ValidationError<'static>>],
    alternatives: &[Value],
    schema: &Value,
    doc: &Value,
    out: &mut Vec<Issue>,
) {
    let depth = at.len();
    // The values a tag may take, read from the alternatives themselves.
    let tag_values_of = |tag: &str| -> Vec<String> {
        alternatives
            .iter()
            .filter_map(|alt| alt.pointer(&format!("/properties/{tag}/const"))?.as_str())
            .map(String::from)
            .collect()
    };
    let tag_of = |e: &ValidationError<'_>| -> Option<(String, Option<String>)> {
        let path = segments(e.instance_path());
        match e.kind() {
            ValidationErrorKind::Constant { expected_value } if path.len() == depth + 1 => {
                match path.last() {
                    Some(Segment::Key(k)) => {
                        Some((k.clone(), expected_value.as_str().map(String::from)))
                    }
                    _ => None,
                }
            }
            ValidationErrorKind::Required { property } if path.len() == depth => {
                let p = property.as_str()?;
                (p == "kind" || p == "mode").then(|| (p.to_string(), None))
            }
            _ => None,
        }
    };
    let mut tag_name: Option<String> = None;
    let mut tag_values: Vec<String> = Vec::new();
    let mut untagged_branches = Vec::new();
    for (i, errs) in branches.iter().enumerate() {
        let mismatch: Vec<_> = errs.iter().filter_map(tag_of).collect();
        if mismatch.is_empty() {
            untagged_branches.push(i);
        }
        for (name, expected) in mismatch {
            tag_name.get_or_insert(name);
            tag_values.extend(expected);
        }
    }

    if let Some(tag) = tag_name {
        let from_schema = tag_values_of(&tag);
        if !from_schema.is_empty() {
            tag_values = from_schema;
        }
        if let [only] = untagged_branches.as_slice() {
            for e in &branches[*only] {
                explain(e, schema, doc, out);
            }
            return;
        }
        // No branch chosen: still report what every branch objects to (the common fields).
        let signature = |e: &ValidationError<'_>| {
            (
                e.instance_path().as_str().to_string(),
                e.kind().keyword().to_string(),
            )
        };
        let shared = |e: &ValidationError<'_>| {
            !matches!(
                e.kind(),
                ValidationErrorKind::AdditionalProperties { .. }
                    | ValidationErrorKind::Required { .. }
                    | ValidationErrorKind::Constant { .. }
            ) && branches[1..]
                .iter()
                .all(|errs| errs.iter().any(|o| signature(o) == signature(e)))
        };
        if let Some(first) = branches.first() {
            for e in first.iter().filter(|e| shared(e)) {
                explain(e, schema, doc, out);
            }
        }
        let mut tag_at = at.to_vec();
        tag_at.push(Segment::Key(tag.clone()));
        match value.get(&tag) {
            Some(found) => out.push(Issue {
                code: "invalid-value",
                message: enum_message(&tag_at, found, &tag_values),
                at: tag_at,
                target: Target::Value,
            }),
            None => out.push(Issue {
                code: "missing-field",
                at: at.to_vec(),
                target: Target::Table,
                message: format!(
                    "missing required field `{tag}` (one of {})",
                    list(&tag_values)
                ),
            }),
        }
        return;
    }

    // An enum whose values carry their own docs: every branch is a `const`.
    let consts: Vec<String> = branches
        .iter()
        .filter_map(|errs| {
            errs.iter().find_map(|e| match e.kind() {
                ValidationErrorKind::Constant { expected_value }
                    if segments(e.instance_path()).len() == depth =>
                {
                    expected_value.as_str().map(String::from)
                }
                _ => None,
            })
        })
        .collect();
    if !consts.is_empty() && consts.len() == branches.len() {
        out.push(Issue {
            code: "invalid-value",
            at: at.to_vec(),
            target: Target::Value,
            message: enum_message(at, value, &consts),
        });
        return;
    }

    // Untagged: keep the branches whose type matches the value.
    let type_ok: Vec<usize> = branches
        .iter()
        .enumerate()
        .filter(|(_, errs)| {
            !errs.iter().any(|e| {
                matches!(e.kind(), ValidationErrorKind::Type { .. })
                    && segments(e.instance_path()).len() == depth
            })
        })
        .map(|(i, _)| i)
        .collect();
    if let [only] = type_ok.as_slice() {
        for e in &branches[*only] {
            explain(e, schema, doc, out);
        }
        return;
    }
    let mut expected: Vec<&'static str> = Vec::new();
    for e in branches.iter().flatten() {
        if let ValidationErrorKind::Type {
            kind: TypeKind::Single(t),
        } = e.kind()
        {
            let name = json_type_name(t.as_str());
            if segments(e.instance_path()).len() == depth && !expected.contains(&name) {
                expected.push(name);
            }
        }
    }
    let in_params =
        matches!(at.iter().rev().nth(1), Some(Segment::Key(k)) if k == "dynamic_params");
    let hint = if in_params {
        " (\"user.<attribute>\", or { from = \"user.<attribute>\", optional = true })"
    } else {
        ""
    };
    let message = if expected.is_empty() {
        format!(
            "{} has the wrong form, found {}",
            field(at),
            toml_type(value)
        )
    } else {
        format!(
            "{} must be {}{hint}, found {}",
            field(at),
            expected.join(" or "),
            toml_type(value)
        )
    };
    out.push(Issue {
        code: "type",
        at: at.to_vec(),
        target: Target::Value,
        message,
    });
}
