//! What git says about the touchpoint folder: the commit it is at, whether it has uncommitted
//! changes, and the files it held at another revision (read from the object database, without a
//! checkout). Local repositories only; a folder outside any repository simply has no provenance.

use std::path::{Path, PathBuf};

use crate::load::{Diagnostic, Source, source_from_bytes};

/// The commit and cleanliness of the repository holding a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// The HEAD commit, absent in a repository with no commits yet.
    pub commit: Option<String>,
    /// Whether anything under the folder differs from HEAD (including untracked files), leaving
    /// out `.touchctl` folders (touchctl's own state) at any depth.
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
    let rel = relative(&repo, dir).ok()?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true).recurse_untracked_dirs(true);
    if !rel.as_os_str().is_empty() {
        opts.pathspec(&rel);
    }
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| {
            s.iter()
                .any(|e| !e.status().is_ignored() && !in_state_folder(e.path_bytes()))
        })
        .unwrap_or(true);
    Some(Head { commit, dirty })
}

/// Whether a repository path is inside a `.touchctl` folder, at any depth: touchctl's own state
/// (the registry, the queue) is never part of the desired state, whether or not the repository's
/// `.gitignore` names it.
fn in_state_folder(path: &[u8]) -> bool {
    path.split(|&b| b == b'/').any(|part| part == b".touchctl")
}

/// The folder secret file references may resolve into: the work tree of the git repository holding
/// `dir`, or `dir` itself when it is not in one (or is in a bare repository). `None` when `dir`
/// does not exist.
pub fn repository_root(dir: &Path) -> Option<PathBuf> {
    let work_tree = git2::Repository::discover(dir)
        .ok()
        .and_then(|repo| repo.workdir().map(Path::to_path_buf));
    work_tree
        .and_then(|w| w.canonicalize().ok())
        .or_else(|| dir.canonicalize().ok())
}

/// Why the files at a revision could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The folder is not in a git repository.
    #[error(
        "{0} is not inside a git repository: --base compares git revisions, so run it in a clone"
    )]
    NotARepository(PathBuf),
    /// The folder is outside the repository's work tree (or the repository is bare).
    #[error("{0} is not inside the work tree of its git repository")]
    OutsideWorkTree(PathBuf),
    /// The revision does not name a commit.
    #[error(
        "`{rev}` is not a commit in this repository ({message}): fetch it first (e.g. `git fetch origin main`), or name a branch, tag or commit that exists"
    )]
    UnknownRevision {
        /// What the user asked for.
        rev: String,
        /// What git said.
        message: String,
    },
    /// Reading the repository failed.
    #[error("cannot read the git repository: {0}")]
    Git(#[from] git2::Error),
}

/// A commit the touchpoint files were read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revision {
    /// What the user named (`main`, `origin/main`, `HEAD~1`, a hash).
    pub rev: String,
    /// The full commit id it resolves to.
    pub commit: String,
}

/// The path of `dir` inside the repository's work tree (empty for the top).
fn relative(repo: &git2::Repository, dir: &Path) -> Result<PathBuf, GitError> {
    let outside = || GitError::OutsideWorkTree(dir.to_path_buf());
    let workdir = repo.workdir().ok_or_else(outside)?;
    let workdir = workdir.canonicalize().map_err(|_| outside())?;
    let abs = dir.canonicalize().map_err(|_| outside())?;
    abs.strip_prefix(&workdir)
        .map(Path::to_path_buf)
        .map_err(|_| outside())
}

/// Every `*.toml` file under `dir` as it was at revision `rev`, named as the same file in the work
/// tree would be (`dir/sub/file.toml`), so that a file present on both sides has one name. Hidden
/// folders and files are skipped, as when loading the work tree. A folder that did not exist at
/// `rev` holds no files. Files that are not UTF-8 come back as diagnostics.
pub fn sources_at(
    dir: &Path,
    rev: &str,
) -> Result<(Revision, Vec<Result<Source, Diagnostic>>), GitError> {
    let repo =
        git2::Repository::discover(dir).map_err(|_| GitError::NotARepository(dir.to_path_buf()))?;
    let rel = relative(&repo, dir)?;
    let commit = repo
        .revparse_single(rev)
        .and_then(|o| o.peel_to_commit())
        .map_err(|e| GitError::UnknownRevision {
            rev: rev.to_string(),
            message: e.message().to_string(),
        })?;
    let revision = Revision {
        rev: rev.to_string(),
        commit: commit.id().to_string(),
    };
    let root = commit.tree()?;
    let tree = if rel.as_os_str().is_empty() {
        root
    } else {
        match root.get_path(&rel) {
            Ok(entry) if entry.kind() == Some(git2::ObjectType::Tree) => {
                entry.to_object(&repo)?.peel_to_tree()?
            }
            // The folder did not exist at that revision (or was a file).
            _ => return Ok((revision, Vec::new())),
        }
    };
    let mut found: Vec<(PathBuf, git2::Oid)> = Vec::new();
    tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
        let Ok(name) = entry.name() else {
            return git2::TreeWalkResult::Skip;
        };
        if name.starts_with('.') {
            return git2::TreeWalkResult::Skip;
        }
        if entry.kind() == Some(git2::ObjectType::Blob) && name.ends_with(".toml") {
            found.push((Path::new(parent).join(name), entry.id()));
        }
        git2::TreeWalkResult::Ok
    })?;
    found.sort();
    let mut sources = Vec::with_capacity(found.len());
    for (path, oid) in found {
        let blob = repo.find_blob(oid)?;
        let path = dir.join(path);
        let name = path.display().to_string();
        let parent = path.parent().unwrap_or(dir).to_path_buf();
        sources.push(source_from_bytes(name, parent, blob.content().to_vec()));
    }
    Ok((revision, sources))
}
