//! Reads the desired state: every `*.toml` file under a folder (or given as text, e.g. from a git
//! revision), checked against the schema and by the cross-field and cross-file rules. All problems
//! are collected at once as [`Diagnostic`]s; a tree with any of them yields none of its touchpoints.
//! [`git`] says what commit the files came from and reads them at another revision.

mod cache;
mod checks;
mod diagnostic;
pub mod git;
mod schema_errors;
mod toml_json;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use serde_json::Value;
use toml::de::DeTable;

pub use cache::{Reload, Stamp, TreeCache};
pub use diagnostic::Diagnostic;
use diagnostic::{Issue, Target};
pub use schema_errors::did_you_mean;
pub use toml_json::Segment;
use toml_json::{line_col, locate, table_to_json};

use crate::model::{KindSpec, SpecJson, Touchpoint, WechatAuth};

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
    pub spec: SpecJson,
    /// The file's name as shown in diagnostics.
    pub file: String,
    /// Directory secret file references resolve against.
    pub dir: PathBuf,
    /// Where each secret reference sits in the file (line, column of its `env` or `file` value),
    /// by field path, so a secret that cannot be read is reported at its line.
    pub secret_at: Vec<(&'static str, (usize, usize))>,
}

/// The desired state: every touchpoint of the tree, sorted by id. The touchpoints are shared, so
/// that a tree read again after a change keeps those of the files that did not change.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Sorted by id; ids are unique.
    pub touchpoints: Vec<Arc<Loaded>>,
}

impl Drop for Desired {
    /// A large tree is many small allocations: free them on all cores.
    fn drop(&mut self) {
        std::mem::take(&mut self.touchpoints)
            .into_par_iter()
            .for_each(drop);
    }
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

/// The `*.toml` files under `dir`, recursively, in path order (hidden folders skipped; links
/// followed as [`load_dir`] follows them, those it refuses left out).
pub fn discover(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    Ok(walk(dir)?
        .into_iter()
        .filter_map(|f| match f {
            Found::File(path) => Some(path),
            Found::Refused(_) => None,
        })
        .collect())
}

/// What the walk of a tree found.
pub(crate) enum Found {
    /// A `*.toml` file, or a link to one inside the folder.
    File(PathBuf),
    /// A link that is not followed: a diagnostic, so that the touchpoints it may have held are
    /// not taken for deleted.
    Refused(Diagnostic),
}

fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "toml")
}

/// Every `*.toml` file under `dir` and every link that cannot be followed, in path order. Hidden
/// files and folders are skipped. A link is followed when it leads to a regular file inside `dir`
/// (as resolved, links and `..` included); any other link is a diagnostic: a link to a folder
/// (files could be loaded twice, or from anywhere), a link that leaves the folder, and a broken
/// link. Links whose name and target are not touchpoint files are passed over like other files.
pub(crate) fn walk(dir: &Path) -> Result<Vec<Found>, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::NoDir(dir.to_path_buf()));
    }
    let mut found = Vec::new();
    let mut root: Option<PathBuf> = None;
    // Not sorted by the walk (which finds each name's place anew for every comparison): sorted
    // once at the end, in the same order.
    let walker = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walker {
        let entry = entry.map_err(|e| LoadError::Io {
            path: e.path().unwrap_or(dir).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("folder loop")),
        })?;
        if entry.file_type().is_symlink() {
            let root = match &root {
                Some(r) => r,
                None => root.insert(dir.canonicalize().map_err(|source| LoadError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?),
            };
            found.extend(follow(entry.path(), root));
        } else if entry.file_type().is_file() && is_toml(entry.path()) {
            found.push(Found::File(entry.into_path()));
        }
    }
    found.sort_by_cached_key(|f| {
        let path = match f {
            Found::File(path) => path.as_path(),
            Found::Refused(d) => Path::new(&d.path),
        };
        path_order(path)
    });
    Ok(found)
}

/// A key that sorts paths as a walk of sorted folders meets them: name by name (`a/b` before
/// `a.toml`), so the separator sorts before every other byte.
fn path_order(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .iter()
        .map(|&b| if b == b'/' { 0 } else { b })
        .collect()
}

