//! The live state: which touchpoints are live, each one's spec as applied, its generation, where it
//! came from, and keyed fingerprints of its secrets (never the secrets). Backends sit behind the
//! [`Registry`] trait; the embedded SQLite file is the default, and a PostgreSQL database
//! (`--state postgres://…`) lets several machines share one registry ([`open`] picks by `--state`). It also keeps the latest
//! `component_verify_ticket` of each WeChat open platform (a secret that WeChat pushes, not
//! desired state: never printed, planned or imported; [`Tickets`] lends it to the channels), and
//! the platforms' access tokens the daemons share ([`SharedToken`], a secret of the same kind;
//! see [`crate::channel::token`]).
//!
//! Writers take the registry lock (one at a time) and every write is a compare-and-swap on the
//! touchpoint's generation, so a change made by someone else since a plan was computed is refused
//! instead of overwritten. The lock is a lease (see [`crate::lease`]): [`LockGuard`] renews it
//! while its holder works, and a successor takes over one whose holder is gone.

pub(crate) mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use postgres::{
    Incoming, MOVE_LIMIT, Moved, PostgresRegistry, TargetState, inspect, is_postgres_url,
};
pub use sqlite::{Exported, MovedTo, SqliteRegistry, TicketRow, TouchpointRow};

use crate::model::{Fingerprinter, Secret, SpecJson};

/// Where a live touchpoint's spec came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The git commit the files were at, when they were in a git repository.
    pub commit: Option<String>,
    /// Whether the work tree had uncommitted changes under the touchpoint folder.
    #[serde(default)]
    pub dirty: bool,
    /// The file the touchpoint was read from.
    pub file: Option<String>,
}

/// One live touchpoint as the registry holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Live {
    /// The touchpoint id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The spec as the last apply wrote it.
    pub applied_spec: SpecJson,
    /// The spec in force now, when it was changed outside apply since (drift).
    pub drifted_spec: Option<SpecJson>,
    /// Keyed fingerprints of the secrets, by field path.
    pub fingerprints: BTreeMap<String, String>,
    /// Bumped by every write to this touchpoint.
    pub generation: u64,
    /// Paused through the admin API: registered, but holding its work.
    pub paused: bool,
    /// When the last apply wrote it (RFC 3339).
    pub applied_at: String,
    /// Who applied it (`user@host`).
    pub applied_by: String,
    /// Where the applied spec came from.
    pub source: Provenance,
}

impl Live {
    /// The spec in force now.
    pub fn spec(&self) -> &SpecJson {
        self.drifted_spec.as_ref().unwrap_or(&self.applied_spec)
    }
}

/// A touchpoint as apply writes it.
#[derive(Clone, Debug)]
pub struct Put {
    /// The touchpoint id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The canonical spec.
    pub spec: SpecJson,
    /// Keyed fingerprints of its secrets.
    pub fingerprints: BTreeMap<String, String>,
    /// `user@host`.
    pub applied_by: String,
    /// Where it came from.
    pub source: Provenance,
}

/// Who holds the registry lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    /// Random id of this lock, for `touchctl force-unlock`.
    pub lock_id: String,
    /// `user@host`.
    pub holder: String,
    /// The holder's process id.
    pub pid: u32,
    /// The holder's host name.
    pub host: String,
    /// What the holder is doing, e.g. `apply`.
    pub operation: String,
    /// When it took the lock (RFC 3339).
    pub acquired_at: String,
    /// When its lease expires unless renewed (ms since the epoch); none for a lock taken by a
    /// touchctl from before leases.
    pub expires_at: Option<i64>,
}

impl LockInfo {
    /// Where this lock stands for a would-be successor at `now_ms`.
    pub fn standing(&self, now_ms: i64) -> crate::lease::Standing {
        crate::lease::standing(&self.host, self.pid, self.expires_at, now_ms)
    }

    /// When its lease expires, for a message (see [`crate::lease::expiry_note`]).
    pub fn expiry_note(&self) -> String {
        crate::lease::expiry_note(self.expires_at, crate::store::now_ms())
    }
}

impl std::fmt::Display for LockInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} by {} (pid {}) since {}, lock id {}",
            self.operation, self.holder, self.pid, self.acquired_at, self.lock_id
        )
    }
}

