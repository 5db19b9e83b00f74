//! The embedded registry: one SQLite file (default `.touchctl/state.db`, mode 0600) in WAL mode.
//! Writes are `BEGIN IMMEDIATE` transactions, so the generation check and the write are atomic
//! even with several processes on one file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Live, LockInfo, Provenance, Put, Registry, RegistryError, hostname, now, whoami};
use crate::model::{Fingerprinter, SpecJson};

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
    acquired_at TEXT NOT NULL
);
";

/// The SQLite-backed registry.
pub struct SqliteRegistry {
    path: PathBuf,
    conn: Mutex<Connection>,
    registry_id: String,
    fingerprinter: Fingerprinter,
    /// See [`SqliteRegistry::frugal`].
    frugal: std::sync::atomic::AtomicBool,
}

impl SqliteRegistry {
    /// Opens the state file, creating it (and its folder) if needed, owner-only.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let shown = path.display().to_string();
        let io = |source| RegistryError::Io {
            path: shown.clone(),
            source,
        };
        crate::store::create_private(path).map_err(io)?;
        let sql = |source| RegistryError::Sqlite {
            path: shown.clone(),
            source,
        };
        let mut conn = crate::store::connect(path, crate::store::Sync::Full).map_err(sql)?;
        // Reading every row for a plan is faster from a memory map than through read() calls.
        conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)
            .map_err(sql)?;
        conn.execute_batch(MIGRATION).map_err(sql)?;

        let (registry_id, key) = {
            // IMMEDIATE: two processes opening a new file at once must not both create its keys.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql)?;
            let get = |k: &str| -> Result<Option<String>, rusqlite::Error> {
                tx.query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                    .optional()
            };
            let format: Option<String> = get("format").map_err(sql)?;
            let format: i64 = format.and_then(|f| f.parse().ok()).unwrap_or(FORMAT);
            if format > FORMAT {
                return Err(RegistryError::TooNew {
                    path: shown,
                    found: format,
                    supported: FORMAT,
                });
            }
            let ensure = |k: &str, make: &dyn Fn() -> String| -> Result<String, rusqlite::Error> {
                if let Some(v) = get(k)? {
                    return Ok(v);
                }
                let v = make();
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )?;
                Ok(v)
            };
            ensure("format", &|| FORMAT.to_string()).map_err(sql)?;
            let id = ensure("registry_id", &|| crate::store::random_hex(16)).map_err(sql)?;
            let key = ensure("fingerprint_key", &|| crate::store::random_hex(32)).map_err(sql)?;
            tx.commit().map_err(sql)?;
            (id, key)
        };
        let key = hex::decode(&key).unwrap_or_else(|_| key.into_bytes());
        Ok(Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            registry_id,
            fingerprinter: Fingerprinter::new(key),
            frugal: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sets the registry up for a long-running process, whose resident memory should not grow
    /// with the file: reads through a small page cache instead of a memory map, and decodes on the
    /// calling thread (memory freed by idle worker threads is slow to go back to the system).
    pub fn frugal(&self) -> Result<(), RegistryError> {
        self.frugal
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let conn = self.conn();
        conn.pragma_update(None, "mmap_size", 0)
            .and_then(|()| conn.pragma_update(None, "cache_size", -512))
            .map_err(|e| self.err(e))
    }

    /// Changes whenever another connection commits to the file: a cheap way to notice an apply
    /// made by another process.
    pub fn data_version(&self) -> Result<i64, RegistryError> {
        self.conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    fn err(&self, source: rusqlite::Error) -> RegistryError {
        RegistryError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the connection leaves SQLite itself consistent (transactions roll
        // back on drop), so a poisoned mutex is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
        "SELECT lock_id, holder, pid, host, operation, acquired_at FROM lock WHERE singleton = 1",
        [],
        |r| {
            Ok(LockInfo {
                lock_id: r.get(0)?,
                holder: r.get(1)?,
                pid: r.get(2)?,
                host: r.get(3)?,
                operation: r.get(4)?,
                acquired_at: r.get(5)?,
            })
        },
    )
    .optional()
}

type Row = (
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

fn decode(row: Row) -> Result<Live, RegistryError> {
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
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let held = held_lock(&tx).map_err(|e| self.err(e))?;
        let host = hostname();
        let recovered = match held {
            Some(h) if h.host == host && !crate::store::process_alive(h.pid) => Some(h),
            Some(h) => return Err(RegistryError::Locked(Box::new(h))),
            None => None,
        };
        let info = LockInfo {
            lock_id: crate::store::random_hex(8),
            holder: whoami(),
            pid: std::process::id(),
            host,
            operation: operation.to_string(),
            acquired_at: now(),
        };
        tx.execute(
            "INSERT OR REPLACE INTO lock (singleton, lock_id, holder, pid, host, operation, acquired_at) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                info.lock_id,
                info.holder,
                info.pid,
                info.host,
                info.operation,
                info.acquired_at
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok((info, recovered))
    }

    fn unlock(&self, lock_id: &str) -> Result<(), RegistryError> {
        self.conn()
            .execute("DELETE FROM lock WHERE lock_id = ?1", [lock_id])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn force_unlock(&self, lock_id: &str) -> Result<LockInfo, RegistryError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let held = held_lock(&tx).map_err(|e| self.err(e))?;
        match held {
            Some(h) if h.lock_id == lock_id => {
                tx.execute("DELETE FROM lock WHERE lock_id = ?1", [lock_id])
                    .map_err(|e| self.err(e))?;
                tx.commit().map_err(|e| self.err(e))?;
                Ok(h)
            }
            held => Err(RegistryError::NotLocked {
                given: lock_id.to_string(),
                held: held.map(Box::new),
            }),
        }
    }

    fn put(&self, put: &Put, expected: Option<u64>) -> Result<u64, RegistryError> {
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
        let a = SqliteRegistry::open(&path).unwrap();
        let b = SqliteRegistry::open(&path).unwrap();
        let (held, _) = a.lock("apply").unwrap();
        match b.lock("apply") {
            Err(RegistryError::Locked(info)) => assert_eq!(info.lock_id, held.lock_id),
            other => panic!("expected Locked, got {other:?}"),
        }
        a.unlock(&held.lock_id).unwrap();
        // A holder on this host whose process is gone: pretend with a pid that cannot exist.
        b.conn()
            .execute(
                "INSERT INTO lock VALUES (1, 'dead', 'x@y', 2147483646, ?1, 'apply', 'then')",
                [hostname()],
            )
            .unwrap();
        let (_, recovered) = b.lock("apply").unwrap();
        assert_eq!(recovered.unwrap().lock_id, "dead");
    }

    #[cfg(unix)]
    #[test]
    fn state_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.db");
        SqliteRegistry::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
