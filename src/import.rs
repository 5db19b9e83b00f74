//! Brings a live touchpoint under code: writes the TOML file that describes exactly its live spec,
//! with the `#:schema` line, secret references (never values), the fields in their canonical order
//! (common fields, then the kind's, plain values before tables) and defaults left out.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::load::{Desired, LoadError, Source, did_you_mean, load_file_alone};
use crate::model::{SECRET_FIELDS, SecretPolicy, SpecJson, Touchpoint};
use crate::registry::{Live, Registry};

/// Why a touchpoint could not be written as a file.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The registry holds a spec this touchctl cannot read as a touchpoint.
    #[error("the live spec of `{id}` is not a touchpoint this touchctl can read: {message}")]
    Unreadable {
        /// The touchpoint.
        id: String,
        /// Why.
        message: String,
    },
    /// The file exists already.
    #[error("{0} already exists; import does not overwrite files: move it away or pass --out")]
    Exists(PathBuf),
    /// The file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The written file does not load back as a touchpoint.
    #[error(
        "the written file {path} does not read back ({message}); this is a touchctl bug, please report it"
    )]
    ReadBack {
        /// The file.
        path: PathBuf,
        /// The first problem.
        message: String,
    },
}

/// The live touchpoints to import: those named in `ids`, or with `all` every one that no file
/// describes. Also returns why a named one cannot be imported (described by a file already, or not
/// live, with a did-you-mean). `registry` names the registry in those messages.
pub fn select<'a>(
    live: &'a [Live],
    desired: &Desired,
    ids: &[String],
    all: bool,
    registry: &str,
) -> (Vec<&'a Live>, Vec<String>) {
    let described: HashMap<&str, &str> = desired
        .touchpoints
        .iter()
        .map(|l| (l.touchpoint.id(), l.file.as_str()))
        .collect();
    if all {
        let targets = live
            .iter()
            .filter(|l| !described.contains_key(l.id.as_str()))
            .collect();
        return (targets, Vec::new());
    }
    let mut problems = Vec::new();
    let mut targets = Vec::new();
    for id in ids {
        if let Some(file) = described.get(id.as_str()) {
            problems.push(format!(
                "`{id}` is already described by {file}: edit that file instead"
            ));
            continue;
        }
        match live.iter().find(|l| &l.id == id) {
            Some(l) => targets.push(l),
            None => problems.push(match did_you_mean(id, live.iter().map(|l| l.id.as_str())) {
                Some(near) => {
                    format!("no live touchpoint `{id}` in {registry} (did you mean `{near}`?)")
                }
                None => format!(
                    "no live touchpoint `{id}` in {registry}: `touchctl plan` lists the live ones"
                ),
            }),
        }
    }
    (targets, problems)
}

/// Where an imported touchpoint goes: back to the file it was applied from, when that was under
/// `dir` and is free; otherwise `<dir>/<id>.toml`.
pub fn default_path(dir: &Path, live: &Live) -> PathBuf {
    live.source
        .file
        .as_deref()
        .map(Path::new)
        .filter(|f| {
            f.extension().is_some_and(|x| x == "toml")
                && !f.exists()
                && !f.components().any(|c| matches!(c, Component::ParentDir))
                && normalize(f).starts_with(normalize(dir))
        })
        .map_or_else(|| dir.join(format!("{}.toml", live.id)), Path::to_path_buf)
}