/// Where a link leads, as far as the rules for links care.
pub(crate) enum LinkTarget {
    /// Nothing: the link is broken.
    Missing,
    /// A folder.
    Folder,
    /// Something outside the touchpoint folder (shown as resolved, with the folder).
    Outside { target: String, folder: String },
    /// Something that is not a regular file (a device, a FIFO), or cannot be looked at.
    Other(String),
    /// A regular file inside the touchpoint folder.
    File,
}

/// The rule for links, for a work tree and a git revision alike: a link named `*.toml` is followed
/// when it leads to a regular file inside the touchpoint folder; a link to a folder and a broken
/// link are refused whatever their name (they could hide touchpoints, which would then look
/// deleted); any other link is not a touchpoint file and is passed over. `Ok(true)`: follow it.
pub(crate) fn link_rule(name: &str, shown: &str, target: LinkTarget) -> Result<bool, Diagnostic> {
    let refuse = |message: String| Err(file_diag(name, "link", message));
    let toml = name.ends_with(".toml");
    match target {
        LinkTarget::Missing => refuse(format!(
            "this is a link to `{shown}`, which does not exist: point it at a touchpoint file inside the folder, or remove it (a link that leads nowhere could hide touchpoints, which would then look deleted)"
        )),
        LinkTarget::Folder => refuse(format!(
            "this is a link to the folder `{shown}`; links to folders are not followed: move the files into the touchpoint folder, or link each file"
        )),
        _ if !toml => Ok(false),
        LinkTarget::Outside { target, folder } => refuse(format!(
            "this is a link to {target}, outside the touchpoint folder {folder}: touchpoint files must be inside it, so move the file in (a link to it from there is followed)"
        )),
        LinkTarget::Other(why) => refuse(format!(
            "this is a link to `{shown}`, which is not a touchpoint file ({why}): link a touchpoint file"
        )),
        LinkTarget::File => Ok(true),
    }
}

/// A resolved path as a message shows it: relative to the current folder when it is below it
/// (as the paths the user typed are), otherwise whole.
fn as_shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| cwd.canonicalize().ok())
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .filter(|rel| !rel.as_os_str().is_empty())
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Where the link at `path` leads, as [`walk`] takes it; `root` is the folder, resolved.
fn follow(path: &Path, root: &Path) -> Option<Found> {
    let name = path.display().to_string();
    let shown = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_default();
    let target = match path.canonicalize() {
        Err(_) => LinkTarget::Missing,
        Ok(target) => match std::fs::metadata(&target) {
            Err(e) => LinkTarget::Other(format!("cannot look at it: {e}")),
            Ok(m) if m.is_dir() => LinkTarget::Folder,
            Ok(_) if !target.starts_with(root) => LinkTarget::Outside {
                target: as_shown(&target),
                folder: as_shown(root),
            },
            Ok(m) if !m.is_file() => LinkTarget::Other("not a regular file".into()),
            Ok(_) => LinkTarget::File,
        },
    };
    match link_rule(&name, &shown, target) {
        Ok(true) => Some(Found::File(path.to_path_buf())),
        Ok(false) => None,
        Err(d) => Some(Found::Refused(d)),
    }
}

/// Loads and checks every touchpoint file under `dir`.
pub fn load_dir(dir: &Path) -> Result<Desired, LoadError> {
    // One pass per file, read and check together, so each file is parsed while it is in cache.
    let checked: Vec<Checked> = walk(dir)?
        .into_par_iter()
        .map(|found| match found {
            Found::File(path) => checked(read_source(&path)),
            Found::Refused(d) => Checked::failed(d),
        })
        .collect();
    combine(&checked)
}

fn checked(source: Result<Source, Diagnostic>) -> Checked {
    match source {
        Ok(source) => check_file(source),
        Err(d) => Checked::failed(d),
    }
}

/// The most a touchpoint file may hold. A real one holds a few KiB; anyone who can open a pull
/// request can add a file, and a huge one must not be read into memory whole (by `plan`, the
/// daemon or `plan --base`).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The diagnostic of a file larger than [`MAX_FILE_BYTES`].
fn too_large(name: &str, size: u64) -> Diagnostic {
    file_diag(
        name,
        "io",
        format!(
            "the file holds {size} bytes, more than the {} KiB a touchpoint file may hold: one touchpoint per file, with its secrets in files of their own",
            MAX_FILE_BYTES / 1024
        ),
    )
}

/// Why a file was not read.
enum ReadError {
    Io(std::io::Error),
    TooLarge(u64),
}

