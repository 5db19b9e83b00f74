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
//! A new batch's users (in the stored form of [`super::user::store`]) are not in this file: they
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

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::fresh::{Fresh, Wire};
use super::segments::{Appender, Segments, Span};
use super::user::UserRef;
use super::{Rejected, TriggerHead};
use crate::store::{self, Sync, now_ms};

/// The queue file's format, kept in `meta`. 1: batches stored as JSON or in the first
/// length-prefixed form (files from before the format was recorded count as 1). 2: batches may be
/// in the split form too. A touchctl refuses a file of a newer format rather than dead-letter
/// batches it cannot read. 3: new batches keep their users in segment files (see
/// [`super::segments`]). 4: a dispatch may carry a channel message (`dispatches.message`: the
/// template it names, app push title/body/payload).
const FORMAT: i64 = 4;

const MIGRATION: &str = "
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
    /// The queue file is empty.
    #[error(
        "the queue file {0} is empty (0 bytes), so it holds no queue; touchctl never leaves one empty. If it is a leftover, remove it and run again (a new queue is created); if your queue should be there, restore the file from a backup"
    )]
    Empty(String),
    /// The queue file could not be opened.
    #[error("queue {path}: {source}")]
    Store {
        /// The file.
        path: String,
        /// Why.
        source: Box<store::StoreError>,
    },
}

/// The daemon working a queue file, as its slot records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonSlot {
    /// Its process id.
    pub pid: u32,
    /// Its host.
    pub host: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The random id of its hold; none from a touchctl before leases.
    pub lease_id: Option<String>,
    /// When its lease expires unless renewed (ms since the epoch).
    pub expires_at: Option<i64>,
}

impl DaemonSlot {
    /// Where this hold stands for a would-be successor at `now_ms`.
    pub fn standing(&self, now_ms: i64) -> crate::lease::Standing {
        crate::lease::standing(&self.host, self.pid, self.expires_at, now_ms)
    }

    /// When its lease expires, for a message (see [`crate::lease::expiry_note`]).
    pub fn expiry_note(&self) -> String {
        crate::lease::expiry_note(self.expires_at, now_ms())
    }
}

impl std::fmt::Display for DaemonSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on {}, since {}",
            self.pid, self.host, self.started_at
        )
    }
}

/// This process's hold on the queue, from [`Queue::take_daemon_slot`].
#[derive(Clone, Debug)]
pub struct Taken {
    /// The random id of the hold, to renew and leave it.
    pub lease_id: String,
    /// The daemon taken over, and why it could be, if there was one.
    pub replaced: Option<(DaemonSlot, crate::lease::Standing)>,
}

/// What a trigger was answered: returned with 202, and again for a repeated idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The dispatch's id.
    pub dispatch_id: String,
    /// How many users were queued.
    pub accepted: usize,
    /// The users not queued, each with its reason.
    pub rejected: Vec<Rejected>,
    /// How many batches the accepted users make.
    pub batches: usize,
}

/// A trigger ready to be stored.
pub struct NewDispatch<'a> {
    /// The trigger without its users.
    pub head: &'a TriggerHead,
    /// The touchpoint generation it was accepted under.
    pub generation: u64,
    /// Users per batch.
    pub batch_size: usize,
    /// The users to queue (already screened).
    pub users: Vec<&'a UserRef<'a>>,
    /// The users refused, with reasons.
    pub rejected: Vec<Rejected>,
    /// Writes a batch's recipients as they go on the wire under `generation`, to keep in memory
    /// for the sender (see [`super::fresh`]); called for each batch while the writer stores the
    /// trigger. `None` keeps nothing.
    pub wire: Option<&'a WireWriter<'a>>,
}

/// Writes a batch's recipients for the wire.
pub type WireWriter<'a> = dyn Fn(&[&UserRef<'_>]) -> Vec<u8> + 'a;

/// A trigger handed to the writer thread, not yet known to be on disk.
#[must_use = "the trigger is stored only once `wait` has answered"]
pub struct Storing<'q> {
    queue: &'q Queue,
    answer: std::sync::mpsc::Receiver<Result<Enqueued, QueueError>>,
    /// The id the trigger is stored under, if it is stored.
    dispatch_id: String,
    /// How many of its batches, from the first, have their recipients kept in memory.
    kept: usize,
}

impl Storing<'_> {
    /// Waits until the trigger is on disk (fsync'd). If it was not stored (an error, or its
    /// idempotency key was used before), the recipients kept for its batches are let go.
    pub fn wait(self) -> Result<Enqueued, QueueError> {
        let enqueued = Queue::answer(self.answer);
        if !matches!(enqueued, Ok(Enqueued::New(_))) {
            for i in 0..self.kept {
                self.queue.fresh.take(&batch_id(&self.dispatch_id, i));
            }
        }
        enqueued
    }
}

/// Stored, or found stored already under the same idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored now.
    New(Receipt),
    /// The idempotency key was seen before: the first receipt, nothing queued.
    Repeat(Receipt),
}

/// A batch claimed by the sender.
#[derive(Clone, Debug)]
pub struct Claimed {
    /// The batch id: the `webhook-id`, the same on every attempt.
    pub id: String,
    /// Its dispatch.
    pub dispatch_id: String,
    /// Its index in the dispatch.
    pub index: u32,
    /// How many batches the dispatch has.
    pub count: u32,
    /// The touchpoint.
    pub touchpoint: String,
    /// The users still to deliver.
    pub users: Users,
    /// How many that is.
    pub remaining: u32,
    /// Attempts made so far, since its last replay (the retry budget counts these).
    pub attempts: u32,
    /// The campaign.
    pub campaign: String,
    /// The template params, as JSON (an object).
    pub template_params: String,
    /// The trigger's channel message, as JSON, if it has one (see [`crate::channel::Message`]).
    pub message: Option<String>,
}

/// A claimed batch's users.
#[derive(Clone, Debug)]
pub enum Users {
    /// In their stored form (see [`super::user::store`]), or why they cannot be read.
    Stored(Result<Vec<u8>, String>),
    /// As written on the wire when the batch was queued by this process (see [`super::fresh`]),
    /// not read from disk. They are the batch's users as stored at the span (a batch whose users
    /// are rewritten stops pointing into its segment), read with [`Queue::read_span`] when needed.
    Fresh(Wire, Span),
}

impl Users {
    /// The stored form, reading it from the segment when the batch was claimed from memory.
    pub fn stored(self, queue: &Queue) -> Result<Vec<u8>, String> {
        match self {
            Users::Stored(users) => users,
            Users::Fresh(_, span) => queue.read_span(span),
        }
    }
}

/// Where a batch goes after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum After {
    /// Every recipient is delivered, or failed for good.
    Done,
    /// Some recipients are left: try again at this time (ms since the epoch).
    RetryAt(i64),
    /// Dead-lettered: the last attempt failed, or the failure is final.
    Dead,
    /// Cut off by the daemon stopping before the endpoint answered: the attempt counts and is
    /// logged, and the batch stays pending and due, so the next start sends it again (same
    /// `webhook-id`), even when this was its last attempt.
    Interrupted,
    /// The platform rejected the touchpoint's configuration: the attempt is logged but not
    /// counted against the retry budget, and the batch stays pending, held with this reason,
    /// until the touchpoint is released.
    Parked(String),
    /// The platform asked to wait (a rate limit, a daily quota): the attempt is logged but not
    /// counted, and the batch is due again at this time (ms since the epoch).
    Deferred(i64),
}

/// The result of one attempt, as the sender reports it.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The batch.
    pub batch_id: String,
    /// Which attempt (1 for the first).
    pub attempt: u32,
    /// The touchpoint generation the attempt was sent with.
    pub generation: u64,
    /// When it started (ms since the epoch).
    pub started_ms: i64,
    /// How long it took.
    pub latency_ms: i64,
    /// The HTTP status, if a response came.
    pub status: Option<u16>,
    /// Recipients in the request.
    pub recipients: u32,
    /// Recipients delivered by this attempt.
    pub delivered: u32,
    /// Recipients that failed for good in this attempt.
    pub failed: Vec<Rejected>,
    /// The users left to deliver when only some must be retried (JSON array and count); `None`
    /// keeps the batch's users as they are.
    pub remaining: Option<(Vec<u8>, u32)>,
    /// Where the batch goes.
    pub after: After,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// A dispatch and how far its batches got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchStatus {
    /// The dispatch id.
    pub dispatch_id: String,
    /// The touchpoint.
    pub touchpoint: String,
    /// The campaign.
    pub campaign: String,
    /// When it was accepted (ms since the epoch).
    pub created_at: i64,
    /// The answer it was given.
    pub receipt: Receipt,
    /// Recipients delivered.
    pub delivered: u64,
    /// Recipients that failed for good (the endpoint said so).
    pub failed: u64,
    /// Recipients still to deliver (waiting, in flight, or held).
    pub pending: u64,
    /// Recipients in dead-lettered batches.
    pub dead: u64,
    /// Batches per state.
    pub batches: BatchCounts,
    /// Whether every batch is delivered, failed or dead.
    pub finished: bool,
}

/// Batches per state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCounts {
    /// Waiting or in flight.
    pub pending: u64,
    /// Of the pending, held because the touchpoint is paused, disabled or gone.
    pub held: u64,
    /// Delivered (some recipients may have failed for good).
    pub delivered: u64,
    /// Finished with every recipient failed for good: nothing delivered.
    pub failed: u64,
    /// Dead-lettered.
    pub dead: u64,
}

