//! The plan: what apply would change to make the live registry match the files. [`diff`] is pure
//! (no I/O): it compares each desired spec with the live one field by field, secrets by their keyed
//! fingerprints, and reports drift (live changed outside apply) apart from the changes.
//!
//! [`inputs`] gathers what a plan needs with I/O (the live state, secret fingerprints, a base
//! revision's files) and makes it; the pure modules here never call it.
//!
//! The [`Plan`] type is also the `--format json` document and the saved-plan file; its
//! `format_version` changes whenever a field changes meaning or disappears.

pub mod inputs;
mod markdown;
mod render;
mod seal;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use markdown::{MARKDOWN_LIMIT, render_markdown};
pub use render::{TextOptions, render_text};
pub use seal::{Broken, seal, verify};

use crate::model::{SECRET_FIELDS, SpecJson};
use crate::registry::{Live, Provenance};

/// The version of the JSON plan document this build writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// A whole plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The document's format; see the README.
    pub format_version: String,
    /// The touchctl that made it.
    pub touchctl_version: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// The registry it was computed against; a saved plan only applies to that registry. Absent
    /// (`null`) in a `--base` plan, which compares two git revisions and cannot be applied.
    pub registry: Option<RegistryRef>,
    /// For a `--base` plan: the revision whose files stand in for the live state.
    #[serde(default)]
    pub base: Option<BaseRef>,
    /// Where the desired state came from.
    pub source: Source,
    /// Counts per action.
    pub summary: Summary,
    /// One entry per touchpoint, desired or live, sorted by id.
    pub changes: Vec<Change>,
    /// Live touchpoints changed outside apply.
    pub drift: Vec<Drift>,
    /// What `plan --refresh` found when it checked the channel touchpoints live (credentials,
    /// apps); warnings only: they change neither the plan nor the exit code.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    /// What `plan --refresh` checked live and found as it should be, per touchpoint (e.g. an
    /// account's binding and granted permissions); information only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<Warning>,
    /// The seal of a plan made against a registry: a keyed MAC over the whole plan (see
    /// [`seal()`]), checked by `apply FILE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Drop for Plan {
    /// A plan of a large tree is many small allocations: free them on all cores.
    fn drop(&mut self) {
        use rayon::prelude::*;
        if self.changes.len() >= 1024 {
            std::mem::take(&mut self.changes)
                .into_par_iter()
                .for_each(drop);
        }
    }
}

/// What `plan --refresh` found about a touchpoint's live configuration: a problem (in
/// `warnings`) or what it checked (in `checked`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warning {
    /// The touchpoint.
    pub touchpoint: String,
    /// What is wrong, as the platform said it (its code first), and what to do. No secret.
    pub message: String,
}

/// The registry a plan was made against.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegistryRef {
    /// The registry's random id.
    pub id: String,
    /// e.g. `sqlite .touchctl/state.db`.
    pub backend: String,
}

/// The git revision a `--base` plan compares the work tree with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The revision as given (`main`, `origin/main`, a hash).
    pub rev: String,
    /// The commit it resolved to.
    pub commit: String,
}

/// Where the desired state was read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The touchpoint folder.
    pub dir: String,
    /// The git commit, when the folder is in a repository.
    pub commit: Option<String>,
    /// Whether the folder had uncommitted changes.
    pub dirty: bool,
}

/// Counts per action.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Touchpoints to create.
    pub create: usize,
    /// Touchpoints to update.
    pub update: usize,
    /// Touchpoints to delete.
    pub delete: usize,
    /// Touchpoints already as desired.
    pub no_op: usize,
    /// Touchpoints changed outside apply (see [`Plan::drift`]). Not changes themselves: a field
    /// changed outside apply is also an update (apply restores it), a pause is not (apply keeps
    /// it).
    pub drift: usize,
    /// Of the drifted touchpoints, those paused through the admin API.
    #[serde(default)]
    pub paused: usize,
}

/// What apply does to one touchpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Not live yet.
    Create,
    /// Live, with different fields.
    Update,
    /// Live, but no file describes it any more.
    Delete,
    /// Live and as desired.
    NoOp,
}

