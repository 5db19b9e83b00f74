//! Reconcile: make the registry match the files, as `apply` would, from inside the daemon. A tree
//! with any problem changes nothing (the last good set keeps serving) and the problem is kept for
//! `/v1/status`. With a git source only committed content of the ref is read; with the work tree
//! (the default) the files as they are on disk, committed or not, as `apply --allow-dirty` would,
//! recorded as from a dirty tree when they had uncommitted changes.
//!
//! A reconcile after file events reads again only the files that changed ([`TreeCache`]) and
//! plans only the touchpoints in them, writing only their registry rows: with 10,000 touchpoints
//! an edit is live in a small fraction of the time a whole plan takes. That is right only while
//! the rest of the registry still matches the files, so every touchpoint is planned instead at
//! start, on the `--interval` pass (which also reads every file again, for anything the stamps
//! could not tell), after a reconcile that did not finish (files with problems, a refused or
//! failed change, a busy lock), and after another process wrote to the registry. A secret file
//! among the changed paths brings in the touchpoints that name it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::apply::{self, ApplyOptions};
use crate::load::{Diagnostic, LoadError, Reload, TreeCache};
use crate::model::SecretPolicy;
use crate::plan::Action;
use crate::plan::inputs::{PlanError, plan_from, plan_only};
use crate::registry::{LockGuard, Registry};

/// Where the desired state is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The files as they are on disk.
    Worktree,
    /// The files as committed at this git ref (branch, tag or commit).
    Git(String),
}

impl Source {
    /// Parses `worktree` or `git:REF`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "worktree" => Ok(Source::Worktree),
            _ => match s.strip_prefix("git:") {
                Some(r) if !r.is_empty() => Ok(Source::Git(r.to_string())),
                _ => Err(format!(
                    "`{s}` is not a source: use `worktree` (the files on disk) or `git:REF` (committed content of REF, e.g. git:main)"
                )),
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Worktree => f.write_str("worktree"),
            Source::Git(r) => write!(f, "git:{r}"),
        }
    }
}

/// How a reconcile went, as `/v1/status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// When it ran (RFC 3339).
    pub at: String,
    /// Whether the registry matches the files now.
    pub ok: bool,
    /// The commit the files were at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Whether the files it applied had uncommitted changes (`--source worktree` applies the
    /// files as they are on disk, and records them as from a dirty tree).
    pub dirty: bool,
    /// Touchpoint files read (and checked) this time; the others had not changed since the last
    /// reconcile.
    pub files_read: usize,
    /// Touchpoints compared with the registry: all of them, or those in the files that changed.
    pub planned: usize,
    /// Touchpoints created.
    pub created: usize,
    /// Touchpoints updated.
    pub updated: usize,
    /// Touchpoints deleted.
    pub deleted: usize,
    /// What went wrong; nothing was changed when the files had problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Every problem in the files, when that was what went wrong.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    /// Whether it changed the registry.
    pub fn changed(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }

    /// One line for the log.
    pub fn line(&self) -> String {
        match &self.error {
            None if self.changed() => format!(
                "reconciled: {} created, {} updated, {} deleted{}",
                self.created,
                self.updated,
                self.deleted,
                if self.dirty {
                    " from uncommitted files (recorded as a dirty tree; --source git:REF applies committed files only)"
                } else {
                    ""
                }
            ),
            None => "reconciled: no changes".to_string(),
            Some(e) => format!("reconcile changed nothing: {e}"),
        }
    }
}

/// What a reconcile reads and may do.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The touchpoint folder.
    pub dir: PathBuf,
    /// Work tree or git ref.
    pub source: Source,
    /// Refuse a reconcile that would delete more than this many touchpoints.
    pub max_deletes: usize,
    /// What secret references may read.
    pub secrets: SecretPolicy,
}