/// One batch as `deliveries list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchInfo {
    /// The batch id.
    pub id: String,
    /// Its dispatch.
    pub dispatch_id: String,
    /// The touchpoint.
    pub touchpoint: String,
    /// Index and count in the dispatch.
    pub index: u32,
    /// Batches in the dispatch.
    pub count: u32,
    /// `pending`, `delivered`, `failed` (every recipient failed for good) or `dead`.
    pub state: String,
    /// Why a pending batch is held, if it is.
    pub held: Option<String>,
    /// Users in the batch when it was queued.
    pub size: u32,
    /// Still to deliver.
    pub remaining: u32,
    /// Delivered.
    pub delivered: u32,
    /// Failed for good.
    pub failed: u32,
    /// Attempts made in all (those before a replay too).
    pub attempts: u32,
    /// When the next attempt is due (ms since the epoch; pending only).
    pub next_at: Option<i64>,
    /// The last error.
    pub last_error: Option<String>,
    /// Last change (ms since the epoch).
    pub updated_at: i64,
}

/// A replay of a dead batch, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replay {
    /// When (ms since the epoch).
    pub at: i64,
    /// The attempts made before it (the next attempt is numbered one more).
    pub after_attempt: u32,
    /// Recipients put back in the queue.
    pub recipients: u32,
}

/// One attempt, as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first.
    pub attempt: u32,
    /// The touchpoint generation used.
    pub generation: u64,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// How long it took.
    pub latency_ms: i64,
    /// The HTTP status, if a response came.
    pub status: Option<u16>,
    /// `delivered`, `failed` (every recipient it carried failed for good), `partial`, `retry`,
    /// `interrupted` (cut off by the daemon stopping; sent again on the next start) or `dead`.
    pub outcome: String,
    /// Recipients in the request.
    pub recipients: u32,
    /// What went wrong.
    pub error: Option<String>,
}

/// Which batches to list.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this state (`pending`, `delivered`, `failed`, `dead`).
    pub state: Option<String>,
    /// Only this touchpoint.
    pub touchpoint: Option<String>,
    /// Only this dispatch.
    pub dispatch_id: Option<String>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// Counts over the whole queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Batches waiting or in flight.
    pub pending_batches: u64,
    /// Recipients in them.
    pub pending_recipients: u64,
    /// Pending batches held (touchpoint paused, disabled or gone).
    pub held_batches: u64,
    /// Dead-lettered batches.
    pub dead_batches: u64,
    /// Recipients in them.
    pub dead_recipients: u64,
}

/// The durable queue.
pub struct Queue {
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

/// A trigger on its way to the writer thread.
struct Job {
    /// Chosen before the job goes to the writer, so its batches' recipients can be kept in
    /// memory under their ids before the rows are committed (and so visible to the sender).
    dispatch_id: String,
    head: TriggerHead,
    generation: u64,
    /// Users per batch and the batch's stored text.
    batches: Vec<(usize, Vec<u8>)>,
    /// Where the writer put each batch's text.
    spans: Vec<Span>,
    accepted: usize,
    rejected: Vec<Rejected>,
}

type Reply = std::sync::mpsc::SyncSender<Result<Enqueued, QueueError>>;

/// What the writer thread writes.
enum Work {
    /// A trigger; its commit must be fsync'd before the reply.
    Enqueue(Box<Job>, Reply),
    /// Attempt outcomes; a killed process must not lose them, a power cut may.
    Record(
        Vec<Completion>,
        std::sync::mpsc::SyncSender<Result<(), QueueError>>,
    ),
    /// Forgetting delivered dispatches older than the first value, at most the second many.
    Prune(
        i64,
        usize,
        std::sync::mpsc::SyncSender<Result<usize, QueueError>>,
    ),
}

/// How often the writer looks for segment files no batch points into any more: soon after it
/// started a new one, and now and then while older ones are still pointed into.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const SWEEP_AGAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: String,
    pending: Arc<AtomicI64>,
    appender: Appender,
    segments: Arc<Segments>,
    /// When segments were last swept, the segment appended to then, and whether any were left.
    swept: Option<(std::time::Instant, Option<i64>, bool)>,
    synchronous: &'static str,
}

/// Writes in groups: everything waiting goes into one transaction. The commit is fsync'd when
/// the group holds a trigger (whose users were appended to a segment, and synced, first), and
/// not otherwise. About once a second it also sweeps the segment files no row points into.
fn writer(mut w: Writer, jobs: std::sync::mpsc::Receiver<Work>) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        let mut group = match jobs.recv_timeout(SWEEP_EVERY) {
            Ok(first) => vec![first],
            Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        while !group.is_empty() && group.len() < 256 {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        let group = w.append_users(group);
        let sweep = w.sweep_due();
        if group.is_empty() && !sweep {
            continue;
        }
        w.write(group, sweep);
    }
}

impl Writer {
    /// Appends the users of every trigger in the group to the current segment and syncs them;
    /// on a failure, answers those triggers with it and leaves them out of the group.
    fn append_users(&mut self, group: Vec<Work>) -> Vec<Work> {
        let payloads: Vec<&[u8]> = group
            .iter()
            .filter_map(|w| match w {
                Work::Enqueue(job, _) => Some(job.batches.iter().map(|(_, text)| text.as_slice())),
                _ => None,
            })
            .flatten()
            .collect();
        if payloads.is_empty() {
            return group;
        }
        match self.appender.append(&payloads) {
            Ok(spans) => {
                let mut spans = spans.into_iter();
                group
                    .into_iter()
                    .map(|mut w| {
                        if let Work::Enqueue(job, _) = &mut w {
                            job.spans = spans.by_ref().take(job.batches.len()).collect();
                        }
                        w
                    })
                    .collect()
            }
            Err(e) => {
                let message = format!(
                    "cannot write the users to {}: {e}",
                    self.segments.dir().display()
                );
                group
                    .into_iter()
                    .filter_map(|w| match w {
                        Work::Enqueue(_, reply) => {
                            let _ = reply.send(Err(QueueError::Write(message.clone())));
                            None
                        }
                        other => Some(other),
                    })
                    .collect()
            }
        }
    }

    /// Whether to sweep segments now: at the start, a second after a new segment was started,
    /// and every ten seconds while the last sweep left any.
    fn sweep_due(&self) -> bool {
        match self.swept {
            None => true,
            Some((at, current, left)) => {
                let wait = if current != self.appender.current() {
                    SWEEP_EVERY
                } else if left {
                    SWEEP_AGAIN
                } else {
                    return false;
                };
                at.elapsed() >= wait
            }
        }
    }

    fn write(&mut self, group: Vec<Work>, sweep: bool) {
        // A sweep decides on a read that an fsync'd commit makes durable, so no power cut can
        // bring back a row pointing into a segment it deletes.
        let wanted = if sweep || group.iter().any(|w| matches!(w, Work::Enqueue(..))) {
            "FULL"
        } else {
            "NORMAL"
        };
        if wanted != self.synchronous
            && self.conn.pragma_update(None, "synchronous", wanted).is_ok()
        {
            self.synchronous = wanted;
        }
        let sweep = sweep && self.synchronous == "FULL";
        let path = self.path.clone();
        let sql = |source| QueueError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut settled = 0i64;
        let mut pruned = Vec::new();
        let segments = &self.segments;
        // Segments are locked before the rows are read, so a writer that lets go of one after
        // that has committed every row pointing into it before the read.
        let (unused, in_use) = if sweep {
            segments
                .lock_unused(self.appender.current())
                .unwrap_or((Vec::new(), 1))
        } else {
            (Vec::new(), 0)
        };
        let mut referenced = None;
        let written = (|| -> Result<Vec<Result<Option<Enqueued>, QueueError>>, rusqlite::Error> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut results = Vec::with_capacity(group.len());
            for work in &group {
                results.push(match work {
                    Work::Enqueue(job, _) => write_job(&tx, job).map(Some).map_err(|e| match e {
                        JobError::Sql(e) => sql(e),
                        JobError::Queue(q) => q,
                    }),
                    Work::Record(done, _) => {
                        settled += write_record(&tx, done, segments)?;
                        Ok(None)
                    }
                    Work::Prune(before, limit, _) => {
                        pruned.push(write_prune(&tx, *before, *limit)?);
                        Ok(None)
                    }
                });
            }
            if sweep {
                // Read inside the transaction (no commit can come in between), and made durable
                // by its commit: something is written, so the fsync'd commit syncs the log, and
                // with it every earlier commit this read saw.
                referenced = Some(
                    tx.prepare_cached(
                        "SELECT DISTINCT segment FROM batches WHERE segment IS NOT NULL",
                    )?
                    .query_map([], |r| r.get::<_, i64>(0))?
                    .collect::<Result<std::collections::HashSet<i64>, _>>()?,
                );
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('segments_swept_at', ?1)",
                    [now_ms().to_string()],
                )?;
            }
            tx.commit()?;
            Ok(results)
        })();
        match written {
            Ok(results) => {
                self.pending.fetch_sub(settled, Ordering::Relaxed);
                let mut pruned = pruned.into_iter();
                for (work, result) in group.into_iter().zip(results) {
                    match work {
                        Work::Enqueue(_, reply) => {
                            if let Ok(Some(Enqueued::New(r))) = &result {
                                self.pending.fetch_add(r.accepted as i64, Ordering::Relaxed);
                            }
                            let _ = reply.send(result.and_then(|r| {
                                r.ok_or_else(|| QueueError::Write("nothing was written".into()))
                            }));
                        }
                        Work::Record(_, reply) => {
                            let _ = reply.send(result.map(|_| ()));
                        }
                        Work::Prune(_, _, reply) => {
                            let _ = reply.send(Ok(pruned.next().unwrap_or_default()));
                        }
                    }
                }
                if let Some(referenced) = referenced {
                    let (kept, gone): (Vec<_>, Vec<_>) = unused
                        .into_iter()
                        .partition(|u| u.id().is_some_and(|id| referenced.contains(&id)));
                    let left = in_use > 0 || !kept.is_empty();
                    drop(kept);
                    if !gone.is_empty() {
                        // The locks go along, and are let go once the files are gone. A file
                        // that cannot be deleted now is found again by a later sweep.
                        let segments = self.segments.clone();
                        let _ = std::thread::Builder::new()
                            .name("queue-sweeper".into())
                            .spawn(move || segments.delete(gone));
                    }
                    self.swept = Some((std::time::Instant::now(), self.appender.current(), left));
                }
            }
            Err(e) => {
                let message = format!("queue {path}: {e}");
                for work in group {
                    match work {
                        Work::Enqueue(_, reply) => {
                            let _ = reply.send(Err(QueueError::Write(message.clone())));
                        }
                        Work::Record(_, reply) => {
                            let _ = reply.send(Err(QueueError::Write(message.clone())));
                        }
                        Work::Prune(_, _, reply) => {
                            let _ = reply.send(Err(QueueError::Write(message.clone())));
                        }
                    }
                }
            }
        }
    }
}

