//! Bindings: an Official Account in third-party mode being authorised to its open platform, from
//! `POST /v1/bindings` until WeChat hands back an authorisation code (DESIGN.md §5).
//!
//! A binding is started with a pre-auth code and lives as long as that code: past its expiry a
//! pending binding is `expired`, and a code arriving for it is refused. The code arrives twice,
//! by two roads: the admin's browser is redirected to `/wechat/platforms/{id}/authorized` with
//! `state` = the binding id, and the platform pushes an `authorized` event naming the pre-auth
//! code. Whichever comes first [`Table::claim`]s the binding (it turns `completing`, still shown
//! as `pending`) and exchanges the code; the other finds it claimed or finished and does nothing.
//!
//! The table is in memory only (a binding outlives no restart: run `touchctl auth wechat` again)
//! and bounded: at most [`MAX_BINDINGS`], the oldest finished (or expired) ones dropped first.
//! Binding ids are 128 random bits: knowing one lets a browser finish that binding, so they are
//! unguessable. The pre-auth code is a secret: it is never shown, logged or in `Debug`.
//! Times are milliseconds since the epoch, passed in, so tests move the clock.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;

use serde::Serialize;

use crate::model::{Permission, SecretRef};

/// The most bindings kept at once.
pub const MAX_BINDINGS: usize = 1000;

/// Why a binding could not be started.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// Every slot holds a binding still pending.
    #[error(
        "{0} bindings are pending at once, the most this daemon keeps: wait for some to finish or expire (a pre-auth code lasts about 10 minutes), then start this one again"
    )]
    Full(usize),
    /// The operating system gave no random bytes for the id.
    #[error(
        "could not get random bytes for the binding id ({0}): check that getrandom(2) or /dev/urandom is available"
    )]
    Random(String),
}

/// What a binding needs to finish: set when it starts, used by whichever road claims it.
#[derive(Clone, Debug)]
pub struct Target {
    /// The binding id.
    pub id: String,
    /// The Official Account touchpoint.
    pub touchpoint: String,
    /// Its open platform's id.
    pub platform: String,
    /// The app id the touchpoint declares: the account that must authorise.
    pub app_id: String,
    /// Where its refresh token goes.
    pub refresh_token: SecretRef,
    /// The folder its file was applied from (secret file references are relative to it).
    pub base: PathBuf,
    /// Its `required_permissions`.
    pub required: Vec<Permission>,
}

/// How a claimed binding ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The refresh token was written; `granted` are the `func_info` ids the account granted.
    Bound {
        /// The account that authorised.
        app_id: String,
        /// The permission set ids granted.
        granted: Vec<u32>,
    },
    /// Nothing was written; why.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Pending,
    /// Claimed by one road; the other leaves it alone.
    Completing,
    Finished(Outcome),
    Expired,
}

struct Binding {
    target: Target,
    pre_auth_code: String,
    expires_at: i64,
    state: State,
}

impl Binding {
    /// Pending past its expiry: expired now.
    fn age(&mut self, now: i64) {
        if self.state == State::Pending && now >= self.expires_at {
            self.state = State::Expired;
        }
    }

    fn finished(&self) -> bool {
        matches!(self.state, State::Finished(_) | State::Expired)
    }

    fn view(&self) -> View {
        let mut view = View {
            binding_id: self.target.id.clone(),
            touchpoint: self.target.touchpoint.clone(),
            status: "pending",
            app_id: None,
            granted: None,
            missing: None,
            reason: None,
            expires_at: super::live::rfc3339(self.expires_at),
        };
        match &self.state {
            State::Pending | State::Completing => {}
            State::Expired => {
                view.status = "expired";
                view.reason = Some(EXPIRED.to_string());
            }
            State::Finished(Outcome::Failed(reason)) => {
                view.status = "failed";
                view.reason = Some(reason.clone());
            }
            State::Finished(Outcome::Bound { app_id, granted }) => {
                view.status = "bound";
                view.app_id = Some(app_id.clone());
                view.granted = Some(names(
                    granted.iter().filter_map(|&id| Permission::from_id(id)),
                ));
                view.missing = Some(names(missing(&self.target.required, granted)));
            }
        }
        view
    }
}

/// Why an expired binding cannot finish.
pub const EXPIRED: &str =
    "this binding expired (its pre-auth code is no longer valid): run `touchctl auth wechat` again";

/// The permissions of `required` that `granted` (ids) lacks, in `required`'s order.
pub fn missing(required: &[Permission], granted: &[u32]) -> Vec<Permission> {
    required
        .iter()
        .copied()
        .filter(|p| !granted.contains(&p.id()))
        .collect()
}

fn names(permissions: impl IntoIterator<Item = Permission>) -> Vec<&'static str> {
    permissions.into_iter().map(Permission::name).collect()
}

/// A binding as `GET /v1/bindings/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct View {
    /// The binding id.
    pub binding_id: String,
    /// The touchpoint being bound.
    pub touchpoint: String,
    /// `pending`, `bound`, `failed` or `expired`.
    pub status: &'static str,
    /// `bound`: the account that authorised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    /// `bound`: the permission sets granted, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted: Option<Vec<&'static str>>,
    /// `bound`: the required permission sets not granted, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<&'static str>>,
    /// `failed`, `expired`: why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the pre-auth code, and with it the binding, expires (RFC 3339).
    pub expires_at: String,
}

