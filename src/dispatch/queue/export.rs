//! Reading a whole queue file out, for `touchctl state migrate`, and the mark that a moved queue
//! file carries afterwards.
//!
//! [`Queue::export`] opens a connection of its own and holds the file's write lock
//! (`BEGIN IMMEDIATE`) from the first row read until [`Export::finish`] marks the file: nothing
//! (a `deliveries replay`, a daemon starting) can change the queue between the reading and the
//! mark, so what was read is exactly what the file held when it stopped being worked. Readers are
//! not blocked (WAL). Dropping an unfinished export rolls back: nothing is written.
//!
//! Each batch's users come out in their stored form, as the sender would read them: from the
//! batch's segment span when it has one, else from `payloads` (rewritten users), else none (a
//! finished batch). A batch whose users cannot be read is an error naming it: moving it without
//! them would lose its recipients.
//!
//! The mark is two `meta` rows, `migrated_to` (where the queue went, a URL without its password)
//! and `migrated_at`; [`Queue::open`] refuses a marked file ([`QueueError::Migrated`]), and
//! [`unmark`] removes the mark.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::{QueueError, SqliteQueue};
use crate::dispatch::segments::Span;
use crate::store;

/// One dispatch as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchRow {
    /// The dispatch id.
    pub id: String,
    /// The touchpoint.
    pub touchpoint: String,
    /// The campaign.
    pub campaign: String,
    /// Its idempotency key, if it had one.
    pub idempotency_key: Option<String>,
    /// The template params (JSON).
    pub template_params: String,
    /// The touchpoint generation it was accepted under.
    pub generation: i64,
    /// The answer it was given (JSON).
    pub receipt: String,
    /// When it was accepted (ms since the epoch).
    pub created_at: i64,
    /// Its channel message (JSON), if any.
    pub message: Option<String>,
}

/// One batch as stored, with its users in their stored form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    /// The batch id.
    pub id: String,
    /// Its dispatch.
    pub dispatch_id: String,
    /// Its index in the dispatch.
    pub idx: i32,
    /// Batches in the dispatch.
    pub count: i32,
    /// The touchpoint.
    pub touchpoint: String,
    /// Users when queued.
    pub size: i32,
    /// Still to deliver.
    pub remaining: i32,
    /// Delivered.
    pub delivered: i32,
    /// Failed for good.
    pub failed: i32,
    /// `pending`, `delivered`, `failed` or `dead`.
    pub state: String,
    /// Attempts since the last replay.
    pub attempts: i32,
    /// Attempts before the last replay.
    pub attempt_base: i32,
    /// When the next attempt is due (ms since the epoch).
    pub next_at: i64,
    /// Why it is held, if it is.
    pub held: Option<String>,
    /// The last error.
    pub last_error: Option<String>,
    /// Created (ms since the epoch).
    pub created_at: i64,
    /// Last changed (ms since the epoch).
    pub updated_at: i64,
    /// The users still to deliver, in the stored form; none once finished.
    pub users: Option<Vec<u8>>,
}

/// One attempt as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRow {
    /// The batch.
    pub batch_id: String,
    /// Its number (on from the attempts before a replay).
    pub attempt: i32,
    /// The touchpoint generation used.
    pub generation: i64,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// How long it took.
    pub latency_ms: i64,
    /// The HTTP status, if a response came.
    pub status: Option<i32>,
    /// What came of it.
    pub outcome: String,
    /// Recipients in the request.
    pub recipients: i32,
    /// What went wrong.
    pub error: Option<String>,
}

/// One recipient that failed for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureRow {
    /// The batch.
    pub batch_id: String,
    /// The user.
    pub user_id: String,
    /// Why.
    pub reason: String,
    /// In which attempt.
    pub attempt: i32,
}

/// One replay of a dead batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayRow {
    /// The batch.
    pub batch_id: String,
    /// When (ms since the epoch).
    pub at: i64,
    /// Attempts made before it.
    pub after_attempt: i32,
    /// Recipients put back.
    pub recipients: i32,
}