/// Reads a whole file of at most [`MAX_FILE_BYTES`] (a larger one is not read past that bound).
/// Touchpoint files are small: reading into a reusable buffer per thread, then copying out exactly
/// what was read, saves the `fstat` and `lseek` that `std::fs::read` spends on sizing its buffer,
/// which adds up over thousands of files.
fn read_small(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::cell::RefCell;
    use std::io::Read;
    thread_local! {
        static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 16 * 1024]);
    }
    let file = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut file = file.take(MAX_FILE_BYTES + 1);
    SCRATCH.with_borrow_mut(|buf| {
        let mut len = 0;
        loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match file.read(&mut buf[len..]) {
                Ok(0) if len as u64 > MAX_FILE_BYTES => {
                    let size = std::fs::metadata(path).map_or(len as u64, |m| m.len());
                    return Err(ReadError::TooLarge(size));
                }
                Ok(0) => return Ok(buf[..len].to_vec()),
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    })
}

pub(crate) fn read_source(path: &Path) -> Result<Source, Diagnostic> {
    let name = path.display().to_string();
    let bytes = read_small(path).map_err(|e| match e {
        ReadError::Io(e) => file_diag(&name, "io", format!("cannot read the file: {e}")),
        ReadError::TooLarge(size) => too_large(&name, size),
    })?;
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    source_from_bytes(name, dir, bytes)
}

/// A file at a git revision, of at most [`MAX_FILE_BYTES`], as a [`Source`].
pub fn source_from_blob(
    name: String,
    dir: PathBuf,
    blob: &git2::Blob<'_>,
) -> Result<Source, Diagnostic> {
    let size = blob.size() as u64;
    if size > MAX_FILE_BYTES {
        return Err(too_large(&name, size));
    }
    source_from_bytes(name, dir, blob.content().to_vec())
}

/// A file's bytes as a [`Source`], or the `encoding` diagnostic when they are not UTF-8.
pub fn source_from_bytes(name: String, dir: PathBuf, bytes: Vec<u8>) -> Result<Source, Diagnostic> {
    match String::from_utf8(bytes) {
        Ok(text) => Ok(Source { name, dir, text }),
        Err(_) => Err(file_diag(
            &name,
            "encoding",
            "the file is not UTF-8: save it as UTF-8".into(),
        )),
    }
}

pub(crate) fn file_diag(name: &str, code: &'static str, message: String) -> Diagnostic {
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
    VALIDATOR.get_or_init(|| compile(crate::model::schema::schema()))
}

fn compile(schema: &Value) -> jsonschema::Validator {
    jsonschema::draft202012::new(schema)
        .unwrap_or_else(|e| panic!("the generated schema is not a valid schema: {e}"))
}

/// One validator per kind: the root schema with its `oneOf` narrowed to that kind's branch. A file
/// names its kind, so the common case, a valid file, is checked against one branch instead of all
/// four; a file that fails is checked again against the whole schema, for the diagnostics.
fn kind_validator(kind: &str) -> Option<&'static jsonschema::Validator> {
    static BY_KIND: OnceLock<Vec<(String, jsonschema::Validator)>> = OnceLock::new();
    let all = BY_KIND.get_or_init(|| {
        let schema = crate::model::schema::schema();
        let branches = schema["oneOf"].as_array().cloned().unwrap_or_default();
        branches
            .into_iter()
            .filter_map(|branch| {
                let name = branch
                    .pointer("/properties/kind/const")?
                    .as_str()?
                    .to_string();
                let mut narrowed = schema.clone();
                narrowed["oneOf"] = Value::Array(vec![branch]);
                Some((name, compile(&narrowed)))
            })
            .collect()
    });
    all.iter().find(|(k, _)| k == kind).map(|(_, v)| v)
}

/// The schema problems of a document (none when it is valid).
fn schema_issues(doc: &Value) -> Vec<Issue> {
    let fast = doc
        .get("kind")
        .and_then(Value::as_str)
        .and_then(kind_validator);
    if fast.is_some_and(|v| v.is_valid(doc)) {
        return Vec::new();
    }
    schema_errors::check(validator(), crate::model::schema::schema(), doc)
}

