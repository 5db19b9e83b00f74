//! The embedded registry: one SQLite file (default `.touchctl/state.db`, mode 0600) in WAL mode.
//! Writes are `BEGIN IMMEDIATE` transactions, so the generation check and the write are atomic
//! even with several processes on one file.
//!
//! Only a write creates the file. Opened where no file is, the registry is a new, empty one held
//! in memory (with its id and fingerprint key already chosen, so a plan made against it stays
//! valid), and its first write (a lock, a put) creates the file whole, with those keys (see
//! [`crate::store::create_database`]). A command that only reads, or that fails before writing,
//! leaves no file behind. An empty (0-byte) file is refused, never taken for a new registry.
//!
//! The registry lock is a lease (see [`crate::lease`]): the holder's [`super::LockGuard`] renews
//! it while it works; a lock left by a process that no longer runs on this host is taken over at
//! once, and one whose lease expired (its host gone, say) by anyone.
//!
//! `shared_tokens` keeps the daemon's platform access tokens (see [`crate::channel::token`]), so a
//! restarted daemon uses the token it had; a claim to fetch one is a row keyed `fetching:<key>`
//! whose `token` is the claim's random id. A file from before it gains the table when opened by a
//! user who may write it.
//!
//! `touchctl state migrate` reads a registry out whole ([`SqliteRegistry::export`]) and then marks
//! the file as moved (`meta` rows `migrated_to`, `migrated_at`): the lock, so apply and the
//! daemon's reconcile, is refused on a marked file, which would diverge from the moved copy.
//! Reading it (plan) still works; `touchctl state unmark` removes the mark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    FETCHING, Live, LockInfo, Provenance, Put, Registry, RegistryError, SharedToken, hostname, now,
    whoami,
};
use crate::model::{Fingerprinter, Secret, SpecJson};
use crate::store::{Found, StoreError};

/// The on-disk format this build writes and understands.
const FORMAT: i64 = 1;

const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS touchpoints (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    spec          TEXT NOT NULL, -- as the last apply wrote it
    live_spec     TEXT,          -- NULL unless changed outside apply since (drift)
    fingerprints  TEXT NOT NULL,
    generation    INTEGER NOT NULL,
    paused        INTEGER NOT NULL DEFAULT 0,
    applied_at    TEXT NOT NULL,
    applied_by    TEXT NOT NULL,
    source_commit TEXT,
    source_dirty  INTEGER NOT NULL DEFAULT 0,
    source_file   TEXT
);
CREATE TABLE IF NOT EXISTS lock (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    lock_id     TEXT NOT NULL,
    holder      TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    host        TEXT NOT NULL,
    operation   TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    expires_at  INTEGER -- ms since the epoch; NULL from a touchctl before leases
);
CREATE TABLE IF NOT EXISTS platform_tickets (
    platform    TEXT PRIMARY KEY, -- the wechat_open_platform's id
    ticket      TEXT NOT NULL,    -- the latest component_verify_ticket (a secret)
    received_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shared_tokens (
    key         TEXT PRIMARY KEY, -- which platform credential (a keyed MAC, never the secret)
    token       TEXT NOT NULL,    -- a secret: never printed (a claim's random id for `fetching:` keys)
    expires_at  INTEGER NOT NULL, -- ms since the epoch
    obtained_by TEXT NOT NULL,
    obtained_at INTEGER NOT NULL
);
";

/// A touchpoint row as stored, its JSON as text (for moving it elsewhere unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TouchpointRow {
    /// The touchpoint id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// The spec as the last apply wrote it.
    pub spec: String,
    /// The spec in force, when it drifted.
    pub live_spec: Option<String>,
    /// The fingerprints (JSON).
    pub fingerprints: String,
    /// Its generation.
    pub generation: i64,
    /// Paused through the admin API.
    pub paused: bool,
    /// When applied (RFC 3339).
    pub applied_at: String,
    /// By whom.
    pub applied_by: String,
    /// The commit it came from.
    pub source_commit: Option<String>,
    /// Whether that tree was dirty.
    pub source_dirty: bool,
    /// The file it came from.
    pub source_file: Option<String>,
}

/// A verify ticket as stored (a secret: never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct TicketRow {
    /// The open platform's id.
    pub platform: String,
    /// The ticket.
    pub ticket: String,
    /// When it came (RFC 3339).
    pub received_at: String,
}

impl std::fmt::Debug for TicketRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketRow")
            .field("platform", &self.platform)
            .field("ticket", &"(sensitive)")
            .field("received_at", &self.received_at)
            .finish()
    }
}

/// A whole registry as stored, from [`SqliteRegistry::export`].
#[derive(Clone, Debug)]
pub struct Exported {
    /// The registry id.
    pub registry_id: String,
    /// The fingerprint key as stored (hex): a secret, never printed.
    pub fingerprint_key: String,
    /// Every touchpoint, by id.
    pub touchpoints: Vec<TouchpointRow>,
    /// Every open platform's latest verify ticket.
    pub tickets: Vec<TicketRow>,
}

