//! What the queue reports to an operator: a dispatch's progress, batch lists, a batch's attempts
//! and replays, counts over the whole queue; and replaying dead batches.

use std::sync::atomic::Ordering;

use rusqlite::{OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use super::{QueueError, Receipt, SqliteQueue, lock};
use crate::dispatch::Rejected;
use crate::store::now_ms;

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

impl SqliteQueue {
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
    /// is recorded (see [`SqliteQueue::replays`]).
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
}
