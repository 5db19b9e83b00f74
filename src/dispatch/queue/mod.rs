//! The durable queue: one SQLite file (default `.touchctl/queue.db`, beside the registry) holding
//! every accepted dispatch, its batches (the users still to deliver), every attempt and every
//! recipient that failed for good.
//!
//! Two connections with two promises: triggers are stored through one that fsyncs every commit,
//! so a 202 means the users are on disk; the daemon's bookkeeping (claiming a batch, recording an
//! attempt) goes through one that survives the process being killed but skips the fsync. Losing
//! such a record to a power cut only means a batch is sent again, with the same `webhook-id`.
//!
//! A batch is `pending` (due at `next_at`, or `held` because its touchpoint is paused or gone),
//! `delivered` (every recipient delivered, or some delivered and the rest failed for good),
//! `failed` (finished, but every recipient failed for good: nothing was delivered), or `dead`
//! (dead-lettered; replayable). Which pending batches are being sent is kept in the sender's
//! memory only: after a crash every pending batch is simply due again.
//!
//! Every write goes through one writer thread, so writers never wait on each other's locks:
//! triggers arriving together share one commit and one fsync, and attempt records share commits
//! without an fsync of their own.
//!
//! A new batch's users (in the stored form of [`super::stored::store`]) are not in this file: they
//! are appended to a segment file beside it, which the batch's row points into (see
//! [`super::segments`] for why and for the rules that keep that crash-safe). Users that are
//! rewritten (what is left of a partly delivered batch, a dead batch's users) and batches stored
//! by older versions live in the `payloads` table instead.
//!
//! One daemon works a queue file at a time: it holds the `daemon` row as a lease that it renews
//! (see [`crate::lease`]), taken over by a successor once its process is gone from this host or
//! its lease expired. A replayed dead batch keeps its attempt log: its attempt budget starts
//! again, later attempts are numbered on from the earlier ones (`attempt_base`), and the replay
//! itself is recorded (`replays`).
//!
//! The files of this module, by job: `schema.rs` (the file's format, migration, late columns and
//! one-off repairs), `enqueue.rs` (storing triggers), `writer.rs` (the writer thread and what it
//! writes), `claim.rs` (claiming due batches, holds and deferrals, what an attempt reports),
//! `report.rs` (dispatch status, batch lists, history, replays and counts), `slot.rs` (the
//! daemon's hold on the queue) and `export.rs` (reading the whole file out for `touchctl state
//! migrate`, and the mark that makes [`Queue::open`] refuse a file moved into PostgreSQL). Their public types are re-exported here.

mod claim;
mod enqueue;
mod export;
mod postgres;
mod report;
mod schema;
mod slot;
mod writer;

pub use claim::{After, At, Claim, Claimed, Completion, Lanes, Users};
pub use enqueue::{Enqueued, NewDispatch, Receipt, Storing, WireWriter};
pub use export::{
    AttemptRow, BatchRow, Counts, DispatchRow, Export, FailureRow, Mark, ReplayRow, Row, unmark,
};
pub use postgres::PostgresQueue;
pub use report::{Attempt, BatchCounts, BatchInfo, DispatchStatus, Filter, Replay, Stats};
pub use slot::{DaemonSlot, Taken};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::fresh::Fresh;
use super::segments::{Segments, Span};
use crate::store::{self, Sync, now_ms};
use schema::{FORMAT, MIGRATION};
use writer::Work;

