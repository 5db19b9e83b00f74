//! Binds a saved plan to its content, so that `apply FILE` writes exactly what its reviewers saw.
//!
//! A saved plan says two things about each change: what it shows (`fields`, `risks`, `action`)
//! and what apply writes (`desired`, `fingerprints`, `file`, under the plan's `source`). Someone
//! who can edit the file between review and apply could make them disagree, e.g. point
//! `desired.url` elsewhere while `fields` still shows only a batch size.
//!
//! The plan is sealed with keyed MACs (HMAC-SHA256) under a key derived from the registry's random
//! key, which only those who can read the registry hold:
//!
//! - each change carries a `mac` over the change itself, bound to the plan's registry and creation
//!   time, so an edited change is named, and a change copied in from another plan fails too;
//! - the plan carries a `mac` over everything else and the changes with their MACs, so an edited
//!   header (`source.dirty`, `summary`, ...) or a removed or reordered change fails as a whole.
//!
//! Re-deriving the field diff from `desired` against the live spec and comparing it with `fields`
//! was the alternative. It was not chosen because it can only check what it can recompute: an
//! edited `fingerprints` map (stored as is by apply), `file` (where the daemon then resolves secret
//! files from), `source.dirty` (which the `--allow-dirty` guard reads) or a removed change would
//! all pass. A MAC covers every byte apply reads, and is checked before anything else is trusted.
//!
//! The MACs are computed over a canonical form (the JSON value, keys sorted, no whitespace), so a
//! plan re-indented by a JSON tool still verifies; any change of a value does not.

use serde::Serialize;
use serde_json::Value;

use super::{Change, Plan};
use crate::model::Fingerprinter;

/// The purpose the key of a plan's own MAC is derived for.
const PLAN_PURPOSE: &str = "saved-plan";
/// The purpose the key of each change's MAC is derived for.
const CHANGE_PURPOSE: &str = "saved-plan-change";

/// What does not hold in a saved plan's seal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The plan carries no seal at all.
    Unsealed,
    /// These changes (by id) are not as planned: edited, or not part of the plan as made.
    Changes(Vec<String>),
    /// Every change is as planned, but the plan around them is not: its header was edited, or a
    /// change was removed or moved.
    Header,
}

/// Seals `plan` under `key`: each change's MAC, then the plan's (see the module docs).
pub fn seal(plan: &mut Plan, key: &Fingerprinter) {
    plan.mac = None;
    let binding = binding(plan);
    for change in &mut plan.changes {
        change.mac = None;
        change.mac = Some(change_mac(change, &binding, key));
    }
    plan.mac = Some(plan_mac(plan, key));
}

/// Checks the seal of a plan read back from a file under `key`.
pub fn verify(plan: &Plan, key: &Fingerprinter) -> Result<(), Broken> {
    let Some(mac) = &plan.mac else {
        return Err(Broken::Unsealed);
    };
    let binding = binding(plan);
    let changes: Vec<String> = plan
        .changes
        .iter()
        .filter(|c| {
            c.mac
                .as_deref()
                .is_none_or(|m| !same(m, &change_mac(c, &binding, key)))
        })
        .map(|c| c.id.clone())
        .collect();
    if !changes.is_empty() {
        return Err(Broken::Changes(changes));
    }
    if !same(mac, &plan_mac(plan, key)) {
        return Err(Broken::Header);
    }
    Ok(())
}

/// What ties a change to its plan: the registry it was made against and when.
fn binding(plan: &Plan) -> Value {
    let registry = plan.registry.as_ref().map(|r| r.id.as_str());
    serde_json::json!([registry, plan.created_at])
}

fn change_mac(change: &Change, binding: &Value, key: &Fingerprinter) -> String {
    let body = serde_json::json!([binding, canonical(change)]);
    key.mac(CHANGE_PURPOSE, body.to_string().as_bytes())
}

fn plan_mac(plan: &Plan, key: &Fingerprinter) -> String {
    key.mac(PLAN_PURPOSE, canonical(plan).to_string().as_bytes())
}

