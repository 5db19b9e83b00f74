//! Runs each command: the second stage of configuration (real objects from what the user typed),
//! output, and the exit code. The work itself is in the library.

mod auth;
mod daemon;
mod dispatch;
mod sandbox;
mod state;

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::json;

use touchctl::apply::{self, ApplyOptions, Outcome};
use touchctl::import;
use touchctl::load::{self, Diagnostic, LoadError};
use touchctl::model::SecretPolicy;
use touchctl::model::schema::{self, Freshness};
use touchctl::plan::inputs::{BaseError, PlanError, TreeError, plan_base, plan_dir};
use touchctl::plan::{Action, Plan, TextOptions, render_markdown, render_text, seal};
use touchctl::registry::{LockGuard, Registry, whoami};
use touchctl::term::{self, escape};

use crate::cli::{Cli, ColorChoice, Command, Global, PlanFormat, ValidateFormat};

/// Exit code: success.
pub(crate) const OK: u8 = 0;
/// Exit code: error, or invalid files.
pub(crate) const FAILED: u8 = 1;
/// Exit code: changes present (`plan --detailed-exitcode`).
const CHANGES: u8 = 2;

/// Runs the parsed command line and returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global();
    match &cli.command {
        Command::Validate { format, .. } => validate(g, *format),
        Command::Schema { check, out } => schema_cmd(*check, out),
        Command::Plan {
            format,
            out,
            detailed_exitcode,
            base,
            refresh,
            allow_private_network,
            ..
        } => plan_cmd(
            g,
            *format,
            out.as_deref(),
            *detailed_exitcode,
            base.as_deref(),
            refresh.then_some(*allow_private_network),
        ),
        Command::Apply {
            plan,
            auto_approve,
            allow_delete,
            max_deletes,
            allow_dirty,
            ..
        } => apply_cmd(
            g,
            plan.as_deref(),
            *auto_approve,
            ApplyOptions {
                allow_delete: *allow_delete,
                max_deletes: *max_deletes,
                allow_dirty: *allow_dirty,
                applied_by: whoami(),
            },
        ),
        Command::Import { ids, all, out, .. } => import_cmd(g, ids, *all, out.as_deref()),
        Command::Daemon(args) => daemon::daemon_cmd(g, args),
        Command::Dispatch(args) => dispatch::dispatch_cmd(g, args),
        Command::Auth(command) => auth::auth_cmd(command),
        Command::Sandbox(args) => sandbox::sandbox_cmd(g, args),
        Command::State(command) => state::state_cmd(g, command),
        Command::Deliveries { command, queue, .. } => {
            daemon::deliveries_cmd(g, command, queue.as_deref())
        }
        Command::ForceUnlock {
            lock_id,
            daemon,
            force,
            queue,
            ..
        } => match lock_id {
            _ if *daemon => daemon::release_queue_cmd(g, queue.as_deref(), *force),
            Some(lock_id) => force_unlock(g, lock_id, *force),
            None => {
                bail!("name the registry lock id to remove, or pass --daemon to release the queue")
            }
        },
    }
}

fn color(g: &Global) -> bool {
    match g.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        }
    }
}

/// Opens the registry --state names: a PostgreSQL database (`postgres://`), or the SQLite file,
/// where there is none a new registry that only a write creates.
/// A SQLite registry moved into PostgreSQL is still read (plan), with a warning: apply refuses it.
fn open_registry(g: &Global) -> Result<Box<dyn Registry>> {
    let registry = touchctl::registry::open(&g.state)?;
    let is_file = !g
        .state
        .to_str()
        .is_some_and(touchctl::registry::is_postgres_url);
    if is_file
        && !registry.is_new()
        && let Ok(Some(moved)) =
            touchctl::registry::SqliteRegistry::open(&g.state).and_then(|r| r.moved_to())
    {
        eprintln!(
            "warning: the registry {} was moved into {} at {} (`touchctl state migrate`): it is no longer the one in use, and apply refuses it. Use --state {}",
            escape(&g.state.display().to_string()),
            escape(&moved.to),
            escape(&moved.at),
            escape(&moved.to)
        );
    }
    Ok(registry)
}

