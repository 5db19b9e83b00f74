//! The access-token cache the platform channels share: one token per credential (an app id and
//! its secret), fetched once however many batches need it at the same moment (the first caller
//! fetches, the others wait for its answer), used until shortly before it expires, and dropped
//! when the platform says it is no longer valid — but only if it is still the one that platform
//! refused, so a burst of refusals costs one new fetch, not one each.
//!
//! Credentials are keyed by a hash of what identifies them, secret included: a rotated secret is a
//! new credential, and no secret is kept as a key. Tokens are [`Secret`]s: never printed.
//!
//! # Shared through the registry
//! A cache made with [`Tokens::shared`] also keeps its tokens in a [`TokenStore`] — the registry
//! ([`RegistryTokens`]), so that every daemon on one PostgreSQL uses the token one of them
//! obtained (a fresh `/cgi-bin/token` per node would invalidate the others' after five minutes),
//! and a restarted daemon on SQLite the token it had (sparing the platforms' daily quota). On a
//! miss in memory the cache reads the stored token and uses it if it has life left (the same
//! margin as a token fetched here, counted on its whole lifetime); otherwise it claims the fetch
//! (a `fetching:` row with a random id and a short lease, [`CLAIM_TTL`], renewed while the fetch
//! runs), fetches, stores the token and ends the claim. A node that finds the fetch claimed by
//! another polls for the token that node stores; a claim whose holder died lapses after its lease,
//! and then the next node claims it. The wait is bounded: past [`WAIT`] the node fetches on its
//! own. A token the platform refused is removed from the store only if the store still holds that
//! token, so a newer one another node stored stays.
//!
//! The store is keyed by a MAC of the credential's key under the registry's own key
//! ([`crate::model::Fingerprinter::mac`]), never the credential nor a bare hash of it. Its calls
//! are blocking (the PostgreSQL registry waits on its own runtime) and run on tokio's blocking
//! threads, each bounded by [`STORE_TIMEOUT`]. A store that fails or does not answer does not stop
//! sending: the node fetches its own tokens, as a cache without a store does, and says so once in
//! the log (and once when the store works again), not on every call. What it says never holds a
//! token.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::model::Secret;
use crate::registry::{Registry, SharedToken};

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

    /// The key's bytes (a hash: no secret can be read back from them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A token and how long it serves.
#[derive(Debug)]
pub struct Token {
    /// The token.
    pub value: Secret,
    /// When it was fetched (by whichever node fetched it).
    pub fetched: Instant,
    /// When it is used no more (a little before the platform's expiry).
    pub refresh_at: Instant,
}

impl Token {
    /// A token of `lifetime` obtained `age` ago (zero: just now).
    fn new(value: Secret, lifetime: Duration, age: Duration) -> Self {
        let now = Instant::now();
        let fetched = now.checked_sub(age).unwrap_or(now);
        let serves = lifetime.saturating_sub(margin(lifetime));
        Token {
            value,
            fetched,
            refresh_at: fetched.checked_add(serves).unwrap_or(now),
        }
    }
}

/// How long before its expiry a token is replaced: a tenth of its lifetime, at most five minutes
/// (WeChat keeps an old token working for five minutes after a new one is issued).
fn margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(300))
}

/// How long a claim to fetch a token lasts unless renewed: a node that died mid-fetch holds the
/// others up for at most this long.
pub const CLAIM_TTL: Duration = Duration::from_secs(5);

/// How long a node waits for the token another node fetches before it fetches its own.
pub const WAIT: Duration = Duration::from_secs(15);

/// How long one call to the store may take before the node goes on without it.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiting node looks for the token another node fetches.
const POLL: Duration = Duration::from_millis(100);

