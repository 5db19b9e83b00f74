//! Reads the desired state: every `*.toml` file under a folder (or given as text, e.g. from a git
//! revision), checked against the schema and by the cross-field and cross-file rules. All problems
//! are collected at once as [`Diagnostic`]s; a tree with any of them yields none of its touchpoints.

mod checks;
mod diagnostic;
mod schema_errors;
mod toml_json;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;
use serde_json::Value;
use toml::de::DeTable;

pub use diagnostic::Diagnostic;
use diagnostic::{Issue, Target};
pub use toml_json::Segment;
use toml_json::{line_col, locate, table_to_json};

use crate::model::Touchpoint;

/// One file's text and the name diagnostics should use for it.
#[derive(Clone, Debug)]
pub struct Source {
    /// Shown in diagnostics.
    pub name: String,
    /// Directory secret file references resolve against.
    pub dir: PathBuf,
    /// The file's contents.
    pub text: String,
}

/// A touchpoint that passed every check, with where it came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The typed touchpoint.
    pub touchpoint: Touchpoint,
    /// Its canonical JSON form (defaults filled in): what is diffed and stored.
    pub spec: Value,
    /// The file's name as shown in diagnostics.
    pub file: String,
    /// Directory secret file references resolve against.
    pub dir: PathBuf,
}

/// The desired state: every touchpoint of the tree, sorted by id.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Sorted by id; ids are unique.
    pub touchpoints: Vec<Loaded>,
}

/// Why a tree could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The folder does not exist.
    #[error(
        "touchpoint folder {0} does not exist: create it, or point --dir at the folder holding your touchpoint files"
    )]
    NoDir(PathBuf),
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The files have problems; every one is listed.
    #[error("{} error(s) in touchpoint files", .0.len())]
    Invalid(Vec<Diagnostic>),
}

/// The `*.toml` files under `dir`, recursively, in path order (hidden folders skipped).
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NoDir(dir.to_path_buf()));
    }
    let mut files = Vec::new();
    let walker = walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let entry = entry.map_err(|e| LoadError::Io {
            path: e.path().unwrap_or(dir).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("folder loop")),
        })?;
        if entry.file_type().is_file() && entry.path().extension().is_some_and(|x| x == "toml") {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// Loads and checks every touchpoint file under `dir`.
pub fn load_dir(dir: &Path) -> Result<Desired, LoadError> {
    let files = discover(dir)?;
    let sources: Vec<Result<Source, Diagnostic>> = files
        .par_iter()
        .map(|path| {
            let name = path.display().to_string();
            let bytes = std::fs::read(path)
                .map_err(|e| file_diag(&name, "io", format!("cannot read the file: {e}")))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                file_diag(
                    &name,
                    "encoding",
                    "the file is not UTF-8: save it as UTF-8".into(),
                )
            })?;
            Ok(Source {
                name,
                dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                text,
            })
        })
        .collect();
    let mut diagnostics = Vec::new();
    let mut ok = Vec::new();
    for s in sources {
        match s {
            Ok(s) => ok.push(s),
            Err(d) => diagnostics.push(d),
        }
    }
    match load_sources(&ok) {
        Ok(desired) if diagnostics.is_empty() => Ok(desired),
        Ok(_) => Err(LoadError::Invalid(diagnostics)),
        Err(LoadError::Invalid(more)) => {
            diagnostics.extend(more);
            diagnostics
                .sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
            Err(LoadError::Invalid(diagnostics))
        }
        Err(e) => Err(e),
    }
}

fn file_diag(name: &str, code: &'static str, message: String) -> Diagnostic {
    Diagnostic {
        path: name.to_string(),
        line: 1,
        column: 1,
        severity: "error",
        code,
        message,
    }
}

fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        jsonschema::draft202012::new(crate::schema::schema())
            .unwrap_or_else(|e| panic!("the generated schema is not a valid schema: {e}"))
    })
}

/// Checks a spec that did not come from a file (e.g. from a saved plan) against the schema and the
/// model, so nothing malformed reaches the registry.
pub fn check_spec(spec: &Value) -> Result<(), String> {
    let issues = schema_errors::check(validator(), crate::schema::schema(), spec);
    if let Some(first) = issues.first() {
        return Err(first.message.clone());
    }
    let tp: Touchpoint = serde_json::from_value(spec.clone()).map_err(|e| e.to_string())?;
    match checks::check(&tp).first() {
        Some(issue) => Err(issue.message.clone()),
        None => Ok(()),
    }
}

