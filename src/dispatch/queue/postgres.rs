//! The queue in PostgreSQL, shared by every daemon whose `--state` names the database (the tables
//! are those of the registry's schema 2: see [`crate::registry::PostgresRegistry`]).
//!
//! # Accepting
//! A trigger is stored in one transaction (the dispatch row, then all its batches in one
//! statement, users and all) committed with `synchronous_commit = on` whatever the server's
//! default: the 202 comes after the commit is durable. The idempotency key is a unique column,
//! so a key is taken once across the cluster: of two daemons storing it at the same moment one
//! inserts, the other finds the first's receipt.
//!
//! # Claiming under leases
//! A daemon claims due batches for itself: `lease_owner` is its node id and `lease_until` the
//! database's clock plus the lease term (`--lease-ttl`, 30 s). Due candidates are read without a
//! lock, and the ones chosen are locked `FOR UPDATE SKIP LOCKED` as they are leased, so a claim
//! never waits on a row another transaction holds (a record in progress) and locks no row it does
//! not take (a row lock is a write, with its WAL). A batch whose lease has not expired is never
//! claimed: no batch is sent by two daemons at once while its
//! holder lives. The holder renews its leases with its heartbeat (six times a term); a daemon that
//! dies stops renewing, and once its leases expire the others take its batches over. Recording an
//! attempt ends the lease, and is fenced: a daemon records only the batches it still holds (one
//! whose lease lapsed and was taken over is the taker's now, and is sent again under the same
//! `webhook-id`).
//!
//! # Limits across the cluster
//! Claims are serialised by a transaction advisory lock ([`CLAIM_KEY`]) so that two daemons do
//! not both count the same free places: per touchpoint, a claim takes at most `concurrency` minus
//! the batches of that touchpoint leased by any daemon, and, for a touchpoint with a `rate_limit`,
//! at most the whole tokens of its bucket in `rate_buckets` (refilled at the rate, holding up to a
//! second's worth), which it spends. A claim is a few milliseconds, so serialising them costs
//! little; sending is not serialised. When due batches were left because their touchpoint was at
//! a limit, the claim says when to ask again ([`Claim::capped_until`]): another daemon finishing a
//! batch frees a place without telling this one.
//!
//! # Clocks
//! Leases, heartbeats and rate buckets use the database's clock, so daemons' clocks need not
//! agree for them. `next_at` (when a retry is due) is the daemon's clock, as in the SQLite queue.
//!
//! Attempt records and claims commit with `synchronous_commit = off`: like the SQLite queue's
//! bookkeeping, losing one to a crash of the server only means a batch is sent again with the same
//! `webhook-id`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_postgres::types::ToSql;

use super::claim::{At, Claim, Claimed, Completion, Lanes, Users};
use super::enqueue::{Enqueued, NewDispatch, Receipt, Storing, keep_fresh};
use super::report::{Attempt, BatchCounts, BatchInfo, DispatchStatus, Filter, Replay, Stats};
use super::{After, QueueError, batch_id, new_id};
use crate::dispatch::Rejected;
use crate::dispatch::fresh::Fresh;
use crate::registry::postgres::{chain, pooled};
use crate::registry::{PostgresRegistry, RegistryError};
use crate::store::now_ms;

/// The transaction advisory lock that serialises claims (`touchclm` in ASCII).
pub const CLAIM_KEY: i64 = 0x746f_7563_6863_6c6d;

/// The database's clock, in ms since the epoch.
const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// How many due candidates one claim reads at most.
const SCAN: i64 = 512;

/// How soon to ask again for due batches left at a concurrency limit.
const CAPPED_POLL_MS: i64 = 100;

/// A daemon of the cluster, as its row says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// Its id.
    pub node: String,
    /// Its host.
    pub host: String,
    /// Its process id.
    pub pid: i64,
    /// Where its API listens.
    pub listen: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its last heartbeat (ms since the epoch, the database's clock).
    pub heartbeat_at: i64,
    /// How long ago that was, by the database's clock when read (ms).
    pub heartbeat_age_ms: i64,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<i64>,
}

/// The PostgreSQL queue.
pub struct PostgresQueue {
    registry: Arc<PostgresRegistry>,
    /// This daemon's id: the owner of its leases.
    node: String,
    /// The lease term.
    lease: Duration,
    /// Pending recipients as last counted, plus those stored here since.
    pending: AtomicI64,
    /// Recipients of batches this daemon just stored, for its sender.
    fresh: Fresh,
}

/// A failed statement as a registry error (the pool's helpers speak that), naming the database.
fn pg(shown: &str) -> impl Fn(tokio_postgres::Error) -> RegistryError + '_ {
    move |e| RegistryError::Postgres {
        database: shown.to_string(),
        why: chain(&e),
    }
}

