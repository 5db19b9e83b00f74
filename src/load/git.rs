//! What git says about the touchpoint folder: the commit it is at, whether it has uncommitted
//! changes, and the files it held at another revision (read from the object database, without a
//! checkout). Local repositories only; a folder outside any repository simply has no provenance.

use std::path::{Path, PathBuf};

use crate::load::{Diagnostic, Source, source_from_blob};

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
        .map(|s| {
            s.iter()
                .any(|e| !e.status().is_ignored() && !in_state_folder(e.path_bytes()))
        })
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

/// The `*.toml` files under a folder at a git revision: their names and blob ids, and the
/// repository to read them from.
pub struct Listing {
    /// The revision.
    pub revision: Revision,
    /// Each file, named as the same file in the work tree would be (`dir/sub/file.toml`), with its
    /// blob id (for a link, the id of the file it leads to), or why a link there is not followed;
    /// in path order.
    pub files: Vec<(PathBuf, Result<git2::Oid, Diagnostic>)>,
    repo: git2::Repository,
}

impl Listing {
    /// Reads one file of the listing; a file that is not UTF-8 comes back as its diagnostic.
    pub fn read(&self, path: &Path, oid: git2::Oid) -> Result<Source, Diagnostic> {
        let name = path.display().to_string();
        let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        match self.repo.find_blob(oid) {
            Ok(blob) => source_from_blob(name, parent, &blob),
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
/// folders and files are skipped, and links followed or refused, as when loading the work tree
/// (links resolved within the revision). A folder that did not exist at `rev` holds no files.
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
    let mut found: Vec<(PathBuf, Result<git2::Oid, Diagnostic>)> = Vec::new();
    {
        let root = commit.tree()?;
        let tree = if rel.as_os_str().is_empty() {
            Some(root.clone())
        } else {
            match root.get_path(&rel) {
                Ok(entry) if entry.kind() == Some(git2::ObjectType::Tree) => {
                    Some(entry.to_object(&repo)?.peel_to_tree()?)
                }
                // The folder did not exist at that revision (or was a file).
                _ => None,
            }
        };
        let mut links: Vec<(PathBuf, git2::Oid)> = Vec::new();
        if let Some(tree) = tree {
            tree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
                let Ok(name) = entry.name() else {
                    return git2::TreeWalkResult::Skip;
                };
                if name.starts_with('.') {
                    return git2::TreeWalkResult::Skip;
                }
                let at = Path::new(parent).join(name);
                if entry.filemode() == LINK {
                    links.push((at, entry.id()));
                } else if entry.kind() == Some(git2::ObjectType::Blob) && name.ends_with(".toml") {
                    found.push((dir.join(at), Ok(entry.id())));
                }
                git2::TreeWalkResult::Ok
            })?;
        }
        for (at, oid) in links {
            let path = dir.join(&at);
            let (shown, leads) = link_target(&repo, &root, &rel, &rel.join(&at), oid);
            let (target, file) = match leads {
                Ok(file) => (crate::load::LinkTarget::File, Some(file)),
                Err(target) => (target, None),
            };
            match crate::load::link_rule(&path.display().to_string(), &shown, target) {
                Ok(true) => found.extend(file.map(|oid| (path, Ok(oid)))),
                Ok(false) => {}
                Err(d) => found.push((path, Err(d))),
            }
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
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
        .map(|(path, oid)| match oid {
            Ok(oid) => listing.read(path, *oid),
            Err(refused) => Err(refused.clone()),
        })
        .collect();
    Ok((listing.revision, sources))
}

/// The file mode git gives a symbolic link.
const LINK: i32 = 0o120000;

/// How many links in a row are followed before a link is taken for a loop.
const MOST_LINKS: usize = 8;

/// Follows the link at `path` (in the repository, whose root tree at the revision is `root`; its
/// blob `oid` holds the target) to what it finally leads to: the target as written, and the file's
/// blob, or where it leads instead as the link rules see it. `folder` is the touchpoint folder in
/// the repository.
fn link_target(
    repo: &git2::Repository,
    root: &git2::Tree<'_>,
    folder: &Path,
    path: &Path,
    oid: git2::Oid,
) -> (String, Result<git2::Oid, crate::load::LinkTarget>) {
    use crate::load::LinkTarget;
    let mut at = path.to_path_buf();
    let mut oid = oid;
    let mut shown = None;
    for _ in 0..MOST_LINKS {
        let target = match repo.find_blob(oid) {
            Ok(blob) => String::from_utf8_lossy(blob.content()).into_owned(),
            Err(e) => {
                return (
                    String::new(),
                    Err(LinkTarget::Other(e.message().to_string())),
                );
            }
        };
        let shown = shown.get_or_insert_with(|| target.clone()).clone();
        let Some(next) = lexical_join(at.parent().unwrap_or(Path::new("")), &target) else {
            return (
                shown,
                Err(LinkTarget::Outside {
                    target,
                    folder: folder.display().to_string(),
                }),
            );
        };
        let entry = match root.get_path(&next) {
            Ok(entry) => entry,
            Err(_) => return (shown, Err(LinkTarget::Missing)),
        };
        if entry.kind() == Some(git2::ObjectType::Tree) {
            return (shown, Err(LinkTarget::Folder));
        }
        if entry.filemode() == LINK {
            at = next;
            oid = entry.id();
            continue;
        }
        if !next.starts_with(folder) {
            return (
                shown,
                Err(LinkTarget::Outside {
                    target: next.display().to_string(),
                    folder: folder.display().to_string(),
                }),
            );
        }
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return (shown, Err(LinkTarget::Other("not a file".into())));
        }
        return (shown, Ok(entry.id()));
    }
    (
        shown.unwrap_or_default(),
        Err(LinkTarget::Other(format!(
            "more than {MOST_LINKS} links in a row"
        ))),
    )
}

/// `base` joined with a link's `target`, `.` and `..` resolved as written; `None` when it leaves
/// the repository (an absolute target, or too many `..`).
fn lexical_join(base: &Path, target: &str) -> Option<PathBuf> {
    let target = Path::new(target);
    if target.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in base.join(target).components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            std::path::Component::Normal(part) => out.push(part),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_resolve_as_written_and_never_above_the_repository() {
        let join = |base: &str, target: &str| lexical_join(Path::new(base), target);
        assert_eq!(
            join("tp/sub", "../.v/sms.toml"),
            Some(PathBuf::from("tp/.v/sms.toml"))
        );
        assert_eq!(
            join("tp", "./a/./b.toml"),
            Some(PathBuf::from("tp/a/b.toml"))
        );
        assert_eq!(join("tp", "../x.toml"), Some(PathBuf::from("x.toml")));
        assert_eq!(join("tp", "../../x.toml"), None);
        assert_eq!(join("tp", "/etc/passwd"), None);
    }
}