/// The change to one touchpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The touchpoint id.
    pub id: String,
    /// Its kind (the desired one, or the live one for a delete).
    pub kind: String,
    /// What apply does.
    pub action: Action,
    /// The file it is read from (absent for deletes).
    pub file: Option<String>,
    /// The file the live spec was read from, when the touchpoint has since moved to another file
    /// (same id: a move or rename, not a delete and a create).
    #[serde(default)]
    pub moved_from: Option<String>,
    /// The live generation the plan was computed against (absent for creates). Apply refuses the
    /// change if the registry holds another generation by then.
    pub live_generation: Option<u64>,
    /// Where the live spec came from (absent for creates).
    pub live_source: Option<Provenance>,
    /// Whether the live touchpoint is protected (a delete of it is refused).
    pub protected: bool,
    /// The fields that differ (for creates, every field).
    pub fields: Vec<FieldChange>,
    /// The full spec apply writes (creates and updates).
    pub desired: Option<SpecJson>,
    /// Keyed fingerprints of the desired secrets (creates and updates).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fingerprints: BTreeMap<String, String>,
    /// Why a reviewer should look twice: `delete`; for an update, the risky fields that change
    /// (where deliveries go, credentials, batch size); for a create, where the new touchpoint
    /// delivers (`url`, `api_base`, `allow_insecure` when on) and every secret it reads. Empty for
    /// no-ops.
    #[serde(default)]
    pub risks: Vec<String>,
    /// The seal of this change in a plan made against a registry: a keyed MAC over the change,
    /// so that `apply FILE` can name a change edited since the plan was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Fields whose change redirects deliveries, swaps the account or credentials they use, or changes
/// how much one request carries; a change to any of them is flagged for review. Secret fields are
/// flagged too, and `allow_insecure` when it turns on.
pub const RISKY_FIELDS: &[&str] = &[
    "url",
    "api_base",
    "allow_insecure",
    "batch_size",
    "app_id",
    "app_key",
    "corp_id",
    "agent_id",
    "provider",
    "auth.mode",
    "auth.platform",
    "component_app_id",
];

/// The fields of a new touchpoint that say where its deliveries, and the secrets sent with them,
/// go. A new touchpoint is a new destination for secrets: a file that names an endpoint of its own
/// and a secret reference sends that secret there, so both are flagged, as for an update.
pub const DESTINATION_FIELDS: &[&str] = &["url", "api_base"];

/// The review flags of a change (see [`Change::risks`]).
fn risks_of(action: Action, protected: bool, fields: &[FieldChange]) -> Vec<String> {
    let flagged = |risky: &[&str]| {
        fields
            .iter()
            .filter(|f| match f.path.as_str() {
                // Turning TLS checks back on is no risk; turning them off is.
                "allow_insecure" => f.after == Some(Value::Bool(true)),
                path => f.sensitive || risky.contains(&path),
            })
            .map(|f| f.path.clone())
            .collect()
    };
    match action {
        Action::Delete if protected => vec!["delete (protected)".into()],
        Action::Delete => vec!["delete".into()],
        Action::Update => flagged(RISKY_FIELDS),
        Action::Create => flagged(DESTINATION_FIELDS),
        Action::NoOp => Vec::new(),
    }
}

/// How one field changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FieldAction {
    /// The field appears.
    Add,
    /// The field goes away.
    Remove,
    /// The field's value changes.
    Update,
}

/// One field's change. Paths are dotted (`retry.attempts`); array entries with an `id` or `name` are
/// addressed by it (`templates[order_shipped].url`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// The dotted field path.
    pub path: String,
    /// Add, remove or update.
    pub action: FieldAction,
    /// The live value (absent for adds). For secrets, the reference, never the value.
    pub before: Option<Value>,
    /// The desired value (absent for removes). For secrets, the reference, never the value.
    pub after: Option<Value>,
    /// Whether the field is a secret.
    #[serde(default)]
    pub sensitive: bool,
    /// For secrets: whether the secret's value (by fingerprint) changes.
    #[serde(default)]
    pub value_changed: bool,
}

/// A live touchpoint changed outside apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// The touchpoint id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Paused through the admin API.
    pub paused: bool,
    /// Fields whose live value differs from what apply wrote (`before` = applied, `after` = live).
    pub fields: Vec<FieldChange>,
}