/// A registry error met by the queue.
fn queue_error(e: RegistryError) -> QueueError {
    match e {
        RegistryError::Postgres { database, why } => QueueError::Postgres { database, why },
        other => QueueError::Postgres {
            database: String::new(),
            why: other.to_string(),
        },
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

fn small(v: i32) -> u32 {
    v.max(0) as u32
}

/// One attempt's rows, as the record writes them.
struct Write {
    batch_id: String,
    number: i32,
    generation: i64,
    started_ms: i64,
    latency_ms: i64,
    status: Option<i32>,
    outcome: &'static str,
    recipients: i32,
    error: Option<String>,
    attempts: i32,
    delivered: i32,
    failed: i32,
    remaining: Option<i32>,
    state: &'static str,
    next_at: Option<i64>,
    now: i64,
    uncounted: bool,
    held: Option<String>,
    users: Option<Vec<u8>>,
    failed_users: Vec<String>,
    failed_reasons: Vec<String>,
}

impl Write {
    /// The rows of attempt `c` of a batch whose earlier attempts number `base`, at `now`.
    fn of(c: &Completion, base: i32, now: i64) -> Self {
        let (state, outcome, next_at) = c.written();
        let (users, remaining) = match &c.remaining {
            Some((json, n)) => (
                Some(json.clone()),
                Some(i32::try_from(*n).unwrap_or(i32::MAX)),
            ),
            None if c.after == After::Done => (None, Some(0)),
            None => (None, None),
        };
        Self {
            batch_id: c.batch_id.clone(),
            number: i32::try_from(c.attempt)
                .unwrap_or(i32::MAX)
                .saturating_add(base),
            generation: c.generation as i64,
            started_ms: c.started_ms,
            latency_ms: c.latency_ms,
            status: c.status.map(i32::from),
            outcome,
            recipients: i32::try_from(c.recipients).unwrap_or(i32::MAX),
            error: c.error.clone(),
            attempts: i32::try_from(c.attempt).unwrap_or(i32::MAX),
            delivered: i32::try_from(c.delivered).unwrap_or(i32::MAX),
            failed: i32::try_from(c.failed.len()).unwrap_or(i32::MAX),
            remaining,
            state,
            next_at,
            now,
            uncounted: matches!(c.after, After::Parked(_) | After::Deferred(_)),
            held: match &c.after {
                After::Parked(reason) => Some(reason.clone()),
                _ => None,
            },
            users,
            failed_users: c.failed.iter().map(|f| f.user_id.clone()).collect(),
            failed_reasons: c.failed.iter().map(|f| f.reason.clone()).collect(),
        }
    }
}

impl PostgresQueue {
    /// The queue in the database `registry` is connected to (its schema is migrated when the
    /// registry opens), worked by the daemon `node` with leases of term `lease`.
    pub fn open(
        registry: Arc<PostgresRegistry>,
        node: String,
        lease: Duration,
    ) -> Result<Self, QueueError> {
        let queue = Self {
            registry,
            node,
            lease,
            pending: AtomicI64::new(0),
            fresh: Fresh::default(),
        };
        queue.refresh_pending()?;
        Ok(queue)
    }

    /// This daemon's node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The database, without its password.
    pub fn describe(&self) -> String {
        format!("postgres {}", self.registry.shown())
    }

    /// Runs `f` with a pooled connection on the registry's runtime and waits for it.
    fn run<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, RegistryError>> + Send + 'static,
    {
        self.registry.with_client(f).map_err(queue_error)
    }

    /// Recipients pending (see [`PostgresQueue::refresh_pending`]).
    pub fn pending_recipients(&self) -> u64 {
        count(self.pending.load(Ordering::Relaxed))
    }

    /// Recounts the pending recipients of the whole cluster.
    pub fn refresh_pending(&self) -> Result<u64, QueueError> {
        let n: i64 = self.run(|c, shown| async move {
            c.query_one(
                "SELECT coalesce(sum(remaining), 0)::bigint FROM batches WHERE state = 'pending'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .map_err(pg(&shown))
        })?;
        self.pending.store(n, Ordering::Relaxed);
        Ok(count(n))
    }

    /// A batch's stored users.
    pub fn read_users(&self, id: &str) -> Result<Vec<u8>, String> {
        let id = id.to_string();
        self.run(move |c, shown| async move {
            c.query_opt("SELECT users FROM batches WHERE id = $1", &[&id])
                .await
                .map(|r| r.and_then(|r| r.get::<_, Option<Vec<u8>>>(0)))
                .map_err(pg(&shown))
        })
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the batch's users are missing".to_string())
    }

    /// Drops the recipients kept in memory longer than their age limit.
    pub fn expire_fresh(&self) {
        self.fresh.expire();
    }

    /// The batches kept in memory for the sender, and their bytes.
    pub fn fresh_usage(&self) -> (usize, usize) {
        self.fresh.usage()
    }

    /// Claims up to `limit` due batches for this daemon (see the module docs).
    pub fn claim(&self, limit: usize, skip: &[&str], lanes: &Lanes) -> Result<Claim, QueueError> {
        let node = self.node.clone();
        let lease = ms(self.lease);
        let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
        let lanes = lanes.clone();
        let limit = limit.min(256) as i64;
        let (mut claimed, capped_until) = self.run(move |c, shown| async move {
            let e = pg(&shown);
            // The transaction is begun, locked and read in one round trip, and its last writes
            // and commit go in another: statements sent together are pipelined.
            let body = async {
                let leased_stmt = c
                    .prepare_cached(&format!(
                        "WITH n AS (SELECT {DB_NOW} AS now) \
                         SELECT n.now, b.touchpoint, count(b.id) FROM n LEFT JOIN batches b \
                         ON b.lease_owner IS NOT NULL AND b.lease_until >= n.now AND b.state = 'pending' \
                         GROUP BY n.now, b.touchpoint"
                    ))
                    .await
                    .map_err(&e)?;
                let begin = format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; SELECT pg_advisory_xact_lock({CLAIM_KEY})"
                );
                let (began, leased_rows) =
                    tokio::join!(c.batch_execute(&begin), c.query(&leased_stmt, &[]));
                began.map_err(&e)?;
                let leased_rows = leased_rows.map_err(&e)?;
                let now: i64 = leased_rows.first().map(|r| r.get(0)).unwrap_or_else(now_ms);
                // Places taken: batches leased by any daemon.
                let mut leased = std::collections::HashMap::<String, i64>::new();
                for r in &leased_rows {
                    if let Some(tp) = r.get::<_, Option<String>>(1) {
                        leased.insert(tp, r.get(2));
                    }
                }
                // Tokens of the rate-limited touchpoints, refilled to now.
                let rated: Vec<String> = lanes.rates.iter().map(|(t, _)| t.clone()).collect();
                let mut stored_tokens = std::collections::HashMap::<String, (f64, i64)>::new();
                if !rated.is_empty() {
                    let stmt = c
                        .prepare_cached(
                            "SELECT touchpoint, tokens, at_ms FROM rate_buckets WHERE touchpoint = ANY($1) FOR UPDATE",
                        )
                        .await
                        .map_err(&e)?;
                    for r in c.query(&stmt, &[&rated]).await.map_err(&e)? {
                        stored_tokens.insert(r.get(0), (r.get(1), r.get(2)));
                    }
                }
                let mut tokens = std::collections::HashMap::<String, (f64, f64)>::new();
                for (tp, rate) in &lanes.rates {
                    let rate = rate.max(f64::MIN_POSITIVE);
                    let cap = rate.max(1.0);
                    let have = match stored_tokens.get(tp) {
                        Some((t, at)) => {
                            let elapsed = (now.saturating_sub(*at)).max(0) as f64 / 1000.0;
                            (t + elapsed * rate).min(cap)
                        }
                        None => cap,
                    };
                    tokens.insert(tp.clone(), (have, rate));
                }
                let concurrency = lanes.concurrency.max(1) as i64;
                let room = |tp: &str| -> i64 {
                    let places = concurrency - leased.get(tp).copied().unwrap_or(0);
                    match tokens.get(tp) {
                        Some((t, _)) => places.min(t.floor() as i64),
                        None => places,
                    }
                };
                let mut full: Vec<String> = leased
                    .keys()
                    .chain(tokens.keys())
                    .filter(|tp| room(tp) <= 0)
                    .cloned()
                    .collect();
                full.sort();
                full.dedup();
                let mut left_out = skip.clone();
                left_out.extend(full.iter().cloned());
                let stmt = c
                    .prepare_cached(
                        "SELECT id, touchpoint FROM batches \
                         WHERE state = 'pending' AND held IS NULL AND next_at <= $1 \
                         AND (lease_until IS NULL OR lease_until < $2) \
                         AND NOT (touchpoint = ANY($3)) \
                         ORDER BY next_at LIMIT $4",
                    )
                    .await
                    .map_err(&e)?;
                let candidates = c
                    .query(&stmt, &[&now_ms(), &now, &left_out, &SCAN])
                    .await
                    .map_err(&e)?;
                let mut taken = std::collections::HashMap::<String, i64>::new();
                let mut ids: Vec<String> = Vec::new();
                let mut capped = !full.is_empty();
                for r in &candidates {
                    if ids.len() as i64 >= limit {
                        break;
                    }
                    let id: String = r.get(0);
                    let tp: String = r.get(1);
                    let n = taken.entry(tp.clone()).or_insert(0);
                    if *n < room(&tp) {
                        *n += 1;
                        ids.push(id);
                    } else {
                        capped = true;
                    }
                }
                // The tokens spent, the leases, whether due batches were left at a limit, and
                // the commit: one round trip.
                let spend = c
                    .prepare_cached(
                        "INSERT INTO rate_buckets (touchpoint, tokens, at_ms) VALUES ($1, $2, $3) \
                         ON CONFLICT (touchpoint) DO UPDATE SET tokens = $2, at_ms = $3",
                    )
                    .await
                    .map_err(&e)?;
                let lease_stmt = c
                    .prepare_cached(
                        "UPDATE batches b SET lease_owner = $2, lease_until = $3 \
                         FROM dispatches d WHERE d.id = b.dispatch_id AND b.id IN ( \
                             SELECT id FROM batches WHERE id = ANY($1) AND state = 'pending' \
                             AND held IS NULL AND (lease_until IS NULL OR lease_until < $4) \
                             FOR UPDATE SKIP LOCKED) \
                         RETURNING b.id, b.dispatch_id, b.idx, b.count, b.touchpoint, b.remaining, b.attempts, \
                         d.campaign, d.template_params, d.message, b.next_at",
                    )
                    .await
                    .map_err(&e)?;
                let exists_stmt = c
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM batches WHERE state = 'pending' AND held IS NULL \
                         AND next_at <= $1 AND (lease_until IS NULL OR lease_until < $2) \
                         AND touchpoint = ANY($3) AND NOT (touchpoint = ANY($4)))",
                    )
                    .await
                    .map_err(&e)?;
                let spent: Vec<(String, f64)> = taken
                    .iter()
                    .filter_map(|(tp, n)| tokens.get(tp).map(|(have, _)| (tp.clone(), have - *n as f64)))
                    .collect();
                let client: &tokio_postgres::Client = &c;
                let spending = futures_util::future::try_join_all(spent.iter().map(|(tp, left)| {
                    let (spend, now) = (&spend, &now);
                    async move { client.execute(spend, &[tp, left, now]).await }
                }));
                let until = now.saturating_add(lease);
                let leasing = async {
                    if ids.is_empty() {
                        Ok(Vec::new())
                    } else {
                        c.query(&lease_stmt, &[&ids, &node, &until, &now]).await
                    }
                };
                let watched: Vec<String> = full.iter().chain(taken.keys()).cloned().collect();
                let due_now = now_ms();
                let checking = async {
                    if capped {
                        c.query_one(&exists_stmt, &[&due_now, &now, &watched, &skip])
                            .await
                            .map(|r| r.get::<_, bool>(0))
                    } else {
                        Ok(false)
                    }
                };
                let (spent, rows, still, committed) =
                    tokio::join!(spending, leasing, checking, c.batch_execute("COMMIT"));
                spent.map_err(&e)?;
                let rows = rows.map_err(&e)?;
                let still = still.map_err(&e)?;
                committed.map_err(&e)?;
                // Whether the due batches left out are worth asking for again soon.
                let capped_until = still.then(|| {
                    // At a concurrency limit: ask again shortly. At a rate limit only: ask when
                    // the first bucket has a whole token again.
                    let places_full = watched.iter().any(|tp| {
                        concurrency - leased.get(tp).copied().unwrap_or(0)
                            <= taken.get(tp).copied().unwrap_or(0)
                    });
                    let token_wait = tokens
                        .iter()
                        .map(|(tp, (t, rate))| {
                            let left = t - taken.get(tp).copied().unwrap_or(0) as f64;
                            if left >= 1.0 {
                                0
                            } else {
                                ((1.0 - left) / rate * 1000.0).ceil() as i64
                            }
                        })
                        .filter(|w| *w > 0)
                        .min();
                    let wait = match (places_full, token_wait) {
                        (true, Some(w)) => w.min(CAPPED_POLL_MS),
                        (true, None) | (false, None) => CAPPED_POLL_MS,
                        (false, Some(w)) => w,
                    };
                    now_ms().saturating_add(wait.clamp(1, 1000))
                });
                let mut claimed: Vec<(i64, Claimed)> = rows
                    .iter()
                    .map(|r| {
                        (
                            r.get::<_, i64>(10),
                            Claimed {
                                id: r.get(0),
                                dispatch_id: r.get(1),
                                index: small(r.get(2)),
                                count: small(r.get(3)),
                                touchpoint: r.get(4),
                                users: Users::Stored(Err(String::new())),
                                remaining: small(r.get(5)),
                                attempts: small(r.get(6)),
                                campaign: r.get(7),
                                template_params: r.get(8),
                                message: r.get(9),
                            },
                        )
                    })
                    .collect();
                claimed.sort_by_key(|(at, _)| *at);
                Ok((
                    claimed.into_iter().map(|(_, c)| c).collect::<Vec<_>>(),
                    capped_until,
                ))
            };
            let out = body.await;
            if out.is_err() {
                // The connection goes back to the pool outside any transaction.
                let _ = c.batch_execute("ROLLBACK").await;
            }
            out
        })?;
        // Users kept in memory when this daemon stored the batch; the others read from their rows.
        let mut unread = Vec::new();
        for c in &mut claimed {
            match self.fresh.take(&c.id) {
                Some(wire) => c.users = Users::Fresh(wire, At::Row(c.id.clone())),
                None => unread.push(c.id.clone()),
            }
        }
        if !unread.is_empty() {
            let users: std::collections::HashMap<String, Option<Vec<u8>>> =
                self.run(move |c, shown| async move {
                    c.query(
                        &c.prepare_cached("SELECT id, users FROM batches WHERE id = ANY($1)")
                            .await
                            .map_err(pg(&shown))?,
                        &[&unread],
                    )
                    .await
                    .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
                    .map_err(pg(&shown))
                })?;
            for c in &mut claimed {
                if matches!(c.users, Users::Stored(_)) {
                    c.users = Users::Stored(
                        users
                            .get(&c.id)
                            .cloned()
                            .flatten()
                            .ok_or_else(|| "the batch's users are missing".to_string()),
                    );
                }
            }
        }
        Ok(Claim {
            batches: claimed,
            capped_until,
        })
    }

    /// When the earliest pending, unheld, unleased batch due after `now` and not of a touchpoint
    /// in `skip` is due.
    pub fn next_due(&self, now: i64, skip: &[&str]) -> Result<Option<i64>, QueueError> {
        let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
        self.run(move |c, shown| async move {
            c.query_one(
                "SELECT min(next_at) FROM batches WHERE state = 'pending' AND held IS NULL \
                 AND next_at > $1 AND NOT (touchpoint = ANY($2))",
                &[&now, &skip],
            )
            .await
            .map(|r| r.get(0))
            .map_err(pg(&shown))
        })
    }

    /// Renews this daemon's leases and its heartbeat; returns how many batches it holds.
    pub fn beat(&self) -> Result<u64, QueueError> {
        let (node, lease) = (self.node.clone(), ms(self.lease));
        self.run(move |c, shown| async move {
            let e = pg(&shown);
            c.execute(
                &format!("UPDATE nodes SET heartbeat_at = {DB_NOW}, stopped_at = NULL WHERE node = $1"),
                &[&node],
            )
            .await
            .map_err(&e)?;
            c.execute(
                &format!(
                    "UPDATE batches SET lease_until = {DB_NOW} + $2 WHERE lease_owner = $1 AND state = 'pending'"
                ),
                &[&node, &lease],
            )
            .await
            .map_err(&e)
        })
    }

    /// Writes this daemon's row in `nodes` (replacing one of the same id).
    pub fn register(&self, host: &str, listen: &str, started_at: &str) -> Result<(), QueueError> {
        let (node, host, listen, started_at) = (
            self.node.clone(),
            host.to_string(),
            listen.to_string(),
            started_at.to_string(),
        );
        let pid = i64::from(std::process::id());
        self.run(move |c, shown| async move {
            c.execute(
                &format!(
                    "INSERT INTO nodes (node, host, pid, listen, started_at, heartbeat_at) \
                     VALUES ($1, $2, $3, $4, $5, {DB_NOW}) ON CONFLICT (node) DO UPDATE SET \
                     host = $2, pid = $3, listen = $4, started_at = $5, heartbeat_at = {DB_NOW}, stopped_at = NULL"
                ),
                &[&node, &host, &pid, &listen, &started_at],
            )
            .await
            .map(|_| ())
            .map_err(pg(&shown))
        })
    }

    /// Marks this daemon stopped and lets go of its leases, so the others take its batches at
    /// once rather than after the lease term.
    pub fn leave(&self) -> Result<(), QueueError> {
        let node = self.node.clone();
        self.run(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            tx.execute(
                "UPDATE batches SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
                &[&node],
            )
            .await
            .map_err(&e)?;
            tx.execute(
                &format!("UPDATE nodes SET stopped_at = {DB_NOW} WHERE node = $1"),
                &[&node],
            )
            .await
            .map_err(&e)?;
            tx.commit().await.map_err(&e)
        })
    }

    /// The cluster's daemons: those that beat within `within`, or stopped within it, newest
    /// first. Rows older than a day are removed.
    pub fn nodes(&self, within: Duration) -> Result<Vec<Node>, QueueError> {
        let within = ms(within);
        self.run(move |c, shown| async move {
            let e = pg(&shown);
            c.execute(
                &format!("DELETE FROM nodes WHERE heartbeat_at < {DB_NOW} - 86400000"),
                &[],
            )
            .await
            .map_err(&e)?;
            let rows = c
                .query(
                    &format!(
                        "SELECT node, host, pid, listen, started_at, heartbeat_at, {DB_NOW} - heartbeat_at, stopped_at \
                         FROM nodes WHERE heartbeat_at >= {DB_NOW} - $1 ORDER BY started_at DESC, node"
                    ),
                    &[&within],
                )
                .await
                .map_err(&e)?;
            Ok(rows
                .iter()
                .map(|r| Node {
                    node: r.get(0),
                    host: r.get(1),
                    pid: r.get(2),
                    listen: r.get(3),
                    started_at: r.get(4),
                    heartbeat_at: r.get(5),
                    heartbeat_age_ms: r.get::<_, i64>(6).max(0),
                    stopped_at: r.get(7),
                })
                .collect())
        })
    }

    /// Records attempts and ends this daemon's leases of their batches. An attempt of a batch this
    /// daemon no longer holds (its lease lapsed and another daemon took it) is not recorded: the
    /// batch is the other's now.
    pub fn record(&self, done: Vec<Completion>) -> Result<(), QueueError> {
        if done.is_empty() {
            return Ok(());
        }
        let node = self.node.clone();
        let settled = self.run(move |c, shown| async move {
            let e = pg(&shown);
            let body = async {
                let lock_stmt = c
                    .prepare_cached(
                        "SELECT id, attempt_base FROM batches WHERE id = ANY($1) AND lease_owner = $2 FOR UPDATE",
                    )
                    .await
                    .map_err(&e)?;
                let attempt = c
                    .prepare_cached(
                        "INSERT INTO attempts (batch_id, attempt, generation, started_at, latency_ms, status, outcome, recipients, error, node) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                         ON CONFLICT (batch_id, attempt) DO UPDATE SET generation = $3, started_at = $4, latency_ms = $5, \
                         status = $6, outcome = $7, recipients = $8, error = $9, node = $10",
                    )
                    .await
                    .map_err(&e)?;
                let failure = c
                    .prepare_cached(
                        "INSERT INTO failures (batch_id, user_id, reason, attempt) \
                         SELECT $1, u, r, $4 FROM unnest($2::text[], $3::text[]) AS f(u, r)",
                    )
                    .await
                    .map_err(&e)?;
                // As in the SQLite queue: a batch finished with nothing delivered in any attempt
                // is `failed`; an attempt that does not count moves the numbering on through
                // `attempt_base`. The users are rewritten when some are left, dropped when done.
                let update = c
                    .prepare_cached(
                        "UPDATE batches SET attempts = CASE WHEN $10 THEN attempts ELSE $2 END, \
                         attempt_base = attempt_base + CASE WHEN $10 THEN 1 ELSE 0 END, \
                         delivered = delivered + $3, failed = failed + $4, \
                         remaining = coalesce($5, remaining - $3 - $4), \
                         state = CASE WHEN $6 = 'delivered' AND delivered + $3 = 0 AND failed + $4 > 0 \
                                      THEN 'failed' ELSE $6 END, \
                         next_at = coalesce($7, next_at), last_error = $8, updated_at = $9, held = $11, \
                         users = CASE WHEN $6 = 'delivered' THEN NULL ELSE coalesce($12, users) END, \
                         lease_owner = NULL, lease_until = NULL \
                         WHERE id = $1",
                    )
                    .await
                    .map_err(&e)?;
                // Begun and locked in one round trip; everything written and committed in another.
                let ids: Vec<String> = done.iter().map(|c| c.batch_id.clone()).collect();
                let lock_args: [&(dyn ToSql + Sync); 2] = [&ids, &node];
                let (began, locked) = tokio::join!(
                    c.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
                    c.query(&lock_stmt, &lock_args)
                );
                began.map_err(&e)?;
                let mut bases = std::collections::HashMap::<String, i32>::new();
                for r in locked.map_err(&e)? {
                    bases.insert(r.get(0), r.get(1));
                }
                let now = now_ms();
                let mut settled = 0i64;
                let mut writes = Vec::new();
                for c in &done {
                    let Some(base) = bases.get(&c.batch_id).copied() else {
                        continue;
                    };
                    writes.push(Write::of(c, base, now));
                    settled += i64::from(c.delivered) + c.failed.len() as i64;
                    if c.after == After::Dead {
                        settled += match &c.remaining {
                            Some((_, n)) => i64::from(*n),
                            None => {
                                i64::from(c.recipients)
                                    - i64::from(c.delivered)
                                    - c.failed.len() as i64
                            }
                        };
                    }
                }
                let client: &tokio_postgres::Client = &c;
                let statements = futures_util::future::join_all(writes.iter().map(|w| {
                    let (attempt, failure, update, node) = (&attempt, &failure, &update, &node);
                    async move {
                        let a: [&(dyn ToSql + Sync); 10] = [
                            &w.batch_id,
                            &w.number,
                            &w.generation,
                            &w.started_ms,
                            &w.latency_ms,
                            &w.status,
                            &w.outcome,
                            &w.recipients,
                            &w.error,
                            node,
                        ];
                        let u: [&(dyn ToSql + Sync); 12] = [
                            &w.batch_id,
                            &w.attempts,
                            &w.delivered,
                            &w.failed,
                            &w.remaining,
                            &w.state,
                            &w.next_at,
                            &w.error,
                            &w.now,
                            &w.uncounted,
                            &w.held,
                            &w.users,
                        ];
                        let f: [&(dyn ToSql + Sync); 4] =
                            [&w.batch_id, &w.failed_users, &w.failed_reasons, &w.number];
                        let failures = async {
                            if w.failed_users.is_empty() {
                                Ok(0)
                            } else {
                                client.execute(failure, &f).await
                            }
                        };
                        let (a, f, u) = tokio::join!(
                            client.execute(attempt, &a),
                            failures,
                            client.execute(update, &u)
                        );
                        a.and(f).and(u)
                    }
                }));
                let (written, committed) =
                    tokio::join!(statements, c.batch_execute("COMMIT"));
                // A statement that failed aborted the transaction, and the COMMIT rolled it back.
                for w in written {
                    w.map_err(&e)?;
                }
                committed.map_err(&e)?;
                Ok(settled)
            };
            let out = body.await;
            if out.is_err() {
                let _ = c.batch_execute("ROLLBACK").await;
            }
            out
        })?;
        self.pending.fetch_sub(settled, Ordering::Relaxed);
        Ok(())
    }

    /// Ends this daemon's leases of `ids` without recording anything.
    pub fn release(&self, ids: &[String]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let (ids, node) = (ids.to_vec(), self.node.clone());
        self.run(move |c, shown| async move {
            c.execute(
                "UPDATE batches SET lease_owner = NULL, lease_until = NULL WHERE id = ANY($1) AND lease_owner = $2",
                &[&ids, &node],
            )
            .await
            .map(|_| ())
            .map_err(pg(&shown))
        })
    }

    /// Holds (with a reason) or releases (`None`) the pending batches of a touchpoint.
    pub fn hold(&self, touchpoint: &str, reason: Option<&str>) -> Result<usize, QueueError> {
        let (tp, reason) = (touchpoint.to_string(), reason.map(str::to_string));
        self.run(move |c, shown| async move {
            c.execute(
                "UPDATE batches SET held = $2 WHERE touchpoint = $1 AND state = 'pending' AND held IS DISTINCT FROM $2",
                &[&tp, &reason],
            )
            .await
            .map(|n| n as usize)
            .map_err(pg(&shown))
        })
    }

    /// Makes the pending batches of `touchpoint` due no sooner than `until`.
    pub fn defer(&self, touchpoint: &str, until: i64) -> Result<usize, QueueError> {
        let tp = touchpoint.to_string();
        self.run(move |c, shown| async move {
            c.execute(
                "UPDATE batches SET next_at = $2 WHERE touchpoint = $1 AND state = 'pending' AND next_at < $2",
                &[&tp, &until],
            )
            .await
            .map(|n| n as usize)
            .map_err(pg(&shown))
        })
    }

    /// The touchpoints that have pending batches, with how many are held.
    pub fn pending_touchpoints(&self) -> Result<Vec<(String, u64, u64)>, QueueError> {
        self.run(move |c, shown| async move {
            c.query(
                "SELECT touchpoint, count(*), count(held) FROM batches WHERE state = 'pending' GROUP BY touchpoint",
                &[],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| (r.get(0), count(r.get(1)), count(r.get(2))))
                    .collect()
            })
            .map_err(pg(&shown))
        })
    }

    /// The receipt of an earlier trigger with this idempotency key, if there was one.
    pub fn find_idempotent(
        &self,
        key: &str,
    ) -> Result<Option<(String, String, Receipt)>, QueueError> {
        let key = key.to_string();
        let row: Option<(String, String, String)> = self.run(move |c, shown| async move {
            c.query_opt(
                "SELECT touchpoint, campaign, receipt FROM dispatches WHERE idempotency_key = $1",
                &[&key],
            )
            .await
            .map(|r| r.map(|r| (r.get(0), r.get(1), r.get(2))))
            .map_err(pg(&shown))
        })?;
        Ok(row.and_then(|(t, c, receipt)| serde_json::from_str(&receipt).ok().map(|r| (t, c, r))))
    }

    /// Starts storing a trigger: the transaction runs on the registry's runtime while the
    /// caller writes the recipients for the wire; [`Storing::wait`] waits for the commit.
    pub fn begin_enqueue(&self, d: NewDispatch<'_>) -> Result<Storing<'_>, QueueError> {
        let batches = super::claim::stored_batches(&d.users, d.batch_size);
        let dispatch_id = new_id("dsp");
        let receipt = Receipt {
            dispatch_id: dispatch_id.clone(),
            accepted: d.users.len(),
            rejected: d.rejected.clone(),
            batches: batches.len(),
        };
        let head = d.head.clone();
        let generation = d.generation as i64;
        let node = self.node.clone();
        let (pool, shown) = (
            self.registry.pool().clone(),
            self.registry.shown().to_string(),
        );
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let accepted = receipt.accepted as i64;
        let write = async move {
            let client = pooled(&pool, &shown).await.map_err(queue_error)?;
            store_trigger(client, &shown, head, generation, &node, receipt, batches).await
        };
        self.registry.runtime().spawn(async move {
            let answer = match tokio::time::timeout(
                crate::registry::postgres::CALL_TIMEOUT,
                write,
            )
            .await
            {
                Ok(a) => a,
                Err(_) => Err(QueueError::Write(
                    "PostgreSQL did not commit the trigger in time; it may or may not be stored: send it again with the same idempotency key".into(),
                )),
            };
            let _ = reply.send(answer);
        });
        let kept = keep_fresh(&self.fresh, &d, &dispatch_id);
        // Counted when stored; a trigger not stored is taken off again by the next refresh.
        self.pending.fetch_add(accepted, Ordering::Relaxed);
        Ok(Storing {
            fresh: &self.fresh,
            answer,
            dispatch_id,
            kept,
        })
    }

    /// A dispatch and its progress.
    pub fn dispatch(&self, id: &str) -> Result<Option<DispatchStatus>, QueueError> {
        let id = id.to_string();
        self.run(move |c, shown| async move {
            let e = pg(&shown);
            let Some(head) = c
                .query_opt(
                    "SELECT touchpoint, campaign, created_at, receipt FROM dispatches WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(&e)?
            else {
                return Ok(None);
            };
            let receipt: Receipt =
                serde_json::from_str(head.get::<_, &str>(3)).unwrap_or(Receipt {
                    dispatch_id: id.clone(),
                    accepted: 0,
                    rejected: Vec::new(),
                    batches: 0,
                });
            let r = c
                .query_one(
                    "SELECT coalesce(sum(delivered), 0)::bigint, coalesce(sum(failed), 0)::bigint, \
                     coalesce(sum(CASE WHEN state = 'pending' THEN remaining END), 0)::bigint, \
                     coalesce(sum(CASE WHEN state = 'dead' THEN remaining END), 0)::bigint, \
                     count(CASE WHEN state = 'pending' THEN 1 END), count(CASE WHEN state = 'pending' THEN held END), \
                     count(CASE WHEN state = 'delivered' THEN 1 END), count(CASE WHEN state = 'dead' THEN 1 END), \
                     count(CASE WHEN state = 'failed' THEN 1 END) \
                     FROM batches WHERE dispatch_id = $1",
                    &[&id],
                )
                .await
                .map_err(&e)?;
            let n = |i| count(r.get::<_, i64>(i));
            let batches = BatchCounts {
                pending: n(4),
                held: n(5),
                delivered: n(6),
                failed: n(8),
                dead: n(7),
            };
            Ok(Some(DispatchStatus {
                dispatch_id: id,
                touchpoint: head.get(0),
                campaign: head.get(1),
                created_at: head.get(2),
                receipt,
                delivered: n(0),
                failed: n(1),
                pending: n(2),
                dead: n(3),
                finished: batches.pending == 0,
                batches,
            }))
        })
    }

    /// Batches matching `filter`, newest first.
    pub fn batches(&self, filter: &Filter) -> Result<Vec<BatchInfo>, QueueError> {
        let f = filter.clone();
        let limit: Option<i64> = (f.limit > 0).then_some(f.limit as i64);
        self.run(move |c, shown| async move {
            let rows = c
                .query(
                    "SELECT id, dispatch_id, touchpoint, idx, count, state, held, size, remaining, delivered, failed, \
                     attempt_base + attempts, next_at, last_error, updated_at \
                     FROM batches WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR touchpoint = $2) \
                     AND ($3::text IS NULL OR dispatch_id = $3) \
                     ORDER BY updated_at DESC, id DESC LIMIT $4",
                    &[&f.state, &f.touchpoint, &f.dispatch_id, &limit],
                )
                .await
                .map_err(pg(&shown))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let state: String = r.get(5);
                    let next_at: i64 = r.get(12);
                    BatchInfo {
                        id: r.get(0),
                        dispatch_id: r.get(1),
                        touchpoint: r.get(2),
                        index: small(r.get(3)),
                        count: small(r.get(4)),
                        next_at: (state == "pending").then_some(next_at),
                        state,
                        held: r.get(6),
                        size: small(r.get(7)),
                        remaining: small(r.get(8)),
                        delivered: small(r.get(9)),
                        failed: small(r.get(10)),
                        attempts: small(r.get(11)),
                        last_error: r.get(13),
                        updated_at: r.get(14),
                    }
                })
                .collect())
        })
    }

    /// Every attempt of a batch, and its recipients that failed for good.
    pub fn history(&self, batch_id: &str) -> Result<(Vec<Attempt>, Vec<Rejected>), QueueError> {
        let id = batch_id.to_string();
        self.run(move |c, shown| async move {
            let e = pg(&shown);
            let attempts = c
                .query(
                    "SELECT attempt, generation, started_at, latency_ms, status, outcome, recipients, error \
                     FROM attempts WHERE batch_id = $1 ORDER BY attempt",
                    &[&id],
                )
                .await
                .map_err(&e)?
                .iter()
                .map(|r| Attempt {
                    attempt: small(r.get(0)),
                    generation: r.get::<_, i64>(1).max(0) as u64,
                    started_at: r.get(2),
                    latency_ms: r.get(3),
                    status: r
                        .get::<_, Option<i32>>(4)
                        .and_then(|s| u16::try_from(s).ok()),
                    outcome: r.get(5),
                    recipients: small(r.get(6)),
                    error: r.get(7),
                })
                .collect();
            let failures = c
                .query(
                    "SELECT user_id, reason FROM failures WHERE batch_id = $1 ORDER BY seq",
                    &[&id],
                )
                .await
                .map_err(&e)?
                .iter()
                .map(|r| Rejected {
                    user_id: r.get(0),
                    reason: r.get(1),
                })
                .collect();
            Ok((attempts, failures))
        })
    }

    /// When each of a batch's replays happened, oldest first.
    pub fn replays(&self, batch_id: &str) -> Result<Vec<Replay>, QueueError> {
        let id = batch_id.to_string();
        self.run(move |c, shown| async move {
            c.query(
                "SELECT at, after_attempt, recipients FROM replays WHERE batch_id = $1 ORDER BY seq",
                &[&id],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| Replay {
                        at: r.get(0),
                        after_attempt: small(r.get(1)),
                        recipients: small(r.get(2)),
                    })
                    .collect()
            })
            .map_err(pg(&shown))
        })
    }

    /// Puts dead batches back in the queue, due now, with a fresh attempt budget (see
    /// [`super::SqliteQueue::replay`]).
    pub fn replay(
        &self,
        ids: &[String],
        touchpoint: Option<&str>,
    ) -> Result<Vec<String>, QueueError> {
        let (ids, tp) = (ids.to_vec(), touchpoint.map(str::to_string));
        let chosen: Vec<(String, i64)> = self.run(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            let all: Vec<(String, i64)> = tx
                .query(
                    "SELECT id, remaining FROM batches WHERE state = 'dead' AND ($1::text IS NULL OR touchpoint = $1) \
                     ORDER BY id FOR UPDATE",
                    &[&tp],
                )
                .await
                .map_err(&e)?
                .iter()
                .map(|r| (r.get(0), i64::from(r.get::<_, i32>(1))))
                .collect();
            let chosen: Vec<(String, i64)> = if ids.is_empty() {
                all
            } else {
                all.into_iter().filter(|(id, _)| ids.contains(id)).collect()
            };
            let now = now_ms();
            let picked: Vec<String> = chosen.iter().map(|(id, _)| id.clone()).collect();
            tx.execute(
                "INSERT INTO replays (batch_id, at, after_attempt, recipients) \
                 SELECT id, $2, attempt_base + attempts, remaining FROM batches WHERE id = ANY($1) ORDER BY id",
                &[&picked, &now],
            )
            .await
            .map_err(&e)?;
            tx.execute(
                "UPDATE batches SET state = 'pending', attempt_base = attempt_base + attempts, attempts = 0, \
                 next_at = $2, updated_at = $2, lease_owner = NULL, lease_until = NULL WHERE id = ANY($1)",
                &[&picked, &now],
            )
            .await
            .map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(chosen)
        })?;
        let added: i64 = chosen.iter().map(|(_, n)| n).sum();
        self.pending.fetch_add(added, Ordering::Relaxed);
        Ok(chosen.into_iter().map(|(id, _)| id).collect())
    }

    /// Counts over the whole queue.
    pub fn stats(&self) -> Result<Stats, QueueError> {
        self.run(move |c, shown| async move {
            let r = c
                .query_one(
                    "SELECT count(CASE WHEN state = 'pending' THEN 1 END), \
                     coalesce(sum(CASE WHEN state = 'pending' THEN remaining END), 0)::bigint, \
                     count(CASE WHEN state = 'pending' THEN held END), \
                     count(CASE WHEN state = 'dead' THEN 1 END), \
                     coalesce(sum(CASE WHEN state = 'dead' THEN remaining END), 0)::bigint FROM batches",
                    &[],
                )
                .await
                .map_err(pg(&shown))?;
            let n = |i| count(r.get::<_, i64>(i));
            Ok(Stats {
                pending_batches: n(0),
                pending_recipients: n(1),
                held_batches: n(2),
                dead_batches: n(3),
                dead_recipients: n(4),
            })
        })
    }

    /// Forgets up to `limit` dispatches whose batches were all delivered before `before`.
    pub fn prune(&self, before: i64, limit: usize) -> Result<usize, QueueError> {
        let limit = limit as i64;
        self.run(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            let ids: Vec<String> = tx
                .query(
                    "SELECT d.id FROM dispatches d WHERE d.created_at < $1 \
                     AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.dispatch_id = d.id \
                                     AND (b.state NOT IN ('delivered', 'failed') OR b.updated_at >= $1)) \
                     LIMIT $2 FOR UPDATE SKIP LOCKED",
                    &[&before, &limit],
                )
                .await
                .map_err(&e)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !ids.is_empty() {
                for sql in [
                    "DELETE FROM failures WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ANY($1))",
                    "DELETE FROM attempts WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ANY($1))",
                    "DELETE FROM replays WHERE batch_id IN (SELECT id FROM batches WHERE dispatch_id = ANY($1))",
                    "DELETE FROM batches WHERE dispatch_id = ANY($1)",
                    "DELETE FROM dispatches WHERE id = ANY($1)",
                ] {
                    tx.execute(sql, &[&ids]).await.map_err(&e)?;
                }
            }
            tx.commit().await.map_err(&e)?;
            Ok(ids.len())
        })
    }
}

