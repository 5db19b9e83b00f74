//! Access tokens with the platforms' lifetimes, and the windows in which a platform remembers an
//! idempotency key. Time is passed in (milliseconds since the epoch), so that expiry is tested
//! without waiting.
//!
//! - OA (`/cgi-bin/token`): every call issues a new token; the ones issued before keep working
//!   for [`OA_GRACE`] more (or the lifetime, when that is shorter), then answer "expired".
//! - WeCom (`gettoken`): the same token for a corp app and secret while it is valid; a new one
//!   once it has expired.
//! - Getui (`auth`): every call issues a new token, each valid for its own lifetime.
//!
//! An expired token is remembered (so it answers "expired", not "invalid") until a day after it
//! expired; each owner keeps at most [`KEPT_PER_OWNER`] tokens, the oldest forgotten first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use super::Channel;

/// How long an OA token keeps working after a newer one was issued.
pub const OA_GRACE: Duration = Duration::from_secs(300);

/// Tokens kept per owner: far more than a client asks for within a day.
const KEPT_PER_OWNER: usize = 256;

/// How long an expired token is still recognised as one.
const REMEMBER_EXPIRED_MS: i64 = 86_400_000;

/// Who a token was issued to: an account of a channel, and for WeCom which of its secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// The channel.
    pub channel: Channel,
    /// The account's index among that channel's accounts.
    pub account: usize,
    /// WeCom: the 客户联系 secret's token rather than the app's.
    pub contact: bool,
}

/// A token's standing when it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Valid, issued to this owner.
    Valid(Owner),
    /// Issued to this owner, expired now.
    Expired(Owner),
    /// Never issued (or long forgotten).
    Unknown,
}

#[derive(Debug)]
struct Issued {
    owner: Owner,
    expires_ms: i64,
}

/// The tokens issued so far.
#[derive(Debug, Default)]
pub struct Tokens {
    by_value: HashMap<String, Issued>,
    by_owner: HashMap<Owner, VecDeque<String>>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Tokens {
    /// A new token for `owner`, valid for `ttl` from `now`, with a value from `fresh`; returns the
    /// value and when it expires. With `grace`, the owner's earlier tokens expire within it.
    fn issue(
        &mut self,
        owner: Owner,
        now: i64,
        ttl: Duration,
        grace: Option<Duration>,
        fresh: impl FnOnce() -> String,
    ) -> (String, i64) {
        let expires_ms = now.saturating_add(ms(ttl));
        let list = self.by_owner.entry(owner).or_default();
        if let Some(grace) = grace {
            let until = now.saturating_add(ms(grace.min(ttl)));
            for old in list.iter() {
                if let Some(t) = self.by_value.get_mut(old) {
                    t.expires_ms = t.expires_ms.min(until);
                }
            }
        }
        // Forget what is long expired, and the oldest beyond the cap.
        while let Some(old) = list.front() {
            let stale = self
                .by_value
                .get(old)
                .is_none_or(|t| t.expires_ms.saturating_add(REMEMBER_EXPIRED_MS) < now);
            if !stale && list.len() < KEPT_PER_OWNER {
                break;
            }
            if let Some(old) = list.pop_front() {
                self.by_value.remove(&old);
            }
        }
        let value = fresh();
        list.push_back(value.clone());
        self.by_value
            .insert(value.clone(), Issued { owner, expires_ms });
        (value, expires_ms)
    }

    /// OA `/cgi-bin/token`: a new token; the earlier ones expire within [`OA_GRACE`].
    pub fn issue_oa(
        &mut self,
        owner: Owner,
        now: i64,
        ttl: Duration,
        fresh: impl FnOnce() -> String,
    ) -> (String, i64) {
        self.issue(owner, now, ttl, Some(OA_GRACE), fresh)
    }

    /// Getui `auth`: a new token; the earlier ones keep their own lifetime.
    pub fn issue_getui(
        &mut self,
        owner: Owner,
        now: i64,
        ttl: Duration,
        fresh: impl FnOnce() -> String,
    ) -> (String, i64) {
        self.issue(owner, now, ttl, None, fresh)
    }

    /// WeCom `gettoken`: the owner's current token while it is valid, else a new one.
    pub fn current_or_issue(
        &mut self,
        owner: Owner,
        now: i64,
        ttl: Duration,
        fresh: impl FnOnce() -> String,
    ) -> (String, i64) {
        let current = self
            .by_owner
            .get(&owner)
            .and_then(|l| l.back())
            .and_then(|v| self.by_value.get(v).map(|t| (v, t.expires_ms)))
            .filter(|(_, expires)| *expires > now)
            .map(|(v, expires)| (v.clone(), expires));
        match current {
            Some(c) => c,
            None => self.issue(owner, now, ttl, None, fresh),
        }
    }

    /// What `value` is at `now`.
    pub fn standing(&self, value: &str, now: i64) -> Standing {
        match self.by_value.get(value) {
            None => Standing::Unknown,
            Some(t) if t.expires_ms > now => Standing::Valid(t.owner),
            Some(t) => Standing::Expired(t.owner),
        }
    }

    /// Expires now every token of `channel` (of its account `account` only, if given) that is
    /// still valid; returns how many.
    pub fn expire(&mut self, channel: Channel, account: Option<usize>, now: i64) -> usize {
        self.expire_owned(now, |o| {
            o.channel == channel && account.is_none_or(|a| a == o.account)
        })
    }

    /// Expires now every still valid token whose owner `which` picks; returns how many.
    pub fn expire_owned(&mut self, now: i64, which: impl Fn(&Owner) -> bool) -> usize {
        let mut n = 0;
        for (owner, list) in &self.by_owner {
            if !which(owner) {
                continue;
            }
            for v in list {
                if let Some(t) = self.by_value.get_mut(v)
                    && t.expires_ms > now
                {
                    t.expires_ms = now;
                    n += 1;
                }
            }
        }
        n
    }
}

/// Keys remembered for a time window, as a platform remembers an idempotency key, each with the
/// value first answered for it. At most `cap` keys are kept; past it the oldest is forgotten early.
#[derive(Debug)]
pub struct Recent<K, V> {
    window_ms: i64,
    cap: usize,
    seen: HashMap<K, (V, i64)>,
    order: VecDeque<(K, i64)>,
}

impl<K: Clone + Eq + Hash, V: Clone> Recent<K, V> {
    /// Remembers keys for `window`, `cap` at most.
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            window_ms: ms(window),
            cap: cap.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn forget_old(&mut self, now: i64) {
        while let Some((k, at)) = self.order.front() {
            let old = at.saturating_add(self.window_ms) <= now;
            if !old && self.order.len() <= self.cap {
                break;
            }
            // The entry may have been renewed since: forget it only if this is its time.
            if self.seen.get(k).is_some_and(|(_, t)| t == at) {
                self.seen.remove(k);
            }
            self.order.pop_front();
        }
    }