/// A desired touchpoint as [`diff`] needs it.
#[derive(Clone, Debug)]
pub struct DesiredSpec<'a> {
    /// The touchpoint id.
    pub id: &'a str,
    /// Its kind.
    pub kind: &'a str,
    /// The file it was read from.
    pub file: &'a str,
    /// The canonical spec.
    pub spec: &'a SpecJson,
    /// Its `protect` field.
    pub protect: bool,
    /// Keyed fingerprints of its secrets, by field path.
    pub fingerprints: BTreeMap<String, String>,
}

/// Compares desired (sorted by id) with live (sorted by id): one [`Change`] per touchpoint, and the drift.
pub fn diff(desired: &[DesiredSpec<'_>], live: &[Live]) -> (Vec<Change>, Vec<Drift>) {
    use rayon::prelude::*;
    // Both sides come sorted by id, so lookups are binary searches; no map is built.
    let live_ids = sorted_ids(live.iter().map(|l| l.id.as_str()));
    let live_of = |id: &str| {
        live_ids
            .binary_search_by(|(l, _)| (*l).cmp(id))
            .ok()
            .map(|i| &live[live_ids[i].1])
    };
    let mut changes: Vec<Change> = desired
        .par_iter()
        .map(|d| match live_of(d.id) {
            None => create(d),
            Some(l) => update(d, l),
        })
        .collect();
    let desired_ids = sorted_ids(desired.iter().map(|d| d.id));
    let wanted = |id: &str| desired_ids.binary_search_by(|(d, _)| (*d).cmp(id)).is_ok();
    for l in live.iter().filter(|l| !wanted(&l.id)) {
        let protected = is_protected(&l.spec().value());
        changes.push(Change {
            id: l.id.clone(),
            kind: l.kind.clone(),
            action: Action::Delete,
            file: None,
            moved_from: None,
            live_generation: Some(l.generation),
            live_source: Some(l.source.clone()),
            protected,
            fields: Vec::new(),
            desired: None,
            fingerprints: BTreeMap::new(),
            risks: risks_of(Action::Delete, protected, &[]),
            mac: None,
        });
    }
    changes.sort_by(|a, b| a.id.cmp(&b.id));
    let drift = live.par_iter().filter_map(drift_of).collect();
    (changes, drift)
}

/// Ids with their positions, sorted by id: as given when they already are (the usual case), so
/// this is one pass.
fn sorted_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<(&'a str, usize)> {
    let mut out: Vec<(&str, usize)> = ids.enumerate().map(|(i, id)| (id, i)).collect();
    if !out.is_sorted_by(|a, b| a.0 <= b.0) {
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
    }
    out
}

fn is_protected(spec: &Value) -> bool {
    spec.get("protect")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Counts the actions and drift.
pub fn summarize(changes: &[Change], drift: &[Drift]) -> Summary {
    let mut s = Summary {
        drift: drift.len(),
        paused: drift.iter().filter(|d| d.paused).count(),
        ..Summary::default()
    };
    for c in changes {
        match c.action {
            Action::Create => s.create += 1,
            Action::Update => s.update += 1,
            Action::Delete => s.delete += 1,
            Action::NoOp => s.no_op += 1,
        }
    }
    s
}

impl Plan {
    /// Whether applying would change anything: a create, an update or a delete. What
    /// `--detailed-exitcode` reports. Drift is not counted by itself: a field changed outside
    /// apply is an update too, and a pause is kept by apply.
    pub fn has_changes(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::NoOp)
    }
}

fn create(d: &DesiredSpec<'_>) -> Change {
    let fields = field_diff(
        &Value::Null,
        &d.spec.value(),
        &BTreeMap::new(),
        &d.fingerprints,
    );
    Change {
        id: d.id.to_string(),
        kind: d.kind.to_string(),
        action: Action::Create,
        file: Some(d.file.to_string()),
        moved_from: None,
        live_generation: None,
        live_source: None,
        protected: false,
        risks: risks_of(Action::Create, false, &fields),
        fields,
        desired: Some(d.spec.clone()),
        fingerprints: d.fingerprints.clone(),
        mac: None,
    }
}

fn update(d: &DesiredSpec<'_>, l: &Live) -> Change {
    // The common case, an unchanged touchpoint, is a comparison of two strings.
    let same_text = d.spec.as_str() == l.spec().as_str();
    let (live_spec, fields) = if same_text && d.fingerprints == l.fingerprints {
        (None, Vec::new())
    } else {
        let live_spec = l.spec().value();
        let fields = field_diff(
            &live_spec,
            &d.spec.value(),
            &l.fingerprints,
            &d.fingerprints,
        );
        (Some(live_spec), fields)
    };
    let action = if fields.is_empty() {
        Action::NoOp
    } else {
        Action::Update
    };
    let protected = live_spec.as_ref().map_or(d.protect, is_protected);
    Change {
        id: d.id.to_string(),
        kind: d.kind.to_string(),
        action,
        file: Some(d.file.to_string()),
        moved_from: l
            .source
            .file
            .as_deref()
            .filter(|f| !same_path(f, d.file))
            .map(str::to_string),
        live_generation: Some(l.generation),
        live_source: Some(l.source.clone()),
        protected,
        risks: risks_of(action, protected, &fields),
        fields,
        desired: (action == Action::Update).then(|| d.spec.clone()),
        fingerprints: if action == Action::Update {
            d.fingerprints.clone()
        } else {
            BTreeMap::new()
        },
        mac: None,
    }
}

/// Whether two file names are the same file, however the folder was spelled (`./touchpoints/a.toml`
/// and `touchpoints/a.toml`).
fn same_path(a: &str, b: &str) -> bool {
    let parts = |p: &str| {
        std::path::Path::new(p)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| c.as_os_str().to_os_string())
            .collect::<Vec<_>>()
    };
    a == b || parts(a) == parts(b)
}

