//! The writer thread, through which every write goes, and what it writes: triggers (fsync'd),
//! attempt outcomes and pruning, grouped into shared transactions; and its sweep of the segment
//! files no batch points into any more.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::claim::span_of;
use super::{After, Completion, Enqueued, QueueError, Receipt, SqliteQueue, batch_id, writer_gone};
use crate::dispatch::segments::{Appender, Segments, Span};
use crate::dispatch::{Rejected, TriggerHead};
use crate::store::now_ms;

/// A trigger on its way to the writer thread.
pub(super) struct Job {
    /// Chosen before the job goes to the writer, so its batches' recipients can be kept in
    /// memory under their ids before the rows are committed (and so visible to the sender).
    pub(super) dispatch_id: String,
    pub(super) head: TriggerHead,
    pub(super) generation: u64,
    /// Users per batch and the batch's stored text.
    pub(super) batches: Vec<(usize, Vec<u8>)>,
    /// Where the writer put each batch's text.
    pub(super) spans: Vec<Span>,
    pub(super) accepted: usize,
    pub(super) rejected: Vec<Rejected>,
}

type Reply = std::sync::mpsc::SyncSender<Result<Enqueued, QueueError>>;

/// What the writer thread writes.
pub(super) enum Work {
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

/// Starts the writer thread of the queue file at `path` (shown as `shown` in errors) on `conn`,
/// its fsync'ing connection; work for it goes to the returned sender.
pub(super) fn spawn(
    conn: Connection,
    shown: &str,
    path: &Path,
    pending: Arc<AtomicI64>,
    segments: Arc<Segments>,
) -> std::io::Result<std::sync::mpsc::Sender<Work>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let w = Writer {
        conn,
        path: shown.to_string(),
        pending,
        appender: Appender::new(path),
        segments,
        swept: None,
        synchronous: "FULL",
    };
    std::thread::Builder::new()
        .name("queue-writer".into())
        .spawn(move || writer(w, rx))?;
    Ok(tx)
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
            let (state, outcome, next_at) = c.written();
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
/// transaction (see [`SqliteQueue::prune`]).
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

impl SqliteQueue {
    /// Hands work to the writer thread and waits for its answer.
    pub(super) fn submit<T>(
        &self,
        work: impl FnOnce(std::sync::mpsc::SyncSender<Result<T, QueueError>>) -> Work,
    ) -> Result<T, QueueError> {
        Self::answer(self.send(work)?)
    }

    /// Hands work to the writer thread; the answer comes on the returned channel.
    pub(super) fn send<T>(
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
    pub(super) fn answer<T>(
        answer: std::sync::mpsc::Receiver<Result<T, QueueError>>,
    ) -> Result<T, QueueError> {
        answer.recv().map_err(|_| writer_gone())?
    }

    /// Forgets up to `limit` dispatches whose batches were all delivered before `before` (ms since
    /// the epoch): their batches, attempts and failures go, and their idempotency keys may be used
    /// again. A dispatch with a pending or dead batch is kept, whatever its age. Returns how many
    /// were forgotten; the space they took is reused by later triggers.
    pub fn prune(&self, before: i64, limit: usize) -> Result<usize, QueueError> {
        // Through the writer thread, like every write: no connection waits on another's lock.
        self.submit(|reply| Work::Prune(before, limit, reply))
    }
}
