//! Runs a plan against the registry. First every guard (the plan is for this registry and sealed
//! under its key, nothing it touches changed since, deletes are allowed, protected touchpoints
//! stay), then each change as its own compare-and-swap write. A failing change does not stop the others; the report says which
//! landed and which did not, and running apply again converges.

use crate::plan::{Action, Broken, Change, Plan};
use crate::registry::{Provenance, Put, Registry};

/// What apply is allowed to do.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Deletes are allowed at all.
    pub allow_delete: bool,
    /// At most this many deletes in one apply.
    pub max_deletes: usize,
    /// Apply files with uncommitted changes (recorded as from a dirty tree).
    pub allow_dirty: bool,
    /// Recorded as who applied (`user@host`).
    pub applied_by: String,
}

/// Why apply refused to start. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The saved plan was made against another registry.
    #[error(
        "this plan was made against registry {plan} ({backend}), not this one ({this}): make a new plan against this registry"
    )]
    OtherRegistry {
        /// The plan's registry id.
        plan: String,
        /// The plan's registry description.
        backend: String,
        /// This registry's id.
        this: String,
    },
    /// The saved plan compares the files with a git revision, not with a registry.
    #[error(
        "this plan compares the files with `{0}` (plan --base), not with a registry, so it cannot be applied: run `touchctl plan --out FILE` against the registry and apply that"
    )]
    Review(String),
    /// The saved plan's format is not one this build reads.
    #[error("this plan has format_version {0}; this touchctl applies format_version {version}: make the plan again with this touchctl", version = crate::plan::FORMAT_VERSION)]
    Format(String),
    /// The saved plan carries no seal.
    #[error(
        "this plan carries no seal (`mac`), so nothing shows that it is the plan that was made and reviewed: it was saved by an older touchctl, or its seal was removed. Make the plan again with `touchctl plan --out FILE`, review it, and apply that"
    )]
    Unsealed,
    /// The saved plan was edited after it was made: what it would apply is not what it showed.
    #[error("the plan file was changed after `touchctl plan` saved it, so what it would apply is not what was reviewed:\n{}\nNothing was applied. Make the plan again and review it; never edit a saved plan.", .0.join("\n"))]
    Tampered(Vec<String>),
    /// Touchpoints changed live since the plan was made.
    #[error("the plan is stale: {} touchpoint(s) changed in the registry since it was made:\n{}\nRun plan again, review it, and apply the new plan.", .0.len(), .0.join("\n"))]
    Stale(Vec<String>),
    /// The saved plan holds specs that are not valid touchpoints (edited by hand?).
    #[error("the plan file holds invalid touchpoints:\n{}\nMake the plan again instead of editing it.", .0.join("\n"))]
    Malformed(Vec<String>),
    /// Guards on deletes.
    #[error("apply refused:\n{}", .0.join("\n"))]
    Guards(Vec<String>),
    /// The files have uncommitted changes, so the registry could not record where they came from.
    #[error(
        "the touchpoint folder has uncommitted changes (see `git status`), so the registry could not record which commit each touchpoint came from: commit them first, or pass --allow-dirty to apply them anyway (recorded as a dirty tree)"
    )]
    Dirty,
    /// A saved plan was made from files with uncommitted changes: it records that, whatever the
    /// folder holds now.
    #[error(
        "this plan was made while the touchpoint folder had uncommitted changes, so the registry could not record which commit its touchpoints came from (committing since does not change the plan): make the plan again from the committed files (`touchctl plan --out FILE`), or pass --allow-dirty to apply it anyway (recorded as a dirty tree)"
    )]
    DirtyPlan,
}

/// How one change went.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The touchpoint.
    pub id: String,
    /// What was attempted.
    pub action: Action,
    /// The new generation (none after a delete), or why it failed.
    pub result: Result<Option<u64>, String>,
}

/// Checks that a saved plan can be applied to `registry` exactly as it was made.
pub fn check_saved(plan: &Plan, registry: &dyn Registry) -> Result<(), Refused> {
    if plan.format_version != crate::plan::FORMAT_VERSION {
        return Err(Refused::Format(plan.format_version.clone()));
    }
    let Some(made_against) = &plan.registry else {
        let rev = plan
            .base
            .as_ref()
            .map_or("a git revision", |b| b.rev.as_str());
        return Err(Refused::Review(rev.to_string()));
    };
    if made_against.id != registry.registry_id() {
        return Err(Refused::OtherRegistry {
            plan: made_against.id.clone(),
            backend: made_against.backend.clone(),
            this: registry.registry_id().to_string(),
        });
    }
    verify_seal(plan, registry)?;
    let malformed: Vec<String> = plan
        .changes
        .iter()
        .filter_map(|c| {
            let spec = c.desired.as_ref()?;
            let spec = spec.value();
            let id_matches = spec.get("id").and_then(|v| v.as_str()) == Some(c.id.as_str());
            let problem = if id_matches {
                crate::load::check_spec(&spec).err()?
            } else {
                "its desired spec has another id".to_string()
            };
            Some(format!("  {}: {problem}", c.id))
        })
        .collect();
    if !malformed.is_empty() {
        return Err(Refused::Malformed(malformed));
    }
    let live: std::collections::BTreeMap<String, u64> = registry
        .list()
        .map_err(|e| Refused::Guards(vec![format!("  cannot read the registry: {e}")]))?
        .into_iter()
        .map(|l| (l.id, l.generation))
        .collect();
    let stale: Vec<String> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::NoOp)
        .filter_map(|c| {
            let now = live.get(&c.id).copied();
            (now != c.live_generation).then(|| {
                let show = |g: Option<u64>| {
                    g.map_or_else(|| "absent".to_string(), |g| format!("generation {g}"))
                };
                format!(
                    "  {}: planned against {}, now {}",
                    c.id,
                    show(c.live_generation),
                    show(now)
                )
            })
        })
        .collect();
    if stale.is_empty() {
        Ok(())
    } else {
        Err(Refused::Stale(stale))
    }
}

