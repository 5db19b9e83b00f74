//! The registry in PostgreSQL (`--state postgres://…`), for several machines sharing one registry.
//!
//! # Runtime
//! The [`Registry`] trait is synchronous, and its callers are plain threads (the commands, the
//! lock's heartbeat) as well as tasks of the daemon's tokio runtime. So the registry keeps a
//! runtime of its own on a dedicated thread (`postgres`): each call sends its future there and
//! waits for the answer on a std channel, bounded by [`CALL_TIMEOUT`]. No call ever blocks on a
//! runtime it runs inside. Connections come from a small pool (deadpool); every wait is bounded:
//! connecting ([`CONNECT_TIMEOUT`]), a slot of the pool, each statement (`statement_timeout`).
//!
//! # TLS
//! `sslmode=require`, `verify-ca` or `verify-full` in the URL connect through rustls, verifying the
//! server's certificate and host name against the platform's roots, or against the CA certificates
//! of `sslrootcert=FILE` (PEM) alone when given; `sslmode=disable`, `allow`, `prefer` or none
//! connect in plain text (say `require` to have TLS). A password in the URL (or in `PGPASSWORD`
//! when the URL has none) is never shown: [`Registry::describe`] and every error name the database
//! as `postgres://user@host:port/db`.
//!
//! # Schema
//! Versioned in `touchctl_schema` (one row per migration applied: version, applied_at). Opening
//! applies the missing migrations in one transaction under a transaction-scoped advisory lock, so
//! two processes starting together do not race; a database whose version is newer than this build
//! knows is refused. The registry id and the fingerprint key are created once, by the first open.
//! Give touchctl a database of its own: its tables (`meta`, `touchpoints`, `registry_lock`,
//! `platform_tickets`, `data_version`) have plain names.
//!
//! # The apply lock
//! PostgreSQL's session advisory lock ([`LOCK_KEY`]), taken on a connection of its own that the
//! registry keeps for the lock's life: when the holder's process or connection dies, the server
//! releases it. A `registry_lock` row names the holder (user, pid, host, operation, when, its
//! backend pid) so a second writer's error names it. Taking the lock and writing the row happen
//! under an exclusive table lock on `registry_lock`, so whoever finds the advisory lock taken
//! reads the row of the session that holds it. The heartbeat renews the row's `expires_at` on the
//! held connection (informative here: the server, not the lease, frees a dead holder's lock), and a
//! closed connection is a lost lock. `force-unlock` refuses while the holder's session is alive
//! and, with `--force`, ends it (`pg_terminate_backend`, which needs PostgreSQL 14 or later and the
//! right to signal that session).
//!
//! Every write bumps the single row of `data_version` in its own transaction, so a long-running
//! process notices a change made elsewhere by reading one number.
//!
//! # Shared platform tokens
//! `shared_tokens` keeps each platform credential's access token (see
//! [`crate::channel::token`]), and a claim to fetch one as a row keyed `fetching:<key>` whose
//! `token` is the claim's random id. Expiries and claims are timed by the database's clock alone
//! ([`NOW_MS`]), so nodes whose clocks differ agree on them; a claim is taken in one statement
//! (an upsert that replaces only a lapsed claim or one's own). These writes do not bump
//! `data_version`: a token is no touchpoint, and every node reconciling on each token fetched
//! would be waste.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::{
    FETCHING, Live, LockInfo, Put, Registry, RegistryError, SharedToken, hostname, now, whoami,
};
use crate::model::{Fingerprinter, Secret};

mod from_sqlite;
pub use from_sqlite::{Incoming, MOVE_LIMIT, Moved, TargetState, inspect};

/// How long connecting to the server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement may run on the server.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;
/// How long one registry call may take in all (a slot of the pool, connecting, its statements).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections kept by the pool: the commands need one at a time; the daemon's readers a few.
const POOL_SIZE: usize = 4;

