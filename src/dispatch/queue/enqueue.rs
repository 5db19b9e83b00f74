//! Storing triggers: what a trigger is answered, building its batches on the caller's thread and
//! handing them to the writer, and keeping their recipients in memory for the sender.

use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use super::writer::{Job, Work};
use super::{QueueError, SqliteQueue, batch_id, lock, new_id};
use crate::dispatch::fresh::{Fresh, Wire};
use crate::dispatch::trigger::UserRef;
use crate::dispatch::{Rejected, TriggerHead};

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
    /// for the sender (see [`crate::dispatch::fresh`]); called for each batch while the writer stores the
    /// trigger. `None` keeps nothing.
    pub wire: Option<&'a WireWriter<'a>>,
}

/// Writes a batch's recipients for the wire.
pub type WireWriter<'a> = dyn Fn(&[&UserRef<'_>]) -> Vec<u8> + 'a;

/// A trigger handed to the writer thread, not yet known to be on disk.
#[must_use = "the trigger is stored only once `wait` has answered"]
pub struct Storing<'q> {
    pub(super) fresh: &'q Fresh,
    pub(super) answer: std::sync::mpsc::Receiver<Result<Enqueued, QueueError>>,
    /// The id the trigger is stored under, if it is stored.
    pub(super) dispatch_id: String,
    /// How many of its batches, from the first, have their recipients kept in memory.
    pub(super) kept: usize,
}

impl Storing<'_> {
    /// Waits until the trigger is durable (fsync'd, or committed by PostgreSQL). If it was not
    /// stored (an error, or its idempotency key was used before), the recipients kept for its
    /// batches are let go.
    pub fn wait(self) -> Result<Enqueued, QueueError> {
        let enqueued = SqliteQueue::answer(self.answer);
        if !matches!(enqueued, Ok(Enqueued::New(_))) {
            for i in 0..self.kept {
                self.fresh.take(&batch_id(&self.dispatch_id, i));
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

impl SqliteQueue {
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

    /// The CPU part of [`SqliteQueue::enqueue`]: builds the batches, hands them to the writer thread
    /// and writes the recipients for the wire while it stores them. [`Storing::wait`] then waits
    /// for the disk, which takes no CPU: a caller that limits how many triggers are worked on at
    /// once can let the next one start in between.
    pub fn begin_enqueue(&self, d: NewDispatch<'_>) -> Result<Storing<'_>, QueueError> {
        // The batch texts are built here, on the caller's thread; the writer only writes.
        let batches = super::claim::stored_batches(&d.users, d.batch_size);
        let dispatch_id = new_id("dsp");
        let job = Job {
            dispatch_id: dispatch_id.clone(),
            head: d.head.clone(),
            generation: d.generation,
            batches,
            accepted: d.users.len(),
            rejected: d.rejected.clone(),
            spans: Vec::new(),
        };
        let answer = self.send(|reply| Work::Enqueue(Box::new(job), reply))?;
        // Written while the writer stores the trigger and waits for the disk, and kept as each is
        // written: the rows become visible to the sender when the writer commits, and a batch
        // claimed before its entry is here is read from disk (the entry would then never be
        // taken). Only as many as the memory budget keeps (`put` says when it is taken): the
        // others are read from disk when sent.
        let kept = keep_fresh(&self.fresh, &d, &dispatch_id);
        Ok(Storing {
            fresh: &self.fresh,
            answer,
            dispatch_id,
            kept,
        })
    }
}

/// Writes the recipients of `d`'s batches for the wire and keeps them in `fresh` under their batch
/// ids, from the first, as long as the memory budget lets it; returns how many were kept.
pub(super) fn keep_fresh(fresh: &Fresh, d: &NewDispatch<'_>, dispatch_id: &str) -> usize {
    let size = d.batch_size.max(1);
    let mut kept = 0;
    if let Some(write) = d.wire {
        for batch in d.users.chunks(size) {
            let recipients = write(batch);
            let wire = Wire {
                generation: d.generation,
                recipients,
                count: batch.len() as u32,
            };
            if !fresh.put(batch_id(dispatch_id, kept), wire) {
                break;
            }
            kept += 1;
        }
    }
    kept
}