/// Why the queue failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The file could not be created.
    #[error("cannot create the queue file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("queue {path}: {source}")]
    Sqlite {
        /// The file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// The idempotency key was used before, for another touchpoint or campaign.
    #[error(
        "idempotency key `{key}` was already used for touchpoint `{touchpoint}`, campaign `{campaign}` (dispatch {dispatch_id}): use a new key for a new trigger"
    )]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// Its first trigger's touchpoint.
        touchpoint: String,
        /// Its first trigger's campaign.
        campaign: String,
        /// Its first dispatch.
        dispatch_id: String,
    },
    /// The file was written by a newer touchctl, whose stored batches this one may not read.
    #[error(
        "the queue file {path} has format {found}, newer than this touchctl understands ({supported}): upgrade touchctl, or give --queue another file"
    )]
    TooNew {
        /// The file.
        path: String,
        /// Its format, as recorded.
        found: String,
        /// This build's format.
        supported: i64,
    },
    /// A group of triggers could not be written (nothing of it was stored).
    #[error("cannot store the trigger: {0}")]
    Write(String),
    /// Another daemon works this queue.
    #[error(
        "another daemon ({0}; {note}) works this queue; one daemon per queue file, or deliveries would be sent twice. A daemon that stops renewing its hold is taken over once its lease expires; if that daemon is gone for good, `touchctl force-unlock --daemon` releases the queue now",
        note = .0.expiry_note()
    )]
    Busy(Box<DaemonSlot>),
    /// `force-unlock --daemon` (without `--force`) of a daemon that still renews its hold.
    #[error(
        "the daemon holding this queue ({0}; {note}) keeps renewing its hold, so it looks alive: stop it (SIGTERM) or wait for it. If you are sure it is gone (its host was replaced, say), run `touchctl force-unlock --daemon --force`",
        note = .0.expiry_note()
    )]
    SlotLive(Box<DaemonSlot>),
    /// PostgreSQL failed.
    #[error("queue in {database}: {why}")]
    Postgres {
        /// The database, without its password.
        database: String,
        /// Why.
        why: String,
    },
    /// This command or operation needs the SQLite queue file.
    #[error("{0}")]
    NotHere(String),
    /// The queue file is empty.
    #[error(
        "the queue file {0} is empty (0 bytes), so it holds no queue; touchctl never leaves one empty. If it is a leftover, remove it and run again (a new queue is created); if your queue should be there, restore the file from a backup"
    )]
    Empty(String),
    /// The queue file was moved into PostgreSQL by `touchctl state migrate`.
    #[error(
        "the queue file {path} was moved into PostgreSQL ({to}) by `touchctl state migrate` at {at}: its batches are worked from there now, and working this file as well would send them twice. Run touchctl with --state {to}. If the move was a mistake and nothing works the PostgreSQL copy, `touchctl state unmark --queue {path}` makes this file usable again"
    )]
    Migrated {
        /// The file.
        path: String,
        /// Where it went (a URL without its password).
        to: String,
        /// When (RFC 3339).
        at: String,
    },
    /// A batch's users cannot be read (for `touchctl state migrate`, which moves them).
    #[error(
        "queue {path}: the users of batch {batch} cannot be read ({why}); nothing was moved. Restore the queue's files (the queue file and its -payloads folder) from a backup and run again"
    )]
    Unreadable {
        /// The file.
        path: String,
        /// The batch.
        batch: String,
        /// Why.
        why: String,
    },
    /// The queue file could not be opened.
    #[error("queue {path}: {source}")]
    Store {
        /// The file.
        path: String,
        /// Why.
        source: Box<store::StoreError>,
    },
}

/// The durable queue: a SQLite file of one daemon's, or tables in PostgreSQL that every daemon of
/// the database shares (see [`postgres`]). The daemon and the commands work through this type;
/// what differs between the two is said on each method. (One of each is opened per process, and
/// kept behind an `Arc`: the size of the variants does not matter.)
#[allow(clippy::large_enum_variant)]
pub enum Queue {
    /// The embedded default: one file, one daemon.
    Sqlite(SqliteQueue),
    /// Shared by every daemon on the database.
    Postgres(PostgresQueue),
}

/// The SQLite queue file.
pub struct SqliteQueue {
    path: PathBuf,
    /// Stores triggers: every commit fsync'd.
    accept: Mutex<Connection>,
    /// Claims and records attempts: survives a killed process without an fsync per commit.
    work: Mutex<Connection>,
    /// Recipients pending, kept in memory for the queue-full check.
    pending: Arc<AtomicI64>,
    /// Hands triggers to the writer thread (which owns the fsync'ing connection).
    writer: Mutex<std::sync::mpsc::Sender<Work>>,
    /// The segment files new batches' users are in.
    segments: Arc<Segments>,
    /// Recipients of batches just queued, for the sender.
    fresh: Fresh,
}