/// Where a moved registry went, from its mark (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovedTo {
    /// The database, as a URL without its password.
    pub to: String,
    /// When (RFC 3339).
    pub at: String,
}

/// The mark on a registry file, if any.
fn moved_to(conn: &Connection) -> rusqlite::Result<Option<MovedTo>> {
    let get = |key: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    };
    Ok(get("migrated_to")?.map(|to| MovedTo {
        to,
        at: get("migrated_at").ok().flatten().unwrap_or_default(),
    }))
}

/// The SQLite-backed registry.
pub struct SqliteRegistry {
    path: PathBuf,
    /// Shared with the lock's heartbeat, which renews through it.
    conn: Arc<Mutex<Connection>>,
    /// No file yet: the connection is to an empty registry in memory (see the module docs).
    new: AtomicBool,
    registry_id: String,
    /// The fingerprint key as stored (hex), to write into the file when it is created.
    key_text: String,
    fingerprinter: Fingerprinter,
    /// See [`SqliteRegistry::frugal`].
    frugal: AtomicBool,
    /// How long a lock lasts unless renewed.
    lease: Duration,
}

/// Writes a new registry's tables and keys.
fn init(conn: &Connection, registry_id: &str, key: &str) -> rusqlite::Result<()> {
    conn.execute_batch(MIGRATION)?;
    let mut insert = conn.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
    insert.execute(params!["format", FORMAT.to_string()])?;
    insert.execute(params!["registry_id", registry_id])?;
    insert.execute(params!["fingerprint_key", key])?;
    Ok(())
}

/// Adds what files written by earlier versions lack: the lock's lease expiry.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(MIGRATION)?;
    let has: i64 = conn.query_row(
        "SELECT count(*) FROM pragma_table_info('lock') WHERE name = 'expires_at'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        conn.execute_batch("ALTER TABLE lock ADD COLUMN expires_at INTEGER")?;
    }
    Ok(())
}

