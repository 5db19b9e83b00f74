//! `touchctl state`: moving a single-machine setup (the SQLite registry and queue) into
//! PostgreSQL, and undoing the mark a move leaves on the SQLite files.
//!
//! The move, in order: read the target without changing it (refused when it holds a setup); open
//! it (creating touchctl's tables); take both registries' locks and the queue's daemon slot (a
//! running daemon is refused); hold the queue file's write lock while its rows stream into one
//! PostgreSQL transaction (a reader thread here, the database's `COPY` there); once the database
//! has checked what it got, mark the SQLite files and only then commit. A failed commit removes
//! the marks again. So the batches are never workable in both places, and a failure leaves
//! everything as it was.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use serde_json::json;

use touchctl::dispatch::queue::{Counts, Mark, QueueError, Row, SqliteQueue};
use touchctl::registry::{
    Incoming, LockGuard, Moved, MovedTo, PostgresRegistry, RegistryError, SqliteRegistry,
    is_postgres_url,
};
use touchctl::store::Found;
use touchctl::term::escape;

use super::OK;
use crate::cli::{Global, MigrateArgs, StateCommand, UnmarkArgs};

/// Rows sent to the database at a time.
const CHUNK: usize = 2000;
/// How often progress is shown, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub fn state_cmd(_g: &Global, command: &StateCommand) -> Result<u8> {
    match command {
        StateCommand::Migrate(args) => migrate(args),
        StateCommand::Unmark(args) => unmark(args),
    }
}

/// The queue file: given, or `queue.db` beside the registry file.
fn queue_beside(from: &Path, given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || from.parent().unwrap_or(Path::new("")).join("queue.db"),
        Path::to_path_buf,
    )
}

/// What moved (or would move), for the summary.
struct Summary<'a> {
    dry_run: bool,
    from: &'a Path,
    queue: &'a Path,
    queue_found: bool,
    to: &'a str,
    registry_id: &'a str,
    touchpoints: u64,
    paused: u64,
    drifted: u64,
    tickets: u64,
    counts: &'a Counts,
    elapsed: Duration,
}

impl<'a> Summary<'a> {
    /// What was moved (or would be): the files, the target, and what the registry and queue held.
    fn of(
        dry_run: bool,
        (from, queue, queue_found): (&'a Path, &'a Path, bool),
        to: &'a str,
        exported: &'a touchctl::registry::Exported,
        counts: &'a Counts,
        elapsed: Duration,
    ) -> Self {
        let touchpoints = &exported.touchpoints;
        Summary {
            dry_run,
            from,
            queue,
            queue_found,
            to,
            registry_id: &exported.registry_id,
            touchpoints: touchpoints.len() as u64,
            paused: touchpoints.iter().filter(|t| t.paused).count() as u64,
            drifted: touchpoints.iter().filter(|t| t.live_spec.is_some()).count() as u64,
            tickets: exported.tickets.len() as u64,
            counts,
            elapsed,
        }
    }

    fn json(&self) -> serde_json::Value {
        let c = self.counts;
        json!({
            "format_version": "1",
            "dry_run": self.dry_run,
            "from": {
                "registry": self.from.display().to_string(),
                "queue": self.queue.display().to_string(),
                "queue_found": self.queue_found,
            },
            "to": self.to,
            "registry_id": self.registry_id,
            "touchpoints": self.touchpoints,
            "paused": self.paused,
            "drifted": self.drifted,
            "platform_tickets": self.tickets,
            "dispatches": c.dispatches,
            "batches": {
                "total": c.batches,
                "pending": c.pending,
                "held": c.held,
                "delivered": c.delivered,
                "failed": c.failed,
                "dead": c.dead,
            },
            "recipients_pending": c.recipients_pending,
            "recipients_dead": c.recipients_dead,
            "attempts": c.attempts,
            "failures": c.failures,
            "replays": c.replays,
            "seconds": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        })
    }

