//! The queue's unit tests: storing, claiming and recording batches, replays, the daemon slot,
//! segment files and their sweep, older file formats and their repair.

use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::claim::CLAIM;
use super::*;
use crate::dispatch::trigger::UserRef;
use crate::dispatch::{Rejected, TriggerHead};

fn head(key: Option<&str>) -> TriggerHead {
    TriggerHead {
        touchpoint: "sms".into(),
        campaign: "c1".into(),
        idempotency_key: key.map(str::to_string),
        template_params: json!({"text": "hi"}).as_object().cloned().unwrap(),
        ..TriggerHead::default()
    }
}

/// `n` users `u0..`, parsed as a trigger's are (leaked: they live as long as the test).
pub(super) fn users(n: usize) -> Vec<&'static UserRef<'static>> {
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
    let parsed = crate::dispatch::stored::parse_users_json(text.as_bytes()).unwrap();
    Vec::leak(parsed).iter().collect()
}

fn open() -> (tempfile::TempDir, SqliteQueue) {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::open(&dir.path().join("q/queue.db")).unwrap();
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
        let Users::Fresh(wire, At::Segment(span)) = &c.users else {
            panic!("batch {i} read from disk")
        };
        assert_eq!(c.id, format!("{}_{i}", r.dispatch_id));
        assert_eq!(wire.generation, 7);
        assert_eq!(wire.count, c.remaining);
        // The same users as the stored form at the span.
        let on_disk = q.read_span(*span).unwrap();
        let ids: Vec<String> = crate::dispatch::stored::parse_stored(&on_disk)
            .unwrap()
            .iter()
            .map(|u| u.id.to_string())
            .collect();
        assert_eq!(wire.recipients, ids.join(",").into_bytes());
        assert_eq!(
            c.users
                .clone()
                .stored(&Queue::Sqlite(SqliteQueue::open(q.path()).unwrap()))
                .unwrap(),
            on_disk
        );
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
        let q = SqliteQueue::open(&path).unwrap();
        let Enqueued::New(r) = q.enqueue(new(&h, 8)).unwrap() else {
            panic!("new")
        };
        assert_eq!(segment_files(&path).len(), 1, "the users went to a segment");
        let claimed = q.claim(now_ms(), 10, &[], &[]).unwrap();
        assert_eq!(claimed.len(), 2);
        let dead_users = stored(&claimed[1]).unwrap();
        assert_eq!(
            crate::dispatch::stored::parse_stored(&dead_users)
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
    let q = SqliteQueue::open(&path).unwrap();
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
fn swept_at(q: &SqliteQueue) -> Option<String> {
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
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("the segment {}: {e}", path.display()));
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
        let q = SqliteQueue::open(&path).unwrap();
        q.enqueue(new(&h, 3)).unwrap();
        swept_at(&q)
    };
    let files = segment_files(&path);
    assert_eq!(files.len(), 1, "{files:?}");
    let segment = super::super::segments::dir_of(&path).join(&files[0]);
    // Its writer is gone once its lock is free: the next writer's sweep looks at it.
    drop(lock_segment(&segment));
    let q = SqliteQueue::open(&path).unwrap();
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
        crate::dispatch::stored::parse_stored(&stored(&claimed[0]).unwrap())
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
        let q = SqliteQueue::open(&path).unwrap();
        q.enqueue(new(&h, 2)).unwrap();
        q
    });
    for f in segment_files(&path) {
        std::fs::remove_file(super::super::segments::dir_of(&path).join(f)).unwrap();
    }
    let q = SqliteQueue::open(&path).unwrap();
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
    let old_users = crate::dispatch::stored::store(users(2).into_iter());
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
    let q = SqliteQueue::open(&path).unwrap();
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
    drop(SqliteQueue::open(&path).unwrap());
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
    drop(SqliteQueue::open(&path).unwrap());
    let marked: i64 = conn
        .query_row("SELECT count(*) FROM meta WHERE key = 'format'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(marked, 1);
    for newer in [(FORMAT + 1).to_string(), "x".to_string()] {
        conn.execute("UPDATE meta SET value = ?1 WHERE key = 'format'", [&newer])
            .unwrap();
        let err = SqliteQueue::open(&path).err().expect("refused").to_string();
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
    let q = SqliteQueue::open(&d.path().join("q/queue.db")).unwrap();
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
    let q = SqliteQueue::open(&path).unwrap();
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
    let q = SqliteQueue::open(&path).unwrap();
    let batches = q.batches(&Filter::default()).unwrap();
    let parked = batches.iter().find(|b| b.index == 0).unwrap();
    assert_eq!(parked.next_at, Some(32_503_680_000_000));
}
