//! The sender's side: claiming due batches (from memory when just queued), when the next is due,
//! holding and deferring a touchpoint's batches, and what an attempt reports back.

use rusqlite::params;

use super::writer::Work;
use super::{QueueError, SqliteQueue, json_list, lock};
use crate::dispatch::Rejected;
use crate::dispatch::fresh::Wire;
use crate::dispatch::segments::Span;

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
    /// In their stored form (see [`crate::dispatch::stored::store`]), or why they cannot be read.
    Stored(Result<Vec<u8>, String>),
    /// As written on the wire when the batch was queued by this process (see [`crate::dispatch::fresh`]),
    /// not read from storage. Their stored form is where [`At`] says, read with
    /// [`super::Queue::read_users`] when needed.
    Fresh(Wire, At),
}

/// Where a batch claimed from memory keeps its stored users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum At {
    /// In a segment file of the SQLite queue (a batch whose users are rewritten stops pointing
    /// into its segment, so the span is the batch's users as claimed).
    Segment(Span),
    /// In the batch's row (the PostgreSQL queue).
    Row(String),
}

impl Users {
    /// The stored form, reading it when the batch was claimed from memory.
    pub fn stored(self, queue: &super::Queue) -> Result<Vec<u8>, String> {
        match self {
            Users::Stored(users) => users,
            Users::Fresh(_, at) => queue.read_users(&at),
        }
    }
}

/// What one claim may take per touchpoint, for a queue shared by several daemons (PostgreSQL):
/// the limits hold across all of them. The SQLite queue's one daemon paces itself and ignores
/// them.
#[derive(Clone, Debug, Default)]
pub struct Lanes {
    /// Batches of one touchpoint being sent at once, by every daemon together.
    pub concurrency: usize,
    /// Requests per second per touchpoint, for the touchpoints that have a `rate_limit`.
    pub rates: Vec<(String, f64)>,
}

/// What a claim took.
#[derive(Debug, Default)]
pub struct Claim {
    /// The batches, oldest due first.
    pub batches: Vec<Claimed>,
    /// When to ask again (ms since the epoch) for batches that are due but were left because
    /// their touchpoint is at its concurrency or rate limit across the cluster (PostgreSQL only):
    /// a batch sent by another daemon frees a place without telling this one.
    pub capped_until: Option<i64>,
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

impl Completion {
    /// What the record writes: the batch's state, the attempt's outcome, and when the batch is due
    /// again if that changes (`None` keeps `next_at`: an interrupted batch was due at or before its
    /// claim, so it is due at once). A batch finished with every recipient failed is `delivered`
    /// here, and turned `failed` by the record when nothing was delivered in any attempt.
    pub(super) fn written(&self) -> (&'static str, &'static str, Option<i64>) {
        let partial = self.delivered > 0 || !self.failed.is_empty();
        match self.after {
            After::Done if self.delivered == 0 && !self.failed.is_empty() => {
                ("delivered", "failed", None)
            }
            After::Done => ("delivered", "delivered", None),
            After::RetryAt(at) if partial => ("pending", "partial", Some(at)),
            After::RetryAt(at) => ("pending", "retry", Some(at)),
            After::Dead => ("dead", "dead", None),
            After::Interrupted => ("pending", "interrupted", None),
            After::Parked(_) => ("pending", "held", None),
            After::Deferred(at) => ("pending", "deferred", Some(at)),
        }
    }
}

/// The users of `users` in batches of `size`, each in its stored form with its count.
pub(super) fn stored_batches(
    users: &[&crate::dispatch::trigger::UserRef<'_>],
    size: usize,
) -> Vec<(usize, Vec<u8>)> {
    users
        .chunks(size.max(1))
        .map(|c| (c.len(), crate::dispatch::stored::store(c.iter().copied())))
        .collect()
}

/// Due batches with what sending them needs, oldest due first (see [`SqliteQueue::claim`]).
pub(super) const CLAIM: &str = "SELECT b.id, b.dispatch_id, b.idx, b.count, b.touchpoint, p.users, b.remaining, b.attempts, d.campaign, d.template_params, \
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

pub(super) fn span_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Span>> {
    span_at(r, 0)
}

impl SqliteQueue {
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
                        Some(wire) => Users::Fresh(wire, At::Segment(span)),
                        None => Users::Stored(self.segments.read(span)),
                    };
                }
                c
            })
            .collect())
    }

    /// When the earliest pending, unheld batch not of a touchpoint in `skip` and not in `busy` is
    /// due (the same filters as [`SqliteQueue::claim`]).
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
}
