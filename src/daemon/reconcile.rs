//! Reconcile: make the registry match the files, as `apply` would, from inside the daemon. A tree
//! with any problem changes nothing (the last good set keeps serving) and the problem is kept for
//! `/v1/status`. With a git source only committed content of the ref is read.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::apply::{self, ApplyOptions};
use crate::load::{Diagnostic, LoadError};
use crate::model::SecretPolicy;
use crate::plan::Action;
use crate::planner::{PlanError, make_plan};
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
                "reconciled: {} created, {} updated, {} deleted",
                self.created, self.updated, self.deleted
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

/// Loads the files, plans against the registry, and applies the plan.
pub fn reconcile(settings: &Settings, registry: &dyn Registry) -> Report {
    let mut report = Report {
        at: crate::registry::now(),
        ..Report::default()
    };
    let fail = |mut report: Report, error: String| {
        report.error = Some(error);
        report
    };
    let (desired, commit) = match load(&settings.dir, &settings.source) {
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
    let mut plan = match make_plan(&desired, &settings.dir, registry, &settings.secrets) {
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
    if let Source::Git(_) = settings.source {
        plan.source.commit = commit.clone();
        plan.source.dirty = false;
    }
    report.commit = plan.source.commit.clone();
    if !plan.has_changes() {
        report.ok = true;
        return report;
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
    let outcomes = apply::execute_holding(&plan, registry, &opts, &|| guard.held(), &mut |_| {});
    drop(guard);
    let mut failed = Vec::new();
    for o in &outcomes {
        match (&o.result, o.action) {
            (Ok(_), Action::Create) => report.created += 1,
            (Ok(_), Action::Update) => report.updated += 1,
            (Ok(_), Action::Delete) => report.deleted += 1,
            (Ok(_), Action::NoOp) => {}
            (Err(e), _) => failed.push(format!("{}: {e}", o.id)),
        }
    }
    if failed.is_empty() {
        report.ok = true;
        report
    } else {
        fail(
            report,
            format!(
                "{} change(s) did not land (they are tried again on the next reconcile): {}",
                failed.len(),
                failed.join("; ")
            ),
        )
    }
}

enum LoadFailure {
    Invalid(Vec<Diagnostic>),
    Other(String),
}

fn load(
    dir: &Path,
    source: &Source,
) -> Result<(crate::load::Desired, Option<String>), LoadFailure> {
    let result = match source {
        Source::Worktree => crate::load::load_dir(dir).map(|d| (d, None)),
        Source::Git(rev) => {
            let (revision, sources) =
                crate::git::sources_at(dir, rev).map_err(|e| LoadFailure::Other(e.to_string()))?;
            crate::load::load_sources(sources).map(|d| (d, Some(revision.commit)))
        }
    };
    result.map_err(|e| match e {
        LoadError::Invalid(d) => LoadFailure::Invalid(d),
        other => LoadFailure::Other(other.to_string()),
    })
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
