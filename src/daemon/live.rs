//! The daemon's view of the registry: every live touchpoint and whether it can be sent to now.
//! Rebuilt from the registry after each reconcile, pause or resume, and whenever another process
//! writes the registry; the sender reads it for every batch, so a change applies to every batch
//! sent after it. Secrets are resolved here, once per change, never stored elsewhere, and only as
//! the daemon's [`SecretPolicy`] allows: a reference it refuses, or a value that is not one line of
//! text, holds the touchpoint with the reason instead of failing each of its batches.
//!
//! On top of what the registry says, the platforms have their word: a channel that reads "your
//! configuration is wrong" (a bad secret, template id, IP not whitelisted) holds its touchpoint,
//! and one that reads "slow down" (a rate limit, a daily quota) makes it wait until a given time.
//! Such a state belongs to the generation it was said of: a changed spec (a new generation), a
//! re-read of its secrets (a rotated credential is tried again), or a resume through the API
//! releases it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
#[cfg(test)]
use std::time::Duration;

use serde::Serialize;

use crate::channel::{self, Signal};
use crate::dispatch::worker::{Directory, Lookup, Target, Why};
use crate::model::{SecretPolicy, Touchpoint};
use crate::registry::Live;
use crate::store::now_ms;

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
    /// `ready`, `paused`, `held` (disabled, unusable, or refused by its platform) or `waiting`
    /// (the platform asked to wait; triggers are still accepted).
    pub state: &'static str,
    /// Why not, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// The platform's code, when the platform held it or made it wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// When sending resumes, for `waiting` (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// The commit it was applied from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

struct Entry {
    summary: Summary,
    lookup: Lookup,
}

/// What a platform said of a touchpoint's generation.
#[derive(Clone, Debug)]
struct Said {
    generation: u64,
    /// Waiting until this time (ms since the epoch); `None` holds it.
    until: Option<i64>,
    code: String,
    reason: String,
}

/// The live touchpoints.
#[derive(Default)]
pub struct LiveSet {
    entries: RwLock<HashMap<String, Entry>>,
    said: RwLock<HashMap<String, Said>>,
    policy: SecretPolicy,
    shared: Arc<channel::Shared>,
}

/// Why a touchpoint that is gone holds its batches.
pub const GONE: &str =
    "the touchpoint is no longer in the registry; its batches stay parked until it is live again";

impl LiveSet {
    /// An empty set whose secrets are read as `policy` allows.
    pub fn new(policy: SecretPolicy) -> Self {
        Self {
            entries: RwLock::default(),
            said: RwLock::default(),
            policy,
            shared: Arc::default(),
        }
    }

    /// What the channels share (access tokens).
    pub fn shared(&self) -> &Arc<channel::Shared> {
        &self.shared
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
            next.insert(l.id.clone(), entry(l, &self.policy, &self.shared));
        }
        drop(old);
        // A platform's word stands for the generation it was said of, until secrets are re-read.
        self.said
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, s| {
                !reread_secrets
                    && next
                        .get(id)
                        .is_some_and(|e| e.summary.generation == s.generation)
            });
        *self.entries.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// Forgets what platforms said of `id` (it was resumed through the API).
    pub fn release(&self, id: &str) {
        self.said
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Replaces the entries of the touchpoints given with their registry rows (their secrets read
    /// again); a touchpoint without a row is no longer live. The others stay as they are.
    pub fn update(&self, rows: Vec<(String, Option<Live>)>) {
        let fresh: Vec<(String, Option<Entry>)> = rows
            .into_iter()
            .map(|(id, row)| {
                (
                    id,
                    row.as_ref().map(|l| entry(l, &self.policy, &self.shared)),
                )
            })
            .collect();
        {
            let mut said = self.said.write().unwrap_or_else(|p| p.into_inner());
            for (id, _) in &fresh {
                said.remove(id);
            }
        }
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
        let said = self.said.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let mut out: Vec<Summary> = map
            .values()
            .map(|e| with_word(e, said.get(&e.summary.id), now).0)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One touchpoint: its summary and where it stands.
    pub fn get(&self, id: &str) -> Option<(Summary, Lookup)> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let said = self.said.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).map(|e| with_word(e, said.get(id), now_ms()))
    }
}