/// A row of the queue, as [`Export::rows`] hands them out: every dispatch first, then every
/// batch, attempt, failure and replay (each table in the order it was written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// A dispatch.
    Dispatch(DispatchRow),
    /// A batch.
    Batch(BatchRow),
    /// An attempt.
    Attempt(AttemptRow),
    /// A failed recipient.
    Failure(FailureRow),
    /// A replay.
    Replay(ReplayRow),
}

/// What a queue holds, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Dispatches.
    pub dispatches: u64,
    /// Batches in all.
    pub batches: u64,
    /// Pending batches (held ones too).
    pub pending: u64,
    /// Of the pending, held.
    pub held: u64,
    /// Delivered batches.
    pub delivered: u64,
    /// Batches finished with every recipient failed.
    pub failed: u64,
    /// Dead-lettered batches.
    pub dead: u64,
    /// Recipients of pending batches.
    pub recipients_pending: u64,
    /// Recipients of dead batches.
    pub recipients_dead: u64,
    /// Attempts recorded.
    pub attempts: u64,
    /// Recipients that failed for good.
    pub failures: u64,
    /// Replays recorded.
    pub replays: u64,
}

/// Where a moved queue went (the `meta` rows of the mark).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The database, as a URL without its password.
    pub to: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A queue file being read out under its write lock (see the module docs).
pub struct Export<'q> {
    queue: &'q SqliteQueue,
    conn: Connection,
    open: bool,
}

const COUNTS: &str = "SELECT (SELECT count(*) FROM dispatches), count(*), \
     count(CASE WHEN state = 'pending' THEN 1 END), count(CASE WHEN state = 'pending' THEN held END), \
     count(CASE WHEN state = 'delivered' THEN 1 END), count(CASE WHEN state = 'failed' THEN 1 END), \
     count(CASE WHEN state = 'dead' THEN 1 END), \
     coalesce(sum(CASE WHEN state = 'pending' THEN remaining END), 0), \
     coalesce(sum(CASE WHEN state = 'dead' THEN remaining END), 0), \
     (SELECT count(*) FROM attempts), (SELECT count(*) FROM failures), (SELECT count(*) FROM replays) \
     FROM batches";

/// The span columns `segment`, `seg_offset`, `seg_length` (from column `first` on), when set.
fn span_at(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Option<Span>> {
    let segment: Option<i64> = r.get(first)?;
    let offset: Option<i64> = r.get(first + 1)?;
    let len: Option<i64> = r.get(first + 2)?;
    Ok(match (segment, offset, len) {
        (Some(segment), Some(offset), Some(len)) if offset >= 0 && len >= 0 => Some(Span {
            segment,
            offset: offset as u64,
            len: len as u64,
        }),
        _ => None,
    })
}

/// The mark on the file `conn` is open on, if any.
fn read_mark(conn: &Connection) -> rusqlite::Result<Option<Mark>> {
    let get = |key: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    };
    Ok(get("migrated_to")?.map(|to| Mark {
        to,
        at: get("migrated_at").ok().flatten().unwrap_or_default(),
    }))
}

/// Refuses a queue file that was moved into PostgreSQL (see [`QueueError::Migrated`]).
pub(super) fn refuse_migrated(conn: &Connection, path: &str) -> Result<(), QueueError> {
    match read_mark(conn) {
        Ok(Some(mark)) => Err(QueueError::Migrated {
            path: path.to_string(),
            to: mark.to,
            at: mark.at,
        }),
        Ok(None) => Ok(()),
        Err(source) => Err(QueueError::Sqlite {
            path: path.to_string(),
            source,
        }),
    }
}

