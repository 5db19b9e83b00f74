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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use super::*;
    use crate::channel::Signal;
    use crate::channel::custom::CustomChannel;
    use crate::dispatch::worker::Target;
    use crate::model::{CustomSpec, Secret};

    /// A directory of fixed answers.
    struct Fixed(HashMap<String, Lookup>);

    impl Directory for Fixed {
        fn lookup(&self, touchpoint: &str) -> Lookup {
            self.0
                .get(touchpoint)
                .cloned()
                .unwrap_or_else(|| Lookup::Held(Why::Gone, "gone".into()))
        }
        fn signal(&self, _: &str, _: u64, _: &Signal) {}
        fn ids(&self) -> Vec<String> {
            self.0.keys().cloned().collect()
        }
    }

    fn sms() -> Arc<Target> {
        let spec: CustomSpec = toml::from_str(
            r#"
url = "https://sms.example.com/hook"
auth_token = { env = "UNUSED" }
batch_size = 2
[dynamic_params]
phone = "user.phone"
[[template_params]]
name = "text"
type = "string"
"#,
        )
        .unwrap();
        Arc::new(Target {
            id: "sms".into(),
            generation: 3,
            mapping: crate::dispatch::recipient::Mapping::new(&spec.dynamic_params),
            channel: Arc::new(CustomChannel::new(spec, Secret::new("t"), None)),
        })
    }

    fn directory() -> Fixed {
        Fixed(HashMap::from([
            ("sms".to_string(), Lookup::Ready(sms())),
            (
                "paused-sms".to_string(),
                Lookup::Held(Why::Paused, "paused through the API".into()),
            ),
            (
                "held-oa".to_string(),
                Lookup::Held(Why::Platform, "held by the platform: 40125".into()),
            ),
            (
                "slow-sms".to_string(),
                Lookup::Waiting {
                    target: sms(),
                    until: i64::MAX,
                    reason: "waiting: 45011".into(),
                },
            ),
        ]))
    }

    fn trigger(touchpoint: &str, key: Option<&str>, text: Option<&str>, users: &str) -> Vec<u8> {
        let mut t = serde_json::json!({"touchpoint": touchpoint, "campaign": "c", "users": []});
        if let Some(k) = key {
            t["idempotency_key"] = k.into();
        }
        if let Some(text) = text {
            t["template_params"] = serde_json::json!({ "text": text });
        }
        t["users"] = serde_json::from_str(users).unwrap();
        serde_json::to_vec(&t).unwrap()
    }

    const USERS: &str = r#"[{"user_id": "u1", "attributes": {"phone": "1"}},
        {"user_id": "u2", "attributes": {}},
        {"user_id": "u1", "attributes": {"phone": "1"}},
        {"user_id": "u3", "attributes": {"phone": "3"}},
        {"user_id": "u4", "attributes": {"phone": "4"}}]"#;

    fn take_bytes(
        q: &Queue,
        d: &dyn Directory,
        max: u64,
        body: &[u8],
    ) -> Result<Intake, IntakeError> {
        let t = RawTrigger::from_json(body).unwrap();
        let mut done = false;
        let r = take(q, d, max, &t, || done = true);
        // The CPU work is declared done when a new trigger is being stored, and only then.
        match &r {
            Ok(i) if !i.replayed => assert!(done, "cpu_done not called for a stored trigger"),
            Err(IntakeError::Queue(_)) | Ok(_) => {}
            Err(e) => assert!(!done, "cpu_done called before a refusal: {e}"),
        }
        r
    }

    fn queue() -> (tempfile::TempDir, Queue) {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db")).unwrap();
        (dir, q)
    }

    #[test]
    fn a_trigger_is_screened_and_batched_by_its_channel_without_http() {
        let (_d, q) = queue();
        let got = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("sms", None, Some("hi"), USERS),
        )
        .unwrap();
        assert!(!got.replayed);
        assert_eq!((got.accepted, got.rejected), (3, 2));
        // Three users in batches of the channel's size (2).
        assert_eq!(got.receipt.batches, 2);
        let reasons: Vec<&str> = got
            .receipt
            .rejected
            .iter()
            .map(|r| r.reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            [
                "missing attribute `phone` (dynamic param `phone`)",
                "the same `user_id` appears earlier in this trigger"
            ]
        );
        // A touchpoint waiting on its platform still takes triggers.
        let waiting = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("slow-sms", None, Some("hi"), USERS),
        )
        .unwrap();
        assert_eq!(waiting.accepted, 3);
    }

    #[test]
    fn the_same_idempotency_key_answers_the_first_receipt_and_queues_nothing() {
        let (_d, q) = queue();
        let first = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("sms", Some("k1"), Some("hi"), USERS),
        )
        .unwrap();
        let pending = q.pending_recipients();
        let again = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("sms", Some("k1"), Some("hi"), USERS),
        )
        .unwrap();
        assert!(again.replayed);
        assert_eq!(again.receipt, first.receipt);
        assert_eq!(q.pending_recipients(), pending);
        let other = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("slow-sms", Some("k1"), Some("hi"), USERS),
        )
        .unwrap_err();
        assert!(
            matches!(
                other,
                IntakeError::Queue(QueueError::IdempotencyConflict { .. })
            ),
            "{other}"
        );
        let bad = take_bytes(
            &q,
            &directory(),
            1000,
            &trigger("sms", Some(""), Some("hi"), USERS),
        )
        .unwrap_err();
        assert!(matches!(bad, IntakeError::BadIdempotencyKey(_)), "{bad}");
    }

    #[test]
    fn each_refusal_says_why() {
        let (_d, q) = queue();
        let d = directory();
        match take_bytes(&q, &d, 1000, &trigger("smss", None, Some("hi"), USERS)) {
            Err(IntakeError::UnknownTouchpoint { id, hint }) => {
                assert_eq!(id, "smss");
                assert_eq!(hint, "; did you mean `sms`?");
            }
            other => panic!("{other:?}"),
        }
        for (tp, why) in [("paused-sms", Why::Paused), ("held-oa", Why::Platform)] {
            match take_bytes(&q, &d, 1000, &trigger(tp, None, Some("hi"), USERS)) {
                Err(IntakeError::NotAccepting { why: w, .. }) => assert_eq!(w, why),
                other => panic!("{tp}: {other:?}"),
            }
        }
        match take_bytes(&q, &d, 1000, &trigger("sms", None, None, USERS)) {
            Err(IntakeError::BadTemplate { problems, .. }) => {
                assert_eq!(problems, ["template param `text` is required"]);
            }
            other => panic!("{other:?}"),
        }
        match take_bytes(&q, &d, 4, &trigger("sms", None, Some("hi"), USERS)) {
            Err(IntakeError::QueueFull { pending: 0, max: 4 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(q.pending_recipients(), 0, "nothing refused was queued");
    }
}
