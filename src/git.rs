//! What git says about the touchpoint folder: the commit it is at, and whether it has uncommitted
//! changes. Local repositories only; a folder outside any repository simply has no provenance.

use std::path::Path;

/// The commit and cleanliness of the repository holding a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The HEAD commit, absent in a repository with no commits yet.
    pub commit: Option<String>,
    /// Whether anything under the folder differs from HEAD (including untracked files).
    pub dirty: bool,
}

/// The git state of `dir`, or `None` when it is not inside a repository.
pub fn head(dir: &Path) -> Option<Head> {
    let repo = git2::Repository::discover(dir).ok()?;
    let commit = repo
        .head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .map(|c| c.id().to_string());
    let workdir = repo.workdir()?.canonicalize().ok()?;
    let abs = dir.canonicalize().ok()?;
    let rel = abs.strip_prefix(&workdir).ok()?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true).recurse_untracked_dirs(true);
    if !rel.as_os_str().is_empty() {
        opts.pathspec(rel);
    }
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| s.iter().any(|e| !e.status().is_ignored()))
        .unwrap_or(true);
    Some(Head { commit, dirty })
}