/// The session advisory lock that is the registry lock (`touchreg` in ASCII).
pub const LOCK_KEY: i64 = 0x746f_7563_6872_6567;
/// The transaction advisory lock that serialises migrations (`touchmig` in ASCII).
const MIGRATE_KEY: i64 = 0x746f_7563_686d_6967;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &["
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE touchpoints (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    spec          TEXT NOT NULL, -- as the last apply wrote it (canonical JSON, kept as text)
    live_spec     TEXT,          -- NULL unless changed outside apply since (drift)
    fingerprints  TEXT NOT NULL,
    generation    BIGINT NOT NULL,
    paused        BOOLEAN NOT NULL DEFAULT FALSE,
    applied_at    TEXT NOT NULL,
    applied_by    TEXT NOT NULL,
    source_commit TEXT,
    source_dirty  BOOLEAN NOT NULL DEFAULT FALSE,
    source_file   TEXT
);
CREATE TABLE registry_lock (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    lock_id     TEXT NOT NULL,
    holder      TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    host        TEXT NOT NULL,
    operation   TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    expires_at  BIGINT,          -- ms since the epoch, renewed by the holder's heartbeat
    backend_pid INTEGER NOT NULL -- the holder's session, which holds the advisory lock
);
CREATE TABLE platform_tickets (
    platform    TEXT PRIMARY KEY, -- the wechat_open_platform's id
    ticket      TEXT NOT NULL,    -- the latest component_verify_ticket (a secret)
    received_at TEXT NOT NULL
);
CREATE TABLE data_version (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    version   BIGINT NOT NULL
);
INSERT INTO data_version (singleton, version) VALUES (1, 0);
", "
CREATE TABLE dispatches (
    id              TEXT PRIMARY KEY,
    touchpoint      TEXT NOT NULL,
    campaign        TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,      -- unique across every daemon of the database
    template_params TEXT NOT NULL,
    generation      BIGINT NOT NULL,
    receipt         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,  -- ms since the epoch
    message         TEXT,             -- JSON of the trigger's channel message; NULL when it has none
    node            TEXT              -- the daemon that accepted it
);
CREATE INDEX dispatches_created ON dispatches (created_at);
CREATE TABLE batches (
    id           TEXT PRIMARY KEY,
    dispatch_id  TEXT NOT NULL REFERENCES dispatches (id),
    idx          INTEGER NOT NULL,
    count        INTEGER NOT NULL,
    touchpoint   TEXT NOT NULL,
    size         INTEGER NOT NULL,
    remaining    INTEGER NOT NULL,
    delivered    INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    state        TEXT NOT NULL,       -- pending, delivered, failed, dead
    attempts     INTEGER NOT NULL DEFAULT 0,
    attempt_base INTEGER NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL,
    held         TEXT,
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    users        BYTEA,               -- the stored form; NULL once delivered
    lease_owner  TEXT,                -- the node sending it, while its lease lasts
    lease_until  BIGINT               -- ms since the epoch, by the database's clock
);
-- The users are compressed with lz4 where the server has it (fewer TOAST chunks and less WAL for
-- little CPU); pglz, the fallback, costs more CPU than it saves, so without lz4 they are stored
-- as they are.
DO $$
BEGIN
    ALTER TABLE batches ALTER COLUMN users SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    ALTER TABLE batches ALTER COLUMN users SET STORAGE EXTERNAL;
END
$$;
CREATE INDEX batches_due ON batches (next_at) WHERE state = 'pending' AND held IS NULL;
CREATE INDEX batches_leased ON batches (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE INDEX batches_dispatch ON batches (dispatch_id, idx);
CREATE INDEX batches_touchpoint ON batches (touchpoint, state);
CREATE TABLE attempts (
    batch_id   TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    generation BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    latency_ms BIGINT NOT NULL,
    status     INTEGER,
    outcome    TEXT NOT NULL,
    recipients INTEGER NOT NULL,
    error      TEXT,
    node       TEXT,
    PRIMARY KEY (batch_id, attempt)
);
CREATE TABLE failures (
    seq      BIGSERIAL PRIMARY KEY,
    batch_id TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    reason   TEXT NOT NULL,
    attempt  INTEGER NOT NULL
);
CREATE INDEX failures_batch ON failures (batch_id);
CREATE TABLE replays (
    seq           BIGSERIAL PRIMARY KEY,
    batch_id      TEXT NOT NULL,
    at            BIGINT NOT NULL,
    after_attempt INTEGER NOT NULL,
    recipients    INTEGER NOT NULL
);
CREATE INDEX replays_batch ON replays (batch_id);
CREATE TABLE nodes (
    node         TEXT PRIMARY KEY,   -- chosen at start: host, pid and random
    host         TEXT NOT NULL,
    pid          BIGINT NOT NULL,
    listen       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at BIGINT NOT NULL,    -- ms since the epoch, by the database's clock
    stopped_at   BIGINT              -- set when it stopped cleanly
);
CREATE TABLE rate_buckets (
    touchpoint TEXT PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    at_ms      BIGINT NOT NULL       -- when `tokens` was counted, by the database's clock
);
CREATE TABLE shared_tokens (
    key         TEXT PRIMARY KEY,    -- which platform credential (never the secret itself)
    token       TEXT NOT NULL,       -- a secret: never printed
    expires_at  BIGINT NOT NULL,     -- ms since the epoch
    obtained_by TEXT NOT NULL,
    obtained_at BIGINT NOT NULL
);
"];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Whether `--state` names a PostgreSQL database rather than a SQLite file.
pub fn is_postgres_url(state: &str) -> bool {
    state.starts_with("postgres://") || state.starts_with("postgresql://")
}

/// `url` with the password of its user part (and any `password=` parameter) replaced by `***`,
/// for a message about a URL that could not be parsed.
pub fn redact(url: &str) -> String {
    let (head, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    if head.is_empty() {
        format!("{authority}{tail}")
    } else {
        format!("{head}://{authority}{tail}")
    }
}

/// How to reach the server: the driver's configuration and the TLS to use.
#[derive(Clone)]
struct Target {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// `postgres://user@host:port/db`: no password.
    shown: String,
}

impl Target {
    /// Reads a `postgres://` URL: the driver's own parameters, and `sslmode`/`sslrootcert`
    /// (which it does not know) taken out and applied here.
    fn parse(url: &str) -> Result<Self, RegistryError> {
        let bad = |why: String| RegistryError::PostgresUrl {
            url: redact(url),
            why,
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (mut sslmode, mut rootcert) = (None, None);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v.to_string()),
                Some(("sslrootcert", v)) => rootcert = Some(v.to_string()),
                _ => kept.push(pair),
            }
        }
        let driver_url = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config = driver_url
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(chain(&e)))?;
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("touchctl");
        }
        config.keepalives(true);
        let options = format!(
            "{} -c statement_timeout={STATEMENT_TIMEOUT_MS}",
            config.get_options().unwrap_or("")
        );
        config.options(options.trim_start());
        let tls = match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => {
                config.ssl_mode(SslMode::Disable);
                None
            }
            Some("require" | "verify-ca" | "verify-full") => {
                config.ssl_mode(SslMode::Require);
                Some(tls_connector(rootcert.as_deref()).map_err(bad)?)
            }
            Some(other) => {
                return Err(bad(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )));
            }
        };
        let shown = show(&config);
        Ok(Self { config, tls, shown })
    }

    /// A new connection of its own (not from the pool), its driver task on the current runtime.
    async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        match &self.tls {
            None => {
                let (client, conn) = self.config.connect(NoTls).await?;
                tokio::spawn(conn);
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = self.config.connect(tls.clone()).await?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    }

    fn pool(&self, size: usize) -> Result<Pool, String> {
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &self.tls {
            None => Manager::from_config(self.config.clone(), NoTls, manager_config),
            Some(tls) => Manager::from_config(self.config.clone(), tls.clone(), manager_config),
        };
        Pool::builder(manager)
            .max_size(size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CALL_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| e.to_string())
    }
}

/// The TLS connector: the server's certificate checked against `rootcert` (a PEM file) when
/// given, else against the platform's roots.
fn tls_connector(
    rootcert: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    // One process-wide TLS provider; an earlier install (by an embedding program) is fine too.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match rootcert {
        Some(file) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    format!("cannot read the CA certificates of sslrootcert={file}: {e}")
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert={file} holds no CA certificate this build can use (PEM expected)"
                ));
            }
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        None => {
            use rustls_platform_verifier::ConfigVerifierExt;
            rustls::ClientConfig::with_platform_verifier().map_err(|e| {
                format!("cannot load this system's CA certificates ({e}): name a CA file with sslrootcert=FILE")
            })?
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// `postgres://user@host:port/db`, from the parsed configuration: no password can be in it.
fn show(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    let user = if user.is_empty() {
        String::new()
    } else {
        format!("{user}@")
    };
    format!("postgres://{user}{host}:{port}/{db}")
}

/// The registry's own runtime, on a thread of its own (see the module docs).
struct Bridge {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bridge {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("postgres".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime ends its tasks: every connection closes, and the server
                // releases the advisory locks they held.
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `fut` on the registry's runtime and waits for it, at most [`CALL_TIMEOUT`].
pub(crate) fn block_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    shown: &str,
    fut: impl Future<Output = Result<T, RegistryError>> + Send + 'static,
) -> Result<T, RegistryError> {
    block_on_within(handle, shown, CALL_TIMEOUT, fut)
}

/// [`block_on`], waiting at most `limit`.
fn block_on_within<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    shown: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, RegistryError>> + Send + 'static,
) -> Result<T, RegistryError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let timed_out = || RegistryError::Postgres {
        database: shown.to_string(),
        why: format!(
            "no answer within {}: check that the server is reachable and not overloaded",
            humantime::format_duration(limit)
        ),
    };
    handle.spawn(async move {
        let answer = tokio::time::timeout(limit, fut).await;
        let _ = tx.send(answer);
    });
    match rx.recv_timeout(limit + Duration::from_secs(5)) {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(timed_out()),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(RegistryError::Postgres {
            database: shown.to_string(),
            why: "the registry's connection thread has stopped".into(),
        }),
    }
}

/// The PostgreSQL-backed registry.
pub struct PostgresRegistry {
    target: Target,
    pool: Pool,
    /// The connection of each lock this registry holds, by lock id.
    locks: Arc<Mutex<HashMap<String, Arc<Client>>>>,
    registry_id: String,
    fingerprinter: Fingerprinter,
    lease: Duration,
    // Last: dropped after the pool and the lock connections it drives.
    bridge: Bridge,
}

/// An error and its causes, as one line (the driver's own message says only what kind it is).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    // Bounded: a cause chain is short, but nothing stops one from being circular.
    for _ in 0..8 {
        let Some(c) = cause else { break };
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// A failed statement, as a registry error naming the database.
fn pg(shown: &str) -> impl Fn(tokio_postgres::Error) -> RegistryError + '_ {
    move |e| RegistryError::Postgres {
        database: shown.to_string(),
        why: chain(&e),
    }
}

fn no_connection(shown: &str, e: impl std::error::Error + 'static) -> RegistryError {
    let mut why = chain(&e);
    if why.contains("invalid peer certificate") {
        why.push_str(
            " (a server certificate from a private CA is checked against that CA: add sslrootcert=FILE, its PEM certificate, to the URL; connect by the host name the certificate names)",
        );
    }
    RegistryError::PostgresConnect {
        database: shown.to_string(),
        why,
    }
}

pub(crate) async fn pooled(
    pool: &Pool,
    shown: &str,
) -> Result<deadpool_postgres::Object, RegistryError> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => no_connection(shown, e),
        other => no_connection(shown, other),
    })
}

