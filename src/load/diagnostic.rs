//! One problem found in a touchpoint file, located at `path:line:col`, with a stable code.

use std::fmt;

use serde::Serialize;

use crate::term::escape;

/// A problem in a file: where it is, its stable code, and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file, as given (relative to where touchctl runs, or `REV:path` for git revisions).
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Always `error` today.
    pub severity: &'static str,
    /// Stable code, e.g. `unknown-field` (listed in the README).
    pub code: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

/// One line for a person: the path and the message are escaped ([`crate::term::escape`]), since
/// both can hold what a file's author wrote (a file name, a field name, a value). The JSON form
/// (`Serialize`) carries them exactly.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}[{}]: {}",
            escape(&self.path),
            self.line,
            self.column,
            self.severity,
            self.code,
            escape(&self.message)
        )
    }
}

/// A problem before it is placed in a file: a code, the location inside the document, which part of
/// that location to point at, and the message.
#[derive(Clone, Debug)]
pub(crate) struct Issue {
    pub code: &'static str,
    pub at: Vec<super::toml_json::Segment>,
    pub target: Target,
    pub message: String,
}

/// Which part of a located entry a diagnostic points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The key (unknown fields).
    Key,
    /// The value (wrong type, out of range, ...).
    Value,
    /// The table that holds the location (a missing field): its key, or the start of the file.
    Table,
}
