//! The daemon-side commands: `daemon` and `deliveries` (the queue's log); `dispatch`, its
//! client, is in [`super::dispatch`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use touchctl::daemon::{self, reconcile::Source};
use touchctl::dispatch::queue::{Filter, Queue};
use touchctl::model::{Secret, SecretPolicy};
use touchctl::term::{self, escape};

use super::{FAILED, OK};
use crate::cli::{DaemonArgs, DeliveriesCommand, DeliveriesFormat, Global, ListFormat};

/// Whether `--state` names a PostgreSQL database (which then holds the queue too).
fn state_is_postgres(g: &Global) -> bool {
    g.state
        .to_str()
        .is_some_and(touchctl::registry::is_postgres_url)
}

/// The SQLite queue file: given, or `queue.db` beside the registry file. A registry in PostgreSQL
/// keeps the queue in the same database; `--queue` then names a SQLite file to read instead.
pub fn queue_path(g: &Global, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(given) = given {
        return Ok(given.to_path_buf());
    }
    if state_is_postgres(g) {
        bail!(
            "--state names a PostgreSQL database, which holds the queue: this needs a SQLite queue file; name it with --queue FILE"
        );
    }
    Ok(g.state.parent().unwrap_or(Path::new("")).join("queue.db"))
}

pub(super) fn read_token(file: Option<&Path>) -> Result<Option<Secret>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the API token file {}", file.display()))?;
        let token = text.trim();
        if token.is_empty() {
            bail!("the API token file {} is empty", file.display());
        }
        return Ok(Some(Secret::new(token)));
    }
    Ok(std::env::var("TOUCHCTL_API_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Secret::new(t.trim())))
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The secret policy of the daemon: as for plan, and its own API token file is never a source.
fn daemon_secret_policy(g: &Global, token_file: Option<&Path>) -> SecretPolicy {
    let policy = super::secret_policy(g);
    match token_file {
        Some(file) => policy.with_own_file(file, "the daemon's API token file"),
        None => policy,
    }
}

pub fn daemon_cmd(g: &Global, args: &DaemonArgs) -> Result<u8> {
    let source = Source::parse(&args.source).map_err(|e| anyhow!(e))?;
    if source != Source::Worktree && !args.watch {
        bail!("--source only matters with --watch: add --watch to reconcile from {source}");
    }
    let shared = state_is_postgres(g);
    if shared && args.queue.is_some() {
        bail!(
            "--state names a PostgreSQL database, which holds the queue every daemon on it shares: leave out --queue (to move a SQLite queue into the database, use `touchctl state migrate`)"
        );
    }
    let config = daemon::Config {
        listen: args.listen,
        public_url: args.public_url.clone(),
        dir: g.dir.clone(),
        state: g.state.clone(),
        queue: if shared {
            PathBuf::new()
        } else {
            queue_path(g, args.queue.as_deref())?
        },
        watch: args.watch,
        source,
        interval: args.interval,
        max_deletes: args.max_deletes,
        allow_private_network: args.allow_private_network,
        token: read_token(args.api_token_file.as_deref())?,
        insecure_no_auth: args.insecure_no_auth,
        concurrency: args.concurrency,
        max_in_flight: args.max_in_flight,
        max_body: args.max_body,
        max_body_memory: args
            .max_body_memory
            .unwrap_or(args.max_body.saturating_mul(2)),
        max_queued: args.max_queued,
        client_timeout: args.client_timeout,
        max_connections: args.max_connections.map(|n| n as usize),
        drain: args.drain_timeout,
        retention: args.retention,
        lease_ttl: args.lease_ttl,
        secrets: daemon_secret_policy(g, args.api_token_file.as_deref()),
    };
    let rt = runtime()?;
    let result = rt.block_on(daemon::run(config, |_| {}));
    // A blocking task still running (a DNS lookup that hangs, say) must not keep a daemon that
    // has drained and recorded everything from exiting.
    rt.shutdown_timeout(Duration::from_secs(1));
    result?;
    Ok(OK)
}

fn when(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Opens the queue the delivery commands read: the one in PostgreSQL when `--state` names a
/// database and `--queue` does not name a SQLite file, else the SQLite file.
fn open_any_queue(g: &Global, given: Option<&Path>) -> Result<(Queue, String)> {
    if given.is_none()
        && let Some(url) = g
            .state
            .to_str()
            .filter(|s| touchctl::registry::is_postgres_url(s))
    {
        let registry = std::sync::Arc::new(touchctl::registry::PostgresRegistry::open(url)?);
        let node = format!(
            "{}-{}-cli",
            touchctl::registry::hostname(),
            std::process::id()
        );
        let queue =
            touchctl::dispatch::queue::PostgresQueue::open(registry, node, touchctl::lease::TTL)?;
        let queue = Queue::Postgres(queue);
        let shown = queue.describe();
        return Ok((queue, shown));
    }
    let path = queue_path(g, given)?;
    Ok((open_queue(&path)?, path.display().to_string()))
}

/// Opens the queue file, which only `touchctl daemon` creates.
fn open_queue(path: &Path) -> Result<Queue> {
    if !path.exists() {
        bail!(
            "there is no queue file at {}: it is created by `touchctl daemon` (or point --queue at it)",
            path.display()
        );
    }
    Ok(Queue::open(path)?)
}

/// `touchctl force-unlock --daemon`: releases the queue from the daemon holding it.
pub fn release_queue_cmd(g: &Global, queue: Option<&Path>, force: bool) -> Result<u8> {
    if queue.is_none() && state_is_postgres(g) {
        bail!(
            "daemons sharing a PostgreSQL queue hold no lock on it to release: each holds leases on the batches it is sending, and a daemon that is gone leaves them to expire (after --lease-ttl, 30 s by default); the other daemons then take its batches over"
        );
    }
    let path = queue_path(g, queue)?;
    let queue = open_queue(&path)?;
    let Some(sqlite) = queue.sqlite() else {
        bail!("{} is not a SQLite queue file", path.display());
    };
    match sqlite.release_daemon_slot(force)? {
        Some(held) => println!(
            "Released the queue {} from the daemon that held it ({}). The next daemon started on it takes it.",
            escape(&path.display().to_string()),
            escape(&held.to_string())
        ),
        None => println!(
            "No daemon holds the queue {}; nothing to release.",
            escape(&path.display().to_string())
        ),
    }
    Ok(OK)
}

pub fn deliveries_cmd(g: &Global, command: &DeliveriesCommand, queue: Option<&Path>) -> Result<u8> {
    let (queue, shown) = open_any_queue(g, queue)?;
    match command {
        DeliveriesCommand::List {
            only,
            touchpoint,
            dispatch,
            limit,
            format,
        } => {
            let batches = queue.batches(&Filter {
                state: only.map(|s| s.as_str().to_string()),
                touchpoint: touchpoint.clone(),
                dispatch_id: dispatch.clone(),
                limit: *limit,
            })?;
            match format {
                ListFormat::Json => {
                    println!("{}", term::json(serde_json::to_string_pretty(&batches)?));
                    return Ok(OK);
                }
                ListFormat::Ids => {
                    for b in &batches {
                        println!("{}", escape(&b.id));
                    }
                    return Ok(OK);
                }
                ListFormat::Text => {}
            }
            if batches.is_empty() {
                println!("No batches match.");
                return Ok(OK);
            }
            println!(
                "{:<40} {:<16} {:<9} {:>9} {:>9} {:>6} {:>8}  last change / note",
                "batch", "touchpoint", "state", "delivered", "remaining", "failed", "attempts"
            );
            for b in &batches {
                // What an endpoint answered, and ids, are escaped: they reach a terminal.
                let note = match (&b.held, &b.last_error) {
                    (Some(h), _) => format!("held: {}", escape(h)),
                    (None, Some(e)) => escape(e).into_owned(),
                    (None, None) => String::new(),
                };
                println!(
                    "{:<40} {:<16} {:<9} {:>9} {:>9} {:>6} {:>8}  {} {}",
                    escape(&b.id),
                    escape(&b.touchpoint),
                    escape(&b.state),
                    b.delivered,
                    b.remaining,
                    b.failed,
                    b.attempts,
                    when(b.updated_at),
                    note
                );
            }
            Ok(OK)
        }
        DeliveriesCommand::Show { batch, format } => {
            let found = queue.batches(&Filter {
                limit: 0,
                ..Filter::default()
            })?;
            let Some(info) = found.into_iter().find(|b| &b.id == batch) else {
                bail!(
                    "no batch `{}` in {}: `touchctl deliveries list` shows them",
                    escape(batch),
                    escape(&shown)
                );
            };
            let (attempts, failures) = queue.history(batch)?;
            let replays = queue.replays(batch)?;
            if *format == DeliveriesFormat::Json {
                println!(
                    "{}",
                    term::json(serde_json::to_string_pretty(&json!({
                        "batch": info,
                        "attempts": attempts,
                        "replays": replays,
                        "failed_recipients": failures
                    }))?)
                );
                return Ok(OK);
            }
            println!(
                "batch {} ({} of {} in dispatch {}) to `{}`: {}{}",
                escape(&info.id),
                info.index + 1,
                info.count,
                escape(&info.dispatch_id),
                escape(&info.touchpoint),
                match info.state.as_str() {
                    "failed" =>
                        "failed (every recipient failed for good; none was delivered)".into(),
                    other => escape(other),
                },
                info.held
                    .as_deref()
                    .map(|h| format!(", held: {}", escape(h)))
                    .unwrap_or_default()
            );
            println!(
                "  recipients: {} in all, {} delivered, {} failed, {} remaining",
                info.size, info.delivered, info.failed, info.remaining
            );
            if let Some(next) = info.next_at {
                println!("  next attempt: {}", when(next));
            }
            println!("  attempts:");
            let mut replays = replays.iter().peekable();
            let replayed = |r: &touchctl::dispatch::queue::Replay| {
                println!(
                    "    replayed {}: {} recipient(s) due again, with a fresh attempt budget",
                    when(r.at),
                    r.recipients
                );
            };
            for a in &attempts {
                while let Some(r) = replays.next_if(|r| r.after_attempt < a.attempt) {
                    replayed(r);
                }
                println!(
                    "    #{} {} generation {} {} {}ms {} recipient(s){}",
                    a.attempt,
                    when(a.started_at),
                    a.generation,
                    a.status
                        .map_or("no response".to_string(), |s| format!("HTTP {s}")),
                    a.latency_ms,
                    a.recipients,
                    a.error
                        .as_deref()
                        .map(|e| format!(": {}", escape(e)))
                        .unwrap_or_default()
                );
                println!("       → {}", escape(&a.outcome));
            }
            if attempts.is_empty() {
                println!("    none yet");
            }
            replays.for_each(replayed);
            if !failures.is_empty() {
                println!("  failed recipients:");
                for f in &failures {
                    println!("    {}: {}", escape(&f.user_id), escape(&f.reason));
                }
            }
            Ok(OK)
        }
        DeliveriesCommand::Replay {
            batches,
            all,
            touchpoint,
        } => {
            if batches.is_empty() && !all {
                bail!(
                    "name the dead batches to replay, or pass --all (and optionally --touchpoint ID)"
                );
            }
            let replayed = queue.replay(batches, touchpoint.as_deref())?;
            let missing: Vec<&String> = batches.iter().filter(|b| !replayed.contains(b)).collect();
            for id in &replayed {
                println!("replayed {}", escape(id));
            }
            println!("{} batch(es) back in the queue.", replayed.len());
            if !missing.is_empty() {
                eprintln!(
                    "error: not dead (or unknown), so not replayed: {}",
                    missing
                        .iter()
                        .map(|s| escape(s))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(FAILED);
            }
            Ok(OK)
        }
    }
}