/// Writes the file of `live` at `path` (never over an existing file), then reads it back as plan
/// would: the spec must come back the same, and every secret reference should resolve to the value
/// the registry holds (by fingerprint), read as `policy` allows. Returns what the user should know:
/// references rewritten, secrets that do not resolve here or resolve to another value.
pub fn write(
    live: &Live,
    path: &Path,
    schema: &Path,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Vec<String>, ImportError> {
    let Rendered { text, rebased } = render(live, path, schema)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ImportError::Exists(path.to_path_buf()),
            _ => io(path)(e),
        })?;
    file.write_all(text.as_bytes()).map_err(io(path))?;
    let source = Source {
        name: path.display().to_string(),
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        text,
    };
    // The file alone: the platform an Official Account names may be in another file, or imported next.
    let back = load_file_alone(source).map_err(|e| ImportError::ReadBack {
        path: path.to_path_buf(),
        message: match e {
            LoadError::Invalid(d) => d.first().map(ToString::to_string).unwrap_or_default(),
            other => other.to_string(),
        },
    })?;
    let mut notes = rebased;
    if notes.is_empty() && back.touchpoints.first().map(|l| &l.spec) != Some(live.spec()) {
        notes.push(
            "the file does not reproduce the live spec exactly; `touchctl plan` will show the difference"
                .to_string(),
        );
    }
    match crate::plan::inputs::fingerprints(&back, registry, policy) {
        Ok(fps) => {
            for (field, fp) in fps.first().into_iter().flatten() {
                if live.fingerprints.get(field) != Some(fp) {
                    notes.push(format!(
                        "`{field}` resolves here to another value than the live one (by fingerprint); `touchctl plan` will show it as changed"
                    ));
                }
            }
        }
        Err(e) => notes.push(format!(
            "{e}\n  `touchctl plan` needs these secrets; provide them before planning"
        )),
    }
    Ok(notes)
}

/// A JSON value that keeps its object keys in the order they were written: the canonical spec text
/// lists fields in declaration order, and the file should too.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    Scalar(Value),
    Array(Vec<Node>),
    Object(Vec<(String, Node)>),
}

