//! Intake: the rules a trigger passes before it is stored, in the order a client meets them —
//! the idempotency key (a key seen before answers the first receipt and queues nothing), the
//! touchpoint (live, and accepting), its channel's check of the message and template params, room
//! in the queue, the screening of users (each a recipient, each once), and batching by the
//! channel's batch size. The HTTP API only translates: bytes in, [`Intake`] or [`IntakeError`] out.

use super::check_idempotency_key;
use super::queue::{Enqueued, NewDispatch, Queue, QueueError, Receipt};
use super::recipient::recipients;
use super::trigger::{RawTrigger, UserRef, screen};
use super::worker::{Directory, Lookup, Why};

/// A trigger taken in.
#[derive(Debug)]
pub struct Intake {
    /// What the client is answered.
    pub receipt: Receipt,
    /// Whether it is the first answer to an idempotency key seen before (nothing was queued).
    pub replayed: bool,
    /// Users queued now (0 when replayed).
    pub accepted: usize,
    /// Users rejected now.
    pub rejected: usize,
}

/// Why a trigger was not taken in; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The idempotency key is not usable.
    #[error("{0}")]
    BadIdempotencyKey(String),
    /// No such live touchpoint.
    #[error("no live touchpoint `{id}`{hint}")]
    UnknownTouchpoint {
        /// The id given.
        id: String,
        /// `; did you mean ...?`, or empty.
        hint: String,
    },
    /// The touchpoint does not accept triggers now.
    #[error("touchpoint `{id}` does not accept dispatches now: {reason}")]
    NotAccepting {
        /// The touchpoint.
        id: String,
        /// Why, in a word.
        why: Why,
        /// Why, in words.
        reason: String,
    },
    /// The message or template params do not fit the touchpoint.
    #[error("the template params do not match touchpoint `{id}`: {}", problems.join("; "))]
    BadTemplate {
        /// The touchpoint.
        id: String,
        /// Every problem.
        problems: Vec<String>,
    },
    /// The queue is full.
    #[error("the queue holds {pending} recipients and takes at most {max}; try again later")]
    QueueFull {
        /// Recipients pending now.
        pending: u64,
        /// The limit.
        max: u64,
    },
    /// The queue refused or failed (an idempotency key used for another trigger included).
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Takes in a parsed trigger: checks it, stores it and waits until it is on disk. `cpu_done` is
/// called once the checking and writing of batches is done, before waiting for the disk (the
/// caller lets the next trigger start then).
pub fn take(
    queue: &Queue,
    directory: &dyn Directory,
    max_queued: u64,
    trigger: &RawTrigger<'_>,
    cpu_done: impl FnOnce(),
) -> Result<Intake, IntakeError> {
    let head = &trigger.head;
    if let Some(key) = &head.idempotency_key {
        check_idempotency_key(key).map_err(IntakeError::BadIdempotencyKey)?;
        if let Some((touchpoint, campaign, receipt)) = queue.find_idempotent(key)? {
            if touchpoint == head.touchpoint && campaign == head.campaign {
                return Ok(Intake {
                    receipt,
                    replayed: true,
                    accepted: 0,
                    rejected: 0,
                });
            }
            return Err(QueueError::IdempotencyConflict {
                key: key.clone(),
                touchpoint,
                campaign,
                dispatch_id: receipt.dispatch_id,
            }
            .into());
        }
    }
    let target = match directory.lookup(&head.touchpoint) {
        Lookup::Ready(t) | Lookup::Waiting { target: t, .. } => t,
        Lookup::Held(Why::Gone, _) => {
            let ids = directory.ids();
            let hint = crate::load::did_you_mean(&head.touchpoint, ids.iter().map(String::as_str))
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            return Err(IntakeError::UnknownTouchpoint {
                id: head.touchpoint.clone(),
                hint,
            });
        }
        Lookup::Held(why, reason) => {
            return Err(IntakeError::NotAccepting {
                id: head.touchpoint.clone(),
                why,
                reason,
            });
        }
    };
    target
        .channel
        .check(&head.message(), &head.template_params)
        .map_err(|problems| IntakeError::BadTemplate {
            id: head.touchpoint.clone(),
            problems,
        })?;
    let pending = queue.pending_recipients();
    if pending + trigger.users.len() as u64 > max_queued {
        return Err(IntakeError::QueueFull {
            pending,
            max: max_queued,
        });
    }
    let (accepted, rejected) = screen(&trigger.users, &target.mapping);
    let (n_accepted, n_rejected) = (accepted.len(), rejected.len());
    // The users are parsed now: each batch's recipients are written once, here, and kept in
    // memory for the sender, which then need not read them back from disk.
    let wire = |batch: &[&UserRef<'_>]| recipients(batch, &target.mapping);
    let storing = queue.begin_enqueue(NewDispatch {
        head,
        generation: target.generation,
        batch_size: target.channel.batch_size().max(1),
        users: accepted,
        rejected,
        wire: Some(&wire),
    })?;
    cpu_done();
    Ok(match storing.wait()? {
        Enqueued::New(receipt) => Intake {
            receipt,
            replayed: false,
            accepted: n_accepted,
            rejected: n_rejected,
        },
        Enqueued::Repeat(receipt) => Intake {
            receipt,
            replayed: true,
            accepted: 0,
            rejected: 0,
        },
    })
}