/// Checks that the plan is the one `touchctl plan` sealed under this registry's key (see
/// [`crate::plan::seal()`]), naming each change that is not.
fn verify_seal(plan: &Plan, registry: &dyn Registry) -> Result<(), Refused> {
    match crate::plan::verify(plan, registry.fingerprinter()) {
        Ok(()) => Ok(()),
        Err(Broken::Unsealed) => Err(Refused::Unsealed),
        Err(Broken::Changes(ids)) => Err(Refused::Tampered(
            ids.iter()
                .map(|id| {
                    format!(
                        "  {id}: differs from the change that was planned (its spec, fields, fingerprints or file), or was not in the plan at all"
                    )
                })
                .collect(),
        )),
        Err(Broken::Header) => Err(Refused::Tampered(vec![
            "  the plan around the changes (its source, registry or summary) was edited, or a change was removed or reordered".into(),
        ])),
    }
}

/// Refuses a saved plan made from uncommitted files, unless `--allow-dirty`: said of the plan, since
/// the folder may be clean by now.
pub fn check_saved_source(plan: &Plan, opts: &ApplyOptions) -> Result<(), Refused> {
    if plan.source.dirty && !opts.allow_dirty {
        return Err(Refused::DirtyPlan);
    }
    Ok(())
}

/// Checks the delete guards: `--allow-delete`, `--max-deletes`, `protect = true`.
pub fn check_guards(plan: &Plan, opts: &ApplyOptions) -> Result<(), Refused> {
    if plan.source.dirty && !opts.allow_dirty {
        return Err(Refused::Dirty);
    }
    let deletes: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action == Action::Delete)
        .collect();
    let mut problems = Vec::new();
    for c in deletes.iter().filter(|c| c.protected) {
        problems.push(format!(
            "  {}: is protected (protect = true) and its file is gone. To delete it, restore the file, set protect = false, apply, then remove the file.",
            c.id
        ));
    }
    if !deletes.is_empty() && !opts.allow_delete {
        let ids: Vec<&str> = deletes.iter().map(|c| c.id.as_str()).collect();
        problems.push(format!(
            "  the plan deletes {} touchpoint(s) ({}): pass --allow-delete to allow deletes",
            ids.len(),
            ids.join(", ")
        ));
    }
    if deletes.len() > opts.max_deletes {
        problems.push(format!(
            "  the plan deletes {} touchpoints, more than --max-deletes {}: check that the touchpoint folder is the right one, or raise --max-deletes",
            deletes.len(),
            opts.max_deletes
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refused::Guards(problems))
    }
}

/// Applies every change of the plan, calling `progress` after each. Returns every outcome.
pub fn execute(
    plan: &Plan,
    registry: &dyn Registry,
    opts: &ApplyOptions,
    progress: &mut dyn FnMut(&Outcome),
) -> Vec<Outcome> {
    execute_holding(plan, registry, opts, &|| Ok(()), progress)
}

/// [`execute`] under the registry lock: `held` (e.g. [`crate::registry::LockGuard::held`]) is
/// asked before each change, and once the lock is lost no further change is written (each is
/// reported as not applied, with why).
pub fn execute_holding(
    plan: &Plan,
    registry: &dyn Registry,
    opts: &ApplyOptions,
    held: &dyn Fn() -> Result<(), String>,
    progress: &mut dyn FnMut(&Outcome),
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut lost = None;
    for c in plan.changes.iter().filter(|c| c.action != Action::NoOp) {
        if lost.is_none() {
            lost = held().err();
        }
        let result = match (c.action, &c.desired) {
            _ if lost.is_some() => Err(format!(
                "not applied: {}",
                lost.as_deref().unwrap_or_default()
            )),
            (Action::Create | Action::Update, Some(spec)) => {
                let put = Put {
                    id: c.id.clone(),
                    kind: c.kind.clone(),
                    spec: spec.clone(),
                    fingerprints: c.fingerprints.clone(),
                    applied_by: opts.applied_by.clone(),
                    source: Provenance {
                        commit: plan.source.commit.clone(),
                        dirty: plan.source.dirty,
                        file: c.file.clone(),
                    },
                };
                registry
                    .put(&put, c.live_generation)
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            (Action::Delete, _) => match c.live_generation {
                Some(g) => registry
                    .delete(&c.id, g)
                    .map(|()| None)
                    .map_err(|e| e.to_string()),
                None => Err("the plan has no live generation for this delete".into()),
            },
            _ => Err("the plan has no desired spec for this change".into()),
        };
        let outcome = Outcome {
            id: c.id.clone(),
            action: c.action,
            result,
        };
        progress(&outcome);
        outcomes.push(outcome);
    }
    outcomes
}
