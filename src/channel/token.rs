//! The access-token cache the platform channels share: one token per credential (an app id and
//! its secret), fetched once however many batches need it at the same moment (the first caller
//! fetches, the others wait for its answer), used until shortly before it expires, and dropped
//! when the platform says it is no longer valid — but only if it is still the one that platform
//! refused, so a burst of refusals costs one new fetch, not one each.
//!
//! Credentials are keyed by a hash of what identifies them, secret included: a rotated secret is a
//! new credential, and no secret is kept as a key. Tokens are [`Secret`]s: never printed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::model::Secret;

/// Identifies a credential without holding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CredentialKey([u8; 32]);

impl CredentialKey {
    /// The key of a credential made of `parts` (e.g. the channel, the app id and its secret).
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p);
        }
        CredentialKey(h.finalize().into())
    }
}

/// A token and how long it serves.
#[derive(Debug)]
pub struct Token {
    /// The token.
    pub value: Secret,
    /// When it was fetched.
    pub fetched: Instant,
    /// When it is used no more (a little before the platform's expiry).
    pub refresh_at: Instant,
}

/// How long before its expiry a token is replaced: a tenth of its lifetime, at most five minutes
/// (WeChat keeps an old token working for five minutes after a new one is issued).
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(300))
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Token>>>>;

/// The cache.
#[derive(Default)]
pub struct Tokens {
    slots: Mutex<HashMap<CredentialKey, Slot>>,
    fetches: std::sync::atomic::AtomicU64,
}

impl Tokens {
    fn slot(&self, key: CredentialKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// The cached token of `key`, or a new one from `fetch` (which answers the token and its
    /// lifetime). Callers that come while a fetch is under way wait for it and share its token (or
    /// its error: each of them then fetches again only on its own next call).
    pub async fn get<E, F, Fut>(&self, key: CredentialKey, fetch: F) -> Result<Arc<Token>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Secret, Duration), E>>,
    {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        if let Some(t) = held.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.clone());
        }
        *held = None;
        let (value, lifetime) = fetch().await?;
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let token = Arc::new(Token {
            value,
            fetched: now,
            refresh_at: now
                .checked_add(lifetime.saturating_sub(margin(lifetime)))
                .unwrap_or(now),
        });
        *held = Some(token.clone());
        Ok(token)
    }

    /// Forgets `token` when it is still the cached one of `key` (the platform refused it).
    pub async fn invalidate(&self, key: CredentialKey, token: &Arc<Token>) {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        if held.as_ref().is_some_and(|t| Arc::ptr_eq(t, token)) {
            *held = None;
        }
    }

    /// How many tokens were fetched in all (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn many_callers_at_once_make_one_fetch() {
        let tokens = Arc::new(Tokens::default());
        let calls = Arc::new(AtomicU32::new(0));
        let key = CredentialKey::of(&[b"oa", b"wx1", b"secret"]);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let tokens = tokens.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                tokens
                    .get(key, || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok::<_, String>((Secret::new("t1"), Duration::from_secs(7200)))
                    })
                    .await
                    .map(|t| t.value.expose().to_string())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "t1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(tokens.fetches(), 1);
    }

    #[tokio::test]
    async fn a_refused_token_is_fetched_again_once_and_only_if_still_cached() {
        let tokens = Tokens::default();
        let key = CredentialKey::of(&[b"oa", b"wx1", b"secret"]);
        let n = AtomicU32::new(0);
        let fetch = || async {
            let i = n.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>((Secret::new(format!("t{i}")), Duration::from_secs(7200)))
        };
        let first = tokens.get(key, fetch).await.unwrap();
        tokens.invalidate(key, &first).await;
        let second = tokens.get(key, fetch).await.unwrap();
        assert_eq!(second.value.expose(), "t1");
        // A second refusal of the first token (a request that was in flight) changes nothing.
        tokens.invalidate(key, &first).await;
        let again = tokens.get(key, fetch).await.unwrap();
        assert!(Arc::ptr_eq(&again, &second));
        // Another credential has its own token.
        let other = CredentialKey::of(&[b"oa", b"wx1", b"rotated"]);
        assert_eq!(tokens.get(other, fetch).await.unwrap().value.expose(), "t2");
    }

    #[tokio::test]
    async fn a_token_is_replaced_before_it_expires() {
        let tokens = Tokens::default();
        let key = CredentialKey::of(&[b"getui"]);
        let t = tokens
            .get(key, || async {
                Ok::<_, String>((Secret::new("t"), Duration::from_secs(100)))
            })
            .await
            .unwrap();
        assert_eq!(t.refresh_at - t.fetched, Duration::from_secs(90));
        assert_eq!(margin(Duration::from_secs(7200)), Duration::from_secs(300));
        let failed: Result<_, String> = tokens
            .get(CredentialKey::of(&[b"x"]), || async {
                Err("40125".to_string())
            })
            .await;
        assert_eq!(failed.unwrap_err(), "40125");
    }
}