impl Directory for LiveSet {
    fn lookup(&self, touchpoint: &str) -> Lookup {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = map.get(touchpoint) else {
            return Lookup::Held(Why::Gone, GONE.to_string());
        };
        if let Lookup::Ready(_) = &e.lookup {
            let said = self.said.read().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = said.get(touchpoint) {
                return with_word(e, Some(s), now_ms()).1;
            }
        }
        e.lookup.clone()
    }

    fn signal(&self, touchpoint: &str, generation: u64, signal: &Signal) {
        let live = {
            let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
            map.get(touchpoint).map(|e| e.summary.generation)
        };
        if live != Some(generation) {
            // Said of settings that are gone already.
            return;
        }
        let said = match signal {
            Signal::Hold { code, reason } => Said {
                generation,
                until: None,
                code: code.clone(),
                reason: reason.clone(),
            },
            Signal::Wait { wait, code, reason } => Said {
                generation,
                until: Some(crate::dispatch::retry::due_at(now_ms(), *wait)),
                code: code.clone(),
                reason: reason.clone(),
            },
        };
        let mut map = self.said.write().unwrap_or_else(|p| p.into_inner());
        // A hold is not shortened into a wait by a late answer of a request sent before it.
        if said.until.is_some() && map.get(touchpoint).is_some_and(|s| s.until.is_none()) {
            return;
        }
        map.insert(touchpoint.to_string(), said);
    }

    fn ids(&self) -> Vec<String> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }
}

/// An entry as it stands once what its platform said is taken into account.
fn with_word(e: &Entry, said: Option<&Said>, now: i64) -> (Summary, Lookup) {
    let mut summary = e.summary.clone();
    let (Lookup::Ready(target), Some(s)) = (&e.lookup, said) else {
        return (summary, e.lookup.clone());
    };
    if s.generation != summary.generation {
        return (summary, e.lookup.clone());
    }
    summary.code = Some(s.code.clone());
    let said = channel::code_first(&s.code, &s.reason);
    match s.until {
        None => {
            let reason = format!(
                "held by the platform: {said}; its batches are parked until a changed spec or secret is applied, or it is resumed through the API"
            );
            summary.ready = false;
            summary.state = "held";
            summary.held = Some(reason.clone());
            (summary, Lookup::Held(Why::Platform, reason))
        }
        Some(until) if until > now => {
            let reason = format!("waiting: {said}");
            summary.state = "waiting";
            summary.held = Some(reason.clone());
            summary.until = Some(rfc3339(until));
            (
                summary,
                Lookup::Waiting {
                    target: target.clone(),
                    until,
                    reason,
                },
            )
        }
        Some(_) => {
            summary.code = None;
            (summary, e.lookup.clone())
        }
    }
}

fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn entry(l: &Live, policy: &SecretPolicy, shared: &Arc<channel::Shared>) -> Entry {
    let mut summary = Summary {
        id: l.id.clone(),
        kind: l.kind.clone(),
        generation: l.generation,
        enabled: true,
        paused: l.paused,
        ready: false,
        state: "held",
        held: None,
        code: None,
        until: None,
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
                lookup: Lookup::Held(Why::Unavailable, reason),
            };
        }
    };
    summary.enabled = touchpoint.common.enabled;
    let lookup = if l.paused {
        Lookup::Held(
            Why::Paused,
            "paused through the API; resume it to send".into(),
        )
    } else if !touchpoint.common.enabled {
        Lookup::Held(Why::Disabled, "disabled (enabled = false)".into())
    } else {
        ready(l, touchpoint, policy, shared)
    };
    match &lookup {
        Lookup::Ready(_) | Lookup::Waiting { .. } => {
            summary.ready = true;
            summary.state = "ready";
        }
        Lookup::Held(why, reason) => {
            summary.held = Some(reason.clone());
            summary.state = if *why == Why::Paused {
                "paused"
            } else {
                "held"
            };
        }
    }
    Entry { summary, lookup }
}