fn drift_of(l: &Live) -> Option<Drift> {
    let fields = match &l.drifted_spec {
        Some(live) if live != &l.applied_spec => field_diff(
            &l.applied_spec.value(),
            &live.value(),
            &l.fingerprints,
            &l.fingerprints,
        ),
        _ => Vec::new(),
    };
    (l.paused || !fields.is_empty()).then(|| Drift {
        id: l.id.clone(),
        kind: l.kind.clone(),
        paused: l.paused,
        fields,
    })
}

/// The field-level differences between two specs; secrets compare by reference and fingerprint.
pub fn field_diff(
    before: &Value,
    after: &Value,
    before_fps: &BTreeMap<String, String>,
    after_fps: &BTreeMap<String, String>,
) -> Vec<FieldChange> {
    let mut old = BTreeMap::new();
    let mut new = BTreeMap::new();
    flatten(before, String::new(), &mut old);
    flatten(after, String::new(), &mut new);
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for path in paths {
        let sensitive = SECRET_FIELDS.contains(&path.as_str());
        let (b, a) = (old.get(path), new.get(path));
        let value_changed = sensitive && before_fps.get(path) != after_fps.get(path);
        let action = match (b, a) {
            (None, Some(_)) => FieldAction::Add,
            (Some(_), None) => FieldAction::Remove,
            (Some(b), Some(a)) if b != a || value_changed => FieldAction::Update,
            _ => continue,
        };
        out.push(FieldChange {
            path: path.clone(),
            action,
            before: b.cloned().cloned(),
            after: a.cloned().cloned(),
            sensitive,
            value_changed: value_changed && action == FieldAction::Update,
        });
    }
    out
}

/// Flattens a spec to leaf values by dotted path. Secret references stay whole; arrays of tables that
/// carry an `id` or `name` are keyed by it so that reordering is not a change; other arrays are leaves.
fn flatten<'v>(v: &'v Value, prefix: String, out: &mut BTreeMap<String, &'v Value>) {
    match v {
        Value::Null => {}
        Value::Object(map) if !map.is_empty() && !SECRET_FIELDS.contains(&prefix.as_str()) => {
            for (k, child) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(child, path, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let keys: Option<Vec<&str>> = items
                .iter()
                .map(|i| {
                    i.get("id")
                        .or_else(|| i.get("name"))
                        .and_then(Value::as_str)
                })
                .collect();
            let unique = keys.as_ref().is_some_and(|k| {
                k.iter().collect::<std::collections::BTreeSet<_>>().len() == k.len()
            });
            match keys {
                Some(keys) if unique => {
                    for (key, item) in keys.into_iter().zip(items) {
                        flatten(item, format!("{prefix}[{key}]"), out);
                    }
                }
                _ => {
                    out.insert(prefix, v);
                }
            }
        }
        _ => {
            out.insert(prefix, v);
        }
    }
}

/// Plans and changes for the unit tests of the renderings and the seal.
#[cfg(test)]
pub(crate) mod samples {
    use super::*;