/// Removes the mark of a moved queue file, so that it can be worked again; returns the mark
/// removed (`None`: the file was not marked).
pub fn unmark(path: &Path) -> Result<Option<Mark>, QueueError> {
    let shown = path.display().to_string();
    let sql = |source| QueueError::Sqlite {
        path: shown.clone(),
        source,
    };
    let conn = store::connect(path, store::Sync::Full).map_err(|e| QueueError::Store {
        path: shown.clone(),
        source: Box::new(e),
    })?;
    let mark = read_mark(&conn).map_err(sql)?;
    if mark.is_some() {
        conn.execute(
            "DELETE FROM meta WHERE key IN ('migrated_to', 'migrated_at')",
            [],
        )
        .map_err(sql)?;
    }
    Ok(mark)
}

impl SqliteQueue {
    /// Starts reading the whole queue out, holding the file's write lock until the export is
    /// finished or dropped (see the module docs).
    pub fn export(&self) -> Result<Export<'_>, QueueError> {
        let conn = store::connect(&self.path, store::Sync::Full).map_err(|e| match e {
            store::StoreError::Sqlite(source) => self.err(source),
            other => QueueError::Store {
                path: self.path.display().to_string(),
                source: Box::new(other),
            },
        })?;
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))?;
        Ok(Export {
            queue: self,
            conn,
            open: true,
        })
    }
}