impl Node {
    fn to_value(&self) -> Value {
        match self {
            Node::Scalar(v) => v.clone(),
            Node::Array(items) => Value::Array(items.iter().map(Node::to_value).collect()),
            Node::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_value()))
                    .collect(),
            ),
        }
    }

    /// The entries of the object at `path` (object keys and array indexes), if it is one.
    fn object_at(&mut self, path: &[Seg]) -> Option<&mut Vec<(String, Node)>> {
        let mut node = self;
        for seg in path {
            node = match (node, seg) {
                (Node::Object(entries), Seg::Key(k)) => {
                    &mut entries.iter_mut().find(|(key, _)| key == k)?.1
                }
                (Node::Array(items), Seg::Index(i)) => items.get_mut(*i)?,
                _ => return None,
            };
        }
        match node {
            Node::Object(entries) => Some(entries),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Scalar(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Scalar(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Scalar(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Scalar(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Node>()? {
                    entries.push((k, v));
                }
                Ok(Node::Object(entries))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Every object entry of `node`, parents before children, as paths.
fn entry_paths(node: &Node, prefix: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    match node {
        Node::Object(entries) => {
            for (k, v) in entries {
                prefix.push(Seg::Key(k.clone()));
                out.push(prefix.clone());
                entry_paths(v, prefix, out);
                prefix.pop();
            }
        }
        Node::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(Seg::Index(i));
                entry_paths(v, prefix, out);
                prefix.pop();
            }
        }
        Node::Scalar(_) => {}
    }
}

/// The canonical spec of a JSON document, if it is a readable touchpoint.
fn canonical(doc: Value) -> Option<Value> {
    Touchpoint::from_json(doc)
        .ok()
        .map(|tp| SpecJson::of(&tp).value())
}

/// Drops every entry whose absence changes nothing: the touchpoint read back without it has the
/// same canonical spec, so it only restated a default (`enabled = true`, an empty table, ...).
fn drop_defaults(root: &mut Node) {
    let Some(target) = canonical(root.to_value()) else {
        return;
    };
    let mut paths = Vec::new();
    entry_paths(root, &mut Vec::new(), &mut paths);
    for path in paths {
        let Some((Seg::Key(key), parent)) = path.split_last() else {
            continue;
        };
        if matches!(key.as_str(), "id" | "kind") {
            continue;
        }
        let mut trial = root.clone();
        let Some(entries) = trial.object_at(parent) else {
            // An ancestor was dropped already.
            continue;
        };
        let before = entries.len();
        entries.retain(|(k, _)| k != key);
        if entries.len() != before && canonical(trial.to_value()).as_ref() == Some(&target) {
            *root = trial;
        }
    }
}

/// Lexically resolves `.` and `..` (no file system access).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Rewrites relative `{ file = ".." }` references, which resolve against the folder of the file
/// the touchpoint was applied from, so that they point at the same secret files from `new_dir`.
/// Returns a note for each reference rewritten.
fn rebase_file_refs(root: &mut Node, old_dir: &Path, new_dir: &Path) -> Vec<String> {
    let mut notes = Vec::new();
    let cwd = std::env::current_dir().unwrap_or_default();
    let (old_dir, new_dir) = (normalize(&cwd.join(old_dir)), normalize(&cwd.join(new_dir)));
    if old_dir == new_dir {
        return notes;
    }
    for field in SECRET_FIELDS {
        let path: Vec<Seg> = field.split('.').map(|k| Seg::Key(k.to_string())).collect();
        let Some(entries) = root.object_at(&path) else {
            continue;
        };
        for (k, v) in entries.iter_mut() {
            if let (true, Node::Scalar(Value::String(file))) = (k == "file", &v)
                && Path::new(file).is_relative()
            {
                let target = normalize(&old_dir.join(file));
                if let Some(rel) = pathdiff::diff_paths(&target, &new_dir) {
                    let rel = rel.to_string_lossy().into_owned();
                    if &rel != file {
                        notes.push(format!(
                            "`{field}`: the file reference \"{file}\" was rewritten to \"{rel}\", which names the same file from the new location; plan shows this as a changed reference (value unchanged)"
                        ));
                        *v = Node::Scalar(Value::String(rel));
                    }
                }
            }
        }
    }
    notes
}

fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// A value written inline (`"text"`, `[1, 2]`, `{ env = "X" }`).
fn inline(node: &Node) -> String {
    match node {
        Node::Scalar(Value::String(s)) => toml::Value::String(s.clone()).to_string(),
        Node::Scalar(Value::Bool(b)) => b.to_string(),
        Node::Scalar(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => toml::Value::Float(f).to_string(),
            (None, None) => n.to_string(),
        },
        Node::Scalar(other) => other.to_string(),
        Node::Array(items) => {
            let parts: Vec<String> = items.iter().map(inline).collect();
            format!("[{}]", parts.join(", "))
        }
        Node::Object(entries) => {
            let parts: Vec<String> = entries
                .iter()
                .filter(|(_, v)| !is_null(v))
                .map(|(k, v)| format!("{} = {}", key(k), inline(v)))
                .collect();
            if parts.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", parts.join(", "))
            }
        }
    }
}

fn is_null(node: &Node) -> bool {
    matches!(node, Node::Scalar(Value::Null))
}

fn is_table_array(node: &Node) -> bool {
    matches!(node, Node::Array(items) if !items.is_empty() && items.iter().all(|i| matches!(i, Node::Object(_))))
}

/// `key = value` lines for the plain entries of a table (nested tables inline).
fn plain_lines(out: &mut String, entries: &[(String, Node)]) {
    for (k, v) in entries.iter().filter(|(_, v)| !is_null(v)) {
        let _ = writeln!(out, "{} = {}", key(k), inline(v));
    }
}

/// The TOML text of a spec: top-level plain values first (secret references inline), then each
/// table as `[section]`, then each array of tables as `[[section]]`, all in the spec's field order.
fn to_toml(root: &Node) -> String {
    let Node::Object(entries) = root else {
        return String::new();
    };
    let is_section =
        |k: &str, v: &Node| matches!(v, Node::Object(_)) && !SECRET_FIELDS.contains(&k);
    let mut out = String::new();
    let plain: Vec<(String, Node)> = entries
        .iter()
        .filter(|(k, v)| !is_section(k, v) && !is_table_array(v))
        .cloned()
        .collect();
    plain_lines(&mut out, &plain);
    for (k, v) in entries.iter().filter(|(k, v)| is_section(k, v)) {
        if let Node::Object(inner) = v {
            let _ = writeln!(out, "\n[{}]", key(k));
            plain_lines(&mut out, inner);
        }
    }
    for (k, v) in entries.iter().filter(|(_, v)| is_table_array(v)) {
        if let Node::Array(items) = v {
            for item in items {
                if let Node::Object(inner) = item {
                    let _ = writeln!(out, "\n[[{}]]", key(k));
                    plain_lines(&mut out, inner);
                }
            }
        }
    }
    out
}

/// A touchpoint file written by [`render`].
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The TOML text.
    pub text: String,
    /// Secret file references that had to be rewritten to name the same file from the new
    /// location (so the file's spec differs from the live one in those references only).
    pub rebased: Vec<String>,
}

/// The file text for `live`, to be written at `file` (relative paths are taken from the current
/// folder). `schema` is the schema file the `#:schema` line points at.
pub fn render(live: &Live, file: &Path, schema: &Path) -> Result<Rendered, ImportError> {
    let unreadable = |message: String| ImportError::Unreadable {
        id: live.id.clone(),
        message,
    };
    let spec = live.spec();
    let mut root: Node =
        serde_json::from_str(spec.as_str()).map_err(|e| unreadable(e.to_string()))?;
    Touchpoint::from_json(root.to_value()).map_err(|e| unreadable(e.to_string()))?;
    drop_defaults(&mut root);
    let new_dir = file.parent().unwrap_or(Path::new(""));
    let mut rebased = Vec::new();
    if let Some(old_file) = &live.source.file {
        let old_dir = Path::new(old_file).parent().unwrap_or(Path::new(""));
        rebased = rebase_file_refs(&mut root, old_dir, new_dir);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    let schema_rel =
        pathdiff::diff_paths(normalize(&cwd.join(schema)), normalize(&cwd.join(new_dir)))
            .unwrap_or_else(|| schema.to_path_buf());
    let mut out = format!("#:schema {}\n", schema_rel.display());
    let _ = write!(
        out,
        "# Imported from the registry by `touchctl import`: generation {}, applied {} by {}",
        live.generation, live.applied_at, live.applied_by
    );
    if let Some(commit) = &live.source.commit {
        let short: String = commit.chars().take(10).collect();
        let _ = write!(out, " from commit {short}");
    }
    out.push_str(".\n");
    out.push_str(&to_toml(&root));
    Ok(Rendered { text: out, rebased })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_field_order_and_puts_tables_last() {
        let node: Node = serde_json::from_str(
            r#"{"id":"a","retry":{"attempts":3},"name":"x","auth_token":{"env":"T"},"template_params":[{"name":"t","type":"string"}],"url":"https://h"}"#,
        )
        .unwrap();
        let text = to_toml(&node);
        assert_eq!(
            text,
            "id = \"a\"\nname = \"x\"\nauth_token = { env = \"T\" }\nurl = \"https://h\"\n\n[retry]\nattempts = 3\n\n[[template_params]]\nname = \"t\"\ntype = \"string\"\n"
        );
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["retry"]["attempts"].as_integer(), Some(3));
    }

    #[test]
    fn odd_keys_and_strings_are_quoted() {
        let node: Node = serde_json::from_str(r#"{"labels":{"team name":"a \"b\"\nc"}}"#).unwrap();
        let text = to_toml(&node);
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["labels"]["team name"].as_str(), Some("a \"b\"\nc"));
    }

    #[test]
    fn file_refs_follow_the_file() {
        let mut node: Node =
            serde_json::from_str(r#"{"auth_token":{"file":"../secrets/t"},"secret":{"env":"E"}}"#)
                .unwrap();
        let notes = rebase_file_refs(&mut node, Path::new("tp/custom"), Path::new("tp"));
        assert_eq!(notes.len(), 1);
        assert_eq!(
            node.to_value(),
            serde_json::json!({"auth_token": {"file": "secrets/t"}, "secret": {"env": "E"}})
        );
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("a/./b/../c")), PathBuf::from("a/c"));
        assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
    }
}
