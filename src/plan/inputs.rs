//! Gathers what a plan needs and makes it: the desired touchpoints (already loaded), their secrets
//! resolved to keyed fingerprints, and the live state from the registry; then [`plan::diff`].
//! Secrets touchctl writes itself ([`crate::model::STATE_SECRETS`], an authorizer refresh token)
//! are neither read nor fingerprinted: a binding is not a change of the desired state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use rayon::prelude::*;

use crate::load::{Desired, Diagnostic};
use crate::model::{SecretPolicy, SecretRef};
use crate::plan::{self, DesiredSpec, Plan, RegistryRef, Source};
use crate::registry::{Registry, RegistryError, now};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Some secret references could not be read, or were refused; each is a diagnostic at the
    /// reference's line.
    #[error("{} secret reference(s) cannot be read:\n{}", .0.len(), .0.iter().map(|d| format!("  {d}")).collect::<Vec<_>>().join("\n"))]
    Secrets(Vec<Diagnostic>),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Where a secret reference points, so that touchpoints sharing a secret read it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Origin<'a> {
    Env(&'a str),
    File(&'a Path, &'a str),
}

/// Secret origins are few and short: a fast hasher (seeded per map) beats SipHash here.
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

fn key<'a>(r: &'a SecretRef, dir: &'a Path) -> Origin<'a> {
    match r {
        SecretRef::Env { env } => Origin::Env(env),
        SecretRef::File { file } => Origin::File(dir, file),
    }
}

/// Fingerprints every secret of every desired touchpoint under the registry's key, reading only
/// what `policy` allows. Each distinct secret is read and hashed once, however many touchpoints
/// name it.
pub fn fingerprints(
    desired: &Desired,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Vec<BTreeMap<String, String>>, PlanError> {
    let mut distinct: Fast<Origin<'_>, (&SecretRef, &Path)> = Fast::default();
    for l in &desired.touchpoints {
        for (_, r) in l.touchpoint.desired_secrets() {
            distinct.entry(key(r, &l.dir)).or_insert((r, &l.dir));
        }
    }
    let fp = registry.fingerprinter();
    let resolved: Fast<Origin<'_>, Result<String, (&'static str, String)>> = distinct
        .into_par_iter()
        .map(|(o, (r, dir))| {
            let result = r
                .resolve(dir, policy)
                .map(|secret| fp.fingerprint(&secret))
                .map_err(|e| (e.code(), e.to_string()));
            (o, result)
        })
        .collect();
    let per_touchpoint: Vec<(BTreeMap<String, String>, Vec<Diagnostic>)> = desired
        .touchpoints
        .par_iter()
        .map(|l| {
            let mut out = BTreeMap::new();
            let mut errors = Vec::new();
            for (path, r) in l.touchpoint.desired_secrets() {
                match &resolved[&key(r, &l.dir)] {
                    Ok(f) => {
                        out.insert(path.to_string(), f.clone());
                    }
                    Err((code, e)) => {
                        let (line, column) = l
                            .secret_at
                            .iter()
                            .find(|(p, _)| *p == path)
                            .map_or((1, 1), |(_, at)| *at);
                        errors.push(Diagnostic {
                            path: l.file.clone(),
                            line,
                            column,
                            severity: "error",
                            code,
                            message: format!("`{path}` {r}: {e}"),
                        });
                    }
                }
            }
            (out, errors)
        })
        .collect();
    let errors: Vec<Diagnostic> = per_touchpoint
        .iter()
        .flat_map(|(_, e)| e.iter().cloned())
        .collect();
    if errors.is_empty() {
        Ok(per_touchpoint.into_iter().map(|(f, _)| f).collect())
    } else {
        Err(PlanError::Secrets(errors))
    }
}

