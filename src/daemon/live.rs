//! The daemon's view of the registry: every live touchpoint and whether it can be sent to now.
//! Rebuilt from the registry after each reconcile, pause or resume, and whenever another process
//! writes the registry; the sender reads it for every batch, so a change applies to every batch
//! sent after it. Secrets are resolved here, once per change, never stored elsewhere, and only as
//! the daemon's [`SecretPolicy`] allows: a reference it refuses, or a value that is not one line of
//! text, holds the touchpoint with the reason instead of failing each of its batches.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::channel::custom::signing_key;
use crate::dispatch::worker::{Directory, Lookup, Target};
use crate::model::{KindSpec, SecretPolicy, Touchpoint};
use crate::registry::Live;

/// One live touchpoint as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The id.
    pub id: String,
    /// The kind.
    pub kind: String,
    /// The registry generation.
    pub generation: u64,
    /// `enabled` in its spec.
    pub enabled: bool,
    /// Paused through the API.
    pub paused: bool,
    /// Whether batches are sent to it now.
    pub ready: bool,
    /// Why not, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// The commit it was applied from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

struct Entry {
    summary: Summary,
    lookup: Lookup,
}

/// The live touchpoints.
#[derive(Default)]
pub struct LiveSet {
    entries: RwLock<HashMap<String, Entry>>,
    policy: SecretPolicy,
}

/// Why a touchpoint that is gone holds its batches.
pub const GONE: &str =
    "the touchpoint is no longer in the registry; its batches stay parked until it is live again";

impl LiveSet {
    /// An empty set whose secrets are read as `policy` allows.
    pub fn new(policy: SecretPolicy) -> Self {
        Self {
            entries: RwLock::default(),
            policy,
        }
    }

    /// Rebuilds the set from the registry's touchpoints. Entries whose generation did not change
    /// are kept as they are unless `reread_secrets` (secret files may have been rotated).
    pub fn refresh(&self, live: &[Live], reread_secrets: bool) {
        let old = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(live.len());
        for l in live {
            if !reread_secrets
                && let Some(e) = old.get(&l.id)
                && e.summary.generation == l.generation
            {
                next.insert(
                    l.id.clone(),
                    Entry {
                        summary: e.summary.clone(),
                        lookup: e.lookup.clone(),
                    },
                );
                continue;
            }
            next.insert(l.id.clone(), entry(l, &self.policy));
        }
        drop(old);
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// Replaces the entries of the touchpoints given with their registry rows (their secrets read
    /// again); a touchpoint without a row is no longer live. The others stay as they are.
    pub fn update(&self, rows: Vec<(String, Option<Live>)>) {
        let fresh: Vec<(String, Option<Entry>)> = rows
            .into_iter()
            .map(|(id, row)| (id, row.as_ref().map(|l| entry(l, &self.policy))))
            .collect();
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        for (id, e) in fresh {
            match e {
                Some(e) => {
                    map.insert(id, e);
                }
                None => {
                    map.remove(&id);
                }
            }
        }
    }

    /// Every live touchpoint, sorted by id.
    pub fn summaries(&self) -> Vec<Summary> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Summary> = map.values().map(|e| e.summary.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One touchpoint: its summary and where it stands.
    pub fn get(&self, id: &str) -> Option<(Summary, Lookup)> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).map(|e| (e.summary.clone(), e.lookup.clone()))
    }

    /// The ids, for did-you-mean hints.
    pub fn ids(&self) -> Vec<String> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }
}

impl Directory for LiveSet {
    fn lookup(&self, touchpoint: &str) -> Lookup {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.get(touchpoint)
            .map_or_else(|| Lookup::Held(GONE.to_string()), |e| e.lookup.clone())
    }
}

fn entry(l: &Live, policy: &SecretPolicy) -> Entry {
    let mut summary = Summary {
        id: l.id.clone(),
        kind: l.kind.clone(),
        generation: l.generation,
        enabled: true,
        paused: l.paused,
        ready: false,
        held: None,
        commit: l.source.commit.clone(),
    };
    let touchpoint = match Touchpoint::from_json(l.spec().value()) {
        Ok(tp) => tp,
        Err(e) => {
            let reason = format!(
                "its live spec cannot be read by this touchctl ({e}): correct its file and apply it; its batches wait until then"
            );
            summary.held = Some(reason.clone());
            return Entry {
                summary,
                lookup: Lookup::Held(reason),
            };
        }
    };
    summary.enabled = touchpoint.common.enabled;
    let lookup = if l.paused {
        Lookup::Held("paused through the API; resume it to send".into())
    } else if !touchpoint.common.enabled {
        Lookup::Held("disabled (enabled = false)".into())
    } else {
        ready(l, touchpoint, policy)
    };
    match &lookup {
        Lookup::Ready(_) => summary.ready = true,
        Lookup::Held(reason) => summary.held = Some(reason.clone()),
    }
    Entry { summary, lookup }
}

/// Resolves what sending needs. Secret file references resolve against the folder of the file
/// the touchpoint was applied from, as they did for plan.
fn ready(l: &Live, tp: Touchpoint, policy: &SecretPolicy) -> Lookup {
    let KindSpec::Custom(spec) = tp.spec else {
        return Lookup::Held(format!(
            "{} touchpoints are not dispatched by this version of the daemon yet",
            l.kind
        ));
    };
    let base = l
        .source
        .file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .unwrap_or(Path::new("."));
    let token = match spec.auth_token.resolve(base, policy) {
        Ok(t) => t,
        Err(e) => {
            return Lookup::Held(format!("cannot read `auth_token` {}: {e}", spec.auth_token));
        }
    };
    let signing_key = match &spec.signing_secret {
        None => None,
        Some(r) => match r.resolve(base, policy) {
            Ok(s) => match signing_key(&s) {
                Ok(k) => Some(k),
                Err(e) => return Lookup::Held(format!("`signing_secret` {r}: {e}")),
            },
            Err(e) => return Lookup::Held(format!("cannot read `signing_secret` {r}: {e}")),
        },
    };
    Lookup::Ready(Arc::new(Target {
        id: l.id.clone(),
        generation: l.generation,
        mapping: crate::dispatch::user::Mapping::new(&spec.dynamic_params),
        spec,
        token,
        signing_key,
    }))
}