    /// The value first remembered for `key` within the window, if any; otherwise remembers
    /// `value` for it from `now` and returns `None`.
    pub fn first_or_remember(&mut self, key: K, value: V, now: i64) -> Option<V> {
        self.forget_old(now);
        if let Some((v, _)) = self.seen.get(&key) {
            return Some(v.clone());
        }
        self.seen.insert(key.clone(), (value, now));
        self.order.push_back((key, now));
        self.forget_old(now);
        None
    }

    /// The value remembered for `key` within the window, without remembering anything.
    pub fn get(&mut self, key: &K, now: i64) -> Option<V> {
        self.forget_old(now);
        self.seen.get(key).map(|(v, _)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn owner(channel: Channel, account: usize) -> Owner {
        Owner {
            channel,
            account,
            contact: false,
        }
    }

    fn counter() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("t{n}")
        }
    }

    #[test]
    fn an_oa_token_is_replaced_and_the_old_one_works_five_more_minutes() {
        let mut t = Tokens::default();
        let mut fresh = counter();
        let oa = owner(Channel::Oa, 0);
        let (first, expires) = t.issue_oa(oa, 0, 2 * HOUR, &mut fresh);
        assert_eq!(expires, 7_200_000);
        assert_eq!(t.standing(&first, 7_199_999), Standing::Valid(oa));
        assert_eq!(t.standing(&first, 7_200_000), Standing::Expired(oa));
        let (second, _) = t.issue_oa(oa, 1_000_000, 2 * HOUR, &mut fresh);
        assert_ne!(first, second);
        assert_eq!(t.standing(&first, 1_299_999), Standing::Valid(oa));
        assert_eq!(t.standing(&first, 1_300_000), Standing::Expired(oa));
        assert_eq!(t.standing(&second, 1_300_000), Standing::Valid(oa));
        assert_eq!(t.standing("never", 0), Standing::Unknown);
    }