/// Applies the migrations this database lacks and returns its registry id and fingerprint key
/// (created now if it has none).
async fn migrate(
    client: &mut deadpool_postgres::Object,
    shown: &str,
) -> Result<(String, String), RegistryError> {
    let e = pg(shown);
    let tx = client.transaction().await.map_err(&e)?;
    tx.execute(&format!("SELECT pg_advisory_xact_lock({MIGRATE_KEY})"), &[])
        .await
        .map_err(&e)?;
    // Created only where missing, so that a user who may only read (plan) can open a registry
    // that is up to date.
    let exists: bool = tx
        .query_one("SELECT to_regclass('touchctl_schema') IS NOT NULL", &[])
        .await
        .map_err(&e)?
        .get(0);
    if !exists {
        tx.batch_execute(
            "CREATE TABLE touchctl_schema (
             version    BIGINT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
        )
        .await
        .map_err(&e)?;
    }
    let found: i64 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM touchctl_schema", &[])
        .await
        .map_err(&e)?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(RegistryError::SchemaTooNew {
            database: shown.to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in (1_i64..).zip(MIGRATIONS.iter()).skip(found as usize) {
        tx.batch_execute(sql).await.map_err(&e)?;
        tx.execute(
            "INSERT INTO touchctl_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(&e)?;
    }
    let (id, key) = match keys(&tx, shown).await? {
        Some(keys) => keys,
        None => {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('registry_id', $1), ('fingerprint_key', $2) \
                 ON CONFLICT (key) DO NOTHING",
                &[&crate::store::random_hex(16), &crate::store::random_hex(32)],
            )
            .await
            .map_err(&e)?;
            keys(&tx, shown)
                .await?
                .ok_or_else(|| RegistryError::NotARegistry(shown.to_string()))?
        }
    };
    tx.commit().await.map_err(&e)?;
    Ok((id, key))
}

/// The registry id and fingerprint key, when both are there.
async fn keys(
    tx: &deadpool_postgres::Transaction<'_>,
    shown: &str,
) -> Result<Option<(String, String)>, RegistryError> {
    let rows = tx
        .query(
            "SELECT key, value FROM meta WHERE key IN ('registry_id', 'fingerprint_key')",
            &[],
        )
        .await
        .map_err(pg(shown))?;
    let get = |k: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == k)
            .map(|r| r.get::<_, String>(1))
    };
    Ok(get("registry_id").zip(get("fingerprint_key")))
}

/// Bumps the change counter, in the transaction of a write.
async fn bump(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE data_version SET version = version + 1 WHERE singleton = 1",
        &[],
    )
    .await
    .map(|_| ())
}

const SELECT: &str = "SELECT id, kind, spec, live_spec, fingerprints, generation, paused, applied_at, \
     applied_by, source_commit, source_dirty, source_file FROM touchpoints";

fn read_row(r: &tokio_postgres::Row) -> super::sqlite::Row {
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
        r.get(9),
        r.get(10),
        r.get(11),
    )
}

const LOCK_ROW: &str = "SELECT lock_id, holder, pid, host, operation, acquired_at, expires_at, backend_pid \
     FROM registry_lock WHERE singleton = 1";

fn lock_info(r: &tokio_postgres::Row) -> (LockInfo, i32) {
    let pid: i64 = r.get(2);
    (
        LockInfo {
            lock_id: r.get(0),
            holder: r.get(1),
            pid: u32::try_from(pid).unwrap_or(0),
            host: r.get(3),
            operation: r.get(4),
            acquired_at: r.get(5),
            expires_at: r.get(6),
        },
        r.get(7),
    )
}

/// Whether the session of backend `pid` holds the registry's advisory lock.
async fn holds_lock<C: tokio_postgres::GenericClient>(
    client: &C,
    backend_pid: i32,
) -> Result<bool, tokio_postgres::Error> {
    let (class, object) = (LOCK_KEY >> 32, LOCK_KEY & 0xffff_ffff);
    client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = {class} AND objid = {object} AND objsubid = 1 AND pid = $1)"
            ),
            &[&backend_pid],
        )
        .await
        .map(|r| r.get(0))
}

fn conflict(id: &str, expected: Option<u64>, found: Option<i64>) -> RegistryError {
    let show = |g: Option<u64>| g.map_or_else(|| "none".to_string(), |g| g.to_string());
    RegistryError::Conflict {
        id: id.to_string(),
        expected: show(expected),
        found: show(found.map(|g| g as u64)),
    }
}

async fn generation(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    tx.query_opt("SELECT generation FROM touchpoints WHERE id = $1", &[&id])
        .await
        .map(|r| r.map(|r| r.get(0)))
}

impl PostgresRegistry {
    /// Connects to the database `url` names, applies the migrations it lacks (creating the
    /// registry in an empty database) and reads its id and key.
    pub fn open(url: &str) -> Result<Self, RegistryError> {
        Self::open_with_pool(url, POOL_SIZE)
    }

    /// [`PostgresRegistry::open`] with a pool of `size` connections (the daemon's queue shares the
    /// pool, and needs more than the commands).
    pub fn open_with_pool(url: &str, size: usize) -> Result<Self, RegistryError> {
        let target = Target::parse(url)?;
        let shown = target.shown.clone();
        let bridge = Bridge::start().map_err(|e| no_connection(&shown, e))?;
        // The pool's timers belong to the registry's runtime.
        let pool = {
            let _inside = bridge.handle.enter();
            target
                .pool(size)
                .map_err(|why| RegistryError::PostgresConnect {
                    database: shown.clone(),
                    why,
                })?
        };
        let (id, key) = {
            let (pool, shown) = (pool.clone(), shown.clone());
            block_on(&bridge.handle, &shown.clone(), async move {
                let mut client = pooled(&pool, &shown).await?;
                migrate(&mut client, &shown).await
            })?
        };
        let bytes = hex::decode(&key).unwrap_or_else(|_| key.clone().into_bytes());
        Ok(Self {
            target,
            pool,
            locks: Arc::default(),
            registry_id: id,
            fingerprinter: Fingerprinter::new(bytes),
            lease: crate::lease::TTL,
            bridge,
        })
    }

    /// Sets how often a lock's heartbeat renews its row (default [`crate::lease::TTL`]).
    pub fn with_lease(mut self, ttl: Duration) -> Self {
        self.lease = ttl;
        self
    }

    /// Runs `f` with a pooled connection on the registry's runtime (the queue's statements run
    /// here too).
    pub(crate) fn with_client<T, F, Fut>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, RegistryError>> + Send + 'static,
    {
        let (pool, shown) = (self.pool.clone(), self.target.shown.clone());
        block_on(&self.bridge.handle, &self.target.shown, async move {
            let client = pooled(&pool, &shown).await?;
            f(client, shown).await
        })
    }