/// Checks a spec that did not come from a file (e.g. from a saved plan) against the schema and the
/// model, so nothing malformed reaches the registry.
pub fn check_spec(spec: &Value) -> Result<(), String> {
    let issues = schema_issues(spec);
    if let Some(first) = issues.first() {
        return Err(first.message.clone());
    }
    let tp = Touchpoint::from_json(spec.clone()).map_err(|e| e.to_string())?;
    match checks::check(&tp).first() {
        Some(issue) => Err(issue.message.clone()),
        None => Ok(()),
    }
}

/// The outcome of checking one file.
#[derive(Clone)]
pub(crate) struct Checked {
    loaded: Option<Arc<Loaded>>,
    /// Where the `id` value sits, for duplicate-id messages.
    id_at: (usize, usize),
    /// Where `auth.platform` sits, for an Official Account in third-party mode.
    platform_at: (usize, usize),
    diagnostics: Vec<Diagnostic>,
}

impl Checked {
    /// A file that could not be read or followed.
    fn failed(d: Diagnostic) -> Self {
        Checked {
            loaded: None,
            id_at: (1, 1),
            platform_at: (1, 1),
            diagnostics: vec![d],
        }
    }

    /// The touchpoint it holds, when it passed every check of its own.
    pub(crate) fn loaded(&self) -> Option<&Arc<Loaded>> {
        self.loaded.as_ref()
    }
}

/// Checks one already-read file on its own: every check but those across files (unique ids, the
/// platform an Official Account names), which need the rest of the tree.
pub fn load_file_alone(source: Source) -> Result<Desired, LoadError> {
    let c = checked(Ok(source));
    if !c.diagnostics.is_empty() {
        return Err(LoadError::Invalid(c.diagnostics));
    }
    Ok(Desired {
        touchpoints: c.loaded.into_iter().collect(),
    })
}

/// Checks already-read files (e.g. from a git revision) as one tree; a file that could not be read
/// comes as its diagnostic.
pub fn load_sources(sources: Vec<Result<Source, Diagnostic>>) -> Result<Desired, LoadError> {
    let checked: Vec<Checked> = sources.into_par_iter().map(checked).collect();
    combine(&checked)
}

/// Joins the per-file outcomes, in path order: cross-file checks (unique ids), and every
/// diagnostic or the tree.
pub(crate) fn combine<'a>(
    checked: impl IntoIterator<Item = &'a Checked>,
) -> Result<Desired, LoadError> {
    let mut diagnostics = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    for c in checked {
        diagnostics.extend(c.diagnostics.iter().cloned());
        if let Some(loaded) = &c.loaded {
            entries.push((loaded.clone(), c.id_at, c.platform_at));
        }
    }
    // A stable sort keeps files in path order within an id, so the first file of an id is the
    // one the others are reported against.
    entries.par_sort_by(|a, b| a.0.touchpoint.id().cmp(b.0.touchpoint.id()));
    let mut first = 0;
    for i in 1..entries.len() {
        let id = entries[i].0.touchpoint.id();
        if id != entries[first].0.touchpoint.id() {
            first = i;
            continue;
        }
        let ((earlier, (line, col), _), (later, at, _)) = (&entries[first], &entries[i]);
        diagnostics.push(Diagnostic {
            path: later.file.clone(),
            line: at.0,
            column: at.1,
            severity: "error",
            code: "duplicate-id",
            message: format!(
                "id `{id}` is already used by {}:{line}:{col}: ids must be unique across the tree",
                earlier.file
            ),
        });
    }
    diagnostics.extend(platform_references(&entries));
    if !diagnostics.is_empty() {
        diagnostics.sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
        return Err(LoadError::Invalid(diagnostics));
    }
    let touchpoints = entries.into_iter().map(|(loaded, _, _)| loaded).collect();
    Ok(Desired { touchpoints })
}

/// A checked touchpoint with where its `id` and its `auth.platform` sit.
type Entry = (Arc<Loaded>, (usize, usize), (usize, usize));

