//! Moving a single-node setup into this database (`touchctl state migrate`): the SQLite
//! registry's rows with its id and fingerprint key, and every row of its queue, in one
//! transaction.
//!
//! The transaction first locks the tables it fills (`EXCLUSIVE`: others may read, not write) and
//! refuses a database that holds touchpoints, dispatches or batches already, so nothing is mixed
//! or overwritten. The registry id and fingerprint key replace those the database was created
//! with: the fingerprints were made with that key, so a plan against the new database shows no
//! change. The rows arrive on a channel while the caller reads them from SQLite, and go in with
//! binary `COPY`, a table at a time. Once everything is in, the counts read back (and the bytes of
//! the stored users) are checked against what was sent, and the caller is told it may mark the
//! SQLite files; only when it says so is the transaction committed. Any failure before that rolls
//! everything back: the database is as it was.
//!
//! [`inspect`] reads what a database holds without changing it (no migrations), for `--dry-run`.

use std::pin::Pin;
use std::time::Duration;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{
    CALL_TIMEOUT, PostgresRegistry, SCHEMA_VERSION, Target, block_on_within, chain, no_connection,
    pg, pooled,
};
use crate::dispatch::queue::Row;
use crate::registry::{Exported, RegistryError};

/// How long moving a setup may take in all.
pub const MOVE_LIMIT: Duration = Duration::from_secs(3600);

/// What a database holds, as [`inspect`] read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetState {
    /// The database, as `postgres://user@host:port/db` (no password).
    pub database: String,
    /// Its touchctl schema version; `None` when it has no touchctl tables yet.
    pub schema: Option<i64>,
    /// Touchpoints in it.
    pub touchpoints: u64,
    /// Dispatches in it.
    pub dispatches: u64,
}

impl TargetState {
    /// Whether it holds nothing a move would mix with.
    pub fn is_empty(&self) -> bool {
        self.touchpoints == 0 && self.dispatches == 0
    }
}

/// What the caller sends while it reads the SQLite queue.
#[derive(Debug)]
pub enum Incoming {
    /// Rows, in the order [`crate::dispatch::queue::Export::rows`] gives them.
    Rows(Vec<Row>),
    /// Everything was sent.
    End,
}

/// What the database holds after the move, read back inside its transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Touchpoints.
    pub touchpoints: u64,
    /// Platform verify tickets.
    pub tickets: u64,
    /// Dispatches.
    pub dispatches: u64,
    /// Batches.
    pub batches: u64,
    /// Attempts.
    pub attempts: u64,
    /// Failed recipients.
    pub failures: u64,
    /// Replays.
    pub replays: u64,
    /// Bytes of stored users.
    pub users_bytes: u64,
}

/// Reads what the database `url` names holds, changing nothing (no migrations are applied).
pub fn inspect(url: &str) -> Result<TargetState, RegistryError> {
    let target = Target::parse(url)?;
    let shown = target.shown.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| no_connection(&shown, e))?;
    let work = async {
        let client = target
            .connect()
            .await
            .map_err(|e| no_connection(&shown, e))?;
        let e = pg(&shown);
        let exists = |table: &'static str| {
            let client = &client;
            let e = &e;
            async move {
                client
                    .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .map_err(e)
            }
        };
        let count = |table: &'static str| {
            let client = &client;
            let e = &e;
            async move {
                client
                    .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await
                    .map(|r| r.get::<_, i64>(0).max(0) as u64)
                    .map_err(e)
            }
        };
        let mut state = TargetState {
            database: shown.clone(),
            ..TargetState::default()
        };
        if exists("touchctl_schema").await? {
            let version: i64 = client
                .query_one("SELECT coalesce(max(version), 0) FROM touchctl_schema", &[])
                .await
                .map_err(&e)?
                .get(0);
            if version > SCHEMA_VERSION {
                return Err(RegistryError::SchemaTooNew {
                    database: shown.clone(),
                    found: version,
                    supported: SCHEMA_VERSION,
                });
            }
            state.schema = Some(version);
        }
        if exists("touchpoints").await? {
            state.touchpoints = count("touchpoints").await?;
        }
        if exists("dispatches").await? {
            state.dispatches = count("dispatches").await?;
        }
        Ok(state)
    };
    runtime.block_on(async {
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Postgres {
                    database: shown.clone(),
                    why: format!(
                        "no answer within {}: check that the server is reachable and not overloaded",
                        humantime::format_duration(CALL_TIMEOUT)
                    ),
                })
            })
    })
}