    /// The pool, for statements the queue runs on the registry's runtime.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The registry's runtime.
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.bridge.handle
    }

    /// The database as shown: `postgres://user@host:port/db`, no password.
    pub(crate) fn shown(&self) -> &str {
        &self.target.shown
    }

    fn locked_conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Client>>> {
        // The map is only inserted into and removed from: a panic elsewhere cannot leave it torn.
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Registry for PostgresRegistry {
    fn describe(&self) -> String {
        format!("postgres {}", self.target.shown)
    }

    fn registry_id(&self) -> &str {
        &self.registry_id
    }

    fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// The counter every write bumps.
    fn data_version(&self) -> Result<i64, RegistryError> {
        self.with_client(move |c, shown| async move {
            c.query_one("SELECT version FROM data_version WHERE singleton = 1", &[])
                .await
                .map(|r| r.get(0))
                .map_err(pg(&shown))
        })
    }

    fn list(&self) -> Result<Vec<Live>, RegistryError> {
        let rows = self.with_client(move |c, shown| async move {
            let rows = c.query(SELECT, &[]).await.map_err(pg(&shown))?;
            Ok(rows.iter().map(read_row).collect::<Vec<_>>())
        })?;
        let mut live = rows
            .into_iter()
            .map(super::sqlite::decode)
            .collect::<Result<Vec<_>, _>>()?;
        live.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    fn get(&self, id: &str) -> Result<Option<Live>, RegistryError> {
        let id = id.to_string();
        let row = self.with_client(move |c, shown| async move {
            let row = c
                .query_opt(&format!("{SELECT} WHERE id = $1"), &[&id])
                .await
                .map_err(pg(&shown))?;
            Ok(row.as_ref().map(read_row))
        })?;
        row.map(super::sqlite::decode).transpose()
    }

    fn lock(&self, operation: &str) -> Result<(LockInfo, Option<LockInfo>), RegistryError> {
        let now_ms = crate::store::now_ms();
        let info = LockInfo {
            lock_id: crate::store::random_hex(8),
            holder: whoami(),
            pid: std::process::id(),
            host: hostname(),
            operation: operation.to_string(),
            acquired_at: now(),
            expires_at: Some(crate::lease::expiry(now_ms, self.lease)),
        };
        let (target, mine) = (self.target.clone(), info.clone());
        let (client, recovered) = block_on(&self.bridge.handle, &self.target.shown, async move {
            let shown = target.shown.as_str();
            let e = pg(shown);
            let mut client = target
                .connect()
                .await
                .map_err(|err| no_connection(shown, err))?;
            let tx = client.transaction().await.map_err(&e)?;
            // Whoever finds the advisory lock taken then reads the row of its holder, committed.
            tx.batch_execute("LOCK TABLE registry_lock IN EXCLUSIVE MODE")
                .await
                .map_err(&e)?;
            let got: bool = tx
                .query_one(&format!("SELECT pg_try_advisory_lock({LOCK_KEY})"), &[])
                .await
                .map_err(&e)?
                .get(0);
            let row = tx.query_opt(LOCK_ROW, &[]).await.map_err(&e)?;
            let held = row.as_ref().map(lock_info);
            if !got {
                let holder = match held {
                    Some((info, backend)) if holds_lock(&tx, backend).await.map_err(&e)? => info,
                    // A session holds the advisory lock without a row: not a touchctl.
                    _ => LockInfo {
                        lock_id: "(none)".into(),
                        holder: format!(
                            "a session that is not touchctl's holds advisory lock {LOCK_KEY}"
                        ),
                        pid: 0,
                        host: String::new(),
                        operation: "unknown".into(),
                        acquired_at: "unknown".into(),
                        expires_at: None,
                    },
                };
                return Err(RegistryError::Locked(Box::new(holder)));
            }
            // The advisory lock was free: a row left behind is of a holder whose session is gone.
            let recovered = held.map(|(info, _)| info);
            tx.execute(
                "INSERT INTO registry_lock (singleton, lock_id, holder, pid, host, operation, acquired_at, \
                     expires_at, backend_pid) \
                 VALUES (1, $1, $2, $3, $4, $5, $6, $7, pg_backend_pid()) \
                 ON CONFLICT (singleton) DO UPDATE SET lock_id = excluded.lock_id, holder = excluded.holder, \
                     pid = excluded.pid, host = excluded.host, operation = excluded.operation, \
                     acquired_at = excluded.acquired_at, expires_at = excluded.expires_at, \
                     backend_pid = excluded.backend_pid",
                &[
                    &mine.lock_id,
                    &mine.holder,
                    &i64::from(mine.pid),
                    &mine.host,
                    &mine.operation,
                    &mine.acquired_at,
                    &mine.expires_at,
                ],
            )
            .await
            .map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok((Arc::new(client), recovered))
        })?;
        self.locked_conns().insert(info.lock_id.clone(), client);
        Ok((info, recovered))
    }

    fn lease_ttl(&self) -> Duration {
        self.lease
    }

    fn renewer(&self, lock_id: &str) -> crate::lease::Renew {
        let client = self.locked_conns().get(lock_id).cloned();
        let (handle, shown, lock_id) = (
            self.bridge.handle.clone(),
            self.target.shown.clone(),
            lock_id.to_string(),
        );
        Box::new(move |expires_at| {
            let Some(client) = client.clone() else {
                return Ok(false);
            };
            // The lock lives with its connection: once that is closed, the lock is gone.
            if client.is_closed() {
                return Ok(false);
            }
            let lock_id = lock_id.clone();
            block_on(&handle, &shown, async move {
                client
                    .execute(
                        "UPDATE registry_lock SET expires_at = $2 \
                         WHERE singleton = 1 AND lock_id = $1 AND backend_pid = pg_backend_pid()",
                        &[&lock_id, &expires_at],
                    )
                    .await
                    .map(|n| n == 1)
                    .map_err(|e| RegistryError::Postgres {
                        database: String::new(),
                        why: chain(&e),
                    })
            })
            .map_err(|e| match e {
                RegistryError::Postgres { why, .. } => why,
                other => other.to_string(),
            })
        })
    }

    fn unlock(&self, lock_id: &str) -> Result<(), RegistryError> {
        let Some(client) = self.locked_conns().remove(lock_id) else {
            return Ok(());
        };
        let lock_id = lock_id.to_string();
        let shown = self.target.shown.clone();
        block_on(&self.bridge.handle, &self.target.shown, async move {
            if client.is_closed() {
                return Ok(());
            }
            let e = pg(&shown);
            client
                .execute("DELETE FROM registry_lock WHERE lock_id = $1", &[&lock_id])
                .await
                .map_err(&e)?;
            client
                .execute(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"), &[])
                .await
                .map_err(&e)?;
            // Dropping the client closes its connection.
            Ok(())
        })
    }

    fn force_unlock(&self, lock_id: &str, force: bool) -> Result<LockInfo, RegistryError> {
        let given = lock_id.to_string();
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            tx.batch_execute("LOCK TABLE registry_lock IN EXCLUSIVE MODE")
                .await
                .map_err(&e)?;
            let held = tx
                .query_opt(LOCK_ROW, &[])
                .await
                .map_err(&e)?
                .as_ref()
                .map(lock_info);
            let (info, backend) = match held {
                Some((info, backend)) if info.lock_id == given => (info, backend),
                held => {
                    return Err(RegistryError::NotLocked {
                        given,
                        held: held.map(|(info, _)| Box::new(info)),
                    });
                }
            };
            if holds_lock(&*tx, backend).await.map_err(&e)? {
                if !force {
                    return Err(RegistryError::LockLive(Box::new(info)));
                }
                // Waits (up to 5 s) for the session to end, so the lock is free on return.
                let ended: bool = tx
                    .query_one("SELECT pg_terminate_backend($1, 5000)", &[&backend])
                    .await
                    .map_err(|err| RegistryError::Postgres {
                        database: shown.to_string(),
                        why: format!(
                            "cannot end the lock holder's session (backend pid {backend}): {}. \
                             Connect as a user allowed to (its own user, a superuser or a member of \
                             pg_signal_backend), or stop the holder",
                            chain(&err)
                        ),
                    })?
                    .get(0);
                if !ended {
                    return Err(RegistryError::Postgres {
                        database: shown.to_string(),
                        why: format!(
                            "the lock holder's session (backend pid {backend}) did not end within 5 s: run force-unlock again"
                        ),
                    });
                }
            }
            tx.execute("DELETE FROM registry_lock WHERE lock_id = $1", &[&given])
                .await
                .map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(info)
        })
    }

    fn put(&self, put: &Put, expected: Option<u64>) -> Result<u64, RegistryError> {
        let put = put.clone();
        let fingerprints =
            serde_json::to_string(&put.fingerprints).unwrap_or_else(|_| "{}".to_string());
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            let generation = expected.map_or(1, |g| g + 1) as i64;
            let params: [&(dyn ToSql + Sync); 10] = [
                &put.id,
                &put.kind,
                &put.spec.as_str(),
                &fingerprints,
                &generation,
                &now(),
                &put.applied_by,
                &put.source.commit,
                &put.source.dirty,
                &put.source.file,
            ];
            let written = match expected {
                None => tx
                    .execute(
                        "INSERT INTO touchpoints (id, kind, spec, live_spec, fingerprints, generation, \
                             applied_at, applied_by, source_commit, source_dirty, source_file) \
                         VALUES ($1, $2, $3, NULL, $4, $5, $6, $7, $8, $9, $10) \
                         ON CONFLICT (id) DO NOTHING",
                        &params,
                    )
                    .await
                    .map_err(&e)?,
                Some(was) => {
                    let was = was as i64;
                    let mut params = params.to_vec();
                    params.push(&was);
                    tx.execute(
                        "UPDATE touchpoints SET kind = $2, spec = $3, live_spec = NULL, \
                             fingerprints = $4, generation = $5, applied_at = $6, applied_by = $7, \
                             source_commit = $8, source_dirty = $9, source_file = $10 \
                         WHERE id = $1 AND generation = $11",
                        &params,
                    )
                    .await
                    .map_err(&e)?
                }
            };
            if written != 1 {
                let found = generation_of(&tx, &put.id, &shown).await?;
                return Err(conflict(&put.id, expected, found));
            }
            bump(&tx).await.map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(generation as u64)
        })
    }

    fn delete(&self, id: &str, expected: u64) -> Result<(), RegistryError> {
        let id = id.to_string();
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            let deleted = tx
                .execute(
                    "DELETE FROM touchpoints WHERE id = $1 AND generation = $2",
                    &[&id, &(expected as i64)],
                )
                .await
                .map_err(&e)?;
            if deleted != 1 {
                let found = generation_of(&tx, &id, &shown).await?;
                return Err(conflict(&id, Some(expected), found));
            }
            bump(&tx).await.map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(())
        })
    }

    fn set_paused(&self, id: &str, paused: bool) -> Result<u64, RegistryError> {
        let id = id.to_string();
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            let row = tx
                .query_opt(
                    "UPDATE touchpoints SET paused = $2, generation = generation + 1 \
                     WHERE id = $1 RETURNING generation",
                    &[&id, &paused],
                )
                .await
                .map_err(&e)?;
            let Some(row) = row else {
                return Err(RegistryError::NotFound(id));
            };
            let generation: i64 = row.get(0);
            bump(&tx).await.map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(generation as u64)
        })
    }

    fn platform_ticket(&self, id: &str) -> Result<Option<String>, RegistryError> {
        let id = id.to_string();
        self.with_client(move |c, shown| async move {
            c.query_opt(
                "SELECT ticket FROM platform_tickets WHERE platform = $1",
                &[&id],
            )
            .await
            .map(|r| r.map(|r| r.get(0)))
            .map_err(pg(&shown))
        })
    }

    fn set_platform_ticket(&self, id: &str, ticket: &str) -> Result<(), RegistryError> {
        let (id, ticket) = (id.to_string(), ticket.to_string());
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            tx.execute(
                "INSERT INTO platform_tickets (platform, ticket, received_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (platform) DO UPDATE SET ticket = excluded.ticket, \
                     received_at = excluded.received_at",
                &[&id, &ticket, &now()],
            )
            .await
            .map_err(&e)?;
            bump(&tx).await.map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(())
        })
    }

    fn shared_token(&self, key: &str) -> Result<Option<SharedToken>, RegistryError> {
        let key = key.to_string();
        self.with_client(move |c, shown| async move {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT token, expires_at - {NOW_MS}, {NOW_MS} - obtained_at, obtained_by \
                         FROM shared_tokens WHERE key = $1"
                    ),
                    &[&key],
                )
                .await
                .map_err(pg(&shown))?;
            Ok(row.map(|r| SharedToken {
                token: Secret::new(r.get::<_, String>(0)),
                left: span(r.get(1)),
                age: span(r.get(2)),
                obtained_by: r.get(3),
            }))
        })
    }

    fn claim_token_fetch(
        &self,
        key: &str,
        claim: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<String>, RegistryError> {
        let (claim_key, claim, holder) = (
            format!("{FETCHING}{key}"),
            claim.to_string(),
            holder.to_string(),
        );
        let ttl = ms(ttl);
        self.with_client(move |c, shown| async move {
            let e = pg(&shown);
            // One statement: of two claims at once, the second waits for the first's row and
            // then finds it live.
            let taken = c
                .query_opt(
                    &format!(
                        "INSERT INTO shared_tokens (key, token, expires_at, obtained_by, obtained_at) \
                         VALUES ($1, $2, {NOW_MS} + $3, $4, {NOW_MS}) \
                         ON CONFLICT (key) DO UPDATE SET token = excluded.token, \
                             expires_at = excluded.expires_at, obtained_by = excluded.obtained_by, \
                             obtained_at = excluded.obtained_at \
                         WHERE shared_tokens.expires_at <= excluded.obtained_at \
                             OR shared_tokens.token = excluded.token \
                         RETURNING key"
                    ),
                    &[&claim_key, &claim, &ttl, &holder],
                )
                .await
                .map_err(&e)?;
            if taken.is_some() {
                return Ok(None);
            }
            let by = c
                .query_opt(
                    "SELECT obtained_by FROM shared_tokens WHERE key = $1",
                    &[&claim_key],
                )
                .await
                .map_err(&e)?
                .map(|r| r.get::<_, String>(0))
                // Released between the two statements: held a moment ago, so wait a round.
                .unwrap_or_default();
            Ok(Some(by))
        })
    }

    fn put_shared_token(
        &self,
        key: &str,
        token: &Secret,
        lifetime: Duration,
        holder: &str,
        claim: &str,
    ) -> Result<(), RegistryError> {
        let (key, token, holder, claim) = (
            key.to_string(),
            token.expose().to_string(),
            holder.to_string(),
            claim.to_string(),
        );
        let lifetime = ms(lifetime);
        self.with_client(move |mut c, shown| async move {
            let e = pg(&shown);
            let tx = c.transaction().await.map_err(&e)?;
            tx.execute(
                &format!(
                    "INSERT INTO shared_tokens (key, token, expires_at, obtained_by, obtained_at) \
                     VALUES ($1, $2, {NOW_MS} + $3, $4, {NOW_MS}) \
                     ON CONFLICT (key) DO UPDATE SET token = excluded.token, \
                         expires_at = excluded.expires_at, obtained_by = excluded.obtained_by, \
                         obtained_at = excluded.obtained_at"
                ),
                &[&key, &token, &lifetime, &holder],
            )
            .await
            .map_err(&e)?;
            tx.execute(
                "DELETE FROM shared_tokens WHERE key = $1 AND token = $2",
                &[&format!("{FETCHING}{key}"), &claim],
            )
            .await
            .map_err(&e)?;
            tx.commit().await.map_err(&e)?;
            Ok(())
        })
    }

    fn release_token_claim(&self, key: &str, claim: &str) -> Result<(), RegistryError> {
        let (claim_key, claim) = (format!("{FETCHING}{key}"), claim.to_string());
        self.with_client(move |c, shown| async move {
            c.execute(
                "DELETE FROM shared_tokens WHERE key = $1 AND token = $2",
                &[&claim_key, &claim],
            )
            .await
            .map(|_| ())
            .map_err(pg(&shown))
        })
    }

    fn drop_shared_token(&self, key: &str, token: &Secret) -> Result<bool, RegistryError> {
        let (key, token) = (key.to_string(), token.expose().to_string());
        self.with_client(move |c, shown| async move {
            c.execute(
                "DELETE FROM shared_tokens WHERE key = $1 AND token = $2",
                &[&key, &token],
            )
            .await
            .map(|n| n == 1)
            .map_err(pg(&shown))
        })
    }
}