enum JobError {
    Sql(rusqlite::Error),
    Queue(QueueError),
}

impl From<rusqlite::Error> for JobError {
    fn from(e: rusqlite::Error) -> Self {
        JobError::Sql(e)
    }
}

/// Writes one trigger inside the group's transaction (nothing, if its idempotency key was used).
fn write_job(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<Enqueued, JobError> {
    if let Some(key) = &job.head.idempotency_key {
        let earlier: Option<(String, String, String, String)> = tx
            .query_row(
                "SELECT id, touchpoint, campaign, receipt FROM dispatches WHERE idempotency_key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        if let Some((dispatch_id, touchpoint, campaign, receipt)) = earlier {
            if touchpoint != job.head.touchpoint || campaign != job.head.campaign {
                return Err(JobError::Queue(QueueError::IdempotencyConflict {
                    key: key.clone(),
                    touchpoint,
                    campaign,
                    dispatch_id,
                }));
            }
            let receipt = serde_json::from_str(&receipt).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            return Ok(Enqueued::Repeat(receipt));
        }
    }
    let dispatch_id = job.dispatch_id.clone();
    let receipt = Receipt {
        dispatch_id: dispatch_id.clone(),
        accepted: job.accepted,
        rejected: job.rejected.clone(),
        batches: job.batches.len(),
    };
    let now = now_ms();
    tx.execute(
        "INSERT INTO dispatches (id, touchpoint, campaign, idempotency_key, template_params, generation, receipt, created_at, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            dispatch_id,
            job.head.touchpoint,
            job.head.campaign,
            job.head.idempotency_key,
            serde_json::to_string(&job.head.template_params).unwrap_or_default(),
            job.generation as i64,
            serde_json::to_string(&receipt).unwrap_or_default(),
            now,
            {
                let message = job.head.message();
                (!message.is_empty()).then(|| serde_json::to_string(&message).unwrap_or_default())
            }
        ],
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO batches (id, dispatch_id, idx, count, touchpoint, size, remaining, state, next_at, created_at, updated_at, segment, seg_offset, seg_length) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 'pending', ?7, ?7, ?7, ?8, ?9, ?10)",
    )?;
    if job.spans.len() != job.batches.len() {
        return Err(JobError::Queue(QueueError::Write(
            "the users of a trigger were not written".into(),
        )));
    }
    for (i, ((size, _), span)) in job.batches.iter().zip(&job.spans).enumerate() {
        let batch_id = batch_id(&dispatch_id, i);
        insert.execute(params![
            batch_id,
            dispatch_id,
            i as i64,
            job.batches.len() as i64,
            job.head.touchpoint,
            *size as i64,
            now,
            span.segment,
            span.offset as i64,
            span.len as i64
        ])?;
    }
    Ok(Enqueued::New(receipt))
}