/// The tables rows go into, in order, with their `COPY` column lists and types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Table {
    Dispatches,
    Batches,
    Attempts,
    Failures,
    Replays,
}

impl Table {
    fn of(row: &Row) -> Self {
        match row {
            Row::Dispatch(_) => Table::Dispatches,
            Row::Batch(_) => Table::Batches,
            Row::Attempt(_) => Table::Attempts,
            Row::Failure(_) => Table::Failures,
            Row::Replay(_) => Table::Replays,
        }
    }

    fn copy(self) -> (&'static str, &'static [Type]) {
        match self {
            Table::Dispatches => (
                "COPY dispatches (id, touchpoint, campaign, idempotency_key, template_params, generation, \
                 receipt, created_at, message) FROM STDIN BINARY",
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT8,
                    Type::TEXT,
                    Type::INT8,
                    Type::TEXT,
                ],
            ),
            Table::Batches => (
                "COPY batches (id, dispatch_id, idx, count, touchpoint, size, remaining, delivered, failed, \
                 state, attempts, attempt_base, next_at, held, last_error, created_at, updated_at, users) \
                 FROM STDIN BINARY",
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT4,
                    Type::INT4,
                    Type::TEXT,
                    Type::INT4,
                    Type::INT4,
                    Type::INT4,
                    Type::INT4,
                    Type::TEXT,
                    Type::INT4,
                    Type::INT4,
                    Type::INT8,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT8,
                    Type::INT8,
                    Type::BYTEA,
                ],
            ),
            Table::Attempts => (
                "COPY attempts (batch_id, attempt, generation, started_at, latency_ms, status, outcome, \
                 recipients, error) FROM STDIN BINARY",
                &[
                    Type::TEXT,
                    Type::INT4,
                    Type::INT8,
                    Type::INT8,
                    Type::INT8,
                    Type::INT4,
                    Type::TEXT,
                    Type::INT4,
                    Type::TEXT,
                ],
            ),
            Table::Failures => (
                "COPY failures (batch_id, user_id, reason, attempt) FROM STDIN BINARY",
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::INT4],
            ),
            Table::Replays => (
                "COPY replays (batch_id, at, after_attempt, recipients) FROM STDIN BINARY",
                &[Type::TEXT, Type::INT8, Type::INT4, Type::INT4],
            ),
        }
    }
}

/// Writes one row into the `COPY` of its table.
async fn write_row(
    writer: Pin<&mut BinaryCopyInWriter>,
    row: &Row,
) -> Result<(), tokio_postgres::Error> {
    match row {
        Row::Dispatch(d) => {
            let values: [&(dyn ToSql + Sync); 9] = [
                &d.id,
                &d.touchpoint,
                &d.campaign,
                &d.idempotency_key,
                &d.template_params,
                &d.generation,
                &d.receipt,
                &d.created_at,
                &d.message,
            ];
            writer.write(&values).await
        }
        Row::Batch(b) => {
            let values: [&(dyn ToSql + Sync); 18] = [
                &b.id,
                &b.dispatch_id,
                &b.idx,
                &b.count,
                &b.touchpoint,
                &b.size,
                &b.remaining,
                &b.delivered,
                &b.failed,
                &b.state,
                &b.attempts,
                &b.attempt_base,
                &b.next_at,
                &b.held,
                &b.last_error,
                &b.created_at,
                &b.updated_at,
                &b.users,
            ];
            writer.write(&values).await
        }
        Row::Attempt(a) => {
            let values: [&(dyn ToSql + Sync); 9] = [
                &a.batch_id,
                &a.attempt,
                &a.generation,
                &a.started_at,
                &a.latency_ms,
                &a.status,
                &a.outcome,
                &a.recipients,
                &a.error,
            ];
            writer.write(&values).await
        }
        Row::Failure(f) => {
            let values: [&(dyn ToSql + Sync); 4] = [&f.batch_id, &f.user_id, &f.reason, &f.attempt];
            writer.write(&values).await
        }
        Row::Replay(r) => {
            let values: [&(dyn ToSql + Sync); 4] =
                [&r.batch_id, &r.at, &r.after_attempt, &r.recipients];
            writer.write(&values).await
        }
    }
}