    #[test]
    fn a_short_ttl_shortens_the_grace_too() {
        let mut t = Tokens::default();
        let mut fresh = counter();
        let oa = owner(Channel::Oa, 0);
        let (first, _) = t.issue_oa(oa, 0, Duration::from_secs(60), &mut fresh);
        t.issue_oa(oa, 10_000, Duration::from_secs(60), &mut fresh);
        assert_eq!(t.standing(&first, 59_999), Standing::Valid(oa));
        assert_eq!(t.standing(&first, 60_000), Standing::Expired(oa));
    }

    #[test]
    fn wecom_returns_the_same_token_while_it_is_valid() {
        let mut t = Tokens::default();
        let mut fresh = counter();
        let app = owner(Channel::Wecom, 0);
        let contact = Owner {
            contact: true,
            ..app
        };
        let (a, e) = t.current_or_issue(app, 0, 2 * HOUR, &mut fresh);
        let (b, e2) = t.current_or_issue(app, 3_000_000, 2 * HOUR, &mut fresh);
        assert_eq!((a.clone(), e), (b, e2));
        let (c, _) = t.current_or_issue(contact, 3_000_000, 2 * HOUR, &mut fresh);
        assert_ne!(a, c, "each secret has its own token");
        let (d, e3) = t.current_or_issue(app, 7_200_000, 2 * HOUR, &mut fresh);
        assert_ne!(a, d, "an expired token is replaced");
        assert_eq!(e3, 14_400_000);
    }

    #[test]
    fn expiring_a_channel_or_one_account_leaves_the_others() {
        let mut t = Tokens::default();
        let mut fresh = counter();
        let (a0, _) = t.issue_getui(owner(Channel::Getui, 0), 0, HOUR, &mut fresh);
        let (a1, _) = t.issue_getui(owner(Channel::Getui, 1), 0, HOUR, &mut fresh);
        let (oa, _) = t.issue_oa(owner(Channel::Oa, 0), 0, HOUR, &mut fresh);
        assert_eq!(t.expire(Channel::Getui, Some(1), 10), 1);
        assert_eq!(
            t.standing(&a1, 10),
            Standing::Expired(owner(Channel::Getui, 1))
        );
        assert_eq!(
            t.standing(&a0, 10),
            Standing::Valid(owner(Channel::Getui, 0))
        );
        assert_eq!(t.expire(Channel::Getui, None, 10), 1);
        assert_eq!(t.standing(&oa, 10), Standing::Valid(owner(Channel::Oa, 0)));
        // A token issued after the expiry is valid.
        let (again, _) = t.issue_getui(owner(Channel::Getui, 0), 20, HOUR, &mut fresh);
        assert_eq!(
            t.standing(&again, 20),
            Standing::Valid(owner(Channel::Getui, 0))
        );
    }

    #[test]
    fn an_owner_keeps_a_bounded_number_of_tokens() {
        let mut t = Tokens::default();
        let mut fresh = counter();
        let g = owner(Channel::Getui, 0);
        let (first, _) = t.issue_getui(g, 0, HOUR, &mut fresh);
        for i in 0..KEPT_PER_OWNER {
            t.issue_getui(g, i as i64, HOUR, &mut fresh);
        }
        assert_eq!(t.standing(&first, 1000), Standing::Unknown);
        assert_eq!(t.by_value.len(), KEPT_PER_OWNER);
    }

    #[test]
    fn recent_keys_are_remembered_for_their_window() {
        let mut r = Recent::new(Duration::from_secs(600), 10);
        assert_eq!(r.first_or_remember("a", 1, 0), None);
        assert_eq!(r.first_or_remember("a", 2, 599_999), Some(1));
        assert_eq!(r.get(&"a", 599_999), Some(1));
        assert_eq!(r.first_or_remember("a", 3, 600_000), None);
        assert_eq!(r.first_or_remember("a", 4, 600_001), Some(3));
    }

    #[test]
    fn recent_forgets_the_oldest_past_its_cap() {
        let mut r = Recent::new(Duration::from_secs(600), 3);
        for (i, k) in ["a", "b", "c", "d"].into_iter().enumerate() {
            assert_eq!(r.first_or_remember(k, i, i as i64), None);
        }
        assert_eq!(r.get(&"a", 10), None);
        assert_eq!(r.get(&"b", 10), Some(1));
        assert_eq!(r.seen.len(), 3);
    }
}