/// Why a reconcile runs, which says how much it reads and plans.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// At start, on the `--interval` pass, and when the watcher may have missed events: every
    /// file is read and every touchpoint planned.
    Everything,
    /// Files changed (these paths had events): the files whose stamps changed are read, and the
    /// touchpoints in them (and those whose secret files are among the paths) are planned.
    Changed(Vec<PathBuf>),
}

/// Keeps the registry in step with the files, one reconcile at a time, reading again only the
/// files that changed and planning only their touchpoints, as long as that is safe: the last
/// reconcile left the registry matching the files, and nobody else wrote to the registry since.
/// Otherwise (at start, after a reconcile that did not finish, after another process's write,
/// and on [`Trigger::Everything`]) every touchpoint is planned, as `apply` would.
pub struct Reconciler {
    settings: Settings,
    cache: TreeCache,
    /// The next reconcile plans every touchpoint.
    plan_all: bool,
    /// The registry's count of other writers' commits when the last reconcile started.
    registry_version: Option<i64>,
    /// The work tree's repository, once found.
    repo: Option<git2::Repository>,
}

impl Reconciler {
    /// A reconciler that has read nothing yet.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            cache: TreeCache::default(),
            plan_all: true,
            registry_version: None,
            repo: None,
        }
    }

    /// What it reads and may do.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Loads the files, plans against the registry, and applies the plan; returns how it went
    /// and the touchpoints whose registry rows it wrote. `registry_version` moves whenever
    /// another process commits to the registry (`None`: not known, so every touchpoint is
    /// planned).
    pub fn run(
        &mut self,
        trigger: &Trigger,
        registry: &dyn Registry,
        registry_version: Option<i64>,
    ) -> (Report, Vec<String>) {
        let everything = matches!(trigger, Trigger::Everything);
        if everything {
            self.cache.clear();
        }
        let plan_all = everything
            || self.plan_all
            || registry_version.is_none()
            || registry_version != self.registry_version;
        // Until this one has left the registry matching the files (should it panic, too).
        self.plan_all = true;
        self.registry_version = registry_version;
        let (report, written) = self.reconcile(trigger, plan_all, registry);
        self.plan_all = !report.ok;
        (report, written)
    }

    fn reconcile(
        &mut self,
        trigger: &Trigger,
        plan_all: bool,
        registry: &dyn Registry,
    ) -> (Report, Vec<String>) {
        let settings = self.settings.clone();
        let mut report = Report {
            at: crate::registry::now(),
            ..Report::default()
        };
        let fail = |mut report: Report, error: String| {
            report.error = Some(error);
            (report, Vec::new())
        };
        let (reload, commit) = match self.load() {
            Ok(d) => d,
            Err(LoadFailure::Invalid(diagnostics)) => {
                let files: std::collections::BTreeSet<&str> =
                    diagnostics.iter().map(|d| d.path.as_str()).collect();
                let error = format!(
                    "{} problem(s) in {} file(s); the last good set keeps serving",
                    diagnostics.len(),
                    files.len()
                );
                report.diagnostics = diagnostics;
                return fail(report, error);
            }
            Err(LoadFailure::Other(e)) => return fail(report, e),
        };
        report.files_read = reload.read;
        // Where the files came from is asked of git only when there is something to record.
        let unknown = crate::plan::Source {
            dir: settings.dir.display().to_string(),
            commit: commit.clone(),
            dirty: false,
        };
        let policy = &settings.secrets;
        let plan = if plan_all {
            plan_from(&reload.desired, unknown, registry, policy)
        } else {
            let mut only = reload.changed;
            if let (Trigger::Changed(paths), Source::Worktree) = (trigger, &settings.source) {
                let others = paths.iter().filter(|p| !is_toml(p)).map(PathBuf::as_path);
                only.extend(self.cache.secret_users(others));
            }
            plan_only(&reload.desired, &only, unknown, registry, policy)
        };
        let mut plan = match plan {
            Ok(p) => p,
            Err(PlanError::Secrets(diagnostics)) => {
                let error = format!(
                    "{} secret reference(s) cannot be read; the last good set keeps serving",
                    diagnostics.len()
                );
                report.diagnostics = diagnostics;
                return fail(report, error);
            }
            Err(e) => return fail(report, e.to_string()),
        };
        report.planned = plan.changes.len();
        report.commit = commit;
        if settings.source == Source::Worktree {
            report.commit = self.repo().and_then(crate::load::git::commit_in);
        }
        if !plan.has_changes() {
            report.ok = true;
            return (report, Vec::new());
        }
        if settings.source == Source::Worktree {
            let head = self
                .repo()
                .and_then(|repo| crate::load::git::head_in(repo, &settings.dir));
            plan.source.commit = head.as_ref().and_then(|h| h.commit.clone());
            plan.source.dirty = head.is_some_and(|h| h.dirty);
            report.commit = plan.source.commit.clone();
            report.dirty = plan.source.dirty;
        }
        let guard = match LockGuard::acquire(registry, "daemon reconcile") {
            Ok(g) => g,
            Err(e) => return fail(report, format!("{e}; will try again")),
        };
        let opts = ApplyOptions {
            allow_delete: true,
            max_deletes: settings.max_deletes,
            allow_dirty: true,
            applied_by: format!("touchctl-daemon@{}", crate::registry::hostname()),
        };
        if let Err(e) = apply::check_guards(&plan, &opts) {
            return fail(report, e.to_string());
        }
        let outcomes =
            apply::execute_holding(&plan, registry, &opts, &|| guard.held(), &mut |_| {});
        drop(guard);
        let mut failed = Vec::new();
        let mut written = Vec::new();
        for o in &outcomes {
            match (&o.result, o.action) {
                (Ok(_), Action::Create) => report.created += 1,
                (Ok(_), Action::Update) => report.updated += 1,
                (Ok(_), Action::Delete) => report.deleted += 1,
                (Ok(_), Action::NoOp) => {}
                (Err(e), _) => failed.push(format!("{}: {e}", o.id)),
            }
            if o.result.is_ok() {
                written.push(o.id.clone());
            }
        }
        if failed.is_empty() {
            report.ok = true;
        } else {
            report.error = Some(format!(
                "{} change(s) did not land (they are tried again on the next reconcile): {}",
                failed.len(),
                failed.join("; ")
            ));
        }
        (report, written)
    }

    /// The work tree's git repository (`None` outside one), kept open between reconciles: it
    /// then reads its index again only when the index changed.
    fn repo(&mut self) -> Option<&git2::Repository> {
        if self.repo.is_none() {
            self.repo = git2::Repository::discover(&self.settings.dir).ok();
        }
        self.repo.as_ref()
    }

    /// Reads the tree (the files that changed) from the work tree or the git ref.
    fn load(&mut self) -> Result<(Reload, Option<String>), LoadFailure> {
        let result = match &self.settings.source {
            Source::Worktree => self.cache.load_dir(&self.settings.dir).map(|r| (r, None)),
            Source::Git(rev) => {
                let mut listing = crate::load::git::list_at(&self.settings.dir, rev)
                    .map_err(|e| LoadFailure::Other(e.to_string()))?;
                let files = std::mem::take(&mut listing.files);
                self.cache
                    .load_blobs(files, |path, oid| listing.read(path, oid))
                    .map(|r| (r, Some(listing.revision.commit.clone())))
            }
        };
        result.map_err(|e| match e {
            LoadError::Invalid(d) => LoadFailure::Invalid(d),
            other => LoadFailure::Other(other.to_string()),
        })
    }
}

fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "toml")
}

enum LoadFailure {
    Invalid(Vec<Diagnostic>),
    Other(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(Source::parse("worktree"), Ok(Source::Worktree));
        assert_eq!(Source::parse("git:main"), Ok(Source::Git("main".into())));
        assert!(Source::parse("git:").is_err());
        assert!(Source::parse("main").unwrap_err().contains("git:REF"));
    }
}