/// Where tokens are shared between the caches of several processes (the registry, see
/// [`RegistryTokens`]). Its calls block; errors are said in words, without a token.
pub trait TokenStore: Send + Sync {
    /// The token stored for `key`, whatever life it has left.
    fn read(&self, key: &CredentialKey) -> Result<Option<SharedToken>, String>;
    /// Claims `key`'s fetch for `ttl` as `claim` of `holder`: `None` when the caller has it (or
    /// extended its own), `Some(holder)` while another's claim lasts.
    fn claim(
        &self,
        key: &CredentialKey,
        claim: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, String>;
    /// Stores `token`, good for `lifetime` from now, and ends the claim `claim`.
    fn write(
        &self,
        key: &CredentialKey,
        token: &Secret,
        lifetime: Duration,
        holder: &str,
        claim: &str,
    ) -> Result<(), String>;
    /// Ends the claim `claim` (its fetch failed).
    fn release(&self, key: &CredentialKey, claim: &str) -> Result<(), String>;
    /// Removes `key`'s token if it is still `token`.
    fn forget(&self, key: &CredentialKey, token: &Secret) -> Result<(), String>;
}

/// The registry as a [`TokenStore`]: each credential stored under a keyed MAC of its key.
#[derive(Clone)]
pub struct RegistryTokens(pub Arc<dyn Registry>);

impl RegistryTokens {
    /// The key a credential is stored under: worthless without the registry's key, and another
    /// value than any fingerprint of the same registry.
    pub fn stored_key(&self, key: &CredentialKey) -> String {
        self.0.fingerprinter().mac("shared-token", key.as_bytes())
    }
}

/// A registry error in words, any token it might quote hidden.
fn said(e: crate::registry::RegistryError, token: Option<&Secret>) -> String {
    let text = e.to_string();
    match token {
        Some(t) if !t.expose().is_empty() => text.replace(t.expose(), "(sensitive)"),
        _ => text,
    }
}

impl TokenStore for RegistryTokens {
    fn read(&self, key: &CredentialKey) -> Result<Option<SharedToken>, String> {
        self.0
            .shared_token(&self.stored_key(key))
            .map_err(|e| said(e, None))
    }

    fn claim(
        &self,
        key: &CredentialKey,
        claim: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, String> {
        self.0
            .claim_token_fetch(&self.stored_key(key), claim, holder, ttl)
            .map_err(|e| said(e, None))
    }

    fn write(
        &self,
        key: &CredentialKey,
        token: &Secret,
        lifetime: Duration,
        holder: &str,
        claim: &str,
    ) -> Result<(), String> {
        self.0
            .put_shared_token(&self.stored_key(key), token, lifetime, holder, claim)
            .map_err(|e| said(e, Some(token)))
    }

    fn release(&self, key: &CredentialKey, claim: &str) -> Result<(), String> {
        self.0
            .release_token_claim(&self.stored_key(key), claim)
            .map_err(|e| said(e, None))
    }

    fn forget(&self, key: &CredentialKey, token: &Secret) -> Result<(), String> {
        self.0
            .drop_shared_token(&self.stored_key(key), token)
            .map(|_| ())
            .map_err(|e| said(e, Some(token)))
    }
}

/// Where the log lines of a shared cache go.
pub type Say = Box<dyn Fn(&str) + Send + Sync>;

/// The store of a shared cache, and how it is used.
struct Sharing {
    store: Arc<dyn TokenStore>,
    /// Who this node is, as the store records who obtained a token.
    holder: String,
    claim_ttl: Duration,
    wait: Duration,
    timeout: Duration,
    /// The store failed last time (said once, until it works again).
    failing: AtomicBool,
    say: Say,
}

/// What a node does about a token it lacks, once the store was asked.
enum Next {
    /// Use this stored token.
    Use(Arc<Token>),
    /// Fetch it under this claim, and store it.
    Fetch(String),
    /// Fetch it without the store (it failed, or the wait ran out).
    Alone,
}

impl Sharing {
    /// Runs `f` on the store from a blocking thread, bounded by the timeout.
    async fn call<T, F>(&self, f: F) -> Result<T, String>
    where
        T: Send + 'static,
        F: FnOnce(&dyn TokenStore) -> Result<T, String> + Send + 'static,
    {
        let store = self.store.clone();
        let call = tokio::task::spawn_blocking(move || f(store.as_ref()));
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => Err(format!("the call to the registry stopped: {e}")),
            Err(_) => Err(format!(
                "no answer from the registry within {}",
                humantime::format_duration(self.timeout)
            )),
        }
        .inspect(|_| self.works())
        .inspect_err(|e| self.fails(e))
    }

    fn fails(&self, why: &str) {
        if !self.failing.swap(true, Ordering::AcqRel) {
            (self.say)(&format!(
                "warning: the platform tokens shared through the registry cannot be used ({why}); this node fetches its own until the registry answers again, and each such fetch of an Official Account token ends the one other nodes use five minutes later"
            ));
        }
    }

    fn works(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            (self.say)("the platform tokens shared through the registry are used again");
        }
    }