/// What was sent, counted as it went.
#[derive(Default)]
struct Sent {
    moved: Moved,
}

impl Sent {
    fn add(&mut self, row: &Row) {
        let m = &mut self.moved;
        match row {
            Row::Dispatch(_) => m.dispatches += 1,
            Row::Batch(b) => {
                m.batches += 1;
                m.users_bytes += b.users.as_ref().map_or(0, |u| u.len() as u64);
            }
            Row::Attempt(_) => m.attempts += 1,
            Row::Failure(_) => m.failures += 1,
            Row::Replay(_) => m.replays += 1,
        }
    }
}

impl PostgresRegistry {
    /// Moves a registry and the rows arriving on `rows` into this database, in one transaction
    /// (see the module docs). Once everything is in and checked, sends what the database holds
    /// on `ready` and waits for `go`: `true` commits, anything else rolls back. `from` says where
    /// the setup came from (kept in `meta` as `migrated_from`). Nothing is committed on any
    /// error, nor when `rows` closes without [`Incoming::End`].
    pub fn move_in(
        &self,
        from: &str,
        registry: Exported,
        mut rows: tokio::sync::mpsc::Receiver<Incoming>,
        ready: std::sync::mpsc::Sender<Moved>,
        go: tokio::sync::oneshot::Receiver<bool>,
    ) -> Result<Moved, RegistryError> {
        let from = from.to_string();
        let (pool, shown) = (self.pool.clone(), self.target.shown.clone());
        block_on_within(
            &self.bridge.handle,
            &shown.clone(),
            MOVE_LIMIT,
            async move {
                let mut client = pooled(&pool, &shown).await?;
                let e = pg(&shown);
                let tx = client.transaction().await.map_err(&e)?;
                tx.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {}; \
                 LOCK TABLE meta, touchpoints, platform_tickets, dispatches, batches, attempts, \
                 failures, replays IN EXCLUSIVE MODE",
                    MOVE_LIMIT.as_millis()
                ))
                .await
                .map_err(&e)?;
                let held = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM touchpoints), (SELECT count(*) FROM dispatches), \
                     (SELECT count(*) FROM batches)",
                    &[],
                )
                .await
                .map_err(&e)?;
                let (touchpoints, dispatches, batches): (i64, i64, i64) =
                    (held.get(0), held.get(1), held.get(2));
                if touchpoints > 0 || dispatches > 0 || batches > 0 {
                    return Err(RegistryError::NotEmpty {
                        database: shown.clone(),
                        touchpoints: touchpoints as u64,
                        dispatches: dispatches as u64,
                    });
                }
                tx.execute(
                "INSERT INTO meta (key, value) VALUES ('registry_id', $1), ('fingerprint_key', $2), \
                 ('migrated_from', $3), ('migrated_at', $4) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[
                    &registry.registry_id,
                    &registry.fingerprint_key,
                    &from,
                    &crate::registry::now(),
                ],
            )
            .await
            .map_err(&e)?;
                {
                    let sink = tx
                    .copy_in(
                        "COPY touchpoints (id, kind, spec, live_spec, fingerprints, generation, paused, \
                         applied_at, applied_by, source_commit, source_dirty, source_file) FROM STDIN BINARY",
                    )
                    .await
                    .map_err(&e)?;
                    let writer = BinaryCopyInWriter::new(
                        sink,
                        &[
                            Type::TEXT,
                            Type::TEXT,
                            Type::TEXT,
                            Type::TEXT,
                            Type::TEXT,
                            Type::INT8,
                            Type::BOOL,
                            Type::TEXT,
                            Type::TEXT,
                            Type::TEXT,
                            Type::BOOL,
                            Type::TEXT,
                        ],
                    );
                    let mut writer = std::pin::pin!(writer);
                    for t in &registry.touchpoints {
                        let values: [&(dyn ToSql + Sync); 12] = [
                            &t.id,
                            &t.kind,
                            &t.spec,
                            &t.live_spec,
                            &t.fingerprints,
                            &t.generation,
                            &t.paused,
                            &t.applied_at,
                            &t.applied_by,
                            &t.source_commit,
                            &t.source_dirty,
                            &t.source_file,
                        ];
                        writer.as_mut().write(&values).await.map_err(&e)?;
                    }
                    writer.finish().await.map_err(&e)?;
                }
                for t in &registry.tickets {
                    tx.execute(
                    "INSERT INTO platform_tickets (platform, ticket, received_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (platform) DO UPDATE SET ticket = excluded.ticket, \
                         received_at = excluded.received_at",
                    &[&t.platform, &t.ticket, &t.received_at],
                )
                .await
                .map_err(&e)?;
                }
                let mut sent = Sent::default();
                sent.moved.touchpoints = registry.touchpoints.len() as u64;
                sent.moved.tickets = registry.tickets.len() as u64;
                let mut current: Option<(Table, Pin<Box<BinaryCopyInWriter>>)> = None;
                let mut ended = false;
                while let Some(incoming) = rows.recv().await {
                    let chunk = match incoming {
                        Incoming::Rows(chunk) => chunk,
                        Incoming::End => {
                            ended = true;
                            break;
                        }
                    };
                    for row in &chunk {
                        let table = Table::of(row);
                        if current.as_ref().map(|(t, _)| *t) != Some(table) {
                            if let Some((_, mut writer)) = current.take() {
                                writer.as_mut().finish().await.map_err(&e)?;
                            }
                            let (statement, types) = table.copy();
                            let sink = tx.copy_in(statement).await.map_err(&e)?;
                            current = Some((table, Box::pin(BinaryCopyInWriter::new(sink, types))));
                        }
                        if let Some((_, writer)) = current.as_mut() {
                            write_row(writer.as_mut(), row).await.map_err(&e)?;
                        }
                        sent.add(row);
                    }
                }
                if let Some((_, mut writer)) = current.take() {
                    writer.as_mut().finish().await.map_err(&e)?;
                }
                if !ended {
                    return Err(RegistryError::Postgres {
                        database: shown.clone(),
                        why: "the queue could not be read to the end; nothing was moved".into(),
                    });
                }
                let found = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM touchpoints), (SELECT count(*) FROM platform_tickets), \
                     (SELECT count(*) FROM dispatches), (SELECT count(*) FROM batches), \
                     (SELECT count(*) FROM attempts), (SELECT count(*) FROM failures), \
                     (SELECT count(*) FROM replays), \
                     (SELECT coalesce(sum(octet_length(users)), 0)::BIGINT FROM batches)",
                    &[],
                )
                .await
                .map_err(&e)?;
                let n = |i: usize| found.get::<_, i64>(i).max(0) as u64;
                let moved = Moved {
                    touchpoints: n(0),
                    tickets: n(1),
                    dispatches: n(2),
                    batches: n(3),
                    attempts: n(4),
                    failures: n(5),
                    replays: n(6),
                    users_bytes: n(7),
                };
                if moved != sent.moved {
                    return Err(RegistryError::Postgres {
                        database: shown.clone(),
                        why: format!(
                            "after copying, the database holds {moved:?} where {:?} was read; nothing was moved",
                            sent.moved
                        ),
                    });
                }
                tx.execute(
                    "UPDATE data_version SET version = version + 1 WHERE singleton = 1",
                    &[],
                )
                .await
                .map_err(&e)?;
                if ready.send(moved.clone()).is_err() || go.await != Ok(true) {
                    return Err(RegistryError::Postgres {
                        database: shown.clone(),
                        why: "the SQLite files could not be marked as moved; nothing was moved"
                            .into(),
                    });
                }
                tx.commit().await.map_err(|err| RegistryError::Postgres {
                    database: shown.clone(),
                    why: format!("the commit failed: {}", chain(&err)),
                })?;
                Ok(moved)
            },
        )
    }
}