/// Writes attempt outcomes inside the group's transaction; returns how many recipients left the
/// pending count.
fn write_record(
    tx: &rusqlite::Transaction<'_>,
    done: &[Completion],
    segments: &Segments,
) -> Result<i64, rusqlite::Error> {
    let mut settled = 0i64;
    {
        let mut attempt = tx
                .prepare_cached(
                    // Numbered on from the attempts made before the batch's last replay, which
                    // stay in the log.
                    "INSERT OR REPLACE INTO attempts (batch_id, attempt, generation, started_at, latency_ms, status, outcome, recipients, error) \
                     VALUES (?1, ?2 + coalesce((SELECT attempt_base FROM batches WHERE id = ?1), 0), ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                ?;
        let mut failure = tx.prepare_cached(
            "INSERT INTO failures (batch_id, user_id, reason, attempt) \
             VALUES (?1, ?2, ?3, ?4 + coalesce((SELECT attempt_base FROM batches WHERE id = ?1), 0))",
        )?;
        // A batch finished with nothing delivered in any attempt is `failed`, not `delivered`.
        // An attempt that does not count (parked, deferred) moves the log's numbering on through
        // `attempt_base` instead, so the next attempt gets a number of its own.
        let mut update = tx.prepare_cached(
            "UPDATE batches SET attempts = CASE WHEN ?10 THEN attempts ELSE ?2 END, \
                     attempt_base = attempt_base + CASE WHEN ?10 THEN 1 ELSE 0 END, \
                     delivered = delivered + ?3, failed = failed + ?4, \
                     remaining = coalesce(?5, remaining - ?3 - ?4), \
                     state = CASE WHEN ?6 = 'delivered' AND delivered + ?3 = 0 AND failed + ?4 > 0 \
                                  THEN 'failed' ELSE ?6 END, \
                     next_at = coalesce(?7, next_at), last_error = ?8, updated_at = ?9, \
                     held = ?11 \
                     WHERE id = ?1",
        )?;
        // Rewritten users live in `payloads`; the batch stops pointing into its segment.
        let mut rewrite =
            tx.prepare_cached("INSERT OR REPLACE INTO payloads (batch_id, users) VALUES (?1, ?2)")?;
        let mut unpoint = tx.prepare_cached(
            "UPDATE batches SET segment = NULL, seg_offset = NULL, seg_length = NULL WHERE id = ?1",
        )?;
        let mut span = tx.prepare_cached(
            "SELECT segment, seg_offset, seg_length FROM batches WHERE id = ?1 AND segment IS NOT NULL",
        )?;
        let mut drop_payload = tx.prepare_cached("DELETE FROM payloads WHERE batch_id = ?1")?;
        let now = now_ms();
        for c in done {
            let partial = c.delivered > 0 || !c.failed.is_empty();
            let (state, outcome, next_at) = match c.after {
                After::Done if c.delivered == 0 && !c.failed.is_empty() => {
                    ("delivered", "failed", None)
                }
                After::Done => ("delivered", "delivered", None),
                After::RetryAt(at) if partial => ("pending", "partial", Some(at)),
                After::RetryAt(at) => ("pending", "retry", Some(at)),
                After::Dead => ("dead", "dead", None),
                // `next_at` stays as it was: at or before the claim, so due at once.
                After::Interrupted => ("pending", "interrupted", None),
                After::Parked(_) => ("pending", "held", None),
                After::Deferred(at) => ("pending", "deferred", Some(at)),
            };
            let uncounted = matches!(c.after, After::Parked(_) | After::Deferred(_));
            let held = match &c.after {
                After::Parked(reason) => Some(reason.as_str()),
                _ => None,
            };
            attempt.execute(params![
                c.batch_id,
                c.attempt,
                c.generation as i64,
                c.started_ms,
                c.latency_ms,
                c.status,
                outcome,
                c.recipients,
                c.error
            ])?;
            for f in &c.failed {
                failure.execute(params![c.batch_id, f.user_id, f.reason, c.attempt])?;
            }
            let (users, remaining) = match &c.remaining {
                Some((json, n)) => (Some(json.as_slice()), Some(i64::from(*n))),
                None if c.after == After::Done => (None, Some(0)),
                None => (None, None),
            };
            update.execute(params![
                c.batch_id,
                c.attempt,
                c.delivered,
                c.failed.len() as i64,
                remaining,
                state,
                next_at,
                c.error,
                now,
                uncounted,
                held
            ])?;
            if c.after == After::Done {
                // Delivered: the users are not needed any more; the log keeps the counts.
                drop_payload.execute([&c.batch_id])?;
                unpoint.execute([&c.batch_id])?;
            } else if let Some(users) = users {
                rewrite.execute(params![c.batch_id, users])?;
                unpoint.execute([&c.batch_id])?;
            } else if c.after == After::Dead {
                // A dead batch may wait long for a replay: its users move here, so that it does
                // not keep a whole segment file alive. (Unreadable ones stay where they are.)
                let at: Option<Span> = span.query_row([&c.batch_id], span_of).optional()?.flatten();
                if let Some(users) = at.and_then(|at| segments.read(at).ok()) {
                    rewrite.execute(params![c.batch_id, users])?;
                    unpoint.execute([&c.batch_id])?;
                }
            }
            settled += i64::from(c.delivered) + c.failed.len() as i64;
            if c.after == After::Dead {
                // The rest of a dead batch leaves the pending count until replayed.
                settled += match &c.remaining {
                    Some((_, n)) => i64::from(*n),
                    None => {
                        i64::from(c.recipients) - i64::from(c.delivered) - c.failed.len() as i64
                    }
                };
            }
        }
    }
    Ok(settled)
}

/// Forgets up to `limit` fully delivered dispatches older than `before`, inside the writer's
/// transaction (see [`Queue::prune`]).
fn write_prune(
    tx: &rusqlite::Transaction<'_>,
    before: i64,
    limit: usize,
) -> Result<usize, rusqlite::Error> {
    let ids: Vec<String> = tx
        .prepare_cached(
            "SELECT d.id FROM dispatches d WHERE d.created_at < ?1 \
             AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.dispatch_id = d.id \
                             AND (b.state NOT IN ('delivered', 'failed') OR b.updated_at >= ?1)) \
             LIMIT ?2",
        )?
        .query_map(params![before, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in &ids {
        for sql in [
            "DELETE FROM failures WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ?1)",
            "DELETE FROM attempts WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ?1)",
            "DELETE FROM replays WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ?1)",
            "DELETE FROM payloads WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ?1)",
            "DELETE FROM batches WHERE dispatch_id = ?1",
            "DELETE FROM dispatches WHERE id = ?1",
        ] {
            tx.prepare_cached(sql)?.execute([id])?;
        }
    }
    Ok(ids.len())
}

/// Refuses a file of a newer format; marks an older one with this format, since batches this
/// version stores may be in forms older versions cannot read.
fn mark_format(conn: &mut Connection, path: &str) -> Result<(), QueueError> {
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

/// Due batches with what sending them needs, oldest due first (see [`Queue::claim`]).
const CLAIM: &str = "SELECT b.id, b.dispatch_id, b.idx, b.count, b.touchpoint, p.users, b.remaining, b.attempts, d.campaign, d.template_params, \
     b.segment, b.seg_offset, b.seg_length, d.message \
     FROM batches b JOIN dispatches d ON d.id = b.dispatch_id LEFT JOIN payloads p ON p.batch_id = b.id \
     WHERE b.state = 'pending' AND b.held IS NULL AND b.next_at <= ?1 \
     AND b.touchpoint NOT IN (SELECT value FROM json_each(?2)) \
     AND b.id NOT IN (SELECT value FROM json_each(?3)) \
     ORDER BY b.next_at LIMIT 256";

/// The span a row's `segment`, `seg_offset` and `seg_length` (from column `first` on) point at.
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

fn span_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Span>> {
    span_at(r, 0)
}

/// Adds the columns files written by earlier versions lack: those that point into segment files
/// (before format 3), the attempts made before a replay, the daemon's lease, and a dispatch's
/// channel message (before format 4).
fn add_columns(conn: &mut Connection) -> rusqlite::Result<()> {
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
fn repair_once(conn: &mut Connection) -> rusqlite::Result<()> {
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
        let latest = super::retry::due_at(now_ms(), crate::model::MaxBackoff::MAX.get());
        tx.execute(
            "UPDATE batches SET next_at = ?1 WHERE state = 'pending' AND next_at > ?1",
            [latest],
        )?;
        tx.execute("INSERT INTO meta (key, value) VALUES ('repaired', '1')", [])?;
    }
    tx.commit()
}

/// A list of strings as a JSON array, for `json_each`.
fn writer_gone() -> QueueError {
    QueueError::Write("the queue's writer thread stopped".into())
}

/// The id of a dispatch's batch `index`.
fn batch_id(dispatch_id: &str, index: usize) -> String {
    format!("{dispatch_id}_{index}")
}

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

impl Queue {
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
        mark_format(&mut accept, &shown)?;
        add_columns(&mut accept).map_err(sql)?;
        repair_once(&mut accept).map_err(sql)?;
        let work = store::connect(path, Sync::Normal).map_err(opened)?;
        let write = store::connect(path, Sync::Full).map_err(opened)?;
        let pending = Arc::new(AtomicI64::new(0));
        let segments = Arc::new(Segments::new(path));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let w = Writer {
                conn: write,
                path: shown.clone(),
                pending: pending.clone(),
                appender: Appender::new(path),
                segments: segments.clone(),
                swept: None,
                synchronous: "FULL",
            };
            std::thread::Builder::new()
                .name("queue-writer".into())
                .spawn(move || writer(w, rx))
                .map_err(|source| QueueError::Io {
                    path: shown.clone(),
                    source,
                })?;
        }
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

    /// The receipt of an earlier trigger with this idempotency key, if there was one.
    pub fn find_idempotent(
        &self,
        key: &str,
    ) -> Result<Option<(String, String, Receipt)>, QueueError> {
        let row: Option<(String, String, String)> = lock(&self.work)
            .query_row(
                "SELECT touchpoint, campaign, receipt FROM dispatches WHERE idempotency_key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.and_then(|(t, c, receipt)| serde_json::from_str(&receipt).ok().map(|r| (t, c, r))))
    }

    /// Stores a trigger's batches; returns once they are on disk. Triggers arriving together share
    /// one commit (and one fsync): the writer thread takes every trigger waiting when it starts a
    /// transaction.
    pub fn enqueue(&self, d: NewDispatch<'_>) -> Result<Enqueued, QueueError> {
        self.begin_enqueue(d)?.wait()
    }

    /// The CPU part of [`Queue::enqueue`]: builds the batches, hands them to the writer thread
    /// and writes the recipients for the wire while it stores them. [`Storing::wait`] then waits
    /// for the disk, which takes no CPU: a caller that limits how many triggers are worked on at
    /// once can let the next one start in between.
    pub fn begin_enqueue(&self, d: NewDispatch<'_>) -> Result<Storing<'_>, QueueError> {
        // The batch texts are built here, on the caller's thread; the writer only writes.
        let size = d.batch_size.max(1);
        let batches: Vec<(usize, Vec<u8>)> = d
            .users
            .chunks(size)
            .map(|c| (c.len(), super::user::store(c.iter().copied())))
            .collect();
        let dispatch_id = new_id("dsp");
        let job = Job {
            dispatch_id: dispatch_id.clone(),
            head: d.head.clone(),
            generation: d.generation,
            batches,
            accepted: d.users.len(),
            rejected: d.rejected,
            spans: Vec::new(),
        };
        let answer = self.send(|reply| Work::Enqueue(Box::new(job), reply))?;
        // Written while the writer stores the trigger and waits for the disk, and kept as each is
        // written: the rows become visible to the sender when the writer commits, and a batch
        // claimed before its entry is here is read from disk (the entry would then never be
        // taken). Only as many as the memory budget keeps (`put` says when it is taken): the
        // others are read from disk when sent.
        let mut kept = 0;
        if let Some(write) = d.wire {
            for batch in d.users.chunks(size) {
                let recipients = write(batch);
                let wire = Wire {
                    generation: d.generation,
                    recipients,
                    count: batch.len() as u32,
                };
                if !self.fresh.put(batch_id(&dispatch_id, kept), wire) {
                    break;
                }
                kept += 1;
            }
        }
        Ok(Storing {
            queue: self,
            answer,
            dispatch_id,
            kept,
        })
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

    /// Hands work to the writer thread and waits for its answer.
    fn submit<T>(
        &self,
        work: impl FnOnce(std::sync::mpsc::SyncSender<Result<T, QueueError>>) -> Work,
    ) -> Result<T, QueueError> {
        Self::answer(self.send(work)?)
    }

    /// Hands work to the writer thread; the answer comes on the returned channel.
    fn send<T>(
        &self,
        work: impl FnOnce(std::sync::mpsc::SyncSender<Result<T, QueueError>>) -> Work,
    ) -> Result<std::sync::mpsc::Receiver<Result<T, QueueError>>, QueueError> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        self.writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(work(reply))
            .map_err(|_| writer_gone())?;
        Ok(answer)
    }

    /// Waits for the writer's answer.
    fn answer<T>(
        answer: std::sync::mpsc::Receiver<Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        answer.recv().map_err(|_| writer_gone())?
    }

    /// Up to `limit` (at most 256) due batches, oldest due first, leaving out the batches in `busy`
    /// (being sent) and the touchpoints in `skip` (at their concurrency or rate limit). Reads only.
    pub fn claim(
        &self,
        now: i64,
        limit: usize,
        skip: &[&str],
        busy: &[&str],
    ) -> Result<Vec<Claimed>, QueueError> {
        let conn = lock(&self.work);
        // The lists go in as JSON arrays, so the statement text never changes and stays prepared.
        let (skip, busy) = (json_list(skip), json_list(busy));
        let mut stmt = conn.prepare_cached(CLAIM).map_err(|e| self.err(e))?;
        // The limit is taken from the rows, not bound: a bound LIMIT that changes from call to
        // call makes SQLite prepare the statement again every time. Rows come in index order, so
        // stopping early reads no more than needed.
        let args: [&dyn rusqlite::ToSql; 3] = [&now, &skip, &busy];
        let rows: Vec<(Claimed, Option<Span>)> = stmt
            .query_map(args.as_slice(), |r| {
                let stored: Option<Vec<u8>> = r.get(5)?;
                let span = span_at(r, 10)?;
                Ok((
                    Claimed {
                        id: r.get(0)?,
                        dispatch_id: r.get(1)?,
                        index: r.get(2)?,
                        count: r.get(3)?,
                        touchpoint: r.get(4)?,
                        users: Users::Stored(
                            stored.ok_or_else(|| "the batch's users are missing".to_string()),
                        ),
                        remaining: r.get(6)?,
                        attempts: r.get(7)?,
                        campaign: r.get(8)?,
                        template_params: r.get(9)?,
                        message: r.get(13)?,
                    },
                    span,
                ))
            })
            .and_then(|rows| rows.take(limit).collect::<Result<_, _>>())
            .map_err(|e| self.err(e))?;
        drop(stmt);
        drop(conn);
        // Users in a segment are read with the queue file unlocked, unless they are in memory.
        Ok(rows
            .into_iter()
            .map(|(mut c, span)| {
                if let Some(span) = span {
                    c.users = match self.fresh.take(&c.id) {
                        Some(wire) => Users::Fresh(wire, span),
                        None => Users::Stored(self.segments.read(span)),
                    };
                }
                c
            })
            .collect())
    }

    /// When the earliest pending, unheld batch not of a touchpoint in `skip` and not in `busy` is
    /// due (the same filters as [`Queue::claim`]).
    pub fn next_due(&self, skip: &[&str], busy: &[&str]) -> Result<Option<i64>, QueueError> {
        let conn = lock(&self.work);
        let mut stmt = conn
            .prepare_cached(
                "SELECT min(next_at) FROM batches WHERE state = 'pending' AND held IS NULL \
                 AND touchpoint NOT IN (SELECT value FROM json_each(?1)) \
                 AND id NOT IN (SELECT value FROM json_each(?2))",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_row([json_list(skip), json_list(busy)], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Records attempts. They share a commit with whatever else the writer has waiting.
    pub fn record(&self, done: Vec<Completion>) -> Result<(), QueueError> {
        if done.is_empty() {
            return Ok(());
        }
        self.submit(|reply| Work::Record(done, reply))
    }

    /// Forgets up to `limit` dispatches whose batches were all delivered before `before` (ms since
    /// the epoch): their batches, attempts and failures go, and their idempotency keys may be used
    /// again. A dispatch with a pending or dead batch is kept, whatever its age. Returns how many
    /// were forgotten; the space they took is reused by later triggers.
    pub fn prune(&self, before: i64, limit: usize) -> Result<usize, QueueError> {
        // Through the writer thread, like every write: no connection waits on another's lock.
        self.submit(|reply| Work::Prune(before, limit, reply))
    }

    /// Holds (with a reason) or releases (`None`) the pending batches of a touchpoint.
    pub fn hold(&self, touchpoint: &str, reason: Option<&str>) -> Result<usize, QueueError> {
        lock(&self.work)
            .execute(
                "UPDATE batches SET held = ?2 WHERE touchpoint = ?1 AND state = 'pending' AND held IS NOT ?2",
                params![touchpoint, reason],
            )
            .map_err(|e| self.err(e))
    }

    /// Makes the pending batches of `touchpoint` due no sooner than `until` (ms since the epoch):
    /// the platform asked to wait. Returns how many were moved.
    pub fn defer(&self, touchpoint: &str, until: i64) -> Result<usize, QueueError> {
        lock(&self.work)
            .execute(
                "UPDATE batches SET next_at = ?2 WHERE touchpoint = ?1 AND state = 'pending' AND next_at < ?2",
                params![touchpoint, until],
            )
            .map_err(|e| self.err(e))
    }

    /// The touchpoints that have pending batches, with how many are held.
    pub fn pending_touchpoints(&self) -> Result<Vec<(String, u64, u64)>, QueueError> {
        let conn = lock(&self.work);
        let mut stmt = conn
            .prepare_cached(
                "SELECT touchpoint, count(*), count(held) FROM batches WHERE state = 'pending' GROUP BY touchpoint",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([], |r| {
            let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
            Ok((r.get(0)?, n(1)?, n(2)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// A dispatch and its progress.
    pub fn dispatch(&self, id: &str) -> Result<Option<DispatchStatus>, QueueError> {
        let conn = lock(&self.work);
        let head: Option<(String, String, i64, String)> = conn
            .query_row(
                "SELECT touchpoint, campaign, created_at, receipt FROM dispatches WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some((touchpoint, campaign, created_at, receipt)) = head else {
            return Ok(None);
        };
        let receipt: Receipt = serde_json::from_str(&receipt).unwrap_or(Receipt {
            dispatch_id: id.to_string(),
            accepted: 0,
            rejected: Vec::new(),
            batches: 0,
        });
        let status = conn
            .query_row(
                "SELECT coalesce(sum(delivered), 0), coalesce(sum(failed), 0), \
                 coalesce(sum(CASE WHEN state = 'pending' THEN remaining END), 0), \
                 coalesce(sum(CASE WHEN state = 'dead' THEN remaining END), 0), \
                 count(CASE WHEN state = 'pending' THEN 1 END), count(CASE WHEN state = 'pending' THEN held END), \
                 count(CASE WHEN state = 'delivered' THEN 1 END), count(CASE WHEN state = 'dead' THEN 1 END), \
                 count(CASE WHEN state = 'failed' THEN 1 END) \
                 FROM batches WHERE dispatch_id = ?1",
                [id],
                |r| {
                    let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                    let batches = BatchCounts {
                        pending: n(4)?,
                        held: n(5)?,
                        delivered: n(6)?,
                        failed: n(8)?,
                        dead: n(7)?,
                    };
                    Ok(DispatchStatus {
                        dispatch_id: id.to_string(),
                        touchpoint,
                        campaign,
                        created_at,
                        receipt,
                        delivered: n(0)?,
                        failed: n(1)?,
                        pending: n(2)?,
                        dead: n(3)?,
                        finished: batches.pending == 0,
                        batches,
                    })
                },
            )
            .map_err(|e| self.err(e))?;
        Ok(Some(status))
    }

    /// Batches matching `filter`, newest first.
    pub fn batches(&self, filter: &Filter) -> Result<Vec<BatchInfo>, QueueError> {
        let conn = lock(&self.work);
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, dispatch_id, touchpoint, idx, count, state, held, size, remaining, delivered, failed, attempt_base + attempts, next_at, last_error, updated_at \
                 FROM batches WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR touchpoint = ?2) AND (?3 IS NULL OR dispatch_id = ?3) \
                 ORDER BY updated_at DESC, id DESC LIMIT ?4",
            )
            .map_err(|e| self.err(e))?;
        let limit = if filter.limit == 0 {
            -1
        } else {
            filter.limit as i64
        };
        stmt.query_map(
            params![filter.state, filter.touchpoint, filter.dispatch_id, limit],
            |r| {
                let state: String = r.get(5)?;
                let next_at: i64 = r.get(12)?;
                Ok(BatchInfo {
                    id: r.get(0)?,
                    dispatch_id: r.get(1)?,
                    touchpoint: r.get(2)?,
                    index: r.get(3)?,
                    count: r.get(4)?,
                    next_at: (state == "pending").then_some(next_at),
                    state,
                    held: r.get(6)?,
                    size: r.get(7)?,
                    remaining: r.get(8)?,
                    delivered: r.get(9)?,
                    failed: r.get(10)?,
                    attempts: r.get(11)?,
                    last_error: r.get(13)?,
                    updated_at: r.get(14)?,
                })
            },
        )
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Every attempt of a batch, and its recipients that failed for good.
    pub fn history(&self, batch_id: &str) -> Result<(Vec<Attempt>, Vec<Rejected>), QueueError> {
        let conn = lock(&self.work);
        let attempts = {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT attempt, generation, started_at, latency_ms, status, outcome, recipients, error \
                     FROM attempts WHERE batch_id = ?1 ORDER BY attempt",
                )
                .map_err(|e| self.err(e))?;
            stmt.query_map([batch_id], |r| {
                Ok(Attempt {
                    attempt: r.get(0)?,
                    generation: r.get::<_, i64>(1)? as u64,
                    started_at: r.get(2)?,
                    latency_ms: r.get(3)?,
                    status: r.get(4)?,
                    outcome: r.get(5)?,
                    recipients: r.get(6)?,
                    error: r.get(7)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?
        };
        let failures = {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT user_id, reason FROM failures WHERE batch_id = ?1 ORDER BY rowid",
                )
                .map_err(|e| self.err(e))?;
            stmt.query_map([batch_id], |r| {
                Ok(Rejected {
                    user_id: r.get(0)?,
                    reason: r.get(1)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.err(e))?
        };
        Ok((attempts, failures))
    }

    /// When each of a batch's replays happened, oldest first.
    pub fn replays(&self, batch_id: &str) -> Result<Vec<Replay>, QueueError> {
        let conn = lock(&self.work);
        let mut stmt = conn
            .prepare_cached(
                "SELECT at, after_attempt, recipients FROM replays WHERE batch_id = ?1 ORDER BY rowid",
            )
            .map_err(|e| self.err(e))?;
        stmt.query_map([batch_id], |r| {
            Ok(Replay {
                at: r.get(0)?,
                after_attempt: r.get(1)?,
                recipients: r.get(2)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(|e| self.err(e))
    }

    /// Puts dead batches back in the queue, due now, with a fresh attempt budget: the given ids,
    /// or every dead batch (of `touchpoint`, if given). Returns the ids replayed. The attempts
    /// made before stay in the log, later ones are numbered on from them, and the replay itself
    /// is recorded (see [`Queue::replays`]).
    pub fn replay(
        &self,
        ids: &[String],
        touchpoint: Option<&str>,
    ) -> Result<Vec<String>, QueueError> {
        let mut conn = lock(&self.accept);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let chosen: Vec<(String, i64)> = {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT id, remaining FROM batches WHERE state = 'dead' AND (?1 IS NULL OR touchpoint = ?1) ORDER BY id",
                )
                .map_err(|e| self.err(e))?;
            let all: Vec<(String, i64)> = stmt
                .query_map([touchpoint], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|rows| rows.collect())
                .map_err(|e| self.err(e))?;
            if ids.is_empty() {
                all
            } else {
                all.into_iter().filter(|(id, _)| ids.contains(id)).collect()
            }
        };
        let now = now_ms();
        for (id, _) in &chosen {
            tx.execute(
                "INSERT INTO replays (batch_id, at, after_attempt, recipients) \
                 SELECT id, ?2, attempt_base + attempts, remaining FROM batches WHERE id = ?1",
                params![id, now],
            )
            .map_err(|e| self.err(e))?;
            tx.execute(
                "UPDATE batches SET state = 'pending', attempt_base = attempt_base + attempts, attempts = 0, \
                 next_at = ?2, updated_at = ?2 WHERE id = ?1",
                params![id, now],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        let added: i64 = chosen.iter().map(|(_, n)| n).sum();
        self.pending.fetch_add(added, Ordering::Relaxed);
        Ok(chosen.into_iter().map(|(id, _)| id).collect())
    }

    /// Counts over the whole queue.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        lock(&self.work)
            .query_row(
                "SELECT count(CASE WHEN state = 'pending' THEN 1 END), \
                 coalesce(sum(CASE WHEN state = 'pending' THEN remaining END), 0), \
                 count(CASE WHEN state = 'pending' THEN held END), \
                 count(CASE WHEN state = 'dead' THEN 1 END), \
                 coalesce(sum(CASE WHEN state = 'dead' THEN remaining END), 0) FROM batches",
                [],
                |r| {
                    let n = |i| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                    Ok(Stats {
                        pending_batches: n(0)?,
                        pending_recipients: n(1)?,
                        held_batches: n(2)?,
                        dead_batches: n(3)?,
                        dead_recipients: n(4)?,
                    })
                },
            )
            .map_err(|e| self.err(e))
    }

    /// The daemon holding the queue, if any.
    fn held_slot(conn: &Connection) -> rusqlite::Result<Option<DaemonSlot>> {
        conn.query_row(
            "SELECT pid, host, started_at, lease_id, expires_at FROM daemon WHERE singleton = 1",
            [],
            |r| {
                Ok(DaemonSlot {
                    pid: r.get(0)?,
                    host: r.get(1)?,
                    started_at: r.get(2)?,
                    lease_id: r.get(3)?,
                    expires_at: r.get(4)?,
                })
            },
        )
        .optional()
    }

    /// Marks this process as the daemon working the queue, with a lease of term `ttl` that it
    /// must renew ([`Queue::renew_daemon_slot`]; see [`crate::lease`]). A hold whose process no
    /// longer runs on this host, or whose lease expired, is taken over (and returned); a live one
    /// is an error. A hold naming this very process id on this host is a previous process that
    /// had the same id (a restarted container's pid 1): a process does not start twice.
    pub fn take_daemon_slot(&self, ttl: std::time::Duration) -> Result<Taken, QueueError> {
        let mut conn = lock(&self.accept);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let held = Self::held_slot(&tx).map_err(|e| self.err(e))?;
        let host = crate::registry::hostname();
        let now = now_ms();
        let replaced = match held {
            Some(h) if h.pid == std::process::id() && h.host == host => {
                Some((h, crate::lease::Standing::Gone))
            }
            Some(h) => match h.standing(now) {
                standing if standing.free() => Some((h, standing)),
                _ => return Err(QueueError::Busy(Box::new(h))),
            },
            None => None,
        };
        let lease_id = store::random_hex(8);
        tx.execute(
            "INSERT OR REPLACE INTO daemon (singleton, pid, host, started_at, lease_id, expires_at) \
             VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![
                std::process::id(),
                host,
                crate::registry::now(),
                lease_id,
                crate::lease::expiry(now, ttl)
            ],
        )
        .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Taken { lease_id, replaced })
    }

    /// Pushes this process's hold to `expires_at` (ms since the epoch); whether it still holds
    /// the queue (`false`: taken over, or released by `force-unlock --daemon`).
    pub fn renew_daemon_slot(&self, lease_id: &str, expires_at: i64) -> Result<bool, QueueError> {
        lock(&self.accept)
            .execute(
                "UPDATE daemon SET expires_at = ?2 WHERE singleton = 1 AND lease_id = ?1",
                params![lease_id, expires_at],
            )
            .map(|n| n == 1)
            .map_err(|e| self.err(e))
    }

    /// Gives the daemon slot up (on a clean stop), if this process still holds it.
    pub fn leave_daemon_slot(&self, lease_id: &str) -> Result<(), QueueError> {
        lock(&self.accept)
            .execute(
                "DELETE FROM daemon WHERE singleton = 1 AND lease_id = ?1",
                [lease_id],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Releases the queue from the daemon holding it, for an operator whose daemon is gone for
    /// good; returns it (`None`: no daemon held the queue). Unless `force`, refuses while that
    /// daemon keeps renewing its hold.
    pub fn release_daemon_slot(&self, force: bool) -> Result<Option<DaemonSlot>, QueueError> {
        let mut conn = lock(&self.accept);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.err(e))?;
        let Some(held) = Self::held_slot(&tx).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let renewed = crate::lease::renewed(&held.host, held.pid, held.expires_at, now_ms());
        if renewed && !force {
            return Err(QueueError::SlotLive(Box::new(held)));
        }
        tx.execute("DELETE FROM daemon WHERE singleton = 1", [])
            .map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(Some(held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn head(key: Option<&str>) -> TriggerHead {
        TriggerHead {
            touchpoint: "sms".into(),
            campaign: "c1".into(),
            idempotency_key: key.map(str::to_string),
            template_params: json!({"text": "hi"}).as_object().cloned().unwrap(),
            ..TriggerHead::default()
        }
    }

    fn users(n: usize) -> Vec<&'static UserRef<'static>> {
        let text: &'static str = Box::leak(
            format!(
                "[{}]",
                (0..n)
                    .map(|i| format!("{{\"user_id\":\"u{i}\"}}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )
            .into_boxed_str(),
        );
        let parsed = crate::dispatch::user::parse_users_json(text.as_bytes()).unwrap();
        Vec::leak(parsed).iter().collect()
    }

    fn open() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("q/queue.db")).unwrap();
        (dir, q)
    }

    fn new<'a>(h: &'a TriggerHead, n: usize) -> NewDispatch<'a> {
        NewDispatch {
            head: h,
            generation: 1,
            batch_size: 4,
            users: users(n),
            rejected: Vec::new(),
            wire: None,
        }
    }

    /// The stored users of a batch claimed from disk.
    fn stored(c: &Claimed) -> Result<Vec<u8>, String> {
        match &c.users {
            Users::Stored(users) => users.clone(),
            Users::Fresh(..) => panic!("{} was claimed from memory", c.id),
        }
    }

    #[test]
    fn batches_just_queued_are_claimed_from_memory_once() {
        let (_d, q) = open();
        let h = head(None);
        let mut d = new(&h, 10);
        d.generation = 7;
        let ids = |c: &[&UserRef<'_>]| {
            c.iter()
                .map(|u| u.id.as_bytes())
                .collect::<Vec<_>>()
                .join(&b","[..])
        };
        d.wire = Some(&ids);
        let Enqueued::New(r) = q.enqueue(d).unwrap() else {
            panic!("new")
        };
        assert_eq!(q.fresh_usage().0, 3);
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 3);
        for (i, c) in claimed.iter().enumerate() {
            let Users::Fresh(wire, span) = &c.users else {
                panic!("batch {i} read from disk")
            };
            assert_eq!(c.id, format!("{}_{i}", r.dispatch_id));
            assert_eq!(wire.generation, 7);
            assert_eq!(wire.count, c.remaining);
            // The same users as the stored form at the span.
            let on_disk = q.read_span(*span).unwrap();
            let ids: Vec<String> = crate::dispatch::user::parse_stored(&on_disk)
                .unwrap()
                .iter()
                .map(|u| u.id.to_string())
                .collect();
            assert_eq!(wire.recipients, ids.join(",").into_bytes());
            assert_eq!(c.users.clone().stored(&q).unwrap(), on_disk);
        }
        assert_eq!(q.fresh_usage(), (0, 0), "taken by the claim");
        let now = now_ms();
        q.record(
            claimed
                .iter()
                .map(|c| completion(c, After::RetryAt(now)))
                .collect(),
        )
        .unwrap();
        let again = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(again.len(), 3);
        for c in &again {
            assert!(stored(c).is_ok(), "a retry reads the stored users");
        }
    }

    #[test]
    fn recipients_are_kept_before_the_rows_are_visible_and_let_go_for_a_repeat() {
        let (_d, q) = open();
        let h = head(Some("k1"));
        let ids = |c: &[&UserRef<'_>]| {
            c.iter()
                .map(|u| u.id.as_bytes())
                .collect::<Vec<_>>()
                .join(&b","[..])
        };
        let mut d = new(&h, 10);
        d.wire = Some(&ids);
        let storing = q.begin_enqueue(d).unwrap();
        // Kept before the writer has answered: a claim right after its commit finds them all.
        assert_eq!(q.fresh_usage().0, 3);
        let Enqueued::New(first) = storing.wait().unwrap() else {
            panic!("new")
        };
        let mut again = new(&h, 10);
        again.wire = Some(&ids);
        let Enqueued::Repeat(repeat) = q.enqueue(again).unwrap() else {
            panic!("the same key again is a repeat")
        };
        assert_eq!(repeat, first);
        assert_eq!(q.fresh_usage().0, 3, "the repeat's recipients are let go");
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 3);
        assert!(
            claimed.iter().all(|c| matches!(c.users, Users::Fresh(..))),
            "the first trigger's batches are claimed from memory"
        );
        assert_eq!(q.fresh_usage(), (0, 0));
    }

    #[test]
    fn batches_are_claimed_once_and_recorded() {
        let (_d, q) = open();
        let h = head(None);
        let Enqueued::New(r) = q.enqueue(new(&h, 10)).unwrap() else {
            panic!("new")
        };
        assert_eq!((r.accepted, r.batches), (10, 3));
        assert_eq!(q.pending_recipients(), 10);
        let now = now_ms();
        let first = q.claim(now, 2, &[], &[]).unwrap();
        assert_eq!(first.len(), 2);
        let busy = [first[0].id.as_str(), first[1].id.as_str()];
        let rest = q.claim(now, 10, &[], &busy).unwrap();
        assert_eq!(rest.len(), 1, "busy batches are not claimed again");
        assert_eq!(rest[0].remaining, 2);
        assert!(q.claim(now, 10, &["sms"], &[]).unwrap().is_empty());
        q.record(vec![
            completion(&first[0], After::Done),
            completion(&first[1], After::RetryAt(now + 60_000)),
            completion(&rest[0], After::Dead),
        ])
        .unwrap();
        assert_eq!(q.pending_recipients(), 4);
        let s = q.dispatch(&r.dispatch_id).unwrap().unwrap();
        assert_eq!((s.delivered, s.pending, s.dead), (4, 4, 2));
        assert!(!s.finished);
        assert!(
            q.claim(now, 10, &[], &[]).unwrap().is_empty(),
            "not due yet"
        );
        assert_eq!(q.next_due(&[], &[]).unwrap(), Some(now + 60_000));
        assert_eq!(
            q.next_due(&["sms"], &[]).unwrap(),
            None,
            "a skipped touchpoint's batches are not waited for"
        );
        assert_eq!(q.replay(&[], None).unwrap(), [rest[0].id.clone()]);
        assert_eq!(q.pending_recipients(), 6);
        let again = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(
            again[0].attempts, 0,
            "a replay starts a fresh attempt budget"
        );
        let (attempts, _) = q.history(&rest[0].id).unwrap();
        assert_eq!(attempts[0].outcome, "dead");
        // Not everything is delivered: kept, however old.
        assert_eq!(q.prune(now_ms() + 1_000_000, 100).unwrap(), 0);
        assert!(q.dispatch(&r.dispatch_id).unwrap().is_some());
        // Claims of any size share one prepared statement, never prepared again.
        let conn = lock(&q.work);
        let stmt = conn.prepare_cached(CLAIM).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    #[test]
    fn replay_keeps_the_earlier_attempts() {
        let (_d, q) = open();
        let h = head(None);
        let Enqueued::New(r) = q.enqueue(new(&h, 3)).unwrap() else {
            panic!("new")
        };
        let batch = q.claim(now_ms(), 1, &[], &[]).unwrap().remove(0);
        q.record(vec![completion(&batch, After::RetryAt(0))])
            .unwrap();
        let batch = q.claim(now_ms(), 1, &[], &[]).unwrap().remove(0);
        assert_eq!(batch.attempts, 1);
        q.record(vec![completion(&batch, After::Dead)]).unwrap();
        assert_eq!(
            q.replay(&[], None).unwrap(),
            std::slice::from_ref(&batch.id)
        );
        let again = q.claim(now_ms(), 1, &[], &[]).unwrap().remove(0);
        assert_eq!(again.attempts, 0, "a replay starts a fresh attempt budget");
        q.record(vec![completion(&again, After::Done)]).unwrap();
        let (attempts, _) = q.history(&batch.id).unwrap();
        let log: Vec<(u32, &str)> = attempts
            .iter()
            .map(|a| (a.attempt, a.outcome.as_str()))
            .collect();
        assert_eq!(log, [(1, "retry"), (2, "dead"), (3, "delivered")]);
        let replays = q.replays(&batch.id).unwrap();
        assert_eq!(replays.len(), 1);
        assert_eq!((replays[0].after_attempt, replays[0].recipients), (2, 3));
        let info = q.batches(&Filter::default()).unwrap().remove(0);
        assert_eq!((info.state.as_str(), info.attempts), ("delivered", 3));
        // Forgotten with its dispatch, replays too.
        assert_eq!(q.prune(now_ms() + 1, 100).unwrap(), 1);
        assert!(q.dispatch(&r.dispatch_id).unwrap().is_none());
        assert!(q.replays(&batch.id).unwrap().is_empty());
    }

    #[test]
    fn a_daemon_slot_is_a_lease_taken_over_once_expired_on_any_host() {
        let (_d, q) = open();
        let ttl = std::time::Duration::from_secs(60);
        let taken = q.take_daemon_slot(ttl).unwrap();
        assert!(taken.replaced.is_none());
        assert!(q.renew_daemon_slot(&taken.lease_id, now_ms() + 1).unwrap());
        assert!(!q.renew_daemon_slot("not-mine", now_ms()).unwrap());
        // Left by another host (this test's pid, so a matching host name could not make it look
        // gone): refused while fresh, taken over once expired.
        let other = |expires_at: i64| {
            lock(&q.accept)
                .execute(
                    "UPDATE daemon SET host = 'replaced-vm', pid = ?1, lease_id = 'theirs', expires_at = ?2",
                    params![std::process::id(), expires_at],
                )
                .unwrap();
        };
        other(now_ms() + 60_000);
        match q.take_daemon_slot(ttl) {
            Err(e @ QueueError::Busy(_)) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("on replaced-vm") && shown.contains("its lease expires at"),
                    "{shown}"
                );
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(matches!(
            q.release_daemon_slot(false),
            Err(QueueError::SlotLive(_))
        ));
        other(now_ms() - 1);
        let taken = q.take_daemon_slot(ttl).unwrap();
        let (gone, standing) = taken.replaced.unwrap();
        assert_eq!(gone.host, "replaced-vm");
        assert!(matches!(standing, crate::lease::Standing::Expired(_)));
        // The one taken over finds out at its next renewal.
        assert!(!q.renew_daemon_slot("theirs", now_ms()).unwrap());
        // Released by force: the holder finds out too, and the queue is free.
        assert!(q.release_daemon_slot(true).unwrap().is_some());
        assert!(!q.renew_daemon_slot(&taken.lease_id, now_ms()).unwrap());
        assert!(q.release_daemon_slot(false).unwrap().is_none());
    }

    fn completion(c: &Claimed, after: After) -> Completion {
        Completion {
            batch_id: c.id.clone(),
            attempt: c.attempts + 1,
            generation: 1,
            started_ms: now_ms(),
            latency_ms: 1,
            status: Some(200),
            recipients: c.remaining,
            delivered: if after == After::Done { c.remaining } else { 0 },
            failed: Vec::new(),
            remaining: None,
            after,
            error: None,
        }
    }

    fn segment_files(q: &Path) -> Vec<String> {
        match std::fs::read_dir(super::super::segments::dir_of(q)) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits (at most 10 s) for the writer's sweep to leave `n` segment files.
    fn wait_for_segments(q: &Path, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let files = segment_files(q);
            if files.len() == n || std::time::Instant::now() > deadline {
                return files;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    #[test]
    fn segments_go_once_no_batch_needs_them_and_dead_users_outlive_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let h = head(None);
        let (delivered, dead_id, dead_users) = {
            let q = Queue::open(&path).unwrap();
            let Enqueued::New(r) = q.enqueue(new(&h, 8)).unwrap() else {
                panic!("new")
            };
            assert_eq!(segment_files(&path).len(), 1, "the users went to a segment");
            let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
            assert_eq!(claimed.len(), 2);
            let dead_users = stored(&claimed[1]).unwrap();
            assert_eq!(
                crate::dispatch::user::parse_stored(&dead_users)
                    .unwrap()
                    .len(),
                4
            );
            q.record(vec![
                completion(&claimed[0], After::Done),
                completion(&claimed[1], After::Dead),
            ])
            .unwrap();
            (r.dispatch_id, claimed[1].id.clone(), dead_users)
        };
        // The writer that appended to it is gone: the next one sweeps it, since no batch points
        // into it any more (the dead batch's users moved into the queue file).
        let q = Queue::open(&path).unwrap();
        assert_eq!(wait_for_segments(&path, 0), Vec::<String>::new());
        assert_eq!(q.replay(&[], None).unwrap(), std::slice::from_ref(&dead_id));
        let again = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, dead_id);
        assert_eq!(stored(&again[0]).unwrap(), dead_users);
        let s = q.dispatch(&delivered).unwrap().unwrap();
        assert_eq!((s.delivered, s.pending), (4, 4));
    }

    /// When the writer last swept the segment files, as it recorded it.
    fn swept_at(q: &Queue) -> Option<String> {
        lock(&q.work)
            .query_row(
                "SELECT value FROM meta WHERE key = 'segments_swept_at'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap()
    }

    /// Waits (at most 10 s) until no one holds the lock of the segment file at `path` (a writer
    /// holds it while it may append, a sweep from before it reads the rows until the file is
    /// deleted or kept); returns the file, locked.
    fn lock_segment(path: &Path) -> std::fs::File {
        let file = std::fs::File::open(path)
            .unwrap_or_else(|e| panic!("the segment {}: {e}", path.display()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while file.try_lock().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} stayed locked",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        file
    }

    #[test]
    fn a_segment_a_pending_batch_points_into_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let h = head(None);
        let swept = {
            let q = Queue::open(&path).unwrap();
            q.enqueue(new(&h, 3)).unwrap();
            swept_at(&q)
        };
        let files = segment_files(&path);
        assert_eq!(files.len(), 1, "{files:?}");
        let segment = super::super::segments::dir_of(&path).join(&files[0]);
        // Its writer is gone once its lock is free: the next writer's sweep looks at it.
        drop(lock_segment(&segment));
        let q = Queue::open(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while swept_at(&q) == swept {
            assert!(std::time::Instant::now() < deadline, "no sweep ran");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A sweep keeps the lock of a file it deletes until the file is gone: with the lock ours,
        // that sweep is over, and the file is still there.
        let locked = lock_segment(&segment);
        assert_eq!(segment_files(&path), files);
        drop(locked);
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            crate::dispatch::user::parse_stored(&stored(&claimed[0]).unwrap())
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn a_missing_segment_is_an_error_on_its_batch_not_on_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let h = head(None);
        drop({
            let q = Queue::open(&path).unwrap();
            q.enqueue(new(&h, 2)).unwrap();
            q
        });
        for f in segment_files(&path) {
            std::fs::remove_file(super::super::segments::dir_of(&path).join(f)).unwrap();
        }
        let q = Queue::open(&path).unwrap();
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 1);
        let e = stored(&claimed[0]).unwrap_err();
        assert!(e.contains("cannot be read from"), "{e}");
        assert!(e.contains("queue.db-payloads"), "{e}");
    }

    #[test]
    fn batches_stored_by_an_older_version_are_read_from_the_queue_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let old_users = crate::dispatch::user::store(users(2).into_iter());
        {
            // The file as format 2 left it: no segment columns, users in `payloads`, no replays
            // and no daemon lease.
            let conn = Connection::open(&path).unwrap();
            let old = MIGRATION
                .replace(
                    "updated_at  INTEGER NOT NULL,\n    segment     INTEGER,\n    seg_offset  INTEGER,\n    seg_length  INTEGER,\n    attempt_base INTEGER NOT NULL DEFAULT 0 -- attempts made before the last replay\n",
                    "updated_at  INTEGER NOT NULL\n",
                )
                .replace(
                    "started_at TEXT NOT NULL,\n    lease_id   TEXT,   -- NULL from a touchctl before leases\n    expires_at INTEGER -- ms since the epoch\n",
                    "started_at TEXT NOT NULL\n",
                )
                .replace(
                    "created_at      INTEGER NOT NULL,\n    message         TEXT -- JSON of the trigger's channel message; NULL when it has none\n",
                    "created_at      INTEGER NOT NULL\n",
                );
            assert!(!old.contains("seg_offset") && !old.contains("attempt_base"));
            assert!(!old.contains("message"), "the file has no message column");
            assert!(!old.contains("lease_id"));
            conn.execute_batch(&old).unwrap();
            conn.execute_batch(
                "INSERT INTO meta VALUES ('format', '2');
                 INSERT INTO dispatches VALUES ('d1', 'sms', 'c1', NULL, '{}', 1, '{}', 0);
                 INSERT INTO batches (id, dispatch_id, idx, count, touchpoint, size, remaining, state, next_at, created_at, updated_at)
                     VALUES ('d1_0', 'd1', 0, 1, 'sms', 2, 2, 'pending', 0, 0, 0);",
            )
            .unwrap();
            conn.execute("INSERT INTO payloads VALUES ('d1_0', ?1)", [&old_users])
                .unwrap();
        }
        let q = Queue::open(&path).unwrap();
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(stored(&claimed[0]).unwrap(), old_users);
        q.record(vec![completion(&claimed[0], After::Done)])
            .unwrap();
        assert_eq!(q.pending_recipients(), 0);
        let format: String = lock(&q.work)
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(format, FORMAT.to_string());
    }

    #[test]
    fn delivered_dispatches_are_forgotten_after_the_retention() {
        let (_d, q) = open();
        let h = head(Some("k1"));
        let Enqueued::New(r) = q.enqueue(new(&h, 6)).unwrap() else {
            panic!("new")
        };
        let now = now_ms();
        let all = q.claim(now, 10, &[], &[]).unwrap();
        let done: Vec<Completion> = all
            .iter()
            .map(|c| Completion {
                batch_id: c.id.clone(),
                attempt: 1,
                generation: 1,
                started_ms: now,
                latency_ms: 1,
                status: Some(200),
                recipients: c.remaining,
                delivered: c.remaining,
                failed: vec![Rejected {
                    user_id: "u0".into(),
                    reason: "no".into(),
                }],
                remaining: None,
                after: After::Done,
                error: None,
            })
            .collect();
        q.record(done).unwrap();
        assert_eq!(q.prune(now - 1, 100).unwrap(), 0, "not old enough");
        assert_eq!(q.prune(now_ms() + 1, 100).unwrap(), 1);
        assert!(q.dispatch(&r.dispatch_id).unwrap().is_none());
        assert!(q.history(&all[0].id).unwrap().0.is_empty());
        let conn = lock(&q.work);
        for table in ["dispatches", "batches", "attempts", "failures", "payloads"] {
            let n: i64 = conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 0, "{table}");
        }
        drop(conn);
        // The key is free again.
        assert!(matches!(q.enqueue(new(&h, 1)).unwrap(), Enqueued::New(_)));
    }

    #[test]
    fn a_queue_file_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        drop(Queue::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let format: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(format, FORMAT.to_string(), "a new file is marked");
        // A file from before the format was recorded is marked when opened.
        conn.execute("DELETE FROM meta WHERE key = 'format'", [])
            .unwrap();
        drop(Queue::open(&path).unwrap());
        let marked: i64 = conn
            .query_row("SELECT count(*) FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(marked, 1);
        for newer in [(FORMAT + 1).to_string(), "x".to_string()] {
            conn.execute("UPDATE meta SET value = ?1 WHERE key = 'format'", [&newer])
                .unwrap();
            let err = Queue::open(&path).err().expect("refused").to_string();
            assert!(
                err.contains(&format!(
                    "has format {newer}, newer than this touchctl understands ({FORMAT})"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn idempotency_keys_return_the_first_receipt() {
        let (_d, q) = open();
        let h = head(Some("k1"));
        let Enqueued::New(first) = q.enqueue(new(&h, 5)).unwrap() else {
            panic!("new")
        };
        assert_eq!(
            q.enqueue(new(&h, 7)).unwrap(),
            Enqueued::Repeat(first.clone())
        );
        assert_eq!(q.pending_recipients(), 5);
        let mut other = head(Some("k1"));
        other.campaign = "c2".into();
        assert!(matches!(
            q.enqueue(new(&other, 1)),
            Err(QueueError::IdempotencyConflict { .. })
        ));
    }

    #[test]
    fn held_batches_wait_and_everything_pending_is_due_after_a_restart() {
        let (d, q) = open();
        let h = head(None);
        q.enqueue(new(&h, 8)).unwrap();
        assert_eq!(q.hold("sms", Some("paused")).unwrap(), 2);
        assert!(q.claim(now_ms(), 10, &[], &[]).unwrap().is_empty());
        assert_eq!(q.stats().unwrap().held_batches, 2);
        q.hold("sms", None).unwrap();
        assert_eq!(q.claim(now_ms(), 1, &[], &[]).unwrap().len(), 1);
        drop(q);
        let q = Queue::open(&d.path().join("q/queue.db")).unwrap();
        assert_eq!(q.pending_recipients(), 8);
        assert_eq!(q.claim(now_ms(), 10, &[], &[]).unwrap().len(), 2);
    }

    #[test]
    fn a_batch_whose_recipients_all_failed_is_failed_not_delivered() {
        let (_d, q) = open();
        let h = head(None);
        let Enqueued::New(r) = q.enqueue(new(&h, 8)).unwrap() else {
            panic!("new")
        };
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        let refused = |c: &Claimed, ids: &[&str], after: After| Completion {
            delivered: 0,
            failed: ids
                .iter()
                .map(|id| Rejected {
                    user_id: id.to_string(),
                    reason: "number on the blocklist".into(),
                })
                .collect(),
            remaining: (after != After::Done).then(|| (Vec::new(), 2)),
            ..completion(c, after)
        };
        // Batch 0: every recipient fails in its one attempt. Batch 1: two fail for good, two are
        // retried, and fail for good in the second attempt.
        q.record(vec![
            refused(&claimed[0], &["u0", "u1", "u2", "u3"], After::Done),
            refused(&claimed[1], &["u4", "u5"], After::RetryAt(now_ms())),
        ])
        .unwrap();
        let again = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(again.len(), 1);
        q.record(vec![refused(&again[0], &["u6", "u7"], After::Done)])
            .unwrap();
        let state = |id: &str| {
            q.batches(&Filter::default())
                .unwrap()
                .into_iter()
                .find(|b| b.id == id)
                .map(|b| (b.state, b.delivered, b.failed))
                .unwrap()
        };
        assert_eq!(state(&claimed[0].id), ("failed".to_string(), 0, 4));
        assert_eq!(state(&claimed[1].id), ("failed".to_string(), 0, 4));
        let (attempts, _) = q.history(&claimed[1].id).unwrap();
        let outcomes: Vec<&str> = attempts.iter().map(|a| a.outcome.as_str()).collect();
        assert_eq!(outcomes, ["partial", "failed"]);
        let s = q.dispatch(&r.dispatch_id).unwrap().unwrap();
        assert_eq!((s.batches.failed, s.batches.delivered), (2, 0));
        assert_eq!((s.delivered, s.failed, s.pending), (0, 8, 0));
        assert!(s.finished);
        let failed_only = Filter {
            state: Some("failed".into()),
            ..Filter::default()
        };
        assert_eq!(q.batches(&failed_only).unwrap().len(), 2);
    }

    #[test]
    fn an_interrupted_attempt_is_logged_and_its_batch_stays_due() {
        let (_d, q) = open();
        let h = head(None);
        q.enqueue(new(&h, 4)).unwrap();
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        let cut = Completion {
            status: None,
            error: Some("interrupted".into()),
            ..completion(&claimed[0], After::Interrupted)
        };
        q.record(vec![cut]).unwrap();
        let again = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(again.len(), 1, "due at once");
        assert_eq!((again[0].attempts, again[0].remaining), (1, 4));
        assert_eq!(stored(&again[0]).unwrap(), stored(&claimed[0]).unwrap());
        q.record(vec![completion(&again[0], After::Done)]).unwrap();
        let (attempts, _) = q.history(&claimed[0].id).unwrap();
        let outcomes: Vec<(u32, &str)> = attempts
            .iter()
            .map(|a| (a.attempt, a.outcome.as_str()))
            .collect();
        assert_eq!(outcomes, [(1, "interrupted"), (2, "delivered")]);
        assert_eq!(q.pending_recipients(), 0);
    }

    #[test]
    fn batches_parked_for_centuries_or_all_failed_and_called_delivered_are_repaired_on_open() {
        let (d, q) = open();
        let h = head(None);
        q.enqueue(new(&h, 12)).unwrap();
        drop(q);
        let path = d.path().join("q/queue.db");
        {
            // As an older version left them: one batch parked until 2999, one held there, and one
            // whose every recipient failed recorded as delivered.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "DELETE FROM meta WHERE key = 'repaired';
                 UPDATE batches SET next_at = 32503680000000 WHERE idx IN (0, 1);
                 UPDATE batches SET held = 'paused' WHERE idx = 1;
                 UPDATE batches SET state = 'delivered', delivered = 0, failed = 4, remaining = 0 WHERE idx = 2;",
            )
            .unwrap();
        }
        let before = now_ms();
        let q = Queue::open(&path).unwrap();
        let batches = q.batches(&Filter::default()).unwrap();
        let by_index = |i: u32| batches.iter().find(|b| b.index == i).unwrap();
        let latest = before + 86_400_000;
        for i in [0, 1] {
            let next = by_index(i).next_at.unwrap();
            assert!((before..=latest + 60_000).contains(&next), "{i}: {next}");
        }
        assert_eq!(by_index(2).state, "failed");
        // Once per file: a later open leaves what it finds.
        drop(q);
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE batches SET next_at = 32503680000000 WHERE idx = 0",
                [],
            )
            .unwrap();
        let q = Queue::open(&path).unwrap();
        let batches = q.batches(&Filter::default()).unwrap();
        let parked = batches.iter().find(|b| b.index == 0).unwrap();
        assert_eq!(parked.next_at, Some(32_503_680_000_000));
    }
}