impl Export<'_> {
    fn err(&self, e: rusqlite::Error) -> QueueError {
        self.queue.err(e)
    }

    /// What the queue holds, counted.
    pub fn counts(&self) -> Result<Counts, QueueError> {
        self.conn
            .query_row(COUNTS, [], |r| {
                let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(Counts {
                    dispatches: n(0)?,
                    batches: n(1)?,
                    pending: n(2)?,
                    held: n(3)?,
                    delivered: n(4)?,
                    failed: n(5)?,
                    dead: n(6)?,
                    recipients_pending: n(7)?,
                    recipients_dead: n(8)?,
                    attempts: n(9)?,
                    failures: n(10)?,
                    replays: n(11)?,
                })
            })
            .map_err(|e| self.err(e))
    }

    /// Hands every row to `take`, table by table (see [`Row`]); stops early, returning
    /// `Ok(false)`, when `take` returns false.
    pub fn rows(&self, mut take: impl FnMut(Row) -> bool) -> Result<bool, QueueError> {
        let conn = &self.conn;
        let mut stmt = conn
            .prepare(
                "SELECT id, touchpoint, campaign, idempotency_key, template_params, generation, receipt, \
                 created_at, message FROM dispatches ORDER BY rowid",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let row = (|| {
                Ok(DispatchRow {
                    id: r.get(0)?,
                    touchpoint: r.get(1)?,
                    campaign: r.get(2)?,
                    idempotency_key: r.get(3)?,
                    template_params: r.get(4)?,
                    generation: r.get(5)?,
                    receipt: r.get(6)?,
                    created_at: r.get(7)?,
                    message: r.get(8)?,
                })
            })()
            .map_err(|e| self.err(e))?;
            if !take(Row::Dispatch(row)) {
                return Ok(false);
            }
        }
        drop(rows);
        drop(stmt);
        if !self.batches(&mut take)? {
            return Ok(false);
        }
        let mut stmt = conn
            .prepare(
                "SELECT batch_id, attempt, generation, started_at, latency_ms, status, outcome, recipients, \
                 error FROM attempts ORDER BY rowid",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let row = (|| {
                Ok(AttemptRow {
                    batch_id: r.get(0)?,
                    attempt: r.get(1)?,
                    generation: r.get(2)?,
                    started_at: r.get(3)?,
                    latency_ms: r.get(4)?,
                    status: r.get(5)?,
                    outcome: r.get(6)?,
                    recipients: r.get(7)?,
                    error: r.get(8)?,
                })
            })()
            .map_err(|e| self.err(e))?;
            if !take(Row::Attempt(row)) {
                return Ok(false);
            }
        }
        drop(rows);
        drop(stmt);
        let mut stmt = conn
            .prepare("SELECT batch_id, user_id, reason, attempt FROM failures ORDER BY rowid")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let row = (|| {
                Ok(FailureRow {
                    batch_id: r.get(0)?,
                    user_id: r.get(1)?,
                    reason: r.get(2)?,
                    attempt: r.get(3)?,
                })
            })()
            .map_err(|e| self.err(e))?;
            if !take(Row::Failure(row)) {
                return Ok(false);
            }
        }
        drop(rows);
        drop(stmt);
        let mut stmt = conn
            .prepare("SELECT batch_id, at, after_attempt, recipients FROM replays ORDER BY rowid")
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let row = (|| {
                Ok(ReplayRow {
                    batch_id: r.get(0)?,
                    at: r.get(1)?,
                    after_attempt: r.get(2)?,
                    recipients: r.get(3)?,
                })
            })()
            .map_err(|e| self.err(e))?;
            if !take(Row::Replay(row)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn batches(&self, take: &mut impl FnMut(Row) -> bool) -> Result<bool, QueueError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT b.id, b.dispatch_id, b.idx, b.count, b.touchpoint, b.size, b.remaining, b.delivered, \
                 b.failed, b.state, b.attempts, b.attempt_base, b.next_at, b.held, b.last_error, \
                 b.created_at, b.updated_at, p.users, b.segment, b.seg_offset, b.seg_length \
                 FROM batches b LEFT JOIN payloads p ON p.batch_id = b.id ORDER BY b.rowid",
            )
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([]).map_err(|e| self.err(e))?;
        while let Some(r) = rows.next().map_err(|e| self.err(e))? {
            let (mut row, span) = (|| {
                let span = span_at(r, 18)?;
                Ok((
                    BatchRow {
                        id: r.get(0)?,
                        dispatch_id: r.get(1)?,
                        idx: r.get(2)?,
                        count: r.get(3)?,
                        touchpoint: r.get(4)?,
                        size: r.get(5)?,
                        remaining: r.get(6)?,
                        delivered: r.get(7)?,
                        failed: r.get(8)?,
                        state: r.get(9)?,
                        attempts: r.get(10)?,
                        attempt_base: r.get(11)?,
                        next_at: r.get(12)?,
                        held: r.get(13)?,
                        last_error: r.get(14)?,
                        created_at: r.get(15)?,
                        updated_at: r.get(16)?,
                        users: r.get(17)?,
                    },
                    span,
                ))
            })()
            .map_err(|e: rusqlite::Error| self.err(e))?;
            // As the sender reads them: the segment span when the batch points into one.
            if let Some(span) = span {
                row.users = Some(self.read_users(&row.id, span)?);
            }
            if let Some(users) = &row.users {
                crate::dispatch::stored::parse_stored(users).map_err(|why| {
                    QueueError::Unreadable {
                        path: self.queue.path.display().to_string(),
                        batch: row.id.clone(),
                        why,
                    }
                })?;
            } else if matches!(row.state.as_str(), "pending" | "dead") && row.remaining > 0 {
                return Err(QueueError::Unreadable {
                    path: self.queue.path.display().to_string(),
                    batch: row.id.clone(),
                    why: "its users are not stored".into(),
                });
            }
            if !take(Row::Batch(row)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn read_users(&self, batch: &str, span: Span) -> Result<Vec<u8>, QueueError> {
        self.queue
            .segments
            .read(span)
            .map_err(|why| QueueError::Unreadable {
                path: self.queue.path.display().to_string(),
                batch: batch.to_string(),
                why,
            })
    }

    /// Marks the file as moved to `mark.to` and commits, releasing the write lock: from now on
    /// [`Queue::open`] refuses it.
    pub fn finish(mut self, mark: &Mark) -> Result<(), QueueError> {
        let written = self
            .conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated_to', ?1), ('migrated_at', ?2)",
                [&mark.to, &mark.at],
            )
            .and_then(|_| self.conn.execute_batch("COMMIT"));
        match written {
            Ok(()) => {
                self.open = false;
                Ok(())
            }
            Err(e) => Err(self.err(e)),
        }
    }
}

impl Drop for Export<'_> {
    fn drop(&mut self) {
        if self.open {
            // Nothing was written in the transaction unless finish() failed midway: undo that.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}