/// --state for a message: a PostgreSQL URL without its password.
fn shown_state(g: &Global) -> String {
    touchctl::registry::shown_state(&g.state)
}

fn force_unlock(g: &Global, lock_id: &str, force: bool) -> Result<u8> {
    let registry = open_registry(g)?;
    if registry.is_new() {
        bail!(
            "there is no registry at {}, so there is no lock to remove: check --state",
            shown_state(g)
        );
    }
    let held = registry.force_unlock(lock_id, force)?;
    println!(
        "Removed lock {} ({}).",
        escape(&held.lock_id),
        escape(&held.to_string())
    );
    Ok(OK)
}

/// Takes the registry lock for apply, saying so when it was taken over from a holder that is gone.
fn lock_for_apply(registry: &dyn Registry) -> Result<LockGuard<'_>> {
    let guard = LockGuard::acquire(registry, "apply")?;
    if let Some(old) = &guard.recovered {
        eprintln!(
            "warning: took over the registry lock ({}): {}",
            escape(&old.to_string()),
            old.standing(touchctl::store::now_ms()).why_free()
        );
    }
    Ok(guard)
}

fn count_files(diagnostics: &[Diagnostic]) -> usize {
    diagnostics
        .iter()
        .map(|d| d.path.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Prints every diagnostic of an invalid tree.
fn report_invalid(diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        println!("{d}");
    }
    eprintln!(
        "error: {} problem(s) in {} file(s); nothing was changed. Fix them and run again.",
        diagnostics.len(),
        count_files(diagnostics)
    );
}

/// Warns that a tree has no touchpoint files (a mistyped --dir, most likely).
fn warn_if_empty(g: &Global, desired: &load::Desired) {
    if desired.touchpoints.is_empty() && !g.quiet {
        eprintln!(
            "warning: no touchpoint files (*.toml) under {}",
            g.dir.display()
        );
    }
}

/// What secret references may read: the repository holding --dir, --secrets-dir, and the
/// variables --secret-env-allow names.
pub(crate) fn secret_policy(g: &Global) -> SecretPolicy {
    SecretPolicy::new(touchctl::load::git::repository_root(&g.dir).as_deref())
        .with_secrets_dir(g.secrets_dir.clone())
        .with_env_allow(g.secret_env_allow.clone())
}

/// Loads the tree and plans it; on invalid files or secrets that cannot be read prints every
/// diagnostic and returns `None`.
fn plan_tree(g: &Global, registry: &dyn Registry) -> Result<Option<Plan>> {
    match plan_dir(&g.dir, registry, &secret_policy(g)) {
        Ok((desired, plan)) => {
            warn_if_empty(g, &desired);
            Ok(Some(plan))
        }
        Err(
            TreeError::Load(LoadError::Invalid(diagnostics))
            | TreeError::Plan(PlanError::Secrets(diagnostics)),
        ) => {
            report_invalid(&diagnostics);
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn validate(g: &Global, format: ValidateFormat) -> Result<u8> {
    let result = load::load_dir(&g.dir);
    let (count, diagnostics) = match result {
        Ok(d) => (d.touchpoints.len(), Vec::new()),
        Err(LoadError::Invalid(diagnostics)) => (0, diagnostics),
        Err(e) => return Err(e.into()),
    };
    let valid = diagnostics.is_empty();
    match format {
        ValidateFormat::Json => {
            let doc = json!({
                "format_version": "1",
                "valid": valid,
                "touchpoints": count,
                "diagnostics": diagnostics,
            });
            println!("{}", term::json(serde_json::to_string_pretty(&doc)?));
        }
        ValidateFormat::Text => {
            for d in &diagnostics {
                println!("{d}");
            }
            if valid {
                if !g.quiet {
                    println!(
                        "ok: {count} touchpoint(s) under {} are valid",
                        g.dir.display()
                    );
                }
            } else {
                eprintln!(
                    "error: {} problem(s) in {} file(s)",
                    diagnostics.len(),
                    count_files(&diagnostics)
                );
            }
        }
    }
    Ok(if valid { OK } else { FAILED })
}

fn schema_cmd(check: bool, out: &Path) -> Result<u8> {
    if !check {
        schema::write(out).with_context(|| format!("cannot write {}", out.display()))?;
        println!("wrote {}", out.display());
        return Ok(OK);
    }
    match schema::check(out).with_context(|| format!("cannot read {}", out.display()))? {
        Freshness::Current => {
            println!("{} is current", out.display());
            Ok(OK)
        }
        Freshness::Stale(line) => {
            eprintln!(
                "error: {} is stale (first difference at line {line}): run `touchctl schema` and commit the result",
                out.display()
            );
            Ok(FAILED)
        }
        Freshness::Missing => {
            eprintln!(
                "error: {} does not exist: run `touchctl schema` and commit the result",
                out.display()
            );
            Ok(FAILED)
        }
    }
}

/// Plans the work tree against the files at git revision `rev`; on invalid files (on either side)
/// prints every diagnostic and returns `None`.
fn plan_against_base(g: &Global, rev: &str) -> Result<Option<Plan>> {
    match plan_base(&g.dir, rev) {
        Ok((desired, plan)) => {
            warn_if_empty(g, &desired);
            Ok(Some(plan))
        }
        Err(BaseError::Head(LoadError::Invalid(diagnostics))) => {
            report_invalid(&diagnostics);
            Ok(None)
        }
        Err(BaseError::Base { rev, diagnostics }) => {
            for d in &diagnostics {
                println!("{d}");
            }
            eprintln!(
                "error: the touchpoint files at `{rev}` have {} problem(s) in {} file(s), so the work tree cannot be compared with them. Compare with a revision whose files are valid.",
                diagnostics.len(),
                count_files(&diagnostics)
            );
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn plan_cmd(
    g: &Global,
    format: PlanFormat,
    out: Option<&Path>,
    detailed_exitcode: bool,
    base: Option<&str>,
    refresh: Option<bool>,
) -> Result<u8> {
    let plan = match base {
        Some(rev) => plan_against_base(g, rev)?.map(|mut plan| {
            if let Some(allow_private) = refresh {
                let found = refresh_platforms(g, allow_private, None);
                (plan.warnings, plan.checked) = (found.warnings, found.checked);
            }
            plan
        }),
        None => {
            let registry: Arc<dyn Registry> = Arc::from(open_registry(g)?);
            let mut plan = plan_tree(g, &*registry)?;
            if let (Some(plan), Some(allow_private)) = (&mut plan, refresh) {
                let found = refresh_platforms(g, allow_private, Some(registry.clone()));
                (plan.warnings, plan.checked) = (found.warnings, found.checked);
            }
            // A saved plan is applied only to the registry it was made against: a new one is
            // created now, with the keys the plan's fingerprints were made with.
            if plan.is_some() && out.is_some() {
                registry.persist()?;
            }
            // A plan that leaves as JSON may come back to `apply FILE`: seal it to its content.
            if let Some(plan) = &mut plan
                && (out.is_some() || format == PlanFormat::Json)
            {
                seal(plan, registry.fingerprinter());
            }
            plan
        }
    };
    let Some(plan) = plan else {
        return Ok(FAILED);
    };
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&plan)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write the plan to {}", path.display()))?;
    }
    match format {
        PlanFormat::Json => println!("{}", term::json(serde_json::to_string_pretty(&plan)?)),
        PlanFormat::Markdown => print!("{}", render_markdown(&plan)),
        PlanFormat::Text => {
            print!("{}", render_text(&plan, TextOptions { color: color(g) }));
            if g.verbose {
                for c in plan.changes.iter().filter(|c| c.action == Action::NoOp) {
                    println!("  = {} ({}) unchanged", escape(&c.id), escape(&c.kind));
                }
            }
        }
    }
    if let Some(path) = out
        && !g.quiet
    {
        eprintln!(
            "Saved the plan to {}. Apply exactly this plan with: touchctl apply {}",
            path.display(),
            path.display()
        );
    }
    Ok(if detailed_exitcode && plan.has_changes() {
        CHANGES
    } else {
        OK
    })
}

/// `plan --refresh`: the channel touchpoints of the tree checked live (the tree loaded already, so
/// it loads again without error). `registry` is the one the plan read, if it read one.
fn refresh_platforms(
    g: &Global,
    allow_private: bool,
    registry: Option<Arc<dyn Registry>>,
) -> touchctl::plan::inputs::Refreshed {
    let not_checked =
        |e: String| touchctl::plan::inputs::Refreshed::not_checked(format!("not checked: {e}"));
    // Open platforms get their component token with the verify ticket the daemon keeps there.
    let opened = registry.map_or_else(|| open_registry(g).map(Arc::from), Ok);
    let tickets = match opened {
        Ok(r) => Arc::new(touchctl::registry::Tickets(r)),
        Err(e) => return not_checked(e.to_string()),
    };
    match load::load_dir(&g.dir) {
        Ok(desired) => {
            touchctl::plan::inputs::refresh(&desired, &secret_policy(g), allow_private, tickets)
        }
        Err(e) => not_checked(e.to_string()),
    }
}

fn read_saved_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the plan file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a plan saved by `touchctl plan --out`",
            path.display()
        )
    })
}

fn confirm(plan: &Plan, registry: &dyn Registry) -> Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "apply needs confirmation, and standard input is not a terminal: review the plan, then run again with --auto-approve"
        );
    }
    let n = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::NoOp)
        .count();
    eprint!(
        "\nApply {n} change(s) to {}? Only 'yes' is accepted: ",
        registry.describe()
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

fn apply_cmd(
    g: &Global,
    saved: Option<&Path>,
    auto_approve: bool,
    opts: ApplyOptions,
) -> Result<u8> {
    let registry = open_registry(g)?;
    let saved_plan = saved.map(read_saved_plan).transpose()?;
    if let Some(made_against) = saved_plan.as_ref().and_then(|p| p.registry.as_ref())
        && registry.is_new()
    {
        bail!(
            "there is no registry at {}, and this plan was made against registry {} ({}): point --state at that registry, or make a new plan",
            shown_state(g),
            made_against.id,
            made_against.backend
        );
    }
    // A new registry has no file, so no one else can hold its lock: it is taken (and the file
    // created) only once there is something to write, so that a refused or cancelled apply
    // leaves nothing behind.
    let early = if registry.is_new() {
        None
    } else {
        Some(lock_for_apply(&*registry)?)
    };
    let plan = match saved_plan {
        Some(plan) => {
            apply::check_saved(&plan, &*registry)?;
            apply::check_saved_source(&plan, &opts)?;
            plan
        }
        None => match plan_tree(g, &*registry)? {
            Some(plan) => plan,
            None => return Ok(FAILED),
        },
    };
    if !g.quiet {
        print!("{}", render_text(&plan, TextOptions { color: color(g) }));
    }
    if !plan.has_changes() {
        return Ok(OK);
    }
    apply::check_guards(&plan, &opts)?;
    if saved.is_none() && !auto_approve && !confirm(&plan, &*registry)? {
        eprintln!("Apply cancelled; nothing was changed.");
        return Ok(FAILED);
    }
    let guard = match early {
        Some(guard) => guard,
        None => lock_for_apply(&*registry)?,
    };
    println!();
    let mut progress = |o: &Outcome| {
        let verb = match o.action {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::NoOp => "keep",
        };
        let id = escape(&o.id);
        match &o.result {
            Ok(Some(generation)) => println!("  {verb} {id}: done (generation {generation})"),
            Ok(None) => println!("  {verb} {id}: done"),
            Err(e) => println!("  {verb} {id}: FAILED: {}", escape(&e.to_string())),
        }
    };
    let outcomes =
        apply::execute_holding(&plan, &*registry, &opts, &|| guard.held(), &mut progress);
    drop(guard);
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let count = |a: Action| {
        outcomes
            .iter()
            .filter(|o| o.action == a && o.result.is_ok())
            .count()
    };
    let landed = format!(
        "{} created, {} updated, {} deleted",
        count(Action::Create),
        count(Action::Update),
        count(Action::Delete)
    );
    if failed.is_empty() {
        println!("\nApply complete: {landed}.");
        return Ok(OK);
    }
    let landed_ids: Vec<_> = outcomes
        .iter()
        .filter(|o| o.result.is_ok())
        .map(|o| escape(&o.id))
        .collect();
    let failed_ids: Vec<_> = failed.iter().map(|o| escape(&o.id)).collect();
    println!(
        "\nApply incomplete: {} of {} change(s) landed ({landed}).\n  landed: {}\n  not applied: {}\nThe registry holds every change that landed; fix the cause and run apply again to converge.",
        landed_ids.len(),
        outcomes.len(),
        if landed_ids.is_empty() {
            "none".to_string()
        } else {
            landed_ids.join(", ")
        },
        failed_ids.join(", ")
    );
    Ok(FAILED)
}

fn import_cmd(g: &Global, ids: &[String], all: bool, out: Option<&Path>) -> Result<u8> {
    if ids.is_empty() && !all {
        bail!(
            "name the live touchpoints to import (`touchctl import ID...`), or pass --all to import every live touchpoint that has no file"
        );
    }
    if out.is_some() && ids.len() > 1 {
        bail!(
            "--out names one file, but {} ids were given: import them one at a time with --out, or leave --out away to write <dir>/<id>.toml",
            ids.len()
        );
    }
    let registry = open_registry(g)?;
    let desired = match load::load_dir(&g.dir) {
        Ok(d) => d,
        Err(LoadError::NoDir(_)) => load::Desired::default(),
        Err(LoadError::Invalid(diagnostics)) => {
            for d in &diagnostics {
                println!("{d}");
            }
            eprintln!(
                "error: {} problem(s) in {} file(s): fix them first, so that import knows which touchpoints the files already describe",
                diagnostics.len(),
                count_files(&diagnostics)
            );
            return Ok(FAILED);
        }
        Err(e) => return Err(e.into()),
    };
    let live = registry.list()?;
    let policy = secret_policy(g);
    let (targets, mut problems) = import::select(&live, &desired, ids, all, &registry.describe());
    if all && targets.is_empty() && !g.quiet {
        println!("Nothing to import: every live touchpoint already has a file.");
    }
    let mut written = 0;
    for live in targets {
        let path = match out {
            Some(p) => p.to_path_buf(),
            None => import::default_path(&g.dir, live),
        };
        let written_file = import::write(
            live,
            &path,
            Path::new(schema::DEFAULT_PATH),
            &*registry,
            &policy,
        );
        match written_file {
            Ok(warnings) => {
                written += 1;
                let shown = escape(&path.display().to_string()).into_owned();
                println!(
                    "wrote {shown} ({} `{}`, generation {})",
                    escape(&live.kind),
                    escape(&live.id),
                    live.generation
                );
                for w in warnings {
                    eprintln!("warning: {shown}: {}", escape(&w));
                }
            }
            Err(e) => problems.push(format!("{}: {e}", live.id)),
        }
    }
    if written > 0 && !g.quiet {
        println!(
            "\nNext: `touchctl validate && touchctl plan` shows no change for the imported touchpoint(s); review and commit the file(s)."
        );
    }
    for p in &problems {
        eprintln!("error: {}", escape(p));
    }
    Ok(if problems.is_empty() { OK } else { FAILED })
}