    fn text(&self) -> String {
        let c = self.counts;
        let head = if self.dry_run {
            format!(
                "Dry run: nothing was written. Moving {} into {} would move:",
                self.files(),
                escape(self.to)
            )
        } else {
            format!(
                "Moved {} into {} in {:.1}s:",
                self.files(),
                escape(self.to),
                self.elapsed.as_secs_f64()
            )
        };
        let mut out = format!(
            "{head}\n  touchpoints         {} ({} paused, {} drifted; {} platform ticket(s))\n  dispatches          {}\n  batches             {}: {} pending ({} held), {} delivered, {} failed, {} dead\n  recipients pending  {} (and {} in dead batches)\n  attempts            {} ({} failed recipient(s), {} replay(s))\n",
            self.touchpoints,
            self.paused,
            self.drifted,
            self.tickets,
            c.dispatches,
            c.batches,
            c.pending,
            c.held,
            c.delivered,
            c.failed,
            c.dead,
            c.recipients_pending,
            c.recipients_dead,
            c.attempts,
            c.failures,
            c.replays,
        );
        if !self.dry_run {
            out.push_str(&format!(
                "The SQLite files are marked as moved: a daemon, deliveries or apply on them is refused.\nNext: run the daemons and commands with --state {} (the password from PGPASSWORD).\n",
                escape(self.to)
            ));
        }
        out
    }

    fn files(&self) -> String {
        if self.queue_found {
            format!(
                "{} and {}",
                escape(&self.from.display().to_string()),
                escape(&self.queue.display().to_string())
            )
        } else {
            format!(
                "{} (no queue file at {})",
                escape(&self.from.display().to_string()),
                escape(&self.queue.display().to_string())
            )
        }
    }
}

/// Shows how far the move got, on standard error, at most every [`PROGRESS_EVERY`].
struct Progress {
    quiet: bool,
    shown: Instant,
    started: Instant,
}