/// Stores one trigger in a transaction of its own, durable when it returns.
async fn store_trigger(
    mut client: deadpool_postgres::Object,
    shown: &str,
    head: crate::dispatch::TriggerHead,
    generation: i64,
    node: &str,
    receipt: Receipt,
    batches: Vec<(usize, Vec<u8>)>,
) -> Result<Enqueued, QueueError> {
    let e = |err: tokio_postgres::Error| QueueError::Postgres {
        database: shown.to_string(),
        why: chain(&err),
    };
    let tx = client.transaction().await.map_err(e)?;
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .map_err(e)?;
    let now = now_ms();
    let message = {
        let message = head.message();
        (!message.is_empty()).then(|| serde_json::to_string(&message).unwrap_or_default())
    };
    let dispatch_id = receipt.dispatch_id.clone();
    let inserted = tx
        .execute(
            &tx.prepare_cached("INSERT INTO dispatches (id, touchpoint, campaign, idempotency_key, template_params, generation, receipt, created_at, message, node) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (idempotency_key) DO NOTHING").await.map_err(e)?,
            &[
                &dispatch_id,
                &head.touchpoint,
                &head.campaign,
                &head.idempotency_key,
                &serde_json::to_string(&head.template_params).unwrap_or_default(),
                &generation,
                &serde_json::to_string(&receipt).unwrap_or_default(),
                &now,
                &message,
                &node,
            ],
        )
        .await
        .map_err(e)?;
    if inserted == 0 {
        // The key was taken, by this daemon or another: the first trigger's receipt answers.
        let row = tx
            .query_one(
                &tx.prepare_cached("SELECT id, touchpoint, campaign, receipt FROM dispatches WHERE idempotency_key = $1").await.map_err(e)?,
                &[&head.idempotency_key],
            )
            .await
            .map_err(e)?;
        let (id, touchpoint, campaign, first): (String, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if touchpoint != head.touchpoint || campaign != head.campaign {
            return Err(QueueError::IdempotencyConflict {
                key: head.idempotency_key.unwrap_or_default(),
                touchpoint,
                campaign,
                dispatch_id: id,
            });
        }
        let first: Receipt = serde_json::from_str(&first)
            .map_err(|err| QueueError::Write(format!("the first trigger's receipt: {err}")))?;
        return Ok(Enqueued::Repeat(first));
    }
    if !batches.is_empty() {
        let n = batches.len();
        let ids: Vec<String> = (0..n).map(|i| batch_id(&dispatch_id, i)).collect();
        let idx: Vec<i32> = (0..n)
            .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
            .collect();
        let sizes: Vec<i32> = batches
            .iter()
            .map(|(s, _)| i32::try_from(*s).unwrap_or(i32::MAX))
            .collect();
        let users: Vec<Vec<u8>> = batches.into_iter().map(|(_, u)| u).collect();
        let total = i32::try_from(n).unwrap_or(i32::MAX);
        tx.execute(
            &tx.prepare_cached("INSERT INTO batches (id, dispatch_id, idx, count, touchpoint, size, remaining, state, next_at, created_at, updated_at, users) \
             SELECT id, $2, idx, $3, $4, size, size, 'pending', $5, $5, $5, users \
             FROM unnest($1::text[], $6::int[], $7::int[], $8::bytea[]) AS b(id, idx, size, users)").await.map_err(e)?,
            &[&ids, &dispatch_id, &total, &head.touchpoint, &now, &idx, &sizes, &users],
        )
        .await
        .map_err(e)?;
    }
    tx.commit().await.map_err(e)?;
    Ok(Enqueued::New(receipt))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::dispatch::TriggerHead;
    use crate::dispatch::queue::tests::users;
    use crate::registry::postgres::tests::{TestDb, test_db, value};

    fn head(touchpoint: &str, key: Option<&str>) -> TriggerHead {
        TriggerHead {
            touchpoint: touchpoint.into(),
            campaign: "c1".into(),
            idempotency_key: key.map(str::to_string),
            template_params: serde_json::json!({"text": "hi"})
                .as_object()
                .cloned()
                .unwrap(),
            ..TriggerHead::default()
        }
    }

    /// Two daemons' queues on one test database, with leases of `lease`.
    fn two(lease: Duration) -> Option<(TestDb, PostgresQueue, PostgresQueue)> {
        let db = test_db()?;
        let open = |node: &str| {
            let registry = Arc::new(PostgresRegistry::open(&db.url).unwrap());
            PostgresQueue::open(registry, node.into(), lease).unwrap()
        };
        let (a, b) = (open("node-a"), open("node-b"));
        Some((db, a, b))
    }

    /// Stores `n` users for `touchpoint` in batches of 2.
    fn store(q: &PostgresQueue, touchpoint: &str, key: Option<&str>, n: usize) -> Enqueued {
        let h = head(touchpoint, key);
        q.begin_enqueue(NewDispatch {
            head: &h,
            generation: 1,
            batch_size: 2,
            users: users(n),
            rejected: Vec::new(),
            wire: None,
        })
        .unwrap()
        .wait()
        .unwrap()
    }

    fn lanes(concurrency: usize) -> Lanes {
        Lanes {
            concurrency,
            rates: Vec::new(),
        }
    }

    fn done(c: &Claimed) -> Completion {
        Completion {
            batch_id: c.id.clone(),
            attempt: c.attempts + 1,
            generation: 1,
            started_ms: now_ms(),
            latency_ms: 1,
            status: Some(200),
            recipients: c.remaining,
            delivered: c.remaining,
            failed: Vec::new(),
            remaining: None,
            after: After::Done,
            error: None,
        }
    }

    #[test]
    fn a_leased_batch_is_claimed_by_no_other_daemon_until_its_lease_runs_out() {
        let Some((_db, a, b)) = two(Duration::from_millis(400)) else {
            return;
        };
        store(&a, "sms", None, 6);
        let got = a.claim(10, &[], &lanes(10)).unwrap();
        assert_eq!(got.batches.len(), 3);
        // Their users come with them (read from the rows: nothing was kept in memory).
        for c in &got.batches {
            let Users::Stored(Ok(users)) = &c.users else {
                panic!("{:?}", c.users)
            };
            assert_eq!(
                crate::dispatch::stored::parse_stored(users).unwrap().len(),
                2
            );
        }
        assert!(b.claim(10, &[], &lanes(10)).unwrap().batches.is_empty());
        // A renews nothing: once the lease is out, B takes them over.
        let deadline = Instant::now() + Duration::from_secs(30);
        let taken = loop {
            let got = b.claim(10, &[], &lanes(10)).unwrap();
            if !got.batches.is_empty() {
                break got;
            }
            assert!(Instant::now() < deadline, "never taken over");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(taken.batches.len(), 3);
        // A's late record is not B's: fenced, nothing recorded.
        a.record(got.batches.iter().map(done).collect()).unwrap();
        assert_eq!(a.stats().unwrap().pending_batches, 3);
        b.record(taken.batches.iter().map(done).collect()).unwrap();
        let stats = b.stats().unwrap();
        assert_eq!((stats.pending_batches, stats.pending_recipients), (0, 0));
        let nodes = value(
            &_db.url,
            "SELECT string_agg(DISTINCT node, ',') FROM attempts",
        );
        assert_eq!(nodes.as_deref(), Some("node-b"));
    }

    #[test]
    fn renewed_leases_hold_and_a_clean_stop_lets_go_at_once() {
        let Some((_db, a, b)) = two(Duration::from_millis(300)) else {
            return;
        };
        a.register("host-a", "127.0.0.1:1", "2026-12-04T00:00:00Z")
            .unwrap();
        store(&a, "sms", None, 2);
        assert_eq!(a.claim(10, &[], &lanes(10)).unwrap().batches.len(), 1);
        // A renews until the database's clock is past the lease it took: B still gets nothing.
        let first: i64 = value(&_db.url, "SELECT max(lease_until) FROM batches")
            .and_then(|v| v.parse().ok())
            .expect("a lease");
        crate::registry::conformance::wait_for("the first lease to run out", || {
            assert_eq!(a.beat().unwrap(), 1);
            assert!(b.claim(10, &[], &lanes(10)).unwrap().batches.is_empty());
            value(&_db.url, &format!("SELECT {DB_NOW} > {first} + 100")).is_some_and(|v| v == "t")
        });
        a.leave().unwrap();
        assert_eq!(b.claim(10, &[], &lanes(10)).unwrap().batches.len(), 1);
        let nodes = b.nodes(Duration::from_secs(60)).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].node, "node-a");
        assert!(nodes[0].stopped_at.is_some());
    }

    #[test]
    fn concurrency_counts_every_daemons_leases() {
        let Some((_db, a, b)) = two(Duration::from_secs(30)) else {
            return;
        };
        store(&a, "sms", None, 10);
        store(&a, "push", None, 2);
        let first = a.claim(10, &[], &lanes(2)).unwrap();
        let per = |c: &Claim, tp: &str| c.batches.iter().filter(|b| b.touchpoint == tp).count();
        assert_eq!((per(&first, "sms"), per(&first, "push")), (2, 1));
        // `sms` is at its limit across both daemons: B gets nothing of it, and is told to ask
        // again soon.
        let second = b.claim(10, &[], &lanes(2)).unwrap();
        assert!(second.batches.is_empty());
        assert!(second.capped_until.is_some());
        a.record(vec![done(&first.batches[0])]).unwrap();
        let third = b.claim(10, &[], &lanes(2)).unwrap();
        assert_eq!(per(&third, "sms"), 1);
        // A touchpoint left out by the caller is not claimed.
        b.record(third.batches.iter().map(done).collect()).unwrap();
        assert!(b.claim(10, &["sms"], &lanes(2)).unwrap().batches.is_empty());
    }

    #[test]
    fn a_rate_limit_is_spent_across_daemons() {
        let Some((_db, a, b)) = two(Duration::from_secs(30)) else {
            return;
        };
        store(&a, "sms", None, 20);
        let rated = Lanes {
            concurrency: 100,
            rates: vec![("sms".into(), 2.0)],
        };
        let first = a.claim(100, &[], &rated).unwrap();
        assert_eq!(first.batches.len(), 2, "a second's worth");
        let second = b.claim(100, &[], &rated).unwrap();
        assert!(second.batches.is_empty(), "the bucket is the cluster's");
        let at = second.capped_until.expect("told when to ask again");
        assert!(at > now_ms() && at <= now_ms() + 1_000, "{at}");
    }

    #[test]
    fn an_idempotency_key_is_taken_once_across_daemons() {
        let Some((_db, a, b)) = two(Duration::from_secs(30)) else {
            return;
        };
        let Enqueued::New(first) = store(&a, "sms", Some("k1"), 3) else {
            panic!("new")
        };
        let Enqueued::Repeat(again) = store(&b, "sms", Some("k1"), 3) else {
            panic!("repeat")
        };
        assert_eq!(again, first);
        let h = head("push", Some("k1"));
        let err = b
            .begin_enqueue(NewDispatch {
                head: &h,
                generation: 1,
                batch_size: 2,
                users: users(1),
                rejected: Vec::new(),
                wire: None,
            })
            .unwrap()
            .wait()
            .unwrap_err();
        assert!(
            matches!(err, QueueError::IdempotencyConflict { ref touchpoint, .. } if touchpoint == "sms"),
            "{err}"
        );
        assert_eq!(a.stats().unwrap().pending_batches, 2);
    }
}