/// Makes the plan that brings `registry` to `desired`, which was read from `dir`; secrets are read
/// as `policy` allows.
pub fn make_plan(
    desired: &Desired,
    dir: &Path,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Plan, PlanError> {
    let live = registry.list()?;
    plan_against(desired, live, source_of(dir), registry, policy)
}

/// Makes the plan for the touchpoints `only` (desired, live or both) and leaves every other one
/// out, as if it were unchanged: what apply would change for them. Each of them is read from the
/// registry alone, so the cost follows their number, not the registry's. `source` is recorded as
/// where the files came from; secrets are read as `policy` allows.
pub fn plan_only(
    desired: &Desired,
    only: &BTreeSet<String>,
    source: Source,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Plan, PlanError> {
    let subset = Desired {
        touchpoints: desired
            .touchpoints
            .iter()
            .filter(|l| only.contains(l.touchpoint.id()))
            .cloned()
            .collect(),
    };
    let mut live = Vec::with_capacity(only.len());
    for id in only {
        live.extend(registry.get(id)?);
    }
    plan_against(&subset, live, source, registry, policy)
}

/// Makes the plan that brings `registry` to `desired`, recording `source` as where the files came
/// from (instead of asking git about their folder, as [`make_plan`] does); secrets are read as
/// `policy` allows.
pub fn plan_from(
    desired: &Desired,
    source: Source,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Plan, PlanError> {
    let live = registry.list()?;
    plan_against(desired, live, source, registry, policy)
}

/// Loads the tree under `dir` and plans it against `registry`, reading secrets as `policy`
/// allows. The registry is read while the files are parsed, since reading it is mostly waiting on
/// one core.
pub fn plan_dir(
    dir: &Path,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<(Desired, Plan), TreeError> {
    let (desired, live) = rayon::join(|| crate::load::load_dir(dir), || registry.list());
    let desired = desired?;
    let live = live.map_err(PlanError::from)?;
    let plan = plan_against(&desired, live, source_of(dir), registry, policy)?;
    Ok((desired, plan))
}

/// Why a tree could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// The files could not be loaded, or have problems.
    #[error(transparent)]
    Load(#[from] crate::load::LoadError),
    /// The plan could not be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

fn plan_against(
    desired: &Desired,
    live: Vec<crate::registry::Live>,
    source: Source,
    registry: &dyn Registry,
    policy: &SecretPolicy,
) -> Result<Plan, PlanError> {
    let fps = fingerprints(desired, registry, policy)?;
    // A registry written before these were state may hold their fingerprints: not compared.
    let mut live = live;
    for l in &mut live {
        l.fingerprints
            .retain(|path, _| !crate::model::STATE_SECRETS.contains(&path.as_str()));
    }
    let specs: Vec<DesiredSpec<'_>> = desired
        .touchpoints
        .iter()
        .zip(fps)
        .map(|(l, fingerprints)| DesiredSpec {
            id: l.touchpoint.id(),
            kind: l.touchpoint.spec.name(),
            file: &l.file,
            spec: &l.spec,
            protect: l.touchpoint.common.protect,
            fingerprints,
        })
        .collect();
    let (changes, drift) = plan::diff(&specs, &live);
    // Many small allocations: free them on all cores.
    rayon::join(
        || live.into_par_iter().for_each(drop),
        || specs.into_par_iter().for_each(drop),
    );
    Ok(Plan {
        format_version: plan::FORMAT_VERSION.into(),
        touchctl_version: env!("CARGO_PKG_VERSION").into(),
        created_at: now(),
        registry: Some(RegistryRef {
            id: registry.registry_id().to_string(),
            backend: registry.describe(),
        }),
        base: None,
        source,
        summary: plan::summarize(&changes, &drift),
        changes,
        drift,
        warnings: Vec::new(),
        checked: Vec::new(),
        mac: None,
    })
}

/// Where files read from `dir` come from: its git commit, and whether it has uncommitted changes.
pub fn source_of(dir: &Path) -> Source {
    let head = crate::load::git::head(dir);
    Source {
        dir: dir.display().to_string(),
        commit: head.as_ref().and_then(|h| h.commit.clone()),
        dirty: head.is_some_and(|h| h.dirty),
    }
}

/// Why the work tree could not be planned against a git revision.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// The revision could not be read.
    #[error(transparent)]
    Git(#[from] crate::load::git::GitError),
    /// The work tree's files could not be loaded, or have problems.
    #[error(transparent)]
    Head(crate::load::LoadError),
    /// The files at the revision have problems (listed, named `REV:path`).
    #[error("the touchpoint files at `{rev}` have {} problem(s), so they cannot be compared", .diagnostics.len())]
    Base {
        /// The revision.
        rev: String,
        /// Every problem, with `path` prefixed by the revision.
        diagnostics: Vec<crate::load::Diagnostic>,
    },
}

/// The review view: the touchpoints under `dir` at git revision `rev` stand in for the live state,
/// and the work tree is the desired state. No registry is read and no secret is resolved: secrets
/// compare by their references. A touchpoint whose file moved keeps its id, so it is a no-op (or an
/// update) with `moved_from`, not a delete and a create.
pub fn plan_base(dir: &Path, rev: &str) -> Result<(Desired, Plan), BaseError> {
    let (revision, sources) = crate::load::git::sources_at(dir, rev)?;
    let (head, base) = rayon::join(
        || crate::load::load_dir(dir),
        || crate::load::load_sources(sources),
    );
    let head = head.map_err(BaseError::Head)?;
    let base = match base {
        Ok(base) => base,
        Err(crate::load::LoadError::Invalid(mut diagnostics)) => {
            for d in &mut diagnostics {
                d.path = format!("{rev}:{}", d.path);
            }
            return Err(BaseError::Base {
                rev: rev.to_string(),
                diagnostics,
            });
        }
        Err(e) => return Err(BaseError::Head(e)),
    };
    let live: Vec<crate::registry::Live> = base
        .touchpoints
        .iter()
        .map(|l| crate::registry::Live {
            id: l.touchpoint.id().to_string(),
            kind: l.touchpoint.spec.name().to_string(),
            applied_spec: l.spec.clone(),
            drifted_spec: None,
            fingerprints: BTreeMap::new(),
            generation: 0,
            paused: false,
            applied_at: String::new(),
            applied_by: String::new(),
            source: crate::registry::Provenance {
                commit: Some(revision.commit.clone()),
                dirty: false,
                file: Some(l.file.clone()),
            },
        })
        .collect();
    let specs: Vec<DesiredSpec<'_>> = head
        .touchpoints
        .iter()
        .map(|l| DesiredSpec {
            id: l.touchpoint.id(),
            kind: l.touchpoint.spec.name(),
            file: &l.file,
            spec: &l.spec,
            protect: l.touchpoint.common.protect,
            fingerprints: BTreeMap::new(),
        })
        .collect();
    let (mut changes, drift) = plan::diff(&specs, &live);
    for c in &mut changes {
        // There is no registry, so no generation to compare and swap.
        c.live_generation = None;
    }
    let plan = Plan {
        format_version: plan::FORMAT_VERSION.into(),
        touchctl_version: env!("CARGO_PKG_VERSION").into(),
        created_at: now(),
        registry: None,
        base: Some(plan::BaseRef {
            rev: revision.rev,
            commit: revision.commit,
        }),
        source: source_of(dir),
        summary: plan::summarize(&changes, &drift),
        changes,
        drift,
        warnings: Vec::new(),
        checked: Vec::new(),
        mac: None,
    };
    Ok((head, plan))
}

/// How long `plan --refresh` waits for one touchpoint's platform.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// `plan --refresh`: checks each channel touchpoint of `desired` live — its credentials get a
/// token, its app exists — and returns a warning for each problem (an unreachable platform
/// included). Endpoints on non-public networks are refused unless `allow_private`, as the daemon
/// refuses them. Custom touchpoints are not checked (a request to them would be a delivery).
///
/// Open platforms come first: each is opened with the verify ticket `tickets` keeps (the
/// daemon's registry) and its component token checked; then each Official Account in
/// third-party mode is checked through its platform: bound (its refresh token gets a token), its
/// granted permissions against `required_permissions`, and its linked mini programs where
/// permission 33 lets the platform read them.
pub fn refresh(
    desired: &crate::load::Desired,
    policy: &SecretPolicy,
    allow_private: bool,
    tickets: std::sync::Arc<dyn crate::channel::open_platform::TicketStore>,
) -> Refreshed {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return Refreshed::not_checked(format!("cannot check the platforms: {e}")),
    };
    let shared = std::sync::Arc::new(crate::channel::Shared::default());
    let client = match crate::channel::net_guard::client_with(allow_private, 2) {
        Ok(c) => c,
        Err(e) => return Refreshed::not_checked(format!("cannot check the platforms: {e}")),
    };
    runtime.block_on(async {
        let mut warnings = Vec::new();
        let mut platforms = Vec::new();
        for l in &desired.touchpoints {
            let crate::model::KindSpec::WechatOpenPlatform(spec) = &l.touchpoint.spec else {
                continue;
            };
            let id = l.touchpoint.id();
            match crate::channel::open_platform::Platform::open(
                id,
                spec,
                &l.dir,
                policy,
                tickets.clone(),
                &shared,
            ) {
                Ok(p) => {
                    let p = std::sync::Arc::new(p.with_network(client.clone(), allow_private));
                    shared.platforms.set(p.clone());
                    platforms.push(p);
                }
                Err(e) => warnings.push(plan::Warning {
                    touchpoint: id.to_string(),
                    message: format!("not checked: {e}"),
                }),
            }
        }
        let mut checked = Vec::new();
        let platform_checks = platforms.iter().map(|p| async move {
            let answer = tokio::time::timeout(PROBE_TIMEOUT, p.component_token()).await;
            let found = match answer {
                Ok(Ok(_)) => Ok(format!(
                    "component app id {}: component token obtained with the kept verify ticket",
                    p.component_app_id()
                )),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(did_not_answer()),
            };
            (p.id().to_string(), found)
        });
        for (touchpoint, found) in futures_util::future::join_all(platform_checks).await {
            sort_finding(&mut warnings, &mut checked, touchpoint, found);
        }
        let checks = desired
            .touchpoints
            .iter()
            .filter(|l| l.touchpoint.spec.is_touchpoint())
            .filter(|l| !matches!(l.touchpoint.spec, crate::model::KindSpec::Custom(_)))
            .map(|l| {
                let (shared, client) = (shared.clone(), client.clone());
                async move {
                    let id = l.touchpoint.common.id.clone();
                    (id, probe(l, policy, &shared, &client, allow_private).await)
                }
            });
        for (touchpoint, found) in futures_util::future::join_all(checks).await {
            sort_finding(&mut warnings, &mut checked, touchpoint, found);
        }
        Refreshed { warnings, checked }
    })
}

/// What `plan --refresh` found: the problems, and what it checked and found well.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// Problems, per touchpoint (or for the whole check, with an empty touchpoint).
    pub warnings: Vec<plan::Warning>,
    /// What was checked and found as it should be, per touchpoint.
    pub checked: Vec<plan::Warning>,
}

impl Refreshed {
    /// Nothing could be checked, for this reason.
    pub fn not_checked(message: String) -> Self {
        Refreshed {
            warnings: vec![plan::Warning {
                touchpoint: String::new(),
                message,
            }],
            checked: Vec::new(),
        }
    }
}

/// Files one touchpoint's finding as a warning or as checked (when it says what was checked).
fn sort_finding(
    warnings: &mut Vec<plan::Warning>,
    checked: &mut Vec<plan::Warning>,
    touchpoint: String,
    found: Result<String, String>,
) {
    match found {
        Ok(message) if message.is_empty() => {}
        Ok(message) => checked.push(plan::Warning {
            touchpoint,
            message,
        }),
        Err(message) => warnings.push(plan::Warning {
            touchpoint,
            message,
        }),
    }
}

fn did_not_answer() -> String {
    format!(
        "the platform did not answer within {}",
        humantime::format_duration(PROBE_TIMEOUT)
    )
}

/// One touchpoint's check: what it found (empty when there is nothing to check), or the problem.
async fn probe(
    l: &crate::load::Loaded,
    policy: &SecretPolicy,
    shared: &std::sync::Arc<crate::channel::Shared>,
    client: &reqwest::Client,
    allow_private: bool,
) -> Result<String, String> {
    let channel = crate::channel::open(&l.touchpoint, &l.dir, policy, shared)
        .map_err(|e| format!("not checked: {e}"))?;
    if !allow_private && let Err(e) = crate::channel::net_guard::check_url(channel.endpoint()).await
    {
        return Err(format!(
            "not checked: {e} (plan --refresh --allow-private-network checks it anyway)"
        ));
    }
    match tokio::time::timeout(PROBE_TIMEOUT, channel.probe(client)).await {
        Ok(found) => found,
        Err(_) => Err(did_not_answer()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::open_platform::TicketStore;
    use crate::channel::open_platform::stub::{COMPONENT_SECRET, MemTickets, Stub, secrets_dir};
    use crate::registry::SqliteRegistry;

    /// A tree with platform `open` and the third-party OA `wechat-oa` (its refresh token in
    /// `secrets/oa-refresh`, not written) at `api_base`.
    fn tree(api_base: &str) -> tempfile::TempDir {
        let dir = secrets_dir();
        let tp = dir.path().join("touchpoints");
        std::fs::create_dir_all(&tp).unwrap();
        std::fs::write(
            tp.join("open.toml"),
            format!(
                r#"id = "open"
name = "Platform"
kind = "wechat_open_platform"
component_app_id = "wx5f4e3d2c1b0a9f8e"
component_secret = {{ file = "../secrets/component" }}
token = {{ file = "../secrets/token" }}
encoding_aes_key = {{ file = "../secrets/aes" }}
api_base = "{api_base}"
allow_insecure = true
"#
            ),
        )
        .unwrap();
        std::fs::write(
            tp.join("wechat-oa.toml"),
            format!(
                r#"id = "wechat-oa"
name = "OA"
kind = "wechat_official_account"
category = "notification"
app_id = "wx8a7c3e1f5b2d4690"
api_base = "{api_base}"
allow_insecure = true
required_permissions = ["message", "web", "mass_send"]

[auth]
mode = "third_party"
platform = "open"
authorizer_refresh_token = {{ file = "../secrets/oa-refresh" }}

[dynamic_params]
openid = "user.wechat_openid"
"#
            ),
        )
        .unwrap();
        dir
    }

    #[test]
    fn an_account_not_bound_yet_plans_and_a_binding_is_no_change() {
        let dir = tree("http://127.0.0.1:9");
        let tp = dir.path().join("touchpoints");
        let policy = SecretPolicy::new(Some(dir.path()));
        let registry = SqliteRegistry::open(&dir.path().join("state.db")).unwrap();
        let (desired, plan) = plan_dir(&tp, &registry, &policy).unwrap();
        let oa = plan.changes.iter().find(|c| c.id == "wechat-oa").unwrap();
        assert!(
            !oa.fingerprints
                .contains_key("auth.authorizer_refresh_token"),
            "{:?}",
            oa.fingerprints
        );
        let platform = plan.changes.iter().find(|c| c.id == "open").unwrap();
        assert_eq!(
            platform.fingerprints.len(),
            3,
            "{:?}",
            platform.fingerprints
        );
        let opts = crate::apply::ApplyOptions {
            allow_delete: false,
            max_deletes: 0,
            allow_dirty: true,
            applied_by: "tester@host".into(),
        };
        let outcomes = crate::apply::execute(&plan, &registry, &opts, &mut |_| {});
        assert_eq!(outcomes.len(), 2);
        // Bound, then rotated: neither is a change.
        for token in ["refreshtoken@@@r1", "refreshtoken@@@r2"] {
            std::fs::write(dir.path().join("secrets/oa-refresh"), token).unwrap();
            let again = make_plan(&desired, &tp, &registry, &policy).unwrap();
            assert!(!again.has_changes(), "{:?}", again.changes);
        }
        // A registry that fingerprinted the refresh token before shows no change either.
        let mut live = registry.get("wechat-oa").unwrap().unwrap();
        live.fingerprints.insert(
            "auth.authorizer_refresh_token".into(),
            "hmac-sha256:00".into(),
        );
        let put = crate::registry::Put {
            id: live.id.clone(),
            kind: live.kind.clone(),
            spec: live.applied_spec.clone(),
            fingerprints: live.fingerprints.clone(),
            applied_by: live.applied_by.clone(),
            source: live.source.clone(),
        };
        registry.put(&put, Some(live.generation)).unwrap();
        let again = make_plan(&desired, &tp, &registry, &policy).unwrap();
        assert!(!again.has_changes(), "{:?}", again.changes);
    }

    #[test]
    fn refresh_opens_the_platform_with_the_kept_ticket_and_checks_the_binding() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stub = Stub::default();
        stub.with(|a| a.granted = vec![1, 7]);
        let base = runtime.block_on(stub.serve());
        let dir = tree(&base);
        let tp = dir.path().join("touchpoints");
        let policy = SecretPolicy::new(Some(dir.path()));
        let desired = crate::load::load_dir(&tp).unwrap();
        let tickets = std::sync::Arc::new(MemTickets::default());
        // No ticket, not bound: the platform says where tickets come from, the OA how to bind.
        let warnings = refresh(&desired, &policy, true, tickets.clone()).warnings;
        let said: Vec<(&str, &str)> = warnings
            .iter()
            .map(|w| (w.touchpoint.as_str(), w.message.as_str()))
            .collect();
        assert_eq!(said.len(), 2, "{said:?}");
        assert_eq!(said[0].0, "open");
        assert!(
            said[0].1.contains("/wechat/platforms/open/events"),
            "{said:?}"
        );
        assert_eq!(
            said[1],
            (
                "wechat-oa",
                "not checked: not bound yet: run `touchctl auth wechat wechat-oa`"
            )
        );
        // A ticket kept, bound: the missing permission is named, and no secret is printed.
        tickets.store("open", "ticket@@@1").unwrap();
        std::fs::write(dir.path().join("secrets/oa-refresh"), "refreshtoken@@@r1").unwrap();
        let warnings = refresh(&desired, &policy, true, tickets.clone()).warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].touchpoint, "wechat-oa");
        assert!(
            warnings[0].message.starts_with(
                "missing: web (网页服务) — 4 and 24 can be held by one third-party platform only"
            ),
            "{warnings:?}"
        );
        let all = format!("{warnings:?}");
        assert!(
            !all.contains("ticket@@@")
                && !all.contains("refreshtoken@@@")
                && !all.contains(COMPONENT_SECRET),
            "{all}"
        );
        stub.with(|a| a.granted = vec![1, 4, 7]);
        let found = refresh(&desired, &policy, true, tickets);
        assert!(found.warnings.is_empty(), "{found:?}");
        let checked: Vec<&str> = found
            .checked
            .iter()
            .map(|c| c.touchpoint.as_str())
            .collect();
        assert_eq!(checked, ["open", "wechat-oa"], "{found:?}");
        assert!(
            found.checked[1]
                .message
                .contains("granted: message (消息管理)"),
            "{found:?}"
        );
    }
}