impl SqliteRegistry {
    /// Opens the state file; where there is none, a new registry that the first write creates
    /// (owner-only, in an owner-only folder). An empty file is refused.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let shown = path.display().to_string();
        let found = crate::store::found(path).map_err(|source| RegistryError::Io {
            path: shown.clone(),
            source,
        })?;
        match found {
            Found::Empty => Err(RegistryError::Empty(shown)),
            Found::Missing => Self::new_in_memory(path),
            Found::File => Self::open_file(path),
        }
    }

    /// Opens the state file, creating it now if there is none (for a daemon, which other
    /// processes must see write to the file).
    pub fn create(path: &Path) -> Result<Self, RegistryError> {
        let registry = Self::open(path)?;
        registry.persist()?;
        Ok(registry)
    }

    fn new_in_memory(path: &Path) -> Result<Self, RegistryError> {
        let sql = |source| RegistryError::Sqlite {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open_in_memory().map_err(sql)?;
        let (id, key) = (crate::store::random_hex(16), crate::store::random_hex(32));
        init(&conn, &id, &key).map_err(sql)?;
        Ok(Self::assemble(path, conn, true, id, key))
    }

    fn open_file(path: &Path) -> Result<Self, RegistryError> {
        let shown = path.display().to_string();
        let sql = |source| RegistryError::Sqlite {
            path: shown.clone(),
            source,
        };
        let conn = Self::connect(path, false)?;
        // A file this build cannot write (read-only to this user) can still be read: its
        // migration waits for a writer.
        if let Err(e) = migrate(&conn)
            && e.sqlite_error_code() != Some(rusqlite::ErrorCode::ReadOnly)
        {
            return Err(sql(e));
        }
        let get = |k: &str| -> Result<Option<String>, RegistryError> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                .optional()
                .map_err(sql)
        };
        let format: i64 = get("format")?
            .and_then(|f| f.parse().ok())
            .unwrap_or(FORMAT);
        if format > FORMAT {
            return Err(RegistryError::TooNew {
                path: shown,
                found: format,
                supported: FORMAT,
            });
        }
        let (Some(id), Some(key)) = (get("registry_id")?, get("fingerprint_key")?) else {
            return Err(RegistryError::NotARegistry(shown));
        };
        Ok(Self::assemble(path, conn, false, id, key))
    }

    fn assemble(path: &Path, conn: Connection, new: bool, id: String, key: String) -> Self {
        let bytes = hex::decode(&key).unwrap_or_else(|_| key.clone().into_bytes());
        Self {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            new: AtomicBool::new(new),
            registry_id: id,
            key_text: key,
            fingerprinter: Fingerprinter::new(bytes),
            frugal: AtomicBool::new(false),
            lease: crate::lease::TTL,
        }
    }

    /// A connection to the file, set up for plans or (`frugal`) for a long-running process.
    fn connect(path: &Path, frugal: bool) -> Result<Connection, RegistryError> {
        let conn = crate::store::connect(path, crate::store::Sync::Full)
            .map_err(|e| store_error(path, e))?;
        Self::tune(&conn, frugal).map_err(|source| RegistryError::Sqlite {
            path: path.display().to_string(),
            source,
        })?;
        Ok(conn)
    }

    fn tune(conn: &Connection, frugal: bool) -> rusqlite::Result<()> {
        if frugal {
            conn.pragma_update(None, "mmap_size", 0)?;
            conn.pragma_update(None, "cache_size", -512)
        } else {
            // Reading every row for a plan is faster from a memory map than through read() calls.
            conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)
        }
    }

    /// Whether there is no file yet (see the module docs).
    pub fn is_new(&self) -> bool {
        self.new.load(Ordering::Acquire)
    }

    /// Creates the file, if there is none yet, with this registry's id and key. Fails if another
    /// process created one since this registry was opened: what was planned against the new,
    /// empty registry may not hold for that one.
    pub fn persist(&self) -> Result<(), RegistryError> {
        if !self.is_new() {
            return Ok(());
        }
        let mut conn = self.conn();
        if !self.is_new() {
            return Ok(());
        }
        crate::store::create_database(&self.path, |c| init(c, &self.registry_id, &self.key_text))
            .map_err(|e| match e {
            StoreError::Exists => RegistryError::CreatedMeanwhile(self.describe()),
            other => store_error(&self.path, other),
        })?;
        *conn = Self::connect(&self.path, self.frugal.load(Ordering::Relaxed))?;
        self.new.store(false, Ordering::Release);
        Ok(())
    }

    /// Sets how long a lock taken through this registry lasts unless renewed (default
    /// [`crate::lease::TTL`]).
    pub fn with_lease(mut self, ttl: Duration) -> Self {
        self.lease = ttl;
        self
    }

    /// Sets the registry up for a long-running process, whose resident memory should not grow
    /// with the file: reads through a small page cache instead of a memory map, and decodes on the
    /// calling thread (memory freed by idle worker threads is slow to go back to the system).
    pub fn frugal(&self) -> Result<(), RegistryError> {
        self.frugal.store(true, Ordering::Relaxed);
        Self::tune(&self.conn(), true).map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> RegistryError {
        RegistryError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        lock_conn(&self.conn)
    }

    /// Every row, as stored, with the registry's id and key (for `touchctl state migrate`).
    pub fn export(&self) -> Result<Exported, RegistryError> {
        let conn = self.conn();
        let touchpoints = conn
            .prepare(&format!("{SELECT} ORDER BY id"))
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok(TouchpointRow {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        spec: r.get(2)?,
                        live_spec: r.get(3)?,
                        fingerprints: r.get(4)?,
                        generation: r.get(5)?,
                        paused: r.get(6)?,
                        applied_at: r.get(7)?,
                        applied_by: r.get(8)?,
                        source_commit: r.get(9)?,
                        source_dirty: r.get(10)?,
                        source_file: r.get(11)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| self.err(e))?;
        let tickets = conn
            .prepare("SELECT platform, ticket, received_at FROM platform_tickets ORDER BY platform")
            .and_then(|mut stmt| {
                stmt.query_map([], |r| {
                    Ok(TicketRow {
                        platform: r.get(0)?,
                        ticket: r.get(1)?,
                        received_at: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| self.err(e))?;
        Ok(Exported {
            registry_id: self.registry_id.clone(),
            fingerprint_key: self.key_text.clone(),
            touchpoints,
            tickets,
        })
    }

    /// Where the registry was moved, if `touchctl state migrate` marked it.
    pub fn moved_to(&self) -> Result<Option<MovedTo>, RegistryError> {
        if self.is_new() {
            return Ok(None);
        }
        moved_to(&self.conn()).map_err(|e| self.err(e))
    }

    /// Marks the registry as moved (see the module docs).
    pub fn mark_moved(&self, mark: &MovedTo) -> Result<(), RegistryError> {
        self.persist()?;
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated_to', ?1), ('migrated_at', ?2)",
                [&mark.to, &mark.at],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Removes the mark; returns it (`None`: the registry was not marked).
    pub fn unmark_moved(&self) -> Result<Option<MovedTo>, RegistryError> {
        let mark = self.moved_to()?;
        if mark.is_some() {
            self.conn()
                .execute(
                    "DELETE FROM meta WHERE key IN ('migrated_to', 'migrated_at')",
                    [],
                )
                .map_err(|e| self.err(e))?;
        }
        Ok(mark)
    }

    fn generation(tx: &Connection, id: &str) -> Result<Option<u64>, rusqlite::Error> {
        tx.query_row(
            "SELECT generation FROM touchpoints WHERE id = ?1",
            [id],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|g| g.map(|g| g as u64))
    }
}

/// Who holds the registry lock, if anyone.
fn held_lock(conn: &Connection) -> rusqlite::Result<Option<LockInfo>> {
    conn.query_row(
        "SELECT lock_id, holder, pid, host, operation, acquired_at, expires_at FROM lock WHERE singleton = 1",
        [],
        |r| {
            Ok(LockInfo {
                lock_id: r.get(0)?,
                holder: r.get(1)?,
                pid: r.get(2)?,
                host: r.get(3)?,
                operation: r.get(4)?,
                acquired_at: r.get(5)?,
                expires_at: r.get(6)?,
            })
        },
    )
    .optional()
}

/// Pushes lock `lock_id`'s lease to `expires_at`; whether it is still held by that id.
fn renew(conn: &Connection, lock_id: &str, expires_at: i64) -> rusqlite::Result<bool> {
    conn.execute(
        "UPDATE lock SET expires_at = ?2 WHERE singleton = 1 AND lock_id = ?1",
        params![lock_id, expires_at],
    )
    .map(|n| n == 1)
}

fn lock_conn(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the connection leaves SQLite itself consistent (transactions roll
    // back on drop), so a poisoned mutex is safe to keep using.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

fn store_error(path: &Path, e: StoreError) -> RegistryError {
    let path = path.display().to_string();
    match e {
        StoreError::Sqlite(source) => RegistryError::Sqlite { path, source },
        StoreError::Io(source) => RegistryError::Io { path, source },
        other => RegistryError::Store {
            path,
            source: Box::new(other),
        },
    }
}

/// A touchpoint row as read, before its JSON is decoded (shared with the PostgreSQL backend).
pub(super) type Row = (
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    bool,
    String,
    String,
    Option<String>,
    bool,
    Option<String>,
);

// No ORDER BY: sorting the decoded rows is cheaper than walking the id index.
const SELECT: &str = "SELECT id, kind, spec, live_spec, fingerprints, generation, paused, applied_at, \
     applied_by, source_commit, source_dirty, source_file FROM touchpoints";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
    ))
}

/// A row as a [`Live`] touchpoint.
pub(super) fn decode(row: Row) -> Result<Live, RegistryError> {
    let (id, kind, applied, live, fps, generation, paused, at, by, commit, dirty, file) = row;
    let corrupt = |source| RegistryError::Corrupt {
        id: id.clone(),
        source,
    };
    let applied_spec = SpecJson::from_text(applied).map_err(corrupt)?;
    let drifted_spec = live
        .map(|text| SpecJson::from_text(text).map_err(corrupt))
        .transpose()?;
    let fingerprints: BTreeMap<String, String> = serde_json::from_str(&fps).map_err(corrupt)?;
    Ok(Live {
        id,
        kind,
        applied_spec,
        drifted_spec,
        fingerprints,
        generation: generation as u64,
        paused,
        applied_at: at,
        applied_by: by,
        source: Provenance {
            commit,
            dirty,
            file,
        },
    })
}

impl Registry for SqliteRegistry {
    fn is_new(&self) -> bool {
        SqliteRegistry::is_new(self)
    }

    fn persist(&self) -> Result<(), RegistryError> {
        SqliteRegistry::persist(self)
    }

    /// Changes whenever another connection commits to the file.
    fn data_version(&self) -> Result<i64, RegistryError> {
        self.conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }

    fn registry_id(&self) -> &str {
        &self.registry_id
    }

    fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    fn list(&self) -> Result<Vec<Live>, RegistryError> {
        let rows: Vec<Row> = {
            let conn = self.conn();
            let mut stmt = conn.prepare_cached(SELECT).map_err(|e| self.err(e))?;
            stmt.query_map([], read_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| self.err(e))?
        };
        // Parsing the stored JSON is the costly part; it runs outside the connection lock, on all
        // cores unless this registry serves a long-running process.
        let mut live = if self.frugal.load(std::sync::atomic::Ordering::Relaxed) {
            rows.into_iter()
                .map(decode)
                .collect::<Result<Vec<_>, _>>()?
        } else {
            rows.into_par_iter()
                .map(decode)
                .collect::<Result<Vec<_>, _>>()?
        };
        live.par_sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    fn get(&self, id: &str) -> Result<Option<Live>, RegistryError> {
        let row = {
            let conn = self.conn();
            conn.query_row(&format!("{SELECT} WHERE id = ?1"), [id], read_row)
                .optional()
                .map_err(|e| self.err(e))?
        };
        row.map(decode).transpose()
    }

    fn lock(&self, operation: &str) -> Result<(LockInfo, Option<LockInfo>), RegistryError> {
        self.persist()?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        if let Some(moved) = moved_to(&tx).map_err(|e| self.err(e))? {
            return Err(RegistryError::Moved {
                path: self.path.display().to_string(),
                to: moved.to,
                at: moved.at,
            });
        }
        let held = held_lock(&tx).map_err(|e| self.err(e))?;
        let now_ms = crate::store::now_ms();
        let recovered = match held {
            Some(h) if h.standing(now_ms).free() => Some(h),
            Some(h) => return Err(RegistryError::Locked(Box::new(h))),
            None => None,
        };
        let info = LockInfo {
            lock_id: crate::store::random_hex(8),
            holder: whoami(),
            pid: std::process::id(),
            host: hostname(),
            operation: operation.to_string(),
            acquired_at: now(),
            expires_at: Some(crate::lease::expiry(now_ms, self.lease)),
        };
        tx.execute(
            "INSERT OR REPLACE INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at, expires_at) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                info.lock_id,
                info.holder,
                info.pid,
                info.host,
                info.operation,
                info.acquired_at,
                info.expires_at
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok((info, recovered))
    }

    fn lease_ttl(&self) -> Duration {
        self.lease
    }

    fn renewer(&self, lock_id: &str) -> crate::lease::Renew {
        let (conn, lock_id) = (self.conn.clone(), lock_id.to_string());
        Box::new(move |expires_at| {
            renew(&lock_conn(&conn), &lock_id, expires_at).map_err(|e| e.to_string())
        })
    }

    fn unlock(&self, lock_id: &str) -> Result<(), RegistryError> {
        if self.is_new() {
            return Ok(());
        }
        self.conn()
            .execute("DELETE FROM lock WHERE lock_id = ?1", [lock_id])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn force_unlock(&self, lock_id: &str, force: bool) -> Result<LockInfo, RegistryError> {
        let not_locked = |held: Option<LockInfo>| RegistryError::NotLocked {
            given: lock_id.to_string(),
            held: held.map(Box::new),
        };
        if self.is_new() {
            return Err(not_locked(None));
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let held = held_lock(&tx).map_err(|e| self.err(e))?;
        match held {
            Some(h) if h.lock_id == lock_id => {
                let renewed =
                    crate::lease::renewed(&h.host, h.pid, h.expires_at, crate::store::now_ms());
                if renewed && !force {
                    return Err(RegistryError::LockLive(Box::new(h)));
                }
                tx.execute("DELETE FROM lock WHERE lock_id = ?1", [lock_id])
                    .map_err(|e| self.err(e))?;
                tx.commit().map_err(|e| self.err(e))?;
                Ok(h)
            }
            held => Err(not_locked(held)),
        }
    }

    fn put(&self, put: &Put, expected: Option<u64>) -> Result<u64, RegistryError> {
        // Only a write that can succeed creates the file.
        if self.is_new() && expected.is_some() {
            return Err(conflict(&put.id, expected, None));
        }
        self.persist()?;
        let spec = put.spec.as_str();
        let fingerprints =
            serde_json::to_string(&put.fingerprints).unwrap_or_else(|_| "{}".to_string());
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let found = Self::generation(&tx, &put.id).map_err(|e| self.err(e))?;
        if found != expected {
            return Err(conflict(&put.id, expected, found));
        }
        let generation = found.map_or(1, |g| g + 1);
        tx.execute(
            "INSERT INTO touchpoints (id, kind, spec, live_spec, fingerprints, generation, applied_at, \
                 applied_by, source_commit, source_dirty, source_file) \
             VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
             ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, spec = excluded.spec, \
                 live_spec = NULL, fingerprints = excluded.fingerprints, \
                 generation = excluded.generation, applied_at = excluded.applied_at, \
                 applied_by = excluded.applied_by, source_commit = excluded.source_commit, \
                 source_dirty = excluded.source_dirty, source_file = excluded.source_file",
            params![
                put.id,
                put.kind,
                spec,
                fingerprints,
                generation as i64,
                now(),
                put.applied_by,
                put.source.commit,
                put.source.dirty,
                put.source.file,
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(generation)
    }

    fn delete(&self, id: &str, expected: u64) -> Result<(), RegistryError> {
        if self.is_new() {
            return Err(conflict(id, Some(expected), None));
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let found = Self::generation(&tx, id).map_err(|e| self.err(e))?;
        if found != Some(expected) {
            return Err(conflict(id, Some(expected), found));
        }
        tx.execute("DELETE FROM touchpoints WHERE id = ?1", [id])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    fn set_paused(&self, id: &str, paused: bool) -> Result<u64, RegistryError> {
        if self.is_new() {
            return Err(RegistryError::NotFound(id.to_string()));
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let found = Self::generation(&tx, id)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        tx.execute(
            "UPDATE touchpoints SET paused = ?2, generation = ?3 WHERE id = ?1",
            params![id, paused, (found + 1) as i64],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(found + 1)
    }

    fn platform_ticket(&self, id: &str) -> Result<Option<String>, RegistryError> {
        let found = self
            .conn()
            .query_row(
                "SELECT ticket FROM platform_tickets WHERE platform = ?1",
                [id],
                |r| r.get(0),
            )
            .optional();
        match found {
            Ok(ticket) => Ok(ticket),
            // A file from before tickets, read-only to this user (so not migrated): none kept.
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => {
                Ok(None)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn set_platform_ticket(&self, id: &str, ticket: &str) -> Result<(), RegistryError> {
        self.persist()?;
        self.conn()
            .execute(
                "INSERT INTO platform_tickets (platform, ticket, received_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (platform) DO UPDATE SET ticket = excluded.ticket, \
                     received_at = excluded.received_at",
                params![id, ticket, now()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn shared_token(&self, key: &str) -> Result<Option<SharedToken>, RegistryError> {
        let found = self
            .conn()
            .query_row(
                "SELECT token, expires_at, obtained_by, obtained_at FROM shared_tokens WHERE key = ?1",
                [key],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                },
            )
            .optional();
        match found {
            Ok(row) => Ok(row.map(|(token, expires_at, obtained_by, obtained_at)| {
                let now = crate::store::now_ms();
                SharedToken {
                    token: Secret::new(token),
                    left: span(expires_at - now),
                    age: span(now - obtained_at),
                    obtained_by,
                }
            })),
            // A file from before shared tokens, read-only to this user (so not migrated).
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => {
                Ok(None)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    fn claim_token_fetch(
        &self,
        key: &str,
        claim: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, RegistryError> {
        self.persist()?;
        let claim_key = format!("{FETCHING}{key}");
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let now = crate::store::now_ms();
        let held: Option<(String, i64, String)> = tx
            .query_row(
                "SELECT obtained_by, expires_at, token FROM shared_tokens WHERE key = ?1",
                [&claim_key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        // Another's live claim holds; one's own is extended.
        if let Some((by, until, id)) = held
            && until > now
            && id != claim
        {
            return Ok(Some(by));
        }
        tx.execute(
            "INSERT OR REPLACE INTO shared_tokens (key, token, expires_at, obtained_by, obtained_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![claim_key, claim, now.saturating_add(ms(ttl)), holder, now],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(None)
    }

    fn put_shared_token(
        &self,
        key: &str,
        token: &Secret,
        lifetime: Duration,
        holder: &str,
        claim: &str,
    ) -> Result<(), RegistryError> {
        self.persist()?;
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let now = crate::store::now_ms();
        tx.execute(
            "INSERT OR REPLACE INTO shared_tokens (key, token, expires_at, obtained_by, obtained_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, token.expose(), now.saturating_add(ms(lifetime)), holder, now],
        )
        .map_err(|e| self.err(e))?;
        tx.execute(
            "DELETE FROM shared_tokens WHERE key = ?1 AND token = ?2",
            params![format!("{FETCHING}{key}"), claim],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(())
    }

    fn release_token_claim(&self, key: &str, claim: &str) -> Result<(), RegistryError> {
        if self.is_new() {
            return Ok(());
        }
        self.conn()
            .execute(
                "DELETE FROM shared_tokens WHERE key = ?1 AND token = ?2",
                params![format!("{FETCHING}{key}"), claim],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn drop_shared_token(&self, key: &str, token: &Secret) -> Result<bool, RegistryError> {
        if self.is_new() {
            return Ok(false);
        }
        self.conn()
            .execute(
                "DELETE FROM shared_tokens WHERE key = ?1 AND token = ?2",
                params![key, token.expose()],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }
}

/// Milliseconds, as a duration (none when negative).
fn span(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration in milliseconds, saturating.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn conflict(id: &str, expected: Option<u64>, found: Option<u64>) -> RegistryError {
    let show = |g: Option<u64>| g.map_or_else(|| "none".to_string(), |g| g.to_string());
    RegistryError::Conflict {
        id: id.to_string(),
        expected: show(expected),
        found: show(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(id: &str, spec: serde_json::Value) -> Put {
        Put {
            id: id.into(),
            kind: "custom".into(),
            spec: SpecJson::from_value(&spec),
            fingerprints: BTreeMap::from([("auth_token".into(), "hmac-sha256:00".into())]),
            applied_by: "tester@host".into(),
            source: Provenance::default(),
        }
    }

    #[test]
    fn the_latest_ticket_is_kept_per_platform_and_an_older_file_gains_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let reg = SqliteRegistry::open(&path).unwrap();
        assert_eq!(reg.platform_ticket("open").unwrap(), None);
        reg.set_platform_ticket("open", "ticket@@@1").unwrap();
        assert!(!reg.is_new(), "a ticket is a write: the file exists");
        reg.set_platform_ticket("open", "ticket@@@2").unwrap();
        reg.set_platform_ticket("other", "ticket@@@x").unwrap();
        assert_eq!(
            reg.platform_ticket("open").unwrap().as_deref(),
            Some("ticket@@@2")
        );
        // Another process sees it.
        let again = SqliteRegistry::open(&path).unwrap();
        assert_eq!(
            again.platform_ticket("other").unwrap().as_deref(),
            Some("ticket@@@x")
        );
        // A file from before tickets gains the table when opened.
        again
            .conn()
            .execute_batch("DROP TABLE platform_tickets")
            .unwrap();
        drop((reg, again));
        let older = SqliteRegistry::open(&path).unwrap();
        assert_eq!(older.platform_ticket("open").unwrap(), None);
        older.set_platform_ticket("open", "ticket@@@3").unwrap();
        assert_eq!(
            older.platform_ticket("open").unwrap().as_deref(),
            Some("ticket@@@3")
        );
        // Tickets are not touchpoints.
        assert!(older.list().unwrap().is_empty());
    }

    #[test]
    fn put_is_compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(reg.put(&put("a", json!({"v": 1})), None).unwrap(), 1);
        assert!(matches!(
            reg.put(&put("a", json!({"v": 2})), None),
            Err(RegistryError::Conflict { .. })
        ));
        assert_eq!(reg.put(&put("a", json!({"v": 2})), Some(1)).unwrap(), 2);
        assert!(reg.delete("a", 1).is_err());
        assert_eq!(
            reg.get("a").unwrap().unwrap().spec().value(),
            json!({"v": 2})
        );
        reg.delete("a", 2).unwrap();
        assert!(reg.get("a").unwrap().is_none());
    }

    #[test]
    fn pause_bumps_generation_and_is_kept_by_put() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&dir.path().join("state.db")).unwrap();
        reg.put(&put("a", json!({"v": 1})), None).unwrap();
        assert_eq!(reg.set_paused("a", true).unwrap(), 2);
        reg.put(&put("a", json!({"v": 2})), Some(2)).unwrap();
        let live = reg.get("a").unwrap().unwrap();
        assert!(live.paused);
        assert_eq!(live.generation, 3);
    }

    #[test]
    fn second_lock_names_the_holder_and_dead_holders_are_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let a = SqliteRegistry::create(&path).unwrap();
        let b = SqliteRegistry::open(&path).unwrap();
        let (held, _) = a.lock("apply").unwrap();
        match b.lock("apply") {
            Err(RegistryError::Locked(info)) => assert_eq!(info.lock_id, held.lock_id),
            other => panic!("expected Locked, got {other:?}"),
        }
        a.unlock(&held.lock_id).unwrap();
        // A holder on this host whose process is gone: pretend with a pid that cannot exist.
        insert_lock(&b, "dead", 2147483646, &hostname(), None);
        let (_, recovered) = b.lock("apply").unwrap();
        assert_eq!(recovered.unwrap().lock_id, "dead");
    }

    fn insert_lock(reg: &SqliteRegistry, id: &str, pid: u32, host: &str, expires_at: Option<i64>) {
        reg.conn()
            .execute(
                "INSERT OR REPLACE INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at, expires_at) \
                 VALUES (1, ?1, 'ops@there', ?2, ?3, 'apply', '2026-01-01T00:00:00Z', ?4)",
                params![id, pid, host, expires_at],
            )
            .unwrap();
    }

    #[test]
    fn a_lock_left_on_a_replaced_host_is_taken_over_once_its_lease_expires() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::create(&dir.path().join("state.db")).unwrap();
        let now = crate::store::now_ms();
        // Another host: its process cannot be looked at, only its lease. (This test's own pid, so
        // that a host name that happened to match could not make it look gone.)
        let me = std::process::id();
        insert_lock(&reg, "fresh", me, "replaced-vm", Some(now + 60_000));
        match reg.lock("apply") {
            Err(e @ RegistryError::Locked(_)) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("(pid ") && shown.contains("its lease expires at "),
                    "{shown}"
                );
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        // From a touchctl before leases: no expiry, so only force-unlock frees it.
        insert_lock(&reg, "old", me, "replaced-vm", None);
        assert!(matches!(reg.lock("apply"), Err(RegistryError::Locked(_))));
        insert_lock(&reg, "expired", me, "replaced-vm", Some(now - 1));
        let (held, recovered) = reg.lock("apply").unwrap();
        let recovered = recovered.unwrap();
        assert_eq!(recovered.lock_id, "expired");
        assert!(matches!(
            recovered.standing(now),
            crate::lease::Standing::Expired(_)
        ));
        assert!(held.expires_at.unwrap() > now);
    }

    #[test]
    fn a_held_lock_is_renewed_and_a_lost_one_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let reg = SqliteRegistry::create(&path)
            .unwrap()
            .with_lease(Duration::from_millis(300));
        let other = SqliteRegistry::open(&path).unwrap();
        let guard = super::super::LockGuard::acquire(&reg, "apply").unwrap();
        let first = guard.info.expires_at.unwrap();
        // Well past the first term: the heartbeat must have renewed it for it still to be held.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let expiry = || {
            held_lock(&other.conn())
                .unwrap()
                .unwrap()
                .expires_at
                .unwrap()
        };
        while crate::store::now_ms() < first + 600 || expiry() <= first {
            assert!(std::time::Instant::now() < deadline, "never renewed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(other.lock("apply"), Err(RegistryError::Locked(_))));
        assert_eq!(guard.held(), Ok(()));
        // Forced away: the holder learns it at its next renewal, and stops writing.
        other.force_unlock(&guard.info.lock_id, true).unwrap();
        while guard.held().is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the loss was never noticed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(guard.held().unwrap_err().contains("no longer held"));
        drop(guard);
        other.lock("apply").unwrap();
    }

    #[test]
    fn force_unlock_refuses_a_fresh_lease_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::create(&dir.path().join("state.db")).unwrap();
        let now = crate::store::now_ms();
        insert_lock(
            &reg,
            "fresh",
            std::process::id(),
            "replaced-vm",
            Some(now + 60_000),
        );
        match reg.force_unlock("fresh", false) {
            Err(e @ RegistryError::LockLive(_)) => {
                assert!(
                    e.to_string()
                        .contains("touchctl force-unlock fresh --force"),
                    "{e}"
                );
            }
            other => panic!("expected LockLive, got {other:?}"),
        }
        assert_eq!(reg.force_unlock("fresh", true).unwrap().lock_id, "fresh");
        // Expired, or from a touchctl before leases: no --force needed.
        insert_lock(&reg, "expired", 1, "replaced-vm", Some(now - 1));
        reg.force_unlock("expired", false).unwrap();
        insert_lock(&reg, "old", 1, "replaced-vm", None);
        reg.force_unlock("old", false).unwrap();
        assert!(matches!(
            reg.force_unlock("old", false),
            Err(RegistryError::NotLocked { held: None, .. })
        ));
    }

    #[test]
    fn a_registry_file_is_created_by_its_first_write_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".touchctl/state.db");
        let reg = SqliteRegistry::open(&path).unwrap();
        assert!(reg.is_new() && reg.list().unwrap().is_empty());
        assert!(reg.get("a").unwrap().is_none());
        assert!(reg.set_paused("a", true).is_err());
        assert!(reg.delete("a", 1).is_err());
        assert!(reg.put(&put("a", json!({"v": 1})), Some(1)).is_err());
        assert!(
            !dir.path().join(".touchctl").exists(),
            "reads and failed writes create nothing"
        );
        let fingerprint = reg
            .fingerprinter()
            .fingerprint(&crate::model::Secret::new("s"));
        assert_eq!(reg.put(&put("a", json!({"v": 1})), None).unwrap(), 1);
        assert!(!reg.is_new() && path.exists());
        // The file keeps the id and key the registry had before it existed, so a plan made then
        // still applies.
        let again = SqliteRegistry::open(&path).unwrap();
        assert_eq!(again.registry_id(), reg.registry_id());
        assert_eq!(
            again
                .fingerprinter()
                .fingerprint(&crate::model::Secret::new("s")),
            fingerprint
        );
        assert_eq!(again.get("a").unwrap().unwrap().generation, 1);
        // Nothing but the file: no temporary file, -wal or -shm of it left beside.
        drop((again, reg));
        let left: Vec<String> = std::fs::read_dir(dir.path().join(".touchctl"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["state.db"]);
    }

    #[test]
    fn two_new_registries_cannot_both_create_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let a = SqliteRegistry::open(&path).unwrap();
        let b = SqliteRegistry::open(&path).unwrap();
        a.put(&put("a", json!({"v": 1})), None).unwrap();
        match b.lock("apply") {
            Err(e @ RegistryError::CreatedMeanwhile(_)) => {
                assert!(e.to_string().contains("run the command again"), "{e}");
            }
            other => panic!("expected CreatedMeanwhile, got {other:?}"),
        }
        assert_eq!(
            SqliteRegistry::open(&path).unwrap().registry_id(),
            a.registry_id()
        );
    }

    #[test]
    fn an_empty_state_file_is_refused_not_taken_as_a_new_registry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, b"").unwrap();
        match SqliteRegistry::open(&path) {
            Err(e @ RegistryError::Empty(_)) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("is empty (0 bytes)") && shown.contains("remove it"),
                    "{shown}"
                );
            }
            Err(other) => panic!("expected Empty, got {other:?}"),
            Ok(_) => panic!("an empty file was taken as a registry"),
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left as it was");
    }

    #[cfg(unix)]
    #[test]
    fn state_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        SqliteRegistry::create(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("sub")), 0o700);
    }

    #[test]
    fn shared_tokens_are_kept_claimed_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let reg = SqliteRegistry::open(&dir.path().join("state.db")).unwrap();
        crate::registry::conformance::shared_tokens(Arc::new(reg));
    }

    #[test]
    fn two_nodes_on_one_file_fetch_a_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        SqliteRegistry::create(&path).unwrap();
        crate::registry::conformance::two_nodes_make_one_fetch(|| {
            Arc::new(SqliteRegistry::open(&path).unwrap())
        });
    }

    #[test]
    fn a_file_from_before_shared_tokens_gains_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        SqliteRegistry::create(&path).unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE shared_tokens")
            .unwrap();
        let reg = SqliteRegistry::open(&path).unwrap();
        reg.put_shared_token("k", &Secret::new("t"), Duration::from_secs(60), "n", "c")
            .unwrap();
        assert_eq!(reg.shared_token("k").unwrap().unwrap().token.expose(), "t");
    }
}