/// Opens the touchpoint's channel. Secret file references resolve against the folder of the
/// file the touchpoint was applied from, as they did for plan.
fn ready(l: &Live, tp: Touchpoint, policy: &SecretPolicy, shared: &Arc<channel::Shared>) -> Lookup {
    let base = l
        .source
        .file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .unwrap_or(Path::new("."));
    match channel::open(&tp, base, policy, shared) {
        Ok(channel) => Lookup::Ready(Arc::new(Target {
            id: l.id.clone(),
            generation: l.generation,
            mapping: crate::dispatch::recipient::Mapping::new(tp.spec.dynamic_params()),
            channel,
        })),
        Err(e) => Lookup::Held(Why::Unavailable, e.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SpecJson;
    use crate::registry::Provenance;
    use serde_json::json;

    fn row(generation: u64) -> Live {
        let spec = json!({
            "id": "sms", "name": "SMS", "kind": "custom", "category": "notification",
            "url": "https://sms.example.com/hook", "auth_token": {"env": "PATH"}
        });
        Live {
            id: "sms".into(),
            kind: "custom".into(),
            applied_spec: SpecJson::from_value(&spec),
            drifted_spec: None,
            fingerprints: Default::default(),
            generation,
            paused: false,
            applied_at: "t".into(),
            applied_by: "u@h".into(),
            source: Provenance::default(),
        }
    }

    fn hold() -> Signal {
        Signal::Hold {
            code: "40125".into(),
            reason: "invalid appsecret".into(),
        }
    }

    fn state(set: &LiveSet) -> (&'static str, Option<String>) {
        let (s, _) = set.get("sms").unwrap();
        (s.state, s.code)
    }

    #[test]
    fn a_platform_hold_lasts_until_a_new_generation_a_reread_or_a_resume() {
        let set = LiveSet::new(SecretPolicy::default());
        set.refresh(&[row(1)], false);
        assert_eq!(state(&set), ("ready", None));
        // Said of an older generation: ignored.
        set.signal("sms", 0, &hold());
        assert!(matches!(set.lookup("sms"), Lookup::Ready(_)));
        set.signal("sms", 1, &hold());
        assert_eq!(state(&set), ("held", Some("40125".into())));
        match set.lookup("sms") {
            Lookup::Held(Why::Platform, reason) => {
                assert!(reason.contains("40125"), "{reason}");
                assert!(reason.contains("invalid appsecret"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A refresh that changes nothing keeps it held.
        set.refresh(&[row(1)], false);
        assert_eq!(state(&set).0, "held");
        // Secrets read again: tried again.
        set.refresh(&[row(1)], true);
        assert_eq!(state(&set).0, "ready");
        set.signal("sms", 1, &hold());
        // A new generation (a changed spec applied).
        set.refresh(&[row(2)], false);
        assert_eq!(state(&set).0, "ready");
        set.signal("sms", 2, &hold());
        set.release("sms");
        assert_eq!(state(&set).0, "ready");
    }

    #[test]
    fn a_wait_accepts_triggers_and_ends_by_itself_but_never_shortens_a_hold() {
        let set = LiveSet::new(SecretPolicy::default());
        set.refresh(&[row(1)], false);
        let wait = |d: Duration| Signal::Wait {
            wait: d,
            code: "45009".into(),
            reason: "reach max api daily quota limit".into(),
        };
        set.signal("sms", 1, &wait(Duration::from_secs(3600)));
        assert_eq!(state(&set), ("waiting", Some("45009".into())));
        assert!(matches!(set.lookup("sms"), Lookup::Waiting { .. }));
        assert!(set.get("sms").unwrap().0.until.is_some());
        set.signal("sms", 1, &wait(Duration::ZERO));
        assert_eq!(state(&set).0, "ready", "a wait that is over");
        set.signal("sms", 1, &hold());
        set.signal("sms", 1, &wait(Duration::from_secs(60)));
        assert_eq!(state(&set).0, "held");
    }
}