/// The value as JSON with its own `mac` left out. Maps are sorted by key (serde_json keeps no
/// order), so the text of the value depends on the content alone.
fn canonical(item: &impl Serialize) -> Value {
    // Plans are plain data: strings, integers, booleans and JSON values; they always serialize.
    let mut value = serde_json::to_value(item).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.remove("mac");
    }
    value
}

/// Compares two MACs in constant time.
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpecJson;
    use crate::plan::samples;
    use serde_json::json;

    fn key() -> Fingerprinter {
        Fingerprinter::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    fn change(id: &str) -> Change {
        let mut c = samples::change(id, "batch_size", json!(500), json!(200));
        c.desired = Some(SpecJson::from_value(
            &json!({"id": id, "url": "https://a.example", "batch_size": 200}),
        ));
        c.fingerprints = [("auth_token".to_string(), "hmac-sha256:00".to_string())].into();
        c.risks = vec!["batch_size".into()];
        c
    }

    fn sealed() -> Plan {
        let mut plan = samples::plan(vec![change("a"), change("b")]);
        seal(&mut plan, &key());
        plan
    }

    /// Writes the plan as `plan --out` does and reads it back as `apply FILE` does.
    fn round_trip(plan: &Plan) -> Plan {
        serde_json::from_str(&serde_json::to_string_pretty(plan).unwrap()).unwrap()
    }

    #[test]
    fn a_sealed_plan_verifies_after_a_round_trip_and_a_reformat() {
        let plan = sealed();
        assert_eq!(verify(&round_trip(&plan), &key()), Ok(()));
        let compact: Plan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!(verify(&compact, &key()), Ok(()));
        let other = Fingerprinter::new(b"another key, another registry!!!".to_vec());
        assert_eq!(
            verify(&plan, &other),
            Err(Broken::Changes(vec!["a".into(), "b".into()]))
        );
    }

    #[test]
    fn every_edit_is_caught_and_edited_changes_are_named() {
        type Edit = (&'static str, fn(&mut Plan), Broken);
        let edits: Vec<Edit> = vec![
            (
                "desired",
                |p| {
                    p.changes[1].desired = Some(SpecJson::from_value(
                        &json!({"id": "b", "url": "https://evil.example", "batch_size": 200}),
                    ))
                },
                Broken::Changes(vec!["b".into()]),
            ),
            (
                "fields",
                |p| p.changes[0].fields.clear(),
                Broken::Changes(vec!["a".into()]),
            ),
            (
                "fingerprints",
                |p| {
                    p.changes[0]
                        .fingerprints
                        .insert("auth_token".into(), "hmac-sha256:ff".into());
                },
                Broken::Changes(vec!["a".into()]),
            ),
            (
                "file",
                |p| p.changes[1].file = Some("/etc/x.toml".into()),
                Broken::Changes(vec!["b".into()]),
            ),
            (
                "an added change",
                |p| p.changes.push(change("c")),
                Broken::Changes(vec!["c".into()]),
            ),
            (
                "a change copied from another plan",
                |p| {
                    let mut other = sealed();
                    other.created_at = "another time".into();
                    seal(&mut other, &key());
                    let mut copied = other.changes[0].clone();
                    copied.id = "c".into();
                    p.changes.push(copied);
                },
                Broken::Changes(vec!["c".into()]),
            ),
            (
                "a removed change",
                |p| {
                    p.changes.pop();
                },
                Broken::Header,
            ),
            ("source.dirty", |p| p.source.dirty = true, Broken::Header),
            ("summary", |p| p.summary.update = 1, Broken::Header),
            ("the seal removed", |p| p.mac = None, Broken::Unsealed),
        ];
        for (what, edit, expected) in edits {
            let mut plan = round_trip(&sealed());
            edit(&mut plan);
            assert_eq!(verify(&plan, &key()), Err(expected), "{what}");
        }
    }
}
