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
    /// Whether anything under the folder differs from HEAD (including untracked files).
    pub dirty: bool,
}

/// The git state of `dir`, or `None` when it is not inside a repository.
pub fn head(dir: &Path) -> Option<Head> {
    head_in(&git2::Repository::discover(dir).ok()?, dir)
}

/// The git state of `dir` in `repo`, already open (a repository kept open reads its index again
/// only when it changed), or `None` when `dir` is outside its work tree.
pub fn head_in(repo: &git2::Repository, dir: &Path) -> Option<Head> {
    let commit = commit_in(repo);
    let rel = relative(repo, dir).ok()?;
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(true).recurse_untracked_dirs(true);
    if !rel.as_os_str().is_empty() {
        opts.pathspec(&rel);
    }
    let dirty = repo
        .statuses(Some(&mut opts))
        .map(|s| s.iter().any(|e| !e.status().is_ignored()))
        .unwrap_or(true);
    Some(Head { commit, dirty })
}

/// The HEAD commit of `repo`, absent when it has no commits yet. Cheap, unlike [`head_in`], which
/// also looks at every file for uncommitted changes.
pub fn commit_in(repo: &git2::Repository) -> Option<String> {
    repo.head()
        .ok()
        .and_then(|h| h.peel_to_commit().ok())
        .map(|c| c.id().to_string())
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

/// The `*.toml` files under a folder at a git revision: their names and blob ids, and the
/// repository to read them from.
pub struct Listing {
    /// The revision.
    pub revision: Revision,
    /// Each file, named as the same file in the work tree would be (`dir/sub/file.toml`), with its
    /// blob id, in path order.
    pub files: Vec<(PathBuf, git2::Oid)>,
    repo: git2::Repository,
}

impl Listing {
    /// Reads one file of the listing; a file that is not UTF-8 comes back as its diagnostic.
    pub fn read(&self, path: &Path, oid: git2::Oid) -> Result<Source, Diagnostic> {
        let name = path.display().to_string();
        let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        match self.repo.find_blob(oid) {
            Ok(blob) => source_from_bytes(name, parent, blob.content().to_vec()),
            Err(e) => Err(Diagnostic {
                path: name,
                line: 1,
                column: 1,
                severity: "error",
                code: "io",
                message: format!("cannot read the file from git: {}", e.message()),
            }),
        }
    }
}

/// Every `*.toml` file under `dir` as it was at revision `rev`, unread (see [`Listing`]). Hidden
/// folders and files are skipped, as when loading the work tree. A folder that did not exist at
/// `rev` holds no files.
pub fn list_at(dir: &Path, rev: &str) -> Result<Listing, GitError> {
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
    let mut found: Vec<(PathBuf, git2::Oid)> = Vec::new();
    {
        let root = commit.tree()?;
        let tree = if rel.as_os_str().is_empty() {
            Some(root)
        } else {
            match root.get_path(&rel) {
                Ok(entry) if entry.kind() == Some(git2::ObjectType::Tree) => {
                    Some(entry.to_object(&repo)?.peel_to_tree()?)
                }
                // The folder did not exist at that revision (or was a file).
                _ => None,
            }
        };
        if let Some(tree) = tree {
            tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
                let Ok(name) = entry.name() else {
                    return git2::TreeWalkResult::Skip;
                };
                if name.starts_with('.') {
                    return git2::TreeWalkResult::Skip;
                }
                if entry.kind() == Some(git2::ObjectType::Blob) && name.ends_with(".toml") {
                    found.push((dir.join(Path::new(parent).join(name)), entry.id()));
                }
                git2::TreeWalkResult::Ok
            })?;
        }
    }
    found.sort();
    drop(commit);
    Ok(Listing {
        revision,
        files: found,
        repo,
    })
}

/// Every `*.toml` file under `dir` as it was at revision `rev`, named as the same file in the work
/// tree would be (`dir/sub/file.toml`), so that a file present on both sides has one name. Hidden
/// folders and files are skipped, as when loading the work tree. A folder that did not exist at
/// `rev` holds no files. Files that are not UTF-8 come back as diagnostics.
pub fn sources_at(
    dir: &Path,
    rev: &str,
) -> Result<(Revision, Vec<Result<Source, Diagnostic>>), GitError> {
    let listing = list_at(dir, rev)?;
    let sources = listing
        .files
        .iter()
        .map(|(path, oid)| listing.read(path, *oid))
        .collect();
    Ok((listing.revision, sources))
}