    /// An update of the custom touchpoint `id` that changes one field, `path`.
    pub fn change(id: &str, path: &str, before: Value, after: Value) -> Change {
        Change {
            id: id.into(),
            kind: "custom".into(),
            action: Action::Update,
            file: Some(format!("touchpoints/{id}.toml")),
            moved_from: None,
            live_generation: Some(1),
            live_source: None,
            protected: false,
            fields: vec![FieldChange {
                path: path.into(),
                action: FieldAction::Update,
                before: Some(before),
                after: Some(after),
                sensitive: false,
                value_changed: false,
            }],
            desired: None,
            fingerprints: BTreeMap::new(),
            risks: Vec::new(),
            mac: None,
        }
    }

    /// A plan of `changes` (all updates) against registry `r`.
    pub fn plan(changes: Vec<Change>) -> Plan {
        Plan {
            format_version: FORMAT_VERSION.into(),
            touchctl_version: "0.0.0".into(),
            created_at: "t".into(),
            registry: Some(RegistryRef {
                id: "r".into(),
                backend: "sqlite x".into(),
            }),
            base: None,
            source: Source {
                dir: "touchpoints".into(),
                commit: None,
                dirty: false,
            },
            summary: Summary {
                update: changes.len(),
                ..Summary::default()
            },
            changes,
            drift: Vec::new(),
            warnings: Vec::new(),
            checked: Vec::new(),
            mac: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn live(id: &str, spec: Value) -> Live {
        Live {
            id: id.into(),
            kind: "custom".into(),
            applied_spec: SpecJson::from_value(&spec),
            drifted_spec: None,
            fingerprints: BTreeMap::from([("auth_token".into(), "fp1".into())]),
            generation: 4,
            paused: false,
            applied_at: "t".into(),
            applied_by: "u@h".into(),
            source: Provenance::default(),
        }
    }

    fn desired<'a>(id: &'a str, spec: &Value, fp: &str) -> DesiredSpec<'a> {
        DesiredSpec {
            id,
            kind: "custom",
            file: "f.toml",
            spec: Box::leak(Box::new(SpecJson::from_value(spec))),
            protect: false,
            fingerprints: BTreeMap::from([("auth_token".into(), fp.into())]),
        }
    }

    #[test]
    fn create_update_delete_noop() {
        let a = json!({"id": "a", "batch_size": 100, "auth_token": {"env": "T"}});
        let b = json!({"id": "b", "batch_size": 200, "auth_token": {"env": "T"}});
        let c = json!({"id": "c"});
        let live_b = json!({"id": "b", "batch_size": 100, "auth_token": {"env": "T"}});
        let want = [
            desired("a", &a, "fp1"),
            desired("b", &b, "fp1"),
            desired("c", &c, ""),
        ];
        let have = [
            live("b", live_b),
            live("c", json!({"id":"c"})),
            live("d", json!({"id": "d", "protect": true})),
        ];
        let mut have = have.to_vec();
        have[1].fingerprints = BTreeMap::from([("auth_token".into(), "".into())]);
        let (changes, drift) = diff(&want, &have);
        let actions: Vec<_> = changes.iter().map(|c| (c.id.as_str(), c.action)).collect();
        assert_eq!(
            actions,
            [
                ("a", Action::Create),
                ("b", Action::Update),
                ("c", Action::NoOp),
                ("d", Action::Delete)
            ]
        );
        assert_eq!(changes[1].fields.len(), 1);
        assert_eq!(changes[1].fields[0].path, "batch_size");
        assert_eq!(changes[1].fields[0].before, Some(json!(100)));
        assert!(changes[3].protected);
        assert!(drift.is_empty());
    }

    #[test]
    fn input_order_does_not_matter() {
        let spec = |id: &str| json!({"id": id, "auth_token": {"env": "T"}});
        let specs: Vec<Value> = ["e", "a", "c"].iter().map(|id| spec(id)).collect();
        let want: Vec<DesiredSpec<'_>> = ["e", "a", "c"]
            .iter()
            .zip(&specs)
            .map(|(id, s)| desired(id, s, "fp1"))
            .collect();
        let have: Vec<Live> = ["d", "c", "a", "b"]
            .iter()
            .map(|id| live(id, spec(id)))
            .collect();
        let (changes, _) = diff(&want, &have);
        let actions: Vec<_> = changes.iter().map(|c| (c.id.as_str(), c.action)).collect();
        assert_eq!(
            actions,
            [
                ("a", Action::NoOp),
                ("b", Action::Delete),
                ("c", Action::NoOp),
                ("d", Action::Delete),
                ("e", Action::Create)
            ]
        );
    }

