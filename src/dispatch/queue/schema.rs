//! The queue file's format and its migration: the tables, the columns files written by earlier
//! versions lack, and what older versions recorded wrongly, put right once per file.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::QueueError;
use crate::store::now_ms;

/// The queue file's format, kept in `meta`. 1: batches stored as JSON or in the first
/// length-prefixed form (files from before the format was recorded count as 1). 2: batches may be
/// in the split form too. A touchctl refuses a file of a newer format rather than dead-letter
/// batches it cannot read. 3: new batches keep their users in segment files (see
/// [`crate::dispatch::segments`]). 4: a dispatch may carry a channel message (`dispatches.message`: the
/// template it names, app push title/body/payload).
pub(super) const FORMAT: i64 = 4;

pub(super) const MIGRATION: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dispatches (
    id              TEXT PRIMARY KEY,
    touchpoint      TEXT NOT NULL,
    campaign        TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    template_params TEXT NOT NULL,
    generation      INTEGER NOT NULL,
    receipt         TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    message         TEXT -- JSON of the trigger's channel message; NULL when it has none
);
CREATE TABLE IF NOT EXISTS batches (
    id          TEXT PRIMARY KEY,
    dispatch_id TEXT NOT NULL REFERENCES dispatches(id),
    idx         INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    touchpoint  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    remaining   INTEGER NOT NULL,
    delivered   INTEGER NOT NULL DEFAULT 0,
    failed      INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    held        TEXT,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    segment     INTEGER,
    seg_offset  INTEGER,
    seg_length  INTEGER,
    attempt_base INTEGER NOT NULL DEFAULT 0 -- attempts made before the last replay
);
CREATE TABLE IF NOT EXISTS payloads (
    batch_id TEXT PRIMARY KEY,
    users    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_due ON batches(next_at)
    WHERE state = 'pending' AND held IS NULL;
CREATE INDEX IF NOT EXISTS batches_dispatch ON batches(dispatch_id, idx);
CREATE INDEX IF NOT EXISTS batches_touchpoint ON batches(touchpoint, state);
CREATE INDEX IF NOT EXISTS dispatches_created ON dispatches(created_at);
CREATE TABLE IF NOT EXISTS attempts (
    batch_id   TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    status     INTEGER,
    outcome    TEXT NOT NULL,
    recipients INTEGER NOT NULL,
    error      TEXT,
    PRIMARY KEY (batch_id, attempt)
);
CREATE TABLE IF NOT EXISTS failures (
    batch_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    reason   TEXT NOT NULL,
    attempt  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_batch ON failures(batch_id);
CREATE TABLE IF NOT EXISTS replays (
    batch_id      TEXT NOT NULL,
    at            INTEGER NOT NULL,
    after_attempt INTEGER NOT NULL,
    recipients    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replays_batch ON replays(batch_id);
CREATE TABLE IF NOT EXISTS daemon (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    started_at TEXT NOT NULL,
    lease_id   TEXT,   -- NULL from a touchctl before leases
    expires_at INTEGER -- ms since the epoch
);
";

/// Refuses a file of a newer format; marks an older one with this format, since batches this
/// version stores may be in forms older versions cannot read.
pub(super) fn mark_format(conn: &mut Connection, path: &str) -> Result<(), QueueError> {
    let sql = |source| QueueError::Sqlite {
        path: path.to_string(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let found: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql)?;
    // A format that is not a number is none this version knows either.
    let known = match found.as_deref().map(str::parse::<i64>) {
        None => 1,
        Some(Ok(n)) if n <= FORMAT => n,
        _ => {
            return Err(QueueError::TooNew {
                path: path.to_string(),
                found: found.unwrap_or_default(),
                supported: FORMAT,
            });
        }
    };
    if known < FORMAT {
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('format', ?1)",
            [FORMAT.to_string()],
        )
        .map_err(sql)?;
    }
    tx.commit().map_err(sql)
}

/// Adds the columns files written by earlier versions lack: those that point into segment files
/// (before format 3), the attempts made before a replay, the daemon's lease, and a dispatch's
/// channel message (before format 4).
pub(super) fn add_columns(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        tx.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            [table, column],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
    };
    if !has("batches", "segment")? {
        tx.execute_batch(
            "ALTER TABLE batches ADD COLUMN segment INTEGER; \
             ALTER TABLE batches ADD COLUMN seg_offset INTEGER; \
             ALTER TABLE batches ADD COLUMN seg_length INTEGER;",
        )?;
    }
    if !has("batches", "attempt_base")? {
        tx.execute_batch(
            "ALTER TABLE batches ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    if !has("dispatches", "message")? {
        tx.execute_batch("ALTER TABLE dispatches ADD COLUMN message TEXT;")?;
    }
    if !has("daemon", "lease_id")? {
        tx.execute_batch(
            "ALTER TABLE daemon ADD COLUMN lease_id TEXT; \
             ALTER TABLE daemon ADD COLUMN expires_at INTEGER;",
        )?;
    }
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS batches_segment ON batches(segment) WHERE segment IS NOT NULL;",
    )?;
    tx.commit()
}

/// Puts right, once per file, what older versions recorded wrongly: a batch that finished with
/// every recipient failed was marked `delivered`; and an endpoint's `Retry-After` could park a
/// batch for centuries, where now no wait is longer than the longest `retry.max_backoff`.
pub(super) fn repair_once(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = 'repaired'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if done.is_none() {
        tx.execute(
            "UPDATE batches SET state = 'failed' WHERE state = 'delivered' AND delivered = 0 AND failed > 0",
            [],
        )?;
        let latest = crate::dispatch::retry::due_at(now_ms(), crate::model::MaxBackoff::MAX.get());
        tx.execute(
            "UPDATE batches SET next_at = ?1 WHERE state = 'pending' AND next_at > ?1",
            [latest],
        )?;
        tx.execute("INSERT INTO meta (key, value) VALUES ('repaired', '1')", [])?;
    }
    tx.commit()
}