/// An Official Account in third-party mode names a `wechat_open_platform` file of the same tree.
/// `entries` are sorted by id.
fn platform_references(entries: &[Entry]) -> Vec<Diagnostic> {
    let kind_of = |id: &str| {
        entries
            .binary_search_by(|e| e.0.touchpoint.id().cmp(id))
            .ok()
            .map(|i| entries[i].0.touchpoint.spec.name())
    };
    let platforms = || {
        entries
            .iter()
            .filter(|e| matches!(e.0.touchpoint.spec, KindSpec::WechatOpenPlatform(_)))
            .map(|e| e.0.touchpoint.id())
    };
    let mut out = Vec::new();
    for (loaded, _, (line, column)) in entries {
        let KindSpec::WechatOfficialAccount(oa) = &loaded.touchpoint.spec else {
            continue;
        };
        let WechatAuth::ThirdParty { platform, .. } = &oa.auth else {
            continue;
        };
        let (code, message) = match kind_of(platform) {
            Some("wechat_open_platform") => continue,
            Some(kind) => (
                "not-a-platform",
                format!(
                    "`auth.platform` names `{platform}`, a `{kind}` touchpoint: name the id of a `kind = \"wechat_open_platform\"` file"
                ),
            ),
            None => {
                let hint = match schema_errors::did_you_mean(platform, platforms()) {
                    Some(near) => format!(" (did you mean `{near}`?)"),
                    None => String::new(),
                };
                (
                    "unknown-platform",
                    format!(
                        "`auth.platform` names `{platform}`, which no file in the tree declares{hint}: add a `kind = \"wechat_open_platform\"` file with that id, or name an existing one"
                    ),
                )
            }
        };
        out.push(Diagnostic {
            path: loaded.file.clone(),
            line: *line,
            column: *column,
            severity: "error",
            code,
            message,
        });
    }
    out
}

fn check_file(source: Source) -> Checked {
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
            platform_at: (1, 1),
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
    let issues = schema_issues(&doc);
    if !issues.is_empty() {
        return Checked {
            loaded: None,
            id_at,
            platform_at: (1, 1),
            diagnostics: issues.iter().map(place).collect(),
        };
    }
    let touchpoint = match Touchpoint::from_json(doc) {
        Ok(tp) => tp,
        Err(e) => {
            return Checked {
                loaded: None,
                id_at,
                platform_at: (1, 1),
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
            platform_at: (1, 1),
            diagnostics: issues.iter().map(place).collect(),
        };
    }
    let platform_loc = locate(
        &root,
        &[Segment::Key("auth".into()), Segment::Key("platform".into())],
    );
    let platform_at = line_col(text, platform_loc.value.start);
    let spec = SpecJson::of(&touchpoint);
    let secret_at = touchpoint
        .secrets()
        .into_iter()
        .map(|(path, r)| {
            let mut at: Vec<Segment> = path.split('.').map(|k| Segment::Key(k.into())).collect();
            at.push(Segment::Key(r.source_key().into()));
            (path, line_col(text, locate(&root, &at).value.start))
        })
        .collect();
    Checked {
        loaded: Some(Arc::new(Loaded {
            touchpoint,
            spec,
            file: source.name,
            dir: source.dir,
            secret_at,
        })),
        id_at,
        platform_at,
        diagnostics: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_listed_in_the_order_of_a_walk_of_sorted_folders() {
        let paths = [
            "t/a.toml",
            "t/a/b.toml",
            "t/a/a.toml",
            "t/a-b.toml",
            "t/a0.toml",
            "t/ab/c.toml",
            "t/A.toml",
            "t/é.toml",
            "t/a.toml.d/x.toml",
        ];
        let mut by_key: Vec<&Path> = paths.iter().map(Path::new).collect();
        by_key.sort_by_cached_key(|p| path_order(p));
        let mut by_name = by_key.clone();
        // `Path` orders name by name, as a walk of sorted folders meets them.
        by_name.sort();
        assert_eq!(by_key, by_name);
    }

    #[test]
    fn read_small_reads_small_and_large_files_whole() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, 1, 16 * 1024, 16 * 1024 + 1, 100_000] {
            let path = dir.path().join(format!("f{size}"));
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            assert!(
                matches!(read_small(&path), Ok(read) if read == data),
                "size {size}"
            );
        }
        assert!(read_small(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn a_touchpoint_file_larger_than_the_bound_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.toml");
        let most = MAX_FILE_BYTES as usize;
        std::fs::write(&path, "#".repeat(most)).unwrap();
        assert!(
            read_source(&path).is_ok(),
            "a file of exactly the bound is read"
        );
        std::fs::write(&path, "#".repeat(most + 1)).unwrap();
        let d = read_source(&path).unwrap_err();
        assert_eq!(d.code, "io");
        assert!(
            d.message.starts_with(&format!(
                "the file holds {} bytes, more than the 1024 KiB",
                most + 1
            )),
            "{}",
            d.message
        );
    }
}
