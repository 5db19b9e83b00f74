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
//!
//! # Open platforms
//! A live `wechat_open_platform` is not a touchpoint: nothing is sent to it. Its [`Platform`] (its
//! secrets resolved, the registry as its ticket store) is built here and put in
//! [`channel::Shared::platforms`] before the Official Accounts are opened, since a third-party
//! account's channel finds its platform there; a platform that cannot be opened (a secret it
//! cannot read, an EncodingAESKey that is not 43 characters) is left out and listed with its
//! problem ([`LiveSet::platforms`]). When a platform changes, the accounts that name it are opened
//! again. The permissions a third-party account granted, as the platform last said (a binding, an
//! `updateauthorized` event), are kept beside its entry and shown with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
#[cfg(test)]
use std::time::Duration;

use serde::Serialize;

use crate::channel::open_platform::{Platform, TicketStore};
use crate::channel::{self, Signal};
use crate::dispatch::worker::{Directory, Lookup, Target, Why};
use crate::model::{KindSpec, Permission, SecretPolicy, SecretRef, Touchpoint, WechatAuth};
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
    /// A third-party Official Account: the permission sets its account granted the platform, by
    /// name, as the platform last said (after a binding or an `updateauthorized` event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted: Option<Vec<&'static str>>,
    /// With `granted`: its `required_permissions` not granted, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<&'static str>>,
}

/// A third-party Official Account's platform, app id and required permissions.
#[derive(Clone, Debug)]
pub struct ThirdParty {
    /// The platform's id.
    pub platform: String,
    /// The account's app id.
    pub app_id: String,
    /// Its `required_permissions`.
    pub required: Vec<Permission>,
    /// Where its refresh token is kept.
    pub refresh_token: SecretRef,
    /// The folder of the file it was applied from (secret file references are relative to it).
    pub base: PathBuf,
}

struct Entry {
    summary: Summary,
    lookup: Lookup,
    third_party: Option<ThirdParty>,
}

/// A live open platform as `/v1/status` shows it (the ticket's presence is added there).
#[derive(Clone, Debug, Serialize)]
pub struct PlatformSummary {
    /// The platform file's id.
    pub id: String,
    /// Its component app id, when its spec could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component_app_id: Option<String>,
    /// The registry generation.
    pub generation: u64,
    /// Why it cannot be used, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// How platforms are opened: the ticket store and the network they use.
#[derive(Clone)]
pub struct PlatformNetwork {
    /// Where verify tickets are kept (the registry).
    pub tickets: Arc<dyn TicketStore>,
    /// The HTTP client of component API calls.
    pub client: reqwest::Client,
    /// Whether `api_base` may be a loopback or private address.
    pub allow_private: bool,
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
    platforms: RwLock<HashMap<String, PlatformSummary>>,
    /// What each third-party account granted: touchpoint id → (app id, permission set ids).
    granted: RwLock<HashMap<String, (String, Vec<u32>)>>,
    network: Option<PlatformNetwork>,
    policy: SecretPolicy,
    shared: Arc<channel::Shared>,
    /// Bumped after every change of `entries` or `said` (see [`Directory::changes`]).
    changes: std::sync::atomic::AtomicU64,
}

/// Why a platform is not used when the set has no way to open platforms.
const NO_PLATFORMS: &str = "open platforms are not opened here";

/// Why a touchpoint that is gone holds its batches.
pub const GONE: &str =
    "the touchpoint is no longer in the registry; its batches stay parked until it is live again";

impl LiveSet {
    /// An empty set whose secrets are read as `policy` allows.
    pub fn new(policy: SecretPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Opens the live open platforms with `network` (without it they are listed as unusable).
    pub fn with_platforms(mut self, network: PlatformNetwork) -> Self {
        self.network = Some(network);
        self
    }

    /// Gives the channels `tokens` (the daemon's: kept in the registry, shared across nodes).
    pub fn with_tokens(mut self, tokens: channel::token::Tokens) -> Self {
        self.shared = Arc::new(channel::Shared::with_tokens(tokens));
        self
    }

    /// What secret references may read.
    pub fn policy(&self) -> &SecretPolicy {
        &self.policy
    }

    /// The live open platforms, sorted by id.
    pub fn platforms(&self) -> Vec<PlatformSummary> {
        let map = self.platforms.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<PlatformSummary> = map.values().cloned().collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Whether `id` is a live open platform (usable or not).
    pub fn is_platform(&self, id: &str) -> bool {
        self.platforms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }

    /// The live third-party accounts of `platform`, with their generation; only those of
    /// `app_id` when given.
    pub fn third_party(&self, platform: &str, app_id: Option<&str>) -> Vec<(String, u64)> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, u64)> = map
            .values()
            .filter(|e| {
                e.third_party
                    .as_ref()
                    .is_some_and(|t| t.platform == platform && app_id.is_none_or(|a| a == t.app_id))
            })
            .map(|e| (e.summary.id.clone(), e.summary.generation))
            .collect();
        out.sort();
        out
    }