impl SqliteQueue {
    /// Opens (creating owner-only if needed) the queue file.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let shown = path.display().to_string();
        let io = |source| QueueError::Io {
            path: shown.clone(),
            source,
        };
        let sql = |source| QueueError::Sqlite {
            path: shown.clone(),
            source,
        };
        let opened = |e: store::StoreError| match e {
            store::StoreError::Sqlite(source) => sql(source),
            store::StoreError::Io(source) => io(source),
            other => QueueError::Store {
                path: shown.clone(),
                source: Box::new(other),
            },
        };
        match store::found(path).map_err(io)? {
            store::Found::Empty => return Err(QueueError::Empty(shown)),
            store::Found::Missing => {
                let created = store::create_database(path, |c| {
                    c.execute_batch(MIGRATION)?;
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES ('format', ?1)",
                        [FORMAT.to_string()],
                    )
                    .map(|_| ())
                });
                match created {
                    // Another daemon created it at the same moment: open that one.
                    Ok(()) | Err(store::StoreError::Exists) => {}
                    Err(e) => return Err(opened(e)),
                }
            }
            store::Found::File => {}
        }
        let mut accept = store::connect(path, Sync::Full).map_err(opened)?;
        accept.execute_batch(MIGRATION).map_err(sql)?;
        export::refuse_migrated(&accept, &shown)?;
        schema::mark_format(&mut accept, &shown)?;
        schema::add_columns(&mut accept).map_err(sql)?;
        schema::repair_once(&mut accept).map_err(sql)?;
        let work = store::connect(path, Sync::Normal).map_err(opened)?;
        let write = store::connect(path, Sync::Full).map_err(opened)?;
        let pending = Arc::new(AtomicI64::new(0));
        let segments = Arc::new(Segments::new(path));
        let tx = writer::spawn(write, &shown, path, pending.clone(), segments.clone()).map_err(
            |source| QueueError::Io {
                path: shown.clone(),
                source,
            },
        )?;
        let queue = Self {
            path: path.to_path_buf(),
            accept: Mutex::new(accept),
            work: Mutex::new(work),
            pending,
            writer: Mutex::new(tx),
            segments,
            fresh: Fresh::default(),
        };
        queue.refresh_pending()?;
        Ok(queue)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> QueueError {
        QueueError::Sqlite {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Recipients pending (in memory; see [`Queue::refresh_pending`]).
    pub fn pending_recipients(&self) -> u64 {
        self.pending.load(Ordering::Relaxed).max(0) as u64
    }

    /// Recounts the pending recipients from the file (after another process replayed, say).
    pub fn refresh_pending(&self) -> Result<u64, QueueError> {
        let n: i64 = lock(&self.work)
            .query_row(
                "SELECT coalesce(sum(remaining), 0) FROM batches WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))?;
        self.pending.store(n, Ordering::Relaxed);
        Ok(n.max(0) as u64)
    }

    /// Reads users stored in a segment.
    pub fn read_span(&self, span: Span) -> Result<Vec<u8>, String> {
        self.segments.read(span)
    }

    /// Drops the recipients kept in memory longer than their age limit (see [`Fresh::expire`]).
    pub fn expire_fresh(&self) {
        self.fresh.expire();
    }

    /// The batches kept in memory for the sender, and their bytes.
    pub fn fresh_usage(&self) -> (usize, usize) {
        self.fresh.usage()
    }
}

impl Queue {
    /// Opens (creating owner-only if needed) the SQLite queue file.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        SqliteQueue::open(path).map(Queue::Sqlite)
    }

    /// The SQLite queue, if this is one (its daemon slot, its file).
    pub fn sqlite(&self) -> Option<&SqliteQueue> {
        match self {
            Queue::Sqlite(q) => Some(q),
            Queue::Postgres(_) => None,
        }
    }

    /// The PostgreSQL queue, if this is one.
    pub fn postgres(&self) -> Option<&PostgresQueue> {
        match self {
            Queue::Sqlite(_) => None,
            Queue::Postgres(q) => Some(q),
        }
    }

    /// Whether several daemons share this queue (claims then keep to [`Lanes`]).
    pub fn is_shared(&self) -> bool {
        matches!(self, Queue::Postgres(_))
    }

    /// The file, or the database without its password.
    pub fn describe(&self) -> String {
        match self {
            Queue::Sqlite(q) => q.path().display().to_string(),
            Queue::Postgres(q) => q.describe(),
        }
    }

    /// Recipients pending (kept in memory; see [`Queue::refresh_pending`]). With several daemons,
    /// those this one stored since the last refresh are added to the count read then.
    pub fn pending_recipients(&self) -> u64 {
        match self {
            Queue::Sqlite(q) => q.pending_recipients(),
            Queue::Postgres(q) => q.pending_recipients(),
        }
    }

    /// Recounts the pending recipients.
    pub fn refresh_pending(&self) -> Result<u64, QueueError> {
        match self {
            Queue::Sqlite(q) => q.refresh_pending(),
            Queue::Postgres(q) => q.refresh_pending(),
        }
    }

    /// Reads the stored users of a batch claimed from memory.
    pub fn read_users(&self, at: &At) -> Result<Vec<u8>, String> {
        match (self, at) {
            (Queue::Sqlite(q), At::Segment(span)) => q.read_span(*span),
            (Queue::Postgres(q), At::Row(id)) => q.read_users(id),
            _ => Err("the batch's users are kept by another kind of queue".into()),
        }
    }

    /// Drops the recipients kept in memory longer than their age limit.
    pub fn expire_fresh(&self) {
        match self {
            Queue::Sqlite(q) => q.expire_fresh(),
            Queue::Postgres(q) => q.expire_fresh(),
        }
    }

    /// The batches kept in memory for the sender, and their bytes.
    pub fn fresh_usage(&self) -> (usize, usize) {
        match self {
            Queue::Sqlite(q) => q.fresh_usage(),
            Queue::Postgres(q) => q.fresh_usage(),
        }
    }

    /// Up to `limit` due batches, oldest due first, leaving out the touchpoints in `skip` (at
    /// their limit here). The SQLite queue also leaves out the batches in `busy` (being sent: its
    /// daemon keeps them in memory) and only reads; the PostgreSQL queue leases what it returns to
    /// this daemon, takes no batch another daemon's lease holds, and keeps to `lanes`.
    pub fn claim(
        &self,
        now: i64,
        limit: usize,
        skip: &[&str],
        busy: &[&str],
        lanes: &Lanes,
    ) -> Result<Claim, QueueError> {
        match self {
            Queue::Sqlite(q) => Ok(Claim {
                batches: q.claim(now, limit, skip, busy)?,
                capped_until: None,
            }),
            Queue::Postgres(q) => q.claim(limit, skip, lanes),
        }
    }

    /// When the earliest pending, unheld batch not of a touchpoint in `skip` and not in `busy` is
    /// due. The PostgreSQL queue answers only for batches due later than `now` (those due already
    /// are asked for again by [`Claim::capped_until`]) and not leased.
    pub fn next_due(
        &self,
        now: i64,
        skip: &[&str],
        busy: &[&str],
    ) -> Result<Option<i64>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.next_due(skip, busy),
            Queue::Postgres(q) => q.next_due(now, skip),
        }
    }

    /// Records attempts (and, on PostgreSQL, ends this daemon's leases of their batches).
    pub fn record(&self, done: Vec<Completion>) -> Result<(), QueueError> {
        match self {
            Queue::Sqlite(q) => q.record(done),
            Queue::Postgres(q) => q.record(done),
        }
    }

    /// Lets go of batches claimed but not sent (their touchpoint was held meanwhile): a no-op
    /// for the SQLite queue, whose claims are in its daemon's memory; the end of this daemon's
    /// leases on PostgreSQL.
    pub fn release(&self, ids: &[String]) -> Result<(), QueueError> {
        match self {
            Queue::Sqlite(_) => Ok(()),
            Queue::Postgres(q) => q.release(ids),
        }
    }

    /// Holds (with a reason) or releases (`None`) the pending batches of a touchpoint.
    pub fn hold(&self, touchpoint: &str, reason: Option<&str>) -> Result<usize, QueueError> {
        match self {
            Queue::Sqlite(q) => q.hold(touchpoint, reason),
            Queue::Postgres(q) => q.hold(touchpoint, reason),
        }
    }

    /// Makes the pending batches of `touchpoint` due no sooner than `until`.
    pub fn defer(&self, touchpoint: &str, until: i64) -> Result<usize, QueueError> {
        match self {
            Queue::Sqlite(q) => q.defer(touchpoint, until),
            Queue::Postgres(q) => q.defer(touchpoint, until),
        }
    }

    /// The touchpoints that have pending batches, with how many are held.
    pub fn pending_touchpoints(&self) -> Result<Vec<(String, u64, u64)>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.pending_touchpoints(),
            Queue::Postgres(q) => q.pending_touchpoints(),
        }
    }

    /// The receipt of an earlier trigger with this idempotency key, if there was one.
    pub fn find_idempotent(
        &self,
        key: &str,
    ) -> Result<Option<(String, String, Receipt)>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.find_idempotent(key),
            Queue::Postgres(q) => q.find_idempotent(key),
        }
    }

    /// Stores a trigger's batches; returns once they are durable.
    pub fn enqueue(&self, d: NewDispatch<'_>) -> Result<Enqueued, QueueError> {
        self.begin_enqueue(d)?.wait()
    }

    /// Starts storing a trigger (see [`SqliteQueue::begin_enqueue`]); [`Storing::wait`] waits
    /// until it is durable: fsync'd to the SQLite file, or committed by PostgreSQL.
    pub fn begin_enqueue(&self, d: NewDispatch<'_>) -> Result<Storing<'_>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.begin_enqueue(d),
            Queue::Postgres(q) => q.begin_enqueue(d),
        }
    }

    /// A dispatch and its progress.
    pub fn dispatch(&self, id: &str) -> Result<Option<DispatchStatus>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.dispatch(id),
            Queue::Postgres(q) => q.dispatch(id),
        }
    }

    /// Batches matching `filter`, newest first.
    pub fn batches(&self, filter: &Filter) -> Result<Vec<BatchInfo>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.batches(filter),
            Queue::Postgres(q) => q.batches(filter),
        }
    }

    /// Every attempt of a batch, and its recipients that failed for good.
    pub fn history(
        &self,
        batch_id: &str,
    ) -> Result<(Vec<Attempt>, Vec<crate::dispatch::Rejected>), QueueError> {
        match self {
            Queue::Sqlite(q) => q.history(batch_id),
            Queue::Postgres(q) => q.history(batch_id),
        }
    }

    /// When each of a batch's replays happened, oldest first.
    pub fn replays(&self, batch_id: &str) -> Result<Vec<Replay>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.replays(batch_id),
            Queue::Postgres(q) => q.replays(batch_id),
        }
    }

    /// Puts dead batches back in the queue (see [`SqliteQueue::replay`]).
    pub fn replay(
        &self,
        ids: &[String],
        touchpoint: Option<&str>,
    ) -> Result<Vec<String>, QueueError> {
        match self {
            Queue::Sqlite(q) => q.replay(ids, touchpoint),
            Queue::Postgres(q) => q.replay(ids, touchpoint),
        }
    }

    /// Counts over the whole queue.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        match self {
            Queue::Sqlite(q) => q.stats(),
            Queue::Postgres(q) => q.stats(),
        }
    }

    /// Forgets up to `limit` dispatches whose batches were all delivered before `before`.
    pub fn prune(&self, before: i64, limit: usize) -> Result<usize, QueueError> {
        match self {
            Queue::Sqlite(q) => q.prune(before, limit),
            Queue::Postgres(q) => q.prune(before, limit),
        }
    }
}

/// The answer to work the writer thread can no longer take.
fn writer_gone() -> QueueError {
    QueueError::Write("the queue's writer thread stopped".into())
}

/// The id of a dispatch's batch `index`.
fn batch_id(dispatch_id: &str, index: usize) -> String {
    format!("{dispatch_id}_{index}")
}

/// A list of strings as a JSON array, for `json_each`.
fn json_list(values: &[&str]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

fn lock(m: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // SQLite rolls back a transaction dropped by a panic, so a poisoned connection is consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn new_id(prefix: &str) -> String {
    // Time first, so ids sort by creation; then randomness, so they never collide.
    format!("{prefix}_{:011x}{}", now_ms(), store::random_hex(6))
}

#[cfg(test)]
mod tests;