/// A platform access token kept in the registry for every daemon to use (see
/// [`crate::channel::token`]). A secret: its `Debug` prints `(sensitive)`, and nothing prints it.
#[derive(Debug)]
pub struct SharedToken {
    /// The token.
    pub token: Secret,
    /// How long it has left before the platform's expiry, by the registry's clock (zero once
    /// past it).
    pub left: std::time::Duration,
    /// How long ago it was obtained, by the registry's clock.
    pub age: std::time::Duration,
    /// Who obtained it (a daemon's node name).
    pub obtained_by: String,
}

/// The prefix of the key of a claim to fetch a shared token: `fetching:<key>`, its `token` column
/// the claim's random id (no secret).
pub const FETCHING: &str = "fetching:";

/// Errors of the live-state layer.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another writer holds the lock.
    #[error("the registry is locked: {0}; {note}. Wait for it to finish: a lock whose holder stops renewing it is taken over once its lease expires. If that process is gone for good, `touchctl force-unlock {id}` removes the lock now", id = .0.lock_id, note = .0.expiry_note())]
    Locked(Box<LockInfo>),
    /// force-unlock (without `--force`) of a lock whose holder still renews it.
    #[error("lock {id} is held: {0}; {note}. Its holder keeps renewing it, so it looks alive: stop it or wait for it. If you are sure it is gone (its host was replaced, say), run `touchctl force-unlock {id} --force`", id = .0.lock_id, note = .0.expiry_note())]
    LockLive(Box<LockInfo>),
    /// The touchpoint changed since it was read.
    #[error(
        "touchpoint `{id}` changed in the registry since it was read (expected generation {expected}, found {found}): run plan again"
    )]
    Conflict {
        /// The touchpoint.
        id: String,
        /// What the caller read (`none` when it expected no touchpoint).
        expected: String,
        /// What is there now (`none` when it is gone).
        found: String,
    },
    /// No such touchpoint.
    #[error("touchpoint `{0}` is not in the registry")]
    NotFound(String),
    /// The lock id given to force-unlock is not the lock held.
    #[error("lock {given} is not held{}", .held.as_ref().map(|h| format!(" (the registry is locked by {h})")).unwrap_or_else(|| " (the registry is not locked)".into()))]
    NotLocked {
        /// The id given.
        given: String,
        /// The lock held instead, if any.
        held: Option<Box<LockInfo>>,
    },
    /// The state file was written by a newer touchctl.
    #[error(
        "the state file {path} has format {found}, newer than this touchctl understands ({supported}): upgrade touchctl"
    )]
    TooNew {
        /// The state file.
        path: String,
        /// Its format.
        found: i64,
        /// This build's format.
        supported: i64,
    },
    /// The PostgreSQL database holds a schema newer than this build knows.
    #[error(
        "the PostgreSQL registry {database} has schema version {found}, written by a newer touchctl (this one knows up to version {supported}): upgrade touchctl"
    )]
    SchemaTooNew {
        /// The database, without its password.
        database: String,
        /// Its schema version.
        found: i64,
        /// This build's.
        supported: i64,
    },
    /// The `postgres://` URL could not be used.
    #[error("the PostgreSQL URL {url} cannot be used: {why}. Fix --state (or TOUCHCTL_STATE)")]
    PostgresUrl {
        /// The URL, its password replaced by `***`.
        url: String,
        /// Why.
        why: String,
    },
    /// No connection to the PostgreSQL server.
    #[error(
        "cannot connect to the PostgreSQL registry {database}: {why}. Check that the server is up and reachable, and the user, password and database of --state (or TOUCHCTL_STATE)"
    )]
    PostgresConnect {
        /// The database, without its password.
        database: String,
        /// Why.
        why: String,
    },
    /// A statement failed in PostgreSQL.
    #[error("PostgreSQL registry {database}: {why}")]
    Postgres {
        /// The database, without its password.
        database: String,
        /// Why (the driver's error and its causes).
        why: String,
    },
    /// SQLite failed.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The state file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// The state file or its folder could not be created.
    #[error("cannot create the state file {path}: {source}")]
    Io {
        /// The state file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The state file could not be opened.
    #[error("state database {path}: {source}")]
    Store {
        /// The state file.
        path: String,
        /// Why.
        source: Box<crate::store::StoreError>,
    },
    /// The state file is empty.
    #[error(
        "the state file {0} is empty (0 bytes), so it holds no registry; touchctl never leaves one empty. If it is a leftover (of a copy or a full disk, say), remove it and run again: a new registry is created. If your registry should be there, restore the file from a backup"
    )]
    Empty(String),
    /// The state file holds no registry id.
    #[error(
        "the state file {0} holds no registry id, so it is not a touchctl registry: point --state at your registry, or remove the file if it is a leftover"
    )]
    NotARegistry(String),
    /// Another process created the state file while this one worked from a new registry.
    #[error(
        "the registry ({0}) was created by another process while this one worked from a new, empty registry; nothing was written: run the command again"
    )]
    CreatedMeanwhile(String),
    /// `touchctl state migrate` was given a database that holds a setup already.
    #[error(
        "the PostgreSQL database {database} already holds {touchpoints} touchpoint(s) and {dispatches} dispatch(es): a setup is moved only into a database without any, so that nothing is mixed or overwritten. Give --to a new, empty database (e.g. `createdb touchctl`); `touchctl plan --state {database}` shows the touchpoints this one holds"
    )]
    NotEmpty {
        /// The database, without its password.
        database: String,
        /// Touchpoints in it.
        touchpoints: u64,
        /// Dispatches in it.
        dispatches: u64,
    },
    /// The SQLite registry was moved into PostgreSQL by `touchctl state migrate`.
    #[error(
        "the registry {path} was moved into PostgreSQL ({to}) by `touchctl state migrate` at {at}: changing this file now would make it differ from the registry in use. Run touchctl with --state {to}. If the move was a mistake and nothing uses the PostgreSQL copy, `touchctl state unmark --from {path}` makes this file usable again"
    )]
    Moved {
        /// The state file.
        path: String,
        /// Where it went (a URL without its password).
        to: String,
        /// When (RFC 3339).
        at: String,
    },
    /// The thread that renews the lock could not be started.
    #[error("cannot start the thread that renews the registry lock: {0}")]
    Heartbeat(std::io::Error),
    /// A stored spec is not valid JSON.
    #[error("the registry row of `{id}` is corrupt: {source}")]
    Corrupt {
        /// The touchpoint.
        id: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// The live state store.
pub trait Registry: Send + Sync {
    /// A short description for messages, e.g. `sqlite .touchctl/state.db`.
    fn describe(&self) -> String;
    /// A random id fixed when the registry was created; saved plans are bound to it.
    fn registry_id(&self) -> &str;
    /// The keyed hash for secret fingerprints.
    fn fingerprinter(&self) -> &Fingerprinter;
    /// A value that changes whenever another process writes the registry: a cheap way for a
    /// long-running process to notice an apply made elsewhere.
    fn data_version(&self) -> Result<i64, RegistryError>;
    /// Every live touchpoint, sorted by id.
    fn list(&self) -> Result<Vec<Live>, RegistryError>;
    /// One live touchpoint.
    fn get(&self, id: &str) -> Result<Option<Live>, RegistryError>;
    /// Takes the writer lock for `operation`, failing fast if someone else holds it. A lock left by a
    /// process on this host that no longer runs, or whose lease expired, is taken over; the old
    /// holder is returned then. Use [`LockGuard`], which renews the lease while it is held.
    fn lock(&self, operation: &str) -> Result<(LockInfo, Option<LockInfo>), RegistryError>;
    /// How long a lock's lease lasts unless renewed.
    fn lease_ttl(&self) -> std::time::Duration;
    /// Renews lock `lock_id`'s lease when called, from any thread (see [`crate::lease::Renew`]).
    fn renewer(&self, lock_id: &str) -> crate::lease::Renew;
    /// Releases a lock this process holds.
    fn unlock(&self, lock_id: &str) -> Result<(), RegistryError>;
    /// Removes lock `lock_id` whatever holds it (for a holder that is gone for good). Unless
    /// `force`, refuses while its holder keeps renewing its lease.
    fn force_unlock(&self, lock_id: &str, force: bool) -> Result<LockInfo, RegistryError>;
    /// Writes a touchpoint if its generation is still `expected` (`None`: it must not exist yet).
    /// Returns the new generation.
    fn put(&self, put: &Put, expected: Option<u64>) -> Result<u64, RegistryError>;
    /// Deletes a touchpoint if its generation is still `expected`.
    fn delete(&self, id: &str, expected: u64) -> Result<(), RegistryError>;
    /// Pauses or resumes a touchpoint (an operational change outside apply). Returns the new generation.
    fn set_paused(&self, id: &str, paused: bool) -> Result<u64, RegistryError>;
    /// Whether the registry does not exist yet, so that only a write creates it (a SQLite file not
    /// created yet); a PostgreSQL registry exists once opened.
    fn is_new(&self) -> bool {
        false
    }
    /// Creates the registry now, if it does not exist yet (see [`Registry::is_new`]).
    fn persist(&self) -> Result<(), RegistryError> {
        Ok(())
    }
    /// The latest `component_verify_ticket` WeChat pushed to the open platform `id`, if any. A
    /// secret: never printed, never in a plan or an import.
    fn platform_ticket(&self, id: &str) -> Result<Option<String>, RegistryError>;
    /// Keeps `ticket` as the latest of the open platform `id` (replacing the one before).
    fn set_platform_ticket(&self, id: &str, ticket: &str) -> Result<(), RegistryError>;
    /// The shared platform token kept under `key` (a keyed MAC of the credential, never the
    /// credential), if any, whatever life it has left.
    fn shared_token(&self, key: &str) -> Result<Option<SharedToken>, RegistryError>;
    /// Claims the right to fetch `key`'s token for `ttl`, as `claim` (a random id) of `holder`:
    /// `Ok(None)` when this caller has it now, `Ok(Some(holder))` while another's claim lasts. A
    /// claim whose holder never writes a token (it died mid-fetch) lapses after its `ttl`;
    /// claiming again with the same `claim` extends it (a fetch that takes long).
    fn claim_token_fetch(
        &self,
        key: &str,
        claim: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<String>, RegistryError>;
    /// Keeps `token` as `key`'s shared token, good for `lifetime` from now, obtained by `holder`;
    /// ends the claim `claim` if it is still the one held.
    fn put_shared_token(
        &self,
        key: &str,
        token: &Secret,
        lifetime: std::time::Duration,
        holder: &str,
        claim: &str,
    ) -> Result<(), RegistryError>;
    /// Ends the claim `claim` on `key` if it is still the one held (its fetch failed).
    fn release_token_claim(&self, key: &str, claim: &str) -> Result<(), RegistryError>;
    /// Removes `key`'s shared token if it is still `token` (the platform refused it); whether it
    /// was.
    fn drop_shared_token(&self, key: &str, token: &Secret) -> Result<bool, RegistryError>;
}

/// Opens the registry `--state` names: a PostgreSQL database for a `postgres://` or
/// `postgresql://` URL, else the SQLite file at that path (a new registry that only a write
/// creates, where there is none).
pub fn open(state: &std::path::Path) -> Result<Box<dyn Registry>, RegistryError> {
    match state.to_str() {
        Some(url) if is_postgres_url(url) => Ok(Box::new(PostgresRegistry::open(url)?)),
        _ => Ok(Box::new(SqliteRegistry::open(state)?)),
    }
}

/// `--state` as a message shows it: a PostgreSQL URL without its password.
pub fn shown_state(state: &std::path::Path) -> String {
    match state.to_str() {
        Some(url) if is_postgres_url(url) => postgres::redact(url),
        _ => state.display().to_string(),
    }
}

/// A registry as the store of the open platforms' verify tickets (the channel side's
/// `TicketStore` is implemented for it in `channel::open_platform::client`, so the registry does
/// not depend on channels).
#[derive(Clone)]
pub struct Tickets(pub std::sync::Arc<dyn Registry>);

/// Holds the registry lock, renews its lease on a thread of its own, and releases it when
/// dropped, whatever happens in between.
pub struct LockGuard<'r> {
    registry: &'r dyn Registry,
    /// The lock held.
    pub info: LockInfo,
    /// A lock that was taken over (its process gone, or its lease expired), if any.
    pub recovered: Option<LockInfo>,
    heartbeat: Option<crate::lease::Heartbeat>,
}

impl<'r> LockGuard<'r> {
    /// Takes the lock.
    pub fn acquire(registry: &'r dyn Registry, operation: &str) -> Result<Self, RegistryError> {
        let (info, recovered) = registry.lock(operation)?;
        let mut guard = Self {
            registry,
            info,
            recovered,
            heartbeat: None,
        };
        guard.heartbeat = Some(
            crate::lease::Heartbeat::start(
                "registry-lock",
                registry.lease_ttl(),
                registry.renewer(&guard.info.lock_id),
                |_| {},
            )
            .map_err(RegistryError::Heartbeat)?,
        );
        Ok(guard)
    }

    /// `Err` with why once the lock is no longer held (taken over or force-unlocked): a writer
    /// must stop then.
    pub fn held(&self) -> Result<(), String> {
        match self.heartbeat.as_ref().and_then(|h| h.lost()) {
            Some(why) => Err(format!(
                "the registry lock {} is no longer held: {why}",
                self.info.lock_id
            )),
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        drop(self.heartbeat.take());
        // Nothing useful can be done if releasing fails: the lock then shows as held by a process
        // that is gone, which the next writer on this host recovers (and anyone, once its lease
        // expires).
        let _ = self.registry.unlock(&self.info.lock_id);
    }
}

/// `user@host` of this process.
pub fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", hostname())
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Now, as RFC 3339 in UTC to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Checks every backend runs through the same way.
#[cfg(test)]
pub(crate) mod conformance {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::{Registry, SharedToken};
    use crate::channel::token::{CredentialKey, RegistryTokens, TokenStore, Tokens};
    use crate::model::Secret;

    /// Waits (polling) until `done`, at most 30 seconds.
    pub(crate) fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The shared platform tokens: claims, storing, refusing, lapsing; nothing printed.
    pub(crate) fn shared_tokens(reg: Arc<dyn Registry>) {
        let k = "hmac-sha256:aa";
        assert!(reg.shared_token(k).unwrap().is_none());
        let ttl = Duration::from_secs(30);
        assert_eq!(reg.claim_token_fetch(k, "c1", "node-a", ttl).unwrap(), None);
        assert_eq!(
            reg.claim_token_fetch(k, "c2", "node-b", ttl)
                .unwrap()
                .as_deref(),
            Some("node-a"),
            "another's claim holds"
        );
        assert_eq!(
            reg.claim_token_fetch(k, "c1", "node-a", ttl).unwrap(),
            None,
            "one's own claim is extended"
        );
        // The token stored ends its claim.
        let token = Secret::new("tok-0123456789");
        reg.put_shared_token(k, &token, Duration::from_secs(7200), "node-a", "c1")
            .unwrap();
        let got: SharedToken = reg.shared_token(k).unwrap().unwrap();
        assert_eq!(got.token.expose(), "tok-0123456789");
        assert_eq!(got.obtained_by, "node-a");
        assert!(
            got.left <= Duration::from_secs(7200) && got.left > Duration::from_secs(7100),
            "{:?}",
            got.left
        );
        assert!(got.age < Duration::from_secs(100), "{:?}", got.age);
        assert!(!format!("{got:?}").contains("tok-0123"), "{got:?}");
        assert_eq!(reg.claim_token_fetch(k, "c2", "node-b", ttl).unwrap(), None);
        // A claim released (its fetch failed) frees the fetch at once; another's is not released.
        reg.release_token_claim(k, "c1").unwrap();
        assert!(
            reg.claim_token_fetch(k, "c3", "node-c", ttl)
                .unwrap()
                .is_some()
        );
        reg.release_token_claim(k, "c2").unwrap();
        assert_eq!(reg.claim_token_fetch(k, "c3", "node-c", ttl).unwrap(), None);
        // A refused token goes only if it is still the one stored.
        assert!(!reg.drop_shared_token(k, &Secret::new("older")).unwrap());
        assert!(reg.shared_token(k).unwrap().is_some());
        assert!(reg.drop_shared_token(k, &token).unwrap());
        assert!(reg.shared_token(k).unwrap().is_none());
        assert!(!reg.drop_shared_token(k, &token).unwrap());
        // A dead fetcher's claim lapses.
        reg.release_token_claim(k, "c3").unwrap();
        let short = Duration::from_millis(200);
        assert_eq!(
            reg.claim_token_fetch(k, "d1", "node-dead", short).unwrap(),
            None
        );
        assert!(
            reg.claim_token_fetch(k, "d2", "node-b", ttl)
                .unwrap()
                .is_some()
        );
        wait_for("a dead fetcher's claim never lapsed", || {
            reg.claim_token_fetch(k, "d2", "node-b", ttl)
                .unwrap()
                .is_none()
        });
        // A token past its expiry is read with no life left.
        reg.put_shared_token(k, &token, Duration::ZERO, "node-b", "d2")
            .unwrap();
        wait_for("a token never expired", || {
            reg.shared_token(k).unwrap().unwrap().left == Duration::ZERO
        });
        // Tokens are no touchpoints.
        assert!(reg.list().unwrap().is_empty());
        // The key a credential is stored under is a MAC under this registry's key.
        let cred = CredentialKey::of(&[b"oa", b"wx1", b"secret"]);
        let stored = RegistryTokens(reg.clone()).stored_key(&cred);
        assert!(stored.starts_with("hmac-sha256:"), "{stored}");
        assert!(!stored.contains(&hex::encode(cred.as_bytes())), "{stored}");
    }

    /// The store of one node, counting the claims it found held by another.
    struct Counting(RegistryTokens, Arc<AtomicU64>);

    impl TokenStore for Counting {
        fn read(&self, key: &CredentialKey) -> Result<Option<SharedToken>, String> {
            self.0.read(key)
        }
        fn claim(
            &self,
            key: &CredentialKey,
            claim: &str,
            holder: &str,
            ttl: Duration,
        ) -> Result<Option<String>, String> {
            let held = self.0.claim(key, claim, holder, ttl)?;
            if held.is_some() {
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            Ok(held)
        }
        fn write(
            &self,
            key: &CredentialKey,
            token: &Secret,
            lifetime: Duration,
            holder: &str,
            claim: &str,
        ) -> Result<(), String> {
            self.0.write(key, token, lifetime, holder, claim)
        }
        fn release(&self, key: &CredentialKey, claim: &str) -> Result<(), String> {
            self.0.release(key, claim)
        }
        fn forget(&self, key: &CredentialKey, token: &Secret) -> Result<(), String> {
            self.0.forget(key, token)
        }
    }

    /// Two nodes, each with its own cache on its own thread and runtime and its own opening of one
    /// registry (`open`), need one token at once: one of them fetches it, the other uses it; then
    /// one is refused it, and the other finds the newer token stored.
    pub(crate) fn two_nodes_make_one_fetch(open: impl Fn() -> Arc<dyn Registry>) {
        let waited = Arc::new(AtomicU64::new(0));
        let fetches = Arc::new(AtomicU64::new(0));
        let cred = CredentialKey::of(&[b"wechat_official_account", b"wx1", b"secret"]);
        let nodes: Vec<Arc<Tokens>> = ["node-a", "node-b"]
            .iter()
            .map(|name| {
                let store = Counting(RegistryTokens(open()), waited.clone());
                Arc::new(Tokens::shared(Arc::new(store), *name, |line| {
                    panic!("nothing to say: {line}")
                }))
            })
            .collect();
        let got: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|tokens| {
                    let (waited, fetches) = (waited.clone(), fetches.clone());
                    s.spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        runtime.block_on(async {
                            tokens
                                .get(cred, || async move {
                                    let n = fetches.fetch_add(1, Ordering::SeqCst);
                                    // Answers once the other node has found the fetch claimed.
                                    let deadline = Instant::now() + Duration::from_secs(30);
                                    while waited.load(Ordering::SeqCst) == 0 {
                                        assert!(Instant::now() < deadline, "no node waited");
                                        tokio::time::sleep(Duration::from_millis(10)).await;
                                    }
                                    Ok::<_, String>((
                                        Secret::new(format!("token-{n}")),
                                        Duration::from_secs(7200),
                                    ))
                                })
                                .await
                                .unwrap()
                                .value
                                .expose()
                                .to_string()
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, ["token-0", "token-0"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(nodes[0].fetches() + nodes[1].fetches(), 1);
        // Node a is refused the token: it fetches a new one; node b, refused too, uses that one.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let next = || async {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>((Secret::new(format!("token-{n}")), Duration::from_secs(7200)))
            };
            let a_had = nodes[0].get(cred, next).await.unwrap();
            let b_had = nodes[1].get(cred, next).await.unwrap();
            nodes[0].invalidate(cred, &a_had).await;
            let a_new = nodes[0].get(cred, next).await.unwrap();
            nodes[1].invalidate(cred, &b_had).await;
            let b_new = nodes[1].get(cred, next).await.unwrap();
            assert_eq!(a_new.value.expose(), "token-1");
            assert_eq!(b_new.value.expose(), "token-1");
        });
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }
}