    /// A live touchpoint's third-party settings, if it is a third-party account.
    pub fn third_party_of(&self, id: &str) -> Option<ThirdParty> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).and_then(|e| e.third_party.clone())
    }

    /// Keeps what the account `app_id` granted (permission set ids), for touchpoint `id`.
    pub fn set_granted(&self, id: &str, app_id: &str, granted: Vec<u32>) {
        self.granted
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (app_id.to_string(), granted));
    }

    /// Opens (again) the platforms among `rows` that changed, or all of them with `reopen`, and
    /// forgets those in `gone`; the ids of the platforms that changed.
    fn open_platforms(&self, rows: &[&Live], gone: &[String], reopen: bool) -> Vec<String> {
        let mut map = self.platforms.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        for id in gone {
            if map.remove(id).is_some() {
                changed.push(id.clone());
            }
        }
        for l in rows {
            if !reopen && map.get(&l.id).is_some_and(|p| p.generation == l.generation) {
                continue;
            }
            let summary = self.open_platform(l);
            changed.push(l.id.clone());
            map.insert(l.id.clone(), summary);
        }
        let usable: Vec<&str> = map
            .values()
            .filter(|p| p.problem.is_none())
            .map(|p| p.id.as_str())
            .collect();
        self.shared.platforms.retain(usable);
        changed
    }

    /// Builds one platform and puts it in the shared set; what `/v1/status` shows of it.
    fn open_platform(&self, l: &Live) -> PlatformSummary {
        let mut summary = PlatformSummary {
            id: l.id.clone(),
            component_app_id: None,
            generation: l.generation,
            problem: None,
        };
        let spec = match Touchpoint::from_json(l.spec().value()) {
            Ok(Touchpoint {
                spec: KindSpec::WechatOpenPlatform(spec),
                ..
            }) => spec,
            Ok(_) => {
                summary.problem = Some("its live spec is not a wechat_open_platform".into());
                return summary;
            }
            Err(e) => {
                summary.problem = Some(format!(
                    "its live spec cannot be read by this touchctl ({e}): correct its file and apply it"
                ));
                return summary;
            }
        };
        summary.component_app_id = Some(spec.component_app_id.clone());
        let Some(network) = &self.network else {
            summary.problem = Some(NO_PLATFORMS.into());
            return summary;
        };
        match Platform::open(
            &l.id,
            &spec,
            base_of(l),
            &self.policy,
            network.tickets.clone(),
            &self.shared,
        ) {
            Ok(p) => {
                let p = p.with_network(network.client.clone(), network.allow_private);
                self.shared.platforms.set(Arc::new(p));
            }
            Err(e) => summary.problem = Some(e.0),
        }
        summary
    }

    /// What the channels share (access tokens).
    pub fn shared(&self) -> &Arc<channel::Shared> {
        &self.shared
    }

    /// Rebuilds the set from the registry's touchpoints. Entries whose generation did not change
    /// are kept as they are unless `reread_secrets` (secret files may have been rotated).
    pub fn refresh(&self, live: &[Live], reread_secrets: bool) {
        let (platforms, live): (Vec<&Live>, Vec<&Live>) =
            live.iter().partition(|l| is_platform_row(l));
        let gone: Vec<String> = {
            let known = self.platforms.read().unwrap_or_else(|p| p.into_inner());
            known
                .keys()
                .filter(|id| !platforms.iter().any(|l| &l.id == *id))
                .cloned()
                .collect()
        };
        // Platforms first: the accounts that name them find them in `shared` when opened.
        let changed = self.open_platforms(&platforms, &gone, reread_secrets);
        let old = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::with_capacity(live.len());
        for l in live {
            if !reread_secrets
                && let Some(e) = old.get(&l.id)
                && e.summary.generation == l.generation
                && !e
                    .third_party
                    .as_ref()
                    .is_some_and(|t| changed.contains(&t.platform))
            {
                next.insert(
                    l.id.clone(),
                    Entry {
                        summary: e.summary.clone(),
                        lookup: e.lookup.clone(),
                        third_party: e.third_party.clone(),
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
        self.changed();
    }

    /// Forgets what platforms said of `id` (it was resumed through the API).
    pub fn release(&self, id: &str) {
        self.said
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.changed();
    }

    /// Notes that what `lookup` answers may have changed.
    fn changed(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Replaces the entries of the touchpoints given with their registry rows (their secrets read
    /// again); a touchpoint without a row is no longer live. The others stay as they are.
    pub fn update(&self, rows: Vec<(String, Option<Live>)>) {
        let (platforms, rows): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(id, row)| {
            row.as_ref()
                .map_or_else(|| self.is_platform(id), is_platform_row)
        });
        let gone: Vec<String> = platforms
            .iter()
            .filter(|(_, row)| row.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        let present: Vec<&Live> = platforms
            .iter()
            .filter_map(|(_, row)| row.as_ref())
            .collect();
        // Platforms first: the accounts that name them find them in `shared` when opened.
        self.open_platforms(&present, &gone, true);
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
        drop(map);
        self.changed();
    }

    /// Every live touchpoint, sorted by id.
    pub fn summaries(&self) -> Vec<Summary> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let said = self.said.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let granted = self.granted.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Summary> = map
            .values()
            .map(|e| with_granted(with_word(e, said.get(&e.summary.id), now).0, e, &granted))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One touchpoint: its summary and where it stands.
    pub fn get(&self, id: &str) -> Option<(Summary, Lookup)> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let said = self.said.read().unwrap_or_else(|p| p.into_inner());
        let granted = self.granted.read().unwrap_or_else(|p| p.into_inner());
        map.get(id).map(|e| {
            let (summary, lookup) = with_word(e, said.get(id), now_ms());
            (with_granted(summary, e, &granted), lookup)
        })
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
        drop(map);
        self.changed();
    }

    fn ids(&self) -> Vec<String> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.keys().cloned().collect()
    }

    fn changes(&self) -> Option<u64> {
        Some(self.changes.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Whether a registry row is an open platform, not a touchpoint.
fn is_platform_row(l: &Live) -> bool {
    l.kind == "wechat_open_platform"
}

/// A third-party account's summary with what its account granted, when that is known for its
/// current app id.
fn with_granted(
    mut summary: Summary,
    e: &Entry,
    granted: &HashMap<String, (String, Vec<u32>)>,
) -> Summary {
    if let (Some(t), Some((app_id, ids))) = (&e.third_party, granted.get(&summary.id))
        && *app_id == t.app_id
    {
        summary.granted = Some(
            ids.iter()
                .filter_map(|&id| Permission::from_id(id))
                .map(Permission::name)
                .collect(),
        );
        summary.missing = Some(
            super::bindings::missing(&t.required, ids)
                .into_iter()
                .map(Permission::name)
                .collect(),
        );
    }
    summary
}

/// The folder of the file a touchpoint was applied from: secret file references are relative to it.
pub fn base_of(l: &Live) -> &Path {
    l.source
        .file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .unwrap_or(Path::new("."))
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

/// Milliseconds since the epoch as RFC 3339, to the second.
pub(super) fn rfc3339(ms: i64) -> String {
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
        granted: None,
        missing: None,
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
                third_party: None,
            };
        }
    };
    let third_party = match &touchpoint.spec {
        KindSpec::WechatOfficialAccount(oa) => match &oa.auth {
            WechatAuth::ThirdParty {
                platform,
                authorizer_refresh_token,
            } => Some(ThirdParty {
                platform: platform.clone(),
                app_id: oa.app_id.clone(),
                required: oa.required_permissions.clone(),
                refresh_token: authorizer_refresh_token.clone(),
                base: base_of(l).to_path_buf(),
            }),
            WechatAuth::Direct { .. } => None,
        },
        _ => None,
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
    Entry {
        summary,
        lookup,
        third_party,
    }
}

/// Opens the touchpoint's channel. Secret file references resolve against the folder of the
/// file the touchpoint was applied from, as they did for plan.
fn ready(l: &Live, tp: Touchpoint, policy: &SecretPolicy, shared: &Arc<channel::Shared>) -> Lookup {
    match channel::open(&tp, base_of(l), policy, shared) {
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
    fn every_change_of_what_lookup_answers_moves_the_change_count() {
        let set = LiveSet::new(SecretPolicy::default());
        let mut seen = set.changes();
        let mut moved = |what: &str| {
            let now = set.changes();
            assert_ne!(now, seen, "{what} left the change count as it was");
            seen = now;
        };
        set.refresh(&[row(1)], false);
        moved("a refresh");
        set.signal("sms", 1, &hold());
        moved("a platform's hold");
        set.release("sms");
        moved("a resume");
        set.update(vec![("sms".into(), Some(row(2)))]);
        moved("an update");
        set.update(vec![("sms".into(), None)]);
        moved("a touchpoint gone");
        assert!(matches!(set.lookup("sms"), Lookup::Held(Why::Gone, _)));
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