impl Progress {
    fn show(&mut self, counts: &Counts, sent: &Counts, last: bool) {
        if self.quiet || (!last && self.shown.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.shown = Instant::now();
        eprintln!(
            "moving: dispatches {}/{}, batches {}/{}, attempts {}/{}, failures {}/{}, replays {}/{} ({:.1}s)",
            sent.dispatches,
            counts.dispatches,
            sent.batches,
            counts.batches,
            sent.attempts,
            counts.attempts,
            sent.failures,
            counts.failures,
            sent.replays,
            counts.replays,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn count(sent: &mut Counts, row: &Row) {
    match row {
        Row::Dispatch(_) => sent.dispatches += 1,
        Row::Batch(_) => sent.batches += 1,
        Row::Attempt(_) => sent.attempts += 1,
        Row::Failure(_) => sent.failures += 1,
        Row::Replay(_) => sent.replays += 1,
    }
}

fn migrate(args: &MigrateArgs) -> Result<u8> {
    let started = Instant::now();
    let to = args.to.as_str();
    if !is_postgres_url(to) {
        bail!(
            "--to takes a PostgreSQL URL, postgres://USER@HOST:PORT/DB, not `{}`",
            escape(&touchctl::registry::shown_state(Path::new(to)))
        );
    }
    let from = args.from.as_path();
    let shown_from = from.display().to_string();
    match touchctl::store::found(from) {
        Ok(Found::Missing) => bail!(
            "there is no registry at {}: name the SQLite state file to move with --from (default .touchctl/state.db)",
            escape(&shown_from)
        ),
        Ok(_) => {}
        Err(e) => bail!("cannot read {}: {e}", escape(&shown_from)),
    }
    let registry = SqliteRegistry::open(from)?;
    if let Some(moved) = registry.moved_to()? {
        bail!(
            "the registry {} was moved into {} already, at {}: run touchctl with --state {}",
            escape(&shown_from),
            escape(&moved.to),
            escape(&moved.at),
            escape(&moved.to)
        );
    }
    let queue_path = queue_beside(from, args.queue.as_deref());
    let queue_found = queue_path.exists();
    // Read-only, so that a refused move changes nothing in the database either.
    let target = touchctl::registry::inspect(to)?;
    if !target.is_empty() {
        return Err(RegistryError::NotEmpty {
            database: target.database,
            touchpoints: target.touchpoints,
            dispatches: target.dispatches,
        }
        .into());
    }
    let mut progress = Progress {
        quiet: args.quiet.quiet,
        shown: Instant::now(),
        started,
    };
    if args.dry_run {
        let exported = registry.export()?;
        let counts = match queue_found {
            true => {
                let queue = SqliteQueue::open(&queue_path)?;
                let export = queue.export()?;
                let counts = export.counts()?;
                // Every batch's users read, as the move would read them.
                let mut sent = Counts::default();
                export.rows(|row| {
                    count(&mut sent, &row);
                    progress.show(&counts, &sent, false);
                    true
                })?;
                counts
            }
            false => Counts::default(),
        };
        let summary = Summary::of(
            true,
            (from, &queue_path, queue_found),
            &target.database,
            &exported,
            &counts,
            started.elapsed(),
        );
        print_summary(&summary, args.json)?;
        return Ok(OK);
    }

    let postgres = PostgresRegistry::open(to)?;
    let shown_to = target.database.clone();
    let _target_lock = LockGuard::acquire(&postgres, "migrate")?;
    let _lock = LockGuard::acquire(&registry, "migrate")?;
    let queue = SqliteQueue::open(&queue_path)?;
    let taken = queue
        .take_daemon_slot(touchctl::registry::MOVE_LIMIT)
        .map_err(|e| match e {
            QueueError::Busy(slot) => anyhow!(
                "a daemon ({}) works the queue {}: stop it (SIGTERM: it finishes what it is sending and records it), then run `touchctl state migrate` again. Moving the files under a running daemon would lose or duplicate what it sends",
                escape(&slot.to_string()),
                escape(&queue_path.display().to_string())
            ),
            other => other.into(),
        })?;
    let result = move_all(
        &registry,
        &queue,
        &postgres,
        &shown_from,
        &shown_to,
        &mut progress,
    );
    let _ = queue.leave_daemon_slot(&taken.lease_id);
    let (exported, counts) = result?;
    let summary = Summary::of(
        false,
        (from, &queue_path, queue_found),
        &shown_to,
        &exported,
        &counts,
        started.elapsed(),
    );
    print_summary(&summary, args.json)?;
    Ok(OK)
}

fn print_summary(summary: &Summary<'_>, as_json: bool) -> Result<()> {
    if as_json {
        println!(
            "{}",
            touchctl::term::json(serde_json::to_string_pretty(&summary.json())?)
        );
    } else {
        print!("{}", summary.text());
    }
    Ok(())
}

/// Streams the registry and the queue into the database and marks the SQLite files (see the
/// module docs); returns what was read.
fn move_all(
    registry: &SqliteRegistry,
    queue: &SqliteQueue,
    postgres: &PostgresRegistry,
    shown_from: &str,
    shown_to: &str,
    progress: &mut Progress,
) -> Result<(touchctl::registry::Exported, Counts)> {
    let export = queue.export()?;
    let counts = export.counts()?;
    let exported = registry.export()?;
    let (rows_tx, rows_rx) = tokio::sync::mpsc::channel::<Incoming>(4);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Moved>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<bool>();
    let from = format!("{} on {}", shown_from, touchctl::registry::hostname());
    let mark_at = touchctl::registry::now();
    std::thread::scope(|s| -> Result<()> {
        let sent_registry = exported.clone();
        let writer =
            s.spawn(move || postgres.move_in(&from, sent_registry, rows_rx, ready_tx, go_rx));
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut sent = Counts::default();
        let read = export.rows(|row| {
            count(&mut sent, &row);
            chunk.push(row);
            if chunk.len() < CHUNK {
                return true;
            }
            progress.show(&counts, &sent, false);
            rows_tx
                .blocking_send(Incoming::Rows(std::mem::take(&mut chunk)))
                .is_ok()
        });
        // The database stops taking rows only when it failed: its error says why.
        let read = read.map_err(anyhow::Error::from).and_then(|complete| {
            if !chunk.is_empty() {
                rows_tx
                    .blocking_send(Incoming::Rows(std::mem::take(&mut chunk)))
                    .map_err(|_| anyhow!("the database stopped taking rows"))?;
            }
            if complete {
                rows_tx
                    .blocking_send(Incoming::End)
                    .map_err(|_| anyhow!("the database stopped taking rows"))?;
            }
            Ok(())
        });
        drop(rows_tx);
        let joined = |writer: std::thread::ScopedJoinHandle<'_, Result<Moved, RegistryError>>| -> Result<Moved> {
            writer
                .join()
                .map_err(|_| anyhow!("the thread writing to PostgreSQL failed"))?
                .map_err(anyhow::Error::from)
        };
        if let Err(e) = read {
            drop(go_tx);
            // The database's own error, when it is why reading stopped.
            joined(writer)?;
            return Err(e);
        }
        let Ok(_checked) = ready_rx.recv() else {
            drop(go_tx);
            joined(writer)?;
            bail!(
                "the move into {} ended before it was checked",
                escape(shown_to)
            );
        };
        progress.show(&counts, &sent, true);
        let mark = Mark {
            to: shown_to.to_string(),
            at: mark_at.clone(),
        };
        let marked = export
            .finish(&mark)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                registry
                    .mark_moved(&MovedTo {
                        to: shown_to.to_string(),
                        at: mark_at.clone(),
                    })
                    .map_err(anyhow::Error::from)
            });
        if let Err(e) = marked {
            let _ = go_tx.send(false);
            let _ = joined(writer);
            let _ = touchctl::dispatch::queue::unmark(queue.path());
            let _ = registry.unmark_moved();
            return Err(e.context("cannot mark the SQLite files as moved, so nothing was moved"));
        }
        let _ = go_tx.send(true);
        match joined(writer) {
            Ok(_) => Ok(()),
            Err(e) => {
                let queue_unmarked = touchctl::dispatch::queue::unmark(queue.path());
                let registry_unmarked = registry.unmark_moved();
                if queue_unmarked.is_err() || registry_unmarked.is_err() {
                    return Err(e.context(format!(
                        "nothing was moved, and the SQLite files could not be unmarked: run `touchctl state unmark --from {} --queue {}`",
                        escape(shown_from),
                        escape(&queue.path().display().to_string())
                    )));
                }
                Err(e.context("nothing was moved; the SQLite files are as they were"))
            }
        }
    })?;
    Ok((exported, counts))
}

fn unmark(args: &UnmarkArgs) -> Result<u8> {
    let from = args.from.as_path();
    let queue_path = queue_beside(from, args.queue.as_deref());
    let mut unmarked = 0;
    if matches!(touchctl::store::found(from), Ok(Found::File)) {
        let registry = SqliteRegistry::open(from)?;
        if let Some(moved) = registry.unmark_moved()? {
            unmarked += 1;
            println!(
                "Unmarked the registry {} (moved into {} at {}).",
                escape(&from.display().to_string()),
                escape(&moved.to),
                escape(&moved.at)
            );
        }
    }
    if matches!(touchctl::store::found(&queue_path), Ok(Found::File))
        && let Some(mark) = touchctl::dispatch::queue::unmark(&queue_path)?
    {
        unmarked += 1;
        println!(
            "Unmarked the queue {} (moved into {} at {}).",
            escape(&queue_path.display().to_string()),
            escape(&mark.to),
            escape(&mark.at)
        );
    }
    if unmarked == 0 {
        println!(
            "Neither {} nor {} is marked as moved; nothing to do.",
            escape(&from.display().to_string()),
            escape(&queue_path.display().to_string())
        );
    } else {
        println!(
            "A daemon started on these files sends their pending batches: make sure none works the PostgreSQL copy."
        );
    }
    Ok(OK)
}