/// What a road that brings an authorisation code may do with the binding.
#[derive(Debug)]
pub enum Claim {
    /// Exchange the code and [`Table::finish`] it.
    Go(Target),
    /// No such binding.
    Unknown,
    /// It expired before the code came.
    Expired(View),
    /// The other road is exchanging its code.
    InProgress(View),
    /// Finished already.
    Done(View),
}

/// The bindings, by id, oldest first.
pub struct Table {
    bindings: HashMap<String, Binding>,
    order: VecDeque<String>,
    max: usize,
}

impl Default for Table {
    fn default() -> Self {
        Self::with_capacity(MAX_BINDINGS)
    }
}

impl Table {
    /// A table keeping at most `max` bindings.
    pub fn with_capacity(max: usize) -> Self {
        Self {
            bindings: HashMap::new(),
            order: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// Starts a binding for `target` (its `id` is replaced by a new random one), pending until
    /// `expires_at`; its id.
    pub fn start(
        &mut self,
        mut target: Target,
        pre_auth_code: String,
        expires_at: i64,
        now: i64,
    ) -> Result<String, BindingError> {
        if self.bindings.len() >= self.max {
            self.make_room(now)?;
        }
        let id = new_id()?;
        target.id = id.clone();
        self.order.push_back(id.clone());
        self.bindings.insert(
            id.clone(),
            Binding {
                target,
                pre_auth_code,
                expires_at,
                state: State::Pending,
            },
        );
        Ok(id)
    }

    /// Drops the oldest finished or expired binding.
    fn make_room(&mut self, now: i64) -> Result<(), BindingError> {
        for b in self.bindings.values_mut() {
            b.age(now);
        }
        let oldest = self
            .order
            .iter()
            .position(|id| self.bindings.get(id).is_none_or(Binding::finished));
        match oldest {
            Some(i) => {
                if let Some(id) = self.order.remove(i) {
                    self.bindings.remove(&id);
                }
                Ok(())
            }
            None => Err(BindingError::Full(self.max)),
        }
    }

    /// The road of the browser: the binding `state` names, if it is one of `platform`.
    pub fn claim(&mut self, id: &str, platform: &str, now: i64) -> Claim {
        match self.bindings.get_mut(id) {
            Some(b) if b.target.platform == platform => take(b, now),
            _ => Claim::Unknown,
        }
    }

    /// The road of the `authorized` event: the binding of `platform` started with
    /// `pre_auth_code`.
    pub fn claim_by_code(&mut self, platform: &str, pre_auth_code: &str, now: i64) -> Claim {
        let found = self.bindings.values_mut().find(|b| {
            b.target.platform == platform
                && bool::from(subtle::ConstantTimeEq::ct_eq(
                    b.pre_auth_code.as_bytes(),
                    pre_auth_code.as_bytes(),
                ))
        });
        match found {
            Some(b) => take(b, now),
            None => Claim::Unknown,
        }
    }

    /// Ends a claimed binding; its view. A binding not claimed (or gone) is left as it is.
    pub fn finish(&mut self, id: &str, outcome: Outcome) -> Option<View> {
        let b = self.bindings.get_mut(id)?;
        if b.state == State::Completing {
            b.state = State::Finished(outcome);
        }
        Some(b.view())
    }

    /// A binding as it stands at `now`.
    pub fn get(&mut self, id: &str, now: i64) -> Option<View> {
        let b = self.bindings.get_mut(id)?;
        b.age(now);
        Some(b.view())
    }

    /// How many bindings are kept.
    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }
}

fn take(b: &mut Binding, now: i64) -> Claim {
    b.age(now);
    match &b.state {
        State::Pending => {
            b.state = State::Completing;
            Claim::Go(b.target.clone())
        }
        State::Completing => Claim::InProgress(b.view()),
        State::Expired => Claim::Expired(b.view()),
        State::Finished(_) => Claim::Done(b.view()),
    }
}

/// `bnd_` and 32 random hex digits.
fn new_id() -> Result<String, BindingError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| BindingError::Random(e.to_string()))?;
    Ok(format!("bnd_{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(touchpoint: &str) -> Target {
        Target {
            id: String::new(),
            touchpoint: touchpoint.into(),
            platform: "open".into(),
            app_id: "wx0000000000000001".into(),
            refresh_token: SecretRef::File {
                file: "oa.refresh".into(),
            },
            base: PathBuf::from("."),
            required: Permission::all(),
        }
    }

    const MIN: i64 = 60_000;

    #[test]
    fn a_binding_expires_with_its_pre_auth_code_and_then_refuses_the_code() {
        let mut t = Table::default();
        let id = t
            .start(target("oa"), "preauth-1".into(), 10 * MIN, 0)
            .unwrap();
        assert!(id.starts_with("bnd_") && id.len() == 36, "{id}");
        assert_eq!(t.get(&id, 10 * MIN - 1).unwrap().status, "pending");
        let view = t.get(&id, 10 * MIN).unwrap();
        assert_eq!(view.status, "expired");
        assert!(view.reason.unwrap().contains("touchctl auth wechat"));
        assert!(matches!(t.claim(&id, "open", 11 * MIN), Claim::Expired(_)));
        assert!(matches!(
            t.claim_by_code("open", "preauth-1", 11 * MIN),
            Claim::Expired(_)
        ));
        assert!(matches!(t.claim("bnd_nope", "open", 0), Claim::Unknown));
        assert!(matches!(t.claim(&id, "other", 0), Claim::Unknown));
    }

    #[test]
    fn the_first_road_wins_and_the_second_does_nothing() {
        for event_first in [false, true] {
            let mut t = Table::default();
            let id = t
                .start(target("oa"), "preauth-1".into(), 10 * MIN, 0)
                .unwrap();
            let (first, second) = if event_first {
                (
                    t.claim_by_code("open", "preauth-1", MIN),
                    t.claim(&id, "open", MIN),
                )
            } else {
                (
                    t.claim(&id, "open", MIN),
                    t.claim_by_code("open", "preauth-1", MIN),
                )
            };
            let Claim::Go(target) = first else {
                panic!("{first:?}")
            };
            assert_eq!(target.id, id);
            assert!(matches!(second, Claim::InProgress(ref v) if v.status == "pending"));
            let granted = vec![1, 2, 3, 7, 11, 15, 33];
            let view = t
                .finish(
                    &id,
                    Outcome::Bound {
                        app_id: "wx0000000000000001".into(),
                        granted,
                    },
                )
                .unwrap();
            assert_eq!(view.status, "bound");
            assert_eq!(
                view.granted.unwrap(),
                [
                    "message",
                    "user",
                    "account",
                    "mass_send",
                    "material",
                    "menu"
                ]
            );
            assert_eq!(view.missing.unwrap(), ["web", "open_account"]);
            // Later arrivals, even past the expiry, see the outcome.
            assert!(
                matches!(t.claim(&id, "open", 20 * MIN), Claim::Done(ref v) if v.status == "bound")
            );
            assert!(matches!(
                t.claim_by_code("open", "preauth-1", 20 * MIN),
                Claim::Done(_)
            ));
            // A second finish does not overwrite the first.
            t.finish(&id, Outcome::Failed("late".into()));
            assert_eq!(t.get(&id, 20 * MIN).unwrap().status, "bound");
        }
    }

    #[test]
    fn a_code_is_matched_on_its_own_platform_only() {
        let mut t = Table::default();
        t.start(target("oa"), "preauth-1".into(), 10 * MIN, 0)
            .unwrap();
        assert!(matches!(
            t.claim_by_code("other", "preauth-1", 0),
            Claim::Unknown
        ));
        assert!(matches!(
            t.claim_by_code("open", "preauth-2", 0),
            Claim::Unknown
        ));
    }

    #[test]
    fn a_wrong_account_fails_the_binding_with_the_reason() {
        let mut t = Table::default();
        let id = t
            .start(target("oa"), "preauth-1".into(), 10 * MIN, 0)
            .unwrap();
        assert!(matches!(t.claim(&id, "open", 0), Claim::Go(_)));
        let view = t
            .finish(
                &id,
                Outcome::Failed("the account that authorised is wx2".into()),
            )
            .unwrap();
        assert_eq!(view.status, "failed");
        assert_eq!(
            view.reason.as_deref(),
            Some("the account that authorised is wx2")
        );
        assert_eq!(view.app_id, None);
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_oldest_finished_first() {
        let mut t = Table::with_capacity(3);
        let a = t.start(target("a"), "pa".into(), 10 * MIN, 0).unwrap();
        let b = t.start(target("b"), "pb".into(), 10 * MIN, 0).unwrap();
        let c = t.start(target("c"), "pc".into(), 10 * MIN, 0).unwrap();
        // All pending: no room.
        assert!(matches!(
            t.start(target("d"), "pd".into(), 10 * MIN, 0),
            Err(BindingError::Full(3))
        ));
        // `b` finishes: it goes first, the older pending `a` stays.
        assert!(matches!(t.claim(&b, "open", 0), Claim::Go(_)));
        t.finish(&b, Outcome::Failed("x".into()));
        let d = t.start(target("d"), "pd".into(), 10 * MIN, 0).unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.get(&b, 0).is_none());
        assert!(t.get(&a, 0).is_some() && t.get(&c, 0).is_some() && t.get(&d, 0).is_some());
        // Past their expiry, pending ones count as finished.
        let e = t
            .start(target("e"), "pe".into(), 30 * MIN, 20 * MIN)
            .unwrap();
        assert!(t.get(&a, 20 * MIN).is_none(), "the oldest expired one went");
        assert_eq!(t.get(&e, 20 * MIN).unwrap().status, "pending");
    }

    #[test]
    fn ids_differ() {
        let mut t = Table::default();
        let a = t.start(target("a"), "p".into(), MIN, 0).unwrap();
        let b = t.start(target("a"), "p".into(), MIN, 0).unwrap();
        assert_ne!(a, b);
    }
}
