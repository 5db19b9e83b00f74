//! The daemon slot: the one daemon working a queue file holds it as a lease it renews, taken over
//! once its process is gone or its lease expired (see [`crate::lease`]).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{QueueError, SqliteQueue, lock};
use crate::store::{self, now_ms};

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

/// This process's hold on the queue, from [`SqliteQueue::take_daemon_slot`].
#[derive(Clone, Debug)]
pub struct Taken {
    /// The random id of the hold, to renew and leave it.
    pub lease_id: String,
    /// The daemon taken over, and why it could be, if there was one.
    pub replaced: Option<(DaemonSlot, crate::lease::Standing)>,
}

impl SqliteQueue {
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
    /// must renew ([`SqliteQueue::renew_daemon_slot`]; see [`crate::lease`]). A hold whose process no
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