/// The database's clock in ms since the epoch: shared tokens and claims are timed by it alone, so
/// nodes whose clocks differ agree on when one lapses.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// Milliseconds, as a duration (none when negative).
fn span(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration in milliseconds, saturating.
fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn generation_of(
    tx: &deadpool_postgres::Transaction<'_>,
    id: &str,
    shown: &str,
) -> Result<Option<i64>, RegistryError> {
    generation(tx, id).await.map_err(pg(shown))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::model::SpecJson;
    use crate::registry::conformance::wait_for;
    use crate::registry::{LockGuard, Provenance};

    /// A database of one test's own on the server `TOUCHCTL_TEST_POSTGRES` names, dropped at the
    /// end. `None` (the test skipped) when the variable is unset, unless `CI=true`.
    pub(crate) struct TestDb {
        base: String,
        name: String,
        pub(crate) url: String,
    }

    pub(crate) fn test_db() -> Option<TestDb> {
        let Ok(base) = std::env::var("TOUCHCTL_TEST_POSTGRES") else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "TOUCHCTL_TEST_POSTGRES is not set, and CI=true: the PostgreSQL tests must run"
            );
            eprintln!("skipped: set TOUCHCTL_TEST_POSTGRES=postgres://... to run it");
            return None;
        };
        let name = format!("touchctl_test_{}", crate::store::random_hex(8));
        sql(&base, &format!("CREATE DATABASE {name}"));
        let (path, query) = base.split_once('?').unwrap_or((&base, ""));
        let (scheme, rest) = path.split_once("://").unwrap();
        let authority = rest.split('/').next().unwrap();
        let mut url = format!("{scheme}://{authority}/{name}");
        if !query.is_empty() {
            url = format!("{url}?{query}");
        }
        Some(TestDb { base, name, url })
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            sql(
                &self.base,
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            );
        }
    }

    /// Runs `statements` on the database of `url`, on a connection of their own.
    pub(crate) fn sql(url: &str, statements: &str) {
        let target = Target::parse(url).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = target.connect().await.unwrap();
            client.batch_execute(statements).await.unwrap();
        });
    }

    /// The first column of the first row of `query`, as text.
    pub(crate) fn value(url: &str, query: &str) -> Option<String> {
        let target = Target::parse(url).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let client = target.connect().await.unwrap();
            let rows = client.simple_query(query).await.unwrap();
            rows.into_iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
        })
    }

    fn put(id: &str, spec: serde_json::Value) -> Put {
        Put {
            id: id.into(),
            kind: "custom".into(),
            spec: SpecJson::from_value(&spec),
            fingerprints: BTreeMap::from([("auth_token".into(), "hmac-sha256:00".into())]),
            applied_by: "tester@host".into(),
            source: Provenance {
                commit: Some("abc123".into()),
                dirty: true,
                file: Some("touchpoints/a.toml".into()),
            },
        }
    }

    #[test]
    fn put_is_compare_and_swap_and_every_write_changes_the_data_version() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        let other = PostgresRegistry::open(&db.url).unwrap();
        let v0 = other.data_version().unwrap();
        assert_eq!(reg.put(&put("a", json!({"v": 1})), None).unwrap(), 1);
        let v1 = other.data_version().unwrap();
        assert_ne!(v0, v1, "another process sees the write");
        match other.put(&put("a", json!({"v": 2})), None) {
            Err(e @ RegistryError::Conflict { .. }) => assert!(
                e.to_string()
                    .contains("expected generation none, found 1): run plan again"),
                "{e}"
            ),
            got => panic!("expected Conflict, got {got:?}"),
        }
        assert_eq!(
            other.data_version().unwrap(),
            v1,
            "a refused write changes nothing"
        );
        assert!(matches!(
            reg.put(&put("a", json!({"v": 2})), Some(7)),
            Err(RegistryError::Conflict { .. })
        ));
        assert!(matches!(
            reg.put(&put("b", json!({"v": 2})), Some(1)),
            Err(RegistryError::Conflict { .. })
        ));
        assert_eq!(reg.put(&put("a", json!({"v": 2})), Some(1)).unwrap(), 2);
        assert!(reg.delete("a", 1).is_err());
        let live = other.get("a").unwrap().unwrap();
        assert_eq!(live.spec().value(), json!({"v": 2}));
        assert_eq!(live.generation, 2);
        assert_eq!(live.applied_by, "tester@host");
        assert_eq!(live.source, put("a", json!({})).source);
        assert_eq!(live.fingerprints, put("a", json!({})).fingerprints);
        reg.put(&put("0", json!({"v": 0})), None).unwrap();
        let ids: Vec<String> = reg.list().unwrap().into_iter().map(|l| l.id).collect();
        assert_eq!(ids, ["0", "a"]);
        reg.delete("a", 2).unwrap();
        assert!(reg.get("a").unwrap().is_none());
        assert!(matches!(
            reg.delete("a", 2),
            Err(RegistryError::Conflict { .. })
        ));
    }

    #[test]
    fn concurrent_creates_of_one_touchpoint_let_exactly_one_win() {
        let Some(db) = test_db() else { return };
        let registries: Vec<PostgresRegistry> = (0..4)
            .map(|_| PostgresRegistry::open(&db.url).unwrap())
            .collect();
        let won = std::thread::scope(|s| {
            let handles: Vec<_> = registries
                .iter()
                .map(|r| s.spawn(move || r.put(&put("a", json!({"v": 1})), None).is_ok()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|ok| *ok)
                .count()
        });
        assert_eq!(won, 1);
    }

    #[test]
    fn drift_is_read_as_the_spec_in_force_and_cleared_by_the_next_apply() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        reg.put(&put("a", json!({"v": 1})), None).unwrap();
        sql(
            &db.url,
            r#"UPDATE touchpoints SET live_spec = '{"v":9}' WHERE id = 'a'"#,
        );
        let live = reg.get("a").unwrap().unwrap();
        assert_eq!(live.applied_spec.value(), json!({"v": 1}));
        assert_eq!(live.spec().value(), json!({"v": 9}));
        reg.put(&put("a", json!({"v": 2})), Some(1)).unwrap();
        let live = reg.get("a").unwrap().unwrap();
        assert_eq!(live.drifted_spec, None);
        assert_eq!(live.spec().value(), json!({"v": 2}));
        // A row that is not JSON is reported, naming the touchpoint.
        sql(
            &db.url,
            "UPDATE touchpoints SET spec = 'not json' WHERE id = 'a'",
        );
        assert!(matches!(reg.list(), Err(RegistryError::Corrupt { id, .. }) if id == "a"));
    }

    #[test]
    fn pause_bumps_generation_and_is_kept_by_put() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        assert!(matches!(
            reg.set_paused("a", true),
            Err(RegistryError::NotFound(id)) if id == "a"
        ));
        reg.put(&put("a", json!({"v": 1})), None).unwrap();
        assert_eq!(reg.set_paused("a", true).unwrap(), 2);
        reg.put(&put("a", json!({"v": 2})), Some(2)).unwrap();
        let live = reg.get("a").unwrap().unwrap();
        assert!(live.paused);
        assert_eq!(live.generation, 3);
        assert_eq!(reg.set_paused("a", false).unwrap(), 4);
        assert!(!reg.get("a").unwrap().unwrap().paused);
    }

    #[test]
    fn the_latest_ticket_is_kept_per_platform_and_is_no_touchpoint() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        assert_eq!(reg.platform_ticket("open").unwrap(), None);
        reg.set_platform_ticket("open", "ticket@@@1").unwrap();
        reg.set_platform_ticket("open", "ticket@@@2").unwrap();
        reg.set_platform_ticket("other", "ticket@@@x").unwrap();
        let again = PostgresRegistry::open(&db.url).unwrap();
        assert_eq!(
            again.platform_ticket("open").unwrap().as_deref(),
            Some("ticket@@@2")
        );
        assert_eq!(
            again.platform_ticket("other").unwrap().as_deref(),
            Some("ticket@@@x")
        );
        assert!(again.list().unwrap().is_empty());
    }

    #[test]
    fn an_empty_database_is_migrated_once_and_keeps_its_id_and_key() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        assert!(!Registry::is_new(&reg));
        assert_eq!(
            value(
                &db.url,
                "SELECT string_agg(version::text, ',' ORDER BY version) FROM touchctl_schema"
            ),
            Some(
                (1..=SCHEMA_VERSION)
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        );
        let fingerprint = reg
            .fingerprinter()
            .fingerprint(&crate::model::Secret::new("s"));
        let again = PostgresRegistry::open(&db.url).unwrap();
        assert_eq!(again.registry_id(), reg.registry_id());
        assert_eq!(reg.registry_id().len(), 32);
        assert_eq!(
            again
                .fingerprinter()
                .fingerprint(&crate::model::Secret::new("s")),
            fingerprint
        );
        assert_eq!(
            value(&db.url, "SELECT count(*) FROM touchctl_schema"),
            Some(SCHEMA_VERSION.to_string()),
            "a second open applies nothing"
        );
    }

    #[test]
    fn two_opens_at_once_migrate_once_and_agree_on_the_registry() {
        let Some(db) = test_db() else { return };
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| PostgresRegistry::open(&db.url).map(|r| r.registry_id)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
        assert_eq!(
            value(&db.url, "SELECT count(*) FROM touchctl_schema"),
            Some(SCHEMA_VERSION.to_string())
        );
    }

    #[test]
    fn a_database_written_by_a_newer_touchctl_is_refused() {
        let Some(db) = test_db() else { return };
        drop(PostgresRegistry::open(&db.url).unwrap());
        sql(&db.url, "INSERT INTO touchctl_schema (version) VALUES (99)");
        match PostgresRegistry::open(&db.url) {
            Err(e @ RegistryError::SchemaTooNew { found: 99, .. }) => {
                let shown = e.to_string();
                assert!(
                    shown.contains("written by a newer touchctl")
                        && shown.ends_with("upgrade touchctl"),
                    "{shown}"
                );
            }
            Err(other) => panic!("expected SchemaTooNew, got {other:?}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
    }

    #[test]
    fn a_second_lock_fails_naming_the_holder() {
        let Some(db) = test_db() else { return };
        let a = PostgresRegistry::open(&db.url).unwrap();
        let b = PostgresRegistry::open(&db.url).unwrap();
        let (held, recovered) = a.lock("apply").unwrap();
        assert_eq!(recovered, None);
        match b.lock("apply") {
            Err(e @ RegistryError::Locked(_)) => {
                let RegistryError::Locked(info) = &e else {
                    unreachable!()
                };
                assert_eq!(**info, held);
                let shown = e.to_string();
                assert!(
                    shown.contains(&format!(
                        "apply by {} (pid {})",
                        held.holder,
                        std::process::id()
                    )) && shown.contains(&format!("touchctl force-unlock {}", held.lock_id)),
                    "{shown}"
                );
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        // One process, one lock at a time too: the lock is the session's, not the process's.
        assert!(matches!(a.lock("apply"), Err(RegistryError::Locked(_))));
        a.unlock(&held.lock_id).unwrap();
        assert_eq!(
            value(&db.url, "SELECT count(*) FROM registry_lock"),
            Some("0".into())
        );
        let (again, recovered) = b.lock("apply").unwrap();
        assert_eq!(
            recovered, None,
            "a released lock leaves nothing to take over"
        );
        b.unlock(&again.lock_id).unwrap();
    }

    #[test]
    fn a_lock_whose_connection_dies_is_released_and_its_holder_learns_it() {
        let Some(db) = test_db() else { return };
        let a = PostgresRegistry::open(&db.url)
            .unwrap()
            .with_lease(Duration::from_millis(120));
        let b = PostgresRegistry::open(&db.url).unwrap();
        let guard = LockGuard::acquire(&a, "apply").unwrap();
        let first = guard.info.clone();
        // The heartbeat renews the row on the held connection.
        let expiry = || {
            value(&db.url, "SELECT expires_at FROM registry_lock")
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        wait_for("the lease was never renewed", || {
            expiry() > first.expires_at.unwrap()
        });
        // The holder's connection dies (its process killed, its network gone): the server ends it.
        sql(
            &db.url,
            "SELECT pg_terminate_backend(backend_pid) FROM registry_lock",
        );
        wait_for("the holder never learnt it lost the lock", || {
            guard.held().is_err()
        });
        assert!(guard.held().unwrap_err().contains("no longer held"));
        let (taken, recovered) = b.lock("apply").unwrap();
        assert_eq!(recovered.unwrap().lock_id, first.lock_id);
        // The old holder letting go does not remove the new holder's lock.
        drop(guard);
        assert!(
            matches!(a.lock("apply"), Err(RegistryError::Locked(h)) if h.lock_id == taken.lock_id)
        );
        // A registry dropped while holding the lock (a process that exits) releases it.
        drop(b);
        let mut recovered = None;
        wait_for(
            "the lock of a dropped registry was never released",
            || match a.lock("apply") {
                Ok((_, r)) => {
                    recovered = r;
                    true
                }
                Err(RegistryError::Locked(_)) => false,
                Err(e) => panic!("{e}"),
            },
        );
        assert_eq!(recovered.unwrap().lock_id, taken.lock_id);
    }

    #[test]
    fn force_unlock_refuses_a_live_holder_unless_forced_and_then_ends_its_session() {
        let Some(db) = test_db() else { return };
        let a = PostgresRegistry::open(&db.url).unwrap();
        let b = PostgresRegistry::open(&db.url).unwrap();
        let guard = LockGuard::acquire(&a, "apply").unwrap();
        let id = guard.info.lock_id.clone();
        match b.force_unlock("0000", false) {
            Err(RegistryError::NotLocked { held: Some(h), .. }) => assert_eq!(h.lock_id, id),
            other => panic!("expected NotLocked, got {other:?}"),
        }
        match b.force_unlock(&id, false) {
            Err(e @ RegistryError::LockLive(_)) => assert!(
                e.to_string()
                    .contains(&format!("touchctl force-unlock {id} --force")),
                "{e}"
            ),
            other => panic!("expected LockLive, got {other:?}"),
        }
        assert_eq!(b.force_unlock(&id, true).unwrap().lock_id, id);
        // Free at once: the holder's session has ended.
        let (taken, recovered) = b.lock("apply").unwrap();
        assert_eq!(recovered, None, "force-unlock removed the row");
        wait_for("the forced-out holder never noticed", || {
            a.renewer(&id)(0) == Ok(false)
        });
        drop(guard);
        b.unlock(&taken.lock_id).unwrap();
        assert!(matches!(
            b.force_unlock(&taken.lock_id, false),
            Err(RegistryError::NotLocked { held: None, .. })
        ));
        // A row left by a holder whose session is gone goes without --force.
        let (left, _) = a.lock("apply").unwrap();
        drop(a);
        // The server ends the session once it sees the connection close: a moment after.
        let mut freed = None;
        wait_for("the dead holder's session never ended", || {
            match b.force_unlock(&left.lock_id, false) {
                Ok(info) => {
                    freed = Some(info);
                    true
                }
                Err(RegistryError::LockLive(_)) => false,
                Err(e) => panic!("{e}"),
            }
        });
        assert_eq!(freed.unwrap().lock_id, left.lock_id);
    }

    #[test]
    fn the_registry_answers_from_inside_a_tokio_runtime() {
        let Some(db) = test_db() else { return };
        let reg = Arc::new(PostgresRegistry::open(&db.url).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = reg.clone();
        let generation = runtime.block_on(async move {
            // As the daemon's handlers do: a plain call from a task.
            r.put(&put("a", json!({"v": 1})), None).unwrap()
        });
        assert_eq!(generation, 1);
        let multi = tokio::runtime::Runtime::new().unwrap();
        let r = reg.clone();
        let listed = multi.block_on(async move { tokio::spawn(async move { r.list() }).await });
        assert_eq!(listed.unwrap().unwrap().len(), 1);
    }

    #[test]
    fn a_password_is_never_in_the_description_or_an_error() {
        let Some(db) = test_db() else { return };
        let password = "Pa55-word-never-shown";
        // The test server trusts loopback, so a password in the URL connects and is ignored.
        let with_password = db
            .url
            .replacen("://", &format!("://postgres:{password}@"), 1);
        let with_password = match with_password.matches('@').count() {
            1 => with_password,
            // The URL had a user already: keep only the one with the password.
            _ => {
                let (head, rest) = with_password.split_once('@').unwrap();
                let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
                format!("{head}@{rest}")
            }
        };
        let reg = PostgresRegistry::open(&with_password).unwrap();
        let shown = reg.describe();
        assert!(!shown.contains(password), "{shown}");
        assert!(
            shown.starts_with("postgres postgres://postgres@")
                && shown.ends_with(&format!("/{}", db.name)),
            "{shown}"
        );
        let mut errors = Vec::new();
        // A bad parameter, a bad sslmode, a database that does not exist, TLS refused by a
        // server without it, and a port nothing listens on.
        for url in [
            format!("{with_password}?port=notaport"),
            format!("{with_password}?sslmode=sometimes"),
            with_password.replace(&db.name, "touchctl_test_missing"),
            format!("{with_password}?sslmode=require"),
            {
                let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let port = closed.local_addr().unwrap().port();
                drop(closed);
                format!("postgres://postgres:{password}@127.0.0.1:{port}/x")
            },
        ] {
            match PostgresRegistry::open(&url) {
                Err(e) => errors.push(e.to_string()),
                Ok(_) => panic!("opened {}", redact(&url)),
            }
        }
        for e in &errors {
            assert!(!e.contains(password), "{e}");
        }
        assert!(
            errors[1].contains("sslmode=sometimes is not one of"),
            "{}",
            errors[1]
        );
        assert!(errors[2].contains("touchctl_test_missing"), "{}", errors[2]);
        assert!(errors[3].contains("TLS"), "{}", errors[3]);
        assert!(
            errors[4].starts_with("cannot connect to the PostgreSQL registry"),
            "{}",
            errors[4]
        );
    }

    #[test]
    fn a_url_is_redacted_and_recognised() {
        assert_eq!(
            redact("postgres://u:secret@h:5/db?sslmode=require&password=other"),
            "postgres://u:***@h:5/db?sslmode=require&password=***"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h"), "postgres://h");
        assert!(is_postgres_url("postgresql://h/db") && is_postgres_url("postgres://h"));
        assert!(!is_postgres_url(".touchctl/state.db") && !is_postgres_url("http://h"));
        let target =
            Target::parse("postgres://u:secret@db.example:6543/reg?sslmode=disable").unwrap();
        assert_eq!(target.shown, "postgres://u@db.example:6543/reg");
        assert!(target.tls.is_none());
        assert_eq!(
            target.config.get_options(),
            Some("-c statement_timeout=30000")
        );
        assert_eq!(target.config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
    }

    #[test]
    fn shared_tokens_are_kept_claimed_and_dropped() {
        let Some(db) = test_db() else { return };
        let reg = PostgresRegistry::open(&db.url).unwrap();
        crate::registry::conformance::shared_tokens(Arc::new(reg));
        // Timed by the database's clock: the stored expiry is the server's now plus the lifetime.
        let reg = PostgresRegistry::open(&db.url).unwrap();
        reg.put_shared_token("k", &Secret::new("t"), Duration::from_secs(60), "n", "c")
            .unwrap();
        let skew = value(
            &db.url,
            &format!(
                "SELECT abs(expires_at - 60000 - {NOW_MS}) < 5000 FROM shared_tokens WHERE key = 'k'"
            ),
        );
        assert_eq!(skew.as_deref(), Some("t"));
    }

    #[test]
    fn two_daemons_on_one_database_fetch_a_token_once() {
        let Some(db) = test_db() else { return };
        crate::registry::conformance::two_nodes_make_one_fetch(|| {
            Arc::new(PostgresRegistry::open(&db.url).unwrap())
        });
    }
}