    /// The stored token of `key` if it has more than its margin left; `Err` when the store failed.
    async fn usable(&self, key: CredentialKey) -> Result<Option<Arc<Token>>, ()> {
        let stored = self.call(move |s| s.read(&key)).await.map_err(|_| ())?;
        Ok(stored.and_then(|t| {
            let lifetime = t.age.saturating_add(t.left);
            (t.left > margin(lifetime)).then(|| Arc::new(Token::new(t.token, lifetime, t.age)))
        }))
    }

    /// Looks for `key`'s token in the store, waiting while another node fetches it.
    async fn next(&self, key: CredentialKey) -> Next {
        let claim = crate::store::random_hex(8);
        let deadline = Instant::now() + self.wait;
        let mut other = String::new();
        // Bounded: each round but the last waits `POLL`, and the deadline ends them.
        let rounds = self.wait.as_millis() / POLL.as_millis().max(1) + 2;
        for _ in 0..rounds {
            match self.usable(key).await {
                Ok(Some(token)) => return Next::Use(token),
                Ok(None) => {}
                Err(()) => return Next::Alone,
            }
            let (id, holder, ttl) = (claim.clone(), self.holder.clone(), self.claim_ttl);
            match self.call(move |s| s.claim(&key, &id, &holder, ttl)).await {
                Ok(None) => {
                    // Another node may have stored its token and ended its claim between the
                    // read and the claim: then that token is used, and nothing fetched.
                    if let Ok(Some(token)) = self.usable(key).await {
                        let _ = self.call(move |s| s.release(&key, &claim)).await;
                        return Next::Use(token);
                    }
                    return Next::Fetch(claim);
                }
                Ok(Some(by)) => other = by,
                Err(_) => return Next::Alone,
            }
            if Instant::now() + POLL > deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        (self.say)(&format!(
            "warning: {other} claimed the fetch of a platform token and stored none within {}; this node fetches its own",
            humantime::format_duration(self.wait)
        ));
        Next::Alone
    }

    /// Runs `fetch` under `claim`, renewing the claim until it answers.
    async fn fetch_claimed<E, Fut>(
        &self,
        key: CredentialKey,
        claim: &str,
        fetch: Fut,
    ) -> Fut::Output
    where
        Fut: Future<Output = Result<(Secret, Duration), E>>,
    {
        tokio::pin!(fetch);
        // Bounded by the fetch itself, which each channel bounds with its HTTP timeout.
        loop {
            tokio::select! {
                answer = &mut fetch => return answer,
                _ = tokio::time::sleep(self.claim_ttl / 3) => {
                    let (id, holder, ttl) = (claim.to_string(), self.holder.clone(), self.claim_ttl);
                    let _ = self.call(move |s| s.claim(&key, &id, &holder, ttl)).await;
                }
            }
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Token>>>>;

/// The cache.
#[derive(Default)]
pub struct Tokens {
    slots: Mutex<HashMap<CredentialKey, Slot>>,
    fetches: AtomicU64,
    sharing: Option<Sharing>,
}

impl Tokens {
    /// A cache whose tokens are shared through `store` (see the module docs) by the node
    /// `holder`; what it has to say about the store goes to `say`.
    pub fn shared(
        store: Arc<dyn TokenStore>,
        holder: impl Into<String>,
        say: impl Fn(&str) + Send + Sync + 'static,
    ) -> Self {
        Tokens {
            sharing: Some(Sharing {
                store,
                holder: holder.into(),
                claim_ttl: CLAIM_TTL,
                wait: WAIT,
                timeout: STORE_TIMEOUT,
                failing: AtomicBool::new(false),
                say: Box::new(say),
            }),
            ..Tokens::default()
        }
    }

    /// Sets how long a claim lasts unless renewed, how long a node waits for another's fetch, and
    /// how long a store call may take (defaults [`CLAIM_TTL`], [`WAIT`], [`STORE_TIMEOUT`]).
    pub fn with_timing(mut self, claim_ttl: Duration, wait: Duration, timeout: Duration) -> Self {
        if let Some(s) = self.sharing.as_mut() {
            s.claim_ttl = claim_ttl;
            s.wait = wait;
            s.timeout = timeout;
        }
        self
    }

    fn slot(&self, key: CredentialKey) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(key).or_default().clone()
    }

    /// The cached token of `key`, or a new one from `fetch` (which answers the token and its
    /// lifetime). Callers that come while a fetch is under way wait for it and share its token (or
    /// its error: each of them then fetches again only on its own next call). A shared cache
    /// looks in its store before it fetches, and stores what it fetched.
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
        let Some(sharing) = &self.sharing else {
            let token = self.fetched(fetch().await?);
            *held = Some(token.clone());
            return Ok(token);
        };
        let token = match sharing.next(key).await {
            Next::Use(token) => token,
            Next::Fetch(claim) => match sharing.fetch_claimed(key, &claim, fetch()).await {
                Ok((value, lifetime)) => {
                    let (stored, holder) = (value.clone(), sharing.holder.clone());
                    // A token that cannot be stored is still used here.
                    let _ = sharing
                        .call(move |s| s.write(&key, &stored, lifetime, &holder, &claim))
                        .await;
                    self.fetched((value, lifetime))
                }
                Err(e) => {
                    let _ = sharing.call(move |s| s.release(&key, &claim)).await;
                    return Err(e);
                }
            },
            Next::Alone => self.fetched(fetch().await?),
        };
        *held = Some(token.clone());
        Ok(token)
    }

    /// A token just fetched, counted.
    fn fetched(&self, (value, lifetime): (Secret, Duration)) -> Arc<Token> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        Arc::new(Token::new(value, lifetime, Duration::ZERO))
    }

    /// Forgets `token` when it is still the cached one of `key` (the platform refused it); a
    /// shared cache also removes it from the store, if the store still holds it.
    pub async fn invalidate(&self, key: CredentialKey, token: &Arc<Token>) {
        let slot = self.slot(key);
        let mut held = slot.lock().await;
        if held.as_ref().is_some_and(|t| Arc::ptr_eq(t, token)) {
            *held = None;
            if let Some(sharing) = &self.sharing {
                let value = token.value.clone();
                let _ = sharing.call(move |s| s.forget(&key, &value)).await;
            }
        }
    }

    /// How many tokens were fetched in all (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

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

    /// A store in memory, timed by `Instant`, that can be made to fail; it counts what it did.
    #[derive(Default)]
    pub(crate) struct MemoryStore {
        rows: Mutex<HashMap<CredentialKey, (Secret, Instant, Instant, String)>>,
        claims: Mutex<HashMap<CredentialKey, (String, Instant, String)>>,
        pub(crate) fail: AtomicBool,
        pub(crate) refused: AtomicU64,
        pub(crate) removed: AtomicU64,
        pub(crate) forgets: AtomicU64,
    }

    impl MemoryStore {
        fn check(&self) -> Result<(), String> {
            if self.fail.load(Ordering::SeqCst) {
                Err("cannot connect to the PostgreSQL registry postgres://touchctl@db:5432/reg: connection refused".into())
            } else {
                Ok(())
            }
        }

        /// Stores `token` as obtained `age` ago, good for `lifetime` in all.
        fn put(&self, key: CredentialKey, token: &str, lifetime: Duration, age: Duration) {
            let now = Instant::now();
            let obtained = now.checked_sub(age).unwrap();
            self.rows.lock().unwrap().insert(
                key,
                (
                    Secret::new(token),
                    obtained + lifetime,
                    obtained,
                    "seed".into(),
                ),
            );
        }

        fn holder(&self, key: CredentialKey) -> Option<String> {
            self.rows.lock().unwrap().get(&key).map(|r| r.3.clone())
        }
    }

    impl TokenStore for MemoryStore {
        fn read(&self, key: &CredentialKey) -> Result<Option<SharedToken>, String> {
            self.check()?;
            let now = Instant::now();
            Ok(self
                .rows
                .lock()
                .unwrap()
                .get(key)
                .map(|(t, until, at, by)| SharedToken {
                    token: t.clone(),
                    left: until.saturating_duration_since(now),
                    age: now.saturating_duration_since(*at),
                    obtained_by: by.clone(),
                }))
        }

        fn claim(
            &self,
            key: &CredentialKey,
            claim: &str,
            holder: &str,
            ttl: Duration,
        ) -> Result<Option<String>, String> {
            self.check()?;
            let now = Instant::now();
            let mut claims = self.claims.lock().unwrap();
            if let Some((id, until, by)) = claims.get(key)
                && *until > now
                && id != claim
            {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return Ok(Some(by.clone()));
            }
            claims.insert(*key, (claim.to_string(), now + ttl, holder.to_string()));
            Ok(None)
        }

        fn write(
            &self,
            key: &CredentialKey,
            token: &Secret,
            lifetime: Duration,
            holder: &str,
            claim: &str,
        ) -> Result<(), String> {
            self.check()?;
            let now = Instant::now();
            self.rows.lock().unwrap().insert(
                *key,
                (token.clone(), now + lifetime, now, holder.to_string()),
            );
            self.release(key, claim)
        }

        fn release(&self, key: &CredentialKey, claim: &str) -> Result<(), String> {
            self.check()?;
            let mut claims = self.claims.lock().unwrap();
            if claims.get(key).is_some_and(|c| c.0 == claim) {
                claims.remove(key);
            }
            Ok(())
        }

        fn forget(&self, key: &CredentialKey, token: &Secret) -> Result<(), String> {
            self.check()?;
            self.forgets.fetch_add(1, Ordering::SeqCst);
            let mut rows = self.rows.lock().unwrap();
            if rows.get(key).is_some_and(|r| r.0 == *token) {
                rows.remove(key);
                self.removed.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    type Lines = Arc<Mutex<Vec<String>>>;

    fn node(store: &Arc<MemoryStore>, name: &str) -> (Tokens, Lines) {
        let lines = Lines::default();
        let sink = lines.clone();
        let tokens = Tokens::shared(store.clone(), name, move |l| {
            sink.lock().unwrap().push(l.to_string())
        });
        (tokens, lines)
    }

    /// Waits (polling) until `done`, at most ten seconds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_caches_sharing_a_store_make_one_fetch() {
        let store = Arc::new(MemoryStore::default());
        let (a, _) = node(&store, "node-a");
        let (b, _) = node(&store, "node-b");
        let (a, b) = (Arc::new(a), Arc::new(b));
        let key = CredentialKey::of(&[b"oa", b"wx1", b"secret"]);
        let calls = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for i in 0..10 {
            let tokens = if i % 2 == 0 { a.clone() } else { b.clone() };
            let (calls, store) = (calls.clone(), store.clone());
            tasks.push(tokio::spawn(async move {
                tokens
                    .get(key, || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        // The fetch answers once the other node has found it claimed.
                        until("the other node never waited", || {
                            store.refused.load(Ordering::SeqCst) >= 1
                        })
                        .await;
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
        assert_eq!(a.fetches() + b.fetches(), 1);
        let by = store.holder(key).unwrap();
        assert!(by == "node-a" || by == "node-b", "{by}");
        assert!(store.claims.lock().unwrap().is_empty(), "the claim ended");
    }

    #[tokio::test]
    async fn a_refused_token_is_dropped_from_the_store_once() {
        let store = Arc::new(MemoryStore::default());
        let (a, _) = node(&store, "node-a");
        let (b, _) = node(&store, "node-b");
        let key = CredentialKey::of(&[b"oa", b"wx1", b"secret"]);
        let n = AtomicU32::new(0);
        let fetch = || async {
            let i = n.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>((Secret::new(format!("t{i}")), Duration::from_secs(7200)))
        };
        let first = a.get(key, fetch).await.unwrap();
        let seen_by_b = b.get(key, fetch).await.unwrap();
        assert_eq!(seen_by_b.value.expose(), "t0");
        assert_eq!(b.fetches(), 0, "b used the token a stored");
        // The platform refuses t0 on a: gone from the store; a refusal a sees again changes nothing.
        a.invalidate(key, &first).await;
        a.invalidate(key, &first).await;
        assert_eq!(store.removed.load(Ordering::SeqCst), 1);
        assert_eq!(store.forgets.load(Ordering::SeqCst), 1);
        let second = a.get(key, fetch).await.unwrap();
        assert_eq!(second.value.expose(), "t1");
        // b meets the refusal later: the store holds t1 now, which stays, and b uses it.
        b.invalidate(key, &seen_by_b).await;
        assert_eq!(store.removed.load(Ordering::SeqCst), 1);
        assert_eq!(b.get(key, fetch).await.unwrap().value.expose(), "t1");
        assert_eq!((a.fetches(), b.fetches()), (2, 0));
    }

    #[tokio::test]
    async fn a_dead_fetchers_claim_lapses_and_another_node_fetches() {
        let store = Arc::new(MemoryStore::default());
        let key = CredentialKey::of(&[b"wecom", b"corp", b"secret"]);
        let ttl = Duration::from_millis(300);
        // A node claimed the fetch and died before it stored anything.
        assert_eq!(store.claim(&key, "gone", "node-dead", ttl), Ok(None));
        let (b, lines) = node(&store, "node-b");
        let b = b.with_timing(ttl, Duration::from_secs(10), Duration::from_secs(5));
        let token = b
            .get(key, || async {
                Ok::<_, String>((Secret::new("fresh"), Duration::from_secs(7200)))
            })
            .await
            .unwrap();
        assert_eq!(token.value.expose(), "fresh");
        assert!(
            store.refused.load(Ordering::SeqCst) >= 1,
            "b waited for the claim"
        );
        assert_eq!(store.holder(key).as_deref(), Some("node-b"));
        assert!(
            lines.lock().unwrap().is_empty(),
            "{:?}",
            lines.lock().unwrap()
        );
    }

    #[tokio::test]
    async fn a_claim_never_fulfilled_within_the_wait_is_fetched_here_and_said() {
        let store = Arc::new(MemoryStore::default());
        let key = CredentialKey::of(&[b"getui", b"app", b"secret"]);
        // A claim that outlasts the wait (a fetch that hangs, renewed by a live node).
        assert_eq!(
            store.claim(&key, "slow", "node-slow", Duration::from_secs(600)),
            Ok(None)
        );
        let (b, lines) = node(&store, "node-b");
        let b = b.with_timing(
            Duration::from_secs(5),
            Duration::from_millis(250),
            Duration::from_secs(5),
        );
        let token = b
            .get(key, || async {
                Ok::<_, String>((Secret::new("mine"), Duration::from_secs(7200)))
            })
            .await
            .unwrap();
        assert_eq!(token.value.expose(), "mine");
        assert_eq!(b.fetches(), 1);
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("node-slow claimed the fetch"),
            "{}",
            lines[0]
        );
    }

    #[tokio::test]
    async fn a_failing_store_falls_back_to_fetching_here_and_says_so_once() {
        let store = Arc::new(MemoryStore::default());
        store.fail.store(true, Ordering::SeqCst);
        let (a, lines) = node(&store, "node-a");
        let n = AtomicU32::new(0);
        let fetch = || async {
            let i = n.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>((Secret::new(format!("tok-{i}")), Duration::from_secs(7200)))
        };
        let k1 = CredentialKey::of(&[b"oa", b"1"]);
        let k2 = CredentialKey::of(&[b"oa", b"2"]);
        let t = a.get(k1, fetch).await.unwrap();
        a.get(k2, fetch).await.unwrap();
        a.invalidate(k1, &t).await;
        a.get(k1, fetch).await.unwrap();
        assert_eq!(a.fetches(), 3, "every token fetched here");
        {
            let lines = lines.lock().unwrap();
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(
                lines[0].starts_with("warning: the platform tokens shared through the registry cannot be used (cannot connect"),
                "{}",
                lines[0]
            );
            assert!(!lines[0].contains("tok-"), "{}", lines[0]);
        }
        // The store answers again: said once, and used.
        store.fail.store(false, Ordering::SeqCst);
        let k3 = CredentialKey::of(&[b"oa", b"3"]);
        a.get(k3, fetch).await.unwrap();
        assert_eq!(store.holder(k3).as_deref(), Some("node-a"));
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[1],
            "the platform tokens shared through the registry are used again"
        );
    }

    #[tokio::test]
    async fn a_stored_token_is_used_only_with_more_than_its_margin_left() {
        let store = Arc::new(MemoryStore::default());
        let (a, _) = node(&store, "node-a");
        let fetch = || async { Ok::<_, String>((Secret::new("new"), Duration::from_secs(7200))) };
        // 7200 s in all, 200 s left: inside the five-minute margin, so fetched again.
        let old = CredentialKey::of(&[b"oa", b"old"]);
        store.put(
            old,
            "old",
            Duration::from_secs(7200),
            Duration::from_secs(7000),
        );
        assert_eq!(a.get(old, fetch).await.unwrap().value.expose(), "new");
        // An hour left: used, and replaced when its margin begins, as if fetched here.
        let young = CredentialKey::of(&[b"oa", b"young"]);
        store.put(
            young,
            "young",
            Duration::from_secs(7200),
            Duration::from_secs(3600),
        );
        let t = a.get(young, fetch).await.unwrap();
        assert_eq!(t.value.expose(), "young");
        let serves = t.refresh_at.saturating_duration_since(Instant::now());
        assert!(
            serves <= Duration::from_secs(3300) && serves > Duration::from_secs(3290),
            "{serves:?}"
        );
        assert_eq!(t.refresh_at - t.fetched, Duration::from_secs(6900));
        assert_eq!(a.fetches(), 1);
    }
}