    #[test]
    fn secret_value_change_is_seen_through_fingerprints() {
        let spec = json!({"id": "a", "auth_token": {"env": "T"}});
        let (changes, _) = diff(&[desired("a", &spec, "fp2")], &[live("a", spec.clone())]);
        let f = &changes[0].fields[0];
        assert_eq!(f.path, "auth_token");
        assert!(f.sensitive && f.value_changed);
        assert_eq!(f.before, f.after);
    }

    #[test]
    fn same_spec_with_keys_in_another_order_is_unchanged() {
        let spec = json!({"id": "a", "batch_size": 1, "auth_token": {"env": "T"}});
        let mut l = live("a", spec.clone());
        l.applied_spec = SpecJson::from_text(
            r#"{"batch_size":1,"auth_token":{"env":"T"},"id":"a"}"#.to_string(),
        )
        .unwrap();
        let (changes, drift) = diff(&[desired("a", &spec, "fp1")], &[l]);
        assert_eq!(changes[0].action, Action::NoOp);
        assert!(drift.is_empty());
    }

    #[test]
    fn keyed_arrays_ignore_order_and_name_entries() {
        let before = json!({"templates": [{"id": "x", "url": "u1"}, {"id": "y", "url": "u2"}]});
        let after = json!({"templates": [{"id": "y", "url": "u2"}, {"id": "x", "url": "u3"}]});
        let fields = field_diff(&before, &after, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(fields.len(), 1);
        assert_eq!(fields[0].path, "templates[x].url");
    }

    #[test]
    fn risky_fields_and_deletes_are_flagged() {
        let before = json!({"id": "a", "url": "https://a", "allow_insecure": true, "timeout": "1s", "auth_token": {"env": "T"}});
        let after = json!({"id": "a", "url": "https://b", "allow_insecure": false, "timeout": "2s", "auth_token": {"env": "U"}});
        let (changes, _) = diff(&[desired("a", &after, "fp1")], &[live("a", before.clone())]);
        assert_eq!(changes[0].risks, ["auth_token", "url"]);
        let (changes, _) = diff(&[desired("a", &before, "fp1")], &[live("a", after.clone())]);
        assert_eq!(changes[0].risks, ["allow_insecure", "auth_token", "url"]);
        let (changes, _) = diff(&[], &[live("a", json!({"id": "a", "protect": true}))]);
        assert_eq!(changes[0].risks, ["delete (protected)"]);
        let (changes, _) = diff(&[desired("a", &after, "fp1")], &[]);
        assert_eq!(
            changes[0].risks,
            ["auth_token", "url"],
            "a new touchpoint is a new destination for its secrets"
        );
        let (changes, _) = diff(&[desired("a", &before, "fp1")], &[]);
        assert_eq!(changes[0].risks, ["allow_insecure", "auth_token", "url"]);
    }

    #[test]
    fn a_moved_file_is_named_whatever_the_folder_spelling() {
        let spec = json!({"id": "a"});
        let mut l = live("a", spec.clone());
        l.source.file = Some("./f.toml".into());
        let (changes, _) = diff(&[desired("a", &spec, "fp1")], &[l.clone()]);
        assert_eq!(changes[0].moved_from, None);
        l.source.file = Some("old/f.toml".into());
        let (changes, _) = diff(&[desired("a", &spec, "fp1")], &[l]);
        assert_eq!(changes[0].moved_from.as_deref(), Some("old/f.toml"));
        assert_eq!(changes[0].action, Action::NoOp);
    }

    #[test]
    fn drift_is_reported_apart() {
        let spec = json!({"id": "a", "enabled": true});
        let mut l = live("a", spec.clone());
        l.drifted_spec = Some(SpecJson::from_value(&json!({"id": "a", "enabled": false})));
        l.paused = true;
        let (changes, drift) = diff(&[desired("a", &spec, "fp1")], &[l]);
        assert_eq!(changes[0].action, Action::Update);
        assert_eq!(drift.len(), 1);
        assert!(drift[0].paused);
        assert_eq!(drift[0].fields[0].path, "enabled");
        assert_eq!(drift[0].fields[0].after, Some(json!(false)));
    }
}