/// The outcome of checking one file.
struct Checked {
    loaded: Option<Loaded>,
    /// Where the `id` value sits, for duplicate-id messages.
    id_at: (usize, usize),
    diagnostics: Vec<Diagnostic>,
}

/// Checks already-read files (from disk or a git revision) as one tree.
pub fn load_sources(sources: &[Source]) -> Result<Desired, LoadError> {
    let checked: Vec<Checked> = sources.par_iter().map(check_file).collect();
    let mut diagnostics = Vec::new();
    let mut by_id: BTreeMap<String, (String, (usize, usize))> = BTreeMap::new();
    let mut touchpoints = Vec::with_capacity(checked.len());
    for c in checked {
        diagnostics.extend(c.diagnostics);
        let Some(loaded) = c.loaded else { continue };
        let id = loaded.touchpoint.id().to_string();
        if let Some((first, (line, col))) = by_id.get(&id) {
            diagnostics.push(Diagnostic {
                path: loaded.file.clone(),
                line: c.id_at.0,
                column: c.id_at.1,
                severity: "error",
                code: "duplicate-id",
                message: format!(
                    "id `{id}` is already used by {first}:{line}:{col}: ids must be unique across the tree"
                ),
            });
            continue;
        }
        by_id.insert(id, (loaded.file.clone(), c.id_at));
        touchpoints.push(loaded);
    }
    if !diagnostics.is_empty() {
        diagnostics.sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
        return Err(LoadError::Invalid(diagnostics));
    }
    touchpoints.sort_by(|a, b| a.touchpoint.id().cmp(b.touchpoint.id()));
    Ok(Desired { touchpoints })
}

fn check_file(source: &Source) -> Checked {
    let text = source.text.as_str();
    let diag = |code: &'static str, offset: usize, message: String| {
        let (line, column) = line_col(text, offset);
        Diagnostic {
            path: source.name.clone(),
            line,
            column,
            severity: "error",
            code,
            message,
        }
    };
    let (root, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        let diagnostics = errors
            .iter()
            .map(|e| {
                let span = e.span().unwrap_or(0..0);
                let mut message = format!("TOML syntax: {}", e.message().trim());
                let key = text.get(span.clone()).map(str::trim).unwrap_or_default();
                if message.ends_with("duplicate key") && !key.is_empty() {
                    message = format!("{message} `{key}`: each key may be set once; keep one");
                }
                diag("syntax", span.start, message)
            })
            .collect();
        return Checked {
            loaded: None,
            id_at: (1, 1),
            diagnostics,
        };
    }
    let place = |issue: &Issue| {
        let found = locate(&root, &issue.at);
        let offset = match issue.target {
            Target::Key => found.key.map_or(found.value.start, |k| k.start),
            Target::Value => found.value.start,
            // A missing field: point at the table that lacks it (its header key), or the file start.
            // At the top level, point at `kind`: it decides which fields are required.
            Target::Table if issue.at.is_empty() => {
                let kind = locate(&root, &[Segment::Key("kind".into())]);
                kind.key.map_or(0, |k| k.start)
            }
            Target::Table => found.key.map_or(found.value.start, |k| k.start),
        };
        diag(issue.code, offset, issue.message.clone())
    };
    let id_loc = locate(&root, &[Segment::Key("id".into())]);
    let id_at = line_col(text, id_loc.value.start);

    let doc = table_to_json(root.get_ref());
    let issues = schema_errors::check(validator(), crate::schema::schema(), &doc);
    if !issues.is_empty() {
        return Checked {
            loaded: None,
            id_at,
            diagnostics: issues.iter().map(place).collect(),
        };
    }
    let touchpoint: Touchpoint = match serde_json::from_value(doc) {
        Ok(tp) => tp,
        Err(e) => {
            return Checked {
                loaded: None,
                id_at,
                diagnostics: vec![diag(
                    "invalid-value",
                    0,
                    format!("cannot read the touchpoint: {e}"),
                )],
            };
        }
    };
    let issues = checks::check(&touchpoint);
    if !issues.is_empty() {
        return Checked {
            loaded: None,
            id_at,
            diagnostics: issues.iter().map(place).collect(),
        };
    }
    let spec = serde_json::to_value(&touchpoint).unwrap_or(Value::Null);
    Checked {
        loaded: Some(Loaded {
            touchpoint,
            spec,
            file: source.name.clone(),
            dir: source.dir.clone(),
        }),
        id_at,
        diagnostics: Vec::new(),
    }
}
